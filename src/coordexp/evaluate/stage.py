"""The ``evaluate`` stage: generate on the val split, parse, score, and measure against pycocotools.

Object score (what ranks detections for AP): by default the geometric mean of the probabilities the model
gave to the object's generated coord tokens, ``exp(mean_i log p_i)``; see
:mod:`coordexp.evaluate.scoring` (``evaluate.score`` picks another definition). Coordinates are read from the
coord distribution with ``evaluate.readout`` (:mod:`coordexp.evaluate.readout`). One generation is measured
under every readout (``eval.json`` ``readouts``) and every score definition (``scores``), and the headline
score's calibration is measured (``calibration``, :mod:`coordexp.evaluate.calibration`). Checkpoints are compared by ``bbox_mAP`` (never by token accuracy).
The evaluated checkpoint becomes the run's MLflow model (:mod:`coordexp.evaluate.mlflow_model`), so what was
measured is what ``mlflow models serve`` answers with; it touches no DVC output.

With ``evaluate.metrics: lvis`` the same answers are also scored by the LVIS federated protocol (``lvis_AP``,
``lvis_APr`` ..., :func:`coordexp.evaluate.metrics.lvis_map`) against the split's ``<split>.lvis.json``; the
COCO keys stay, so runs on COCO and LVIS data share one table, and ``bbox_mAP`` still picks the checkpoint.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import mlflow
from tqdm import tqdm

from coordexp.core import imaging, paths
from coordexp.core.checkpoint import FINAL_DIR, SWIFT_DIR, checkpoint_step, list_checkpoints
from coordexp.core.config import Params
from coordexp.core.contract import image_path, read_jsonl, record_to_json
from coordexp.core.errors import MissingInputError, StageError
from coordexp.core.geometry import geometry_of
from coordexp.core.io import write_json, write_jsonl
from coordexp.evaluate import grammar as grammar_mod
from coordexp.evaluate import mlflow_model
from coordexp.evaluate.calibration import calibration_report
from coordexp.evaluate.generate import Detector
from coordexp.evaluate.grammar import Grammar
from coordexp.evaluate.metrics import (
    boxes_from_records,
    build_coco_results,
    coco_map,
    f1_at_iou,
    lvis_map,
    summarize,
    to_coco_gt,
    to_lvis_gt,
)
from coordexp.evaluate.readout import READOUTS
from coordexp.evaluate.scoring import SCORES
from coordexp.pipeline import tracking

SECTIONS: tuple[str, ...] = ("readouts", "scores", "calibration")
"""The nested sections of ``eval.json`` whose numbers MLflow gets under flattened names (``readouts/median/bbox_mAP50``)."""


def predict_records(
    detector: Any,
    records: list[Any],
    image_root: Path,
    *,
    batch_size: int,
    max_new_tokens: int,
    desc: str = "evaluate",
    readout: str = "argmax",
    score: str = "coord_geomean",
    grammar: Grammar | None = None,
) -> tuple[list[dict[str, Any]], list[Any], list[dict[str, Any]]]:
    """(prediction records, parse results, raw rows) for contract records, batch by batch.

    Objects carry the ``readout``'s coordinates and the ``score`` definition's score, and every readout's
    coordinates and every score under ``readouts`` and ``scores`` (:meth:`Generation.prediction`). With a
    ``grammar`` every answer is decoded under it (a fresh processor per batch)."""
    preds, parses, raw = [], [], []
    bar = tqdm(total=len(records), desc=desc, unit="img", disable=None)
    for i in range(0, len(records), batch_size):
        chunk = records[i : i + batch_size]
        procs = [grammar.processor(max_new_tokens)] if grammar is not None else None
        gens = detector.generate(detector.rows(chunk, image_root), max_new_tokens, logits_processors=procs)
        for rec, gen in zip(chunk, gens):
            pred, parse = gen.prediction(rec.id, rec.width, rec.height, readout=readout, score=score)
            preds.append(pred)
            parses.append(parse)
            raw.append(
                {
                    "id": rec.id,
                    "text": gen.text,
                    "n_tokens": gen.n_tokens,
                    "hit_limit": gen.hit_limit,
                    "objects": pred["objects"],
                    "problems": [p.__dict__ for p in parse.problems],
                    "problem_counts": parse.problem_counts(),
                    "ok": parse.ok,
                }
            )
        bar.update(len(chunk))
    bar.close()
    return preds, parses, raw


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _variant(
    preds: list[dict[str, Any]], *, readout: str | None = None, score: str | None = None
) -> list[dict[str, Any]]:
    """The predictions with each object's geometry replaced by another readout's, or its score by another
    definition's (what :meth:`Generation.prediction` stored under ``readouts`` / ``scores``)."""
    out = []
    for p in preds:
        objs = []
        for o in p["objects"]:
            o = dict(o)
            if readout is not None and readout in o.get("readouts", {}):
                o[geometry_of(o)[0]] = o["readouts"][readout]
            if score is not None and score in o.get("scores", {}):
                o["score"] = o["scores"][score]
            objs.append(o)
        out.append({**p, "objects": objs})
    return out


def _box_metrics(
    gt_box: dict[str, Any], preds: list[dict[str, Any]], gt_boxes: dict[int, Any], *, f1: bool = True
) -> dict[str, Any]:
    """bbox mAP, mAP50, mAP75 and, with ``f1``, ``f1_at_0.5`` of one variant of the predictions."""
    box = coco_map(gt_box, build_coco_results(preds, gt_box, "bbox").results, "bbox", all_areas=False)
    out = {"bbox_mAP": box.mAP, "bbox_mAP50": box.mAP50, "bbox_mAP75": box.mAP75}
    if f1:
        out["f1_at_0.5"] = f1_at_iou(gt_boxes, boxes_from_records(preds), 0.5)["f1"]
    return out


def _clean_tree(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _clean_tree(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean_tree(x) for x in v]
    return _clean(v)


def compute_metrics(
    records: list[dict[str, Any]],
    preds: list[dict[str, Any]],
    parses: list[Any],
    *,
    readout: str = "argmax",
    score: str = "coord_geomean",
    decoding: str = "free",
    calibration_bins: int = 10,
    calibration_fit: str = "isotonic",
    lvis_fields: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The metrics of ``eval.json``, named as MLflow logs them (``f1_at_0.5``: MLflow forbids ``@``),
    so ``dvc metrics``, the MLflow UI and the reports show one name for one number.

    ``preds`` hold the headline (``readout``, ``score``) coordinates and scores, which give the headline
    keys; ``readouts`` and ``scores`` re-measure the same answers under every readout (scored by ``score``)
    and every score definition (coordinates by ``readout``), and ``calibration`` is the headline score's.
    The names ``readout``, ``score`` and ``decoding`` say what was run. With ``lvis_fields`` (the split's
    ``<split>.lvis.json``) the headline answers are also scored by the LVIS protocol: ``lvis_AP`` ... and
    ``lvis_unknown_desc``, the predicted objects whose description is no LVIS category (not scored)."""
    gt_box = to_coco_gt(records, "bbox")
    box = coco_map(gt_box, build_coco_results(preds, gt_box, "bbox").results, "bbox", all_areas=False)
    gt_seg = to_coco_gt(records, "segm")
    seg = coco_map(gt_seg, build_coco_results(preds, gt_seg, "segm").results, "segm", all_areas=False)
    gt_boxes, pred_boxes = boxes_from_records(records), boxes_from_records(preds)
    f5 = f1_at_iou(gt_boxes, pred_boxes, 0.5)
    f3 = f1_at_iou(gt_boxes, pred_boxes, 0.3)
    health = summarize(parses, preds, records)
    m: dict[str, Any] = {
        "bbox_mAP": box.mAP,
        "bbox_mAP50": box.mAP50,
        "bbox_mAP75": box.mAP75,
        "segm_mAP": seg.mAP,
        "segm_mAP50": seg.mAP50,
        "f1_at_0.5": f5["f1"],
        "precision_at_0.5": f5["precision"],
        "recall_at_0.5": f5["recall"],
        "f1_at_0.3": f3["f1"],
        "precision_at_0.3": f3["precision"],
        "recall_at_0.3": f3["recall"],
        "parse_rate": health["parse_rate"],
        "salvage_rate": health["salvage_rate"],
        "nan_scores": health["nan_scores"],
        "duplicate_rate": health["duplicate_rate"],
        "pred_objects_per_image": health["pred_objects_per_image"],
        "gt_objects_per_image": health["gt_objects_per_image"],
        "problem_counts": health["problem_counts"],
        "per_class_ap": box.summary()["per_class_ap"],
        "readout": readout,
        "score": score,
        "decoding": decoding,
    }
    # the headline readout and score are measured above already; a readout moves boxes, so its F1 is its
    # own, while a score only reorders them (F1 does not look at scores)
    head = {k: m[k] for k in ("bbox_mAP", "bbox_mAP50", "bbox_mAP75", "f1_at_0.5")}
    m["readouts"] = {
        name: head if name == readout else _box_metrics(gt_box, _variant(preds, readout=name), gt_boxes)
        for name in READOUTS
    }
    m["scores"] = {}
    for name in SCORES:
        sm = head if name == score else _box_metrics(gt_box, _variant(preds, score=name), gt_boxes, f1=False)
        m["scores"][name] = {"bbox_mAP": sm["bbox_mAP"], "bbox_mAP50": sm["bbox_mAP50"]}
    m["calibration"] = calibration_report(records, preds, n_bins=calibration_bins, fit=calibration_fit)
    if lvis_fields is not None:
        gt_lvis = to_lvis_gt(records, lvis_fields)
        res = build_coco_results(preds, gt_lvis, "bbox")
        m.update({f"lvis_{k}": v for k, v in lvis_map(gt_lvis, res.results).items()})
        m["lvis_unknown_desc"] = res.unknown_desc
    return {k: _clean_tree(v) for k, v in m.items()}


def mlflow_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of ``eval.json`` for MLflow: top-level scalars as they are, and every scalar of the
    :data:`SECTIONS` under its path joined by ``/`` (``readouts/median/bbox_mAP50``, ``calibration/ece``);
    lists (the reliability bins) stay in the JSON."""
    out: dict[str, float] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}/{k}", x)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix] = float(v)

    for k, v in metrics.items():
        if k in SECTIONS:
            walk(k, v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def checkpoints_to_evaluate(params: Params, root: Path) -> list[tuple[int | None, Path]]:
    out = paths.resolve(params.train.out_dir, root)
    if params.evaluate.checkpoints == "last":
        return [(None, out / FINAL_DIR)]
    ckpts = list_checkpoints(out / SWIFT_DIR)
    if not ckpts:
        raise MissingInputError(f"{out / SWIFT_DIR}: no checkpoint-* folders; run `dvc repro train` first")
    return [(checkpoint_step(p), p) for p in ckpts]


def load_lvis_fields(params: Params, root: Path) -> dict[str, Any] | None:
    """The evaluated split's ``<split>.lvis.json`` when ``evaluate.metrics`` is ``lvis`` (None for ``coco``)."""
    if params.evaluate.metrics != "lvis":
        return None
    path = paths.lvis_fields_file(paths.resolve(params.preprocess.out_dir, root), params.evaluate.split)
    if not path.is_file():
        raise MissingInputError(
            f"evaluate.metrics is lvis but {path} does not exist: preprocess writes it only for an LVIS file "
            f"(per-image neg_category_ids / not_exhaustive_category_ids, category frequency); point "
            f"preprocess.splits.{params.evaluate.split}.annotations at the LVIS annotations and rerun "
            "`dvc repro preprocess`, or set evaluate.metrics: coco"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def evaluate_checkpoint(
    params: Params, root: Path, ckpt: Path, records: list[Any]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], float]:
    """``(metrics, predictions, raw rows, images per second)`` of one checkpoint on contract ``records`` of the
    evaluated split, decoded, read and scored as ``params.evaluate`` says: one generation, every readout and
    score definition measured from it. The stage and the benches that compare checkpoints share it."""
    cfg = params.evaluate
    split_dir = paths.resolve(params.preprocess.out_dir, root)
    lvis_fields = load_lvis_fields(params, root)
    det = Detector(ckpt, local_window=cfg.local_window)
    grammar = grammar_mod.for_detector(det, cfg, split_dir / "train.jsonl")
    t0 = time.time()
    preds, parses, raw = predict_records(
        det,
        records,
        split_dir,
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        desc=f"evaluate {ckpt.name}",
        readout=cfg.readout,
        score=cfg.score,
        grammar=grammar,
    )
    images_per_second = len(records) / max(time.time() - t0, 1e-9)
    metrics = compute_metrics(
        [record_to_json(r) for r in records],
        preds,
        parses,
        readout=cfg.readout,
        score=cfg.score,
        decoding=cfg.decoding,
        calibration_bins=cfg.calibration_bins,
        calibration_fit=cfg.calibration_fit,
        lvis_fields=lvis_fields,
    )
    lvis_note = (
        f" lvis_AP={metrics['lvis_AP']:.4f}" if lvis_fields is not None and metrics["lvis_AP"] is not None else ""
    )
    print(
        f"[evaluate] {ckpt.name}: bbox_mAP={metrics['bbox_mAP']:.4f} mAP50={metrics['bbox_mAP50']:.4f} "
        f"parse_rate={metrics['parse_rate']:.3f}{lvis_note} ({images_per_second:.1f} img/s, {cfg.decoding} decoding)"
    )
    return metrics, preds, raw, images_per_second


def check_images(records: list[Any], jsonl: Path) -> None:
    """Refuse the evaluation, before any model is loaded, when an image of the split leaves the split's folder
    (:func:`coordexp.core.paths.inside`) or is one Pillow refuses (a decompression bomb: its header claims more
    pixels than Pillow decodes; :mod:`coordexp.core.imaging`). Only headers are read. Skipping the image instead
    would score a different split than the one named, so the message names the record and says what to do."""
    for rec in records:
        path = image_path(rec, jsonl)
        try:
            imaging.check_header(path)
        except imaging.ImageRefused as exc:
            raise StageError(
                f"{jsonl}: record {rec.id}: image {path}: {exc}; nothing was evaluated. Run preprocess again on the "
                f"source data (it rejects such an image as {exc.reason}, counted in reports/preprocess_counts.json) "
                "or remove the record from the split"
            ) from None


def run(params: Params, root: Path | None = None) -> dict[str, Any]:
    root = root or paths.project_root()
    cfg = params.evaluate
    jsonl = paths.resolve(params.preprocess.out_dir, root) / f"{cfg.split}.jsonl"
    records = read_jsonl(jsonl)
    if cfg.limit:
        records = records[: cfg.limit]
    check_images(records, jsonl)
    gt_records = [record_to_json(r) for r in records]
    out_dir = paths.resolve(cfg.out_dir, root)
    tracking.check_reachable(tracking.tracking_uri(params))
    results = []
    for step, ckpt in checkpoints_to_evaluate(params, root):
        metrics, preds, raw, images_per_second = evaluate_checkpoint(params, root, ckpt, records)
        metrics["checkpoint"] = str(ckpt.relative_to(root)) if ckpt.is_relative_to(root) else str(ckpt)
        results.append((step, metrics, preds, raw, images_per_second))
    best = max(results, key=lambda r: (r[1]["bbox_mAP"] or 0.0, r[0] or 0))
    step, metrics, preds, raw, images_per_second = best
    gt_box = to_coco_gt(gt_records, "bbox")
    write_jsonl(out_dir / "predictions.jsonl", raw)
    write_json(out_dir / "coco_gt.json", gt_box, indent=None)
    write_json(out_dir / "coco_results.json", build_coco_results(preds, gt_box, "bbox").results, indent=None)
    artifacts = ["predictions.jsonl", "coco_gt.json", "coco_results.json"]
    lvis_fields = load_lvis_fields(params, root)
    if lvis_fields is not None:  # the files the lvis package scored, to rescore or inspect them
        gt_lvis = to_lvis_gt(gt_records, lvis_fields)
        write_json(out_dir / "lvis_gt.json", gt_lvis, indent=None)
        write_json(out_dir / "lvis_results.json", build_coco_results(preds, gt_lvis, "bbox").results, indent=None)
        artifacts += ["lvis_gt.json", "lvis_results.json"]
    if len(results) > 1:
        metrics["best_step"] = step
        metrics["by_step"] = {str(s): m["bbox_mAP"] for s, m, *_ in results}
    # the speed is a property of the machine: MLflow and the console only, so that eval.json (hashed by DVC)
    # is the same bytes on every rerun
    write_json(paths.metrics_dir(root) / "eval.json", metrics)

    run_id = tracking.run_id_of(params, root)
    with tracking.stage_run(params, "evaluate", run_id=run_id) as _:
        # first, so that MLflow links the metrics below to the logged model
        mlflow_model.log_checkpoint_model(params, root, paths.resolve(metrics["checkpoint"], root), metrics)
        mlflow.log_metrics(mlflow_metrics({**metrics, "images_per_second": images_per_second}))
        # its own dataset name: MLflow keeps one input per dataset and run, and the training run
        # already has this split as its "validation" input
        tracking.log_dataset(jsonl, "evaluation", name=f"{cfg.split}-evaluation", records=len(records), root=root)
        for s, m, *_ in results:
            if s is not None and m["bbox_mAP"] is not None:
                mlflow.log_metric("ckpt_bbox_mAP", m["bbox_mAP"], step=s)
        for name in artifacts:
            mlflow.log_artifact(str(out_dir / name), "eval")
    return {**metrics, "images_per_second": images_per_second}
