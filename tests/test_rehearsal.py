"""The rehearsal: the path a real user takes (a Qwen-VL folder -> expand -> train -> evaluate -> report) at real scale.

The checkpoint is ``coordexp rehearsal-checkpoint`` (:mod:`coordexp.build_base.rehearsal`): Qwen's real 151k BPE and
special-token ids, Qwen3-VL-2B's widths, 2 layers, random weights. The fast tests check the folder and what the
template makes of it; the slow one runs every stage on it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import make_tiny_project, run_stage, set_params, stage_env

from coordexp.build_base.qwen_bpe import REAL_IDS
from coordexp.build_base.rehearsal import build_rehearsal, rehearsal_config
from coordexp.core.checkpoint import CheckpointError
from coordexp.core.codec import COORD_TOKENS

ANSWER = (
    '{"object_1": {"desc": "red circle", "bbox_2d": ["<|coord_0|>", "<|coord_12|>", "<|coord_500|>", "<|coord_999|>"]}}'
)


@pytest.fixture(scope="module")
def processor_only(tmp_path_factory) -> dict[str, Path]:
    """Both architectures' folders without weights (config, processor, tokenizer): seconds, not minutes."""
    base = tmp_path_factory.mktemp("rehearsal_cfg")
    return {arch: build_rehearsal(arch, base / arch, weights=False) for arch in ("qwen3_vl", "qwen2_5_vl")}


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_rehearsal_folder_has_the_real_ids_and_hub_layout(processor_only, arch):
    from transformers import AutoConfig, AutoProcessor

    ckpt = processor_only[arch]
    names = {p.name for p in ckpt.iterdir()}
    assert {"config.json", "tokenizer.json", "preprocessor_config.json", "chat_template.jinja", "README.md"} <= names
    assert "not a model" in (ckpt / "README.md").read_text()
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["model_type"] == arch and "not a model" in cfg["coordexp_rehearsal"]
    assert cfg["image_token_id"] == 151655 and cfg["video_token_id"] == 151656
    assert cfg["vision_start_token_id"] == 151652 and cfg["tie_word_embeddings"] is True
    config = AutoConfig.from_pretrained(ckpt)
    text = config.get_text_config()
    assert (text.vocab_size, text.hidden_size, text.num_attention_heads) == (151936, 2048, 16)
    assert text.num_key_value_heads == (8 if arch == "qwen3_vl" else 2)
    assert config.vision_config.out_hidden_size == 2048
    proc = AutoProcessor.from_pretrained(ckpt)
    tok = proc.tokenizer
    for name, i in REAL_IDS.items():
        assert tok.convert_tokens_to_ids(name) == i, name
    assert len(tok) == (151669 if arch == "qwen3_vl" else 151665)
    assert tok("Hello")["input_ids"] == [9707]  # Qwen2's id: the ranks are Qwen's, not retrained
    assert not set(COORD_TOKENS[:3]) & set(tok.get_vocab())  # expand adds them, as to a user's folder
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["patch_size"] == (16 if arch == "qwen3_vl" else 14) and pre["merge_size"] == 2
    assert pre["image_mean"][0] == (0.5 if arch == "qwen3_vl" else 0.48145466)


def test_reduced_depth_keeps_layer_lists_inside_the_tower():
    q3 = rehearsal_config("qwen3_vl", 2, 3)
    assert q3.vision_config.deepstack_visual_indexes and max(q3.vision_config.deepstack_visual_indexes) < 3
    assert rehearsal_config("qwen3_vl", 28, 24).vision_config.deepstack_visual_indexes == [5, 11, 17]
    q25 = rehearsal_config("qwen2_5_vl", 2, 4)
    assert q25.vision_config.fullatt_block_indexes == [3]  # blocks 0-2 window attention, the last one full
    assert rehearsal_config("qwen2_5_vl", 2, 12).vision_config.fullatt_block_indexes == [7, 11]
    assert rehearsal_config("qwen2_5_vl", 36, 32).vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    with pytest.raises(ValueError, match="arch"):
        rehearsal_config("qwen2_vl", 2, 2)


@pytest.mark.parametrize("arch", ["qwen3_vl", "qwen2_5_vl"])
def test_chat_template_and_image_size_match_what_swift_trains_on(processor_only, arch, tmp_path):
    """Evaluation renders the prompt with the folder's processor and chat template, training with ms-swift's template.
    Under the real BPE and chat templates (Qwen2.5-VL's has a default system turn) the text agrees; the image size
    agrees once expand has aligned the pixel bounds (regression: Qwen3-VL's published processor upscales a small image
    to 64 visual tokens, ms-swift trains it at 4)."""
    import shutil

    from PIL import Image
    from transformers import AutoProcessor

    from coordexp.build_base.expand import align_pixel_bounds
    from coordexp.core.template import build_messages, encode_record, load_template, to_hf_messages

    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "a.png")
    rec = {"id": 1, "images": ["a.png"], "width": 64, "height": 48, "objects": []}
    row = build_messages(rec, tmp_path, with_answer=False)

    def hf_ids(ckpt: Path) -> list[int]:
        proc = AutoProcessor.from_pretrained(ckpt)
        text = proc.apply_chat_template(to_hf_messages(row), add_generation_prompt=True, tokenize=False)
        return proc(text=[text], images=[Image.open(tmp_path / "a.png")], return_tensors="pt")["input_ids"][0].tolist()

    src = processor_only[arch]
    sw = encode_record(load_template(src, mode="transformers"), rec, tmp_path, with_answer=False)["input_ids"]
    assert sw.count(REAL_IDS["<|image_pad|>"]) == 4  # 64 x 48 -> 64 x 64 px -> 2 x 2 merged patches
    raw = hf_ids(src)
    aligned = tmp_path / "aligned"
    shutil.copytree(src, aligned)
    proc = AutoProcessor.from_pretrained(src)
    before = align_pixel_bounds(proc)
    proc.save_pretrained(aligned)
    if arch == "qwen3_vl":
        assert before == {"shortest_edge": 65536, "longest_edge": 16777216}
        assert raw.count(REAL_IDS["<|image_pad|>"]) > 4  # the published bounds upscale it
    else:
        assert before is None and raw == sw  # Qwen2.5-VL's published bounds are ms-swift's
    assert hf_ids(aligned) == sw


def test_expand_and_train_agree_on_a_qwen2_vl_folder(processor_only, tmp_path):
    """A ``qwen2_vl`` folder (Qwen2-VL: a model type the template and train do not support) is refused by expand
    before anything is written, and by the template that train and evaluate load, with the same message."""
    from coordexp.build_base.build import build_base
    from coordexp.core.template import load_template

    src = tmp_path / "qwen2_vl"
    src.mkdir()
    for f in processor_only["qwen2_5_vl"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "qwen2_vl"
    (src / "config.json").write_text(json.dumps(cfg))
    (src / "model.safetensors").write_bytes(b"")  # present, so only the model type can be the reason
    with pytest.raises(CheckpointError, match="model_type 'qwen2_vl' is not supported") as exp:
        build_base("expand", tmp_path / "base", expand={"source": str(src), "init": "mean", "ordinal_scale": 0.02})
    assert not (tmp_path / "base").exists()
    with pytest.raises(CheckpointError, match="model_type 'qwen2_vl' is not supported") as tpl:
        load_template(src)
    assert "supported: ['qwen2_5_vl', 'qwen3_vl']" in str(exp.value) and "supported: ['qwen2_5_vl', 'qwen3_vl']" in str(
        tpl.value
    )


def test_cli_refuses_a_non_empty_folder(tmp_path, capsys):
    from coordexp.cli import main

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    assert main(["rehearsal-checkpoint", "--arch", "qwen3_vl", "--out", str(tmp_path / "x")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def _losses(root: Path, out_dir: str) -> dict[int, float]:
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    run_id = (root / out_dir / "mlflow_run_id").read_text().strip()
    hist = mlflow.tracking.MlflowClient().get_metric_history(run_id, "loss")
    return {m.step: m.value for m in hist}


@pytest.mark.slow
def test_rehearsal_pipeline_at_real_scale(tmp_path):
    """Qwen3-VL-2B widths, the real vocabulary, 2 layers: expand, train 2 steps unfused and fused (the same losses),
    evaluate 2 val images with constrained decoding (every answer parses, from random weights), report."""
    t0 = time.time()
    ckpt = tmp_path / "qwen3vl_rehearsal"
    res = subprocess.run(
        [sys.executable, "-m", "coordexp.cli", "rehearsal-checkpoint", "--arch", "qwen3_vl", "--out", str(ckpt)],
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    root = make_tiny_project(
        tmp_path / "repo",
        n_train=4,
        n_val=2,
        **{
            "preprocess.max_side": 64,
            "build_base.mode": "expand",
            "build_base.expand.source": str(ckpt),
            "train.max_steps": 2,
            "train.logging_steps": 1,
            "train.eval_steps": 2,
            "train.save_steps": 2,
            "train.eval_samples": 1,
            "train.per_device_train_batch_size": 1,
            "train.per_device_eval_batch_size": 1,
            "train.nproc_per_node": 1,
            "train.max_length": 384,
            "train.learning_rate": 1e-4,
            "train.out_dir": "artifacts/train_unfused",
            "evaluate.limit": 2,
            "evaluate.batch_size": 2,
            "evaluate.max_new_tokens": 40,
            "evaluate.max_objects": 2,
        },
    )
    run_stage(root, "preprocess")
    run_stage(root, "build_base")
    base = root / "artifacts" / "base"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    ids = tok(ANSWER)["input_ids"]
    coord_ids = tok.convert_tokens_to_ids(list(COORD_TOKENS))
    assert coord_ids == list(range(151669, 151669 + 1000))  # after Qwen3-VL's last added token, in bin order
    assert [i for i in ids if i in set(coord_ids)] == [coord_ids[k] for k in (0, 12, 500, 999)]  # atomic
    assert tok.decode(ids) == ANSWER
    assert tok.convert_tokens_to_ids("<|image_pad|>") == 151655
    info = json.loads((base / "build_info.json").read_text())  # the pixel bounds aligned with ms-swift's
    assert info["image_size_of_source"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert json.loads((base / "processor_config.json").read_text())["image_processor"]["size"]["shortest_edge"] == 4096
    t_expand = time.time()

    run_stage(root, "train")
    set_params(root, {"train.fused_loss": True, "train.out_dir": "artifacts/train"})
    run_stage(root, "train")
    unfused, fused = _losses(root, "artifacts/train_unfused"), _losses(root, "artifacts/train")
    assert sorted(unfused) == sorted(fused) and len(unfused) >= 2
    for step in sorted(unfused):
        assert fused[step] == pytest.approx(unfused[step], rel=1e-4), (step, unfused, fused)
    assert torch.isfinite(torch.tensor(list(fused.values()))).all()
    t_train = time.time()

    run_stage(root, "evaluate")
    m = json.loads((root / "reports" / "metrics" / "eval.json").read_text())
    assert m["parse_rate"] == 1.0 and m["nan_scores"] == 0
    preds = [json.loads(line) for line in (root / "artifacts" / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and all(p["text"].startswith("{") for p in preds)
    run_stage(root, "report")
    assert {p.name for p in (root / "reports" / "html").glob("*.html")} >= {"eval_report.html"}
    print(
        f"rehearsal: checkpoint+preprocess+expand {t_expand - t0:.0f} s, two trains {t_train - t_expand:.0f} s, "
        f"evaluate+report {time.time() - t_train:.0f} s"
    )
