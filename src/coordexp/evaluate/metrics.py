"""Detection metrics for coord-token answers: COCO mAP (pycocotools), LVIS federated AP (the ``lvis`` package),
Hungarian F1, summaries.

Inputs are data-contract records (:mod:`coordexp.core.contract`)::

    GT record:   {"id": int, "images": [path], "width": W, "height": H,
                  "objects": [{"desc": str, "bbox_2d" | "poly" | "line": [coords]}]}
    prediction:  the same shape (``images`` optional); each object may carry "score"
                 (default 1.0) and "score_status" (see :mod:`coordexp.evaluate.scoring`).

Coords are ``"<|coord_k|>"`` strings, bin integers, or continuous bins (floats: a coordinate read from the
distribution, :mod:`coordexp.evaluate.readout`); they become pixels through
:func:`coordexp.core.codec.decode_xy` only.

Choices (each one a reasonable convention, written down so numbers are comparable):

* Categories are the sorted set of GT ``desc`` strings, ids from 1. A predicted ``desc`` that
  is not a GT category is dropped from the COCO results and counted (``unknown_desc``):
  COCO has no way to score it, and silently mapping it would hide a vocabulary drift.
* bbox mAP scores every object by its enclosing box (a ``poly`` or ``line`` by the min/max
  of its points). An extent under 1 pixel (a horizontal line, a collapsed box) is widened to
  1 pixel about its centre, so its IoU is defined and a perfect line prediction scores 1.
* segm mAP uses polygons only: GT and predicted ``poly`` objects. Boxes carry no shape beyond
  bbox mAP, and lines have no area, so mixing them in would just repeat bbox mAP. Pass
  ``box_as_polygon=True`` to also count boxes as 4-corner polygons.
* LVIS AP (:func:`lvis_map`) scores the same boxes as COCO mAP with the ``lvis`` package's federated rules
  (300 detections per image; detections of categories neither present nor checked absent in an image are not
  scored); its categories are the LVIS file's, by name, so a description outside them is dropped and counted.
* Predictions for images not in the GT are dropped and counted (``unknown_image``);
  non-finite scores are replaced by 0.0 (COCO sorts by score) and counted in
  :func:`summarize` (``nan_scores``).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from scipy.optimize import linear_sum_assignment

from coordexp.core.codec import decode_xy
from coordexp.core.errors import UserError
from coordexp.core.geometry import enclosing_box, geometry_of, polygon_area
from coordexp.evaluate.parse import ParseResult

IouType = Literal["bbox", "segm"]
STAT_NAMES: tuple[str, ...] = (
    "mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
    "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large",
)  # fmt: skip
"""Names of ``COCOeval.stats`` in order."""

HEADLINE_METRICS: tuple[str, ...] = (
    "bbox_mAP",
    "bbox_mAP50",
    "bbox_mAP75",
    "segm_mAP",
    "f1_at_0.5",
    "f1_at_0.3",
    "parse_rate",
    "nan_scores",
)
"""The metrics of ``eval.json`` that the stage prints and tables list first (the same names in MLflow)."""


# ----------------------------------------------------------------------------------------
# Geometry


def object_pixels(obj: Mapping[str, Any], width: float, height: float) -> tuple[str, list[float]]:
    """``(kind, [x, y, x, y, ...])`` in pixels, via the codec."""
    kind, coords = geometry_of(obj)
    return kind, decode_xy([c if isinstance(c, str) else float(c) for c in coords], width, height)


def _segm_polygon(kind: str, pts: list[float], box_as_polygon: bool) -> list[float] | None:
    if kind == "poly":
        return pts
    if kind == "bbox_2d" and box_as_polygon:
        x1, y1, x2, y2 = enclosing_box(pts)
        return [x1, y1, x2, y1, x2, y2, x1, y2]
    return None


# ----------------------------------------------------------------------------------------
# COCO conversion


def categories_from_records(records: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """COCO categories: the sorted set of GT ``desc`` strings, ids from 1."""
    names = sorted({o["desc"] for r in records for o in r["objects"]})
    return [{"id": i, "name": n} for i, n in enumerate(names, start=1)]


def to_coco_gt(
    records: Sequence[Mapping[str, Any]], iou_type: IouType = "bbox", *, box_as_polygon: bool = False
) -> dict[str, Any]:
    """A COCO ground-truth dict (images, annotations, categories) from contract records.

    For ``iou_type="segm"`` only polygon objects (and boxes, with ``box_as_polygon``) become
    annotations; images and categories are the same as for bbox so the two are comparable.
    """
    cats = categories_from_records(records)
    cat_id = {c["name"]: c["id"] for c in cats}
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    for r in records:
        w, h = r["width"], r["height"]
        paths = r.get("images") or [""]
        images.append({"id": int(r["id"]), "width": w, "height": h, "file_name": str(paths[0])})
        for o in r["objects"]:
            kind, pts = object_pixels(o, w, h)
            x1, y1, x2, y2 = enclosing_box(pts)
            ann: dict[str, Any] = {
                "id": len(anns) + 1,  # COCOeval treats gt id 0 as "unmatched"
                "image_id": int(r["id"]),
                "category_id": cat_id[o["desc"]],
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "iscrowd": 0,
            }
            if iou_type == "segm":
                poly = _segm_polygon(kind, pts, box_as_polygon)
                if poly is None:
                    continue
                ann["segmentation"] = [poly]
                ann["area"] = polygon_area(poly)
            else:
                ann["area"] = polygon_area(pts) if kind == "poly" else (x2 - x1) * (y2 - y1)
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": cats}


@dataclass
class CocoResults:
    """COCO results plus what had to be left out of them, and why."""

    results: list[dict[str, Any]] = field(default_factory=list)
    n_objects: int = 0
    """Predicted objects seen (before any dropping)."""
    unknown_desc: int = 0
    unknown_desc_names: Counter[str] = field(default_factory=Counter)
    unknown_image: int = 0
    not_scored_geometry: int = 0
    """Objects whose geometry does not take part in this iou_type (segm: non-polygons)."""
    nonfinite_scores: int = 0


def build_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    iou_type: IouType = "bbox",
    *,
    box_as_polygon: bool = False,
) -> CocoResults:
    """COCO detection results from prediction records, against the categories of ``gt``."""
    cat_id = {c["name"]: c["id"] for c in gt["categories"]}
    img_ids = {im["id"] for im in gt["images"]}
    out = CocoResults()
    for p in predictions:
        w, h = p["width"], p["height"]
        for o in p["objects"]:
            out.n_objects += 1
            if int(p["id"]) not in img_ids:
                out.unknown_image += 1
                continue
            if o["desc"] not in cat_id:
                out.unknown_desc += 1
                out.unknown_desc_names[o["desc"]] += 1
                continue
            score = float(o.get("score", 1.0))
            if not math.isfinite(score):
                out.nonfinite_scores += 1
                score = 0.0
            kind, pts = object_pixels(o, w, h)
            res: dict[str, Any] = {"image_id": int(p["id"]), "category_id": cat_id[o["desc"]], "score": score}
            if iou_type == "segm":
                poly = _segm_polygon(kind, pts, box_as_polygon)
                if poly is None:
                    out.not_scored_geometry += 1
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects([poly], int(h), int(w)))
                res["segmentation"] = {"size": [int(x) for x in rle["size"]], "counts": rle["counts"].decode("ascii")}
            else:
                x1, y1, x2, y2 = enclosing_box(pts)
                res["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            out.results.append(res)
    return out


def to_coco_results(
    predictions: Sequence[Mapping[str, Any]],
    gt: Mapping[str, Any],
    iou_type: IouType = "bbox",
    *,
    box_as_polygon: bool = False,
) -> list[dict[str, Any]]:
    """Just the result list of :func:`build_coco_results` (JSON-serialisable)."""
    return build_coco_results(predictions, gt, iou_type, box_as_polygon=box_as_polygon).results


# ----------------------------------------------------------------------------------------
# COCO mAP


@dataclass
class CocoMetrics:
    """pycocotools' numbers, plus per-class AP and PR curves in plottable form.

    ``stats`` is ``COCOeval.stats`` verbatim (``-1`` where undefined). The named fields
    replace ``-1`` by NaN, except ``mAP/mAP50/mAP75`` which are 0.0 when GT exists but there
    are no usable predictions (NaN only when there is no GT at all). ``per_class_ap`` maps
    category name -> AP@[.5:.95] for classes with at least one GT object (others are
    skipped, so no NaN). ``pr_curves_50[name]`` is the 101-point interpolated precision at
    IoU 0.5 over ``recall_thresholds`` (area "all", maxDets 100). ``precision`` [T,R,K,A,M]
    and ``recall`` [T,K,A,M] are COCOeval's raw arrays.
    """

    iou_type: str
    stats: tuple[float, ...]
    mAP: float
    mAP50: float
    mAP75: float
    named: dict[str, float]
    per_class_ap: dict[str, float]
    per_class_ap50: dict[str, float]
    recall_thresholds: list[float]
    iou_thresholds: list[float]
    pr_curves_50: dict[str, list[float]]
    precision: np.ndarray
    recall: np.ndarray
    n_gt: int
    n_results: int

    def summary(self) -> dict[str, Any]:
        """JSON-ready scalars (NaN -> None) for a metrics file."""

        def clean(v: float) -> float | None:
            return None if not math.isfinite(v) else float(v)

        d: dict[str, Any] = {k: clean(v) for k, v in self.named.items()}
        d.update(mAP=clean(self.mAP), mAP50=clean(self.mAP50), mAP75=clean(self.mAP75))
        d["per_class_ap"] = {k: clean(v) for k, v in self.per_class_ap.items()}
        d["per_class_ap50"] = {k: clean(v) for k, v in self.per_class_ap50.items()}
        d["n_gt"], d["n_results"] = self.n_gt, self.n_results
        return d


def _quiet_coco(dataset: Mapping[str, Any]) -> COCO:
    """A pycocotools ``COCO`` over ``dataset`` that leaves the caller's dicts alone: pycocotools sets keys on the
    annotation dicts it holds (``ignore``; a segmentation becomes its RLE), so each annotation is a shallow copy
    (nothing nested is changed in place), which is what a deep copy would protect at a tenth of its cost."""
    c = COCO()
    c.dataset = {**dataset, "annotations": [dict(a) for a in dataset.get("annotations", [])]}
    with contextlib.redirect_stdout(io.StringIO()):
        c.createIndex()
    return c


def _cocoeval(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou_type: IouType, *, all_areas: bool
) -> COCOeval:
    """pycocotools' ``COCOeval`` of ``results`` against ``gt``, evaluated and accumulated.

    Handles what ``loadRes`` does not: an empty result list (evaluated as an empty detection set, so mAP is
    0.0 rather than a crash). ``all_areas=False`` keeps only the ``all`` area range: ``evaluateImg`` runs
    once per image and class instead of four times, and the ``all`` slice of ``precision`` is the same."""
    coco_gt = _quiet_coco(gt)
    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes([dict(r) for r in results])  # loadRes sets keys on each result dict
        else:
            coco_dt = _quiet_coco({"images": gt["images"], "categories": gt["categories"], "annotations": []})
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        if not all_areas:
            keep = ev.params.areaRngLbl.index("all")
            ev.params.areaRng, ev.params.areaRngLbl = [ev.params.areaRng[keep]], ["all"]
        ev.evaluate()
        ev.accumulate()
    return ev


def _headline(s: float, n_gt: int) -> float:
    """A headline AP: pycocotools' ``-1`` (undefined) is 0.0 when there is GT to find, NaN when there is none."""
    if s != -1:
        return s
    return 0.0 if n_gt else math.nan


def coco_map(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], iou_type: IouType = "bbox", *, all_areas: bool = True
) -> CocoMetrics:
    """COCO mAP of ``results`` against ``gt`` with pycocotools' ``COCOeval`` (``stats`` from its ``summarize``).

    ``all_areas=False`` evaluates the ``all`` area range only, a third of the time: ``mAP``, ``mAP50``,
    ``mAP75``, the per-class figures and the curves are the same numbers, and the small / medium / large
    entries are undefined (-1 in ``stats``, NaN in ``named``). The evaluate stage reports nothing by area and
    measures one generation under every readout and score definition, so it evaluates that way."""
    ev = _cocoeval(gt, results, iou_type, all_areas=all_areas)
    with contextlib.redirect_stdout(io.StringIO()):
        ev.summarize()
    stats = tuple(float(s) for s in ev.stats)
    precision = np.asarray(ev.eval["precision"])
    recall = np.asarray(ev.eval["recall"])
    n_gt = len(gt["annotations"])
    named = {n: (math.nan if s == -1 else s) for n, s in zip(STAT_NAMES, stats)}

    def head(s: float) -> float:
        return _headline(s, n_gt)

    id_to_name = {c["id"]: c["name"] for c in gt["categories"]}
    per_ap: dict[str, float] = {}
    per_ap50: dict[str, float] = {}
    curves: dict[str, list[float]] = {}
    for ki, cid in enumerate(ev.params.catIds):
        name = id_to_name[cid]
        pr = precision[:, :, ki, 0, -1]
        if not np.any(pr > -1):
            continue  # no GT of this class: AP undefined, skipped
        per_ap[name] = float(np.mean(pr[pr > -1]))
        p50 = pr[0]
        per_ap50[name] = float(np.mean(p50[p50 > -1])) if np.any(p50 > -1) else 0.0
        curves[name] = [float(v) for v in p50]
    return CocoMetrics(
        iou_type=iou_type,
        stats=stats,
        mAP=head(stats[0]),
        mAP50=head(stats[1]),
        mAP75=head(stats[2]),
        named=named,
        per_class_ap=per_ap,
        per_class_ap50=per_ap50,
        recall_thresholds=[float(v) for v in ev.params.recThrs],
        iou_thresholds=[float(v) for v in ev.params.iouThrs],
        pr_curves_50=curves,
        precision=precision,
        recall=recall,
        n_gt=n_gt,
        n_results=len(results),
    )


# ----------------------------------------------------------------------------------------
# LVIS federated AP


LVIS_STAT_NAMES: tuple[str, ...] = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
"""The bbox AP figures of ``LVISEval.results`` reported as ``lvis_<name>`` (plus ``lvis_AR``, its ``AR@300``)."""


class LvisInputError(UserError, ValueError):
    """The LVIS fields do not fit the evaluated records (an image without its federated lists)."""


def to_lvis_gt(records: Sequence[Mapping[str, Any]], lvis_fields: Mapping[str, Any]) -> dict[str, Any]:
    """An LVIS ground-truth dict from contract records and their split's ``<split>.lvis.json``
    (:func:`coordexp.preprocess.lvis.sidecar`).

    The boxes and areas are :func:`to_coco_gt`'s (so COCO and LVIS score the same ground truth); the categories
    are the LVIS file's own, all of them, with their ids and frequency groups (a description is its category's
    name); each image carries its ``neg_category_ids`` and ``not_exhaustive_category_ids``."""
    cats = [dict(c) for c in lvis_fields["categories"]]
    cat_id = {c["name"]: c["id"] for c in cats}
    lists = {int(im["id"]): im for im in lvis_fields["images"]}
    coco = to_coco_gt(records, "bbox")
    local = {c["id"]: c["name"] for c in coco["categories"]}
    unknown = sorted(set(local.values()) - set(cat_id))
    if unknown:
        raise LvisInputError(f"ground-truth descriptions {unknown[:5]} are not categories of the LVIS file")
    images = []
    for im in coco["images"]:
        fed = lists.get(im["id"])
        if fed is None:
            raise LvisInputError(
                f"image id {im['id']} has no neg_category_ids / not_exhaustive_category_ids in the LVIS fields; "
                "rerun `dvc repro preprocess` so that the JSONL and its .lvis.json come from one run"
            )
        images.append(
            {
                **im,
                "neg_category_ids": fed["neg_category_ids"],
                "not_exhaustive_category_ids": fed["not_exhaustive_category_ids"],
            }
        )
    anns = [{**a, "category_id": cat_id[local[a["category_id"]]]} for a in coco["annotations"]]
    return {"images": images, "annotations": anns, "categories": cats}


@contextlib.contextmanager
def lvis_numpy_compat() -> Iterator[None]:
    """``np.float`` while the ``lvis`` package runs: its last release (0.5.3) casts with that alias of ``float``,
    which NumPy 1.24 removed; the alias is taken away again afterwards (left alone where NumPy has it)."""
    added = not hasattr(np, "float")
    if added:
        np.float = float  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if added:
            del np.float  # type: ignore[attr-defined]


def lvis_map(gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """bbox AP of ``results`` (COCO results, as :func:`build_coco_results` makes against ``gt``) under the LVIS
    federated protocol: the ``lvis`` package's ``LVISEval`` on ``gt`` (:func:`to_lvis_gt`), which keeps the 300
    best detections of each image and ignores those of categories neither present nor checked absent there.

    Returns ``LVISEval.results`` under :data:`LVIS_STAT_NAMES` and ``AR`` (``AR@300``): the package's ``-1``
    (no ground truth in that group or area range) is NaN, except for ``AP``, ``AP50`` and ``AP75``, which are
    0.0 when there is ground truth and nothing usable was detected, as :func:`coco_map` reports. The package
    reads files, so ``gt`` and ``results`` are written to a temporary folder first."""
    from lvis import LVISEval  # the package draws in matplotlib and OpenCV: loaded when LVIS is asked for

    results = [dict(r) for r in results]
    if not results:
        # LVISResults cannot read an empty list; a detection of a category the ground truth does not have is
        # never loaded by LVISEval (it evaluates the ground truth's categories), so every AP is the empty set's
        absent = max((c["id"] for c in gt["categories"]), default=0) + 1
        first = gt["images"][0]["id"] if gt["images"] else 0
        results = [{"image_id": first, "category_id": absent, "bbox": [0.0, 0.0, 1.0, 1.0], "score": 0.0}]
    with tempfile.TemporaryDirectory(prefix="coordexp-lvis-") as tmp:
        gt_path, res_path = Path(tmp) / "lvis_gt.json", Path(tmp) / "lvis_results.json"
        gt_path.write_text(json.dumps(gt), encoding="utf-8")
        res_path.write_text(json.dumps(results), encoding="utf-8")
        ev = LVISEval(str(gt_path), str(res_path), iou_type="bbox")
        with lvis_numpy_compat():
            ev.run()
    n_gt = len(gt["annotations"])
    out: dict[str, float] = {}
    for name in LVIS_STAT_NAMES:
        v = float(ev.results[name])
        out[name] = _headline(v, n_gt) if name in ("AP", "AP50", "AP75") else (math.nan if v == -1 else v)
    ar = float(ev.results[f"AR@{ev.params.max_dets}"])
    out["AR"] = math.nan if ar == -1 else ar
    return out


# ----------------------------------------------------------------------------------------
# Hungarian F1

BoxLike = tuple[str, Sequence[float]] | Mapping[str, Any]


def _as_desc_box(b: BoxLike) -> tuple[str, tuple[float, float, float, float]]:
    if isinstance(b, Mapping):
        desc, box = b["desc"], b["bbox"]
    else:
        desc, box = b
    x1, y1, x2, y2 = (float(v) for v in box)
    return str(desc), (x1, y1, x2, y2)


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes ``a`` [N,4] and ``b`` [M,4]; 0 where the union is empty."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.clip(np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1]), 0, None)
    inter = iw * ih
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def match_image(
    gt: Sequence[BoxLike], pred: Sequence[BoxLike], iou_thr: float, match_desc: bool = True
) -> list[tuple[int, int, float]]:
    """One-to-one matches ``(gt_index, pred_index, iou)`` for one image.

    A pair is eligible when IoU >= ``iou_thr`` (and descs are equal, with ``match_desc``).
    ``linear_sum_assignment`` maximises ``sum(eligible * (B + IoU))`` with ``B`` larger than
    any possible IoU sum, so the matching has the most pairs possible and, among those, the
    highest total IoU (matching on raw IoU alone can trade two matches for one better one).
    """
    g = [_as_desc_box(x) for x in gt]
    p = [_as_desc_box(x) for x in pred]
    if not g or not p:
        return []
    iou = iou_matrix(np.array([b for _, b in g]), np.array([b for _, b in p]))
    ok = iou >= iou_thr
    if match_desc:
        ok &= np.array([[gd == pd for pd, _ in p] for gd, _ in g])
    big = min(len(g), len(p)) + 1.0
    weight = np.where(ok, big + iou, 0.0)
    rows, cols = linear_sum_assignment(weight, maximize=True)
    return [(int(r), int(c), float(iou[r, c])) for r, c in zip(rows, cols) if ok[r, c]]


def _aligned(
    gt: Sequence[Sequence[BoxLike]] | Mapping[Any, Sequence[BoxLike]],
    pred: Sequence[Sequence[BoxLike]] | Mapping[Any, Sequence[BoxLike]],
) -> list[tuple[Sequence[BoxLike], Sequence[BoxLike]]]:
    if isinstance(gt, Mapping) or isinstance(pred, Mapping):
        if not (isinstance(gt, Mapping) and isinstance(pred, Mapping)):
            raise TypeError("gt and pred must both be sequences or both mappings of image id")
        keys = list(dict.fromkeys([*gt.keys(), *pred.keys()]))
        return [(gt.get(k, []), pred.get(k, [])) for k in keys]
    if len(gt) != len(pred):
        raise ValueError(f"{len(gt)} GT images but {len(pred)} prediction images")
    return list(zip(gt, pred))


def f1_at_iou(
    gt_boxes_per_image: Sequence[Sequence[BoxLike]] | Mapping[Any, Sequence[BoxLike]],
    pred_boxes_per_image: Sequence[Sequence[BoxLike]] | Mapping[Any, Sequence[BoxLike]],
    iou_thr: float = 0.5,
    match_desc: bool = True,
) -> dict[str, float]:
    """Precision, recall and F1 of one-to-one matches pooled over images.

    Each box is ``(desc, (x1, y1, x2, y2))`` or ``{"desc", "bbox": xyxy}`` in pixels; images
    are aligned by position (sequences) or by key (mappings; a missing key is an empty
    image). Scores are ignored: every prediction counts. Empty denominators give 0.0 except
    that no GT and no predictions gives precision = recall = F1 = 1.0 (nothing to find,
    nothing wrong). See :func:`match_image` for the matching.
    """
    tp = fp = fn = 0
    for g, p in _aligned(gt_boxes_per_image, pred_boxes_per_image):
        m = len(match_image(g, p, iou_thr, match_desc))
        tp += m
        fp += len(p) - m
        fn += len(g) - m
    if tp + fp + fn == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 0, "fp": 0, "fn": 0}
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def boxes_from_records(records: Sequence[Mapping[str, Any]]) -> dict[int, list[tuple[str, tuple[float, ...]]]]:
    """``{image id: [(desc, enclosing xyxy pixel box)]}`` for :func:`f1_at_iou`."""
    out: dict[int, list[tuple[str, tuple[float, ...]]]] = {}
    for r in records:
        lst = out.setdefault(int(r["id"]), [])
        for o in r["objects"]:
            _, pts = object_pixels(o, r["width"], r["height"])
            lst.append((o["desc"], enclosing_box(pts)))
    return out


# ----------------------------------------------------------------------------------------
# Summary


def duplicate_count(boxes: Sequence[BoxLike], iou_thr: float = 0.9) -> int:
    """Objects with the same desc and IoU > ``iou_thr`` to an *earlier* object of the list."""
    items = [_as_desc_box(b) for b in boxes]
    if len(items) < 2:
        return 0
    iou = iou_matrix(np.array([b for _, b in items]), np.array([b for _, b in items]))
    n = 0
    for j in range(1, len(items)):
        if any(items[i][0] == items[j][0] and iou[i, j] > iou_thr for i in range(j)):
            n += 1
    return n


def summarize(
    parses: Sequence[ParseResult] | None,
    predictions: Sequence[Mapping[str, Any]],
    records: Sequence[Mapping[str, Any]],
    *,
    dup_iou: float = 0.9,
) -> dict[str, Any]:
    """Answer-level health numbers for a run.

    * ``parse_rate``: fraction of answers with ``ParseResult.ok`` (complete JSON, every
      object valid, nothing else); ``salvage_rate``: fraction not ok that still gave objects;
      ``complete_rate``: the JSON object was closed; ``problem_counts``: problems by kind.
      These are None when ``parses`` is None.
    * ``pred_objects_per_image`` / ``gt_objects_per_image``: means over the GT images
      (an image with no prediction record counts 0 predictions).
    * ``duplicate_rate``: predicted objects with the same desc and IoU > ``dup_iou`` to an
      earlier prediction of the same image, over all predicted objects.
    * ``nan_scores``: objects whose score is not finite or whose ``score_status`` is
      ``"nonfinite"``; ``unscored``: ``score_status == "unscored"``.
    """
    n_img = len(records)
    pred_by_id = {int(p["id"]): p for p in predictions}
    n_pred = sum(len(p["objects"]) for p in predictions)
    n_pred_on_gt = sum(len(pred_by_id[int(r["id"])]["objects"]) for r in records if int(r["id"]) in pred_by_id)
    n_gt = sum(len(r["objects"]) for r in records)
    dups = 0
    nan_scores = unscored = 0
    for p in predictions:
        boxes = []
        for o in p["objects"]:
            _, pts = object_pixels(o, p["width"], p["height"])
            boxes.append((o["desc"], enclosing_box(pts)))
            s = o.get("score", 1.0)
            status = o.get("score_status", "ok")
            if status == "nonfinite" or not (isinstance(s, (int, float)) and math.isfinite(s)):
                nan_scores += 1
            elif status == "unscored":
                unscored += 1
        dups += duplicate_count(boxes, dup_iou)
    out: dict[str, Any] = {
        "n_images": n_img,
        "n_gt_objects": n_gt,
        "n_pred_objects": n_pred,
        "gt_objects_per_image": n_gt / n_img if n_img else 0.0,
        "pred_objects_per_image": n_pred_on_gt / n_img if n_img else 0.0,
        "duplicate_rate": dups / n_pred if n_pred else 0.0,
        "n_duplicates": dups,
        "nan_scores": nan_scores,
        "unscored": unscored,
        "parse_rate": None,
        "salvage_rate": None,
        "complete_rate": None,
        "problem_counts": None,
    }
    if parses is not None:
        n = len(parses)
        counts: Counter[str] = Counter()
        for pr in parses:
            counts.update(pr.problem_counts())
        out.update(
            parse_rate=sum(pr.ok for pr in parses) / n if n else 0.0,
            salvage_rate=sum(pr.salvaged for pr in parses) / n if n else 0.0,
            complete_rate=sum(pr.complete for pr in parses) / n if n else 0.0,
            problem_counts=dict(sorted(counts.items())),
            rejected_objects=sum(pr.n_rejected for pr in parses),
        )
    return out
