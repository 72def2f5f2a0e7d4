"""The coord codec: the one place where pixels, bins and ``<|coord_k|>`` strings meet.

A coordinate along a dimension of ``S`` pixels maps to one of ``K = 1000`` ordered bins

    k = round(x / (S - 1) * (K - 1)),  clamped to [0, K - 1]
    x = k / (K - 1) * (S - 1)

``round`` is round-half-up (``floor(v + 0.5)``), not Python's banker's rounding, so that the
mapping is monotone and identical in Python, NumPy and torch. The ``S - 1`` convention puts
bin 0 on the first pixel centre and bin ``K - 1`` on the last one; a coordinate in
``[S - 1, S]`` (a COCO box edge that touches the right or bottom border) is clamped to the
last bin. Over ``[0, S - 1]`` the round trip ``decode(encode(x))`` is off by at most half a
bin, ``(S - 1) / (2 (K - 1))`` pixels (tested with hypothesis in ``tests/test_codec.py``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

import numpy as np

K: int = 1000
"""Number of coordinate bins (and of coord tokens)."""

COORD_TOKEN_FORMAT = "<|coord_{}|>"
COORD_TOKEN_RE = re.compile(r"<\|coord_(\d{1,4})\|>")
_FULL_TOKEN_RE = re.compile(r"^<\|coord_(0|[1-9]\d{0,3})\|>$")


def coord_token(k: int) -> str:
    """The token string of bin ``k``."""
    if not 0 <= int(k) < K:
        raise ValueError(f"coord bin {k} is outside [0, {K - 1}]")
    return COORD_TOKEN_FORMAT.format(int(k))


COORD_TOKENS: tuple[str, ...] = tuple(COORD_TOKEN_FORMAT.format(k) for k in range(K))
"""All coord token strings in bin order."""


def parse_coord_token(token: str) -> int:
    """Bin index of a ``<|coord_k|>`` string; ``ValueError`` for anything else."""
    m = _FULL_TOKEN_RE.match(token) if isinstance(token, str) else None
    if m is None or int(m.group(1)) >= K:
        raise ValueError(f"{token!r} is not a coord token <|coord_0|>..<|coord_{K - 1}|>")
    return int(m.group(1))


def is_coord_token(token: object) -> bool:
    return isinstance(token, str) and bool(_FULL_TOKEN_RE.match(token)) and int(token[8:-2]) < K


def _check_size(size: float) -> None:
    if not size > 1:
        raise ValueError(f"image dimension must be > 1 pixel, got {size}")


def pixel_to_bin(x: float, size: float) -> int:
    """Bin of pixel coordinate ``x`` along a dimension of ``size`` pixels (clamped)."""
    _check_size(size)
    k = math.floor(float(x) / (size - 1) * (K - 1) + 0.5)
    return min(max(k, 0), K - 1)


def bin_to_pixel(k: int | float, size: float) -> float:
    """Pixel coordinate of the centre of bin ``k`` (``k`` may be fractional, e.g. an expectation)."""
    _check_size(size)
    return float(k) / (K - 1) * (size - 1)


def pixels_to_bins(xs: Sequence[float] | np.ndarray, sizes: Sequence[float] | np.ndarray) -> np.ndarray:
    """Vectorised :func:`pixel_to_bin`; ``sizes`` broadcasts against ``xs``."""
    xs = np.asarray(xs, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    if np.any(sizes <= 1):
        raise ValueError("image dimensions must be > 1 pixel")
    k = np.floor(xs / (sizes - 1) * (K - 1) + 0.5)
    return np.clip(k, 0, K - 1).astype(np.int64)


def bins_to_pixels(ks: Sequence[float] | np.ndarray, sizes: Sequence[float] | np.ndarray) -> np.ndarray:
    """Vectorised :func:`bin_to_pixel`."""
    ks = np.asarray(ks, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.float64)
    return ks / (K - 1) * (sizes - 1)


def max_roundtrip_error(size: float) -> float:
    """Largest ``|decode(encode(x)) - x|`` over ``[0, size - 1]``: half a bin, in pixels."""
    _check_size(size)
    return (size - 1) / (2 * (K - 1))


def xy_sizes(n: int, width: float, height: float) -> np.ndarray:
    """Sizes for a flat ``[x0, y0, x1, y1, ...]`` list: width for even slots, height for odd."""
    sizes = np.empty(n, dtype=np.float64)
    sizes[0::2], sizes[1::2] = width, height
    return sizes


def encode_xy(values: Iterable[float], width: float, height: float) -> list[str]:
    """Flat pixel list ``[x, y, x, y, ...]`` -> coord token strings."""
    vals = list(values)
    return [coord_token(int(k)) for k in pixels_to_bins(vals, xy_sizes(len(vals), width, height))]


def decode_xy(tokens: Iterable[str | int | float], width: float, height: float) -> list[float]:
    """Coord token strings, bin ints or continuous bins (floats) ``[x, y, ...]`` -> flat pixel list."""
    ks = [parse_coord_token(t) if isinstance(t, str) else t for t in tokens]
    return [float(v) for v in bins_to_pixels(ks, xy_sizes(len(ks), width, height))]
