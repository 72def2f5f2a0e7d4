"""A fresh working copy of a project: what a new clone would hold, in its own git repository.

Tests run the real pipeline in such copies, and ``bench/levers.py`` runs one copy per variant, so
neither touches the user's outputs, MLflow store or DVC cache.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path


def copy_project(source: Path, dest: Path, *, exclude: Iterable[str] = ("reports",)) -> Path:
    """Copy ``source``'s tracked and untracked-but-not-ignored files into ``dest`` and commit them there.

    Top-level folders in ``exclude`` are left out (``reports/metrics`` is created empty, as the
    stages expect it); ignored outputs (``artifacts``, ``mlflow.db``, ``.venv``) never travel.
    Returns ``dest``.
    """
    skip = set(exclude)
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=source,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for rel in files:
        if rel.split("/", 1)[0] in skip or not (source / rel).is_file():
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / rel, target)
    (dest / "reports" / "metrics").mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "coordexp",
        "GIT_AUTHOR_EMAIL": "coordexp@localhost",
        "GIT_COMMITTER_NAME": "coordexp",
        "GIT_COMMITTER_EMAIL": "coordexp@localhost",
    }
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "working copy"]):
        subprocess.run(cmd, cwd=dest, check=True, env=env, capture_output=True)
    return dest
