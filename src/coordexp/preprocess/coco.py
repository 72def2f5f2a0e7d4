"""COCO-format detection data -> contract JSONL in coord-token mode.

What becomes what:

* an annotation with a ``line`` list (x, y pairs; the embedded data's extension) -> ``line``;
* a polygon ``segmentation`` -> ``poly``; one of several parts -> as ``preprocess.polygon_parts`` says (a box over
  every part by default, or the largest part, or a reject), counted either way;
* an RLE ``segmentation`` -> ``bbox_2d`` from its box (``rle: bbox``) or a reject (``rle: reject``);
* anything else -> ``bbox_2d`` from the COCO ``bbox`` (x, y, w, h).

A coordinate up to ``preprocess.border_tolerance`` pixels past the border (float rounding in real exports) is
clamped onto it and the object counted (``border_clamped``); further out the object is rejected.

Nothing is dropped silently: every object or image that does not make it is written to
``rejects.jsonl`` with its reason and counted in ``reports/preprocess_counts.json``. An image
whose annotations were *all* rejected is rejected as well (``no_valid_objects``) rather than kept
as an "empty" example that would teach the model to see nothing; an image that never had
annotations is kept, with an empty answer.

An LVIS file (detected from its keys, :mod:`coordexp.preprocess.lvis`) is read the same way; its federated
fields (per-image ``neg_category_ids`` / ``not_exhaustive_category_ids``, category frequencies) go to
``<out_dir>/<split>.lvis.json`` for the evaluation. An image without ``file_name`` is found by the last part
of its ``coco_url`` (LVIS names its images that way); nothing is downloaded.

Images are copied (or resized, with coordinates rescaled) into ``<out_dir>/images/<split>/`` so
that the output folder is self-contained and record image paths are relative to it.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
from PIL import Image
from tqdm import tqdm

from coordexp.core import imaging, paths
from coordexp.core.config import Params, PreprocessConfig
from coordexp.core.contract import Record, record_to_json, to_coord_mode
from coordexp.core.errors import UserError
from coordexp.core.geometry import GEOMETRY_KEYS, geometry_of, polygon_area
from coordexp.core.io import atomic_dir, write_json, write_jsonl
from coordexp.preprocess import lvis


class CocoFormatError(UserError, ValueError):
    """The COCO file itself is unusable (not JSON, missing top-level lists)."""


@dataclass
class SplitStats:
    records_in: int = 0
    records_out: int = 0
    objects_in: int = 0
    objects_out: int = 0
    geometry: Counter = field(default_factory=Counter)
    rejects: Counter = field(default_factory=Counter)
    clamped_coords: int = 0
    border_clamped: int = 0
    multi_part_polygons: int = 0
    polygon_parts_shrunk: int = 0
    negative_images: int = 0
    lvis: dict[str, Any] | None = None
    """What an LVIS split's federated fields hold (:func:`coordexp.preprocess.lvis.counts`); None for COCO."""

    def as_dict(self) -> dict[str, Any]:
        out = {
            "records_in": self.records_in,
            "records_out": self.records_out,
            "objects_in": self.objects_in,
            "objects_out": self.objects_out,
            "geometry": {k: self.geometry.get(k, 0) for k in GEOMETRY_KEYS},
            "rejects": dict(sorted(self.rejects.items())),
            "clamped_coords": self.clamped_coords,
            "border_clamped": self.border_clamped,
            "multi_part_polygons": self.multi_part_polygons,
            "polygon_parts_shrunk": self.polygon_parts_shrunk,
            "negative_images": self.negative_images,
        }
        if self.lvis is not None:
            out["lvis"] = self.lvis
        return out


def load_coco(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CocoFormatError(f"{path}: no such COCO annotations file; run `dvc pull` or fix preprocess.splits")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CocoFormatError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise CocoFormatError(f"{path}: top-level '{key}' list is missing; is this a COCO instances file?")
    return data


def _geometry(ann: dict[str, Any], cfg: PreprocessConfig, stats: SplitStats) -> tuple[str, list[float]] | str:
    """(kind, flat pixel values) of an annotation, or the reason it is rejected; counts multi-part polygons."""
    if ann.get("line") is not None:
        line = ann["line"]
        if not isinstance(line, list) or len(line) < 4 or len(line) % 2:
            return "bad_line"
        return "line", [float(v) for v in line]
    seg = ann.get("segmentation")
    if isinstance(seg, dict):
        if cfg.rle == "reject":
            return "rle_segmentation"
    elif isinstance(seg, list) and seg:
        parts = [p for p in seg if isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0]
        if not parts:
            return "degenerate_polygon"
        if len(parts) == 1:
            return "poly", [float(v) for v in parts[0]]
        stats.multi_part_polygons += 1
        every = [float(v) for p in parts for v in p]
        if cfg.polygon_parts == "reject":
            return "multi_part_polygon"
        if cfg.polygon_parts == "box":
            return "bbox_2d", list(_extent(every))
        kept = [float(v) for v in max(parts, key=polygon_area)]
        stats.polygon_parts_shrunk += _extent(kept) != _extent(every)
        return "poly", kept
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4:
        return "missing_bbox"
    x, y, w, h = (float(v) for v in bbox)
    return "bbox_2d", [x, y, x + w, y + h]


def canonical_points(kind: str, values: list[float]) -> list[float]:
    """The same polygon or polyline with its points in one canonical order (boxes unchanged).

    Why: a polygon's start vertex and direction, and a polyline's direction, carry no meaning,
    but the model must emit them in SOME order; when the source order is arbitrary (a triangle's
    first vertex depends on its random rotation, a line's on which end it was drawn from) the
    training targets of a vertex are a mixture over the possible orders, and the model learns
    their average: vertices pulled to the centroid, a shrunken box. Canonical: a polygon runs
    clockwise on screen (y pointing down) from its top-most vertex (then left-most); a polyline
    starts at its top-most (then left-most) end.
    """
    if kind == "bbox_2d":
        return values
    pts = [(values[i], values[i + 1]) for i in range(0, len(values), 2)]
    if kind == "poly":
        twice_area = sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]))
        if twice_area < 0:  # counter-clockwise on screen
            pts.reverse()
        start = min(range(len(pts)), key=lambda i: (pts[i][1], pts[i][0]))
        pts = pts[start:] + pts[:start]
    elif (pts[-1][1], pts[-1][0]) < (pts[0][1], pts[0][0]):
        pts.reverse()
    return [c for xy in pts for c in xy]


def _extent(values: list[float]) -> tuple[float, float, float, float]:
    xs, ys = values[0::2], values[1::2]
    return min(xs), min(ys), max(xs), max(ys)


def _onto_border(values: list[float], width: int, height: int, tol: float) -> list[float] | None:
    """``values`` with every coordinate that lies at most ``tol`` pixels past the image clamped onto the border,
    or None when one lies further out (then the object is ``outside_image``). A hair past (1e-6, round-off)
    is left for :func:`_check_geometry` and the final clip, as it always was."""
    out = []
    for i, v in enumerate(values):
        side = float(width if i % 2 == 0 else height)
        if v < -1e-6 or v > side + 1e-6:
            if v < -tol - 1e-6 or v > side + tol + 1e-6:
                return None
            v = min(max(v, 0.0), side)
        out.append(v)
    return out


def _check_geometry(kind: str, values: list[float], width: int, height: int, cfg: PreprocessConfig) -> str | None:
    if not all(np.isfinite(values)):
        return "non_finite_coord"
    x1, y1, x2, y2 = _extent(values)
    tol = 1e-6
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        return "outside_image"
    if kind == "bbox_2d" and (x2 - x1 < cfg.min_box_side or y2 - y1 < cfg.min_box_side):
        return "degenerate_box"
    if kind == "poly" and polygon_area(values) <= 0:
        return "degenerate_polygon"
    if kind == "line" and max(x2 - x1, y2 - y1) < cfg.min_box_side:
        return "degenerate_line"
    return None


def image_file_name(img: dict[str, Any]) -> Any:
    """The image's ``file_name``, or else the last part of its ``coco_url`` (LVIS v1 lists
    ``http://images.cocodataset.org/train2017/000000391895.jpg`` for the file ``000000391895.jpg`` of the images
    folder); never fetched."""
    name = img.get("file_name")
    url = img.get("coco_url")
    if name is None and isinstance(url, str) and url.strip():
        return Path(urlparse(url.strip()).path).name or None
    return name


def _order(objects: list[dict[str, Any]], cfg: PreprocessConfig, seed: int, image_id: int) -> list[dict[str, Any]]:
    if cfg.object_ordering == "random":
        perm = np.random.default_rng([seed, image_id]).permutation(len(objects))
        return [objects[i] for i in perm]

    def key(o: dict[str, Any]) -> tuple[Any, ...]:
        kind, _ = geometry_of(o)
        x1, y1, _, _ = _extent(o[kind])
        return (y1, x1, o["desc"], kind, tuple(o[kind]))

    return sorted(objects, key=key)


def _place_image(src: Path, dst: Path, max_side: int | None) -> tuple[int, int, float, float]:
    """Copy or resize one image; returns the new size and the x/y scale factors."""
    with imaging.load(src) as im:  # refuses a decompression bomb or an unreadable file (ImageRefused)
        w, h = im.size
        dst.parent.mkdir(parents=True, exist_ok=True)
        if max_side is None or max(w, h) <= max_side:
            shutil.copyfile(src, dst)
            return w, h, 1.0, 1.0
        s = max_side / max(w, h)
        nw, nh = max(2, round(w * s)), max(2, round(h * s))
        im.convert("RGB").resize((nw, nh), Image.Resampling.BICUBIC).save(dst, format="PNG", optimize=False)
        return nw, nh, nw / w, nh / h


def convert_split(
    name: str,
    ann_file: Path,
    image_dir: Path,
    out_dir: Path,
    cfg: PreprocessConfig,
    seed: int,
    rejects: list[dict[str, Any]],
    lvis_fields: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], SplitStats]:
    """The split's contract records and counts. When ``ann_file`` is LVIS, ``lvis_fields`` (if given) is filled
    with the sidecar content (:func:`coordexp.preprocess.lvis.sidecar`) of the images kept."""
    coco = load_coco(ann_file)
    stats = SplitStats()
    lvis_categories = lvis.check_categories(coco, ann_file) if lvis.is_lvis(coco) else None
    lvis_images: dict[int, dict[str, list[int]]] = {}
    categories = {c.get("id"): c.get("name") for c in coco["categories"] if isinstance(c, dict)}
    by_image: dict[Any, list[dict[str, Any]]] = {}
    for ann in coco["annotations"]:
        by_image.setdefault(ann.get("image_id") if isinstance(ann, dict) else None, []).append(ann)
    image_ids = {img.get("id") for img in coco["images"] if isinstance(img, dict)}
    for orphan in sorted(set(by_image) - image_ids, key=str):
        for ann in by_image[orphan]:
            stats.objects_in += 1
            stats.rejects["unknown_image_id"] += 1
            rejects.append({"split": name, "image_id": orphan, "ann_id": _ann_id(ann), "reason": "unknown_image_id"})

    out: list[dict[str, Any]] = []
    images = sorted((i for i in coco["images"] if isinstance(i, dict)), key=_image_sort_key)
    for img in tqdm(images, desc=f"preprocess {name}", unit="img", leave=False, disable=None):
        stats.records_in += 1
        anns = by_image.get(img.get("id"), [])
        stats.objects_in += len(anns)

        def reject_image(reason: str, detail: str = "", img: dict[str, Any] = img, anns: list[Any] = anns) -> None:
            stats.rejects[reason] += 1
            rejects.append(
                {
                    "split": name,
                    "image_id": img.get("id"),
                    "file_name": image_file_name(img),
                    "reason": reason,
                    "detail": detail,
                    "objects_lost": len(anns),
                }
            )

        file_name = image_file_name(img)
        if not isinstance(file_name, str) or not isinstance(img.get("id"), int):
            reject_image("bad_image_entry", "image entry needs an int 'id' and a 'file_name' (or a 'coco_url')")
            continue
        federated = lvis.image_lists(img) if lvis_categories is not None else None
        if isinstance(federated, str):
            reject_image("bad_lvis_image", federated)
            continue
        try:
            src = paths.inside(image_dir, file_name, where=f"{ann_file}: image id {img['id']}")
        except paths.PathEscapeError as exc:
            reject_image("image_path_escapes_root", str(exc))
            continue
        if not src.is_file():
            reject_image("missing_image", str(src))
            continue
        dst = (
            out_dir
            / "images"
            / name
            / (Path(file_name).with_suffix("").as_posix().replace("/", "__") + Path(file_name).suffix)
        )
        try:
            width, height, sx, sy = _place_image(src, dst, cfg.max_side)
        except imaging.ImageRefused as exc:  # image_too_large (a decompression bomb) or unreadable_image
            reject_image(exc.reason, f"{src}: {exc}")
            continue
        if (img.get("width"), img.get("height")) not in ((None, None), (round(width / sx), round(height / sy))):
            dst.unlink()
            reject_image(
                "size_mismatch",
                f"COCO says {img.get('width')}x{img.get('height')}, file is {round(width / sx)}x{round(height / sy)}",
            )
            continue

        objects: list[dict[str, Any]] = []
        for ann in anns:
            reason = None
            if ann.get("iscrowd"):
                reason = "crowd"
            elif ann.get("category_id") not in categories or not categories[ann.get("category_id")]:
                reason = "unknown_category"
            if reason is None:
                geom = _geometry(ann, cfg, stats)
                if isinstance(geom, str):
                    reason = geom
                else:
                    kind, values = geom
                    # check against the original image, then rescale
                    ow, oh = round(width / sx), round(height / sy)
                    if all(np.isfinite(values)):
                        inside = _onto_border(values, ow, oh, cfg.border_tolerance)
                        if inside is None:
                            reason = "outside_image"
                        elif inside != values:
                            stats.border_clamped += 1
                            values = inside
                    reason = reason or _check_geometry(kind, values, ow, oh, cfg)
            if reason is not None:
                stats.rejects[reason] += 1
                rejects.append({"split": name, "image_id": img["id"], "ann_id": _ann_id(ann), "reason": reason})
                continue
            if cfg.vertex_order == "canonical":
                values = canonical_points(kind, values)
            scaled = [v * (sx if i % 2 == 0 else sy) for i, v in enumerate(values)]
            stats.clamped_coords += sum(1 for i, v in enumerate(scaled) if v > (width if i % 2 == 0 else height) - 1)
            objects.append({"desc": str(categories[ann["category_id"]]).strip(), kind: scaled})

        if anns and not objects:
            dst.unlink()
            stats.rejects["no_valid_objects"] += 1
            rejects.append(
                {
                    "split": name,
                    "image_id": img["id"],
                    "file_name": file_name,
                    "reason": "no_valid_objects",
                    "objects_lost": 0,
                }
            )
            continue
        stats.negative_images += not anns
        if isinstance(federated, dict):
            lvis_images[img["id"]] = federated
        objects = _order(objects, cfg, seed, img["id"])
        rec = Record.model_validate(
            {
                "id": img["id"],
                "images": [dst.relative_to(out_dir).as_posix()],
                "width": width,
                "height": height,
                "objects": [_clip(o, width, height) for o in objects],
            }
        )
        rec.check_mode("pixel")
        rec = to_coord_mode(rec)
        out.append(record_to_json(rec))
        stats.records_out += 1
        stats.objects_out += len(objects)
        for o in rec.objects:
            stats.geometry[o.kind] += 1
    if lvis_categories is not None:
        stats.lvis = lvis.counts(lvis_categories, lvis_images)
        if lvis_fields is not None:
            lvis_fields.update(lvis.sidecar(lvis_categories, lvis_images, ann_file.name))
    return out, stats


def _image_sort_key(img: dict[str, Any]) -> tuple[int, Any]:
    """Numeric ids in numeric order (1, 2, 10), anything else after them by its text."""
    iid = img.get("id")
    return (0, iid) if isinstance(iid, int) else (1, str(iid))


def _ann_id(ann: Any) -> Any:
    return ann.get("id") if isinstance(ann, dict) else None


def _reasons(stats: SplitStats, ann_file: Path, first: int = 5) -> str:
    """``missing_image x 200, degenerate_box x 3`` (the most frequent first), or why there was nothing to reject."""
    if not stats.records_in:
        return f"{ann_file} lists no images"
    counts = stats.rejects.most_common()
    text = ", ".join(f"{reason} x {n}" for reason, n in counts[:first])
    if len(counts) > first:
        text += f", and {len(counts) - first} more reasons"
    return text


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to the project root when it is inside it (as the user wrote it in params.yaml)."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _clip(obj: dict[str, Any], width: int, height: int) -> dict[str, Any]:
    """Round-off from rescaling may push an edge a hair past the border; clip it back."""
    kind, _ = geometry_of(obj)
    vals = [min(max(v, 0.0), float(width if i % 2 == 0 else height)) for i, v in enumerate(obj[kind])]
    return {"desc": obj["desc"], kind: vals}


TOTAL_METRICS: tuple[str, ...] = (
    "records_in",
    "records_out",
    "objects_in",
    "objects_out",
    "rejects",
    "negative_images",
    "border_clamped",
    "multi_part_polygons",
    "polygon_parts_shrunk",
)
"""The DVC metrics of ``reports/metrics/preprocess.json``: totals over the splits, among them what was kept
but changed (clamped onto the border, multi-part polygons, shrunk by keeping one part) and the images kept as
negatives (no annotation: an empty answer)."""

PREPROCESS_COUNTS = "reports/preprocess_counts.json"
"""Every count (per split, per geometry, per reject reason), a DVC output that is not a metric."""


def run(params: Params, root: Path | None = None) -> dict[str, Any]:
    """Convert every split; write ``<out_dir>`` atomically, the metrics file (totals) and the counts file
    (everything). Returns the counts (``splits`` and ``total``).

    ``<out_dir>/rejects.jsonl`` lists this run's rejects whatever the outcome: when the run fails
    (a split with no surviving record, an unusable COCO file, anything else) the half-built folder is
    discarded and the previous output stays as it was, except its rejects file, which is replaced by
    this run's (atomically), so the error's reasons can be read there and no stale list is left.
    """
    root = root or paths.project_root()
    cfg = params.preprocess
    out_dir = paths.resolve(cfg.out_dir, root)
    rejects: list[dict[str, Any]] = []
    metrics: dict[str, Any] = {"splits": {}}
    empty: list[str] = []
    try:
        with atomic_dir(out_dir) as tmp:
            for name, src in cfg.splits.items():
                ann_file = paths.resolve(src.annotations, root)
                lvis_fields: dict[str, Any] = {}
                records, stats = convert_split(
                    name, ann_file, paths.resolve(src.images, root), tmp, cfg, params.seed, rejects, lvis_fields
                )
                if not records:
                    empty.append(f"preprocess.splits.{name}: no record survived: {_reasons(stats, ann_file)}")
                    continue  # the other splits' rejects belong in the file too
                write_jsonl(tmp / f"{name}.jsonl", records)
                if lvis_fields:
                    write_json(paths.lvis_fields_file(tmp, name), lvis_fields, indent=None)
                metrics["splits"][name] = stats.as_dict()
            if empty:
                raise CocoFormatError(
                    "; ".join(empty) + f"; the rejects are listed in {_shown(out_dir / 'rejects.jsonl', root)}"
                )
            write_jsonl(tmp / "rejects.jsonl", rejects)
    except Exception as exc:
        # the half-built folder is gone; only the rejects of this run go where the output goes
        try:
            write_jsonl(out_dir / "rejects.jsonl", rejects)
        except OSError as why:  # the original error stays the one raised
            exc.add_note(f"the rejects could not be written to {out_dir / 'rejects.jsonl'}: {why}")
        raise
    totals: Counter = Counter()
    for s in metrics["splits"].values():
        totals.update({k: s[k] for k in TOTAL_METRICS if k != "rejects"})
        totals.update({f"rejects.{k}": v for k, v in s["rejects"].items()})
    metrics["total"] = dict(sorted(totals.items()))
    metrics["total"]["rejects"] = len(rejects)
    # DVC metrics: the five totals only, so `dvc exp show` opens on what matters; the per-split and
    # per-reason counts (dozens of columns) go to a plain output beside it
    write_json(paths.metrics_dir(root) / "preprocess.json", {k: metrics["total"][k] for k in TOTAL_METRICS})
    write_json(paths.resolve(PREPROCESS_COUNTS, root), metrics)
    return metrics
