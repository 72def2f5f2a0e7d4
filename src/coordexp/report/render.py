"""The ``report`` stage: execute the three notebooks with papermill, render them to HTML, check the
figures they saved, and log figures and HTML to the training run.

Every notebook parameter derives from ``params.yaml``, so the stage's output is a function of the
files DVC tracks; the notebooks resolve the same values themselves when opened by hand.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from coordexp.core import paths
from coordexp.core.checkpoint import FINAL_DIR, RUN_ID_FILE
from coordexp.core.errors import StageError
from coordexp.pipeline import tracking

NOTEBOOKS: tuple[str, ...] = ("training_diagnostics", "eval_report", "compare_runs")
"""The notebooks under ``notebooks/``, in execution order."""

KERNEL = "python3"

EXPECTED_FIGURES: dict[str, tuple[str, ...]] = {
    "training_diagnostics": ("train_curves", "train_grad_norm"),
    "eval_report": (
        "eval_per_class_ap",
        "eval_pr_curves",
        "eval_predictions_grid",
        "eval_coord_errors",
        "eval_coord_distribution",
    ),
    "compare_runs": ("compare_map_vs_weights", "compare_train_curves", "compare_loss_kinds"),
}
"""Figures each notebook always saves (stem names; each as .png and .pdf). ``training_diagnostics``
also saves ``train_token_types`` when the run logged token-type metrics."""

OPTIONAL_FIGURES: dict[str, tuple[str, ...]] = {"training_diagnostics": ("train_token_types",)}


class ReportError(StageError):
    """A notebook failed or did not produce its figures; the message names the notebook and cell."""


def notebook_parameters(params: Any, root: Path, figures_dir: Path, run_id: str) -> dict[str, dict[str, Any]]:
    """papermill parameters of each notebook, all derived from ``params.yaml`` (paths relative to the root)."""

    def rel(p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    common = {
        "run_id": run_id,
        "params_file": rel(paths.params_file(root)),
        "tracking_uri": tracking.tracking_uri(params, root),
        "experiment": params.tracking.experiment,
        "figures_dir": rel(figures_dir),
    }
    pre = paths.resolve(params.preprocess.out_dir, root)
    return {
        "training_diagnostics": {
            **common,
            "history_csv": rel(paths.resolve(params.report.out_dir, root) / "train_history.csv"),
        },
        "eval_report": {
            **common,
            "metrics_json": rel(paths.metrics_dir(root) / "eval.json"),
            "eval_dir": rel(paths.resolve(params.evaluate.out_dir, root)),
            "val_jsonl": rel(pre / f"{params.evaluate.split}.jsonl"),
            "checkpoint": rel(paths.resolve(params.train.out_dir, root) / FINAL_DIR),
        },
        "compare_runs": dict(common),
    }


def check_figures(figures_dir: Path, notebook: str) -> list[Path]:
    """The expected figures of ``notebook`` (PNG and PDF), or :class:`ReportError` naming the missing ones."""
    expected = [figures_dir / f"{stem}.{ext}" for stem in EXPECTED_FIGURES[notebook] for ext in ("png", "pdf")]
    missing = [p.name for p in expected if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ReportError(f"notebook {notebook} did not save {missing} in {figures_dir}")
    return expected


def render_reports(params: Any, root: Path) -> dict[str, Any]:
    """Execute the three notebooks with papermill, convert them to HTML, log everything to MLflow.

    Outputs (under ``report.out_dir``): ``notebooks/<name>.ipynb`` (executed), ``html/<name>.html``
    and ``figures/*.{png,pdf}`` (saved by the notebooks). The three folders are emptied first so a
    figure that a notebook stopped producing does not linger in the committed report.
    """
    # lazy: papermill, nbformat, nbconvert and mlflow take seconds to import; only the stage run needs them
    import mlflow
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    out = paths.resolve(params.report.out_dir, root)
    nb_dir, html_dir, fig_dir = out / "notebooks", out / "html", out / "figures"
    run_id = tracking.run_id_of(params, root)
    if not run_id:
        raise FileNotFoundError(
            f"{paths.resolve(params.train.out_dir, root)}/{RUN_ID_FILE}: missing; run `dvc repro train` first"
        )
    for need in (
        paths.metrics_dir(root) / "eval.json",
        paths.resolve(params.evaluate.out_dir, root) / "predictions.jsonl",
    ):
        if not need.is_file():
            raise FileNotFoundError(f"{need}: missing; run `dvc repro evaluate` first")
    tracking.check_reachable(tracking.tracking_uri(params, root))
    for d in (nb_dir, html_dir, fig_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    nb_params = notebook_parameters(params, root, fig_dir, run_id)
    exporter = HTMLExporter()
    figures: list[Path] = []
    for name in NOTEBOOKS:
        src, dst = root / "notebooks" / f"{name}.ipynb", nb_dir / f"{name}.ipynb"
        print(f"[report] executing {src.relative_to(root)} -> {dst.relative_to(root)}", flush=True)
        try:
            pm.execute_notebook(
                str(src),
                str(dst),
                parameters=nb_params[name],
                kernel_name=KERNEL,
                cwd=str(root),
                progress_bar=False,
                log_output=False,
            )
        except pm.PapermillExecutionError as exc:
            raise ReportError(
                f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
                f"(the executed notebook with the traceback is {dst})"
            ) from None
        body, _ = exporter.from_notebook_node(nbformat.read(dst, as_version=4))
        (html_dir / f"{name}.html").write_text(body, encoding="utf-8")
        figures += check_figures(fig_dir, name)
    with tracking.stage_run(params, "report", run_id=run_id):
        mlflow.log_artifacts(str(fig_dir), "report/figures")
        mlflow.log_artifacts(str(html_dir), "report/html")
    all_figs = sorted(p.name for p in fig_dir.iterdir())
    return {"run_id": run_id, "notebooks": list(NOTEBOOKS), "figures": all_figs}
