"""Offline evaluation: parse answers, score objects, compute detection metrics.

Pure functions, no model: the inference stage produces answer texts (and per-step token
probabilities); this package turns them into COCO mAP, F1 and answer-health numbers.

    parse = parse_prediction(text)                      # never raises
    scores = score_objects(parse, token_strings, probs)  # geometric mean of coord-token probs
    # other score definitions (scoring.SCORES) and coordinates read from the captured coord distributions
    # (readout.READOUTS) need the per-step statistics of coordexp.evaluate.generate.CoordCapture
    pred = build_prediction(record["id"], W, H, parse, scores)
    gt = to_coco_gt(records, "bbox"); m = coco_map(gt, to_coco_results(preds, gt, "bbox"), "bbox")
"""

from coordexp.evaluate.metrics import (
    CocoMetrics,
    CocoResults,
    boxes_from_records,
    build_coco_results,
    coco_map,
    f1_at_iou,
    summarize,
    to_coco_gt,
    to_coco_results,
)
from coordexp.evaluate.parse import ParsedObject, ParseResult, Problem, parse_prediction
from coordexp.evaluate.scoring import ObjectScores, build_prediction, object_score, object_score_checked, score_objects

__all__ = [
    "CocoMetrics",
    "CocoResults",
    "ObjectScores",
    "ParseResult",
    "ParsedObject",
    "Problem",
    "boxes_from_records",
    "build_coco_results",
    "build_prediction",
    "coco_map",
    "f1_at_iou",
    "object_score",
    "object_score_checked",
    "parse_prediction",
    "score_objects",
    "summarize",
    "to_coco_gt",
    "to_coco_results",
]
