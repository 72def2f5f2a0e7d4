"""Deterministic synthetic "coloured shapes" detection data set in COCO format.

Why it exists: the workbench must run end to end on a fresh clone with no GPU and no
network, so it ships its own detection data. A tiny vision-language model trained from
scratch for a few CPU minutes has to be able to learn it, so the images are deliberately
clean: a plain light background, flat saturated fills, no anti-aliasing, no texture. It is
still not trivial: 1-4 objects per image, sizes from ``min_extent`` to 60 % of the image side,
random aspect ratios and rotations, a per-object colour jitter and bounded occlusion.

Categories (``colour x shape``, ids 1..15 in the order below, ``supercategory`` = shape)::

    colours: red, green, blue
    shapes : circle, rectangle, triangle, diamond, line

Geometry carried by each shape (every annotation always has ``bbox``):

* ``circle``    box-like. No ``segmentation`` key. The disc is exactly its bbox's
                inscribed circle (integer-pixel bbox, ``w == h``).
* ``rectangle`` box-like, axis aligned, aspect 1:2..2:1. No ``segmentation``; the filled
                rectangle is exactly its bbox (integer pixels).
* ``triangle``  polygon: ``segmentation = [[x1, y1, x2, y2, x3, y3]]`` (3 vertices, random
                rotation and jitter).
* ``diamond``   polygon: ``segmentation = [[x1, y1, ..., x4, y4]]`` (axis-aligned rhombus,
                aspect 0.6..1.6).
* ``line``      a thick stroke, straight (2 points) or bent once (3 points):
                ``line = [x1, y1, x2, y2(, x3, y3)]`` plus ``stroke_width`` (pixels); no
                ``segmentation``. Its ``bbox`` is the box of the *stroke*: the points'
                bounds padded by ``stroke_width / 2`` on every side (clipped to the image),
                which keeps horizontal/vertical lines non-degenerate. An evaluator that
                derives a box from predicted line points must pad it the same way.

Every annotation also carries ``geometry`` (``"bbox"``, ``"poly"`` or ``"line"``: the one
geometry field the Stage-1 data contract will emit for it) and ``occluded`` (the fraction of
its own pixels hidden by later objects, <= ``max_occlusion``).

Coordinates are COCO continuous pixel coordinates: pixel ``(i, j)`` covers
``[i, i+1] x [j, j+1]``. Polygon vertices and line points lie on pixel centres
(``n + 0.5``) so that PIL's rasteriser (which works in pixel-centre integers) draws exactly
the annotated shape; their raster therefore extends at most half a pixel beyond the
vertices. All shapes are placed wholly inside the image, so the amodal bbox equals the
visible-extent bbox of the full shape and every coordinate is in ``[0, W] x [0, H]``;
``w, h >= 4`` always.

Objects are painted in annotation order (ascending ``id`` within an image), so later ones
occlude earlier ones. A placement that would hide more than ``max_occlusion`` of any earlier
object's pixels, or that comes within 2 px of an object of the *same colour* (whose outlines
would otherwise merge into one blob), is rejected and resampled (up to ``_MAX_TRIES`` times; an object that still
does not fit is dropped, counted in the summary as ``dropped_objects``).

Determinism: each image draws from its own ``numpy.random.Generator`` seeded by
``(seed, split, index)``, so an image does not depend on how many others were generated;
PNGs are written by PIL with fixed options (no timestamps) and JSON with ``sort_keys`` and
fixed separators, so the same arguments give byte-identical files.

Layout written under ``out_dir``::

    annotations/instances_train.json   annotations/instances_val.json
    train/000000.png ...               val/000000.png ...

Image ``id`` is ``index + 1`` (``000000.png`` has id 1); annotation ids start at 1 per
split. ``file_name`` is relative to the split folder.

CLI: ``coordexp synth --out data/shapes [--n-train N ...]``; its defaults are
:func:`generate_coco_shapes`'s, and the README gives the command that made the embedded set.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from coordexp.core.io import atomic_open

GENERATOR_VERSION = "coordexp-shapes-1"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (30, 165, 55),
    "blue": (35, 75, 225),
}
"""Base RGB of each colour: far apart in hue and all far from the light background."""

SHAPES: tuple[str, ...] = ("circle", "rectangle", "triangle", "diamond", "line")
SHAPE_GEOMETRY: dict[str, str] = {
    "circle": "bbox",
    "rectangle": "bbox",
    "triangle": "poly",
    "diamond": "poly",
    "line": "line",
}

SPLITS: dict[str, int] = {"train": 0, "val": 1}
"""Split name -> the integer mixed into each image's seed (so train and val differ)."""

_COLOUR_JITTER = 18  # +- per channel, uniform per object: same name, not the same pixel value
_MAX_TRIES = 60  # placement attempts per object before it is dropped
_MIN_SIDE = 4.0  # no box side below this (pixels)
_SAME_COLOUR_GAP = 2  # px: same-colour objects never touch, else their outlines merge
_FILE_RE = re.compile(r"^\d{6}\.png$")


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    colour: str
    shape: str


def categories() -> list[Category]:
    """The fixed category list (ids 1..N, colour-major order)."""
    out = []
    for colour in COLOURS:
        for shape in SHAPES:
            out.append(Category(len(out) + 1, f"{colour} {shape}", colour, shape))
    return out


def _r2(v: float) -> float:
    """Round for JSON: two decimals are plenty and keep files small and stable."""
    return float(round(float(v), 2))


def _centre(v: float) -> float:
    """Snap a continuous coordinate to the centre (``n + 0.5``) of the pixel that contains it."""
    return math.floor(v) + 0.5


# --------------------------------------------------------------------------- drawing


def draw_annotation(draw: ImageDraw.ImageDraw, ann: dict[str, Any], shape: str, fill: Any) -> None:
    """Paint one annotation's full (amodal) shape.

    The single rasteriser used both to paint images and to build occlusion masks, so the
    masks used to enforce ``max_occlusion`` are exactly what lands in the PNG. PIL's
    coordinates are pixel-centre integers, hence the ``- 0.5`` shifts.
    """
    if shape in ("circle", "rectangle"):
        x, y, w, h = (int(round(v)) for v in ann["bbox"])
        box = [x, y, x + w - 1, y + h - 1]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    elif shape in ("triangle", "diamond"):
        pts = ann["segmentation"][0]
        draw.polygon([(pts[i] - 0.5, pts[i + 1] - 0.5) for i in range(0, len(pts), 2)], fill=fill)
    elif shape == "line":
        pts = ann["line"]
        xy = [(pts[i] - 0.5, pts[i + 1] - 0.5) for i in range(0, len(pts), 2)]
        draw.line(xy, fill=fill, width=int(ann["stroke_width"]), joint="curve")
    else:  # pragma: no cover - guarded by categories()
        raise ValueError(f"unknown shape {shape!r}")


def render_mask(ann: dict[str, Any], shape: str, width: int, height: int) -> np.ndarray:
    """Boolean ``(height, width)`` mask of an annotation's full shape (re-rasterised)."""
    img = Image.new("L", (width, height), 0)
    draw_annotation(ImageDraw.Draw(img), ann, shape, 255)
    return np.asarray(img) > 0


# --------------------------------------------------------------------------- sampling


def _sample_geometry(
    rng: np.random.Generator, shape: str, size: int, *, min_extent: float, line_min_aspect: float
) -> dict[str, Any]:
    """One object's annotation geometry (bbox + its shape-specific field), placed wholly
    inside a ``size x size`` image. Extent (largest side) is ``min_extent``..60 % of ``size``;
    a line's points span at least ``line_min_aspect`` times their larger side in the other
    direction (see :func:`generate_coco_shapes`)."""
    s_min, s_max = min_extent * size, 0.60 * size
    extent = float(rng.uniform(s_min, s_max))

    if shape == "circle":
        d = max(int(round(extent)), int(_MIN_SIDE))
        x, y = (int(rng.integers(0, size - d + 1)) for _ in range(2))
        return {"bbox": [float(x), float(y), float(d), float(d)]}

    if shape == "rectangle":
        aspect = math.exp(float(rng.uniform(math.log(0.5), math.log(2.0))))  # w / h
        w, h = (extent, extent / aspect) if aspect >= 1 else (extent * aspect, extent)
        w, h = max(int(round(w)), int(_MIN_SIDE)), max(int(round(h)), int(_MIN_SIDE))
        x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        return {"bbox": [float(x), float(y), float(w), float(h)]}

    if shape in ("triangle", "diamond"):
        if shape == "triangle":
            rot = float(rng.uniform(0, 2 * math.pi))
            ang = rot + np.arange(3) * (2 * math.pi / 3) + rng.uniform(-0.3, 0.3, size=3)
            rad = rng.uniform(0.85, 1.0, size=3)
            vx, vy = rad * np.cos(ang), rad * np.sin(ang)
        else:
            aspect = float(rng.uniform(0.6, 1.6))  # half-width / half-height
            vx = np.array([0.0, aspect, 0.0, -aspect])
            vy = np.array([-1.0, 0.0, 1.0, 0.0])
        # scale so the larger side of the vertex box is ``extent``; keep both sides >= 4 px
        span = max(vx.max() - vx.min(), vy.max() - vy.min())
        vx, vy = vx / span * extent, vy / span * extent
        for arr in (vx, vy):
            lo, hi = arr.min(), arr.max()
            if hi - lo < _MIN_SIDE + 1:
                arr[:] = (arr - (lo + hi) / 2) * ((_MIN_SIDE + 1) / max(hi - lo, 1e-6))
        # translate into the image so every vertex (a pixel centre) is inside [0.5, size-0.5]
        ox = float(rng.uniform(0.5 - vx.min(), size - 0.5 - vx.max()))
        oy = float(rng.uniform(0.5 - vy.min(), size - 0.5 - vy.max()))
        xs = [min(max(_centre(v + ox), 0.5), size - 0.5) for v in vx]
        ys = [min(max(_centre(v + oy), 0.5), size - 0.5) for v in vy]
        seg = [c for xy in zip(xs, ys) for c in xy]
        x0, y0 = min(xs), min(ys)
        return {
            "bbox": [x0, y0, max(xs) - x0, max(ys) - y0],
            "segmentation": [seg],
        }

    if shape == "line":
        sw = max(4, int(round(size * 0.035)))  # 4 px at 128: visible, and the bbox >= 4 px
        half = sw / 2
        for _try in range(_MAX_TRIES):  # the first draw is kept when line_min_aspect is 0
            n_seg = int(rng.integers(1, 3))  # 1 segment (straight) or 2 (one bend)
            a = float(rng.uniform(0, 2 * math.pi))
            pts = [np.zeros(2)]
            lengths = [extent] if n_seg == 1 else list(extent * rng.uniform(0.45, 0.75, size=2))
            for i, seg_len in enumerate(lengths):
                if i:
                    a += float(rng.choice([-1.0, 1.0]) * rng.uniform(math.radians(45), math.radians(135)))
                pts.append(pts[-1] + seg_len * np.array([math.cos(a), math.sin(a)]))
            p = np.stack(pts)
            spans = p.max(0) - p.min(0)
            if spans.min() >= line_min_aspect * spans.max():
                break
        # a bent line's larger side is at most ``extent`` too; then leave room for the stroke
        span = float((p.max(0) - p.min(0)).max())
        limit = min(extent, size - 1.0 - 2 * half)
        if span > limit:
            p = p * (limit / span)
        lo, hi = p.min(0), p.max(0)
        off = [float(rng.uniform(half + 0.5 - lo[d], size - 0.5 - half - hi[d])) for d in (0, 1)]
        xs = [min(max(_centre(v + off[0]), half), size - half) for v in p[:, 0]]
        ys = [min(max(_centre(v + off[1]), half), size - half) for v in p[:, 1]]
        x0, y0 = max(min(xs) - half, 0.0), max(min(ys) - half, 0.0)
        x1, y1 = min(max(xs) + half, float(size)), min(max(ys) + half, float(size))
        return {
            "bbox": [x0, y0, x1 - x0, y1 - y0],
            "line": [c for xy in zip(xs, ys) for c in xy],
            "stroke_width": sw,
        }

    raise ValueError(f"unknown shape {shape!r}")  # pragma: no cover


def _dilate(mask: np.ndarray, r: int) -> np.ndarray:
    """Binary dilation by a ``(2r+1)^2`` square (numpy only; masks are tiny)."""
    h, w = mask.shape
    pad = np.pad(mask, r)
    out = np.zeros_like(mask)
    for dy in range(2 * r + 1):
        for dx in range(2 * r + 1):
            out |= pad[dy : dy + h, dx : dx + w]
    return out


def _jitter_colour(rng: np.random.Generator, base: tuple[int, int, int]) -> tuple[int, int, int]:
    j = rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, size=3)
    return tuple(int(v) for v in np.clip(np.array(base) + j, 0, 255))


def make_image(
    seed: int,
    split: str,
    index: int,
    *,
    image_size: int,
    min_objects: int,
    max_objects: int,
    max_occlusion: float,
    min_extent: float,
    line_min_aspect: float,
) -> tuple[Image.Image, list[dict[str, Any]], int]:
    """Generate one image and its annotations (without ``id``/``image_id``).

    Returns ``(image, annotations_in_paint_order, dropped_objects)``. Pure function of its
    arguments: the generator is seeded by ``(seed, split, index)``.
    """
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    cats = categories()
    size = int(image_size)

    # light background with a per-image tint (flat: per-pixel noise would bloat the PNGs)
    grey = int(rng.integers(228, 251))
    bg = tuple(int(v) for v in np.clip(grey + rng.integers(-8, 9, size=3), 0, 255))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)

    n_obj = int(rng.integers(min_objects, max_objects + 1))
    full_areas: list[int] = []
    visible: list[np.ndarray] = []  # current visible mask of each placed object
    anns: list[dict[str, Any]] = []
    same_colour: dict[str, np.ndarray | None] = {c: None for c in COLOURS}  # union of dilated full masks
    dropped = 0
    for _ in range(n_obj):
        cat = cats[int(rng.integers(0, len(cats)))]
        colour = _jitter_colour(rng, COLOURS[cat.colour])
        placed = False
        for _try in range(_MAX_TRIES):
            geom = _sample_geometry(rng, cat.shape, size, min_extent=min_extent, line_min_aspect=line_min_aspect)
            mask = render_mask(geom, cat.shape, size, size)
            ok = True
            for vis, full in zip(visible, full_areas):
                if np.count_nonzero(vis & ~mask) < (1.0 - max_occlusion) * full:
                    ok = False
                    break
            if ok and same_colour[cat.colour] is not None:
                ok = not np.any(mask & same_colour[cat.colour])
            if ok:
                placed = True
                break
        if not placed:
            dropped += 1
            continue
        for k in range(len(visible)):
            visible[k] = visible[k] & ~mask
        visible.append(mask)
        prev = same_colour[cat.colour]
        grown = _dilate(mask, _SAME_COLOUR_GAP)
        same_colour[cat.colour] = grown if prev is None else (prev | grown)
        full_areas.append(int(np.count_nonzero(mask)))
        draw_annotation(draw, geom, cat.shape, colour)
        ann = {
            "category_id": cat.id,
            "bbox": [_r2(v) for v in geom["bbox"]],
            "area": float(full_areas[-1]),
            "iscrowd": 0,
            "geometry": SHAPE_GEOMETRY[cat.shape],
        }
        if "segmentation" in geom:
            ann["segmentation"] = [[_r2(v) for v in geom["segmentation"][0]]]
        if "line" in geom:
            ann["line"] = [_r2(v) for v in geom["line"]]
            ann["stroke_width"] = int(geom["stroke_width"])
        anns.append(ann)

    for ann, vis, full in zip(anns, visible, full_areas):
        ann["occluded"] = _r2(1.0 - np.count_nonzero(vis) / full) if full else 0.0
    return img, anns, dropped


# --------------------------------------------------------------------------- writing


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=9)
    return buf.getvalue()


def _atomic_write(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def dump_json(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, fixed separators) for byte-stable outputs."""
    return (json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n").encode()


def _generate_split(
    out_dir: Path,
    split: str,
    n: int,
    *,
    seed: int,
    image_size: int,
    min_objects: int,
    max_objects: int,
    max_occlusion: float,
    min_extent: float,
    line_min_aspect: float,
    progress: bool,
) -> dict[str, Any]:
    img_dir = out_dir / split
    img_dir.mkdir(parents=True, exist_ok=True)
    cats = categories()
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    per_cat = {c.name: 0 for c in cats}
    dropped_total = 0
    n_bytes = 0
    wanted = {f"{i:06d}.png" for i in range(n)}

    it: Any = range(n)
    if progress:
        it = tqdm(it, desc=f"shapes/{split}", unit="img", file=sys.stderr)
    for i in it:
        img, anns, dropped = make_image(
            seed,
            split,
            i,
            image_size=image_size,
            min_objects=min_objects,
            max_objects=max_objects,
            max_occlusion=max_occlusion,
            min_extent=min_extent,
            line_min_aspect=line_min_aspect,
        )
        dropped_total += dropped
        name = f"{i:06d}.png"
        data = _png_bytes(img)
        path = img_dir / name
        # skip rewriting identical bytes (cheap re-runs, unchanged mtimes for DVC)
        if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
            _atomic_write(path, data)
        n_bytes += len(data)
        images.append({"id": i + 1, "file_name": name, "width": image_size, "height": image_size})
        for ann in anns:
            ann["id"] = len(annotations) + 1
            ann["image_id"] = i + 1
            annotations.append(ann)
            per_cat[cats[ann["category_id"] - 1].name] += 1

    # remove stale numbered PNGs from an earlier, larger run (only our own naming pattern)
    for p in img_dir.iterdir():
        if _FILE_RE.match(p.name) and p.name not in wanted:
            p.unlink()

    coco = {
        "info": {
            "description": "CoordExp synthetic coloured shapes (coordexp.synth)",  # as in the embedded data set
            "version": GENERATOR_VERSION,
            "split": split,
            "seed": int(seed),
            "image_size": int(image_size),
            "min_objects": int(min_objects),
            "max_objects": int(max_objects),
            "max_occlusion": float(max_occlusion),
            "min_extent": float(min_extent),
            "line_min_aspect": float(line_min_aspect),
        },
        "licenses": [],
        "images": images,
        "categories": [{"id": c.id, "name": c.name, "supercategory": c.shape} for c in cats],
        "annotations": annotations,
    }
    blob = dump_json(coco)
    _atomic_write(out_dir / "annotations" / f"instances_{split}.json", blob)
    return {
        "images": n,
        "annotations": len(annotations),
        "dropped_objects": dropped_total,
        "per_category": per_cat,
        "png_bytes": n_bytes,
        "json_bytes": len(blob),
    }


def generate_coco_shapes(
    out_dir: Path | str,
    *,
    n_train: int = 3000,
    n_val: int = 200,
    image_size: int = 128,
    min_objects: int = 1,
    max_objects: int = 4,
    seed: int = 0,
    max_occlusion: float = 0.3,
    min_extent: float = 0.12,
    line_min_aspect: float = 0.0,
    progress: bool = True,
) -> dict[str, Any]:
    """Write the data set under ``out_dir`` (layout in the module docstring).

    ``min_extent`` is the smallest object's larger side as a fraction of the image side (the
    largest is 0.6). ``line_min_aspect`` keeps lines away from the axes: the box of a line's
    points is at least that many times as tall as it is wide, and the other way round. Why it
    exists: detection is scored on the box of a line's points, and a near-horizontal line has a
    box one or two pixels tall, where IoU >= 0.5 asks for sub-pixel accuracy whatever the
    method.

    Returns a summary: ``{"out_dir", "image_size", "num_categories", "total_bytes",
    "splits": {split: {"images", "annotations", "dropped_objects", "per_category",
    "png_bytes", "json_bytes"}}}``.
    """
    if n_train < 0 or n_val < 0 or n_train > 999_999 or n_val > 999_999:
        raise ValueError("n_train / n_val must be in [0, 999999]")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32, got {image_size}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0.0 <= max_occlusion < 1.0:
        raise ValueError(f"max_occlusion must be in [0, 1), got {max_occlusion}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.04 <= min_extent <= 0.6:
        raise ValueError(f"min_extent must be in [0.04, 0.6] (a fraction of the image side), got {min_extent}")
    if not 0.0 <= line_min_aspect <= 0.8:
        raise ValueError(f"line_min_aspect must be in [0, 0.8], got {line_min_aspect}")
    out_dir = Path(out_dir)
    splits = {}
    for split, n in (("train", n_train), ("val", n_val)):
        splits[split] = _generate_split(
            out_dir,
            split,
            n,
            seed=seed,
            image_size=image_size,
            min_objects=min_objects,
            max_objects=max_objects,
            max_occlusion=max_occlusion,
            min_extent=min_extent,
            line_min_aspect=line_min_aspect,
            progress=progress,
        )
    return {
        "out_dir": str(out_dir),
        "image_size": int(image_size),
        "num_categories": len(categories()),
        "total_bytes": sum(s["png_bytes"] + s["json_bytes"] for s in splits.values()),
        "splits": splits,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: ``python -m coordexp.preprocess.synth --out data/shapes [--n-train N ...]``; prints the summary."""
    ap = argparse.ArgumentParser(prog="python -m coordexp.preprocess.synth", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output folder")
    default = {k: v.default for k, v in inspect.signature(generate_coco_shapes).parameters.items()}  # one source
    help_of = {
        "min_extent": "smallest object side / image side",
        "line_min_aspect": "a line's points span at least this fraction of their larger side in the other direction",
    }
    for name in (
        "n_train",
        "n_val",
        "image_size",
        "min_objects",
        "max_objects",
        "seed",
        "max_occlusion",
        "min_extent",
        "line_min_aspect",
    ):
        ap.add_argument(
            "--" + name.replace("_", "-"),
            type=type(default[name]),
            default=default[name],
            help=f"{help_of.get(name, name.replace('_', ' '))} (default {default[name]})",
        )
    ap.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    a = ap.parse_args(argv)
    try:
        summary = generate_coco_shapes(
            a.out,
            n_train=a.n_train,
            n_val=a.n_val,
            image_size=a.image_size,
            min_objects=a.min_objects,
            max_objects=a.max_objects,
            seed=a.seed,
            max_occlusion=a.max_occlusion,
            min_extent=a.min_extent,
            line_min_aspect=a.line_min_aspect,
            progress=not a.no_progress,
        )
    except ValueError as e:
        ap.error(str(e))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
