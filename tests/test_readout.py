"""Coordinates read from the coord distribution, the one-pass capture, score definitions and calibration."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from test_build_base import SMALL, write_dataset

from coordexp.core.codec import K, coord_token
from coordexp.evaluate import readout as ro
from coordexp.evaluate.calibration import (
    calibration_report,
    cross_fit,
    expected_calibration_error,
    fit_calibrator,
    match_greedy,
    reliability_bins,
)
from coordexp.evaluate.generate import Generation
from coordexp.evaluate.scoring import SCORES

# --------------------------------------------------------------------------------------------
# readouts on hand-built distributions


def _point(k: int) -> np.ndarray:
    p = np.zeros(K)
    p[k] = 1.0
    return p


def _gauss(centre: int, sigma: float = 2.0, truncate: int = 16) -> np.ndarray:
    k = np.arange(K)
    w = np.where(np.abs(k - centre) <= truncate, np.exp(-0.5 * ((k - centre) / sigma) ** 2), 0.0)
    return w / w.sum()


def _split(a: int, b: int, pa: float = 0.5) -> np.ndarray:
    p = np.zeros(K)
    p[a], p[b] = pa, 1.0 - pa
    return p


DISTRIBUTIONS = {
    "point_0": _point(0),
    "point_500": _point(500),
    "point_999": _point(999),
    "split_10_20": _split(10, 20),
    "split_10_20_uneven": _split(10, 20, 0.4),
    "split_far": _split(100, 900, 0.6),
    "gauss_0": _gauss(0),
    "gauss_999": _gauss(999),
    "gauss_400_wide": _gauss(400, sigma=30.0, truncate=200),
    "uniform": np.full(K, 1.0 / K),
}


def test_reference_readouts_by_hand():
    for k in (0, 500, 999):
        p = _point(k)
        assert [ro.read(p, r) for r in ro.READOUTS] == [k, k, k, k]
        assert ro.std_bins(p) == 0.0 and ro.peak(p) == 1.0
    p = _split(10, 20)
    assert ro.argmax_bin(p) == 10 and ro.expectation(p) == pytest.approx(15.0)
    assert ro.median_bin(p) == 10  # the CDF reaches 0.5 at the lower bin
    assert ro.local_expectation(p, 8) == pytest.approx(10.0)  # bin 20 is outside +-8
    assert ro.local_expectation(p, 10) == pytest.approx(15.0)
    assert ro.std_bins(p) == pytest.approx(5.0)
    p = _split(10, 20, 0.4)
    assert ro.argmax_bin(p) == 20 and ro.median_bin(p) == 20 and ro.expectation(p) == pytest.approx(16.0)
    g0, g9 = _gauss(0), _gauss(999)
    assert ro.argmax_bin(g0) == 0 and 0 < ro.expectation(g0) < 2 and ro.median_bin(g0) in (0.0, 1.0)
    assert ro.argmax_bin(g9) == 999 and 997 < ro.expectation(g9) < 999 and ro.median_bin(g9) in (998.0, 999.0)
    assert ro.expectation(g0) == pytest.approx(999 - ro.expectation(g9))  # truncation at either edge, mirrored
    u = DISTRIBUTIONS["uniform"]
    assert ro.expectation(u) == pytest.approx(499.5) and ro.median_bin(u) == 499  # CDF(499) = 500/1000
    assert ro.argmax_bin(u) == 0 and ro.local_expectation(u, 8) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="unknown readout"):
        ro.read(u, "mode")


@pytest.mark.parametrize("window", [0, 8, 50])
def test_vectorised_stats_match_the_reference(window):
    """coord_stats on a batch of full-vocab log-probs of the coord ids (which are not at the start; 30% of the
    mass elsewhere) equals the reference functions on each row's renormalised coord slice."""
    names = list(DISTRIBUTIONS)
    extra, v = 150, K + 300
    coord_ids = np.arange(extra, extra + K)
    rows = []
    for name in names:
        full = np.full(v, 0.3 / (v - K))
        full[extra : extra + K] = 0.7 * DISTRIBUTIONS[name]
        rows.append(full)
    with np.errstate(divide="ignore"):
        logp = np.log(np.stack(rows))
    st = ro.coord_stats(logp[:, coord_ids], window)
    for sub in ([0], [len(names) - 1, 1]):  # a row's numbers do not depend on the rows beside it
        np.testing.assert_array_equal(ro.coord_stats(logp[sub][:, coord_ids], window), st[sub])
    for i, name in enumerate(names):
        p = DISTRIBUTIONS[name]
        row = dict(zip(ro.STAT_COLUMNS, st[i]))
        assert row["mass"] == pytest.approx(0.7, abs=1e-12), name
        assert row["argmax"] == ro.argmax_bin(p), name
        assert row["expectation"] == pytest.approx(ro.expectation(p), abs=1e-9), name
        assert row["median"] == ro.median_bin(p), name
        assert row["local_expectation"] == pytest.approx(ro.local_expectation(p, window), abs=1e-9), name
        assert row["peak"] == pytest.approx(ro.peak(p), abs=1e-12), name
        assert row["std"] == pytest.approx(ro.std_bins(p), abs=1e-7), name


# --------------------------------------------------------------------------------------------
# the capture on a tiny model


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    from coordexp.build_base.tiny import build_tiny
    from coordexp.core.contract import read_jsonl
    from coordexp.evaluate.generate import Detector

    data = write_dataset(tmp_path_factory.mktemp("data"), n=3)
    ckpt = build_tiny(data, tmp_path_factory.mktemp("tiny") / "base", **SMALL)
    det = Detector(ckpt, device="cpu", local_window=8)
    return det, det.rows(read_jsonl(data), Path(data).parent)


def _brute_force(det, logits: list[torch.Tensor], seqs: torch.Tensor):
    """Chosen-token probabilities and reference statistics from every step's full scores (the old way)."""
    probs = torch.stack([torch.softmax(s.float(), dim=-1) for s in logits], dim=1)
    chosen = probs.gather(2, seqs[:, : probs.shape[1], None]).squeeze(2).double()
    ids = det.coord_ids
    stats = np.zeros((probs.shape[0], probs.shape[1], len(ro.STAT_COLUMNS)))
    for b in range(probs.shape[0]):
        for t in range(probs.shape[1]):
            full = torch.softmax(logits[t][b].double(), dim=-1)
            c = full[ids].numpy()
            p = c / c.sum()
            stats[b, t] = [
                c.sum(),
                ro.argmax_bin(p),
                ro.expectation(p),
                ro.median_bin(p),
                ro.local_expectation(p, det.local_window),
                ro.peak(p),
                ro.std_bins(p),
            ]
    return chosen, stats


def _compare(det, gens, chosen, stats, seqs):
    """Same tokens and probabilities at every step; the reference statistics at the steps that emitted a coord
    token and NaN at the others (the capture computes them only where a coordinate was written)."""
    coord = set(det.coord_ids.tolist())
    n_coord = 0
    for b, g in enumerate(gens):
        n = g.n_tokens
        assert g.tokens == det.tokenizer.convert_ids_to_tokens(seqs[b, :n].tolist())
        np.testing.assert_allclose(g.probs, chosen[b, :n].numpy(), rtol=0, atol=1e-6)
        at = np.array([int(t) in coord for t in seqs[b, :n]], dtype=bool)
        n_coord += int(at.sum())
        np.testing.assert_allclose(g.stats[at], stats[b, :n][at], rtol=0, atol=1e-5)
        assert np.isnan(g.stats[~at]).all()
    return n_coord


def test_capture_equals_brute_force_and_leaves_tokens_unchanged(detector):
    det, rows = detector
    with torch.no_grad():
        inputs = det.inputs(rows)
        old = det.model.generate(**inputs, **det.greedy_kwargs(10), output_scores=True, return_dict_in_generate=True)
    seqs = old.sequences[:, inputs["input_ids"].shape[1] :]
    gens = det.generate(rows, 10)
    assert [g.n_tokens for g in gens] and all(g.stats is not None for g in gens)
    chosen, stats = _brute_force(det, list(old.scores), seqs)
    _compare(det, gens, chosen, stats, seqs)  # same tokens as decoding without the capture, same numbers


def test_capture_sees_raw_scores_before_later_processors(detector):
    """A later processor that forces one coord token changes what is emitted; the capture still reports the
    model's raw distribution (compared with transformers' raw ``output_logits``)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    det, rows = detector
    forced = int(det.coord_ids[321])

    class Force(LogitsProcessor):
        def __call__(self, input_ids, scores):
            out = torch.full_like(scores, -math.inf)
            out[:, forced] = 0.0
            return out

    with torch.no_grad():
        inputs = det.inputs(rows)
        ref = det.model.generate(
            **inputs,
            **det.greedy_kwargs(6),
            logits_processor=LogitsProcessorList([Force()]),
            output_logits=True,
            return_dict_in_generate=True,
        )
    seqs = ref.sequences[:, inputs["input_ids"].shape[1] :]
    gens = det.generate(rows, 6, logits_processors=[Force()])
    assert all(g.tokens == [coord_token(321)] * 6 for g in gens)
    chosen, stats = _brute_force(det, list(ref.logits), seqs)
    assert _compare(det, gens, chosen, stats, seqs) == 6 * len(gens)  # every step is a coord step
    assert all(max(g.probs) < 0.5 for g in gens)  # the raw probability, not the forced 1.0


# --------------------------------------------------------------------------------------------
# readouts and scores of parsed objects


def _generation() -> Generation:
    """One box, every step's stats hand-set: coord steps read 100.5 / 200.25 / ... under expectation."""
    toks = [coord_token(k) for k in (100, 200, 300, 400)]
    text = '{"object_1": {"desc": "red circle", "bbox_2d": [' + ", ".join(f'"{t}"' for t in toks) + "]}}"
    head, desc, mid = '{"object_1": {"desc": "', "red circle", '", "bbox_2d": ["'
    pieces = [head, "red", " circle", mid, toks[0], '", "', toks[1], '", "', toks[2], '", "', toks[3], '"]}}']
    assert "".join(pieces) == text and desc in text
    spans, at = [], 0
    for p in pieces:
        spans.append((at, at + len(p)))
        at += len(p)
    probs = [0.99, 0.5, 0.8, 0.99, 0.9, 0.99, 0.6, 0.99, 0.7, 0.99, 0.8, 0.99]
    stats = np.zeros((len(pieces), len(ro.STAT_COLUMNS)))
    for j, t in enumerate((4, 6, 8, 10)):
        k = (100, 200, 300, 400)[j]
        stats[t] = [0.9 - 0.1 * j, k, k + 0.5, k + 1, k + 0.25, 0.5, 2.0 + j]
    return Generation(
        text=text, tokens=pieces, probs=probs, n_tokens=len(pieces), hit_limit=False, stats=stats, spans=spans
    )


def test_prediction_reads_every_readout_and_score():
    g = _generation()
    pred, parse = g.prediction(7, 1000, 1000, readout="median", score="coord_geomean")
    assert parse.ok
    (obj,) = pred["objects"]
    assert obj["bbox_2d"] == [101.0, 201.0, 301.0, 401.0]
    assert obj["readouts"] == {
        "argmax": [100, 200, 300, 400],
        "expectation": [100.5, 200.5, 300.5, 400.5],
        "median": [101.0, 201.0, 301.0, 401.0],
        "local_expectation": [100.25, 200.25, 300.25, 400.25],
    }
    coord_p = [0.9, 0.6, 0.7, 0.8]
    sc = obj["scores"]
    assert set(sc) == set(SCORES)
    assert obj["score"] == sc["coord_geomean"] == pytest.approx(float(np.prod(coord_p) ** 0.25))
    assert sc["coord_mass"] == pytest.approx(np.mean([0.9, 0.8, 0.7, 0.6]))
    assert sc["coord_peak"] == pytest.approx(0.5)
    assert sc["neg_spread"] == pytest.approx(1 / (1 + 3.5))
    assert sc["desc_coord_geomean"] == pytest.approx(float(np.prod([0.5, 0.8, *coord_p]) ** (1 / 6)))
    argmax_pred, _ = g.prediction(7, 1000, 1000, readout="argmax", score="coord_mass")
    assert argmax_pred["objects"][0]["bbox_2d"] == [100, 200, 300, 400]
    assert argmax_pred["objects"][0]["score"] == pytest.approx(sc["coord_mass"])
    # without captured statistics only the emitted bins and the geometric mean exist
    bare = Generation(text=g.text, tokens=g.tokens, probs=g.probs, n_tokens=g.n_tokens, hit_limit=False)
    p2, _ = bare.prediction(7, 1000, 1000, readout="median")
    assert p2["objects"][0]["bbox_2d"] == [100.0, 200.0, 300.0, 400.0] and "readouts" not in p2["objects"][0]


def test_eval_json_gains_readouts_scores_calibration():
    from coordexp.evaluate.stage import compute_metrics, mlflow_metrics

    g = _generation()
    gt = [
        {"id": 7, "width": 1000, "height": 1000, "objects": [{"desc": "red circle", "bbox_2d": [101, 201, 301, 401]}]}
    ]
    pred, parse = g.prediction(7, 1000, 1000, readout="median")
    m = compute_metrics(gt, [pred], [parse], readout="median", score="coord_geomean", calibration_bins=5)
    assert (m["readout"], m["score"], m["decoding"]) == ("median", "coord_geomean", "free")
    assert set(m["readouts"]) == set(ro.READOUTS) and set(m["scores"]) == set(SCORES)
    for r in m["readouts"].values():
        assert set(r) == {"bbox_mAP", "bbox_mAP50", "bbox_mAP75", "f1_at_0.5"}
    assert m["readouts"]["median"]["bbox_mAP"] == m["bbox_mAP"] == pytest.approx(1.0)  # the exact box
    assert m["readouts"]["argmax"]["bbox_mAP"] < 1.0
    assert m["scores"]["coord_geomean"] == {"bbox_mAP": m["bbox_mAP"], "bbox_mAP50": m["bbox_mAP50"]}
    cal = m["calibration"]
    assert cal["fit"] == "isotonic" and len(cal["bins"]) == 5 and cal["n_predictions"] == 1
    assert cal["ece"] == pytest.approx(1 - pred["objects"][0]["score"])  # one prediction, matched
    assert cal["ece_fitted"] is None  # one image: the other half has nothing to fit on
    flat = mlflow_metrics(m)
    assert flat["readouts/median/bbox_mAP50"] == m["readouts"]["median"]["bbox_mAP50"]
    assert flat["scores/coord_mass/bbox_mAP"] == m["scores"]["coord_mass"]["bbox_mAP"]
    assert flat["calibration/ece"] == cal["ece"] and flat["bbox_mAP"] == m["bbox_mAP"]
    assert not any(k.startswith("calibration/bins") for k in flat)  # lists stay in the JSON
    assert "per_class_ap" not in flat and "readout" not in flat


# --------------------------------------------------------------------------------------------
# calibration


def test_ece_of_a_calibrated_set_is_zero_and_of_an_overconfident_one_is_not():
    scores, labels = [], []
    for s in np.arange(0.05, 1.0, 0.1):
        n_pos = round(100 * s)
        scores += [s] * 100
        labels += [True] * n_pos + [False] * (100 - n_pos)
    scores, labels = np.array(scores), np.array(labels)
    assert expected_calibration_error(scores, labels, 10) == pytest.approx(0.0, abs=1e-9)
    assert expected_calibration_error(np.full(100, 0.9), np.arange(100) < 50, 10) == pytest.approx(0.4)
    bins = reliability_bins(scores, labels, 10)
    assert [b["count"] for b in bins] == [100] * 10 and bins[9]["accuracy"] == pytest.approx(0.95)
    assert expected_calibration_error(np.array([]), np.array([], dtype=bool)) is None


def test_greedy_matching_by_score():
    gt = [("a", (0, 0, 10, 10)), ("a", (20, 20, 30, 30))]
    pred = [
        ("a", (0, 0, 10, 10), 0.2),
        ("a", (0, 0, 10, 9), 0.9),
        ("b", (20, 20, 30, 30), 0.99),
        ("a", (21, 21, 30, 30), 0.1),
    ]
    # the higher-scored near-duplicate takes the first object; the exact box comes too late; wrong class never matches
    assert match_greedy(gt, pred) == [False, True, False, True]


def test_fit_is_never_fitted_on_the_half_it_reports():
    rng = np.random.default_rng(0)
    n = 400
    s = rng.uniform(size=n)
    y = rng.uniform(size=n) < s**2  # over-confident scores
    pos = np.arange(n) // 4  # four predictions per image
    for fit in ("isotonic", "temperature"):
        cal = cross_fit(fit, s, y, pos)
        odd = pos % 2 == 1
        y2 = y.copy()
        y2[odd] = ~y2[odd]  # whatever the reported half's labels are ...
        cal2 = cross_fit(fit, s, y2, pos)
        np.testing.assert_array_equal(cal[odd], cal2[odd])  # ... its calibrated scores do not move
        assert not np.array_equal(cal[~odd], cal2[~odd])  # the other half's do: fitted on the changed labels
        assert expected_calibration_error(cal, y) < expected_calibration_error(s, y)
    assert cross_fit("isotonic", s, y, np.zeros(n, dtype=int)) is None  # no odd image: nothing to fit the evens on


def test_temperature_recovers_the_scale():
    rng = np.random.default_rng(1)
    z = rng.normal(size=20000) * 2
    s = 1 / (1 + np.exp(-z))
    y = rng.uniform(size=z.size) < 1 / (1 + np.exp(-0.5 * z))  # true probability: half the logit
    f = fit_calibrator("temperature", s, y)
    assert f(np.array([1 / (1 + math.exp(-2.0))]))[0] == pytest.approx(1 / (1 + math.exp(-1.0)), abs=0.02)
    with pytest.raises(ValueError, match="unknown calibration fit"):
        fit_calibrator("platt", s, y)


def test_calibration_report_on_records():
    gt = [
        {"id": i, "width": 100, "height": 100, "objects": [{"desc": "a", "bbox_2d": [0, 0, 500, 500]}]}
        for i in range(4)
    ]
    preds = [
        {
            "id": i,
            "width": 100,
            "height": 100,
            "objects": [
                {"desc": "a", "bbox_2d": [0, 0, 500, 500], "score": 0.8},
                {"desc": "a", "bbox_2d": [600, 600, 900, 900], "score": 0.6},
            ],
        }
        for i in range(4)
    ]
    rep = calibration_report(gt, preds, n_bins=10, fit="isotonic")
    assert rep["n_predictions"] == 8 and rep["matched_rate"] == 0.5
    assert rep["ece"] == pytest.approx(0.5 * 0.2 + 0.5 * 0.6)
    assert rep["ece_fitted"] == pytest.approx(0.0)  # the halves agree, so the held-out fit is exact
    assert calibration_report(gt, preds, fit="none")["ece_fitted"] is None
