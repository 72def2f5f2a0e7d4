"""The coord tokens of a base checkpoint: adding them to a tokenizer, and the first values of their rows.

Both model builders need the same two things: ``<|coord_0|>``..``<|coord_999|>`` as atomic
non-special tokens in bin order (so ``skip_special_tokens=True`` decoding keeps them), and a start
for their embedding rows. Two starts are offered:

* ``mean``: every coord row is the mean of the existing token rows - a neutral start that keeps the
  new tokens' logits at the average level and does not disturb the text model;
* ``ordinal``: the mean plus a smooth sinusoidal code of the bin index, scaled elementwise by
  ``ordinal_scale`` x the per-dimension std of the existing rows, so that neighbouring bins start
  close and far bins apart - a prior the softCE and W1 losses reward.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from tokenizers import AddedToken

from coordexp.core.codec import COORD_TOKENS


def add_coord_tokens(tokenizer: Any) -> int:
    """Add ``<|coord_0|>``..``<|coord_999|>`` as atomic non-special tokens, in bin order; returns the count added.

    ``normalized=False`` keeps them verbatim (no NFC / prefix-space games) and atomic: an
    added token is matched before the pre-tokenizer runs.
    """
    return int(
        tokenizer.add_tokens(
            [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False) for t in COORD_TOKENS],
            special_tokens=False,
        )
    )


def ordinal_code(num_bins: int, dim: int) -> torch.Tensor:
    """``[num_bins, dim]`` smooth sinusoidal code of the bin index with unit RMS per row.

    Feature pairs are ``(sin, cos)(pi * f * k / (num_bins - 1))`` with ``f`` geometric in
    ``[0.5, num_bins / 16]``: the fastest pair turns by about 0.2 rad between neighbouring
    bins and the slowest by a quarter turn over the whole range, so adjacent bins are close
    and the distance grows with the bin gap.
    """
    t = torch.arange(num_bins, dtype=torch.float64) / max(num_bins - 1, 1)
    n_freq = dim // 2
    code = torch.zeros(num_bins, dim, dtype=torch.float64)
    if n_freq == 0:
        return code.float()
    freqs = torch.logspace(math.log10(0.5), math.log10(max(num_bins / 16, 0.5)), n_freq, dtype=torch.float64)
    angle = math.pi * t[:, None] * freqs[None, :]
    code[:, 0 : 2 * n_freq : 2] = torch.sin(angle)
    code[:, 1 : 2 * n_freq : 2] = torch.cos(angle)
    return (code * math.sqrt(dim / n_freq)).float()  # each row: n_freq (sin, cos) pairs -> unit RMS


def init_coord_rows(
    weight: torch.Tensor,
    coord_ids: list[int],
    n_real: int,
    init: Literal["mean", "ordinal"],
    ordinal_scale: float,
) -> None:
    """Write the coord rows of an embedding matrix in place (statistics from rows ``[0, n_real)``)."""
    with torch.no_grad():
        real = weight[:n_real].detach().to(torch.float32)
        mean = real.mean(dim=0)
        rows = mean.expand(len(coord_ids), -1).clone()
        if init == "ordinal":
            std = real.std(dim=0)
            rows = rows + float(ordinal_scale) * std[None, :] * ordinal_code(len(coord_ids), weight.shape[1])
        elif init != "mean":
            raise ValueError(f"init must be 'mean' or 'ordinal', got {init!r}")
        weight[torch.tensor(coord_ids, dtype=torch.long, device=weight.device)] = rows.to(weight.dtype).to(
            weight.device
        )


def padded_vocab_size(n_tokens: int, multiple: int = 64) -> int:
    """Embedding rows for ``n_tokens`` tokens, rounded up like Qwen's padded vocabulary."""
    return ((n_tokens + multiple - 1) // multiple) * multiple
