"""HF's MLflow callback, made to survive a tracking server that goes away.

The trainer (:class:`coordexp.train.trainer.CoordExpTrainer`) puts :class:`OutageAwareMLflowCallback` in place
of ``transformers``' ``MLflowCallback`` when the run logs to an HTTP server. It logs what the original logs,
with two differences:

* each point is sent before training goes on (HF sends them from MLflow's background queue, where a failure
  is only a warning and the points are gone). While the server is away MLflow's client retries, up to
  ``tracking.outage_limit_s`` (:func:`coordexp.pipeline.tracking.retry_env`): a restart only pauses training;
* when the retries run out and the server does not answer ``/health``, the outage is longer than the limit:
  the point and every later one are kept in :data:`~coordexp.train.swift_config.KEPT_METRICS_FILE`, the
  trainer is asked for a checkpoint and a stop at this step, :data:`~coordexp.train.swift_config.TRACKING_OUTAGE_FILE`
  tells the stage, and the server is not called again (the run stays open there, to be resumed).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from transformers.integrations import MLflowCallback

from coordexp.train.swift_config import KEPT_METRICS_FILE, TRACKING_OUTAGE_FILE


def _answers(uri: str) -> bool:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:  # noqa: S310 - the run's URI
            return resp.status < 400
    except OSError:
        return False


class _Client:
    """The ``mlflow`` module as the callback sees it: ``log_metrics`` sends synchronously and remembers the
    points, or, once offline, appends them to the kept file instead; everything else is ``mlflow``'s own."""

    def __init__(self, mlflow: Any, kept: Path):
        self._mlflow, self._kept = mlflow, kept
        self.offline = False
        self.last: tuple[dict[str, float], int | None] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._mlflow, name)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None, **_: Any) -> None:
        self.last = (dict(metrics), step)
        if self.offline:
            self.keep()
        else:
            self._mlflow.log_metrics(metrics, step=step)

    def keep(self) -> None:
        metrics, step = self.last
        row = {"step": step, "timestamp": int(time.time() * 1000), "metrics": metrics}
        with self._kept.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


class OutageAwareMLflowCallback(MLflowCallback):
    """See the module docstring."""

    def __init__(self, output_dir: str | Path, limit_s: int):
        super().__init__()
        self._out = Path(output_dir)
        self._limit_s = limit_s
        self._ml_flow = _Client(self._ml_flow, self._out / KEPT_METRICS_FILE)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any], model: Any = None, **kw: Any) -> Any:
        client = self._ml_flow
        try:
            super().on_log(args, state, control, logs, model=model, **kw)
        except Exception as exc:  # MlflowException / requests errors once the retries ran out
            uri = os.environ.get("MLFLOW_TRACKING_URI", "")
            if client.offline or client.last is None or _answers(uri):
                raise  # not an outage: the server is up and refused the points
            self._go_offline(state.global_step, uri, exc)
        if client.offline:
            control.should_save = True  # the checkpoint the resume starts from
            control.should_training_stop = True
        return control

    def _go_offline(self, step: int, uri: str, exc: Exception) -> None:
        self._ml_flow.offline = True
        self._ml_flow.keep()
        self._auto_end_run = False  # the run stays open on the server, to be resumed
        os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"  # whatever still calls it at exit fails at once
        self._out.mkdir(parents=True, exist_ok=True)
        note = {"step": step, "uri": uri, "limit_s": self._limit_s, "error": str(exc).splitlines()[0][:500]}
        (self._out / TRACKING_OUTAGE_FILE).write_text(json.dumps(note, indent=2))
        print(
            f"[coordexp] the MLflow tracking server at {uri} did not answer for {self._limit_s} s "
            f"(tracking.outage_limit_s) at step {step}: saving a checkpoint and stopping",
            file=sys.stderr,
            flush=True,
        )

    def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> Any:
        if not self._ml_flow.offline:
            return super().on_train_end(args, state, control, **kw)
        return None
