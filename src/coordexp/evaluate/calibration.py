"""Is an object score a probability? Expected calibration error, reliability bins, and an honest fit.

AP needs only the order of scores; a user who thresholds detections (keep everything above 0.5) needs the score
to mean "this detection is right with probability s". Here *right* means matched to a ground-truth object of
the same description at IoU >= 0.5, matched COCO-style: per image and description, predictions in decreasing
score each take the still-unmatched ground-truth object they overlap most (ties by order), so one object
cannot make two predictions right.

* Reliability bins: ``n_bins`` equal-width score bins on [0, 1]; each bin's count, mean score (confidence) and
  fraction matched (accuracy).
* ECE: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over those bins.
* Fit (``evaluate.calibration_fit``): ``isotonic`` (a monotone step map, scikit-learn's
  ``IsotonicRegression``), ``temperature`` (``sigmoid(a * logit(s))``, the scalar ``a`` fitted by minimising the
  negative log-likelihood) or ``none``. It is cross-fitted by image: fitted on the even positions of the
  evaluation order and applied to the odd ones, and vice versa, so every reported calibrated score comes from a
  map that never saw that image; ``ece_fitted`` is the ECE of those held-out calibrated scores.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from scipy.optimize import minimize_scalar
from sklearn.isotonic import IsotonicRegression

from coordexp.core.geometry import enclosing_box
from coordexp.evaluate.metrics import iou_matrix, object_pixels

Fit = Literal["none", "temperature", "isotonic"]
FITS: tuple[str, ...] = ("none", "temperature", "isotonic")
_EPS = 1e-6


def match_greedy(
    gt: Sequence[tuple[str, Sequence[float]]], pred: Sequence[tuple[str, Sequence[float], float]], iou_thr: float = 0.5
) -> list[bool]:
    """Per prediction ``(desc, xyxy, score)`` of one image: is it matched to a ground-truth ``(desc, xyxy)``?

    COCO's greedy rule: predictions by decreasing score (stable), each takes the unmatched ground truth of its
    description with the highest IoU, if that IoU reaches ``iou_thr``.
    """
    out = [False] * len(pred)
    if not gt or not pred:
        return out
    iou = iou_matrix(np.array([b for _, b, _ in pred], dtype=np.float64), np.array([b for _, b in gt]))
    taken = [False] * len(gt)
    for j in sorted(range(len(pred)), key=lambda j: -pred[j][2]):
        best, best_iou = -1, -1.0
        for i, (gd, _) in enumerate(gt):
            if not taken[i] and gd == pred[j][0] and iou[j, i] >= iou_thr and iou[j, i] > best_iou:
                best, best_iou = i, float(iou[j, i])
        if best >= 0:
            taken[best] = True
            out[j] = True
    return out


def labelled_scores(
    records: Sequence[Mapping[str, Any]], preds: Sequence[Mapping[str, Any]], iou_thr: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(scores, matched, image position)`` of every predicted object on a ground-truth image.

    The position is the image's index in ``records`` (the evaluation order), which decides its half for the fit.
    """
    by_id = {int(p["id"]): p for p in preds}
    scores: list[float] = []
    labels: list[bool] = []
    pos: list[int] = []
    for n, r in enumerate(records):
        p = by_id.get(int(r["id"]))
        if p is None or not p["objects"]:
            continue
        gt = [(o["desc"], enclosing_box(object_pixels(o, r["width"], r["height"])[1])) for o in r["objects"]]
        pr = []
        for o in p["objects"]:
            s = float(o.get("score", 0.0))
            s = s if np.isfinite(s) else 0.0
            pr.append((o["desc"], enclosing_box(object_pixels(o, p["width"], p["height"])[1]), s))
        labels.extend(match_greedy(gt, pr, iou_thr))
        scores.extend(s for _, _, s in pr)
        pos.extend([n] * len(pr))
    return np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=bool), np.asarray(pos, dtype=np.int64)


def reliability_bins(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> list[dict[str, Any]]:
    """Equal-width bins on [0, 1] (the last one closed): ``{lo, hi, count, confidence, accuracy}``; an empty
    bin has ``None`` confidence and accuracy."""
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    y = np.asarray(labels, dtype=np.float64)
    idx = np.minimum((s * n_bins).astype(np.int64), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        c = int(m.sum())
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "count": c,
                "confidence": float(s[m].mean()) if c else None,
                "accuracy": float(y[m].mean()) if c else None,
            }
        )
    return out


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float | None:
    """``sum_b (n_b / N) |accuracy_b - confidence_b|``; ``None`` without predictions."""
    n = len(scores)
    if n == 0:
        return None
    bins = reliability_bins(scores, labels, n_bins)
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in bins if b["count"]))


def _logit(s: np.ndarray) -> np.ndarray:
    s = np.clip(np.asarray(s, dtype=np.float64), _EPS, 1 - _EPS)
    return np.log(s) - np.log1p(-s)


def fit_calibrator(fit: str, scores: np.ndarray, labels: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A map from scores to calibrated probabilities, fitted on ``(scores, labels)`` only."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if fit == "none":
        return lambda x: np.asarray(x, dtype=np.float64)
    if fit == "isotonic":
        iso = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip", increasing=True).fit(s, y)
        return lambda x: np.asarray(iso.predict(np.asarray(x, dtype=np.float64)), dtype=np.float64)
    if fit == "temperature":
        z = _logit(s)

        def nll(log_a: float) -> float:
            q = np.clip(1.0 / (1.0 + np.exp(-np.exp(log_a) * z)), 1e-12, 1 - 1e-12)
            return float(-np.mean(y * np.log(q) + (1 - y) * np.log1p(-q)))

        a = float(np.exp(minimize_scalar(nll, bounds=(-6.0, 6.0), method="bounded").x))
        return lambda x: 1.0 / (1.0 + np.exp(-a * _logit(x)))
    raise ValueError(f"unknown calibration fit {fit!r}; expected one of {', '.join(FITS)}")


def cross_fit(fit: str, scores: np.ndarray, labels: np.ndarray, positions: np.ndarray) -> np.ndarray | None:
    """Calibrated scores, each from a map fitted on the other half of the images (even vs odd positions);
    ``None`` when a half has no predictions to fit on."""
    s = np.asarray(scores, dtype=np.float64)
    odd = (np.asarray(positions) % 2).astype(bool)
    out = np.empty_like(s)
    for target in (False, True):
        train, test = odd != target, odd == target
        if not test.any():
            continue
        if not train.any():
            return None
        out[test] = fit_calibrator(fit, s[train], np.asarray(labels)[train])(s[test])
    return out


def calibration_report(
    records: Sequence[Mapping[str, Any]],
    preds: Sequence[Mapping[str, Any]],
    *,
    n_bins: int = 10,
    fit: str = "isotonic",
    iou_thr: float = 0.5,
) -> dict[str, Any]:
    """The ``calibration`` section of ``eval.json`` for the predictions' ``score``: ECE and reliability bins, and
    with a fit the same of the cross-fitted scores (module docstring)."""
    scores, labels, pos = labelled_scores(records, preds, iou_thr)
    out: dict[str, Any] = {
        "ece": expected_calibration_error(scores, labels, n_bins),
        "fit": fit,
        "ece_fitted": None,
        "n_predictions": len(scores),
        "matched_rate": float(labels.mean()) if len(labels) else None,
        "mean_score": float(scores.mean()) if len(scores) else None,
        "iou_threshold": iou_thr,
        "bins": reliability_bins(scores, labels, n_bins),
    }
    if fit != "none":
        cal = cross_fit(fit, scores, labels, pos)
        if cal is not None:
            out["ece_fitted"] = expected_calibration_error(cal, labels, n_bins)
            out["bins_fitted"] = reliability_bins(cal, labels, n_bins)
    return out
