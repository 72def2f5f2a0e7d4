"""One list of supported model types: what ``build_base`` (expand) accepts, ``train`` and the template accept."""

from __future__ import annotations

import json

import pytest

from coordexp.build_base.expand import check_source
from coordexp.core.checkpoint import (
    SUPPORTED_MODEL_TYPES,
    CheckpointError,
    last_checkpoint,
    list_checkpoints,
    model_type,
    read_config,
)


def _checkpoint_folder(path, mtype):
    """A folder with every file ``expand`` looks for (contents are never loaded by these checks)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": mtype}))
    for name in ("tokenizer.json", "preprocessor_config.json", "model.safetensors"):
        (path / name).write_text("{}")
    return path


@pytest.mark.parametrize("mtype", sorted(SUPPORTED_MODEL_TYPES))
def test_every_type_expand_accepts_train_and_the_template_accept(tmp_path, mtype):
    from swift.template import TEMPLATE_MAPPING

    from coordexp.core.template import register_swift_template

    folder = _checkpoint_folder(tmp_path / mtype, mtype)
    assert check_source(folder) == mtype  # build_base, mode expand
    assert model_type(folder) == mtype  # what train and evaluate read
    register_swift_template()
    assert SUPPORTED_MODEL_TYPES[mtype].template in TEMPLATE_MAPPING  # what train passes as --template
    import transformers

    assert hasattr(transformers, SUPPORTED_MODEL_TYPES[mtype].hf_class)


@pytest.mark.parametrize("mtype", ["qwen2_vl", "llama", None])
def test_unsupported_types_are_refused_by_expand_and_train_alike(tmp_path, mtype):
    folder = _checkpoint_folder(tmp_path / str(mtype), mtype)
    with pytest.raises(CheckpointError, match="Place a complete Hugging Face checkpoint"):
        check_source(folder)
    with pytest.raises(CheckpointError, match="not supported"):
        model_type(folder)


def test_read_config_names_the_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_config(tmp_path)


def test_checkpoint_listing_orders_by_step_and_skips_incomplete(tmp_path):
    for step in (10, 2, 100):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-200").mkdir()  # cut short: no trainer_state.json
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "checkpoint-2",
        "checkpoint-10",
        "checkpoint-100",
        "checkpoint-200",
    ]
    assert last_checkpoint(tmp_path).name == "checkpoint-200"
    assert last_checkpoint(tmp_path, complete=True).name == "checkpoint-100"
    assert last_checkpoint(tmp_path / "none") is None
