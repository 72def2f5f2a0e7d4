"""Checkpoint folders: which model types the workbench supports, and how a folder is read.

One list of supported Qwen-VL model types serves ``build_base`` (expand), the conversation template,
``train`` and ``evaluate``: a base that one stage builds is a base every other stage accepts.
The train stage's output layout (``swift/checkpoint-N``, ``final``, the MLflow run id file) is
named here too, because ``evaluate`` and ``report`` read it.

A checkpoint folder is data, never code. A folder whose ``config.json``, ``tokenizer_config.json``,
``preprocessor_config.json`` or ``processor_config.json`` asks for remote code (``auto_map``, usually with a ``.py``
file beside it) is loaded with transformers' native classes for its ``model_type`` and the request is ignored, with
a :class:`RemoteCodeIgnored` warning naming the folder and the entries (:func:`warn_remote_code`): ``evaluate``,
``coordexp predict``, the served MLflow model, ``build_base`` expand and the LoRA merge. ms-swift is another
matter: its model-info step calls ``AutoConfig.from_pretrained(..., trust_remote_code=True)`` whatever it is told,
so a folder that asks for remote code is refused before ms-swift sees it (:func:`refuse_remote_code`: training, the
reports), and ``build_base`` writes every base without ``auto_map`` or ``.py`` files (:func:`strip_remote_code`).
Nothing in the project passes ``trust_remote_code=True``; ms-swift's loaders, which default to it, are switched off
it as well (:func:`swift_loads_natively`).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

from coordexp.core.errors import UserError


class ModelType(NamedTuple):
    """A supported ``config.json`` ``model_type``: its transformers class and the project's ms-swift template."""

    hf_class: str
    template: str


SUPPORTED_MODEL_TYPES: dict[str, ModelType] = {
    "qwen3_vl": ModelType("Qwen3VLForConditionalGeneration", "coordexp_qwen3_vl"),
    "qwen2_5_vl": ModelType("Qwen2_5_VLForConditionalGeneration", "coordexp_qwen2_5_vl"),
}

SWIFT_DIR = "swift"
"""``<train.out_dir>/swift``: ms-swift's output folder, with its ``checkpoint-N`` folders."""
FINAL_DIR = "final"
"""``<train.out_dir>/final``: the last checkpoint plus ``coord_vocab.json``; what ``evaluate`` reads."""
RUN_ID_FILE = "mlflow_run_id"
"""``<train.out_dir>/mlflow_run_id``: the training run that ``evaluate`` and ``report`` add to."""


class CheckpointError(UserError, ValueError):
    """A folder that is not a usable local checkpoint; the message says what to place where."""


def read_config(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint folder, without loading anything else."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(
            f"{checkpoint_dir}: no config.json, so it is not a Hugging Face checkpoint; "
            "build the base checkpoint first (dvc repro build_base) or point at a checkpoint folder"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None


REMOTE_CODE_FILES = (
    "config.json",
    "tokenizer_config.json",
    "preprocessor_config.json",
    "processor_config.json",
    "video_preprocessor_config.json",
)
"""The files of a checkpoint folder where transformers looks for an ``auto_map`` (a request to run the folder's
own Python classes)."""


class RemoteCodeIgnored(UserWarning):
    """A checkpoint folder asks for its own code to be run; it is loaded with the native classes instead."""


def remote_code_requests(checkpoint_dir: str | Path) -> dict[str, Any]:
    """``{file name: its auto_map}`` for each of :data:`REMOTE_CODE_FILES` that asks for remote code (``{file name}
    {section}`` for a section of it, such as ``processor_config.json``'s ``image_processor``)."""
    found: dict[str, Any] = {}
    for name in REMOTE_CODE_FILES:
        path = Path(checkpoint_dir) / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # not ours to judge here: the loader that reads the file says what is wrong with it
        if not isinstance(data, dict):
            continue
        if data.get("auto_map"):
            found[name] = data["auto_map"]
        for key, sub in data.items():  # processor_config.json nests the image and video processors' settings
            if isinstance(sub, dict) and sub.get("auto_map"):
                found[f"{name} {key}"] = sub["auto_map"]
    return found


def warn_remote_code(checkpoint_dir: str | Path) -> dict[str, Any]:
    """Warn (:class:`RemoteCodeIgnored`) when the folder asks for remote code, naming the folder, the ignored
    ``auto_map`` entries and the ``.py`` files beside them; returns :func:`remote_code_requests`.

    Every loader of a checkpoint folder calls it before loading, so a user who brings a folder made for
    ``trust_remote_code=True`` learns that its code did not run and that the native classes serve it.
    """
    found = remote_code_requests(checkpoint_dir)
    if found:
        warnings.warn(
            f"{_describe(checkpoint_dir, found)}; ignored: the workbench never runs a checkpoint's own code and "
            "loads it with transformers' native classes for its model_type. Remove auto_map from those files to "
            "silence this",
            RemoteCodeIgnored,
            stacklevel=2,
        )
    return found


def _describe(checkpoint_dir: str | Path, found: dict[str, Any]) -> str:
    entries = "; ".join(f"{name} auto_map {json.dumps(m, sort_keys=True)}" for name, m in found.items())
    code = sorted(p.name for p in Path(checkpoint_dir).glob("*.py"))
    return f"{checkpoint_dir}: asks for remote code ({entries}{'; code files: ' + ', '.join(code) if code else ''})"


def refuse_remote_code(checkpoint_dir: str | Path, *, stage: str) -> None:
    """A :class:`CheckpointError` when the folder asks for remote code, before ms-swift is given it.

    ms-swift (``swift.model.model_meta._get_model_info``) loads every folder's config with
    ``trust_remote_code=True``, hard-coded, so warning and going on would run the folder's code; the folder is
    refused instead, saying how to get a clean one.
    """
    found = remote_code_requests(checkpoint_dir)
    if found:
        raise CheckpointError(
            f"{_describe(checkpoint_dir, found)}; refused: {stage} loads checkpoints through ms-swift, which would run "
            "that code. Rebuild the base with the build_base stage (it writes a copy without auto_map or .py files) "
            "or delete the auto_map entries from those files"
        )


def strip_remote_code(checkpoint_dir: str | Path) -> list[str]:
    """Remove every ``auto_map`` (:func:`remote_code_requests`) and the top-level ``.py`` files from a folder this
    project wrote, so that nothing downstream (ms-swift above all) is asked to run them; returns what was removed."""
    folder = Path(checkpoint_dir)
    removed = [f"{name} auto_map" for name in remote_code_requests(folder)]
    for name in REMOTE_CODE_FILES:
        path = folder / name
        if not path.is_file() or not any(r.split(" ")[0] == name for r in removed):
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        data.pop("auto_map", None)
        for sub in data.values():
            if isinstance(sub, dict):
                sub.pop("auto_map", None)
        path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    for py in sorted(folder.glob("*.py")):
        py.unlink()
        removed.append(py.name)
    return removed


def swift_loads_natively() -> None:
    """Make ms-swift load checkpoints without ``trust_remote_code``.

    ms-swift's model loaders pass ``trust_remote_code=True`` to transformers by default (their
    ``default_trust_remote_code`` class attribute), which would import and run a folder's ``auto_map`` code
    during training. The supported model types all have native transformers classes, so the project turns that
    default off wherever it registers its template with ms-swift (the train stage's plugin, :func:`load_template`).
    Its model-info step does not read that default (see :func:`refuse_remote_code`).
    """
    from swift.model.register import ModelLoader

    ModelLoader.default_trust_remote_code = False


def check_model_type(model_type: Any, where: str | Path) -> str:
    """``model_type`` if the workbench supports it; else a :class:`CheckpointError` naming ``where``."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{where}: model_type {model_type!r} is not supported; supported: {sorted(SUPPORTED_MODEL_TYPES)}"
        )
    return str(model_type)


def model_type(checkpoint_dir: str | Path) -> str:
    """The supported ``model_type`` of a checkpoint folder."""
    return check_model_type(read_config(checkpoint_dir).get("model_type"), Path(checkpoint_dir) / "config.json")


def vocab_size(checkpoint_dir: str | Path) -> int:
    """Embedding rows from ``config.json`` (top-level or ``text_config``), without loading weights."""
    cfg = read_config(checkpoint_dir)
    v = cfg.get("text_config", {}).get("vocab_size") or cfg.get("vocab_size")
    if not v:
        raise CheckpointError(f"{checkpoint_dir}/config.json has no vocab_size")
    return int(v)


def checkpoint_step(path: Path) -> int:
    """The step ``N`` of a ``checkpoint-N`` folder."""
    return int(path.name.rsplit("-", 1)[-1])


def list_checkpoints(swift_out: str | Path, *, complete: bool = False) -> list[Path]:
    """ms-swift's ``checkpoint-N`` folders by step; with ``complete``, only those with ``trainer_state.json``
    (a kill while a checkpoint is written leaves it without one)."""
    ckpts = [c for c in Path(swift_out).glob("checkpoint-*") if not complete or (c / "trainer_state.json").is_file()]
    return sorted(ckpts, key=checkpoint_step)


def last_checkpoint(swift_out: str | Path, *, complete: bool = False) -> Path | None:
    """The highest-step ``checkpoint-N`` (see :func:`list_checkpoints`), or None."""
    ckpts = list_checkpoints(swift_out, complete=complete)
    return ckpts[-1] if ckpts else None


def weights_digest(checkpoint_dir: str | Path) -> str:
    """md5 of a checkpoint's weight files (``*.safetensors``, by name): the identity of a trained model.

    The train stage tags its MLflow run with it, so a checkpoint can be traced to the run that produced
    it even when DVC restores the checkpoint from its cache instead of training again."""
    h = hashlib.md5()
    for f in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        h.update(f.name.encode())
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 23), b""):
                h.update(block)
    return h.hexdigest()
