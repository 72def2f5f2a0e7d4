"""What every DVC stage script shares: validate all of ``params.yaml`` first, then work.

A stage that fails on a :class:`~coordexp.core.errors.UserError` prints one ``error:`` line naming the
file/line/field and exits 2, instead of a traceback that buries the cause (``COORDEXP_DEBUG=1`` shows
the traceback too). Any other exception is a bug here and keeps its full traceback.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from coordexp.core import paths
from coordexp.core.config import Params, load_params
from coordexp.core.errors import UserError


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def stage_main(name: str) -> Callable[[Callable[[Params, Path], Any]], Callable[[], None]]:
    def wrap(fn: Callable[[Params, Path], Any]) -> Callable[[], None]:
        @functools.wraps(fn)
        def run() -> None:
            root = paths.project_root()
            t0 = time.time()
            # SIGTERM (a scheduler, `kill`, Ctrl-C of dvc) unwinds like an exception, so MLflow runs
            # are closed and children stopped instead of the process vanishing mid-write.
            signal.signal(signal.SIGTERM, _terminate)
            try:
                params = load_params(paths.params_file(root))
                fn(params, root)
            except UserError as exc:  # the user's to fix: one line; anything else keeps its traceback
                if os.environ.get("COORDEXP_DEBUG"):
                    raise
                msg = str(exc).strip() or type(exc).__name__
                print(f"error: [{name}] {msg}", file=sys.stderr)
                sys.exit(2)
            print(f"[{name}] done in {time.time() - t0:.1f}s")

        return run

    return wrap
