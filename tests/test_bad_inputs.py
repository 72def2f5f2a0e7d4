"""The corpus in tests/bad_inputs/: every bad file gets one clear message naming file, line or field."""

from pathlib import Path

import pytest
from conftest import SMALL_MODEL
from PIL import Image

from coordexp.core.config import ConfigError, load_params
from coordexp.core.contract import ContractError, read_jsonl

BAD = Path(__file__).parent / "bad_inputs"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("malformed_json.jsonl", r"malformed_json\.jsonl:2: not valid JSON"),
        ("zero_geometry.jsonl", r"zero_geometry\.jsonl:1: objects\.0: .*needs exactly one geometry.*found 0"),
        ("two_geometries.jsonl", r"two_geometries\.jsonl:1: objects\.0: .*found 2 \(bbox_2d, line\)"),
        ("coord_out_of_range.jsonl", r"coord_out_of_range\.jsonl:1: objects\.0\.bbox_2d\.3: expected a coord token"),
        ("image_path_escapes.jsonl", r"image_path_escapes\.jsonl:1: images: .*must be relative to the JSONL folder"),
        ("empty_split.jsonl", r"empty_split\.jsonl: no records; the split is empty"),
    ],
)
def test_bad_jsonl(name, expected):
    with pytest.raises(ContractError, match=expected) as exc:
        read_jsonl(BAD / name)
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize(
    "name, expected",
    [
        ("legacy_coord_loss.yaml", "train.coord_loss: the legacy v1 'coord_loss' block was removed"),
        ("unknown_key.yaml", "train.coord_soft_ce_w1.sigma: unknown key; did you mean 'target_sigma'?"),
        ("wrong_type.yaml", "train.max_steps: Input should be a valid integer"),
        ("out_of_range.yaml", "train.coord_soft_ce_w1.temperature: Input should be greater than 0"),
    ],
)
def test_bad_params(name, expected):
    with pytest.raises(ConfigError) as exc:
        load_params(BAD / name)
    assert str(BAD / name) in str(exc.value) and expected in str(exc.value)


def test_checkpoint_without_coord_tokens_is_refused(tmp_path):
    from coordexp.build_base.tiny import build_tiny
    from coordexp.core.vocab import CoordVocabError, coord_id_map

    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    rec = {
        "id": 0,
        "images": ["a.png"],
        "width": 32,
        "height": 32,
        "objects": [{"desc": "red circle", "bbox_2d": ["<|coord_1|>", "<|coord_2|>", "<|coord_3|>", "<|coord_4|>"]}],
    }
    ckpt = build_tiny(
        None,
        tmp_path / "plain",
        records=[rec],
        coord_tokens=False,
        vocab_size=300,
        **{**SMALL_MODEL, "vision_depth": 1},
    )
    with pytest.raises((CoordVocabError, FileNotFoundError), match="coord"):
        coord_id_map(ckpt)
