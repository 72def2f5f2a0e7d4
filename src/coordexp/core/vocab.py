"""Coord vocabulary: which token ids are ``<|coord_0|>`` .. ``<|coord_999|>``, and in what order.

Every loss and metric that treats coord positions differently needs ``coord_id_map``: a
``LongTensor[V]`` (``V`` = rows of the model's output embedding, which may exceed
``len(tokenizer)`` because Qwen checkpoints pad the vocabulary) holding the bin index at
each coord token id and ``-1`` elsewhere.

The map can be derived from two sources that must never disagree:

* ``coord_vocab.json`` written beside the checkpoint by the ``build_base`` stage
  (``{"K", "coord_token_ids", "vocab_size", "tokenizer_len"}``) - cheap to read in a loss
  plugin or an evaluation process, and a recorded DVC output;
* the tokenizer itself - the ground truth at encode time.

:func:`coord_id_map` builds both and refuses to continue if they differ, so a checkpoint
whose tokenizer was edited after ``coord_vocab.json`` was written cannot silently train
with shifted bins.

Validity rules (:func:`find_coord_token_ids`): either no coord token at all (a plain base
checkpoint, to be expanded) or all ``K`` of them with strictly increasing ids in bin
order. A partial set or a shuffled order means a broken checkpoint, and is an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer

from coordexp.core.checkpoint import vocab_size
from coordexp.core.codec import COORD_TOKENS, K
from coordexp.core.errors import MissingInputError, UserError

COORD_VOCAB_FILENAME = "coord_vocab.json"


class CoordVocabError(UserError, ValueError):
    """A tokenizer/checkpoint whose coord tokens are partial, misordered or inconsistent."""


def _token_to_id_table(tokenizer: Any) -> dict[str, int]:
    """Token string -> id for the base vocabulary *and* added tokens.

    ``get_vocab()`` includes added tokens for both the slow and fast tokenizer classes, so
    it is the one call that answers "is this string a single token" without encoding.
    """
    return dict(tokenizer.get_vocab())


def find_coord_token_ids(tokenizer: Any) -> list[int] | None:
    """Ids of ``<|coord_0|>`` .. ``<|coord_999|>`` in bin order, or ``None`` if none exist.

    Raises :class:`CoordVocabError` for a partial set (some but not all ``K`` tokens) or a
    set whose ids are not strictly increasing with the bin index (a sign that tokens were
    added in the wrong order, e.g. sorted as strings: ``coord_10`` before ``coord_2``).
    """
    table = _token_to_id_table(tokenizer)
    ids = [table.get(tok) for tok in COORD_TOKENS]
    present = [i for i in ids if i is not None]
    if not present:
        return None
    if len(present) != K:
        missing = [tok for tok, i in zip(COORD_TOKENS, ids) if i is None]
        raise CoordVocabError(
            f"tokenizer has {len(present)} of the {K} coord tokens; missing e.g. {missing[:5]}. "
            "A checkpoint must have all of <|coord_0|>..<|coord_999|> or none "
            "(then run build_base in mode 'expand' to add them)."
        )
    out = [int(i) for i in ids]
    bad = [k for k in range(1, K) if out[k] <= out[k - 1]]
    if bad:
        k = bad[0]
        raise CoordVocabError(
            f"coord token ids are not in bin order: id({COORD_TOKENS[k - 1]})={out[k - 1]} >= "
            f"id({COORD_TOKENS[k]})={out[k]} ({len(bad)} inversions). Add the tokens in bin order "
            "0..999 (coordexp.core.codec.COORD_TOKENS)."
        )
    return out


def check_coord_tokens_atomic(tokenizer: Any, ids: list[int] | None = None) -> None:
    """Each coord token must encode to exactly its own single id and survive special-skipping decode.

    Tokens added as *special* vanish under ``skip_special_tokens=True``, which
    is what most serving paths use; a detector whose coordinates disappear on decode is
    useless. Raises :class:`CoordVocabError` with the first offending token.
    """
    ids = ids if ids is not None else find_coord_token_ids(tokenizer)
    if ids is None:
        raise CoordVocabError("tokenizer has no coord tokens")
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {i for i, t in added.items() if getattr(t, "special", False)}
    clash = [COORD_TOKENS[k] for k, i in enumerate(ids) if i in special]
    if clash:
        raise CoordVocabError(
            f"coord tokens registered as special tokens (e.g. {clash[:3]}); they would be dropped by "
            "skip_special_tokens=True decoding. Add them as non-special added tokens."
        )
    probe_bins = [0, 1, 9, 10, 99, 100, 500, 998, K - 1]
    text = "".join(COORD_TOKENS[k] for k in probe_bins)
    got = tokenizer.encode(text, add_special_tokens=False)
    want = [ids[k] for k in probe_bins]
    if list(got) != want:
        raise CoordVocabError(f"coord tokens are not atomic: {text!r} encodes to {list(got)}, expected {want}")
    back = tokenizer.decode(want, skip_special_tokens=True)
    if back != text:
        raise CoordVocabError(f"coord tokens do not survive decoding: {want} -> {back!r}, expected {text!r}")


def _build_map(ids: list[int], vocab_size: int) -> torch.Tensor:
    if len(ids) != K:
        raise CoordVocabError(f"expected {K} coord token ids, got {len(ids)}")
    if max(ids) >= vocab_size:
        raise CoordVocabError(
            f"coord token id {max(ids)} is outside the model vocabulary of {vocab_size} rows; "
            "the embeddings were not resized after adding the coord tokens"
        )
    m = torch.full((int(vocab_size),), -1, dtype=torch.long)
    m[torch.tensor(ids, dtype=torch.long)] = torch.arange(K, dtype=torch.long)
    return m


def write_coord_vocab(tokenizer: Any, model_vocab_size: int, path: str | Path) -> dict[str, Any]:
    """Write ``coord_vocab.json`` (a file path, or a directory to write it into); returns the dict.

    ``model_vocab_size`` is the number of embedding rows (``config.text_config.vocab_size``),
    the length of ``coord_id_map``; ``tokenizer_len`` is recorded to detect later edits.
    """
    ids = find_coord_token_ids(tokenizer)
    if ids is None:
        raise CoordVocabError("tokenizer has no coord tokens; nothing to write")
    _build_map(ids, model_vocab_size)  # validates ids < vocab size
    data = {
        "K": K,
        "coord_token_ids": ids,
        "vocab_size": int(model_vocab_size),
        "tokenizer_len": int(len(tokenizer)),
    }
    p = Path(path)
    if p.is_dir():
        p = p / COORD_VOCAB_FILENAME
    p.write_text(json.dumps(data) + "\n", encoding="utf-8")
    return data


def load_coord_vocab(dir_or_path: str | Path) -> dict[str, Any]:
    """Read and validate ``coord_vocab.json`` (given the file or the checkpoint directory)."""
    p = Path(dir_or_path)
    if p.is_dir():
        p = p / COORD_VOCAB_FILENAME
    if not p.is_file():
        raise MissingInputError(
            f"{p} not found: coord_vocab.json is written beside the checkpoint by the build_base stage "
            "(`dvc repro build_base` or `python stages/build_base.py`)"
        )
    data = json.loads(p.read_text(encoding="utf-8"))
    for key in ("K", "coord_token_ids", "vocab_size", "tokenizer_len"):
        if key not in data:
            raise CoordVocabError(f"{p}: missing key {key!r}")
    if data["K"] != K:
        raise CoordVocabError(f"{p}: K={data['K']} but this code base uses K={K}")
    ids = [int(i) for i in data["coord_token_ids"]]
    if len(ids) != K or any(b <= a for a, b in zip(ids, ids[1:])):
        raise CoordVocabError(f"{p}: coord_token_ids must be {K} strictly increasing ids")
    return data


def coord_id_map_from_vocab(vocab_json: Mapping[str, Any] | str | Path) -> torch.Tensor:
    """``LongTensor[V]``: bin at coord ids, -1 elsewhere, from a coord_vocab dict or file."""
    data = vocab_json if isinstance(vocab_json, Mapping) else load_coord_vocab(vocab_json)
    return _build_map([int(i) for i in data["coord_token_ids"]], int(data["vocab_size"]))


def coord_id_map_from_tokenizer(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """``LongTensor[vocab_size]`` from the tokenizer; error if it has no (or a broken) coord set."""
    ids = find_coord_token_ids(tokenizer)
    if ids is None:
        raise CoordVocabError("tokenizer has no coord tokens <|coord_0|>..<|coord_999|>")
    return _build_map(ids, vocab_size)


def coord_id_map(checkpoint_dir: str | Path, tokenizer: Any | None = None) -> torch.Tensor:
    """The coord id map of a checkpoint, cross-checked between coord_vocab.json, tokenizer and config.

    ``tokenizer`` may be passed to avoid reloading it (e.g. the one ms-swift loaded).
    """
    checkpoint_dir = Path(checkpoint_dir)
    data = load_coord_vocab(checkpoint_dir)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_dir), local_files_only=True)
    v_cfg = vocab_size(checkpoint_dir)
    if int(data["vocab_size"]) != v_cfg:
        raise CoordVocabError(
            f"{checkpoint_dir}: coord_vocab.json says vocab_size={data['vocab_size']} but config.json "
            f"has {v_cfg}; rebuild coord_vocab.json (build_base stage)"
        )
    from_vocab = coord_id_map_from_vocab(data)
    from_tok = coord_id_map_from_tokenizer(tokenizer, v_cfg)
    if not torch.equal(from_vocab, from_tok):
        diff = (from_vocab != from_tok).nonzero().flatten()[:5].tolist()
        raise CoordVocabError(
            f"{checkpoint_dir}: coord_vocab.json and the tokenizer disagree on coord token ids "
            f"(first differing ids {diff}); the tokenizer was changed after build_base - rebuild it"
        )
    if int(data["tokenizer_len"]) != len(tokenizer):
        raise CoordVocabError(
            f"{checkpoint_dir}: coord_vocab.json records tokenizer_len={data['tokenizer_len']} but the "
            f"tokenizer has {len(tokenizer)} tokens; rebuild with the build_base stage"
        )
    return from_vocab
