"""End to end: the real stages train the tiny model through ms-swift, tracked in a real MLflow store."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import make_tiny_project, run_stage

from coordexp.core.checkpoint import weights_digest

KEYS = [
    "coord_softce_w1/loss",
    "coord_softce_w1/soft_ce",
    "coord_softce_w1/w1",
    "coord_softce_w1/gate",
    "coord_softce_w1/coord_vocab_mass",
    "coord_softce_w1/coord_tokens",
    "token_acc",
]
TYPE_KEYS = [
    "token_type/desc_loss",
    "token_type/desc_acc",
    "token_type/structure_loss",
    "token_type/structure_acc",
    "token_type/coord_loss",
    "token_type/coord_acc",
    "token_type/coord_acc_pm2",
]


def _trained(tiny_prepared, name: str, **updates) -> Path:
    root = tiny_prepared(name, **updates)
    run_stage(root, "train")
    return root


@pytest.fixture(scope="module")
def stage1_project(tiny_prepared):
    return _trained(tiny_prepared, "stage1", **{"train.token_type_metrics.enabled": True})


@pytest.fixture(scope="module")
def baseline_project(tiny_prepared):
    return _trained(tiny_prepared, "baseline", **{"train.coord_soft_ce_w1.enabled": False})


def _run(root: Path):
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / "artifacts" / "train" / "mlflow_run_id").read_text().strip()
    return mlflow.tracking.MlflowClient(), mlflow.get_run(run_id)


def _reference_eval(root: Path, enabled: bool) -> dict[str, float]:
    """The loss terms recomputed outside the trainer: the final checkpoint, the same eval samples
    encoded by the same template, one forward per sample, the library loss on the logits."""
    from transformers import AutoModelForImageTextToText

    from coordexp.core.config import load_params
    from coordexp.core.contract import read_jsonl
    from coordexp.core.template import encode_record, load_template
    from coordexp.core.vocab import coord_id_map
    from coordexp.train.loss import stage1_loss

    final = root / "artifacts" / "train" / "final"
    tpl = load_template(final, mode="train")
    model = AutoModelForImageTextToText.from_pretrained(final).eval()
    jsonl = root / "artifacts" / "preprocess" / "val.jsonl"
    logits, labels = [], []
    for rec in read_jsonl(jsonl)[:4]:
        enc = encode_record(tpl, rec, jsonl.parent)
        inputs = {
            k: torch.as_tensor(enc[k])[None]
            if k in ("input_ids", "attention_mask", "mm_token_type_ids")
            else torch.as_tensor(enc[k])
            for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
            if k in enc
        }
        with torch.no_grad():
            out = model(**inputs)
        lab = torch.as_tensor(enc["labels"])
        logits.append(out.logits[0, :-1])
        labels.append(lab[1:])
    z, y = torch.cat(logits), torch.cat(labels)
    cmap = coord_id_map(final)
    # the project's own loss settings (params.yaml weighs the terms unlike the schema defaults)
    loss_cfg = load_params(root / "params.yaml").train.coord_soft_ce_w1.model_dump(exclude={"enabled"})
    res = stage1_loss(z, y, cmap, **loss_cfg)
    ce = torch.nn.functional.cross_entropy(z, y, ignore_index=-100)
    return {"stage1": float(res.total), "ce": float(ce), "w1": float(res.w1), "soft_ce": float(res.soft_ce)}


@pytest.mark.slow
def test_stage1_training_logs_every_metric_and_learns(stage1_project):
    from coordexp.core.config import load_params

    root = stage1_project
    client, run = _run(root)
    assert run.info.status == "FINISHED"
    assert run.data.tags["coordexp.stage"] == "train" and run.data.tags["coordexp.loss"] == "stage1_softce_w1"
    w1_weight = load_params(root / "params.yaml").train.coord_soft_ce_w1.w1_weight
    assert run.data.params["cfg.train.coord_soft_ce_w1.w1_weight"] == str(w1_weight)
    for key in KEYS + TYPE_KEYS:
        for name in (key, f"eval_{key}"):
            hist = client.get_metric_history(run.info.run_id, name)
            assert len(hist) >= 3, f"{name}: only {len(hist)} points"
            assert all(math.isfinite(m.value) for m in hist), name
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)]
    assert loss[-1] < loss[0] * 0.8, f"loss did not decrease: {loss}"
    # outputs: checkpoint with its vocabulary, metrics, history
    final = root / "artifacts" / "train" / "final"
    assert (final / "model.safetensors").is_file() and (final / "coord_vocab.json").is_file()
    # the DVC output is the model only: no optimizer state, no file with timings or absolute paths
    assert not {"trainer_state.json", "training_args.bin", "optimizer.pt"} & {p.name for p in final.iterdir()}
    model_args = json.loads((final / "args.json").read_text())  # what ms-swift reads back to load it
    assert model_args["model_type"] == "qwen3_vl" and "model" not in model_args
    assert run.data.tags["coordexp.weights_digest"] == weights_digest(final)
    summary = json.loads((root / "reports" / "metrics" / "train.json").read_text())
    assert summary["steps"] == 30 and "tokens_per_second" not in summary and "wall_time_s" not in summary
    assert run.data.metrics["train_summary.tokens_per_second"] > 0  # timings go to MLflow only
    assert 0 < summary["final_eval_coord_vocab_mass"] <= 1
    hist = (root / "reports" / "train_history.csv").read_text().splitlines()
    assert hist[0].startswith("step,split") and len(hist) > 6
    assert not [c for c in hist[0].split(",") if "runtime" in c or "per_second" in c or "speed" in c]
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    assert {"config/resolved_params.json", "config/coord_vocab.json", "config/swift_args.json"} <= arts


@pytest.mark.slow
def test_training_run_reads_as_the_mlflow_ui_expects(stage1_project):
    """Named after what it is, the project's params only, relative paths, the launcher's arguments
    as an artifact, the preprocess outputs as dataset inputs with their DVC md5."""
    from dvc_data.hashfile.hash import file_md5

    from coordexp.core.config import load_params
    from coordexp.pipeline.tracking import mlflow_params

    root = stage1_project
    client, run = _run(root)
    assert run.info.run_name == "train/stage1"  # ms-swift's MLflow callback kept our name
    assert set(run.data.params) == set(mlflow_params(load_params(root / "params.yaml")))
    assert run.data.tags["coordexp.base_checkpoint"] == "artifacts/base"
    assert run.data.tags["coordexp.final_checkpoint"] == "artifacts/train/final"
    assert not [v for v in {**run.data.tags, **run.data.params}.values() if str(root) in v]
    for name in ("swift_args.json", "swift_resolved_args.json"):
        text = Path(client.download_artifacts(run.info.run_id, f"config/{name}", str(root / "dl"))).read_text()
        assert str(root) not in text and "artifacts/base" in text, name
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    inputs = {{t.key: t.value for t in i.tags}["mlflow.data.context"]: i.dataset for i in run.inputs.dataset_inputs}
    for context, split in (("training", "train"), ("validation", "val")):
        f = root / "artifacts" / "preprocess" / f"{split}.jsonl"
        assert inputs[context].digest == file_md5(str(f)), context
        assert json.loads(inputs[context].source) == {"uri": f"artifacts/preprocess/{split}.jsonl"}
    # the preprocess run has the same datasets (same digests) as its outputs
    (pre,) = mlflow.search_runs([run.info.experiment_id], "tags.`coordexp.stage` = 'preprocess'", output_format="list")
    assert pre.info.run_name == "preprocess"
    assert {i.dataset.digest for i in pre.inputs.dataset_inputs} == {d.digest for d in inputs.values()}


@pytest.mark.slow
def test_trainer_loss_equals_library_loss_on_the_same_logits(stage1_project):
    client, run = _run(stage1_project)
    eval_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
    ref = _reference_eval(stage1_project, enabled=True)
    assert eval_loss[30] == pytest.approx(ref["stage1"], rel=1e-4)


@pytest.mark.slow
def test_baseline_is_plain_ce_on_every_token(baseline_project):
    client, run = _run(baseline_project)
    assert run.data.tags["coordexp.loss"] == "ce_baseline" and run.info.run_name == "train/ce-baseline"
    eval_loss = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval_loss")}
    ref = _reference_eval(baseline_project, enabled=False)
    assert eval_loss[30] == pytest.approx(ref["ce"], rel=1e-4)
    assert abs(eval_loss[30] - ref["stage1"]) > 1e-3  # no coord_softce_w1 term entered the loss
    # the Stage-1 terms are still logged, as diagnostics
    assert client.get_metric_history(run.info.run_id, "eval_coord_softce_w1/w1")


@pytest.fixture(scope="module")
def ddp_project(tiny_prepared):
    """Two CPU processes of batch 2: the global batch of ``stage1_project``'s single process."""
    return _trained(
        tiny_prepared,
        "ddp",
        **{"train.token_type_metrics.enabled": True, "train.nproc_per_node": 2, "train.per_device_train_batch_size": 2},
    )


@pytest.mark.slow
def test_cpu_data_parallel_trains_like_one_process(stage1_project, ddp_project):
    """``nproc_per_node: 2`` on the CPU: ms-swift's torchrun with gloo, one thread per rank. The
    loss is normalised over the global batch (all ranks), so the first logged step, before any
    update, is the single process's loss on the same 4 samples; every metric is logged once."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    client, run = _run(ddp_project)
    assert run.info.status == "FINISHED"
    for key in KEYS + TYPE_KEYS:
        assert client.get_metric_history(run.info.run_id, key), key
    one = _history(*_client_run(stage1_project), "loss")
    two = _history(client, run.info.run_id, "loss")
    assert one.keys() == two.keys()
    first = min(one)
    assert two[first] == pytest.approx(one[first], rel=1e-4)
    tp = json.loads((ddp_project / "artifacts/train/swift/coordexp_throughput.json").read_text())
    tp1 = json.loads((stage1_project / "artifacts/train/swift/coordexp_throughput.json").read_text())
    assert tp["global_step"] == tp1["global_step"] == 30
    # tokens of both ranks (the same number of samples, drawn in another order)
    assert tp["tokens_seen"] == pytest.approx(tp1["tokens_seen"], rel=0.15)
    assert (ddp_project / "artifacts/train/final/model.safetensors").is_file()


def _client_run(root: Path):
    client, run = _run(root)
    return client, run.info.run_id


@pytest.mark.slow
def test_packing_is_refused_on_the_cpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    root = make_tiny_project(tmp_path / "repo", **{"train.packing": True})
    res = run_stage(root, "train", check=False)
    assert res.returncode == 2 and "train.packing" in res.stderr and "flash-attention" in res.stderr


@pytest.mark.slow
def test_evaluate_writes_metrics_that_match_pycocotools(stage1_project):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    root = stage1_project
    res = run_stage(root, "evaluate", **{})
    m = json.loads((root / "reports" / "metrics" / "eval.json").read_text())
    for key in (
        "bbox_mAP",
        "bbox_mAP50",
        "bbox_mAP75",
        "segm_mAP",
        "f1_at_0.5",
        "f1_at_0.3",
        "parse_rate",
        "nan_scores",
    ):
        assert key in m, key
    assert m["nan_scores"] == 0 and 0 <= m["parse_rate"] <= 1
    ev = root / "artifacts" / "eval"
    preds = [json.loads(line) for line in (ev / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all("text" in p and "problems" in p for p in preds)
    gt = COCO(str(ev / "coco_gt.json"))
    results = json.loads((ev / "coco_results.json").read_text())
    if results:
        e = COCOeval(gt, gt.loadRes(str(ev / "coco_results.json")), "bbox")
        e.evaluate(), e.accumulate(), e.summarize()
        assert m["bbox_mAP"] == pytest.approx(max(e.stats[0], 0.0), abs=1e-12)
    else:
        assert m["bbox_mAP"] == 0.0
    client, run = _run(root)
    logged = mlflow.get_run(run.info.run_id).data.metrics
    numbers = {k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {k: logged[k] for k in numbers} == pytest.approx(numbers)  # one name, one number, both places
    (ev_input,) = [
        i for i in mlflow.get_run(run.info.run_id).inputs.dataset_inputs if i.dataset.name == "val-evaluation"
    ]
    assert {t.key: t.value for t in ev_input.tags} == {"mlflow.data.context": "evaluation", "coordexp.records": "8"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "eval")} >= {
        "eval/predictions.jsonl",
        "eval/coco_gt.json",
        "eval/coco_results.json",
    }
    assert "evaluate" in res.stdout
    # the evaluated checkpoint is the run's MLflow model (by reference, the default), registered with the metrics
    versions = client.search_model_versions("name='coordexp-stage1'")
    latest = max(versions, key=lambda v: int(v.version))
    assert latest.run_id == run.info.run_id and float(latest.tags["bbox_mAP"]) == pytest.approx(m["bbox_mAP"])
    assert latest.tags["checkpoint"] == "artifacts/train/final" and "f1_at_0.5" in latest.tags
    # loaded from another working directory: the reference resolves through the store's repository
    (row,) = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(_one_image(root))
    assert row["error"] is None and isinstance(row["objects"], list)


def _one_image(root: Path):
    from coordexp.evaluate.mlflow_model import encode_image, input_example

    img = next((root / "artifacts" / "preprocess" / "images" / "val").glob("*.png"))
    return input_example().assign(image=[encode_image(img)])


@pytest.mark.slow
def test_evaluate_all_checkpoints_picks_best_by_map(stage1_project):
    from conftest import set_params

    root = stage1_project
    set_params(root, {"evaluate.checkpoints": "all", "evaluate.limit": 4})
    try:
        run_stage(root, "evaluate")
    finally:
        set_params(root, {"evaluate.checkpoints": "last", "evaluate.limit": 8})
    m = json.loads((root / "reports" / "metrics" / "eval.json").read_text())
    assert set(m["by_step"]) == {"10", "20", "30"}
    assert m["bbox_mAP"] == max(v or 0.0 for v in m["by_step"].values())
    client, run = _run(root)
    assert len(client.get_metric_history(run.info.run_id, "ckpt_bbox_mAP")) >= 3
    # the registered version is the best checkpoint's
    latest = max(client.search_model_versions("name='coordexp-stage1'"), key=lambda v: int(v.version))
    assert latest.tags["checkpoint"] == m["checkpoint"] == f"artifacts/train/swift/checkpoint-{m['best_step']}"
    assert latest.tags["best_step"] == str(m["best_step"])


@pytest.mark.slow
def test_predict_command_on_a_users_image(stage1_project, tmp_path):
    import subprocess
    import sys

    from PIL import Image

    img = next((stage1_project / "artifacts" / "preprocess" / "images" / "val").glob("*.png"))
    exe = Path(sys.executable).parent / "coordexp"
    res = subprocess.run(
        [
            exe,
            "predict",
            "--checkpoint",
            stage1_project / "artifacts" / "train" / "final",
            "--out",
            tmp_path / "out",
            "--max-new-tokens",
            "64",
            img,
        ],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert out["units"] == "pixels" and out["refused"] == []
    assert out["images"][0]["image"] == str(img) and isinstance(out["images"][0]["objects"], list)
    with Image.open(tmp_path / "out" / f"{img.stem}.pred.png") as im:
        assert im.size == Image.open(img).size
    bad = subprocess.run([exe, "predict", "--checkpoint", tmp_path / "nope", img], capture_output=True, text=True)
    assert bad.returncode == 2 and "no such checkpoint" in bad.stderr


@pytest.fixture(scope="module")
def fused_project(tiny_prepared):
    return _trained(tiny_prepared, "fused", **{"train.fused_loss": True})


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


@pytest.mark.slow
def test_fused_loss_training_gives_the_unfused_loss_curve(stage1_project, fused_project):
    """Same data, seeds and steps; only train.fused_loss differs: the loss curves, the Stage-1 terms
    and token_acc agree to fp32 round-off (two summation orders of the same sums, compounded by 30
    Adam steps), and the first logged step, before any update differs, agrees to 1e-5."""
    curves = {}
    for name, root in (("unfused", stage1_project), ("fused", fused_project)):
        client, run = _run(root)  # each project has its own MLflow store
        curves[name] = {
            key: _history(client, run.info.run_id, key)
            for key in (
                "loss",
                "eval_loss",
                "coord_softce_w1/w1",
                "coord_softce_w1/soft_ce",
                "coord_softce_w1/gate",
                "eval_coord_softce_w1/w1",
                "token_acc",
                "eval_token_acc",
            )
        }
    assert json.loads((fused_project / "artifacts/train/coordexp_plugin.json").read_text())["fused_loss"] is True
    for key, a in curves["unfused"].items():
        b = curves["fused"][key]
        assert a and a.keys() == b.keys(), key
        for step in a:
            assert b[step] == pytest.approx(a[step], rel=2e-3, abs=1e-4), (key, step)
    first = min(curves["unfused"]["loss"])
    assert curves["fused"]["loss"][first] == pytest.approx(curves["unfused"]["loss"][first], rel=1e-5)
    # the fused run's evaluation loss is the library loss on the final checkpoint's materialised logits
    assert curves["fused"]["eval_loss"][30] == pytest.approx(
        _reference_eval(fused_project, enabled=True)["stage1"], rel=1e-4
    )


def test_fused_loss_refuses_what_needs_full_logits():
    from coordexp.core.config import ConfigError, validate_params

    with pytest.raises(ConfigError, match="baseline"):
        validate_params({"train": {"fused_loss": True, "coord_soft_ce_w1": {"enabled": False}}})
    with pytest.raises(ConfigError, match="token_type_metrics"):
        validate_params({"train": {"fused_loss": True, "token_type_metrics": {"enabled": True}}})


def test_cpu_processes_are_capped_by_the_cores(monkeypatch):
    """CPU data parallel gets one process per core at most, and the cores are shared out."""
    from coordexp.core.config import load_params
    from coordexp.train import stage as training

    monkeypatch.setattr(training, "_cuda_available", lambda: False)
    monkeypatch.setattr(training, "_cpu_count", lambda: 4)
    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    params.train.nproc_per_node = 8
    with pytest.raises(ValueError, match="8 CPU processes on a machine with 4 cores"):
        training.check_hardware(params)
    params.train.nproc_per_node = 2
    training.check_hardware(params)
    assert training.rank_threads(params) == 2
    params.train.nproc_per_node = 1
    assert training.rank_threads(params) is None


@pytest.mark.slow
def test_vit_lr_reaches_the_optimizer(tiny_prepared):
    """``train.vit_lr: 0`` keeps the vision tower exactly as built while the merger and decoder train
    (ms-swift's multimodal optimizer groups, not a frozen module: the tower still gets gradients)."""
    from safetensors.torch import load_file

    root = _trained(
        tiny_prepared,
        "vit_lr",
        **{"train.vit_lr": 0.0, "train.max_steps": 5, "train.eval_steps": 5, "train.save_steps": 5},
    )
    base = load_file(str(root / "artifacts" / "base" / "model.safetensors"))
    final = load_file(str(root / "artifacts" / "train" / "final" / "model.safetensors"))
    tower = [k for k in base if ".visual." in k and ".merger" not in k and "deepstack_merger" not in k]
    merger = [k for k in base if ".visual.merger" in k]
    decoder = [k for k in base if ".language_model." in k]
    assert tower and merger and decoder
    assert all(torch.equal(base[k], final[k]) for k in tower)
    assert any(not torch.equal(base[k], final[k]) for k in merger)
    assert any(not torch.equal(base[k], final[k]) for k in decoder)


def _assert_only_coord_rows_moved(base: dict, final: dict, rows: list[str], base_dir: Path) -> None:
    """Every original vocabulary row of the embedding / head weights ``rows`` is bit-identical to the base, and
    the coord rows are not."""
    from coordexp.core.vocab import coord_id_map

    coord = coord_id_map(base_dir) >= 0
    for k in rows:
        keep = coord[: base[k].shape[0]]
        assert torch.equal(base[k][~keep], final[k][~keep]), k
        assert not torch.equal(base[k][keep], final[k][keep]), k


@pytest.mark.slow
def test_frozen_decoder_trains_its_coord_rows_alone(tiny_prepared):
    """``train.freeze: {vit, llm}``: the vision tower and the decoder stay bit-identical to the base, the
    original vocabulary rows of the (tied) embeddings / head too, while the merger and the coord rows learn;
    the trainable count reaches MLflow."""
    from safetensors.torch import load_file

    root = _trained(
        tiny_prepared,
        "freeze",
        **{
            "train.freeze.vit": True,
            "train.freeze.llm": True,
            "train.max_steps": 5,
            "train.eval_steps": 5,
            "train.save_steps": 5,
        },
    )
    base_dir = root / "artifacts" / "base"
    base = load_file(str(base_dir / "model.safetensors"))
    final = load_file(str(root / "artifacts" / "train" / "final" / "model.safetensors"))
    assert set(base) == set(final)
    rows = [k for k in base if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    merger = [k for k in base if ".visual.merger" in k or "deepstack_merger" in k]
    assert rows and merger
    _assert_only_coord_rows_moved(base, final, rows, base_dir)
    assert all(torch.equal(base[k], final[k]) for k in base if k not in rows and k not in merger)
    assert any(not torch.equal(base[k], final[k]) for k in merger)
    _, run = _run(root)
    summary = json.loads((root / "reports" / "metrics" / "train.json").read_text())
    assert 0 < summary["trainable_params"] < summary["total_params"]
    assert run.data.metrics["train_summary.trainable_params"] == summary["trainable_params"]
    assert 0 < run.data.metrics["train_summary.trainable_share"] < 1


@pytest.mark.slow
def test_lora_trains_merges_and_evaluates(tiny_prepared):
    """``train.tuner: lora``: adapters on the decoder's linear layers plus the coord rows, merged into a
    standalone ``final`` that ``evaluate`` loads as it is; the vision tower, the merger, the norms and every
    original vocabulary row stay bit-identical to the base."""
    from safetensors.torch import load_file

    root = _trained(
        tiny_prepared,
        "lora",
        **{
            "train.tuner": "lora",
            "train.max_steps": 5,
            "train.eval_steps": 5,
            "train.save_steps": 5,
            "evaluate.limit": 4,
            "evaluate.max_new_tokens": 32,
        },
    )
    base_dir, final_dir = root / "artifacts" / "base", root / "artifacts" / "train" / "final"
    base = load_file(str(base_dir / "model.safetensors"))
    final = load_file(str(final_dir / "model.safetensors"))
    assert set(base) == set(final)  # a plain checkpoint: no adapter weights left
    assert json.loads((final_dir / "args.json").read_text())["tuner_type"] == "full"
    assert (final_dir / "coord_vocab.json").is_file() and (final_dir / "tokenizer.json").is_file()
    rows = [k for k in base if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    adapted = [k for k in base if ".language_model.layers." in k and k.endswith("proj.weight")]
    assert rows and adapted
    _assert_only_coord_rows_moved(base, final, rows, base_dir)
    assert all(not torch.equal(base[k], final[k]) for k in adapted)
    assert all(torch.equal(base[k], final[k]) for k in base if k not in rows and k not in adapted)
    summary = json.loads((root / "reports" / "metrics" / "train.json").read_text())
    assert 0 < summary["trainable_share"] < 0.5
    run_stage(root, "evaluate")
    assert json.loads((root / "reports" / "metrics" / "eval.json").read_text())


@pytest.mark.slow
def test_lora_resume_restores_the_coord_rows(tiny_prepared):
    """An interrupted LoRA run resumes from its last checkpoint with the coord rows it had trained (the adapter
    file does not hold them): the merged model is the uninterrupted run's."""
    import shutil

    from safetensors.torch import load_file

    root = _trained(
        tiny_prepared,
        "lora_resume",
        **{"train.tuner": "lora", "train.max_steps": 4, "train.eval_steps": 4, "train.save_steps": 2},
    )
    train = root / "artifacts" / "train"
    straight = load_file(str(train / "final" / "model.safetensors"))
    state = json.loads((train / "state.json").read_text())
    (train / "state.json").write_text(json.dumps({**state, "status": "running"}))  # as a kill leaves it
    shutil.rmtree(train / "swift" / "checkpoint-4")  # killed between its two checkpoints
    assert "resuming run" in run_stage(root, "train").stdout
    resumed = load_file(str(train / "final" / "model.safetensors"))
    assert all(torch.allclose(resumed[k], straight[k], rtol=0, atol=1e-6) for k in straight)
