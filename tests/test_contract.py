import json

import pytest

from coordexp.core import codec
from coordexp.core.contract import (
    ContractError,
    image_path,
    read_jsonl,
    render_answer,
    to_coord_mode,
    to_pixel_mode,
    validate_record,
)


def rec(**over):
    base = {
        "id": 1,
        "images": ["images/a.png"],
        "width": 100,
        "height": 50,
        "objects": [
            {"desc": "red circle", "bbox_2d": [1, 2, 30, 40]},
            {"desc": "blue triangle", "poly": [0, 0, 10, 0, 5, 8]},
            {"desc": "green line", "line": [0, 0, 99, 49]},
        ],
    }
    base.update(over)
    return base


def test_valid_pixel_record_and_coord_roundtrip():
    r = validate_record(rec(), "pixel")
    c = to_coord_mode(r)
    assert c.objects[0].bbox_2d == codec.encode_xy([1, 2, 30, 40], 100, 50)
    validate_record(c.model_dump(exclude_none=True), "coord")
    back = to_pixel_mode(c)
    for o_in, o_out in zip(r.objects, back.objects):
        for i, (a, b) in enumerate(zip(o_in.values, o_out.values)):
            size = 100 if i % 2 == 0 else 50
            assert abs(a - b) <= codec.max_roundtrip_error(size) + 1e-9


@pytest.mark.parametrize(
    "data, mode, expected",
    [
        (rec(objects=[{"desc": "x"}]), "pixel", "objects.0: Value error, needs exactly one geometry"),
        (
            rec(objects=[{"desc": "x", "bbox_2d": [1, 1, 2, 2], "line": [0, 0, 1, 1]}]),
            "pixel",
            "found 2 (bbox_2d, line)",
        ),
        (rec(objects=[{"desc": "x", "bbox_2d": [1, 1, 2]}]), "pixel", "bbox_2d needs 4 values"),
        (rec(objects=[{"desc": "x", "poly": [1, 1, 2, 2]}]), "pixel", "poly needs an even number >= 6"),
        (rec(objects=[{"desc": "x", "line": [1, 1, 2]}]), "pixel", "line needs an even number >= 4"),
        (rec(objects=[{"desc": " ", "bbox_2d": [1, 1, 2, 2]}]), "pixel", "desc is blank"),
        (
            rec(objects=[{"desc": "x", "bbox_2d": [1, 1, 200, 2]}]),
            "pixel",
            "objects.0.bbox_2d.2: x=200 is outside the image [0, 100]",
        ),
        (rec(objects=[{"desc": "x", "bbox_2d": [5, 1, 2, 2]}]), "pixel", "x2 < x1"),
        (rec(objects=[{"desc": "x", "bbox_2d": [1, 1, 2, 2]}]), "coord", "objects.0.bbox_2d.0: expected a coord token"),
        (
            rec(objects=[{"desc": "x", "bbox_2d": ["<|coord_1|>"] * 3 + ["<|coord_1000|>"]}]),
            "coord",
            "expected a coord token",
        ),
        (rec(images=["../outside.png"]), "pixel", "must be relative to the JSONL folder"),
        (rec(images=["/etc/passwd"]), "pixel", "must be relative"),
        (rec(width=1), "pixel", "width: Input should be greater than 1"),
        (rec(extra=3), "pixel", "extra: Extra inputs are not permitted"),
        ([1, 2], "pixel", "a record must be a JSON object"),
    ],
)
def test_bad_records_name_the_field(data, mode, expected):
    with pytest.raises(ContractError) as exc:
        validate_record(data, mode, where="f.jsonl:7")
    assert str(exc.value).startswith("f.jsonl:7: ")
    assert expected in str(exc.value)


def test_read_jsonl_names_file_and_line(tmp_path):
    good = to_coord_mode(validate_record(rec(), "pixel")).model_dump(exclude_none=True)
    f = tmp_path / "train.jsonl"
    f.write_text(json.dumps(good) + "\n\n" + "{not json\n")
    with pytest.raises(ContractError, match=r"train\.jsonl:3: not valid JSON"):
        read_jsonl(f)
    f.write_text("")
    with pytest.raises(ContractError, match="no records"):
        read_jsonl(f)
    with pytest.raises(ContractError, match="no such file"):
        read_jsonl(tmp_path / "nope.jsonl")
    f.write_text(json.dumps(good) + "\n")
    (r,) = read_jsonl(f)
    assert image_path(r, f) == (tmp_path / "images" / "a.png").resolve()


def test_render_answer_is_one_json_object_in_order():
    r = to_coord_mode(validate_record(rec(), "pixel"))
    text = render_answer(r.objects)
    obj = json.loads(text)
    assert list(obj) == ["object_1", "object_2", "object_3"]
    assert obj["object_1"] == {"desc": "red circle", "bbox_2d": r.objects[0].bbox_2d}
    assert set(obj["object_3"]) == {"desc", "line"}
    assert render_answer([]) == "{}"
