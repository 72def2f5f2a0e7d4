"""Object geometry: the three kinds an object may carry, and the plane arithmetic on their points.

An object has ``desc`` and exactly one geometry: ``bbox_2d`` (x1, y1, x2, y2), ``poly`` (a closed
ring of x, y pairs) or ``line`` (an open chain of x, y pairs). Points are flat lists
``[x, y, x, y, ...]``, in pixels or in bins; every module that asks "which geometry is this" or
"how large is it" asks here, so the kinds and their arithmetic cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

GEOMETRY_KEYS: tuple[str, ...] = ("bbox_2d", "poly", "line")
"""The geometry fields, in the order the answer grammar and the contract list them."""


def geometry_of(obj: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """``(kind, values)`` of an object given as a mapping; ``ValueError`` unless it has exactly one geometry."""
    kinds = [k for k in GEOMETRY_KEYS if k in obj and obj[k] is not None]
    if len(kinds) != 1:
        raise ValueError(f"object must have exactly one of {GEOMETRY_KEYS}, has {kinds}")
    return kinds[0], list(obj[kinds[0]])


def polygon_area(points: Sequence[float]) -> float:
    """Shoelace area of a flat ``[x, y, ...]`` polygon (0 for a degenerate one)."""
    x = np.asarray(points[0::2], dtype=np.float64)
    y = np.asarray(points[1::2], dtype=np.float64)
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def enclosing_box(points: Sequence[float]) -> tuple[float, float, float, float]:
    """``(x1, y1, x2, y2)`` around flat ``[x, y, ...]`` points, each side at least 1 pixel.

    A line along an axis (or a point) would otherwise have a zero-area box that no IoU can match.
    """
    xs, ys = points[0::2], points[1::2]
    x1, x2, y1, y2 = min(xs), max(xs), min(ys), max(ys)
    if x2 - x1 < 1.0:
        c = (x1 + x2) / 2
        x1, x2 = c - 0.5, c + 0.5
    if y2 - y1 < 1.0:
        c = (y1 + y2) / 2
        y1, y2 = c - 0.5, c + 0.5
    return x1, y1, x2, y2
