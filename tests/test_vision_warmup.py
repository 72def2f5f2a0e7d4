"""The tiny base's vision warm-up: dense targets, what it trains, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from coordexp.build_base.vision_warmup import object_boxes, token_targets, warm_up_vision
from coordexp.core.contract import read_jsonl
from tests.test_build_base import SMALL, write_dataset


def test_token_targets_smallest_covering_box_wins():
    big = (0.0, 0.0, 1.0, 1.0)
    small = (0.0, 0.0, 0.5, 0.5)
    classes, boxes = token_targets([(0, big), (1, small)], 2, 2)
    # raster order: the top-left token's centre (0.25, 0.25) lies in both boxes, the smaller one wins
    assert classes == [2, 1, 1, 1]
    assert boxes == [small, big, big, big]


def test_token_targets_background_and_grid_shape():
    classes, boxes = token_targets([(4, (0.6, 0.0, 1.0, 0.3))], 2, 4)
    assert len(classes) == len(boxes) == 8
    # centres u = 0.125 .. 0.875, v = 0.25 / 0.75: only the top row's last two columns are inside
    assert classes == [0, 0, 5, 5, 0, 0, 0, 0]
    assert [b is None for b in boxes] == [True, True, False, False, True, True, True, True]


def test_object_boxes_enclose_every_geometry(tmp_path):
    jsonl = write_dataset(tmp_path, n=1)
    rec = read_jsonl(jsonl)[0]
    raw = json.loads(jsonl.read_text().splitlines()[0])
    boxes = object_boxes(rec)
    assert [d for d, _ in boxes] == [o["desc"] for o in raw["objects"]]
    tri = boxes[-2][1]  # poly (10,10) (40,10) (25,35) at 128 px: bins round(v / 127 * 999) / 999
    assert tri == pytest.approx((79 / 999, 79 / 999, 315 / 999, 275 / 999))
    assert boxes[-1][1] == (0.0, 0.0, 1.0, 1.0)  # the diagonal line spans the image


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from coordexp.build_base.tiny import build_tiny

    root = tmp_path_factory.mktemp("warm")
    jsonl = write_dataset(root, n=6)
    base = build_tiny(jsonl, root / "base", **SMALL)
    return jsonl, base


def _load(base: Path):
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    return Qwen3VLForConditionalGeneration.from_pretrained(str(base)), AutoProcessor.from_pretrained(str(base))


def _warm(setup, steps=4, seed=0):
    jsonl, base = setup
    model, proc = _load(base)
    figures = warm_up_vision(
        model,
        proc,
        read_jsonl(jsonl),
        jsonl.parent,
        steps=steps,
        batch_size=3,
        learning_rate=2e-3,
        seed=seed,
        progress=False,
    )
    return model, figures


def test_warm_up_trains_the_vision_tower_only(setup):
    before, _ = _load(setup[1])
    after, figures = _warm(setup)
    changed = {
        n for (n, a), (_, b) in zip(before.named_parameters(), after.named_parameters()) if not torch.equal(a, b)
    }
    assert changed, "the warm-up changed nothing"
    assert all(n.startswith("model.visual.") for n in changed), sorted(changed)
    assert any(".merger." in n for n in changed) and any(".blocks." in n for n in changed)
    for key in ("loss", "class_acc", "object_class_acc", "box_l1", "seconds"):
        assert key in figures and figures[key] == figures[key]  # present and not NaN
    assert 0.0 <= figures["object_class_acc"] <= 1.0


def test_warm_up_is_deterministic_and_seeded(setup):
    a, _ = _warm(setup, seed=0)
    b, _ = _warm(setup, seed=0)
    c, _ = _warm(setup, seed=1)
    pa, pb, pc = (dict(m.model.visual.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[n], pb[n]) for n in pa)
    assert any(not torch.equal(pa[n], pc[n]) for n in pa)


def test_warm_up_lowers_its_loss(setup):
    _, first = _warm(setup, steps=1)
    _, later = _warm(setup, steps=40)
    assert later["loss"] < first["loss"]


def test_zero_steps_is_a_no_op(setup):
    before, _ = _load(setup[1])
    after, figures = _warm(setup, steps=0)
    assert figures == {}
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))


def test_build_tiny_records_the_warm_up(tmp_path):
    from coordexp.build_base.tiny import build_tiny

    jsonl = write_dataset(tmp_path, n=4)
    out = build_tiny(jsonl, tmp_path / "base", **{**SMALL, "vision_warmup": {"steps": 2, "batch_size": 2}})
    info = json.loads((out / "build_info.json").read_text())
    assert info["settings"]["vision_warmup"] == {"steps": 2, "batch_size": 2, "learning_rate": 2e-3}
    assert set(info["vision_warmup"]) >= {"loss", "object_class_acc", "box_l1", "seconds"}


def test_build_tiny_warm_up_needs_the_images(tmp_path):
    from coordexp.build_base.tiny import build_tiny

    recs = read_jsonl(write_dataset(tmp_path, n=2))
    with pytest.raises(ValueError, match="image_root"):
        build_tiny(None, tmp_path / "base", records=recs, **{**SMALL, "vision_warmup": {"steps": 2}})
