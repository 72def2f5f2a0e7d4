"""Grammar-constrained decoding: a hand-written token automaton for the answer contract, as a logits processor.

Every answer the model is allowed to write is one the parser (:mod:`coordexp.evaluate.parse`) accepts with no
problem, byte for byte as :func:`coordexp.core.contract.render_answer` writes training answers::

    {"object_1": {"desc": "red circle", "bbox_2d": ["<|coord_12|>", ...]}, "object_2": {...}}

keys numbered from 1, one geometry per object, only coord tokens in coord slots, 4 coords for ``bbox_2d``, an
even count >= 6 for ``poly`` and >= 4 for ``line`` (upper bounds configurable), at most ``max_objects`` objects,
then an end-of-sequence token.

Why a hand-written automaton and not a grammar library: the answer grammar is small and fixed, and a measured
per-step overhead at Qwen's V = 152k decides it (bench/RESULTS.md, ``## constrained_decoding``): xgrammar
took 12 ms a step there, this automaton 0.7 ms (median, batch 8); and the budget rule below needs the closing
cost of every state under the actual vocabulary, which no library offers. Why byte level: in a byte-level BPE a
token may hold several grammar pieces at once (``",`` or `` "`` or ``"]}}``, or a quote and the first letters
of a description), so the automaton runs over each token's *bytes*, and a token is allowed when all of its bytes
can be consumed from the current state. Coord tokens are atomic symbols, allowed exactly in coord slots.

Speed: each vocabulary token's bytes are computed once; a state's allowed-token mask is computed once and
cached under a key that keeps only what the mask depends on (states repeat a lot: every coordinate slot of
every object shares one mask). Candidates are found through the first two bytes of each token, and free
description text is one vectorised class (tokens with no quote, backslash or control byte). A step then costs
one fold of the chosen token's bytes per row and a masked fill.

Budget rule: the answer must close before ``max_new_tokens`` runs out. For every state the processor knows the
fewest tokens that close it (the current object finished cleanly with the fewest coordinates, then ``}`` and
the end-of-sequence token), computed by a dynamic program over the actual vocabulary. When the remaining
budget gets close to that, only tokens after which the answer can still close in time are allowed: an answer
is never cut mid-object.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from transformers import LogitsProcessor

from coordexp.core.codec import COORD_TOKENS
from coordexp.core.geometry import GEOMETRY_KEYS

# automaton nodes: a position in the answer grammar
OPEN, FIRST, KEYNUM, KEYSFX, DESC, AFTER_DESC, GEOM, SLOT, CLOSEQ, AFTERC, AFTER_OBJ, DONE = range(12)

_LITS: dict[int, tuple[bytes, ...]] = {
    OPEN: (b"{",),
    FIRST: (b"}", b'"object_'),
    KEYSFX: (b'": {"desc": "',),
    AFTER_DESC: (b', "',),
    GEOM: tuple(f'{k}": ["'.encode() for k in GEOMETRY_KEYS),
    CLOSEQ: (b'"',),
    AFTERC: (b', "', b"]}"),
    AFTER_OBJ: (b', "object_', b"}"),
}
"""The fixed strings of each node; a node with several is a choice, decided by the first byte (they differ)."""
_CHOICE = {FIRST, GEOM, AFTERC, AFTER_OBJ}

State = tuple[int, int, int, int, int, int, int]
"""(node, alternative (-1: not chosen yet), byte position in it, object number, coords so far, geometry kind, desc)
where desc is the description's token count (free descriptions) or its trie node (``train_set``). In a free
description the coords field says whether a non-blank character was written (the parser rejects a blank one)."""

START: State = (OPEN, 0, 0, 0, 0, -1, 0)
_COORD, _EOS, _FILLER = 256, 257, 258  # symbols of a closing sequence besides bytes
_QUOTE = ord('"')
_INF = 1 << 30
_MAX_CACHED_BIASES = 256

Descriptions = Literal["free", "train_set"]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet (Qwen's too): each byte -> the printable character that stands for it in the
    vocabulary's token strings (printable ASCII and Latin-1 stand for themselves, the rest map above U+0100)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _byte_decoder() -> dict[str, int]:
    """:func:`byte_alphabet` inverted: the character in a token string -> the byte it stands for."""
    return {c: b for b, c in byte_alphabet().items()}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.decoder is None:
        return False
    state = backend.decoder.__getstate__()  # the decoder's JSON, also inside a Sequence of decoders
    return b'"ByteLevel"' in (state if isinstance(state, bytes) else str(state).encode())


def token_bytes(tokenizer: Any) -> tuple[list[bytes | None], np.ndarray, np.ndarray]:
    """(bytes of each token id, is-coord flags, is-special flags) over ``len(tokenizer)`` ids.

    Byte-level BPE tokens are spelled in GPT-2's printable alphabet and mapped back to their bytes; added
    tokens (coord tokens, the tiny tokenizer's grammar tokens, ``<think>``) are their literal text. An id with
    no token is ``None``.
    """
    n = len(tokenizer)
    added = {i: t for i, t in tokenizer.added_tokens_decoder.items() if i < n}
    coord_ids = set(tokenizer.convert_tokens_to_ids(list(COORD_TOKENS)))
    byte_level = _is_byte_level(tokenizer)
    if not byte_level:
        raise ValueError(
            f"{type(tokenizer).__name__}: constrained decoding needs a byte-level BPE tokenizer (its decoder is not "
            "ByteLevel); use evaluate.decoding: free with this checkpoint"
        )
    dec = _byte_decoder()
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    out: list[bytes | None] = []
    is_coord = np.zeros(n, dtype=bool)
    is_special = np.zeros(n, dtype=bool)
    for i, piece in enumerate(pieces):
        if i in coord_ids:
            is_coord[i] = True
            out.append(None)
        elif i in added:
            tok = added[i]
            is_special[i] = bool(tok.special)
            out.append(None if tok.special else tok.content.encode("utf-8"))
        elif piece is None:
            out.append(None)
        else:
            try:
                out.append(bytes(dec[ch] for ch in piece))
            except KeyError:
                out.append(None)  # not a byte-level piece: never allowed
    return out, is_coord, is_special


def escaped(desc: str) -> bytes:
    """A description as it appears between the quotes of a rendered answer (JSON-escaped, UTF-8)."""
    return json.dumps(desc, ensure_ascii=False)[1:-1].encode("utf-8")


class _Trie:
    """The closed set of descriptions, as bytes of their JSON-escaped forms; node 0 is the root."""

    def __init__(self, descriptions: Iterable[str]) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.terminal: list[bool] = [False]
        for d in sorted(set(descriptions)):
            if not d.strip():
                continue
            node = 0
            for b in escaped(d):
                nxt = self.children[node].get(b)
                if nxt is None:
                    nxt = len(self.children)
                    self.children.append({})
                    self.terminal.append(False)
                    self.children[node][b] = nxt
                node = nxt
            self.terminal[node] = True
        if not self.terminal.count(True):
            raise ValueError("descriptions: train_set needs at least one non-blank description in the train split")
        self._completions: dict[int, list[bytes]] = {}

    def completions(self, node: int) -> list[bytes]:
        """Every way to finish a description from ``node`` (the bytes still to write)."""
        if node not in self._completions:
            out: list[bytes] = []
            stack: list[tuple[int, bytes]] = [(node, b"")]
            while stack:
                nd, acc = stack.pop()
                if self.terminal[nd]:
                    out.append(acc)
                for b, ch in self.children[nd].items():
                    stack.append((ch, acc + bytes([b])))
            self._completions[node] = out
        return self._completions[node]


@dataclass(frozen=True)
class GrammarLimits:
    """The configurable bounds of the grammar (``evaluate.max_objects`` and friends)."""

    max_objects: int = 100
    max_poly_points: int = 64
    max_line_points: int = 64
    max_desc_tokens: int = 32
    """Free descriptions: at most this many tokens, so a model that never closes a description still closes."""


class Grammar:
    """The answer grammar over one tokenizer: token tables, cached masks and closing costs.

    One per detector; :meth:`processor` makes the per-``generate`` logits processor that holds the rows' states.
    """

    def __init__(
        self,
        tokenizer: Any,
        eos_ids: Sequence[int],
        vocab_size: int | None = None,
        *,
        descriptions: Sequence[str] | None = None,
        limits: GrammarLimits | None = None,
    ) -> None:
        self.limits = limits or GrammarLimits()
        if self.limits.max_objects < 1 or self.limits.max_poly_points < 3 or self.limits.max_line_points < 2:
            raise ValueError(f"grammar limits out of range: {self.limits}")
        self.tok_bytes, self.is_coord, is_special = token_bytes(tokenizer)
        n_tok = len(self.tok_bytes)
        self.vocab_size = int(vocab_size or n_tok)
        if self.vocab_size < n_tok:
            raise ValueError(f"model vocabulary {self.vocab_size} is smaller than the tokenizer's {n_tok} tokens")
        self.eos_ids = sorted({int(i) for i in eos_ids})
        if not self.eos_ids:
            raise ValueError("constrained decoding needs at least one end-of-sequence token id")
        self.coord_ids = np.flatnonzero(self.is_coord)
        if len(self.coord_ids) != len(COORD_TOKENS):
            raise ValueError(
                f"the tokenizer has {len(self.coord_ids)} of the {len(COORD_TOKENS)} coord tokens; constrained "
                "decoding needs all of them (build the base with coord tokens)"
            )
        self.coord_of: dict[int, int] = {int(i): 1 for i in self.coord_ids}
        self.eos_set = set(self.eos_ids)
        self.trie = _Trie(descriptions) if descriptions is not None else None
        self.maxc = (4, 2 * self.limits.max_poly_points, 2 * self.limits.max_line_points)  # GEOMETRY_KEYS order
        self.minc = (4, 6, 4)

        # desc-safe bytes: no quote, backslash or control character (JSON strings need no escape for them)
        self.pure_byte = np.ones(256, dtype=bool)
        self.pure_byte[:0x20] = False
        self.pure_byte[[_QUOTE, ord("\\")]] = False
        # bytes that make a description non-blank: ASCII graphic characters and UTF-8 lead bytes of characters
        # that are never whitespace (U+0085, U+00A0, U+1680, U+2000.. and U+3000 start with C2, E1, E2, E3)
        self.solid_byte = np.zeros(256, dtype=bool)
        self.solid_byte[0x21:0x7F] = True
        self.solid_byte[0xC3:0xE0] = True
        self.solid_byte[0xE4:0xF5] = True
        self.solid_byte &= self.pure_byte
        normal = np.array([b is not None and len(b) > 0 for b in self.tok_bytes], dtype=bool)
        normal &= ~self.is_coord & ~is_special
        self.normal = normal
        pure = np.zeros(n_tok, dtype=bool)
        solid = np.zeros(n_tok, dtype=bool)
        self.group1: dict[int, list[int]] = {}
        self.group2: dict[tuple[int, int], list[int]] = {}
        self.tokset: set[bytes] = set()
        digit_tokens_reach = False
        pure_lut = self.pure_byte
        for i in np.flatnonzero(normal).tolist():
            b = self.tok_bytes[i]
            assert b is not None
            self.tokset.add(b)
            arr = np.frombuffer(b, dtype=np.uint8)
            pure[i] = bool(pure_lut[arr].all())
            solid[i] = bool(self.solid_byte[arr].any())
            if len(b) == 1:
                self.group1.setdefault(b[0], []).append(i)
            else:
                self.group2.setdefault((b[0], b[1]), []).append(i)
            if not digit_tokens_reach and any(48 <= x <= 57 for x in b) and b"_" in b:
                digit_tokens_reach = True
        self.pure = pure
        self.pure_solid = pure & solid
        self.second: dict[int, list[int]] = {}
        for b0, b1 in self.group2:
            self.second.setdefault(b0, []).append(b1)
        self.impure_ids = np.flatnonzero(normal & ~pure)
        self.max_tok_len = max((len(b) for b in self.tokset), default=1)
        self.digit_reach = digit_tokens_reach
        """Some token could run from a key prefix into its digits: masks then depend on the next object number."""
        self._masks: dict[tuple[Any, ...], np.ndarray] = {}
        self._bias: dict[tuple[Any, ...], torch.Tensor] = {}
        self._need: dict[tuple[Any, ...], int] = {}
        self._groups: dict[State, list[tuple[int, np.ndarray]]] = {}
        ad = self._need_of((AFTER_DESC, 0, 0, 1, 0, -1, 0), per_geometry=True)
        self.best_kind = int(np.argmin(ad))
        # a single token moves the closing cost up by at most one whole new object (key, description, the
        # longest minimal geometry); below that margin every candidate token is checked against the budget
        self.margin = (
            self.need((KEYNUM, 0, 0, self.limits.max_objects, 0, -1, 0))
            + max(self.need((SLOT, 0, 0, 1, 0, k, 0)) for k in range(len(GEOMETRY_KEYS)))
            + 4
            + (max(len(escaped(d)) for d in descriptions) if descriptions else 0)
        )

    # ------------------------------------------------------------------------------------------
    # the automaton

    def _guard(self, node: int, alt: int, n: int, c: int, kind: int) -> bool:
        if node == AFTERC:
            return c < self.maxc[kind] if alt == 0 else self._valid(c, kind)
        if node == AFTER_OBJ and alt == 0:
            return n < self.limits.max_objects
        return True

    def _valid(self, c: int, kind: int) -> bool:
        return c == 4 if kind == 0 else (c >= self.minc[kind] and c % 2 == 0)

    @staticmethod
    def _enter(node: int, alt: int, n: int, c: int, kind: int) -> State:
        """The state after the literal ``alt`` of ``node`` is complete."""
        if node == OPEN:
            return (FIRST, -1, 0, n, 0, -1, 0)
        if node == FIRST:
            return (DONE, 0, 0, n, 0, -1, 0) if alt == 0 else (KEYNUM, 0, 0, 1, 0, -1, 0)
        if node == KEYNUM:
            return (KEYSFX, 0, 0, n, 0, -1, 0)
        if node == KEYSFX:
            return (DESC, 0, 0, n, 0, -1, 0)
        if node == AFTER_DESC:
            return (GEOM, -1, 0, n, 0, -1, 0)
        if node == GEOM:
            return (SLOT, 0, 0, n, 0, alt, 0)
        if node == CLOSEQ:
            return (AFTERC, -1, 0, n, c, kind, 0)
        if node == AFTERC:
            return (SLOT, 0, 0, n, c, kind, 0) if alt == 0 else (AFTER_OBJ, -1, 0, n, 0, -1, 0)
        if node == AFTER_OBJ:
            return (KEYNUM, 0, 0, n + 1, 0, -1, 0) if alt == 0 else (DONE, 0, 0, n, 0, -1, 0)
        raise AssertionError(node)

    def _lit(self, node: int, alt: int, n: int) -> bytes:
        return str(n).encode() if node == KEYNUM else _LITS[node][alt]

    def fold(self, s: State, data: bytes) -> State | None:
        """The state after consuming ``data`` (one token's bytes), or None when some byte does not fit."""
        touched = False
        trie = self.trie
        cap = self.limits.max_desc_tokens
        for b in data:
            node, alt, pos, n, c, kind, d = s
            if node == DESC:
                if trie is not None:
                    child = trie.children[d].get(b)
                    if child is not None:
                        s = (DESC, 0, 0, n, 0, -1, child)
                    elif b == _QUOTE and trie.terminal[d]:
                        s = (AFTER_DESC, 0, 0, n, 0, -1, 0)
                    else:
                        return None
                elif b == _QUOTE:
                    if not c:
                        return None  # a blank description
                    s = (AFTER_DESC, 0, 0, n, 0, -1, 0)
                elif self.pure_byte[b] and (touched or d < cap):
                    touched = True
                    if not c and self.solid_byte[b]:
                        s = (DESC, 0, 0, n, 1, -1, d)
                else:
                    return None
                continue
            if node == SLOT or node == DONE:
                return None
            if alt < 0:
                for i, lit in enumerate(_LITS[node]):
                    if lit[0] == b and self._guard(node, i, n, c, kind):
                        alt = i
                        break
                else:
                    return None
                pos = 0
            lit = self._lit(node, alt, n)
            if lit[pos] != b:
                return None
            pos += 1
            s = self._enter(node, alt, n, c, kind) if pos == len(lit) else (node, alt, pos, n, c, kind, d)
        if touched and s[0] == DESC:
            if s[6] + 1 >= cap and not s[4]:
                return None  # the cap would leave a blank description that cannot close
            s = (DESC, 0, 0, s[3], s[4], -1, s[6] + 1)
        return s

    def advance(self, s: State, token: int) -> State | None:
        """The state after ``token``; None when the grammar does not allow it there (DONE + EOS stays DONE)."""
        if token in self.coord_of:
            node, _, _, n, c, kind, _ = s
            return (CLOSEQ, 0, 0, n, c + 1, kind, 0) if node == SLOT else None
        if token in self.eos_set:
            return s if s[0] == DONE else None
        b = self.tok_bytes[token] if 0 <= token < len(self.tok_bytes) else None
        if b is None or not self.normal[token]:
            return None
        return self.fold(s, b)

    # ------------------------------------------------------------------------------------------
    # masks

    def _mask_key(self, s: State) -> tuple[Any, ...]:
        """What the allowed-token set of ``s`` depends on (states with one key share one mask)."""
        node, alt, pos, n, c, kind, d = s
        more = n < self.limits.max_objects
        nxt = n + 1 if self.digit_reach else None
        if node == KEYNUM:
            return (node, pos, str(n)[pos:], more, nxt)
        if node in (SLOT, DONE):
            return (node,)
        if node in (CLOSEQ, AFTERC):
            return (node, alt, pos, c < self.maxc[kind], self._valid(c, kind), more, nxt)
        if node == DESC:
            cap = self.limits.max_desc_tokens
            dv = d if self.trie is not None else (c, d >= cap, d == cap - 1)
            return (node, dv, more, nxt)
        return (node, alt, pos, more, nxt)

    def _compute_mask(self, s: State) -> np.ndarray:
        allowed = np.zeros(self.vocab_size, dtype=bool)
        node = s[0]
        if node == SLOT:
            allowed[self.coord_ids] = True
            return allowed
        if node == DONE:
            allowed[self.eos_ids] = True
            return allowed
        if node == DESC and self.trie is None:
            d, solid, cap = s[6], s[4], self.limits.max_desc_tokens
            if d < cap:
                allowed[: len(self.pure)] = self.pure if solid or d < cap - 1 else self.pure_solid
            cands: Iterable[int] = self.impure_ids.tolist()
        else:
            cands = []
            for b0 in range(256):
                s1 = self.fold(s, bytes([b0]))
                if s1 is None:
                    continue
                cands.extend(self.group1.get(b0, ()))
                for b1 in self.second.get(b0, ()):
                    if self.fold(s, bytes([b0, b1])) is not None:
                        cands.extend(self.group2[(b0, b1)])
        for i in cands:
            b = self.tok_bytes[i]
            if b is not None and self.fold(s, b) is not None:
                allowed[i] = True
        return allowed

    def allowed(self, s: State) -> np.ndarray:
        """Bool mask over the model vocabulary: True where ``s`` allows the token."""
        key = self._mask_key(s)
        m = self._masks.get(key)
        if m is None:
            m = self._masks[key] = self._compute_mask(s)
        return m

    def bias(self, s: State, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """0 where ``s`` allows the token, ``-inf`` where it does not: added to the scores.

        Why an addition and not ``masked_fill``: a fill over a mask of scattered holes is branchy and runs ~20x
        slower on a CPU than one vectorised add at V = 152k (bench/RESULTS.md, ``## constrained_decoding``).
        """
        key = (self._mask_key(s), str(device), dtype)
        t = self._bias.get(key)
        if t is None:
            if len(self._bias) >= _MAX_CACHED_BIASES:
                self._bias.clear()  # a bound on memory (V floats each); states that recur come back at once
            t = torch.zeros(self.vocab_size, dtype=dtype)
            t[torch.from_numpy(~self.allowed(s))] = float("-inf")
            t = self._bias[key] = t.to(device)
        return t

    # ------------------------------------------------------------------------------------------
    # the budget: fewest tokens that close the answer from a state

    def _cost(self, seq: Sequence[int]) -> int:
        """Fewest tokens that spell ``seq`` (bytes, coord slots, a filler description token, EOS)."""
        n = len(seq)
        best = [0] * (n + 1)
        run_end = n
        tokset, maxlen = self.tokset, self.max_tok_len
        for i in range(n - 1, -1, -1):
            sym = seq[i]
            if sym >= 256:
                best[i] = 1 + best[i + 1]
                run_end = i
                continue
            m = _INF
            for j in range(i + 1, min(run_end, i + maxlen) + 1):
                if best[j] + 1 < m and bytes(seq[i:j]) in tokset:
                    m = best[j] + 1
            best[i] = m
        if best[0] >= _INF:
            raise ValueError(f"the tokenizer cannot spell the answer's closing {bytes(x for x in seq if x < 256)!r}")
        return best[0]

    def _tail(self, c: int, kind: int) -> list[int]:
        """After a coord's closing quote: the fewest further coords, then ``]}``."""
        seq: list[int] = []
        while not self._valid(c, kind):
            seq += [*b', "', _COORD, _QUOTE]
            c += 1
        return seq + list(b"]}")

    def _geom_from(self, kind: int, pos: int) -> list[int]:
        return [*_LITS[GEOM][kind][pos:], _COORD, _QUOTE, *self._tail(1, kind)]

    def _desc_rests(self, d: int, solid: int) -> list[list[int]]:
        if self.trie is None:
            return [[_QUOTE] if solid else [_FILLER, _QUOTE]]
        return [[*w, _QUOTE] for w in self.trie.completions(d)]

    def _closings(self, s: State, kind_choice: int | None) -> list[list[int]]:
        """Candidate closing sequences of ``s``; ``kind_choice`` fixes the geometry of a future geometry choice."""
        node, alt, pos, n, c, kind, d = s
        end = [*b"}", _EOS]
        kinds = range(len(GEOMETRY_KEYS)) if kind_choice is None else [kind_choice]

        def geoms(prefix: list[int]) -> list[list[int]]:
            return [prefix + self._geom_from(k, 0) + end for k in kinds]

        def from_desc(prefix: list[int], dd: int, solid: int = 0) -> list[list[int]]:
            return [q for r in self._desc_rests(dd, solid) for q in geoms(prefix + r + list(b', "'))]

        keysfx = list(_LITS[KEYSFX][0])
        if node == DONE:
            return [[_EOS]]
        if node == OPEN:
            return [[*b"{}", _EOS]]
        if node == FIRST:
            if alt != 1:
                return [end]
            return from_desc([*_LITS[FIRST][1][pos:], *b"1", *keysfx], 0)
        if node == KEYNUM:
            return from_desc([*str(n).encode()[pos:], *keysfx], 0)
        if node == KEYSFX:
            return from_desc(keysfx[pos:], 0)
        if node == DESC:
            return from_desc([], d, c)
        if node == AFTER_DESC:
            return geoms(list(b', "'[pos:]))
        if node == GEOM:
            return geoms([]) if alt < 0 else [self._geom_from(alt, pos) + end]
        if node == SLOT:
            return [[_COORD, _QUOTE, *self._tail(c + 1, kind), *end]]
        if node == CLOSEQ:
            return [[_QUOTE, *self._tail(c, kind), *end]]
        if node == AFTERC:
            if alt < 0:
                return [self._tail(c, kind) + end]
            if alt == 0:
                return [[*b', "'[pos:], _COORD, _QUOTE, *self._tail(c + 1, kind), *end]]
            return [[*b"]}"[pos:], *end]]
        if node == AFTER_OBJ:
            if alt != 0:
                return [end]
            return from_desc([*_LITS[AFTER_OBJ][0][pos:], *str(n + 1).encode(), *keysfx], 0)
        raise AssertionError(node)

    def _need_of(self, s: State, per_geometry: bool = False) -> Any:
        if per_geometry:
            return [min(self._cost(q) for q in self._closings(s, k)) for k in range(len(GEOMETRY_KEYS))]
        node = s[0]
        # before the geometry is chosen the closing uses one fixed geometry (the cheapest), so that the cost
        # of every state on the closing path is one less than the state before it
        fixed = node in (FIRST, KEYNUM, KEYSFX, DESC) or (node == AFTER_OBJ and s[1] == 0)
        return min(self._cost(q) for q in self._closings(s, self.best_kind if fixed else None))

    def need(self, s: State) -> int:
        """Fewest tokens (the end-of-sequence token included) that close the answer from ``s``."""
        node, alt, pos, n, c, kind, d = s
        key = (node, alt, pos, n if node in (KEYNUM, AFTER_OBJ, FIRST) else None, c, kind, d)
        v = self._need.get(key)
        if v is None:
            v = self._need[key] = self._need_of(s)
        return v

    def _need_groups(self, s: State) -> list[tuple[int, np.ndarray]]:
        """The tokens ``s`` allows, grouped by the closing cost of the state each leads to."""
        g = self._groups.get(s)
        if g is not None:
            return g
        by_need: dict[int, list[np.ndarray]] = {}
        node = s[0]
        if node == DONE:
            by_need[0] = [np.asarray(self.eos_ids)]
        elif node == SLOT:
            by_need[self.need((CLOSEQ, 0, 0, s[3], s[4] + 1, s[5], 0))] = [self.coord_ids]
        else:
            ids = np.flatnonzero(self.allowed(s))
            if node == DESC and self.trie is None and s[6] < self.limits.max_desc_tokens:
                # the pure tokens the mask allows lead to one of two states: with or without a solid byte
                pure_ok = self.allowed(s)[: len(self.pure)] & self.pure
                for has, sel in ((1, self.pure_solid), (s[4], pure_ok & ~self.pure_solid)):
                    sel = np.flatnonzero(pure_ok & sel)
                    if len(sel):
                        by_need.setdefault(self.need((DESC, 0, 0, s[3], has, -1, s[6] + 1)), []).append(sel)
                ids = ids[~self.pure[ids]] if len(ids) else ids
            for i in ids.tolist():
                s2 = self.advance(s, i)
                if s2 is not None:
                    by_need.setdefault(self.need(s2), []).append(np.asarray([i]))
        g = sorted((k, np.concatenate(v)) for k, v in by_need.items())
        self._groups[s] = g
        return g

    def forced_bias(self, s: State, remaining: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Like :meth:`bias`, keeping only tokens after which the answer still closes in ``remaining`` tokens
        (counting the one chosen now); if none does, the tokens that close it fastest."""
        groups = self._need_groups(s)
        if 1 + groups[-1][0] <= remaining:
            return self.bias(s, device, dtype)  # every allowed token still fits: the cached mask
        keep = [ids for k, ids in groups if 1 + k <= remaining] or [groups[0][1]]
        t = torch.full((self.vocab_size,), float("-inf"), dtype=dtype)
        t[torch.from_numpy(np.concatenate(keep))] = 0.0
        return t.to(device)

    # ------------------------------------------------------------------------------------------

    def processor(self, max_new_tokens: int) -> GrammarProcessor:
        """A fresh logits processor for one ``generate`` call of at most ``max_new_tokens`` new tokens."""
        return GrammarProcessor(self, max_new_tokens)


class GrammarProcessor(LogitsProcessor):
    """Masks every token the answer grammar forbids to ``-inf``, row by row, for one ``generate`` call.

    The rows' automaton states live here, not in :class:`Grammar`: the first call (or any call whose input is
    not longer than the previous one, i.e. a new ``generate``) starts every row afresh, and each later call
    first feeds each row the token chosen at the previous step.
    """

    def __init__(self, grammar: Grammar, max_new_tokens: int) -> None:
        self.grammar = grammar
        self.max_new_tokens = int(max_new_tokens)
        self.prompt_len: int | None = None
        self.last_len = -1
        self.states: list[State | None] = []

    def _start(self, batch: int, length: int) -> None:
        self.prompt_len = length
        self.states = [START] * batch

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        g = self.grammar
        batch, length = input_ids.shape
        if scores.shape[-1] != g.vocab_size:
            raise ValueError(
                f"scores have {scores.shape[-1]} columns but the grammar was built for a vocabulary of {g.vocab_size}"
            )
        if self.prompt_len is None or length <= self.last_len or len(self.states) != batch:
            self._start(batch, length)
        else:
            for b, tok in enumerate(input_ids[:, -1].tolist()):
                st = self.states[b]
                if st is not None:
                    # None: the row left the grammar (another processor forced a token); it may only end now
                    self.states[b] = None if st[0] == DONE and tok in g.eos_set else g.advance(st, tok)
        self.last_len = length
        assert self.prompt_len is not None
        remaining = self.max_new_tokens - (length - self.prompt_len)
        done = (DONE, 0, 0, 0, 0, -1, 0)
        biases = []
        for st in self.states:
            st = st or done
            if remaining < g.need(st) + g.margin:
                biases.append(g.forced_bias(st, remaining, scores.device, scores.dtype))
            else:
                biases.append(g.bias(st, scores.device, scores.dtype))
        return scores + torch.stack(biases)


def train_descriptions(train_jsonl: Path) -> list[str]:
    """The distinct descriptions of a contract JSONL split, sorted."""
    from coordexp.core.contract import iter_jsonl

    return sorted({o.desc for r in iter_jsonl(train_jsonl) for o in r.objects})


def limits_of(cfg: Any) -> GrammarLimits:
    """The grammar bounds of an ``evaluate`` config section (or a mapping with the same keys)."""
    get = cfg.get if isinstance(cfg, dict) else lambda k, default: getattr(cfg, k, default)
    return GrammarLimits(
        max_objects=int(get("max_objects", 100)),
        max_poly_points=int(get("max_poly_points", 64)),
        max_line_points=int(get("max_line_points", 64)),
    )


def model_vocab_size(model: Any) -> int:
    """Rows of the model's output layer: the width of the scores a logits processor sees."""
    return int(model.get_output_embeddings().weight.shape[0])


def for_detector(det: Any, cfg: Any, train_jsonl: Path | None) -> Grammar | None:
    """The grammar for a loaded detector under an ``evaluate`` config; None for ``decoding: free``.

    ``descriptions: train_set`` reads the closed set of descriptions from ``train_jsonl`` (the train split).
    """
    if cfg.decoding == "free":
        return None
    descriptions = None
    if cfg.descriptions == "train_set":
        if train_jsonl is None:
            raise ValueError("evaluate.descriptions: train_set needs the train split's JSONL file")
        descriptions = train_descriptions(train_jsonl)
    return Grammar(
        det.tokenizer,
        det.eos_ids,
        model_vocab_size(det.model),
        descriptions=descriptions,
        limits=limits_of(cfg),
    )
