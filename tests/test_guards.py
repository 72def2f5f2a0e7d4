"""Files and checkpoints that attack: decompression bombs, paths that leave their folder, checkpoints that ask
for remote code, and pickles. Every refusal names the file; no checkpoint code ever runs."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from PIL import Image
from test_build_base import SMALL, write_dataset

from coordexp.core import codec, imaging, paths
from coordexp.core.checkpoint import RemoteCodeIgnored, remote_code_requests
from coordexp.core.config import Params
from coordexp.core.errors import StageError

REPO = Path(__file__).resolve().parents[1]


def _png(path: Path, w: int = 100, h: int = 80) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (200, 30, 30)).save(path)
    return path


@pytest.fixture
def small_pillow_limit(monkeypatch):
    """Pillow's limit lowered so that a 300 x 300 file claims too much, as a 100k x 100k header would against the
    real one (the refusal is Pillow's header check, whatever the limit)."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 100 x 80 is under it, 300 x 300 over twice it


# ---------------------------------------------------------------------------------------------
# paths that leave their folder


def test_inside_refuses_absolute_dotdot_and_symlinks_out(tmp_path):
    root = tmp_path / "data"
    good = _png(root / "sub" / "a.png")
    _png(tmp_path / "secret.png")
    (root / "link_out.png").symlink_to(tmp_path / "secret.png")
    (root / "link_in.png").symlink_to(good)
    assert paths.inside(root, "sub/a.png", where="w") == good.resolve()
    assert paths.inside(root, "link_in.png", where="w") == good.resolve()  # a symlink that stays inside is fine
    assert paths.inside(root, "sub/../sub/a.png", where="w") == good.resolve()
    for bad in ["../secret.png", str(tmp_path / "secret.png"), "link_out.png", "/etc/passwd", "sub/../../x", "."]:
        with pytest.raises(paths.PathEscapeError, match=r"^ann\.json: image id 7: path .* leads out of"):
            paths.inside(root, bad, where="ann.json: image id 7")


def test_preprocess_counts_file_names_that_leave_the_images_folder(tmp_path):
    """``../``, absolute and symlinked-out COCO ``file_name`` values are rejects naming the annotation file and
    the image id; the good image is kept and the outside file is not copied."""
    from coordexp.preprocess.coco import run

    img = tmp_path / "img"
    _png(img / "ok.png")
    outside = _png(tmp_path / "private" / "secret.png")
    (img / "link.png").symlink_to(outside)
    names = {1: "ok.png", 2: "../private/secret.png", 3: str(outside), 4: "link.png"}
    coco = {
        "images": [{"id": i, "file_name": n, "width": 100, "height": 80} for i, n in names.items()],
        "annotations": [{"id": i, "image_id": i, "category_id": 1, "bbox": [10, 10, 20, 20]} for i in names],
        "categories": [{"id": 1, "name": "red circle"}],
    }
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(coco))
    val = tmp_path / "val.json"
    val.write_text(json.dumps({**coco, "images": coco["images"][:1], "annotations": coco["annotations"][:1]}))
    params = Params.model_validate(
        {
            "preprocess": {
                "splits": {
                    "train": {"annotations": str(ann), "images": str(img)},
                    "val": {"annotations": str(val), "images": str(img)},
                },
                "out_dir": str(tmp_path / "out"),
            }
        }
    )
    m = run(params, root=tmp_path)
    split = m["splits"]["train"]
    assert split["records_out"] == 1 and split["rejects"] == {"image_path_escapes_root": 3}
    rejects = [json.loads(x) for x in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["image_id"] for r in rejects) == [2, 3, 4]
    for r in rejects:
        assert r["reason"] == "image_path_escapes_root" and r["objects_lost"] == 1
        assert r["detail"].startswith(f"{ann}: image id {r['image_id']}: path ") and "leads out of" in r["detail"]
    copied = sorted(p.name for p in (tmp_path / "out" / "images" / "train").iterdir())
    assert copied == ["ok.png"]


def test_contract_and_template_refuse_a_symlinked_image_that_leaves(tmp_path):
    """The contract validator already refuses absolute and ``..`` image paths; a symlink that leads out of the
    JSONL folder is refused where the image path is formed, for training and evaluation alike."""
    from coordexp.core.contract import image_path, read_jsonl
    from coordexp.core.template import build_messages

    _png(tmp_path / "secret.png")
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    (split / "images" / "x.png").symlink_to(tmp_path / "secret.png")
    rec = {"id": 3, "images": ["images/x.png"], "width": 100, "height": 80, "objects": []}
    (split / "val.jsonl").write_text(json.dumps(rec) + "\n")
    (r,) = read_jsonl(split / "val.jsonl")
    with pytest.raises(paths.PathEscapeError, match=r"val\.jsonl: record 3: image: path 'images/x.png' leads out"):
        image_path(r, split / "val.jsonl")
    with pytest.raises(paths.PathEscapeError, match=r"record 3: image: path 'images/x.png' leads out"):
        build_messages(r, split, with_answer=False)


# ---------------------------------------------------------------------------------------------
# decompression bombs


def test_one_image_check_refuses_a_bomb_from_the_header(tmp_path, small_pillow_limit):
    bomb = _png(tmp_path / "bomb.png", 300, 300)
    ok = _png(tmp_path / "ok.png")
    assert imaging.check_header(ok) == (100, 80)
    for call in (imaging.check_header, imaging.load, imaging.load_rgb):
        with pytest.raises(imaging.ImageRefused, match="decompression bomb") as exc:
            call(bomb)
        assert exc.value.reason == imaging.TOO_LARGE
    notes = tmp_path / "notes.png"
    notes.write_text("hello")
    with pytest.raises(imaging.ImageRefused, match="not an image") as exc:
        imaging.load(notes)
    assert exc.value.reason == imaging.UNREADABLE


def test_predict_and_the_served_model_refuse_a_bomb_by_name(tmp_path, small_pillow_limit):
    from coordexp.evaluate.mlflow_model import _decode, encode_image
    from coordexp.evaluate.predict import read_image

    bomb = _png(tmp_path / "bomb.png", 300, 300)
    assert "decompression bomb" in read_image(bomb)
    assert "decompression bomb" in _decode(encode_image(bomb))
    assert isinstance(read_image(_png(tmp_path / "ok.png")), Image.Image)


def _eval_project(tmp_path: Path, image: str) -> Params:
    split = tmp_path / "split"
    bins = codec.encode_xy([10, 10, 40, 40], 100, 80)
    recs = [
        {"id": 0, "images": ["images/ok.png"], "width": 100, "height": 80, "objects": [{"desc": "a", "bbox_2d": bins}]},
        {"id": 1, "images": [image], "width": 300, "height": 300, "objects": []},
    ]
    _png(split / "images" / "ok.png")
    (split / "val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return Params.model_validate(
        {
            "preprocess": {"out_dir": str(split)},
            "evaluate": {"out_dir": str(tmp_path / "eval")},
            "train": {"out_dir": str(tmp_path / "no_train")},
        }
    )


def test_evaluate_refuses_a_bomb_naming_the_record_and_file_before_loading_a_model(tmp_path, small_pillow_limit):
    from coordexp.evaluate.stage import run

    params = _eval_project(tmp_path, "images/bomb.png")
    _png(tmp_path / "split" / "images" / "bomb.png", 300, 300)
    with pytest.raises(StageError, match=r"val\.jsonl: record 1: image .*bomb\.png: image too large") as exc:
        run(params, root=tmp_path)
    assert "decompression bomb" in str(exc.value) and "Run preprocess again" in str(exc.value)
    assert not (tmp_path / "eval").exists() and not (tmp_path / "reports").exists()  # nothing written


def test_evaluate_refuses_a_split_image_that_leaves_its_folder(tmp_path):
    from coordexp.evaluate.stage import run

    params = _eval_project(tmp_path, "images/elsewhere.png")
    _png(tmp_path / "elsewhere.png", 300, 300)
    (tmp_path / "split" / "images" / "elsewhere.png").symlink_to(tmp_path / "elsewhere.png")
    with pytest.raises(paths.PathEscapeError, match=r"val\.jsonl: record 1: image: path .* leads out of"):
        run(params, root=tmp_path)


# ---------------------------------------------------------------------------------------------
# checkpoints that ask for remote code

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("checkpoint code ran")
raise RuntimeError("checkpoint code ran")
"""


@pytest.fixture(scope="module")
def hostile_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A working tiny checkpoint whose config, tokenizer and image-processor files ask for remote code, with the
    code beside them: importing it writes a marker file (and raises)."""
    from coordexp.build_base.tiny import build_tiny

    data = write_dataset(tmp_path_factory.mktemp("data"), n=2)
    ckpt = build_tiny(data, tmp_path_factory.mktemp("tiny") / "base", **SMALL)
    marker = ckpt.parent / "MARKER"
    (ckpt / "evil.py").write_text(EVIL.format(marker=str(marker)))
    requests = {
        "config.json": {"AutoConfig": "evil.Config", "AutoModelForImageTextToText": "evil.Model"},
        "tokenizer_config.json": {"AutoTokenizer": ["evil.Tokenizer", None], "AutoProcessor": "evil.Processor"},
        "processor_config.json": {"AutoProcessor": "evil.Processor"},
    }
    for name, auto_map in requests.items():
        cfg = json.loads((ckpt / name).read_text())
        (ckpt / name).write_text(json.dumps({**cfg, "auto_map": auto_map}))
    proc = json.loads((ckpt / "processor_config.json").read_text())  # transformers 5 nests the image processor
    proc["image_processor"]["auto_map"] = {"AutoImageProcessor": "evil.ImageProcessor"}
    (ckpt / "processor_config.json").write_text(json.dumps(proc))
    return ckpt, marker


def _remote_code_warnings(caught: list[warnings.WarningMessage], ckpt: Path) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, RemoteCodeIgnored) and str(ckpt) in str(w.message)]


def test_the_marker_is_written_when_the_code_is_trusted(hostile_checkpoint, tmp_path):
    """The control: transformers with ``trust_remote_code=True`` (ms-swift's default) imports ``evil.py`` and the
    marker appears, so its absence below means the code did not run. In a child process, with its own module
    cache, so that nothing of it stays in this one."""
    ckpt, _ = hostile_checkpoint
    marker = tmp_path / "CONTROL"
    control = tmp_path / "control"
    control.mkdir()
    for f in ckpt.iterdir():
        if f.is_file() and f.suffix in (".json", ".py"):
            (control / f.name).write_text(f.read_text().replace(str(ckpt.parent / "MARKER"), str(marker)))
    code = "from transformers import AutoConfig; AutoConfig.from_pretrained(__import__('sys').argv[1], trust_remote_code=True)"
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    proc = subprocess.run([sys.executable, "-c", code, str(control)], env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "checkpoint code ran" in proc.stderr
    assert marker.read_text() == "checkpoint code ran"


def test_native_loaders_ignore_remote_code_and_warn(hostile_checkpoint, tmp_path):
    """evaluate / predict / the served model (``Detector``) and ``build_base`` expand load the folder with the native
    classes, never import ``evil.py``, and warn naming the folder and the ignored entries; the base that expand
    writes carries no ``auto_map`` and no ``.py`` file, so ms-swift loads it in training without running anything."""
    from coordexp.build_base.expand import expand_checkpoint
    from coordexp.core.template import load_template
    from coordexp.evaluate.generate import Detector

    ckpt, marker = hostile_checkpoint
    assert set(remote_code_requests(ckpt)) == {
        "config.json",
        "tokenizer_config.json",
        "processor_config.json",
        "processor_config.json image_processor",
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = Detector(ckpt, device="cpu")
        assert type(det.model).__name__ == "Qwen3VLForConditionalGeneration"
        out = expand_checkpoint(ckpt, tmp_path / "expanded", init="mean", ordinal_scale=0.0)
    assert not marker.exists(), "checkpoint code ran"
    msgs = _remote_code_warnings(caught, ckpt)
    assert len(msgs) == 2  # one per loader
    for m in msgs:
        assert "evil.Config" in m and "evil.ImageProcessor" in m and "code files: evil.py" in m and "ignored" in m
    assert (out / "coord_vocab.json").is_file() and not list(out.glob("*.py"))
    assert remote_code_requests(out) == {}
    tpl = load_template(out, mode="train")  # ms-swift, as training loads the base
    assert type(tpl.processor).__name__ == "Qwen3VLProcessor"
    assert not marker.exists(), "checkpoint code ran"


def test_ms_swift_is_never_given_a_folder_that_asks_for_remote_code(hostile_checkpoint, tmp_path):
    """ms-swift loads every config with ``trust_remote_code=True`` (hard-coded in its model-info step), so training
    and the reports refuse such a folder by name before ms-swift sees it."""
    from coordexp.core.checkpoint import CheckpointError
    from coordexp.core.template import load_template
    from coordexp.train.stage import swift_cli_args

    ckpt, marker = hostile_checkpoint
    with pytest.raises(CheckpointError, match=r"asks for remote code .*evil\.Config.*refused: loading a template"):
        load_template(ckpt)
    params = Params()
    rows = tmp_path / "rows.jsonl"
    with pytest.raises(CheckpointError, match=r"base: asks for remote code .*refused: training loads checkpoints"):
        swift_cli_args(params, ckpt, rows, rows, tmp_path / "out", tmp_path)
    assert not marker.exists()


def test_merge_warns_for_a_base_that_asks_for_remote_code(hostile_checkpoint, tmp_path):
    """The LoRA merge loads the base natively too; the adapter it would need is missing here, which it says after
    the warning."""
    from coordexp.train.merge import merge_lora

    ckpt, marker = hostile_checkpoint
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    with pytest.warns(RemoteCodeIgnored, match=r"evil\.Config"), pytest.raises(FileNotFoundError, match="coord rows"):
        merge_lora(ckpt, adapter, tmp_path / "merged", "float32")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# pickles and trust_remote_code: a scan of everything the project runs

_PICKLE_LOADERS = {
    ("pickle", "load"),
    ("pickle", "loads"),
    ("joblib", "load"),
    ("dill", "load"),
    ("dill", "loads"),
    ("cloudpickle", "load"),
    ("cloudpickle", "loads"),
    ("marshal", "loads"),
    ("shelve", "open"),
    ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}


def unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that may run code from a file: pickle-family loads, ``torch.load`` without ``weights_only=True``,
    ``np.load(allow_pickle=True)``, ``yaml.load`` without a safe loader, and ``trust_remote_code`` not False."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        f = node.func
        name = (f.value.id, f.attr) if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else None
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        where = f"line {node.lineno}"
        if name in _PICKLE_LOADERS:
            found.append(f"{where}: {name[0]}.{name[1]}")
        if name == ("torch", "load") and const.get("weights_only") is not True:
            found.append(f"{where}: torch.load without weights_only=True")
        if name in {("np", "load"), ("numpy", "load")} and const.get("allow_pickle", False) is not False:
            found.append(f"{where}: np.load(allow_pickle=...)")
        if name == ("yaml", "load") and not (
            isinstance(kw.get("Loader"), ast.Attribute) and kw["Loader"].attr in ("SafeLoader", "CSafeLoader")
        ):
            found.append(f"{where}: yaml.load without SafeLoader")
        if "trust_remote_code" in kw and const.get("trust_remote_code") is not False:
            found.append(f"{where}: trust_remote_code not False")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = """
import pickle, torch, numpy as np, yaml
pickle.load(f); torch.load(p); torch.load(p, weights_only=False); np.load(p, allow_pickle=True)
yaml.load(s, Loader=yaml.Loader); M.from_pretrained(p, trust_remote_code=True); M.from_pretrained(p, trust_remote_code=x)
"""
    assert len(unsafe_calls(ast.parse(bad))) == 7
    good = "torch.load(p, weights_only=True); np.load(p); yaml.load(s, Loader=yaml.SafeLoader); M.f(trust_remote_code=False)"
    assert unsafe_calls(ast.parse(good)) == []


def test_nothing_the_project_runs_loads_a_pickle_or_trusts_remote_code():
    files = [p for d in ("src", "bench", "stages") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 50
    found = {str(p.relative_to(REPO)): hits for p in files if (hits := unsafe_calls(ast.parse(p.read_text())))}
    assert found == {}


def test_ms_swift_is_switched_to_native_loading():
    """ms-swift's loaders default to ``trust_remote_code=True``; registering the project's template (what the
    train stage's plugin and :func:`load_template` do) turns that off."""
    from swift.model.models.qwen import Qwen3VLLoader
    from swift.model.register import ModelLoader

    from coordexp.core.template import register_swift_template
    from coordexp.train.swift_plugin import register

    ModelLoader.default_trust_remote_code = True  # ms-swift's own default, as a fresh process has it
    register_swift_template()
    assert Qwen3VLLoader.default_trust_remote_code is False
    ModelLoader.default_trust_remote_code = True
    register()
    assert Qwen3VLLoader.default_trust_remote_code is False


def test_a_model_reference_names_only_files_of_its_checkpoint_folder(tmp_path):
    """``checkpoint_ref.json`` of a logged model lists the checkpoint's files; a name that leads out of the folder
    (a tampered artifact) is refused instead of being read or linked."""
    from coordexp.evaluate.mlflow_model import resolve_reference

    (tmp_path / "ck").mkdir()
    (tmp_path / "secret").write_text("x")
    with pytest.raises(paths.PathEscapeError, match=r"checkpoint_ref\.json: files: path '\.\./secret' leads out"):
        resolve_reference({"checkpoint": "ck", "files": {"../secret": "0" * 32}}, root=tmp_path)
