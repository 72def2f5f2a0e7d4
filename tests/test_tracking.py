import json
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


# ------------------------------------------------------------------------------------------
# MLflow as its UI expects: run names, experiment kind, params, paths, artifact location, datasets


@pytest.fixture
def own_store(tmp_path, monkeypatch):
    """The repository's own default store (no URI configured), with ``tmp_path`` as the repository."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("COORDEXP_STORE_ROOT", str(tmp_path))
    return tmp_path


def test_runs_are_named_after_stage_and_dvc_experiment(own_store, monkeypatch):
    stage1, baseline = Params(), Params.model_validate({"train": {"coord_soft_ce_w1": {"enabled": False}}})
    assert tracking.run_name(stage1, "train") == "train/stage1"
    assert tracking.run_name(baseline, "train") == "train/ce-baseline"
    assert tracking.run_name(stage1, "preprocess") == "preprocess"
    with tracking.stage_run(baseline, "train") as run:
        pass
    assert mlflow.get_run(run.info.run_id).info.run_name == "train/ce-baseline"
    monkeypatch.setenv("DVC_EXP_NAME", "w1zero")  # what `dvc exp run -n w1zero` sets
    assert tracking.run_name(stage1, "train") == "train/w1zero"
    with tracking.stage_run(stage1, "preprocess") as run:
        pass
    got = mlflow.get_run(run.info.run_id)
    assert got.info.run_name == "preprocess/w1zero" and got.data.tags["dvc.exp_name"] == "w1zero"
    # a later stage resuming the run keeps its name
    with tracking.stage_run(stage1, "evaluate", run_id=run.info.run_id):
        pass
    assert mlflow.get_run(run.info.run_id).info.run_name == "preprocess/w1zero"


def test_experiment_is_tagged_for_model_training(own_store):
    p = Params()
    with tracking.stage_run(p, "unit"):
        pass
    exp = mlflow.get_experiment_by_name(p.tracking.experiment)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    # an experiment created before (untagged, or tagged by the UI's guess) is tagged too
    client = mlflow.MlflowClient()
    client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", "genai_development_inferred")
    old = client.create_experiment("older", artifact_location=(own_store / "mlartifacts").as_uri())
    for params in (p, Params.model_validate({"tracking": {"experiment": "older"}})):
        with tracking.stage_run(params, "unit"):
            pass
    for exp_id in (exp.experiment_id, old):
        assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_the_run_params_are_the_validated_params_only(own_store):
    p = Params()
    with tracking.stage_run(p, "unit") as run:
        pass
    params = mlflow.get_run(run.info.run_id).data.params
    assert params == {k: str(v) for k, v in tracking.mlflow_params(p).items()}
    assert all(k.startswith("cfg.") for k in params)


def test_trainer_callback_logs_metrics_into_our_run_but_no_params(own_store, monkeypatch):
    """HF's MLflowCallback, as ms-swift runs it, in the environment the train stage gives it."""
    from transformers import PretrainedConfig, TrainingArguments
    from transformers.integrations import MLflowCallback
    from transformers.trainer_callback import TrainerControl, TrainerState

    p = Params()
    with tracking.stage_run(p, "train") as run:
        run_id = run.info.run_id
    for k, v in tracking.trainer_env(p, run_id).items():
        monkeypatch.setenv(k, v)
    args = TrainingArguments(
        output_dir=str(own_store / "swift"), run_name=tracking.run_name(p, "train"), report_to=["mlflow"]
    )
    model = type("Model", (), {"config": PretrainedConfig(_name_or_path=str(own_store / "artifacts/base"))})()
    cb, state = MLflowCallback(), TrainerState()
    cb.on_train_begin(args, state, TrainerControl(), model=model)
    state.global_step = 5
    cb.on_log(args, state, TrainerControl(), logs={"loss": 2.5, "coord_softce_w1/w1": 0.3, "learning_rate": 1e-3})
    cb.on_train_end(args, state, TrainerControl())
    mlflow.flush_async_logging()
    got = mlflow.get_run(run_id)
    assert got.info.run_name == "train/stage1"  # the callback resumed our run without renaming it
    assert set(got.data.params) == set(tracking.mlflow_params(p))  # none of the ~260 trainer arguments
    assert got.data.metrics == {"loss": 2.5, "coord_softce_w1/w1": 0.3, "learning_rate": 1e-3}
    assert mlflow.MlflowClient().get_metric_history(run_id, "loss")[0].step == 5


def test_paths_are_relative_to_the_repository(tmp_path):
    root = tmp_path / "repo"
    got = tracking.repo_relative(
        {"model": root / "artifacts" / "base", "cmd": ["--output_dir", f"{root}/artifacts/train"], "n": 3, "x": None},
        root,
    )
    assert got == {"model": "artifacts/base", "cmd": ["--output_dir", "artifacts/train"], "n": 3, "x": None}
    assert tracking.repo_relative(str(root), root) == "."
    assert tracking.repo_relative("/models/Qwen3-VL-2B", root) == "/models/Qwen3-VL-2B"  # not ours: as given


def _copy_store(src: Path, dst: Path, with_artifacts: bool) -> None:
    import shutil

    dst.mkdir(parents=True)
    shutil.copy2(src / "mlflow.db", dst / "mlflow.db")
    if with_artifacts:
        shutil.copytree(src / "mlartifacts", dst / "mlartifacts")


@pytest.mark.parametrize("with_artifacts", [True, False])
def test_a_copied_repository_logs_into_its_own_mlartifacts(tmp_path, monkeypatch, own_store, with_artifacts):
    p = Params()
    orig, copy = tmp_path / "orig", tmp_path / "copy"
    monkeypatch.setenv("COORDEXP_STORE_ROOT", str(orig))
    with tracking.stage_run(p, "train") as run:
        mlflow.log_dict({"a": 1}, "config/a.json")
    old_run = run.info.run_id
    _copy_store(orig, copy, with_artifacts)
    monkeypatch.setenv("COORDEXP_STORE_ROOT", str(copy))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # set by mlflow.set_tracking_uri: a stage process starts without it
    with tracking.stage_run(p, "train") as run:
        mlflow.log_dict({"b": 2}, "config/b.json")
    assert (copy / "mlartifacts" / run.info.run_id / "artifacts" / "config" / "b.json").is_file()
    assert not (orig / "mlartifacts" / run.info.run_id).exists()
    assert mlflow.get_experiment_by_name(p.tracking.experiment).artifact_location == (copy / "mlartifacts").as_uri()
    # an earlier run points at the copy of its artifacts, or, when none was copied, where they are
    home = copy if with_artifacts else orig
    assert mlflow.get_run(old_run).info.artifact_uri == (home / "mlartifacts" / old_run / "artifacts").as_uri()
    from mlflow.tracking._tracking_service import utils as service

    service._artifact_repos_cache.clear()  # what this process learnt of the run before the copy; a stage starts afresh
    with tracking.stage_run(p, "report", run_id=old_run):  # report resumes the training run
        mlflow.log_dict({"c": 3}, "config/c.json")
    assert (home / "mlartifacts" / old_run / "artifacts" / "config" / "c.json").is_file()
    # the original repository's store is untouched
    monkeypatch.setenv("COORDEXP_STORE_ROOT", str(orig))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking.tracking_uri(p))
    assert mlflow.get_experiment_by_name(p.tracking.experiment).artifact_location == (orig / "mlartifacts").as_uri()


def test_an_artifact_location_chosen_elsewhere_is_named_not_followed(tmp_path, own_store):
    p = Params()
    mlflow.set_tracking_uri(tracking.tracking_uri(p))
    mlflow.create_experiment(p.tracking.experiment, artifact_location=(tmp_path / "shared-artifacts").as_uri())
    with pytest.raises(tracking.TrackingError, match="shared-artifacts.*tracking.artifact_location"):
        with tracking.stage_run(p, "unit"):
            pass
    chosen = Params.model_validate({"tracking": {"artifact_location": str(tmp_path / "shared-artifacts")}})
    with tracking.stage_run(chosen, "unit") as run:  # the user's choice is respected
        pass
    assert run.info.artifact_uri.startswith((tmp_path / "shared-artifacts").as_uri())


def test_dataset_inputs_carry_the_repository_path_and_the_dvc_md5(own_store):
    from dvc_data.hashfile.hash import file_md5

    f = own_store / "artifacts" / "preprocess" / "train.jsonl"
    f.parent.mkdir(parents=True)
    f.write_text('{"id": 1}\n{"id": 2}\n')
    with tracking.stage_run(Params(), "unit") as run:
        tracking.log_dataset(f, "training", records=2, root=own_store)
    (inp,) = mlflow.get_run(run.info.run_id).inputs.dataset_inputs
    assert inp.dataset.name == "train" and inp.dataset.digest == file_md5(str(f)) == tracking.file_md5(f)
    assert json.loads(inp.dataset.source) == {"uri": "artifacts/preprocess/train.jsonl"}
    assert {t.key: t.value for t in inp.tags} == {"mlflow.data.context": "training", "coordexp.records": "2"}
