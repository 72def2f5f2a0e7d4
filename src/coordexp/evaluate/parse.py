"""Parse a model answer into objects, salvaging what can be salvaged, never raising.

The model answers with ONE JSON object (:func:`coordexp.core.contract.render_answer`)::

    {"object_1": {"desc": "red circle", "bbox_2d": ["<|coord_12|>", ...]}, ...}

Why a hand-written JSON reader instead of ``json.loads``: a generation cut at
``max_new_tokens`` is invalid JSON, yet every object that was closed before the cut is a
perfectly good detection, and dropping the whole answer would punish a long (good) answer
more than a short one. The reader below walks the top-level object member by member and
keeps every member whose value was closed; it also records the character span of every
coordinate, so a caller can map coordinates back to generated tokens (see
:mod:`coordexp.evaluate.scoring`).

Rules (each violation is a :class:`Problem` with a ``kind``):

* Leading/trailing whitespace is ignored. Any other text before the first ``{`` or after the
  closing ``}`` (e.g. a Markdown fence) is tolerated but recorded as ``extra_text``. No ``{``
  at all is ``no_json``.
* The answer ends before the top-level ``}``: ``truncated``; a syntax error: ``invalid_json``.
  In both cases the objects completed before that point are kept.
* Each member value must be an object (``not_an_object``) with a string ``desc``
  (``missing_desc`` when absent or blank, ``bad_desc`` when not a string) and exactly one of
  ``bbox_2d`` / ``poly`` / ``line`` (``no_geometry``, ``multiple_geometries``), whose value is
  a list (``bad_geometry``) of coords: ``bbox_2d`` exactly 4, ``poly`` an even count >= 6,
  ``line`` an even count >= 4 (``bad_coord_count``). A coord is a ``"<|coord_k|>"`` string,
  ``0 <= k < 1000``; anything else is ``bad_coord_token``. Any of these rejects the object.
* Accepted with a problem (the object is kept, the answer is not clean): a plain JSON integer
  ``0..999`` as a coord (``plain_int_coord``: the model left the coord vocabulary, so the
  answer is off-format, but the location is still usable; such coords have no coord token
  and hence no token probability), extra fields in an object (``unknown_field``), a top-level
  key not of the form ``object_N`` (``bad_key``) or repeated (``duplicate_key``, both copies
  are kept, unlike ``json.loads``). A repeated ``desc`` inside one object rejects it
  (``duplicate_field``).

An answer *parses* (``ParseResult.ok``, the numerator of the strict parse rate) when it is one
complete JSON object, nothing but whitespace around it, and no problem at all was recorded.
``{}`` (no objects) is a valid answer. An answer is *salvaged* when it is not ok but still
yielded at least one object.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from coordexp.core.codec import K, is_coord_token, parse_coord_token
from coordexp.core.geometry import GEOMETRY_KEYS

"""The geometry fields of the data contract, in the order they are checked."""

_KEY_RE = re.compile(r"^object_[1-9]\d*$")
_ANY_COORD_RE = re.compile(r"<\|coord_(\d+)\|>")
_MAX_DEPTH = 64


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an answer. ``object_index`` is the member position, if any."""

    kind: str
    detail: str
    object_index: int | None = None


@dataclass(frozen=True)
class ParsedObject:
    """One accepted object of the answer.

    ``index`` is the object's position among the top-level members (0-based, counting
    rejected members too), ``key`` its JSON key. ``bins`` are the coord bins in answer order
    (x, y, x, y, ...). ``coord_spans[i]`` is the ``(start, end)`` character span of coord ``i``
    in the parsed text (the token text inside the quotes, or the digits of a plain integer).
    ``coord_token_indices[i]`` is the ordinal of that coord among all coord-token occurrences
    in the text (``ParseResult.coord_occurrences``), or ``None`` when the coord is not a
    literal token there (a plain integer, or a string spelled with JSON escapes). ``desc_span`` is the
    ``(start, end)`` character span of the description's content, so a caller can find the generated tokens
    that wrote it (the ``desc_coord_geomean`` score of :mod:`coordexp.evaluate.scoring`).
    """

    index: int
    key: str
    desc: str
    kind: str
    bins: tuple[int, ...]
    coord_spans: tuple[tuple[int, int], ...]
    coord_token_indices: tuple[int | None, ...]
    desc_span: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, object]:
        """The object in contract form, coords as bin integers: ``{"desc", kind: [bins]}``."""
        return {"desc": self.desc, self.kind: list(self.bins)}


@dataclass
class ParseResult:
    """Everything :func:`parse_prediction` learnt about one answer."""

    objects: list[ParsedObject] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    complete: bool = False
    """The top-level JSON object was closed (not truncated, no syntax error)."""
    n_members: int = 0
    """Top-level members seen (accepted + rejected)."""
    coord_occurrences: tuple[int, ...] = ()
    """Bins of every literal ``<|coord_k|>`` occurrence in the text, in order."""

    @property
    def ok(self) -> bool:
        """Clean parse: complete JSON object, every object valid, no problem recorded."""
        return self.complete and not self.problems

    @property
    def salvaged(self) -> bool:
        """Not clean, yet at least one object was recovered."""
        return not self.ok and bool(self.objects)

    @property
    def n_rejected(self) -> int:
        return self.n_members - len(self.objects)

    def problem_counts(self) -> dict[str, int]:
        """Number of problems by kind."""
        return dict(Counter(p.kind for p in self.problems))


# ----------------------------------------------------------------------------------------
# A small JSON reader that remembers where every string and number came from.


class _Truncated(Exception):
    pass


class _Syntax(Exception):
    def __init__(self, pos: int, msg: str) -> None:
        super().__init__(f"{msg} at char {pos}")
        self.pos = pos


@dataclass
class _Str:
    value: str
    start: int  # index of the first content char (after the quote)
    end: int  # index of the closing quote
    raw: bool  # the content has no escapes: text[start:end] == value


@dataclass
class _Num:
    value: int | float
    start: int
    end: int


@dataclass
class _Obj:
    members: list[tuple[_Str, object]]


_WS = " \t\n\r"
_ESC = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_NUM_RE = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")


class _Reader:
    def __init__(self, text: str) -> None:
        self.s = text
        self.n = len(text)

    def ws(self, i: int) -> int:
        while i < self.n and self.s[i] in _WS:
            i += 1
        return i

    def peek(self, i: int) -> str:
        if i >= self.n:
            raise _Truncated
        return self.s[i]

    def value(self, i: int, depth: int) -> tuple[object, int]:
        if depth > _MAX_DEPTH:
            raise _Syntax(i, "nesting too deep")
        i = self.ws(i)
        c = self.peek(i)
        if c == "{":
            return self.obj(i, depth)
        if c == "[":
            return self.arr(i, depth)
        if c == '"':
            return self.string(i)
        if c == "-" or c.isdigit():
            return self.number(i)
        for lit, val in (("true", True), ("false", False), ("null", None)):
            if c == lit[0]:
                part = self.s[i : i + len(lit)]
                if part == lit:
                    return val, i + len(lit)
                if lit.startswith(part) and i + len(part) == self.n:
                    raise _Truncated
                raise _Syntax(i, "bad literal")
        raise _Syntax(i, f"unexpected {c!r}")

    def number(self, i: int) -> tuple[_Num, int]:
        m = _NUM_RE.match(self.s, i)
        if m is None or m.end() == i:
            if self.s[i:] in ("-",):
                raise _Truncated
            raise _Syntax(i, "bad number")
        j = m.end()
        if j == self.n:
            # A number at the very end may have been cut: "12" could have been "123".
            raise _Truncated
        if j < self.n and self.s[j] in ".eE":
            raise _Syntax(j, "bad number")
        txt = m.group(0)
        val: int | float = int(txt) if re.fullmatch(r"-?\d+", txt) else float(txt)
        return _Num(val, i, j), j

    def string(self, i: int) -> tuple[_Str, int]:
        start = i + 1
        j = start
        out: list[str] = []
        raw = True
        while True:
            if j >= self.n:
                raise _Truncated
            c = self.s[j]
            if c == '"':
                return _Str("".join(out), start, j, raw), j + 1
            if c == "\\":
                raw = False
                if j + 1 >= self.n:
                    raise _Truncated
                e = self.s[j + 1]
                if e in _ESC:
                    out.append(_ESC[e])
                    j += 2
                elif e == "u":
                    hx = self.s[j + 2 : j + 6]
                    if len(hx) < 4 and j + 2 + len(hx) == self.n and all(h in "0123456789abcdefABCDEF" for h in hx):
                        raise _Truncated
                    if len(hx) < 4 or not all(h in "0123456789abcdefABCDEF" for h in hx):
                        raise _Syntax(j, "bad \\u escape")
                    out.append(chr(int(hx, 16)))
                    j += 6
                else:
                    raise _Syntax(j, "bad escape")
            elif ord(c) < 0x20:
                raise _Syntax(j, "control character in string")
            else:
                out.append(c)
                j += 1

    def arr(self, i: int, depth: int) -> tuple[list[object], int]:
        items: list[object] = []
        i = self.ws(i + 1)
        if self.peek(i) == "]":
            return items, i + 1
        while True:
            v, i = self.value(i, depth + 1)
            items.append(v)
            i = self.ws(i)
            c = self.peek(i)
            if c == ",":
                i += 1
            elif c == "]":
                return items, i + 1
            else:
                raise _Syntax(i, "expected ',' or ']'")

    def obj(self, i: int, depth: int) -> tuple[_Obj, int]:
        members: list[tuple[_Str, object]] = []
        i = self.ws(i + 1)
        if self.peek(i) == "}":
            return _Obj(members), i + 1
        while True:
            key, i = self.key(i)
            v, i = self.value(i, depth + 1)
            members.append((key, v))
            i = self.ws(i)
            c = self.peek(i)
            if c == ",":
                i = self.ws(i + 1)
            elif c == "}":
                return _Obj(members), i + 1
            else:
                raise _Syntax(i, "expected ',' or '}'")

    def key(self, i: int) -> tuple[_Str, int]:
        i = self.ws(i)
        if self.peek(i) != '"':
            raise _Syntax(i, "expected a string key")
        k, i = self.string(i)
        i = self.ws(i)
        if self.peek(i) != ":":
            raise _Syntax(i, "expected ':'")
        return k, i + 1


# ----------------------------------------------------------------------------------------


def _type_name(v: object) -> str:
    if isinstance(v, _Str):
        return "string"
    if isinstance(v, _Num):
        return "number"
    if isinstance(v, _Obj):
        return "object"
    if isinstance(v, list):
        return "array"
    return "null" if v is None else "boolean"


def _coord_occurrences(text: str) -> tuple[dict[int, int], tuple[int, ...]]:
    """Start offset -> ordinal, and bins, of every literal coord token in ``text``."""
    starts: dict[int, int] = {}
    bins: list[int] = []
    for m in _ANY_COORD_RE.finditer(text):
        if is_coord_token(m.group(0)):
            starts[m.start()] = len(bins)
            bins.append(int(m.group(1)))
    return starts, tuple(bins)


def _member_object(
    index: int, key: _Str, val: object, occ: dict[int, int], problems: list[Problem]
) -> ParsedObject | None:
    """Validate one top-level member; append problems; return the object if accepted."""

    def bad(kind: str, detail: str) -> None:
        problems.append(Problem(kind, f"{key.value!r}: {detail}", index))

    if not isinstance(val, _Obj):
        bad("not_an_object", f"value is a {_type_name(val)}")
        return None
    names = [k.value for k, _ in val.members]
    fields = {k.value: v for k, v in reversed(val.members)}  # first occurrence wins
    geoms = [n for n in names if n in GEOMETRY_KEYS]
    rejected = False
    if names.count("desc") > 1:
        bad("duplicate_field", "'desc' given more than once")
        rejected = True
    desc_v = fields.get("desc")
    if desc_v is None and "desc" not in fields:
        bad("missing_desc", "no 'desc'")
        rejected = True
    elif not isinstance(desc_v, _Str):
        bad("bad_desc", f"'desc' is a {_type_name(desc_v)}")
        rejected = True
    elif not desc_v.value.strip():
        bad("missing_desc", "'desc' is blank")
        rejected = True
    if not geoms:
        bad("no_geometry", "none of bbox_2d/poly/line")
        return None
    if len(geoms) > 1:
        bad("multiple_geometries", f"has {geoms}")
        return None
    kind = geoms[0]
    geom = fields[kind]
    if not isinstance(geom, list):
        bad("bad_geometry", f"{kind} is a {_type_name(geom)}, not a list")
        return None
    n = len(geom)
    count_ok = n == 4 if kind == "bbox_2d" else (n % 2 == 0 and n >= (6 if kind == "poly" else 4))
    if not count_ok:
        bad("bad_coord_count", f"{kind} has {n} coords")
        rejected = True
    bins: list[int] = []
    spans: list[tuple[int, int]] = []
    tok_idx: list[int | None] = []
    n_plain = 0
    for j, c in enumerate(geom):
        if isinstance(c, _Str) and is_coord_token(c.value):
            bins.append(parse_coord_token(c.value))
            spans.append((c.start, c.end))
            tok_idx.append(occ.get(c.start) if c.raw else None)
        elif isinstance(c, _Num) and isinstance(c.value, int) and 0 <= c.value < K:
            bins.append(c.value)
            spans.append((c.start, c.end))
            tok_idx.append(None)
            n_plain += 1
        else:
            shown = c.value if isinstance(c, (_Str, _Num)) else _type_name(c)
            bad("bad_coord_token", f"{kind}[{j}] = {shown!r}")
            rejected = True
            break
    if rejected:
        return None
    if n_plain:
        bad("plain_int_coord", f"{n_plain} of {n} coords are plain integers")
    extra = [nm for nm in names if nm != "desc" and nm not in GEOMETRY_KEYS]
    if extra:
        bad("unknown_field", f"extra fields {extra}")
    assert isinstance(desc_v, _Str)
    return ParsedObject(
        index, key.value, desc_v.value, kind, tuple(bins), tuple(spans), tuple(tok_idx), (desc_v.start, desc_v.end)
    )


def parse_prediction(text: str) -> ParseResult:
    """Parse one model answer; see the module docstring for the rules. Never raises."""
    try:
        return _parse(text)
    except Exception as exc:  # a bug here must not kill an evaluation run  # noqa: BLE001
        return ParseResult(problems=[Problem("internal_error", repr(exc))])


def _parse(text: str) -> ParseResult:
    if not isinstance(text, str):
        return ParseResult(problems=[Problem("no_json", f"answer is a {type(text).__name__}")])
    res = ParseResult()
    occ, res.coord_occurrences = _coord_occurrences(text)
    r = _Reader(text)
    start = text.find("{")
    if start < 0:
        res.problems.append(Problem("no_json", "no '{' in the answer" if text.strip() else "empty answer"))
        return res
    if text[:start].strip():
        res.problems.append(Problem("extra_text", f"{start} chars before the JSON object"))
    seen: set[str] = set()
    i = r.ws(start + 1)
    try:
        if r.peek(i) == "}":
            end = i + 1
        else:
            while True:
                key, i = r.key(i)
                val, i = r.value(i, 1)
                idx = res.n_members
                res.n_members += 1
                obj = _member_object(idx, key, val, occ, res.problems)
                if obj is not None:
                    res.objects.append(obj)
                if not _KEY_RE.match(key.value):
                    res.problems.append(Problem("bad_key", f"key {key.value!r}", idx))
                if key.value in seen:
                    res.problems.append(Problem("duplicate_key", f"key {key.value!r} repeated", idx))
                seen.add(key.value)
                i = r.ws(i)
                c = r.peek(i)
                if c == ",":
                    i = r.ws(i + 1)
                elif c == "}":
                    end = i + 1
                    break
                else:
                    raise _Syntax(i, "expected ',' or '}'")
    except _Truncated:
        res.problems.append(Problem("truncated", f"answer ends inside the JSON object after {res.n_members} members"))
        return res
    except _Syntax as exc:
        res.problems.append(Problem("invalid_json", str(exc)))
        return res
    res.complete = True
    if text[end:].strip():
        res.problems.append(Problem("extra_text", f"{len(text) - end} chars after the JSON object"))
    return res
