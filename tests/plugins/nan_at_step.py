"""Test-only ms-swift plugin: the Stage-1 loss sees NaN inputs at one optimizer step.

tests/test_reliability.py lists this file in ``train.swift_plugins`` (loaded after the project's
own plugin) and names the step in the environment variable :data:`STEP_ENV`, read once here. It
wraps the registered Stage-1 loss: at that training step the logits (and, for the fused loss, the
last hidden states) are multiplied by NaN before the real loss runs, so the NaN guard must stop
training there. It sits alone in its folder because ms-swift puts a plugin's folder on ``sys.path``.
"""

from __future__ import annotations

import os
from typing import Any

from swift.loss import loss_map

from coordexp.train.swift_plugin import LOSS_NAME, register

STEP_ENV = "COORDEXP_TEST_NAN_AT_STEP"

if not os.environ.get(STEP_ENV):
    raise RuntimeError(f"tests/plugins/nan_at_step.py needs {STEP_ENV} (the optimizer step to poison)")
NAN_STEP = int(os.environ[STEP_ENV])

register()  # the project's loss must be in loss_map to be wrapped, whichever plugin loads first
_Stage1 = loss_map[LOSS_NAME]


def _poisoned(outputs: Any) -> Any:
    if getattr(outputs, "logits", None) is not None:
        outputs.logits = outputs.logits * float("nan")
    hidden = getattr(outputs, "hidden_states", None)
    if hidden is not None:
        outputs.hidden_states = (*hidden[:-1], hidden[-1] * float("nan"))
    return outputs


class NanAtStepLoss(_Stage1):
    """The registered Stage-1 loss, fed NaN at training step :data:`NAN_STEP`."""

    nan_at_step = NAN_STEP

    def __call__(self, outputs: Any, labels: Any, *, trainer: Any = None, **kwargs: Any) -> Any:
        t = trainer or self.trainer
        if t.model.training and int(t.state.global_step) == NAN_STEP:
            outputs = _poisoned(outputs)
        return super().__call__(outputs, labels, trainer=trainer, **kwargs)


if not hasattr(_Stage1, "nan_at_step"):  # importing twice must not wrap twice
    loss_map[LOSS_NAME] = NanAtStepLoss
