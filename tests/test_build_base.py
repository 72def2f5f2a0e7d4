"""build_base: the tiny checkpoint, the expand mode (tied and untied), refusals, atomic output."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SMALL_MODEL

from coordexp.core.codec import K, encode_xy
from coordexp.core.config import ExpandConfig
from coordexp.core.vocab import CoordVocabError, coord_id_map, find_coord_token_ids, load_coord_vocab

EXPAND = ExpandConfig()  # the schema's expand defaults

REPO = Path(__file__).resolve().parents[1]
SMALL = SMALL_MODEL
DESCS = ["red circle", "blue square", "green triangle"]


def write_dataset(root: Path, n: int = 8, seed: int = 0) -> Path:
    """A few contract records (coord mode) + 128 px PNGs; returns the JSONL path."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        img = Image.new("RGB", (128, 128), (0, 0, 0))
        draw = ImageDraw.Draw(img)
        objs = []
        for _ in range(rng.randint(1, 3)):
            x, y = rng.randint(0, 90), rng.randint(0, 90)
            draw.rectangle([x, y, x + 30, y + 30], fill=(255, 0, 0))
            objs.append({"desc": rng.choice(DESCS), "bbox_2d": encode_xy([x, y, x + 30, y + 30], 128, 128)})
        objs.append({"desc": "blue triangle", "poly": encode_xy([10, 10, 40, 10, 25, 35], 128, 128)})
        objs.append({"desc": "green line", "line": encode_xy([0, 0, 127, 127], 128, 128)})
        rel = f"images/train/{i:06d}.png"
        img.save(root / rel)
        lines.append(json.dumps({"id": i, "images": [rel], "width": 128, "height": 128, "objects": objs}))
    path = root / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def tiny(data, tmp_path_factory) -> Path:
    from coordexp.build_base.tiny import build_tiny

    # the default model, with a token warm-up (its own tests are in test_vision_warmup.py)
    return build_tiny(data, tmp_path_factory.mktemp("tiny") / "base", vision_warmup={"steps": 2})


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def plain(request, data, tmp_path_factory) -> Path:
    """A checkpoint without coord tokens standing in for a real Qwen3-VL."""
    from coordexp.build_base.tiny import build_tiny

    out = tmp_path_factory.mktemp("plain") / "base"
    return build_tiny(data, out, coord_tokens=False, tie_word_embeddings=request.param, **SMALL)


def _forward(ckpt: Path, model=None):
    """One forward pass with an image through the plain transformers processor."""
    from PIL import Image
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    proc = AutoProcessor.from_pretrained(str(ckpt))
    model = model or Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect all objects."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + '{"object_1": ["<|coord_5|>'
    inputs = proc(text=[text], images=[Image.new("RGB", (128, 128), (9, 99, 199))], return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    return inputs, out


# ---------------------------------------------------------------------------------------------
# tiny


def test_tiny_checkpoint_files_and_loading(tiny):
    from transformers import AutoProcessor, Qwen2VLImageProcessor, Qwen3VLProcessor

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "coord_vocab.json",
    ):
        assert (tiny / name).is_file(), name
    proc = AutoProcessor.from_pretrained(str(tiny), local_files_only=True)
    assert isinstance(proc, Qwen3VLProcessor)
    assert isinstance(proc.image_processor, Qwen2VLImageProcessor)
    assert type(proc.tokenizer).__name__ == "Qwen2Tokenizer"
    cfg = json.loads((tiny / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_vl" and cfg["architectures"] == ["Qwen3VLForConditionalGeneration"]
    tok = proc.tokenizer
    assert cfg["image_token_id"] == tok.convert_tokens_to_ids("<|image_pad|>") == proc.image_token_id
    assert cfg["vision_start_token_id"] == tok.convert_tokens_to_ids("<|vision_start|>")
    v = cfg["text_config"]["vocab_size"]
    assert v % 64 == 0 and len(tok) <= v < len(tok) + 64
    assert load_coord_vocab(tiny)["vocab_size"] == v
    assert coord_id_map(tiny).shape == (v,)


def test_tiny_model_is_small_and_runs(tiny):
    from transformers import Qwen3VLForConditionalGeneration

    from coordexp.build_base.build import safetensors_num_params
    from coordexp.build_base.tiny import count_parameters

    model = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny))
    n = count_parameters(model)
    assert 100_000 < n < 5_000_000
    assert safetensors_num_params(tiny) == n  # tied lm_head saved once
    inputs, out = _forward(tiny, model)
    n_img = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_img == 64  # 128 px / 8 px patches = 16x16, merged 2x2
    assert out.logits.shape[-1] == model.config.text_config.vocab_size


def test_tiny_tokenizer_learns_the_descriptions(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny))
    # frequent words of the training descriptions become few tokens
    assert len(tok.encode("red circle", add_special_tokens=False)) <= 3
    assert find_coord_token_ids(tok) is not None


def test_tiny_grammar_tokens_shorten_the_answer_and_decode_verbatim(tiny, data, tmp_path):
    """The saved tokenizer, loaded back, keeps each grammar string whole, decodes answers verbatim
    and types them as structure; without ``grammar_tokens`` the same answers are much longer."""
    from transformers import AutoTokenizer

    from coordexp.build_base.tiny import build_tiny, grammar_tokens
    from coordexp.core.contract import read_jsonl, render_answer
    from coordexp.core.template import PROMPT
    from coordexp.train.token_types import STRUCTURE, TokenTyper

    tok = AutoTokenizer.from_pretrained(str(tiny))
    for g in grammar_tokens():
        assert len(tok.encode(g, add_special_tokens=False)) == 1, g
    assert tok.encode(PROMPT, add_special_tokens=False) == [tok.convert_tokens_to_ids(PROMPT)]
    plain = AutoTokenizer.from_pretrained(str(build_tiny(data, tmp_path / "plain", grammar_tokens=False, **SMALL)))
    answers = [render_answer(list(r.objects)) for r in read_jsonl(data, mode="coord")]
    short = [tok.encode(a, add_special_tokens=False) for a in answers]
    long = [plain.encode(a, add_special_tokens=False) for a in answers]
    for a, ids in zip(answers, short):
        assert tok.decode(ids) == a
    assert sum(map(len, short)) < 0.6 * sum(map(len, long))
    typer = TokenTyper(tok, coord_id_map(tiny))
    types = typer.types(torch.tensor([short[0]]))[0].tolist()
    grammar_ids = {tok.convert_tokens_to_ids(g) for g in grammar_tokens()}
    assert all(t == STRUCTURE for i, t in zip(short[0], types) if i in grammar_ids)
    assert any(i in grammar_ids for i in short[0])


def test_tiny_is_deterministic(data, tmp_path):
    from coordexp.build_base.tiny import build_tiny

    warm = {**SMALL, "vision_warmup": {"steps": 2, "batch_size": 4}}  # the warm-up is seeded too
    a = build_tiny(data, tmp_path / "a", **warm)
    b = build_tiny(data, tmp_path / "b", **warm)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_tiny_ordinal_coord_init(data, tmp_path):
    """``coord_init: ordinal`` rewrites only the coord rows, at the random rows' scale, smooth in the bin."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from coordexp.core.codec import COORD_TOKENS

    rand = build_tiny_small(data, tmp_path / "random", coord_init="random")
    ordi = build_tiny_small(data, tmp_path / "ordinal", coord_init="ordinal")
    a, b = load_file(str(rand / "model.safetensors")), load_file(str(ordi / "model.safetensors"))
    key = "model.language_model.embed_tokens.weight"
    ids = AutoTokenizer.from_pretrained(str(ordi)).convert_tokens_to_ids(list(COORD_TOKENS))
    others = [i for i in range(a[key].shape[0]) if i not in set(ids)]
    assert torch.equal(a[key][others], b[key][others])
    assert all(torch.equal(a[k], b[k]) for k in a if k != key)
    rows = b[key][ids].double()
    cos = torch.nn.functional.cosine_similarity
    near, far = cos(rows[:-1], rows[1:]).mean(), cos(rows[:-500], rows[500:]).mean()
    assert near > 0.95 and far < 0.5
    assert rows.std() == pytest.approx(float(a[key][others].std()), rel=0.2)
    assert cos(a[key][ids][:-1].double(), a[key][ids][1:].double()).mean().abs() < 0.2  # random rows are not


def build_tiny_small(data, out, **kw):
    from coordexp.build_base.tiny import build_tiny

    return build_tiny(data, out, **{**SMALL, **kw})


def test_tiny_rejects_bad_dims(data, tmp_path):
    from coordexp.build_base.tiny import build_tiny

    with pytest.raises(ValueError, match="num_heads"):
        build_tiny(data, tmp_path / "x", hidden_size=30, num_heads=4)
    with pytest.raises(TypeError, match="unknown tiny model settings"):
        build_tiny(data, tmp_path / "y", hidden=3)


# ---------------------------------------------------------------------------------------------
# expand


def _load(ckpt: Path):
    from transformers import Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt)).requires_grad_(False)


def _n_real(plain: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(plain)))


def test_expand_mean(plain, tmp_path):
    from coordexp.build_base.expand import expand_checkpoint

    out = expand_checkpoint(plain, tmp_path / "exp", init="mean", ordinal_scale=EXPAND.ordinal_scale)
    old, new = _load(plain), _load(out)
    tied = old.config.tie_word_embeddings
    n_real = _n_real(plain)
    ids = load_coord_vocab(out)["coord_token_ids"]
    assert ids == list(range(ids[0], ids[0] + K)) and ids[0] >= n_real
    e_old, e_new = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    o_old, o_new = old.get_output_embeddings().weight, new.get_output_embeddings().weight
    assert e_new.shape[0] >= n_real + K and e_new.shape[0] % 64 == 0
    assert new.config.text_config.vocab_size == e_new.shape[0]
    # old rows unchanged (bit for bit), input and output
    assert torch.equal(e_old[:n_real], e_new[:n_real])
    assert torch.equal(o_old[:n_real], o_new[:n_real])
    # new rows: the mean of the existing real rows
    torch.testing.assert_close(e_new[ids], e_old[:n_real].mean(0).expand(K, -1))
    torch.testing.assert_close(o_new[ids], o_old[:n_real].mean(0).expand(K, -1))
    assert (new.get_output_embeddings().weight.data_ptr() == new.get_input_embeddings().weight.data_ptr()) == tied
    if not tied:
        assert not torch.allclose(e_new[ids[0]], o_new[ids[0]])
    coord_id_map(out)  # tokenizer, config and coord_vocab.json agree
    _, logits = _forward(out, new)
    # mean init: all coord logits equal at every position
    coord_logits = logits.logits[0, :, ids]
    torch.testing.assert_close(coord_logits, coord_logits[:, :1].expand_as(coord_logits))
    info = json.loads((out / "build_info.json").read_text())
    assert info["embeddings_resized"] is True and info["init"] == "mean"


def test_expand_round_trip_save_load(plain, tmp_path):
    from coordexp.build_base.expand import expand_checkpoint

    out = expand_checkpoint(plain, tmp_path / "exp", init="ordinal", ordinal_scale=EXPAND.ordinal_scale)
    m1 = _load(out)
    m1.save_pretrained(tmp_path / "again")
    m2 = _load(tmp_path / "again")
    for (n1, p1), (n2, p2) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_expand_ordinal(plain, tmp_path):
    from coordexp.build_base.expand import expand_checkpoint

    out = expand_checkpoint(plain, tmp_path / "exp", init="ordinal", ordinal_scale=0.05)
    old, new = _load(plain), _load(out)
    n_real = _n_real(plain)
    ids = load_coord_vocab(out)["coord_token_ids"]
    for w_old, w_new in (
        (old.get_input_embeddings().weight, new.get_input_embeddings().weight),
        (old.get_output_embeddings().weight, new.get_output_embeddings().weight),
    ):
        real = w_old[:n_real]
        rows = w_new[ids]
        dev = (rows - real.mean(0)) / real.std(0)
        # the deviation is ordinal_scale x a unit-RMS code
        assert float(dev.pow(2).mean().sqrt()) == pytest.approx(0.05, rel=1e-3)
        d = torch.cdist(rows[None], rows[None])[0]
        # neighbouring bins start close, far bins apart
        assert float(d[500, 501]) < float(d[500, 510]) < float(d[500, 600]) < float(d[500, 999])
        assert float(d.diagonal(1).max()) < float(d[0, 999]) / 5
        assert torch.equal(w_old[:n_real], w_new[:n_real])
    _forward(out, new)


def test_expand_accepts_checkpoint_with_coord_tokens(tiny, tmp_path):
    from coordexp.build_base.expand import expand_checkpoint

    out = expand_checkpoint(tiny, tmp_path / "exp", init=EXPAND.init, ordinal_scale=EXPAND.ordinal_scale)
    assert load_coord_vocab(out) == load_coord_vocab(tiny)
    assert (out / "model.safetensors").read_bytes() == (tiny / "model.safetensors").read_bytes()
    assert json.loads((out / "build_info.json").read_text())["embeddings_resized"] is False


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a directory"),
        (lambda p: (p / "d").mkdir() or p / "d", "no config.json"),
        (
            lambda p: (p / "d").mkdir() or (p / "d" / "config.json").write_text('{"model_type": "llama"}') and p / "d",
            "model_type 'llama'",
        ),
    ],
    ids=["missing", "file", "no-config", "wrong-type"],
)
def test_expand_refuses_non_checkpoints(tmp_path, make, match):
    from coordexp.build_base.expand import expand_checkpoint
    from coordexp.core.checkpoint import CheckpointError

    src = make(tmp_path)
    with pytest.raises(CheckpointError, match=match) as err:
        expand_checkpoint(src, tmp_path / "out", init=EXPAND.init, ordinal_scale=EXPAND.ordinal_scale)
    assert "Place a complete Hugging Face checkpoint" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_expand_refuses_checkpoint_without_weights(tiny, tmp_path):
    from coordexp.build_base.expand import expand_checkpoint
    from coordexp.core.checkpoint import CheckpointError

    src = tmp_path / "noweights"
    shutil.copytree(tiny, src)
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        expand_checkpoint(src, tmp_path / "out", init=EXPAND.init, ordinal_scale=EXPAND.ordinal_scale)


def test_expand_refuses_partial_coord_set(plain, tmp_path):
    from tokenizers import AddedToken
    from transformers import AutoProcessor

    from coordexp.build_base.expand import expand_checkpoint
    from coordexp.core.codec import COORD_TOKENS

    src = tmp_path / "partial"
    shutil.copytree(plain, src)
    proc = AutoProcessor.from_pretrained(str(src))
    proc.tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in COORD_TOKENS[:5]])
    proc.save_pretrained(src)
    with pytest.raises(CoordVocabError, match="5 of the 1000"):
        expand_checkpoint(src, tmp_path / "out", init=EXPAND.init, ordinal_scale=EXPAND.ordinal_scale)


# ---------------------------------------------------------------------------------------------
# build_base (atomic output) and the stage script


def test_build_base_tiny_is_atomic(data, tmp_path):
    from coordexp.build_base.build import build_base

    out = tmp_path / "artifacts" / "base"
    summary = build_base("tiny", out, train_jsonl=data, tiny=SMALL)
    assert summary["parameters"] > 0 and summary["checkpoint_bytes"] > 0
    assert summary["coord_id_max"] - summary["coord_id_min"] == K - 1
    first = (out / "model.safetensors").read_bytes()
    # a failing rebuild leaves the previous checkpoint untouched and no temp dir behind
    with pytest.raises(ValueError):
        build_base("tiny", out, train_jsonl=data, tiny={**SMALL, "hidden_size": 30})
    assert (out / "model.safetensors").read_bytes() == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["base"]
    # a successful rebuild replaces it
    build_base("tiny", out, train_jsonl=data, tiny={**SMALL, "seed": 1})
    assert (out / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in out.parent.iterdir()) == ["base"]


def _file_hashes(folder: Path) -> dict[str, str]:
    """{relative path: md5} of every file: what DVC hashes for a folder output."""
    import hashlib

    return {
        str(f.relative_to(folder)): hashlib.md5(f.read_bytes()).hexdigest()
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def test_build_base_is_byte_deterministic(data, tmp_path):
    """Two builds from the same params, in two different folders, hash the same file for file: a fresh
    clone's `dvc repro` reproduces the committed dvc.lock. The wall times are only in the summary."""
    from coordexp.build_base.build import build_base

    warm = {**SMALL, "vision_warmup": {"steps": 2, "batch_size": 4}}
    builds = []
    for name in ("a", "b"):
        out = tmp_path / name / "artifacts" / "base"
        summary = build_base("tiny", out, train_jsonl=data, tiny=warm)
        assert summary["build_seconds"] > 0 and summary["vision_warmup_seconds"] > 0
        builds.append(_file_hashes(out))
    assert "build_info.json" in builds[0] and "model.safetensors" in builds[0]
    assert builds[0] == builds[1]
    info = json.loads((tmp_path / "a" / "artifacts" / "base" / "build_info.json").read_text())
    assert "build_seconds" not in info and "seconds" not in info["vision_warmup"]


def test_build_base_refuses_before_writing(tmp_path):
    from coordexp.build_base.build import build_base
    from coordexp.core.checkpoint import CheckpointError

    with pytest.raises(FileNotFoundError, match="preprocess"):
        build_base("tiny", tmp_path / "base", train_jsonl=tmp_path / "nope.jsonl")
    with pytest.raises(CheckpointError, match="does not exist"):
        build_base("expand", tmp_path / "base", expand={"source": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match="mode"):
        build_base("huge", tmp_path / "base")
    assert list(tmp_path.iterdir()) == []


def test_build_base_expand(plain, tmp_path):
    from coordexp.build_base.build import build_base

    summary = build_base(
        "expand", tmp_path / "base", expand={"source": str(plain), "init": "ordinal", "ordinal_scale": 0.02}
    )
    assert summary["mode"] == "expand"
    coord_id_map(tmp_path / "base")


@pytest.mark.slow
def test_stage_script(tmp_path):
    """`python stages/build_base.py` in a scratch project: reads params.yaml, writes artifacts/base."""
    import yaml

    root = tmp_path / "proj"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["build_base"]["mode"] = "tiny"
    params["build_base"]["tiny"].update(SMALL)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    write_dataset(root / params["preprocess"]["out_dir"])
    env = {
        **os.environ,
        "COORDEXP_ROOT": str(root),
        "PYTHONPATH": str(REPO / "src"),
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
    }
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "build_base.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "build_base: mode=tiny params=" in res.stdout
    out = root / params["build_base"]["out_dir"]
    coord_id_map(out)
    # a broken expand config is one readable error line, exit code 2
    params["build_base"]["mode"] = "expand"
    params["build_base"]["expand"]["source"] = str(tmp_path / "nowhere")
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run(
        [sys.executable, str(REPO / "stages" / "build_base.py")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2
    assert "error: [build_base]" in res.stderr and "does not exist" in res.stderr
    coord_id_map(out)  # the previous checkpoint survived


def _plain_qwen2_5_vl(data: Path, out: Path) -> Path:
    """A tiny random Qwen2.5-VL checkpoint (no coord tokens), standing in for Qwen2.5-VL-3B."""
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    from coordexp.build_base.tiny import CHAT_TEMPLATE, bpe_corpus, build_tokenizer
    from coordexp.core.contract import read_jsonl

    tok = build_tokenizer(bpe_corpus(read_jsonl(data)), 512, coord_tokens=False)
    ids = {
        t: tok.convert_tokens_to_ids(t)
        for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")
    }
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=14,
            out_hidden_size=32,
            window_size=112,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config = GenerationConfig(eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    model.save_pretrained(out)
    common = dict(
        patch_size=14, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 3136, "longest_edge": 200704}
    )
    Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**common),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**common),
        chat_template=CHAT_TEMPLATE,
    ).save_pretrained(out)
    return out


def test_expand_qwen2_5_vl(data, tmp_path):
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from coordexp.build_base.expand import expand_checkpoint

    src = _plain_qwen2_5_vl(data, tmp_path / "q25")
    out = expand_checkpoint(src, tmp_path / "exp", init="ordinal", ordinal_scale=EXPAND.ordinal_scale)
    cmap = coord_id_map(out)
    old = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(src)).requires_grad_(False)
    new = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(out)).requires_grad_(False)
    n_real = old.get_input_embeddings().weight.shape[0]
    assert torch.equal(old.get_input_embeddings().weight, new.get_input_embeddings().weight[:n_real])
    assert torch.equal(old.get_output_embeddings().weight, new.get_output_embeddings().weight[:n_real])
    assert cmap.shape[0] == new.get_output_embeddings().weight.shape[0]
    proc = AutoProcessor.from_pretrained(str(out))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Detect all objects."}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) + "<|coord_7|>"
    inputs = proc(text=[text], images=[Image.new("RGB", (112, 112))], return_tensors="pt")
    assert int(inputs["input_ids"][0, -1]) == int((cmap == 7).nonzero())
    assert torch.isfinite(new(**inputs).logits).all()
    # ms-swift's Qwen2.5-VL path through the project template encodes a record with an image
    from coordexp.core.contract import read_jsonl
    from coordexp.core.template import TEMPLATE_NAME_QWEN2_5_VL, encode_record, load_template

    tmpl = load_template(out)
    assert tmpl.template_meta.template_type == TEMPLATE_NAME_QWEN2_5_VL
    rec = read_jsonl(data)[0]
    enc = encode_record(tmpl, rec, data.parent)
    n_img = sum(1 for t in enc["input_ids"] if t == new.config.image_token_id)
    assert n_img == int(enc["image_grid_thw"].prod()) // 4 > 0
    lab = torch.tensor(enc["labels"])
    assert int((cmap[lab.clamp(min=0)][lab >= 0] >= 0).sum()) == sum(len(o.values) for o in rec.objects)
