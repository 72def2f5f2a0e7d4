"""The evaluated checkpoint as an MLflow model: the pyfunc contract, by reference or by copy, registered, served."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pandas as pd
import pytest
from conftest import SMALL_MODEL, stage_env
from test_build_base import write_dataset
from test_predict import ANSWER_BINS, _png, known_answer  # noqa: F401 - known_answer is a fixture

from coordexp.core import codec
from coordexp.core.checkpoint import CheckpointError
from coordexp.core.config import Params
from coordexp.evaluate import mlflow_model as mm
from coordexp.pipeline import tracking


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, Path]:
    """(a folder standing for the repository, its untrained tiny checkpoint at the train stage's place); the
    checkpoint also holds an optimizer state, which a copy leaves out."""
    from coordexp.build_base.tiny import build_tiny

    root = tmp_path_factory.mktemp("repo")
    data = write_dataset(tmp_path_factory.mktemp("data"), n=4)
    ckpt = build_tiny(data, root / "artifacts" / "train" / "final", **SMALL_MODEL)
    (ckpt / "optimizer.pt").write_bytes(b"optimizer state")
    return root, ckpt


@pytest.mark.usefixtures("known_answer")
def test_pyfunc_contract_pixels_per_image_and_an_error_per_unreadable_one(project):
    """The model runs on every readable image for real (mixed sizes in one batch); its answer is replaced by one
    known box, so the row's pixels are checked against the codec. Unreadable inputs get an error each."""
    _, ckpt = project
    model = mm.DetectorModel()
    model.load_context(
        SimpleNamespace(artifacts={"checkpoint": str(ckpt)}, model_config={"max_new_tokens": 4, "batch_size": 2})
    )
    sizes = {0: (160, 96), 4: (64, 48), 5: (40, 40)}
    good = {i: _png(size, seed=i) for i, size in sizes.items()}
    images = [
        mm.encode_image(good[0]),
        "%% not base64 %%",
        mm.encode_image(b"not an image\n"),
        mm.encode_image(good[0][:600]),
        mm.encode_image(good[4]),
        mm.encode_image(good[5]),
    ]
    rows = model.predict(None, pd.DataFrame({mm.INPUT_COLUMN: images}))

    assert len(rows) == len(images)
    json.dumps(rows, allow_nan=False)  # strict JSON: no NaN for a missing size or score
    for i, why in ((1, "not base64"), (2, "not an image"), (3, "truncated")):
        assert why in rows[i]["error"] and rows[i]["objects"] == [] and rows[i]["width"] is None
    for i, (w, h) in sizes.items():
        row = rows[i]
        assert row["error"] is None and (row["width"], row["height"]) == (w, h)
        (obj,) = row["objects"]
        assert obj["desc"] == "red circle" and obj["bins"] == {"bbox_2d": ANSWER_BINS}
        assert obj["bbox_2d"] == pytest.approx(codec.decode_xy(ANSWER_BINS, w, h))
        assert obj["score"] == pytest.approx(0.5) and obj["score_status"] == "ok"


def test_reference_checks_the_files_and_falls_back_to_the_dvc_cache(tmp_path):
    root = tmp_path / "repo"
    ckpt = root / "artifacts" / "train" / "final"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"weights v1")
    (ckpt / "optimizer.pt").write_bytes(b"state")
    (ckpt / "trainer_state.json").write_text("{}")

    ref = json.loads(json.dumps(mm.reference(ckpt, root)))
    assert ref["checkpoint"] == "artifacts/train/final"  # relative to the repository, no machine path
    assert set(ref["files"]) == {"config.json", "model.safetensors"}
    assert mm.resolve_reference(ref, root) == ckpt

    # retrained since: the working copy holds other weights, the DVC cache still has the logged ones
    cache = root / ".dvc" / "cache" / "files" / "md5"
    for name, md5 in ref["files"].items():
        (cache / md5[:2]).mkdir(parents=True, exist_ok=True)
        shutil.copy(ckpt / name, cache / md5[:2] / md5[2:])
    (ckpt / "model.safetensors").write_bytes(b"weights v2")
    staged = mm.resolve_reference(ref, root)
    assert staged != ckpt and (staged / "model.safetensors").read_bytes() == b"weights v1"

    shutil.rmtree(root / ".dvc")
    with pytest.raises(CheckpointError, match="holds other weights.*evaluate.log_model: copy"):
        mm.resolve_reference(ref, root)
    shutil.rmtree(ckpt)
    with pytest.raises(CheckpointError, match="does not exist"):
        mm.resolve_reference(ref, root)


METRICS = {
    "bbox_mAP": 0.25,
    "f1@0.5": 0.5,
    "parse_rate": 1.0,
    "images_per_second": 3.0,
    "per_class_ap": {"red circle": 0.25},
    "checkpoint": "artifacts/train/final",
}


def _log(params: Params, root: Path, ckpt: Path) -> tuple[Any, str]:
    with tracking.stage_run(params, "evaluate") as run:
        info = mm.log_checkpoint_model(params, root, ckpt, METRICS)
        mlflow.log_metrics({"bbox_mAP": METRICS["bbox_mAP"], "f1_at_0.5": METRICS["f1@0.5"]})  # as the stage does
    return info, run.info.run_id


def test_logged_by_reference_and_registered_with_the_metrics(project, mlflow_store, monkeypatch):
    root, ckpt = project
    monkeypatch.setenv("COORDEXP_ROOT", str(root))
    params = Params.model_validate({"evaluate": {"max_new_tokens": 8}})  # the defaults: reference, registered
    assert params.evaluate.log_model == "reference" and mm.registered_model_name(params) == "coordexp-stage1"
    info, run_id = _log(params, root, ckpt)

    client = mlflow.MlflowClient()
    (mv,) = client.search_model_versions("name='coordexp-stage1'")
    assert mv.tags["bbox_mAP"] == "0.25" and mv.tags["f1_at_0.5"] == "0.5" and mv.tags["parse_rate"] == "1.0"
    assert mv.tags["checkpoint"] == "artifacts/train/final" and "images_per_second" not in mv.tags
    assert {m.key: m.value for m in mlflow.get_logged_model(info.model_id).metrics} == {
        "bbox_mAP": 0.25,
        "f1_at_0.5": 0.5,
    }

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(root.parent / "dl")))
    ref = json.loads((local / "artifacts" / mm.REF_FILE).read_text())
    assert ref["checkpoint"] == "artifacts/train/final" and "model.safetensors" in ref["files"]
    assert not list(local.rglob("*.safetensors"))  # by reference: no weights in the artifacts

    model = mlflow.pyfunc.load_model(f"models:/coordexp-stage1/{mv.version}")
    assert model.metadata.get_input_schema().input_names() == [mm.INPUT_COLUMN]
    assert model.metadata.get_params_schema().params[0].name == "max_new_tokens"
    (row,) = model.predict(mm.input_example(), params={"max_new_tokens": 2})
    assert row["error"] is None and (row["width"], row["height"]) == (32, 32) and isinstance(row["objects"], list)


def test_logged_by_copy_holds_the_inference_files_and_none_logs_nothing(project, mlflow_store, monkeypatch, tmp_path):
    root, ckpt = project
    monkeypatch.setenv("COORDEXP_ROOT", str(tmp_path))  # the copy needs no repository
    params = Params.model_validate({"evaluate": {"log_model": "copy", "registered_model": None, "max_new_tokens": 8}})
    _, run_id = _log(params, root, ckpt)
    assert mlflow.MlflowClient().search_registered_models() == []  # registered_model: null

    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path / "dl")))
    copied = {p.name for p in (local / "artifacts" / "checkpoint").iterdir()}
    assert copied == {p.name for p in mm.inference_files(ckpt)} and "optimizer.pt" not in copied
    assert "model.safetensors" in copied and "config.json" in copied
    (row,) = mlflow.pyfunc.load_model(str(local)).predict(mm.input_example(), params={"max_new_tokens": 2})
    assert row["error"] is None

    params = Params.model_validate({"evaluate": {"log_model": "none"}})
    info, run_id = _log(params, root, ckpt)
    assert info is None and mlflow.MlflowClient().list_artifacts(run_id) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http(url: str, body: bytes | None = None, *, timeout: float):
    """GET (or POST a JSON body to) a loopback URL this test built."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})  # noqa: S310
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310


@pytest.mark.slow
def test_mlflow_models_serve_answers_a_png_on_localhost(project, mlflow_store, monkeypatch, tmp_path):
    """What a user runs: ``mlflow models serve --env-manager local -m runs:/<id>/model``, then one POST."""
    root, ckpt = project
    monkeypatch.setenv("COORDEXP_ROOT", str(root))
    _, run_id = _log(Params.model_validate({"evaluate": {"max_new_tokens": 8}}), root, ckpt)

    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(
        [Path(sys.executable).parent / "mlflow", "models", "serve", "--env-manager", "local"]
        + ["-m", f"runs:/{run_id}/model", "-h", "127.0.0.1", "-p", str(port)],
        cwd=tmp_path,
        env=stage_env(MLFLOW_TRACKING_URI=mlflow_store, COORDEXP_ROOT=str(root)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the workers it forks stop with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                with _http(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "no answer on /ping"
            time.sleep(0.5)
        body = {"dataframe_records": [{"image": mm.encode_image(_png((96, 64)))}, {"image": mm.encode_image(b"x")}]}
        with _http(f"{url}/invocations", json.dumps(body).encode(), timeout=120) as r:
            reply = json.loads(r.read().decode(), parse_constant=lambda c: pytest.fail(f"{c} in the reply"))
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)
        log.close()

    good, bad = reply["predictions"]
    assert good["error"] is None and (good["width"], good["height"]) == (96, 64)
    assert isinstance(good["objects"], list) and isinstance(good["text"], str)
    for obj in good["objects"]:  # an untrained model: whatever it says, in pixels with its bins alongside
        ((kind, bins),) = obj["bins"].items()
        assert obj[kind] == pytest.approx(codec.decode_xy(bins, 96, 64))
    assert "not an image" in bad["error"] and bad["objects"] == []
