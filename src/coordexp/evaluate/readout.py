"""Coordinates read from the coord distribution: one generation, several ways to turn a slot into a number.

At every coord slot the model gives a distribution over the K = 1000 ordered bins (the softmax of the coord
logits in bin order). Greedy decoding emits its arg-max token; Stage-1 training (soft CE towards a Gaussian
target and W1 between CDFs) makes that distribution unimodal and ordinal, so a summary of the whole
distribution can land between bins and nearer the truth than the single most likely bin. A *readout* picks
that summary; the emitted token never changes, so every readout is scored from the same generation:

* ``argmax``: the emitted token's bin (what decoding wrote; an integer);
* ``expectation``: ``sum_k k p_k``; the W1-optimal point under an ordinal distribution, pulled by far
  tails when the distribution is bimodal;
* ``median``: the first bin whose CDF reaches 0.5; robust to one far tail (it is the L1-optimal point);
* ``local_expectation``: the expectation within ``+-w`` bins of the arg-max, renormalised there; sub-bin
  precision without the far tails.

This module holds plain reference functions over one probability vector (what tests compare against) and
the vectorised version, :func:`coord_stats`, that the generation-time capture
(:class:`coordexp.evaluate.generate.CoordCapture`) runs on a batch's log-probabilities at every step. The
capture keeps, per row and step, only the numbers in :data:`STAT_COLUMNS`, never the distribution itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

Readout = Literal["argmax", "expectation", "median", "local_expectation"]
READOUTS: tuple[str, ...] = ("argmax", "expectation", "median", "local_expectation")
"""The readouts, in the order reports list them."""

STAT_COLUMNS: tuple[str, ...] = (
    "mass",
    "argmax",
    "expectation",
    "median",
    "local_expectation",
    "peak",
    "std",
)
"""Per-step numbers the capture keeps: the coord-vocab mass (sum of the full-vocab softmax over the K coord
ids), then, of the coord slice renormalised in bin order, its arg-max bin, expectation, median, local
expectation, peak probability and standard deviation in bins."""
COL: dict[str, int] = {name: i for i, name in enumerate(STAT_COLUMNS)}

_HALF = 0.5 - 1e-9
"""The median's threshold: 0.5 less a rounding allowance, so that an exact 50/50 split (whose CDF is 0.5 up to
float error) picks its lower bin whether the CDF came out a hair below or above 0.5."""


# --------------------------------------------------------------------------------------------
# reference functions over one probability vector (bin order, sums to 1)


def _as_p(p: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(p, dtype=np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError("a readout needs a non-empty 1-D probability vector")
    return a / a.sum()


def argmax_bin(p: Sequence[float] | np.ndarray) -> int:
    """The most likely bin (the first one on ties, like ``torch.argmax``)."""
    return int(np.argmax(_as_p(p)))


def expectation(p: Sequence[float] | np.ndarray) -> float:
    """``sum_k k p_k``."""
    a = _as_p(p)
    return float(np.dot(np.arange(a.size, dtype=np.float64), a))


def median_bin(p: Sequence[float] | np.ndarray) -> float:
    """The first bin whose CDF reaches 0.5."""
    cdf = np.cumsum(_as_p(p))
    return float(min(int(np.searchsorted(cdf, _HALF, side="left")), cdf.size - 1))


def local_expectation(p: Sequence[float] | np.ndarray, window: int) -> float:
    """The expectation of ``p`` restricted to ``[argmax - window, argmax + window]`` and renormalised there."""
    a = _as_p(p)
    m = int(np.argmax(a))
    lo, hi = max(m - window, 0), min(m + window, a.size - 1)
    seg = a[lo : hi + 1]
    return float(np.dot(np.arange(lo, hi + 1, dtype=np.float64), seg) / seg.sum())


def peak(p: Sequence[float] | np.ndarray) -> float:
    """The largest bin probability."""
    return float(np.max(_as_p(p)))


def std_bins(p: Sequence[float] | np.ndarray) -> float:
    """The standard deviation of the bin index, in bins."""
    a = _as_p(p)
    k = np.arange(a.size, dtype=np.float64)
    mu = float(np.dot(k, a))
    return float(np.sqrt(max(float(np.dot((k - mu) ** 2, a)), 0.0)))


def read(p: Sequence[float] | np.ndarray, readout: str, window: int = 8) -> float:
    """One readout of ``p`` by name (the reference that :func:`coord_stats` must agree with)."""
    if readout == "argmax":
        return float(argmax_bin(p))
    if readout == "expectation":
        return expectation(p)
    if readout == "median":
        return median_bin(p)
    if readout == "local_expectation":
        return local_expectation(p, window)
    raise ValueError(f"unknown readout {readout!r}; expected one of {', '.join(READOUTS)}")


# --------------------------------------------------------------------------------------------
# vectorised: what the capture runs at every generation step


def coord_stats(coord_logp: np.ndarray, window: int) -> np.ndarray:
    """``[B, len(STAT_COLUMNS)]`` float64 statistics of each row's coord distribution.

    ``coord_logp`` ``[B, K]`` holds the full-vocab log-probabilities of the K coord tokens in bin order (so
    their log-sum-exp is the log coord-vocab mass); float64 keeps the renormalised slice exact to ~1e-15.
    Memory is O(B x K). numpy, not torch: the capture calls it once per generation step on a few rows, where
    a torch kernel's launch (and its wake-up of the intra-op threads) costs more than the arithmetic; every
    reduction runs along a row on its own, so a row's numbers do not depend on which rows share the call.
    """
    c = np.asarray(coord_logp, dtype=np.float64)
    top = c.max(axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    lse = top + np.log(np.exp(c - top).sum(axis=1, keepdims=True))
    p = np.exp(c - lse)  # the coord slice renormalised
    k = np.arange(c.shape[1], dtype=np.float64)
    am = p.argmax(axis=1)
    pk = np.take_along_axis(p, am[:, None], axis=1)[:, 0]
    mu = (p * k).sum(axis=1)
    var = np.maximum((p * (k[None, :] - mu[:, None]) ** 2).sum(axis=1), 0.0)
    cdf = np.cumsum(p, axis=1)
    med = np.minimum((cdf < _HALF).sum(axis=1), c.shape[1] - 1).astype(np.float64)
    near = (np.abs(k[None, :] - am[:, None]) <= window) * p
    loc = (near * k).sum(axis=1) / near.sum(axis=1)
    return np.stack([np.exp(lse[:, 0]), am.astype(np.float64), mu, med, loc, pk, np.sqrt(var)], axis=1)


def column(readout: str) -> int:
    """The :data:`STAT_COLUMNS` index of a readout."""
    if readout not in READOUTS:
        raise ValueError(f"unknown readout {readout!r}; expected one of {', '.join(READOUTS)}")
    return COL[readout]
