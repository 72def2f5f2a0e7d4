"""The evaluated checkpoint as an MLflow pyfunc model: images in, parsed detections in pixels out.

The evaluate stage logs the checkpoint it picked (the final one, or the best by ``bbox_mAP`` with
``evaluate.checkpoints: all``) into the training run as the model ``model``, so that

    mlflow models serve --env-manager local -m runs:/<run id>/model -h 127.0.0.1 -p 5001

answers detection requests. It reuses what ``coordexp predict`` runs (:class:`Detector`, the parser, the
scores, :func:`coordexp.evaluate.predict.detect`), so a served answer is the answer ``predict`` gives.

**Input**: a DataFrame with one string column ``image``, each value the base64 of an image file's bytes
(any format Pillow reads). Over HTTP, POST ``/invocations`` with ``Content-Type: application/json``::

    {"dataframe_records": [{"image": "<base64 of a PNG/JPEG>"}, ...],
     "params": {"max_new_tokens": 256, "readout": "median"}}

(``params`` is optional; ``readout`` defaults to the evaluation's ``evaluate.readout``; ``dataframe_split`` and
``inputs`` work as MLflow defines them.)

**Output**: a list with one record per input image, in order (over HTTP ``{"predictions": [record, ...]}``)::

    {"width": 640, "height": 480,
     "objects": [{"desc": "red circle", "bbox_2d": [x1, y1, x2, y2], "bins": {"bbox_2d": [k1, k2, k3, k4]},
                  "score": 0.93, "score_status": "ok"}],
     "text": "<the raw answer>", "ok": true, "problems": [], "error": null}

Geometry (``bbox_2d``, ``poly`` or ``line``) is in pixels of the input image, the bins read from the coord
distribution alongside (floats unless the readout is ``argmax``; :data:`coordexp.evaluate.predict.COORDINATES`);
a non-finite score is ``null``. An input that is
not base64 or not a readable image gets a record whose ``error`` says why (and no objects): one bad image
never fails the batch.

**How the checkpoint travels** (``evaluate.log_model``): ``copy`` puts its inference files (weights, config,
tokenizer, processor; not the optimizer or trainer state) inside the model's artifacts; ``reference`` stores
only ``checkpoint_ref.json``, the folder's path relative to the repository with each file's MD5, and loads
from the repository of the working directory (or ``COORDEXP_ROOT``) or the folder of the SQLite tracking store
(:func:`candidate_roots`). If the working copy holds a different checkpoint by then (a later ``dvc repro``), the
files are taken from the DVC cache by their MD5s; if they are not there either, loading fails and says so
rather than serving other weights.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import Array, ColSpec, Object, ParamSchema, ParamSpec, Property, Schema

from coordexp.core import paths
from coordexp.core.checkpoint import CheckpointError
from coordexp.core.config import Params
from coordexp.pipeline import tracking

MODEL_NAME = "model"
"""The model's name in the run: ``runs:/<run id>/model``."""
INPUT_COLUMN = "image"
CODE_FILE = Path(__file__).with_name("mlflow_entry.py")
"""The models-from-code file MLflow runs to build the model (no pickled object in the artifacts)."""
REF_FILE = "checkpoint_ref.json"

# files of a checkpoint folder that inference does not read: optimizer, scheduler and trainer state
_TRAINING_STATE = ("optimizer", "scheduler", "rng_state", "training_args", "trainer_state", "args.json", "scaler")

_GEOMETRY = ("bbox_2d", "poly", "line")


def encode_image(data: bytes | str | Path) -> str:
    """The ``image`` value of a request: the base64 of an image file's bytes (a path is read)."""
    raw = data if isinstance(data, bytes) else Path(data).read_bytes()
    return base64.b64encode(raw).decode("ascii")


def _decode(value: Any) -> Any:
    """A PIL image from a request value, or why it cannot be one (a string, as ``coordexp predict`` words it)."""
    from coordexp.evaluate.predict import open_image

    if not isinstance(value, str) or not value:
        return f"expected a base64 string in column {INPUT_COLUMN!r}, got {type(value).__name__}"
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"not base64 ({exc})"
    return open_image(io.BytesIO(raw))


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class DetectorModel(mlflow.pyfunc.PythonModel):
    """The pyfunc model: a :class:`Detector` on the logged checkpoint, answering batches of base64 images."""

    def load_context(self, context: Any) -> None:
        from coordexp.evaluate.generate import Detector
        from coordexp.evaluate.grammar import Grammar, limits_of, model_vocab_size

        cfg = context.model_config or {}
        self.max_new_tokens = int(cfg.get("max_new_tokens", 256))
        self.batch_size = int(cfg.get("batch_size", 8))
        self.readout = str(cfg.get("readout", "median"))
        self.score = str(cfg.get("score", "desc_coord_geomean"))
        self.detector = Detector(
            checkpoint_from_artifacts(context.artifacts), local_window=int(cfg.get("local_window", 8))
        )
        # decode as the evaluation that logged the model did (constrained unless it said free)
        self.grammar = None
        if cfg.get("decoding", "constrained") == "constrained":
            det = self.detector
            self.grammar = Grammar(
                det.tokenizer,
                det.eos_ids,
                model_vocab_size(det.model),
                descriptions=cfg.get("description_set"),
                limits=limits_of(cfg),
            )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> list[dict[str, Any]]:
        """One record per input image, in order (see the module docstring); an unreadable input gets ``error``."""
        from coordexp.evaluate.predict import detect

        values = _image_values(model_input)
        max_new_tokens = int((params or {}).get("max_new_tokens") or self.max_new_tokens)
        readout = str((params or {}).get("readout") or self.readout)
        rows: list[dict[str, Any]] = [{}] * len(values)
        readable: list[tuple[int, Any]] = []
        for i, value in enumerate(values):
            im = _decode(value)
            if isinstance(im, str):
                rows[i] = {
                    "width": None,
                    "height": None,
                    "objects": [],
                    "text": None,
                    "ok": False,
                    "problems": [],
                    "error": im,
                }
            else:
                readable.append((i, im))
        for start in range(0, len(readable), self.batch_size):
            chunk = readable[start : start + self.batch_size]
            found_all = detect(
                self.detector,
                [im for _, im in chunk],
                max_new_tokens,
                grammar=self.grammar,
                readout=readout,
                score=self.score,
            )
            for (i, _), found in zip(chunk, found_all):
                for obj in found["objects"]:
                    obj["score"] = _finite(obj.get("score"))
                rows[i] = {**found, "error": None}
        return rows  # records, not a DataFrame: pandas would turn the missing sizes and errors into NaN


def _image_values(model_input: Any) -> list[Any]:
    if isinstance(model_input, pd.DataFrame):
        if INPUT_COLUMN not in model_input.columns:
            raise ValueError(f"the input needs a column {INPUT_COLUMN!r} of base64-encoded images")
        return list(model_input[INPUT_COLUMN])
    if isinstance(model_input, Mapping):
        v = model_input[INPUT_COLUMN]
        return list(v) if isinstance(v, (list, tuple)) else [v]
    if isinstance(model_input, (list, tuple)):
        return [v[INPUT_COLUMN] if isinstance(v, Mapping) else v for v in model_input]
    return [model_input]


# --------------------------------------------------------------------------------------------
# signature

INPUT_SCHEMA = Schema([ColSpec("string", INPUT_COLUMN)])
_COORDS = Array("double")
OUTPUT_SCHEMA = Schema(
    [
        ColSpec("long", "width", required=False),
        ColSpec("long", "height", required=False),
        ColSpec(
            Array(
                Object(
                    [
                        Property("desc", "string"),
                        *(Property(k, _COORDS, required=False) for k in _GEOMETRY),
                        Property("bins", Object([Property(k, _COORDS, required=False) for k in _GEOMETRY])),
                        Property("score", "double", required=False),
                        Property("score_status", "string"),
                    ]
                )
            ),
            "objects",
        ),
        ColSpec("string", "text", required=False),
        ColSpec("boolean", "ok", required=False),
        ColSpec(
            Array(
                Object(
                    [
                        Property("kind", "string"),
                        Property("detail", "string"),
                        Property("object_index", "long", required=False),
                    ]
                )
            ),
            "problems",
        ),
        ColSpec("string", "error", required=False),
    ]
)


def signature(max_new_tokens: int, readout: str = "median") -> ModelSignature:
    """Base64 images in, detections out; ``max_new_tokens`` and ``readout`` may be overridden per request."""
    return ModelSignature(
        inputs=INPUT_SCHEMA,
        outputs=OUTPUT_SCHEMA,
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", max_new_tokens), ParamSpec("readout", "string", readout)]
        ),
    )


def input_example() -> pd.DataFrame:
    """A 32 px PNG with one red disc: small enough to keep the logged example (and its check at logging) cheap."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (32, 32))
    ImageDraw.Draw(im).ellipse([6, 8, 22, 24], fill=(255, 0, 0))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return pd.DataFrame({INPUT_COLUMN: [encode_image(buf.getvalue())]})


# --------------------------------------------------------------------------------------------
# the checkpoint: by copy or by reference


def inference_files(checkpoint: Path) -> list[Path]:
    """The files of a checkpoint folder a :class:`Detector` reads: all top-level files but the training state."""
    return sorted(
        p for p in checkpoint.iterdir() if p.is_file() and not any(p.name.startswith(s) for s in _TRAINING_STATE)
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src.resolve(), dst)
    except OSError:  # another file system
        shutil.copy2(src, dst)


def _md5(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)  # DVC's content hash: the cache finds files by it
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def reference(checkpoint: Path, root: Path) -> dict[str, Any]:
    """What ``checkpoint_ref.json`` holds: the folder relative to the repository, and each inference file's MD5."""
    checkpoint = checkpoint.resolve()
    rel = checkpoint.relative_to(root.resolve()) if checkpoint.is_relative_to(root.resolve()) else checkpoint
    return {
        "checkpoint": rel.as_posix(),
        "files": {p.name: _md5(p) for p in inference_files(checkpoint)},
        "git_commit": tracking.git_commit(root),
    }


def _in(folder: Path, name: str) -> Path:
    """A file a reference names, held to the checkpoint folder: a tampered ``checkpoint_ref.json`` reaches no other."""
    return paths.inside(folder, name, where=f"{REF_FILE}: files")


def _matches(folder: Path, files: Mapping[str, str]) -> bool:
    return folder.is_dir() and all(_in(folder, n).is_file() and _md5(_in(folder, n)) == h for n, h in files.items())


def _dvc_cache(root: Path) -> Path:
    return root / ".dvc" / "cache" / "files" / "md5"


def candidate_roots() -> list[Path]:
    """Where a reference may be resolved: the repository of the working directory (or ``COORDEXP_ROOT``), then
    the folder of the SQLite tracking store the model was loaded from, which is the repository that logged it
    by default, so ``MLFLOW_TRACKING_URI=sqlite:///<repo>/mlflow.db mlflow models serve ...`` works from anywhere."""
    roots = [paths.project_root()]
    uri = mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        roots.append(Path(uri[len("sqlite:///") :]).parent)
    return list(dict.fromkeys(r.resolve() for r in roots))


def resolve_reference(ref: Mapping[str, Any], root: Path | None = None) -> Path:
    """The checkpoint folder a reference names, checked file by file against its MD5s.

    Looked for under ``root``, or else each of :func:`candidate_roots`: the working copy first; when it holds
    other weights (retrained since), the same files are assembled from the DVC cache; otherwise this fails
    naming the commit to check out, because serving a different checkpoint under the logged model's name would
    be silently wrong.
    """
    roots = [root] if root is not None else candidate_roots()
    files: Mapping[str, str] = ref["files"]
    for r in roots:
        folder = paths.resolve(ref["checkpoint"], r)
        if _matches(folder, files):
            return folder
    for r in roots:
        cached = {n: _dvc_cache(r) / h[:2] / h[2:] for n, h in files.items()}
        if all(p.is_file() for p in cached.values()):
            staged = Path(tempfile.mkdtemp(prefix="coordexp-model-"))
            for n, p in cached.items():
                os.symlink(p, _in(staged, n))
            return staged
    states = [
        f"{r}: {'holds other weights' if paths.resolve(ref['checkpoint'], r).is_dir() else 'does not exist'}"
        for r in roots
    ]
    raise CheckpointError(
        f"this model was logged by reference to {ref['checkpoint']} (git commit {ref.get('git_commit', '?')}), "
        f"which no repository tried has, in its working copy or its DVC cache ({'; '.join(states)}). Serve with "
        "MLFLOW_TRACKING_URI=sqlite:///<repo>/mlflow.db or from inside the repository that trained it (or set "
        "COORDEXP_ROOT), `git checkout <commit> && dvc checkout` there, or log models with evaluate.log_model: copy"
    )


def checkpoint_from_artifacts(artifacts: Mapping[str, str]) -> Path:
    """The checkpoint folder of a loaded model: the copied one, or the one its reference resolves to."""
    if "checkpoint" in artifacts:
        return Path(artifacts["checkpoint"])
    return resolve_reference(json.loads(Path(artifacts["checkpoint_ref"]).read_text()))


# --------------------------------------------------------------------------------------------
# logging and registration


def registered_model_name(params: Params) -> str | None:
    """``evaluate.registered_model`` with ``{experiment}`` filled in; None: don't register."""
    name = params.evaluate.registered_model
    return None if name is None else name.replace("{experiment}", params.tracking.experiment)


def _requirements() -> list[str]:
    """What the model's code imports besides the coordexp package itself (which comes from the repository)."""
    out = []
    for dist in ("mlflow", "torch", "transformers", "pillow", "pandas"):
        try:
            out.append(f"{dist}=={version(dist)}")
        except PackageNotFoundError:
            out.append(dist)
    return out


def version_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The evaluation's scalar metrics (the names of eval.json, which are MLflow's) and its checkpoint, as
    model-version tags."""
    tags = {
        k: str(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "images_per_second"  # a machine figure
    }
    tags["checkpoint"] = str(metrics.get("checkpoint"))
    return tags


def model_config(params: Params, root: Path) -> dict[str, Any]:
    """What the served model reads at load time: generation length, batch size, the evaluation's decoding (with
    ``descriptions: train_set``, the description set itself, so serving needs no train split), and how it reads
    and ranks coordinates (readout, score, window)."""
    from coordexp.evaluate.grammar import train_descriptions

    cfg = params.evaluate
    out: dict[str, Any] = {
        "max_new_tokens": cfg.max_new_tokens,
        "batch_size": cfg.batch_size,
        "decoding": cfg.decoding,
        "max_objects": cfg.max_objects,
        "max_poly_points": cfg.max_poly_points,
        "max_line_points": cfg.max_line_points,
        "readout": cfg.readout,
        "score": cfg.score,
        "local_window": cfg.local_window,
    }
    if cfg.decoding == "constrained" and cfg.descriptions == "train_set":
        out["description_set"] = train_descriptions(paths.resolve(params.preprocess.out_dir, root) / "train.jsonl")
    return out


def log_checkpoint_model(params: Params, root: Path, checkpoint: Path, metrics: Mapping[str, Any]) -> Any:
    """Log ``checkpoint`` as the active run's pyfunc model ``model`` and register it; None when turned off.

    Called inside the evaluate stage's run before its metrics are logged, so MLflow links those metrics to
    the logged model (its LoggedModel page shows them); the registered version also carries them as tags,
    which the registry's version list shows and searches. Returns the :class:`ModelInfo`.
    """
    cfg = params.evaluate
    if cfg.log_model == "none":
        return None
    with tempfile.TemporaryDirectory() as tmp:
        if cfg.log_model == "copy":
            staged = Path(tmp) / "checkpoint"
            staged.mkdir()
            for p in inference_files(checkpoint):
                _link_or_copy(p, staged / p.name)  # MLflow copies from here (it refuses symlinks)
            artifacts = {"checkpoint": str(staged)}
        else:
            ref = Path(tmp) / REF_FILE
            ref.write_text(json.dumps(reference(checkpoint, root), indent=2) + "\n")
            artifacts = {"checkpoint_ref": str(ref)}
        ckpt_name = metrics.get("checkpoint", str(checkpoint))
        info = mlflow.pyfunc.log_model(
            name=MODEL_NAME,
            python_model=str(CODE_FILE),
            artifacts=artifacts,
            model_config=model_config(params, root),
            signature=signature(cfg.max_new_tokens, cfg.readout),
            input_example=input_example(),
            pip_requirements=_requirements(),
            metadata={"units": "pixels", "checkpoint": ckpt_name, "log_model": cfg.log_model},
            params={"checkpoint": ckpt_name, "log_model": cfg.log_model},
        )
    name = registered_model_name(params)
    if name:
        mv = mlflow.register_model(info.model_uri, name, tags=version_tags(metrics))
        print(f"[evaluate] model {info.model_uri} registered as {name} version {mv.version}")
    return info
