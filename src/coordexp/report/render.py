"""The ``report`` and ``compare`` stages: execute the notebooks with papermill, make the executed
notebooks reproducible, render them to HTML, check the figures they saved.

The ``report`` stage's notebooks, HTML, figures and plot data are DVC outputs committed to git, so
they must be byte-identical on a rerun and in a clone at another path: every notebook parameter
derives from ``params.yaml`` (paths relative to the root), and :func:`scrub_notebook` removes what
papermill and the kernel add that varies (time stamps, durations, absolute paths, MLflow run ids).

The ``compare`` stage reads every run of the local MLflow store, which no clone shares, so its
rendering is not a DVC output (``reports/compare/``, git-ignored). DVC runs it on every ``dvc
repro`` (``always_changed``); it re-renders only when the digest of the runs it would show, or of its
code and params, differs from the one stored beside the last rendering.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from coordexp.core import paths
from coordexp.core.checkpoint import FINAL_DIR, RUN_ID_FILE
from coordexp.core.errors import StageError
from coordexp.core.io import atomic_open, write_json
from coordexp.pipeline import tracking
from coordexp.report import plots

NOTEBOOKS: tuple[str, ...] = ("training_diagnostics", "eval_report")
"""The ``report`` stage's notebooks under ``notebooks/``, in execution order."""

COMPARE_NOTEBOOK = "compare_runs"
"""The ``compare`` stage's notebook: every finished training run of the MLflow experiment."""

KERNEL = "python3"

EXPECTED_FIGURES: dict[str, tuple[str, ...]] = {
    "training_diagnostics": ("train_curves", "train_grad_norm"),
    "eval_report": (
        "eval_readouts",
        "eval_reliability",
        "eval_per_class_ap",
        "eval_pr_curves",
        "eval_predictions_grid",
        "eval_coord_errors",
        "eval_coord_distribution",
    ),
    COMPARE_NOTEBOOK: (
        "compare_map_vs_weights",
        "compare_train_curves",
        "compare_loss_kinds",
        "compare_readouts_by_loss",
    ),
}
"""Figures each notebook always saves (stem names; each as .png and .pdf). ``training_diagnostics``
also saves ``train_token_types`` when the run logged token-type metrics."""

OPTIONAL_FIGURES: dict[str, tuple[str, ...]] = {"training_diagnostics": ("train_token_types",)}

COMPARE_DIR = "compare"
"""``<report.out_dir>/compare``: the compare stage's notebook, HTML, figures and digest (git-ignored)."""

DIGEST_FILE = "digest.json"
"""Beside the compare rendering: the digest it was rendered from and the runs it shows."""

NO_NEW_RUNS = "compare_runs: no new runs since the last rendering"

RUN_ID_PLACEHOLDER = "<mlflow run id>"
"""What a run id becomes in a rendered report: ids are random, the report must not be."""

_VOLATILE_NB_KEYS = ("start_time", "end_time", "duration", "input_path", "output_path")
_VOLATILE_CELL_KEYS = ("start_time", "end_time", "duration")


class ReportError(StageError):
    """A notebook failed or did not produce its figures; the message names the notebook and cell."""


def notebook_parameters(params: Any, root: Path, figures_dir: Path) -> dict[str, dict[str, Any]]:
    """papermill parameters of each notebook, all derived from ``params.yaml`` (paths relative to the root).

    Neither the run id nor the tracking URI is passed: the notebooks resolve both the way the stages
    do, and the injected-parameters cell (part of the committed notebook) stays free of a random id
    and of the machine's paths.
    """

    def rel(p: Path) -> str:
        p = Path(p)
        return str(p.relative_to(root)) if p.is_relative_to(root) else str(p)

    common = {
        "params_file": rel(paths.params_file(root)),
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
        COMPARE_NOTEBOOK: dict(common),
    }


def check_figures(figures_dir: Path, notebook: str) -> list[Path]:
    """The expected figures of ``notebook`` (PNG and PDF), or :class:`ReportError` naming the missing ones."""
    expected = [figures_dir / f"{stem}.{ext}" for stem in EXPECTED_FIGURES[notebook] for ext in ("png", "pdf")]
    missing = [p.name for p in expected if not p.is_file() or p.stat().st_size == 0]
    if missing:
        raise ReportError(f"notebook {notebook} did not save {missing} in {figures_dir}")
    return expected


def path_replacements(root: Path) -> dict[str, str]:
    """Absolute prefixes to make relative in a rendered notebook: the project root and the MLflow
    store root (the real repository when a DVC experiment runs in a temporary copy), as given and
    resolved. ``sqlite:////abs/repo/mlflow.db`` thus reads ``sqlite:///mlflow.db``."""
    out: dict[str, str] = {}
    for base in (root, tracking.store_root(root)):
        for form in {str(Path(base)), str(Path(base).resolve())}:
            if form not in ("", "/", "."):
                out[form + "/"] = ""
                out[form] = "."
    return out


def scrub_notebook(nb: Any, replacements: Mapping[str, str], redact: Iterable[str] = ()) -> Any:
    """Make an executed notebook a function of its inputs: the same bytes on every rerun and at any path.

    Removes papermill's time stamps, durations and input/output paths (notebook and cell
    metadata) and the kernel's ``execution`` timings, and gives papermill's injected-parameters cell a
    fixed id instead of a random one; in every source, text output and metadata
    string, replaces each key of ``replacements`` (longest first) by its value and each string of
    ``redact`` (MLflow run ids) by :data:`RUN_ID_PLACEHOLDER`. Image outputs (base64) are left alone.
    Works in place on an ``nbformat`` node or a plain dict and returns it.
    """
    # a prefix ending in "/" is replaced wherever it occurs; a bare path only where it ends
    # (so /repo never rewrites /repo2), longest first so a nested root wins over its parent
    subs = [
        (re.compile(re.escape(old) + ("" if old.endswith("/") else r"(?![\w.\-])")), new)
        for old, new in sorted(replacements.items(), key=lambda kv: -len(kv[0]))
    ]
    secrets = sorted({s for s in redact if s}, key=len, reverse=True)

    def clean(text: str) -> str:
        for s in secrets:
            text = text.replace(s, RUN_ID_PLACEHOLDER)
        for pattern, new in subs:
            text = pattern.sub(lambda _m, new=new: new, text)
        return text

    def walk(obj: Any, key: str = "") -> Any:
        if isinstance(obj, str):
            return obj if key.startswith("image/") else clean(obj)
        if isinstance(obj, list):
            return [walk(v, key) for v in obj]
        if isinstance(obj, dict):
            for k in list(obj):
                obj[k] = walk(obj[k], k)
            return obj
        return obj

    meta = nb["metadata"]
    for k in _VOLATILE_NB_KEYS:
        meta.get("papermill", {}).pop(k, None)
    for cell in nb["cells"]:
        if "injected-parameters" in cell["metadata"].get("tags", []) and "id" in cell:
            cell["id"] = "injected-parameters"  # papermill gives the cell it adds a random id
        cell["metadata"].pop("execution", None)
        for k in _VOLATILE_CELL_KEYS:
            cell["metadata"].get("papermill", {}).pop(k, None)
    return walk(nb)


def execute_notebook(
    name: str,
    root: Path,
    nb_path: Path,
    html_path: Path,
    parameters: Mapping[str, Any],
    redact: Iterable[str] = (),
) -> None:
    """Execute ``notebooks/<name>.ipynb`` into ``nb_path`` (scrubbed) and render ``html_path`` from it.

    A failing cell is a :class:`ReportError` naming the cell, with the executed notebook (and its
    traceback) left at ``nb_path``.
    """
    # lazy: papermill, nbformat and nbconvert take seconds to import; only the stage runs need them
    import nbformat
    import papermill as pm
    from nbconvert import HTMLExporter

    src = root / "notebooks" / f"{name}.ipynb"
    print(f"[report] executing {src.relative_to(root)} -> {nb_path.relative_to(root)}", flush=True)
    try:
        pm.execute_notebook(
            str(src),
            str(nb_path),
            parameters=dict(parameters),
            kernel_name=KERNEL,
            cwd=str(root),
            progress_bar=False,
            log_output=False,
        )
    except pm.PapermillExecutionError as exc:
        raise ReportError(
            f"notebook {name} failed in cell {exc.exec_count}: {exc.ename}: {exc.evalue} "
            f"(the executed notebook with the traceback is {nb_path})"
        ) from None
    nb = scrub_notebook(nbformat.read(nb_path, as_version=4), path_replacements(root), redact)
    with atomic_open(nb_path) as fh:
        nbformat.write(nb, fh)
    body, _ = HTMLExporter().from_notebook_node(nb)
    with atomic_open(html_path) as fh:
        fh.write(body)


def render_reports(params: Any, root: Path) -> dict[str, Any]:
    """The ``report`` stage: plot data, then the two notebooks executed, scrubbed and rendered to HTML;
    figures and HTML logged to the training run.

    Outputs (under ``report.out_dir``): ``plots/*.csv`` (for ``dvc plots``),
    ``notebooks/<name>.ipynb`` (executed), ``html/<name>.html`` and ``figures/*.{png,pdf}``
    (saved by the notebooks). The folders are emptied first so a figure that a notebook stopped
    producing does not linger in the committed report.
    """
    # lazy: mlflow takes seconds to import; only the stage run needs it
    import mlflow

    out = paths.resolve(params.report.out_dir, root)
    nb_dir, html_dir, fig_dir, plot_dir = out / "notebooks", out / "html", out / "figures", out / "plots"
    run_id = tracking.run_id_of(params, root)
    if not run_id:
        raise FileNotFoundError(
            f"{paths.resolve(params.train.out_dir, root)}/{RUN_ID_FILE}: missing; run `dvc repro train` first"
        )
    eval_dir = paths.resolve(params.evaluate.out_dir, root)
    for need in (paths.metrics_dir(root) / "eval.json", eval_dir / "predictions.jsonl"):
        if not need.is_file():
            raise FileNotFoundError(f"{need}: missing; run `dvc repro evaluate` first")
    tracking.check_reachable(tracking.tracking_uri(params, root))
    for d in (nb_dir, html_dir, fig_dir, plot_dir):
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    plots.write_plot_data(out / "train_history.csv", eval_dir, plot_dir, paths.metrics_dir(root) / "eval.json")
    nb_params = notebook_parameters(params, root, fig_dir)
    figures: list[Path] = []
    for name in NOTEBOOKS:
        execute_notebook(
            name, root, nb_dir / f"{name}.ipynb", html_dir / f"{name}.html", nb_params[name], redact=[run_id]
        )
        figures += check_figures(fig_dir, name)
    with tracking.stage_run(params, "report", run_id=run_id):
        mlflow.log_artifacts(str(fig_dir), "report/figures")
        mlflow.log_artifacts(str(html_dir), "report/html")
    all_figs = sorted(p.name for p in fig_dir.iterdir())
    return {"run_id": run_id, "notebooks": list(NOTEBOOKS), "figures": all_figs}


def code_digest(params: Any, root: Path) -> str:
    """What the compare rendering is a function of, besides the runs: the notebook, the package's
    code and the ``tracking`` / ``report`` params. A change to any of them re-renders although no
    run is new (DVC reruns the stage, but the stage itself decides whether to render)."""
    import coordexp

    h = hashlib.sha256()
    pkg = Path(coordexp.__file__).resolve().parent
    files = [root / "notebooks" / f"{COMPARE_NOTEBOOK}.ipynb"] + sorted(pkg.rglob("*.py"))
    for f in files:
        name = str(f.relative_to(pkg)) if f.is_relative_to(pkg) else f.name
        h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    sections = {"tracking": params.tracking.model_dump(mode="json"), "report": params.report.model_dump(mode="json")}
    h.update(json.dumps(sections, sort_keys=True).encode())
    return h.hexdigest()


def compare_outputs(out_dir: Path) -> list[Path]:
    """The files a complete compare rendering has (a missing one forces a re-render)."""
    figs = [out_dir / "figures" / f"{s}.{e}" for s in EXPECTED_FIGURES[COMPARE_NOTEBOOK] for e in ("png", "pdf")]
    return [out_dir / f"{COMPARE_NOTEBOOK}.ipynb", out_dir / f"{COMPARE_NOTEBOOK}.html", *figs]


def render_compare(params: Any, root: Path, *, force: bool = False) -> dict[str, Any]:
    """The ``compare`` stage: render ``compare_runs`` into ``<report.out_dir>/compare/`` when the
    finished training runs it would show (or its code / params) changed since the last rendering.

    The digest (:func:`coordexp.report.compare.runs_digest` of the runs plus :func:`code_digest`) is
    stored in ``compare/digest.json`` once the rendering is complete, so an interrupted rendering
    is redone next time. Returns ``rendered`` (bool), ``digest``, ``runs`` (ids shown) and ``out_dir``.
    """
    from coordexp.report import compare, runs

    uri = tracking.tracking_uri(params, root)
    tracking.check_reachable(uri)
    shown = compare.finished_runs(runs.runs_table(uri, params.tracking.experiment))
    digest = hashlib.sha256(f"{compare.runs_digest(shown)}:{code_digest(params, root)}".encode()).hexdigest()
    out_dir = paths.resolve(params.report.out_dir, root) / COMPARE_DIR
    digest_file = out_dir / DIGEST_FILE
    result = {"digest": digest, "runs": list(shown["run_id"]), "out_dir": out_dir}
    if not force and digest_file.is_file() and all(p.is_file() for p in compare_outputs(out_dir)):
        try:
            previous = json.loads(digest_file.read_text()).get("digest")
        except (ValueError, AttributeError):
            previous = None
        if previous == digest:
            print(NO_NEW_RUNS, flush=True)
            return {**result, "rendered": False}
    if out_dir.exists():
        shutil.rmtree(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True)
    nb_params = notebook_parameters(params, root, fig_dir)[COMPARE_NOTEBOOK]
    name = COMPARE_NOTEBOOK
    execute_notebook(name, root, out_dir / f"{name}.ipynb", out_dir / f"{name}.html", nb_params)
    check_figures(fig_dir, name)
    write_json(digest_file, {"digest": digest, "runs": result["runs"]})
    print(f"compare_runs: rendered {len(shown)} finished run(s) into {out_dir.relative_to(root)}", flush=True)
    return {**result, "rendered": True}


def force_requested(argv: list[str] | None = None) -> bool:
    """``--force`` on the compare stage's command line renders whatever the digest says."""
    return "--force" in (sys.argv[1:] if argv is None else argv)
