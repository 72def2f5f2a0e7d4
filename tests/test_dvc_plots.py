"""``dvc plots`` (issue 19, item 5): the top-level ``plots`` of ``dvc.yaml`` load from the committed report files
with the real ``dvc``, offline, in a copy of the repository's plot inputs; the report stage's plot files
have fixed columns and are rewritten byte-identically."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from conftest import stage_env

from coordexp.report import plots

ROOT = Path(__file__).resolve().parents[1]


def _declared() -> list[str]:
    """Names of the top-level plots: the title of a defined plot, or the file of an image plot."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    return [p if isinstance(p, str) else next(iter(p)) for p in spec]


def _plot_files() -> set[str]:
    out = set()
    for p in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]:
        if isinstance(p, str):
            out.add(p)
        else:
            out |= set(next(iter(p.values()))["y"])
    return out


def test_dvc_plots_show_loads_every_declared_plot(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "dvc.yaml", repo)
    shutil.copy(ROOT / "params.yaml", repo)
    for f in _plot_files():
        assert (ROOT / f).is_file(), f"{f}: declared in dvc.yaml plots but not committed (run the report stage)"
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / f, repo / f)
    env = stage_env()
    for cmd in (["git", "init", "-q"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True, timeout=120)
    res = subprocess.run(
        ["dvc", "plots", "show", "--json"], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "No plots were loaded" not in res.stdout + res.stderr
    shown = json.loads(res.stdout)
    assert not shown.get("errors"), shown.get("errors")
    data = shown["data"]
    assert set(_declared()) <= set(data), f"not loaded: {set(_declared()) - set(data)}"
    for name, rendered in data.items():
        (r,) = rendered
        if r["type"] == "vega":
            assert r["content"]["data"]["values"], f"{name}: no data points"
        else:
            assert r["type"] == "image" and r["url"].endswith(".png"), name
    # the HTML page a user opens: every plot present
    out = tmp_path / "html"
    res = subprocess.run(
        ["dvc", "plots", "show", "-o", str(out)], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    page = (out / "index.html").read_text()
    assert page.count("vegaEmbed(") == sum(r[0]["type"] == "vega" for r in data.values())


def test_plot_frames_have_fixed_columns_and_split_train_from_eval() -> None:
    hist = pd.DataFrame(
        {
            "step": [1, 10, 10, 20, 20],
            "split": ["train", "train", "eval", "train", "eval"],
            "loss": [3.0, 2.0, 2.5, 1.5, 2.0],
            "learning_rate": [1e-3, 1e-3, np.nan, 5e-4, np.nan],
            "train_runtime": [np.nan] * 5,
        }
    )
    train, ev = plots.history_frames(hist)
    assert list(train.columns) == ["step", *plots.TRAIN_CURVES] and list(ev.columns) == ["step", *plots.EVAL_CURVES]
    assert train["step"].tolist() == [1, 10, 20] and ev["loss"].tolist() == [2.5, 2.0]
    assert train["coord_softce_w1/w1"].isna().all(), "a metric the run did not log is an empty column"

    pr = plots.pr_curve_frame([0.0, 0.5, 1.0], {"a": [1.0, 0.5, -1], "b": [0.5, 0.5, -1]})
    assert pr["recall"].tolist() == [0.0, 0.5] and pr["precision"].tolist() == [0.75, 0.5]
    ap = plots.per_class_ap_frame({"b": 0.2, "a": 0.1}, {"a": 0.3, "b": 0.4})
    assert ap.to_dict("list") == {"class": ["a", "b"], "AP": [0.1, 0.2], "AP50": [0.3, 0.4]}


def test_write_plot_data_is_byte_identical(tmp_path: Path) -> None:
    hist = tmp_path / "h.csv"
    hist.write_text("step,split,loss,token_acc\n1,train,3.0,0.1\n10,train,2.0,0.5\n10,eval,2.5,0.4\n")
    ev = tmp_path / "eval"
    ev.mkdir()
    gt = {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "red circle"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 0}
        ],
    }
    (ev / "coco_gt.json").write_text(json.dumps(gt))
    (ev / "coco_results.json").write_text(
        json.dumps([{"image_id": 1, "category_id": 1, "bbox": [11, 10, 30, 30], "score": 0.9}])
    )
    metrics = tmp_path / "eval.json"
    metrics.write_text(json.dumps({"readouts": {"median": {"bbox_mAP50": 0.5, "bbox_mAP": 0.25}}}))
    a = plots.write_plot_data(hist, ev, tmp_path / "a", metrics)
    b = plots.write_plot_data(hist, ev, tmp_path / "b", metrics)
    assert [p.name for p in a] == list(plots.FILES.values())
    for p, q in zip(a, b):
        assert p.read_bytes() == q.read_bytes(), p.name
    ap = pd.read_csv(tmp_path / "a" / "per_class_ap.csv")
    assert ap["class"].tolist() == ["red circle"] and ap["AP50"].tolist() == [1.0]
    ro = pd.read_csv(tmp_path / "a" / "readouts.csv")
    assert ro["readout"].tolist() == list(plots.READOUTS), "every readout a row, in a fixed order"
    assert ro.set_index("readout").loc["median", "bbox_mAP50"] == 0.5 and ro["bbox_mAP"].isna().sum() == 3
