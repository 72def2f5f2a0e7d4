"""compare_runs (issue 19, item 6) and the compare stage's skip logic (item 5), on a real SQLite MLflow store
holding a few fake-but-real runs logged with ``mlflow.log_params`` / ``log_metrics``.

The runs mimic what the train and evaluate stages log: ``cfg.*`` params, a ``coordexp.loss`` tag, the
``train_summary.*`` metrics and the headline metrics (``f1_at_0.5`` as MLflow spells it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from coordexp.report import compare, render, runs

ROOT = Path(__file__).resolve().parents[1]
LONG_SOURCE = "/models/" + "a-very-long-folder-name/" * 8 + "Qwen3-VL-2B-Instruct"


def log_run(
    exp: str,
    name: str,
    *,
    steps: int,
    n_train: int,
    loss: str = "stage1_softce_w1",
    w1: float = 2.0,
    m: float = 0.4,
    status: str = "FINISHED",
    base_source: str | None = None,
    readouts: dict[str, float] | None = None,
) -> str:
    """One training run as the train and evaluate stages would leave it."""
    import mlflow

    run = mlflow.start_run(experiment_id=exp, run_name=f"train/{name}")
    mlflow.set_tags({"coordexp.loss": loss, "coordexp.stage": "evaluate", "dvc.exp_name": name})
    mlflow.log_params(
        {
            "cfg.train.max_steps": steps,
            "cfg.train.coord_soft_ce_w1.enabled": loss == "stage1_softce_w1",
            "cfg.train.coord_soft_ce_w1.w1_weight": w1,
            "cfg.train.coord_soft_ce_w1.soft_ce_weight": 0.2,
            "cfg.train.coord_soft_ce_w1.gate_weight": 1.0,
            "cfg.preprocess.splits.train.annotations": "data/shapes/annotations/instances_train.json",
            "cfg.preprocess.max_side": "null",
            "cfg.build_base.mode": "expand" if base_source else "tiny",
            "cfg.build_base.expand.source": base_source or "null",
            "cfg.build_base.out_dir": "artifacts/base",
        }
    )
    for step in (10, 20):
        mlflow.log_metrics({"loss": 3.0 / step, "eval_loss": 3.5 / step}, step=step)
    mlflow.log_metrics(
        {"train_summary.train_samples": n_train, "bbox_mAP": m, "bbox_mAP50": m + 0.2, "f1_at_0.5": m + 0.1}
    )
    mlflow.log_metrics({f"readouts/{r}/bbox_mAP50": v for r, v in (readouts or {}).items()})
    mlflow.end_run(status=status)
    return run.info.run_id


@pytest.fixture
def store(mlflow_store: str) -> tuple[str, str]:
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    exp = mlflow.create_experiment("coordexp-stage1")
    return mlflow_store, exp


def test_runs_are_grouped_by_data_steps_and_base_and_never_averaged_across(store) -> None:
    uri, exp = store
    smoke = log_run(exp, "smoke", steps=60, n_train=24, m=0.05)
    full_a = log_run(exp, "w1-2", steps=2000, n_train=3000, w1=2.0, m=0.40)
    full_b = log_run(exp, "w1-half", steps=2000, n_train=3000, w1=0.5, m=0.44)
    ce = log_run(exp, "ce-baseline", steps=2000, n_train=3000, loss="ce_baseline", m=0.42)
    real = log_run(exp, "qwen", steps=2000, n_train=3000, m=0.70, base_source=LONG_SOURCE)
    log_run(exp, "crashed", steps=2000, n_train=3000, m=0.99, status="FAILED")

    table = compare.group_runs(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))
    assert len(table) == 5, "the failed run is not compared"
    group = dict(zip(table["run_id"], table["group"]))
    assert group[full_a] == group[full_b] == group[ce], "same data, steps and base: one group"
    assert len({group[smoke], group[full_a], group[real]}) == 3, "other data/steps, other base: other groups"
    assert "max_steps=60" in table.set_index("run_id").loc[smoke, "steps"]
    assert "train_summary.train_samples=24" in table.set_index("run_id").loc[smoke, "data"]
    assert "build_base.out_dir" not in table.loc[0, "base"], "where a base is written does not make it another base"

    groups = compare.groups_table(table)
    assert groups["n_runs"].sort_values().tolist() == [1, 1, 3]

    # means are per (group, loss kind): the 60-step run's 0.05 is never averaged with the 2000-step runs
    summary = compare.loss_kind_summary(table)
    s1 = summary.loc[(group[full_a], "stage1_softce_w1"), ("bbox_mAP", "mean")]
    assert s1 == pytest.approx(0.42) and summary.loc[(group[full_a], "stage1_softce_w1"), ("bbox_mAP", "count")] == 2
    assert summary.loc[(group[smoke], "stage1_softce_w1"), ("bbox_mAP", "mean")] == pytest.approx(0.05)
    assert summary.loc[(group[full_a], "ce_baseline"), ("f1_at_0.5", "mean")] == pytest.approx(0.52)

    # the params that differ, in full (long format: nothing cut to "...")
    differ = compare.params_that_differ(table)
    assert {"train.max_steps", "train.coord_soft_ce_w1.w1_weight", "build_base.expand.source"} <= set(differ["param"])
    assert LONG_SOURCE in differ["value"].tolist()
    assert "preprocess.splits.train.annotations" not in set(differ["param"]), "an equal param is not listed"
    assert len(differ) == differ["param"].nunique() * len(table)

    import matplotlib.pyplot as plt

    for fig in (compare.plot_metric_vs_params(table), compare.plot_loss_kinds(table)):
        plt.close(fig)


def test_readouts_by_loss_compares_stage1_and_ce_within_groups(store, tmp_path) -> None:
    """Stage-1 against the CE baseline by readout: means per (group, loss kind), never across groups."""
    import matplotlib.pyplot as plt

    from coordexp.report import figures

    uri, exp = store
    s1 = log_run(exp, "s1-a", steps=2000, n_train=3000, readouts={"argmax": 0.44, "median": 0.46})
    log_run(exp, "s1-b", steps=2000, n_train=3000, readouts={"argmax": 0.46, "median": 0.50})
    log_run(exp, "ce", steps=2000, n_train=3000, loss="ce_baseline", readouts={"argmax": 0.43, "median": 0.42})
    smoke = log_run(exp, "smoke", steps=60, n_train=24, readouts={"argmax": 0.01, "median": 0.02})
    log_run(exp, "old", steps=2000, n_train=3000)  # evaluated before readouts existed: counted in no mean
    table = compare.group_runs(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))
    by = compare.readouts_by_loss(table)
    group = dict(zip(table["run_id"], table["group"]))
    full = by.loc[(group[s1], "stage1_softce_w1")]
    assert full["median"] == pytest.approx(0.48) and full["argmax"] == pytest.approx(0.45) and full["n_runs"] == 2
    assert by.loc[(group[s1], "ce_baseline"), "median"] == pytest.approx(0.42)
    assert by.loc[(group[smoke], "stage1_softce_w1"), "median"] == pytest.approx(0.02)
    assert compare.readouts_by_loss(table, "bbox_mAP").empty, "nothing logged under that metric"
    figures.style()
    fig = compare.plot_readouts_by_loss(table)
    assert len([a for a in fig.axes if a.get_visible()]) == 2, "one panel per group"
    png, _ = figures.save_figure(fig, "r", tmp_path)
    plt.close(fig)
    assert png.stat().st_size > 1000


def test_runs_digest_changes_with_a_new_finished_run_only(store) -> None:
    uri, exp = store
    log_run(exp, "a", steps=30, n_train=24)
    first = compare.runs_digest(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))
    assert first == compare.runs_digest(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))
    log_run(exp, "running", steps=30, n_train=24, status="RUNNING")
    assert first == compare.runs_digest(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))
    log_run(exp, "b", steps=30, n_train=24)
    assert first != compare.runs_digest(compare.finished_runs(runs.runs_table(uri, "coordexp-stage1")))


def _compare_project(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    shutil.copy(ROOT / "notebooks" / "compare_runs.ipynb", root / "notebooks")
    shutil.copy(ROOT / "params.yaml", root)
    shutil.copy(ROOT / "dvc.yaml", root)
    return root


def test_compare_stage_renders_only_when_a_run_has_landed(store, tmp_path, monkeypatch, capsys) -> None:
    """Unchanged digest: no rendering and the message; a new finished run: rendered again; a missing output
    or --force: rendered again. The notebook execution itself is replaced by a stub that writes its outputs
    (the real one runs in test_report.py's slow test)."""
    from coordexp.core.config import load_params

    uri, exp = store
    root = _compare_project(tmp_path)
    params = load_params(root / "params.yaml")
    executed: list[str] = []

    def fake_execute(name, root_, nb_path, html_path, parameters, redact=()):
        executed.append(name)
        figs = root_ / parameters["figures_dir"]
        for stem in render.EXPECTED_FIGURES[name]:
            for ext in ("png", "pdf"):
                (figs / f"{stem}.{ext}").write_bytes(b"x")
        nb_path.write_text("{}")
        html_path.write_text("<html></html>")

    monkeypatch.setattr(render, "execute_notebook", fake_execute)
    log_run(exp, "a", steps=30, n_train=24)

    first = render.render_compare(params, root)
    assert first["rendered"] and len(executed) == 1
    stored = json.loads((root / "reports" / "compare" / render.DIGEST_FILE).read_text())
    assert stored["digest"] == first["digest"] and stored["runs"] == first["runs"]

    capsys.readouterr()
    again = render.render_compare(params, root)
    assert not again["rendered"] and len(executed) == 1
    assert render.NO_NEW_RUNS in capsys.readouterr().out

    log_run(exp, "b", steps=30, n_train=24)
    third = render.render_compare(params, root)
    assert third["rendered"] and len(executed) == 2 and len(third["runs"]) == 2

    (root / "reports" / "compare" / "compare_runs.html").unlink()
    assert render.render_compare(params, root)["rendered"] and len(executed) == 3
    assert render.render_compare(params, root, force=True)["rendered"] and len(executed) == 4
    assert render.force_requested(["--force"]) and not render.force_requested([])


def test_runs_table_reads_mlflow_dataset_digests(store) -> None:
    """A run that logged its data as MLflow dataset inputs is grouped by their digests."""
    import mlflow

    uri, exp = store
    rid = log_run(exp, "a", steps=30, n_train=24)
    with mlflow.start_run(run_id=rid):
        ds = mlflow.data.from_pandas(pd.DataFrame({"x": [1.0]}), name="train.jsonl", digest="abc123")
        mlflow.log_input(ds, context="training", tags={"coordexp.records": "24"})
    table = compare.group_runs(runs.runs_table(uri, "coordexp-stage1"))
    assert table.loc[0, "data_digest"] == "train.jsonl:abc123 (24 records)"
    assert "data_digest=train.jsonl:abc123 (24 records)" in table.loc[0, "data"]
