"""The report: helpers of the ``coordexp.report`` modules on synthetic data (fast), and the real ``report`` stage
on a tiny project built by the real stages (slow): every figure exists, is a real image, and a rerun
on unchanged inputs rewrites the same bytes (the figures are committed for the README)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from coordexp.report import compare, distributions, evaluation, figures, plots, render, runs, training

# ------------------------------------------------------------------------------------------
# helpers


def assert_real_png(path: Path) -> None:
    """A valid, non-empty PNG that is not a single flat colour."""
    from PIL import Image

    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 0 and im.size[1] > 0, path
        extrema = im.convert("RGB").getextrema()
    assert any(lo != hi for lo, hi in extrema), f"{path} is a single flat colour"


def assert_real_pdf(path: Path) -> None:
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and b"%%EOF" in data[-64:], path
    assert b"/CreationDate" not in data, f"{path} has a creation date: reruns would differ"


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def history(mass: list[float], eval_loss: list[float], loss: list[float] | None = None) -> pd.DataFrame:
    n = len(mass)
    train = pd.DataFrame(
        {
            "step": np.arange(1, n + 1) * 10,
            "split": "train",
            "loss": loss if loss is not None else np.linspace(5, 1, n),
            "coord_softce_w1/coord_vocab_mass": mass,
            "learning_rate": np.linspace(1e-3, 0, n),
        }
    )
    ev = pd.DataFrame({"step": np.arange(1, len(eval_loss) + 1) * 20, "split": "eval", "loss": eval_loss})
    return pd.concat([train, ev], ignore_index=True)


# ------------------------------------------------------------------------------------------
# fast: figures, diagnostics, matching, MLflow loading


def test_save_figure_is_byte_identical_and_undated(tmp_path: Path) -> None:
    figures.style()
    paths = []
    for sub in ("a", "b"):
        fig = training.plot_curves(history([0.9, 0.92, 0.95, 0.96], [3.0, 2.5]))
        paths.append(figures.save_figure(fig, "curves", tmp_path / sub))
        plt.close(fig)
    for p, q in zip(*paths):
        assert p.read_bytes() == q.read_bytes(), p.name
    png, pdf = paths[0]
    assert_real_png(png)
    assert_real_pdf(pdf)
    assert b"matplotlib version" not in png.read_bytes()


def test_diagnose_flags_falling_mass_nan_and_rising_eval_loss() -> None:
    good = history([0.80, 0.85, 0.90, 0.92], [3.0, 2.5, 2.4])
    assert training.diagnose(good) == []
    bad = history([0.90, 0.95, 0.80, 0.70], [3.0, 2.0, 2.6], loss=[5.0, float("nan"), 3.0, 2.0])
    text = " | ".join(training.diagnose(bad))
    assert "coord-vocab mass is falling" in text
    assert "non-finite values in loss" in text
    assert "eval loss is rising" in text
    assert training.diagnose(pd.DataFrame(columns=["step", "split"])) == ["no training history was found"]


def test_load_history_tells_logged_nan_from_not_logged(tmp_path: Path) -> None:
    """In the CSV an empty cell means "not logged at this row", a literal nan is a real NaN."""
    csv = tmp_path / "h.csv"
    csv.write_text(
        "step,split,loss,grad_norm,train_runtime\n10,train,2.0,nan,\n20,train,1.5,1.0,\n"
        "20,eval,1.7,,\n20,train,,,12.5\n"
    )
    hist, source = runs.load_history(csv)
    assert source == str(csv) and len(hist) == 4
    assert training.nonfinite_cells(hist) == [("grad_norm", 10)]
    assert training.diagnose(hist) == ["non-finite values in grad_norm (steps [10])"]


def test_final_values_take_last_non_missing_value_per_split() -> None:
    h = history([0.8, 0.9, float("nan")], [3.0, 2.0])
    fv = training.final_values(h, ["loss", "coord_softce_w1/coord_vocab_mass"])
    assert fv.loc["coord_softce_w1/coord_vocab_mass", "train_final"] == pytest.approx(0.9)
    assert fv.loc["coord_softce_w1/coord_vocab_mass", "train_final_step"] == 20
    assert fv.loc["loss", "eval_final"] == pytest.approx(2.0)
    assert math.isnan(fv.loc["coord_softce_w1/coord_vocab_mass", "eval_final"])


def _gt_record() -> dict:
    tok = lambda ks: [f"<|coord_{k}|>" for k in ks]  # noqa: E731
    return {
        "id": 7,
        "images": ["x.png"],
        "width": 128,
        "height": 128,
        "objects": [
            {"desc": "red circle", "bbox_2d": tok([100, 100, 300, 300])},
            {"desc": "blue triangle", "poly": tok([500, 500, 700, 500, 600, 800])},
            {"desc": "green line", "line": tok([10, 900, 400, 950])},
        ],
    }


def test_match_objects_hungarian_same_desc_errors_in_bins() -> None:
    pred = {
        "id": 7,
        "objects": [
            {"desc": "blue triangle", "poly": [505, 498, 700, 500, 600, 810], "score": 0.4},  # enclosing box compared
            {"desc": "red circle", "bbox_2d": [104, 97, 300, 302], "score": 0.9},
            {"desc": "red square", "bbox_2d": [100, 100, 300, 300], "score": 0.9},  # wrong desc: never matched
        ],
    }
    err = evaluation.match_objects([_gt_record()], [pred], iou_thr=0.1)
    assert len(err) == 8 and set(err["desc"]) == {"red circle", "blue triangle"}
    circle = err[err["desc"] == "red circle"].set_index("coord")["error"].to_dict()
    assert circle == {"x1": 4, "y1": -3, "x2": 0, "y2": 2}
    tri = err[err["desc"] == "blue triangle"].set_index("coord")["error"].to_dict()
    assert tri == {"x1": 5, "y1": -2, "x2": 0, "y2": 10}
    assert set(err["axis"]) == {"x", "y"}
    assert evaluation.match_objects([_gt_record()], [{"id": 7, "objects": []}]).empty


def test_plotted_soft_target_is_the_loss_table_row() -> None:
    from coordexp.train.loss import soft_target_table

    q, _ = soft_target_table(2.0, 16)
    for k in (0, 17, 500, 999):
        np.testing.assert_allclose(distributions.soft_target_row(k, 2.0, 16), q[k].double().numpy(), atol=1e-6)


def test_plots_render_with_thin_or_empty_data(tmp_path: Path) -> None:
    """Nothing to plot must give a figure with a note, not an exception (a 30-step run has no mAP)."""
    from PIL import Image

    img = tmp_path / "x.png"
    Image.fromarray(np.full((128, 128, 3), 200, dtype=np.uint8)).save(img)
    figures.style()
    empty_runs = pd.DataFrame(columns=["run_id", "label", "loss_kind"])
    figs = {
        "curves": training.plot_curves(pd.DataFrame(columns=["step", "split"])),
        "grad": training.plot_grad_norm(pd.DataFrame(columns=["step", "split"])),
        "ap": evaluation.plot_per_class_ap({}),
        "pr": evaluation.plot_pr_curves([0.0, 0.5, 1.0], {"a": [-1, -1, -1]}),
        "grid": evaluation.plot_predictions_grid([_gt_record()], [{"id": 7, "objects": [], "ok": False}], tmp_path),
        "err": evaluation.plot_coord_errors(evaluation.match_objects([], []), 3),
        "dist": distributions.plot_coord_distributions([], 2.0, 16),
        "vs": compare.plot_metric_vs_params(empty_runs),
        "overlay": compare.plot_overlaid_curves(pd.DataFrame(columns=["run_id", "key", "step", "value"]), {}),
        "kinds": compare.plot_loss_kinds(empty_runs),
        "readouts": evaluation.plot_readouts({}),
        "reliability": evaluation.plot_reliability(None),
        "readouts_by_loss": compare.plot_readouts_by_loss(empty_runs),
    }
    for name, fig in figs.items():
        png, _ = figures.save_figure(fig, name, tmp_path / "figs")
        plt.close(fig)
        assert_real_png(png)


def test_readout_and_score_tables_and_figures_from_eval_json(tmp_path: Path) -> None:
    """The eval report reads the per-readout, per-score and calibration blocks of eval.json as written."""
    metrics = {
        "readout": "median",
        "score": "coord_geomean",
        "decoding": "constrained",
        "readouts": {
            r: {"bbox_mAP": 0.1 + i / 100, "bbox_mAP50": 0.4 + i / 100, "bbox_mAP75": 0.05, "f1_at_0.5": 0.5}
            for i, r in enumerate(("argmax", "expectation", "median", "local_expectation"))
        },
        "scores": {"coord_geomean": {"bbox_mAP": 0.2, "bbox_mAP50": 0.45}, "coord_mass": {"bbox_mAP": 0.1}},
        "calibration": {
            "score": "coord_geomean",
            "ece": 0.3,
            "ece_fitted": 0.05,
            "fit": "isotonic",
            "bins": [
                {"lo": 0.0, "hi": 0.5, "count": 3, "confidence": 0.3, "accuracy": 0.0},
                {"lo": 0.5, "hi": 1.0, "count": 1, "confidence": 0.9, "accuracy": 1.0},
            ],
            "bins_fitted": [{"lo": 0.0, "hi": 0.5, "count": 2, "confidence": 0.1, "accuracy": 0.0}],
        },
    }
    t = evaluation.readouts_table(metrics)
    assert list(t.index) == ["argmax", "expectation", "median", "local_expectation"]
    assert t.loc["median", "bbox_mAP50"] == pytest.approx(0.42) and t["headline"].tolist() == [
        False,
        False,
        True,
        False,
    ]
    s = evaluation.scores_table(metrics)
    assert s.loc["coord_geomean", "headline"] and pd.isna(s.loc["coord_mass", "bbox_mAP50"])
    assert evaluation.readouts_table({}).empty and evaluation.scores_table({}).empty
    figures.style()
    for name, fig in {
        "r": evaluation.plot_readouts(metrics),
        "c": evaluation.plot_reliability(metrics["calibration"]),
    }.items():
        png, _ = figures.save_figure(fig, name, tmp_path)
        plt.close(fig)
        assert_real_png(png)


def test_history_and_runs_table_from_mlflow(mlflow_store: str) -> None:
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    exp = mlflow.create_experiment("exp")
    with mlflow.start_run(experiment_id=exp, run_name="stage1") as run:
        mlflow.set_tags({"coordexp.loss": "stage1_softce_w1", "coordexp.stage": "report"})
        mlflow.log_params({"cfg.train.coord_soft_ce_w1.w1_weight": 0.5, "cfg.train.max_steps": 30})
        for step, (loss, mass) in enumerate([(3.0, 0.8), (2.0, 0.9)], start=1):
            mlflow.log_metrics({"loss": loss, "coord_softce_w1/coord_vocab_mass": mass}, step=step * 10)
        mlflow.log_metric("eval_loss", 2.5, step=20)
        mlflow.log_metrics({"bbox_mAP": 0.25, "f1_at_0.5": 0.5})
    with mlflow.start_run(experiment_id=exp, run_name="not-training"):
        mlflow.set_tag("coordexp.stage", "preprocess")
    rid = run.info.run_id

    hist = runs.history_from_mlflow(mlflow_store, rid)
    train, ev = training.split_history(hist)
    assert train["loss"].tolist() == [3.0, 2.0] and train["step"].tolist() == [10, 20]
    assert ev["loss"].tolist() == [2.5] and "bbox_mAP" not in hist and "f1_at_0.5" not in hist

    table = runs.runs_table(mlflow_store, "exp")
    assert table["run_id"].tolist() == [rid]  # the untagged run is not a training run
    assert table.loc[0, "cfg.train.coord_soft_ce_w1.w1_weight"] == 0.5  # numbers, not strings
    assert table.loc[0, "bbox_mAP"] == 0.25 and table.loc[0, "loss_kind"] == "stage1_softce_w1"
    assert table.loc[0, "f1_at_0.5"] == 0.5  # one name in MLflow, eval.json and the tables
    overview = compare.runs_overview(table)
    assert {"label", "w1_weight", "bbox_mAP"} <= set(overview.columns)
    assert runs.runs_table(mlflow_store, "no-such-experiment").empty


def test_scrub_notebook_removes_timings_paths_and_run_ids() -> None:
    """What papermill and the kernel add that varies between reruns and clone locations goes; the rest stays."""
    rid = "f045107d923c4ee3ae410a8beadaa052"
    png = "iVBORw0KGgo/repo/x/" + rid  # base64 image data is never rewritten
    nb = {
        "metadata": {
            "papermill": {
                "start_time": "2026-12-02T06:36:13",
                "end_time": "2026-12-02T06:36:18",
                "duration": 5.2,
                "input_path": "/repo/notebooks/a.ipynb",
                "output_path": "/repo/reports/notebooks/a.ipynb",
                "parameters": {"tracking_uri": "sqlite:////repo/mlflow.db"},
                "version": "2.7.0",
                "exception": None,
            }
        },
        "cells": [
            {
                "cell_type": "code",
                "id": "3f9a1c2e",
                "metadata": {
                    "papermill": {"start_time": "t0", "end_time": "t1", "duration": 0.1, "status": "completed"},
                    "execution": {"iopub.status.busy": "t0"},
                    "tags": ["injected-parameters"],
                },
                "source": f'run_id = "{rid}"\ntracking_uri = "sqlite:////repo/mlflow.db"\n',
                "outputs": [
                    {"output_type": "stream", "name": "stdout", "text": ["in /repo/reports, not /repo2 nor /repo.d\n"]},
                    {"output_type": "display_data", "data": {"image/png": png, "text/plain": [f"run {rid} at /repo"]}},
                ],
            }
        ],
    }
    out = render.scrub_notebook(nb, {"/repo/": "", "/repo": "."}, redact=[rid])
    meta = out["metadata"]["papermill"]
    assert set(meta) == {"parameters", "version", "exception"}
    assert meta["parameters"] == {"tracking_uri": "sqlite:///mlflow.db"}
    cell = out["cells"][0]
    assert cell["metadata"] == {"papermill": {"status": "completed"}, "tags": ["injected-parameters"]}
    assert cell["id"] == "injected-parameters"
    assert cell["source"] == f'run_id = "{render.RUN_ID_PLACEHOLDER}"\ntracking_uri = "sqlite:///mlflow.db"\n'
    assert cell["outputs"][0]["text"] == ["in reports, not /repo2 nor /repo.d\n"]
    assert cell["outputs"][1]["data"] == {"image/png": png, "text/plain": [f"run {render.RUN_ID_PLACEHOLDER} at ."]}


def test_path_replacements_cover_the_root_and_the_store_root(tmp_path: Path, monkeypatch) -> None:
    """In a DVC experiment's temporary copy the store is the real repository's: both become relative."""
    repo = tmp_path / "repo"
    exp = repo / ".dvc" / "tmp" / "exps" / "abc"
    exp.mkdir(parents=True)
    monkeypatch.delenv("COORDEXP_STORE_ROOT", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    subs = render.path_replacements(exp)
    assert subs[f"{exp}/"] == "" and subs[f"{repo}/"] == "" and subs[str(repo)] == "."
    uri = f"sqlite:///{repo}/mlflow.db"
    assert render.scrub_notebook({"metadata": {}, "cells": [], "u": uri}, subs)["u"] == "sqlite:///mlflow.db"


# ------------------------------------------------------------------------------------------
# slow: the real pipeline on a tiny project, then the real report stage (papermill)


@pytest.fixture(scope="module")
def reported(tiny_prepared) -> Path:
    """A tiny project taken through every stage once, with token-type metrics on so
    the optional figure is exercised too."""
    from conftest import run_stage

    root = tiny_prepared("report", **{"train.token_type_metrics.enabled": True})
    for stage in ("train", "evaluate", "report", "compare"):
        run_stage(root, stage)
    return root


def expected_figures() -> list[str]:
    stems = [s for nb in render.NOTEBOOKS for s in render.EXPECTED_FIGURES[nb]] + ["train_token_types"]
    assert render.COMPARE_NOTEBOOK not in render.NOTEBOOKS, "compare_runs is the compare stage's"
    return [f"{s}.{ext}" for s in stems for ext in ("png", "pdf")]


@pytest.mark.slow
def test_report_stage_renders_notebooks_html_and_figures(reported: Path) -> None:
    import nbformat

    out = reported / "reports"
    for name in render.NOTEBOOKS:
        nb = nbformat.read(out / "notebooks" / f"{name}.ipynb", as_version=4)
        errors = [
            o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"
        ]
        assert not errors, f"{name}: {errors}"
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), name
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells), name
        html = (out / "html" / f"{name}.html").read_text()
        assert len(html) > 1000 and "data:image/png;base64" in html, name
    figs = out / "figures"
    for fname in expected_figures():
        (assert_real_png if fname.endswith(".png") else assert_real_pdf)(figs / fname)
    assert not list(figs.glob("compare_*")), "compare figures are not the report stage's (not DVC outputs)"
    for f in plots.FILES.values():
        assert len(pd.read_csv(out / "plots" / f)), f
    # the compare stage's rendering, beside (git-ignored)
    comp = out / render.COMPARE_DIR
    for p in render.compare_outputs(comp):
        assert p.is_file() and p.stat().st_size > 0, p
    assert "data:image/png;base64" in (comp / "compare_runs.html").read_text()


@pytest.mark.slow
def test_report_figures_are_logged_to_the_training_run(reported: Path) -> None:
    from mlflow.tracking import MlflowClient

    run_id = (reported / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    c = MlflowClient(tracking_uri=f"sqlite:///{reported / 'mlflow.db'}")
    logged = {Path(a.path).name for a in c.list_artifacts(run_id, "report/figures")}
    assert set(expected_figures()) <= logged
    assert {f"{n}.html" for n in render.NOTEBOOKS} <= {
        Path(a.path).name for a in c.list_artifacts(run_id, "report/html")
    }


def _report_digests(root: Path) -> dict[str, str]:
    out = root / "reports"
    return {f"{d}/{k}": v for d in ("figures", "notebooks", "html", "plots") for k, v in digests(out / d).items()}


@pytest.mark.slow
def test_report_rerun_is_byte_identical(reported: Path, tmp_path: Path) -> None:
    """Every output of the report stage (git-tracked, hashed by DVC) is the same bytes on a rerun and in a
    copy of the project at another path, and holds no run id, absolute path or time stamp."""
    from conftest import run_stage, side_by_side

    before = _report_digests(reported)
    moved = tmp_path / "elsewhere" / "clone"
    shutil.copytree(reported, moved, symlinks=True)
    side_by_side(lambda: run_stage(reported, "report"), lambda: run_stage(moved, "report"))
    after = _report_digests(reported)
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert not changed, f"report outputs differ on rerun: {changed}"

    elsewhere = _report_digests(moved)
    changed = [k for k in before if before[k] != elsewhere.get(k)]
    assert not changed, f"report outputs depend on the project's path: {changed}"

    run_id = (reported / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    for d in ("notebooks", "html"):
        for f in (reported / "reports" / d).iterdir():
            text = f.read_text()
            for bad in (run_id, str(reported), str(tmp_path), '"start_time"', '"duration"', '"input_path"'):
                assert bad not in text, f"{f.name} holds {bad}"
            assert "sqlite:///mlflow.db" in text, f.name


@pytest.mark.slow
def test_compare_stage_skips_when_no_run_has_landed(reported: Path) -> None:
    """The report reruns above resumed and re-ended the training run; nothing the comparison shows changed."""
    from conftest import run_stage

    res = run_stage(reported, "compare")
    assert render.NO_NEW_RUNS in res.stdout, res.stdout


@pytest.mark.slow
def test_eval_report_notebook_runs_alone_through_papermill(reported: Path, tmp_path: Path) -> None:
    """A notebook is also usable by hand: run with only its documented parameters (the rest resolved
    from params.yaml and the train stage's run id), it saves the same figures."""
    import papermill as pm

    out_nb, figs = tmp_path / "eval_report.ipynb", tmp_path / "figs"
    pm.execute_notebook(
        str(reported / "notebooks" / "eval_report.ipynb"),
        str(out_nb),
        kernel_name=render.KERNEL,
        parameters={"figures_dir": str(figs)},
        cwd=str(reported),
        progress_bar=False,
    )
    ref = digests(reported / "reports" / "figures")
    for stem in render.EXPECTED_FIGURES["eval_report"]:
        assert_real_png(figs / f"{stem}.png")
        assert hashlib.sha256((figs / f"{stem}.png").read_bytes()).hexdigest() == ref[f"{stem}.png"], stem
    meta = json.loads(out_nb.read_text())["metadata"]["papermill"]
    assert meta["parameters"] == {"figures_dir": str(figs)}
