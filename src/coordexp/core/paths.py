"""Where things live. Every stage resolves paths through here, never from its own cwd guesses.

The project root is the nearest folder (from the working directory up) holding both ``dvc.yaml``
and ``params.yaml``; ``COORDEXP_ROOT`` overrides. DVC runs each stage at the root of the
workspace it executes, which for ``dvc exp run --queue`` is a temporary copy: paths of the
*inputs and outputs* follow that copy, while the MLflow store is resolved by
:mod:`coordexp.pipeline.tracking` so that experiments land in the user's own store.
"""

from __future__ import annotations

import os
from pathlib import Path

_PACKAGE_ROOT = Path(__file__).resolve().parents[3]


def project_root(start: Path | None = None) -> Path:
    env = os.environ.get("COORDEXP_ROOT")
    if env:
        return Path(env).resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "params.yaml").is_file():
            return folder
    return _PACKAGE_ROOT


def resolve(path: str | Path, root: Path | None = None) -> Path:
    """A path from ``params.yaml``: absolute stays absolute, relative is relative to the root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else (root or project_root()) / p


def params_file(root: Path | None = None) -> Path:
    return (root or project_root()) / "params.yaml"


def metrics_dir(root: Path | None = None) -> Path:
    return (root or project_root()) / "reports" / "metrics"


def lvis_fields_file(out_dir: Path, split: str) -> Path:
    """Where ``preprocess`` writes an LVIS split's federated fields beside its JSONL, and ``evaluate`` reads them
    (:mod:`coordexp.preprocess.lvis`)."""
    return Path(out_dir) / f"{split}.lvis.json"
