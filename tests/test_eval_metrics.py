"""Tests for COCO conversion/mAP (checked against pycocotools run directly), F1 and summaries."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from coordexp.core.codec import coord_token, encode_xy
from coordexp.evaluate import (
    build_coco_results,
    coco_map,
    f1_at_iou,
    parse_prediction,
    summarize,
    to_coco_gt,
    to_coco_results,
)
from coordexp.evaluate.metrics import boxes_from_records, duplicate_count, iou_matrix, match_image

S = 1000  # with 1000-pixel images, bin k is pixel k exactly (k / 999 * 999)


def tok(*bins: int) -> list[str]:
    return [coord_token(b) for b in bins]


def rec(i: int, objects: list[dict], w: int = S, h: int = S) -> dict[str, Any]:
    return {"id": i, "images": [f"img/{i}.png"], "width": w, "height": h, "objects": objects}


def box(desc: str, x1: int, y1: int, x2: int, y2: int, score: float | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"desc": desc, "bbox_2d": tok(x1, y1, x2, y2)}
    if score is not None:
        o["score"] = score
    return o


def poly(desc: str, pts: list[int], score: float | None = None) -> dict[str, Any]:
    o: dict[str, Any] = {"desc": desc, "poly": tok(*pts)}
    if score is not None:
        o["score"] = score
    return o


# --- reference: pycocotools on files ---------------------------------------------------


def reference_eval(tmp_path: Path, gt: dict, results: list, iou_type: str) -> COCOeval:
    gt_path, res_path = tmp_path / f"gt_{iou_type}.json", tmp_path / f"res_{iou_type}.json"
    gt_path.write_text(json.dumps(gt))
    res_path.write_text(json.dumps(results))
    with contextlib.redirect_stdout(io.StringIO()):
        cg = COCO(str(gt_path))
        cd = cg.loadRes(str(res_path))
        ev = COCOeval(cg, cd, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def random_dataset(seed: int, n_img: int = 12) -> tuple[list[dict], list[dict]]:
    """GT and noisy predictions with boxes, polygons, lines, empty images, odd sizes."""
    rng = np.random.default_rng(seed)
    classes = ["circle", "square", "triangle", "line"]
    records, preds = [], []
    for i in range(n_img):
        w, h = int(rng.integers(64, 900)), int(rng.integers(64, 900))
        gt_objs, pr_objs = [], []
        n = 0 if i % 5 == 0 else int(rng.integers(1, 7))
        for _ in range(n):
            c = classes[int(rng.integers(0, 4))]
            cx, cy, r = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, rng.uniform(0.05, 0.2) * min(w, h)
            if c == "triangle":
                pts = [cx, cy - r, cx + r, cy + r, cx - r, cy + r]
                key = "poly"
            elif c == "line":
                pts = [cx - r, cy, cx + r, cy + rng.uniform(-r, r)]
                key = "line"
            else:
                pts = [cx - r, cy - r, cx + r, cy + r]
                key = "bbox_2d"
            gt_objs.append({"desc": c, key: encode_xy(pts, w, h)})
            if rng.uniform() < 0.8:  # detected, with jitter
                jit = [p + rng.normal(0, 0.15 * r) for p in pts]
                jit = [min(max(v, 0), (w if j % 2 == 0 else h) - 1) for j, v in enumerate(jit)]
                desc = c if rng.uniform() < 0.9 else classes[int(rng.integers(0, 4))]
                pr_objs.append({"desc": desc, key: encode_xy(jit, w, h), "score": float(rng.uniform())})
        for _ in range(int(rng.integers(0, 3))):  # false positives, one with an unknown desc
            x, y = rng.uniform(0, 0.6) * w, rng.uniform(0, 0.6) * h
            d = classes[int(rng.integers(0, 4))] if rng.uniform() < 0.8 else "hexagon"
            pr_objs.append(
                {"desc": d, "bbox_2d": encode_xy([x, y, x + 0.3 * w, y + 0.3 * h], w, h), "score": float(rng.uniform())}
            )
        records.append({"id": i, "images": [f"{i}.png"], "width": w, "height": h, "objects": gt_objs})
        preds.append({"id": i, "width": w, "height": h, "objects": pr_objs})
    return records, preds


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_map_all_range_only_gives_the_same_numbers(tmp_path: Path, seed: int, iou_type: str) -> None:
    """``all_areas=False`` (what the evaluate stage runs) against pycocotools' full evaluation from files: the
    same mAP / mAP50 / mAP75, per-class AP and curves to the bit, and nothing claimed by area."""
    records, preds = random_dataset(seed)
    gt = to_coco_gt(records, iou_type)
    results = build_coco_results(preds, gt, iou_type).results
    m = coco_map(gt, results, iou_type, all_areas=False)
    ref = reference_eval(tmp_path, gt, results, iou_type)
    assert m.stats[:3] == tuple(float(s) for s in ref.stats[:3]) and 0 < m.mAP < 1
    assert (m.mAP, m.mAP50, m.mAP75) == tuple(float(s) for s in ref.stats[:3])
    np.testing.assert_array_equal(m.precision[:, :, :, 0], ref.eval["precision"][:, :, :, 0])
    full = coco_map(gt, results, iou_type)
    assert m.per_class_ap == full.per_class_ap and m.pr_curves_50 == full.pr_curves_50
    assert all(math.isnan(m.named[k]) for k in ("mAP_small", "mAP_medium", "mAP_large", "AR_small"))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_map_equals_pycocotools_on_files(tmp_path: Path, seed: int, iou_type: str) -> None:
    records, preds = random_dataset(seed)
    gt = to_coco_gt(records, iou_type)
    cr = build_coco_results(preds, gt, iou_type)
    assert cr.results, "the random data set must produce results"
    m = coco_map(gt, cr.results, iou_type)
    ref = reference_eval(tmp_path, gt, cr.results, iou_type)
    np.testing.assert_allclose(m.stats, ref.stats, rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.precision, ref.eval["precision"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(m.recall, ref.eval["recall"], rtol=0, atol=1e-12)
    assert m.mAP == pytest.approx(ref.stats[0], abs=1e-12) and 0 < m.mAP < 1
    assert m.mAP50 == pytest.approx(ref.stats[1], abs=1e-12)
    # per-class AP from the same array; classes listed only if they have GT
    names = {c["id"]: c["name"] for c in gt["categories"]}
    for k, cid in enumerate(ref.params.catIds):
        pr = ref.eval["precision"][:, :, k, 0, -1]
        if np.any(pr > -1):
            assert m.per_class_ap[names[cid]] == pytest.approx(float(np.mean(pr[pr > -1])), abs=1e-12)
            assert m.pr_curves_50[names[cid]] == pytest.approx(list(pr[0]), abs=1e-12)
        else:
            assert names[cid] not in m.per_class_ap
    assert all(math.isfinite(v) for v in m.per_class_ap.values())
    assert len(m.recall_thresholds) == 101
    json.dumps(m.summary())  # JSON-ready


def test_categories_and_unknown_desc() -> None:
    records = [rec(1, [box("b", 0, 0, 10, 10), box("a", 5, 5, 20, 20)]), rec(2, [])]
    gt = to_coco_gt(records)
    assert gt["categories"] == [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    assert [a["id"] for a in gt["annotations"]] == [1, 2]
    assert gt["annotations"][0]["bbox"] == pytest.approx([0, 0, 10, 10])
    assert gt["annotations"][0]["category_id"] == 2
    preds = [rec(1, [box("zebra", 0, 0, 10, 10), box("a", 5, 5, 20, 20)]), rec(99, [box("a", 0, 0, 5, 5)])]
    cr = build_coco_results(preds, gt)
    assert cr.n_objects == 3 and cr.unknown_desc == 1 and cr.unknown_image == 1
    assert dict(cr.unknown_desc_names) == {"zebra": 1}
    assert len(cr.results) == 1 and cr.results[0]["category_id"] == 1
    assert to_coco_results(preds, gt) == cr.results


# --- hand-built cases with known answers ------------------------------------------------


def test_perfect_predictions_give_ap_one() -> None:
    objs = [
        box("sq", 100, 100, 300, 300),
        poly("tri", [500, 100, 700, 400, 300, 400]),
        {"desc": "ln", "line": tok(10, 900, 800, 900)},
    ]  # horizontal line: zero-height box
    records = [rec(1, objs), rec(2, [box("sq", 0, 0, 50, 60)]), rec(3, [])]
    preds = [rec(r["id"], [dict(o, score=0.9) for o in r["objects"]]) for r in records]
    for iou_type in ("bbox", "segm"):
        gt = to_coco_gt(records, iou_type)
        m = coco_map(gt, to_coco_results(preds, gt, iou_type), iou_type)
        assert m.mAP == pytest.approx(1.0) and m.mAP50 == pytest.approx(1.0) and m.mAP75 == pytest.approx(1.0)
        expected = {"sq", "tri", "ln"} if iou_type == "bbox" else {"tri"}  # segm: polygons only
        assert set(m.per_class_ap) == expected
        assert all(v == pytest.approx(1.0) for v in m.per_class_ap.values())
    gt = to_coco_gt(records, "segm", box_as_polygon=True)
    m = coco_map(gt, to_coco_results(preds, gt, "segm", box_as_polygon=True), "segm")
    assert set(m.per_class_ap) == {"sq", "tri"} and m.mAP == pytest.approx(1.0)


def test_shifted_box_known_iou_and_ap() -> None:
    # GT 100x100 box, prediction shifted 20 px right: IoU = 80*100 / (2*10000 - 8000) = 2/3
    records = [rec(1, [box("sq", 100, 100, 200, 200)])]
    preds = [rec(1, [box("sq", 120, 100, 220, 200, score=0.7)])]
    gt = to_coco_gt(records)
    res = to_coco_results(preds, gt)
    assert iou_matrix([[100, 100, 200, 200]], [[120, 100, 220, 200]])[0, 0] == pytest.approx(2 / 3)
    m = coco_map(gt, res)
    # thresholds .50 .55 .60 .65 are below 2/3 (AP 1), .70 ... .95 above (AP 0)
    assert m.mAP50 == pytest.approx(1.0) and m.mAP75 == pytest.approx(0.0)
    assert m.mAP == pytest.approx(0.4)
    ap_per_thr = [float(np.mean(m.precision[t, :, 0, 0, -1])) for t in range(10)]
    assert ap_per_thr == pytest.approx([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    f = f1_at_iou(boxes_from_records(records), boxes_from_records(preds), 0.6)
    assert (f["tp"], f["fp"], f["fn"], f["f1"]) == (1, 0, 0, 1.0)
    f = f1_at_iou(boxes_from_records(records), boxes_from_records(preds), 0.7)
    assert (f["tp"], f["fp"], f["fn"], f["f1"]) == (0, 1, 1, 0.0)


def test_ranking_by_score_matters() -> None:
    # one GT, a false positive ranked above the true positive: AP@.5 = precision 1/2 at recall 1
    records = [rec(1, [box("sq", 100, 100, 200, 200)])]
    gt = to_coco_gt(records)
    tp, fp = box("sq", 100, 100, 200, 200), box("sq", 600, 600, 700, 700)
    good = coco_map(gt, to_coco_results([rec(1, [dict(tp, score=0.9), dict(fp, score=0.1)])], gt))
    bad = coco_map(gt, to_coco_results([rec(1, [dict(tp, score=0.1), dict(fp, score=0.9)])], gt))
    assert good.mAP50 == pytest.approx(1.0) and bad.mAP50 == pytest.approx(0.5)


def test_no_predictions_gives_zero_not_minus_one(tmp_path: Path) -> None:
    records = [rec(1, [box("sq", 100, 100, 200, 200), poly("tri", [1, 1, 50, 1, 25, 40])]), rec(2, [])]
    for iou_type in ("bbox", "segm"):
        gt = to_coco_gt(records, iou_type)
        m = coco_map(gt, [], iou_type)
        assert m.mAP == 0.0 and m.mAP50 == 0.0 and m.mAP75 == 0.0 and m.n_results == 0
        assert all(v == 0.0 for v in m.per_class_ap.values()) and m.per_class_ap
        json.dumps(m.summary())
    # predictions that are all dropped (unknown desc) behave the same
    gt = to_coco_gt(records)
    cr = build_coco_results([rec(1, [box("zebra", 1, 1, 9, 9)])], gt)
    assert cr.results == [] and cr.unknown_desc == 1 and coco_map(gt, cr.results).mAP == 0.0


def test_predictions_on_image_without_gt_are_false_positives() -> None:
    records = [rec(1, [box("sq", 100, 100, 200, 200)]), rec(2, [])]
    gt = to_coco_gt(records)
    preds = [rec(1, [box("sq", 100, 100, 200, 200, 0.5)]), rec(2, [box("sq", 100, 100, 200, 200, 0.9)])]
    m = coco_map(gt, to_coco_results(preds, gt))
    assert m.mAP50 == pytest.approx(0.5)  # FP (0.9) ranked first, then TP: precision 1/2 at recall 1


def test_empty_gt_everywhere_is_undefined_not_a_crash() -> None:
    records = [rec(1, []), rec(2, [])]
    gt = to_coco_gt(records)
    m = coco_map(gt, [])
    assert math.isnan(m.mAP) and m.per_class_ap == {} and m.summary()["mAP"] is None


def test_nonfinite_scores_are_zeroed_and_counted() -> None:
    records = [rec(1, [box("sq", 100, 100, 200, 200)])]
    gt = to_coco_gt(records)
    cr = build_coco_results([rec(1, [box("sq", 100, 100, 200, 200, math.nan)])], gt)
    assert cr.nonfinite_scores == 1 and cr.results[0]["score"] == 0.0
    assert coco_map(gt, cr.results).mAP == pytest.approx(1.0)


# --- Hungarian F1 -----------------------------------------------------------------------


def test_f1_basic_cases() -> None:
    g = [[("a", (0, 0, 10, 10)), ("b", (20, 20, 30, 30))]]
    assert f1_at_iou(g, g, 0.5) == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "tp": 2, "fp": 0, "fn": 0}
    # desc mismatch counts only when match_desc
    p = [[("x", (0, 0, 10, 10)), ("b", (20, 20, 30, 30))]]
    assert f1_at_iou(g, p, 0.5)["tp"] == 1
    assert f1_at_iou(g, p, 0.5, match_desc=False)["tp"] == 2
    # one missing, one extra, and dict inputs keyed by image id
    gd = {1: [{"desc": "a", "bbox": (0, 0, 10, 10)}], 2: [("a", (0, 0, 10, 10))]}
    pd = {1: [("a", (0, 0, 10, 10)), ("a", (50, 50, 60, 60))], 3: [("a", (0, 0, 1, 1))]}
    r = f1_at_iou(gd, pd, 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)
    assert r["precision"] == pytest.approx(1 / 3) and r["recall"] == pytest.approx(1 / 2)
    assert r["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # duplicate predictions of one GT: one TP, one FP (one-to-one)
    r = f1_at_iou([[("a", (0, 0, 10, 10))]], [[("a", (0, 0, 10, 10)), ("a", (0, 0, 10, 9))]], 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 0)
    # nothing anywhere
    assert f1_at_iou([[]], [[]], 0.5)["f1"] == 1.0
    assert f1_at_iou([[("a", (0, 0, 1, 1))]], [[]], 0.5)["f1"] == 0.0
    with pytest.raises(ValueError):
        f1_at_iou([[]], [[], []], 0.5)


def test_hungarian_maximises_the_number_of_matches() -> None:
    # P1 fits A perfectly (IoU 1) and B at 1/3; P2 fits only A at 1/3 (thr 0.3).
    # Maximising the IoU sum would take P1-A alone (1.0 > 2/3); we take P1-B and P2-A.
    A, B = (0, 0, 10, 10), (5, 0, 15, 10)
    P1, P2 = (0, 0, 10, 10), (-5, 0, 5, 10)
    gt, pred = [("a", A), ("a", B)], [("a", P1), ("a", P2)]
    m = match_image(gt, pred, 0.3)
    assert sorted((g, p) for g, p, _ in m) == [(0, 1), (1, 0)]
    assert all(iou == pytest.approx(1 / 3) for _, _, iou in m)
    assert f1_at_iou([gt], [pred], 0.3)["tp"] == 2
    # among equally many matches, the higher IoU pairing wins
    g2 = [("a", (0, 0, 10, 10)), ("a", (0, 0, 10, 10.5))]
    m = match_image(g2, g2[::-1], 0.5)
    assert sorted((g, p) for g, p, _ in m) == [(0, 1), (1, 0)]


# --- summary ------------------------------------------------------------------------------


def test_summarize() -> None:
    records = [rec(1, [box("sq", 100, 100, 200, 200)]), rec(2, [box("sq", 1, 1, 9, 9), box("c", 1, 1, 9, 9)])]
    texts = [
        '{"object_1": {"desc": "sq", "bbox_2d": ' + json.dumps(tok(100, 100, 200, 200)) + "}, "
        '"object_2": {"desc": "sq", "bbox_2d": ' + json.dumps(tok(101, 100, 200, 200)) + "}, "
        '"object_3": {"desc": "c", "bbox_2d": ' + json.dumps(tok(100, 100, 200, 200)) + "}}",
        '{"object_1": {"desc": "sq", "bbox_2d": ' + json.dumps(tok(1, 1, 9, 9)) + '}, "object_2": {"desc',
    ]
    parses = [parse_prediction(t) for t in texts]
    assert parses[0].ok and parses[1].salvaged
    preds = [
        rec(r["id"], [dict(o.to_dict(), score=s) for o, s in zip(p.objects, sc)])
        for r, p, sc in zip(records, parses, [[0.9, math.nan, 0.5], [0.7]])
    ]
    s = summarize(parses, preds, records)
    assert s["parse_rate"] == 0.5 and s["salvage_rate"] == 0.5 and s["complete_rate"] == 0.5
    assert s["problem_counts"] == {"truncated": 1}
    assert s["gt_objects_per_image"] == 1.5 and s["pred_objects_per_image"] == 2.0
    # object_2 of image 1 repeats object_1 (same desc, IoU 0.99); object_3 has another desc
    assert s["n_duplicates"] == 1 and s["duplicate_rate"] == pytest.approx(1 / 4)
    assert s["nan_scores"] == 1
    json.dumps(s)
    assert duplicate_count([("a", (0, 0, 10, 10))] * 3) == 2
    assert summarize(None, [], records)["parse_rate"] is None


def test_eval_json_names_are_the_mlflow_names(mlflow_store: str) -> None:
    """``eval.json`` and MLflow spell every metric the same way: each numeric key logs as is."""
    import mlflow

    from coordexp.evaluate.metrics import HEADLINE_METRICS
    from coordexp.evaluate.stage import compute_metrics

    records = [rec(1, [box("sq", 100, 100, 300, 300)]), rec(2, [box("sq", 0, 0, 50, 60)])]
    texts = ['{"object_1": {"desc": "sq", "bbox_2d": ' + json.dumps(tok(100, 100, 300, 300)) + "}}", "not json"]
    parses = [parse_prediction(t) for t in texts]
    preds = [rec(r["id"], [dict(o.to_dict(), score=0.9) for o in p.objects]) for r, p in zip(records, parses)]
    m = compute_metrics(records, preds, parses)
    assert set(HEADLINE_METRICS) <= set(m)
    assert m["f1_at_0.5"] == pytest.approx(2 / 3) and m["recall_at_0.3"] == 0.5 and m["precision_at_0.5"] == 1.0
    numbers = {k: float(v) for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    with mlflow.start_run() as run:
        mlflow.log_metrics(numbers)  # MLflow refuses a name it cannot store (``f1@0.5`` was one)
    assert mlflow.get_run(run.info.run_id).data.metrics == numbers
