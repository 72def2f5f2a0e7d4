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

from coordexp.core.errors import UserError

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


class PathEscapeError(UserError, ValueError):
    """A path written inside a data file that leads out of the folder it must stay in."""


def inside(root: str | Path, rel: str | Path, *, where: str) -> Path:
    """``root / rel`` resolved (symlinks followed) if it stays inside ``root``; else a :class:`PathEscapeError`.

    The one guard for every path a data file names (a COCO ``file_name``, a contract record's image, a checkpoint
    reference's file): such a path is data, not a way to reach whatever file the process may read. An absolute
    path, ``..`` parts or a symlink that lead out of ``root`` are refused; ``where`` (file, line, record or image
    id) starts the message. Paths the user names on a command line are theirs to choose and do not come here.
    """
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if base not in target.parents:
        raise PathEscapeError(
            f"{where}: path {str(rel)!r} leads out of {base} (to {target}); a path inside a data file must stay "
            "inside its folder (no absolute path, no '..', no symlink to elsewhere): copy the file into the folder"
        )
    return target
