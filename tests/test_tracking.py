from pathlib import Path

import mlflow
import pytest

from coordexp.core.config import Params
from coordexp.pipeline import tracking


def test_default_uri_is_sqlite_at_the_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("COORDEXP_STORE_ROOT", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert tracking.tracking_uri(Params(), root=tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    assert tracking.artifact_location(Params(), root=tmp_path) == str(tmp_path.resolve() / "mlartifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(Params(), root=tmp_path) == "http://127.0.0.1:5999"


def test_dvc_experiment_copy_logs_to_the_real_store(monkeypatch, tmp_path):
    monkeypatch.delenv("COORDEXP_STORE_ROOT", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    copy = tmp_path / "repo" / ".dvc" / "tmp" / "exps" / "tmpabc123"
    assert tracking.store_root(copy) == tmp_path / "repo"


def test_unreachable_server_fails_fast():
    with pytest.raises(tracking.TrackingError, match="cannot reach the MLflow tracking server at http://127.0.0.1:9"):
        tracking.check_reachable("http://127.0.0.1:9", timeout=2)


def test_stage_run_tags_and_failure_status(mlflow_store):
    p = Params()
    with tracking.stage_run(p, "unit") as run:
        mlflow.log_metric("x", 1.0)
    got = mlflow.get_run(run.info.run_id)
    assert got.info.status == "FINISHED"
    assert got.data.tags["coordexp.stage"] == "unit"
    assert got.data.tags["coordexp.params_hash"] == tracking.params_hash(p)
    assert got.data.params["cfg.train.coord_soft_ce_w1.w1_weight"] == "1.0"
    with pytest.raises(RuntimeError):
        with tracking.stage_run(p, "unit") as run2:
            raise RuntimeError("boom")
    assert mlflow.get_run(run2.info.run_id).info.status == "FAILED"
    # a later stage adds to an existing run instead of starting a new one
    with tracking.stage_run(p, "evaluate", run_id=run.info.run_id):
        mlflow.log_metric("bbox_mAP", 0.5)
    assert mlflow.get_run(run.info.run_id).data.metrics["bbox_mAP"] == 0.5


def test_params_hash_changes_with_params():
    a = Params()
    b = Params.model_validate({"train": {"coord_soft_ce_w1": {"w1_weight": 0.5}}})
    assert tracking.params_hash(a) != tracking.params_hash(b)
    assert tracking.params_hash(a) == tracking.params_hash(Params())
    assert Path(tracking.flatten({"a": {"b": 1}, "c": 2}).keys().__iter__().__next__()) == Path("a.b")


def test_run_id_of_follows_the_weights(mlflow_store, tmp_path):
    """The run id file beside a DVC-restored checkpoint can name another run: the run is found by the digest
    of the weights it produced; a run id file for these weights is taken as is."""
    from coordexp.core.checkpoint import FINAL_DIR, RUN_ID_FILE, weights_digest

    params = Params.model_validate({"train": {"out_dir": str(tmp_path / "train")}})
    final = tmp_path / "train" / FINAL_DIR
    final.mkdir(parents=True)
    assert tracking.run_id_of(params, tmp_path) is None  # nothing trained yet
    ids = {}
    for name, weights in (("a", b"weights of a"), ("b", b"weights of b")):
        (final / "model.safetensors").write_bytes(weights)
        with tracking.stage_run(params, "train") as run:
            mlflow.set_tag(tracking.WEIGHTS_DIGEST_TAG, weights_digest(final))
        ids[name] = run.info.run_id
    (tmp_path / "train" / RUN_ID_FILE).write_text(ids["b"] + "\n")
    assert tracking.run_id_of(params, tmp_path) == ids["b"]
    (final / "model.safetensors").write_bytes(b"weights of a")  # DVC restored a's checkpoint
    assert tracking.run_id_of(params, tmp_path) == ids["a"]
    (final / "model.safetensors").write_bytes(b"weights nobody logged")
    assert tracking.run_id_of(params, tmp_path) is None
