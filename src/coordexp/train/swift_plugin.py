"""Registration with ms-swift: the project's template, the Stage-1 loss and the trainer.

``swift sft --external_plugins <PLUGIN_FILE> --loss_type <LOSS_NAME>`` (what the ``train`` stage
runs) imports :data:`PLUGIN_FILE` in every rank before the trainer is built; that file calls
:func:`register`, which puts

* the project template (``coordexp.core.template``) into ms-swift's template registry, so
  training and inference share one template;
* :class:`coordexp.train.swift_loss.Stage1SwiftLoss` into ``swift.loss.loss_map`` as
  :data:`LOSS_NAME`;
* :class:`coordexp.train.trainer.CoordExpTrainer` into ms-swift's trainer mapping as the
  ``causal_lm`` trainer (by dotted name: ms-swift imports it when it builds the trainer).

This module itself imports no swift, so the train stage can read :data:`LOSS_NAME` and
:data:`PLUGIN_FILE` without loading it.
"""

from __future__ import annotations

from pathlib import Path

from coordexp.core.checkpoint import swift_loads_natively
from coordexp.core.template import register_swift_template

LOSS_NAME = "coordexp_stage1"
"""The Stage-1 loss's name in ``swift.loss.loss_map`` (what ``--loss_type`` gets)."""

TRAINER = "coordexp.train.trainer.CoordExpTrainer"
"""The trainer's dotted name in ms-swift's ``TRAINER_MAPPING``."""

PLUGIN_FILE = Path(__file__).resolve().parent / "swift_external" / "plugin.py"
"""What ``--external_plugins`` gets."""


def register() -> None:
    """Register template, loss and trainer with ms-swift (idempotent: a loss already registered
    under :data:`LOSS_NAME`, e.g. by a plugin that wraps it, is left in place)."""
    # lazy: the train stage imports this module for LOSS_NAME / PLUGIN_FILE without loading swift
    from swift.loss import loss_map
    from swift.trainers import trainer_factory

    # lazy: swift_loss imports swift at its top (see above)
    from coordexp.train.swift_loss import Stage1SwiftLoss

    swift_loads_natively()  # before ms-swift loads the model: a checkpoint's auto_map code never runs
    if LOSS_NAME in loss_map:
        return
    register_swift_template()
    loss_map[LOSS_NAME] = Stage1SwiftLoss
    trainer_factory.TrainerFactory.TRAINER_MAPPING["causal_lm"] = TRAINER
