import json
from pathlib import Path

import pytest
from PIL import Image

from coordexp.core import codec
from coordexp.core.config import Params
from coordexp.core.contract import read_jsonl
from coordexp.core.errors import UserError
from coordexp.preprocess.coco import TOTAL_METRICS, CocoFormatError, run


def _png(path: Path, w=100, h=80):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), (240, 240, 240)).save(path)


def _coco(tmp: Path, split: str, images, annotations):
    cats = [{"id": 1, "name": "red circle"}, {"id": 2, "name": "blue triangle"}, {"id": 3, "name": "green line"}]
    f = tmp / f"{split}.json"
    f.write_text(json.dumps({"images": images, "annotations": annotations, "categories": cats}))
    return f


def _params(tmp: Path, **pre) -> Params:
    return Params.model_validate(
        {
            "preprocess": {
                "splits": {
                    "train": {"annotations": str(tmp / "train.json"), "images": str(tmp / "img")},
                    "val": {"annotations": str(tmp / "val.json"), "images": str(tmp / "img")},
                },
                "out_dir": str(tmp / "out"),
                **pre,
            }
        }
    )


@pytest.fixture
def dataset(tmp_path):
    for name in ["a.png", "b.png", "c.png", "e.png", "big.png"]:
        _png(tmp_path / "img" / name)
    (tmp_path / "img" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    _png(tmp_path / "outside.png")
    images = [
        {"id": 1, "file_name": "a.png", "width": 100, "height": 80},
        {"id": 2, "file_name": "b.png", "width": 100, "height": 80},
        {"id": 3, "file_name": "missing.png", "width": 100, "height": 80},
        {"id": 4, "file_name": "corrupt.png", "width": 100, "height": 80},
        {"id": 5, "file_name": "../outside.png", "width": 100, "height": 80},
        {"id": 6, "file_name": "c.png", "width": 100, "height": 80},
        {"id": 7, "file_name": "e.png", "width": 100, "height": 80},
        {"id": 8, "file_name": "big.png", "width": 640, "height": 480},
    ]
    anns = [
        # image 1: a valid box, polygon and line, given out of order
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [50, 40, 20, 10]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [10, 5, 20, 20], "segmentation": [[10, 5, 30, 5, 20, 25]]},
        {"id": 3, "image_id": 1, "category_id": 3, "bbox": [0, 60, 99, 4], "line": [0, 62, 99, 62]},
        # image 2: degenerate, outside, unknown category, crowd, RLE, one valid box touching the border
        {"id": 4, "image_id": 2, "category_id": 1, "bbox": [10, 10, 0.5, 5]},
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [90, 10, 20, 5]},
        {"id": 6, "image_id": 2, "category_id": 9, "bbox": [10, 10, 5, 5]},
        {"id": 7, "image_id": 2, "category_id": 1, "bbox": [10, 10, 5, 5], "iscrowd": 1},
        {
            "id": 8,
            "image_id": 2,
            "category_id": 1,
            "bbox": [20, 20, 10, 10],
            "segmentation": {"size": [80, 100], "counts": "abc"},
        },
        {"id": 9, "image_id": 2, "category_id": 1, "bbox": [80, 60, 20, 20]},
        # images 3-5 have an object each, but their files are missing / corrupt / escaping
        {"id": 10, "image_id": 3, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 11, "image_id": 4, "category_id": 1, "bbox": [1, 1, 5, 5]},
        {"id": 12, "image_id": 5, "category_id": 1, "bbox": [1, 1, 5, 5]},
        # image 6: every object rejected -> the image is rejected too
        {"id": 13, "image_id": 6, "category_id": 1, "bbox": [1, 1, 0, 0]},
        # image 7: no annotations at all -> kept with an empty answer
        # orphan annotation
        {"id": 14, "image_id": 99, "category_id": 1, "bbox": [1, 1, 5, 5]},
        # image 8: COCO size disagrees with the file
        {"id": 15, "image_id": 8, "category_id": 1, "bbox": [1, 1, 5, 5]},
    ]
    _coco(tmp_path, "train", images, anns)
    _coco(tmp_path, "val", images[:1], anns[:3])
    return tmp_path


def test_conversion_counts_every_reject(dataset):
    m = run(_params(dataset), root=dataset)
    tr = m["splits"]["train"]
    assert tr["records_in"] == 8 and tr["records_out"] == 3  # images 1, 2, 7
    assert tr["objects_in"] == 15 and tr["objects_out"] == 5
    assert tr["geometry"] == {"bbox_2d": 3, "poly": 1, "line": 1}  # RLE kept as its box (rle: bbox)
    expected = {
        "crowd": 1,
        "degenerate_box": 2,
        "outside_image": 1,
        "unknown_category": 1,
        "missing_image": 1,
        "unreadable_image": 1,
        "image_path_escapes_root": 1,
        "no_valid_objects": 1,
        "unknown_image_id": 1,
        "size_mismatch": 1,
    }
    assert tr["rejects"] == expected
    rejects = [json.loads(line) for line in (dataset / "out" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == sum(expected.values()) and m["splits"]["val"]["rejects"] == {}
    assert all({"split", "reason"} <= set(r) for r in rejects)
    # every count in the counts file; the DVC metrics file keeps the five totals (a readable `dvc exp show`)
    assert json.loads((dataset / "reports" / "preprocess_counts.json").read_text()) == m
    written = json.loads((dataset / "reports" / "metrics" / "preprocess.json").read_text())
    assert written == {k: m["total"][k] for k in TOTAL_METRICS}
    assert written["rejects"] == sum(expected.values())
    assert written["negative_images"] == 1  # image 7, kept with an empty answer
    assert (written["border_clamped"], written["multi_part_polygons"]) == (0, 0)


def _one_image(tmp: Path, anns, cats=None, w=100, h=80) -> Path:
    """A train and a val split of one image each (the val split a plain valid box), with ``anns`` on the train
    image and ``cats`` as the categories."""
    _png(tmp / "img" / "a.png", w, h)
    cats = cats or [{"id": 1, "name": "thing"}]
    for split, a in (
        ("train", anns),
        ("val", [{"id": 1, "image_id": 1, "category_id": cats[0]["id"], "bbox": [1, 1, 9, 9]}]),
    ):
        (tmp / f"{split}.json").write_text(
            json.dumps(
                {
                    "images": [{"id": 1, "file_name": "a.png", "width": w, "height": h}],
                    "annotations": a,
                    "categories": cats,
                }
            )
        )
    return tmp


def test_edges_a_little_past_the_border_are_clamped_and_counted(tmp_path):
    """Real exports put an edge 0.5 px past the border by float rounding: kept, clamped, counted. 1.5 px past
    is beyond the default 1 px tolerance: rejected as now, and kept again with a wider tolerance."""
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [60, 10, 40.5, 20]},  # right edge 100.5 of 100
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [-0.4, 30, 20, 20]},  # left edge -0.4
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [10, 50, 20, 31.5]},  # bottom 81.5 of 80
    ]
    root = _one_image(tmp_path, anns)
    m = run(_params(root), root=root)
    tr = m["splits"]["train"]
    assert tr["objects_out"] == 2 and tr["border_clamped"] == 2 and tr["rejects"] == {"outside_image": 1}
    boxes = sorted(codec.decode_xy(o.bbox_2d, 100, 80) for o in read_jsonl(root / "out" / "train.jsonl")[0].objects)
    assert boxes[0][0] == 0.0 and boxes[1][2] == 99.0  # onto the border (the last bin is the last pixel)
    m = run(_params(root, border_tolerance=2.0), root=root)
    assert m["splits"]["train"]["objects_out"] == 3 and m["splits"]["train"]["border_clamped"] == 3


@pytest.mark.parametrize("mode", ["box", "largest", "reject"])
def test_multi_part_polygons_follow_polygon_parts_and_are_counted(tmp_path, mode):
    """Two parts, the larger at the left: ``box`` keeps the annotation's whole extent as a box, ``largest`` keeps
    the larger part (and counts the shrunk extent), ``reject`` rejects it; each counts the multi-part polygon."""
    seg = [[10, 10, 40, 10, 40, 40, 10, 40], [70, 60, 80, 60, 80, 70]]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 70, 60], "segmentation": seg},
        {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 5, 10, 10], "segmentation": [[50, 5, 60, 5, 55, 15]]},
    ]
    root = _one_image(tmp_path, anns)
    m = run(_params(root, polygon_parts=mode), root=root)
    tr = m["splits"]["train"]
    assert tr["multi_part_polygons"] == 1 and m["total"]["multi_part_polygons"] == 1
    objs = read_jsonl(root / "out" / "train.jsonl")[0].objects
    kinds = sorted(o.kind for o in objs)
    if mode == "box":
        assert kinds == ["bbox_2d", "poly"] and tr["polygon_parts_shrunk"] == 0
        box = next(o for o in objs if o.kind == "bbox_2d")
        assert box.bbox_2d == codec.encode_xy([10, 10, 80, 70], 100, 80)
    elif mode == "largest":
        assert kinds == ["poly", "poly"] and tr["polygon_parts_shrunk"] == 1
        assert any(o.poly == codec.encode_xy([10, 10, 40, 10, 40, 40, 10, 40], 100, 80) for o in objs)
    else:
        assert kinds == ["poly"] and tr["rejects"] == {"multi_part_polygon": 1}


def test_sparse_category_ids_unicode_names_and_negative_images(tmp_path):
    """Category ids need not be contiguous, names may be any Unicode, and an image without annotations is kept
    as a negative (an empty answer) and counted."""
    cats = [{"id": 7, "name": "chat noir"}, {"id": 1042, "name": "信号機"}, {"id": 90, "name": "Ölfass ⛽"}]
    anns = [
        {"id": 1, "image_id": 1, "category_id": 1042, "bbox": [10, 10, 20, 20]},
        {"id": 2, "image_id": 1, "category_id": 90, "bbox": [50, 40, 20, 20]},
    ]
    root = _one_image(tmp_path, anns, cats)
    _png(root / "img" / "empty.png")
    data = json.loads((root / "train.json").read_text())
    data["images"].append({"id": 2, "file_name": "empty.png", "width": 100, "height": 80})
    (root / "train.json").write_text(json.dumps(data, ensure_ascii=False))
    m = run(_params(root), root=root)
    recs = {r.id: r for r in read_jsonl(root / "out" / "train.jsonl")}
    assert sorted(o.desc for o in recs[1].objects) == ["Ölfass ⛽", "信号機"]
    assert recs[2].objects == [] and m["splits"]["train"]["negative_images"] == 1
    assert json.loads((root / "reports" / "metrics" / "preprocess.json").read_text())["negative_images"] == 1


def test_records_are_ordered_and_encoded(dataset):
    run(_params(dataset), root=dataset)
    recs = {r.id: r for r in read_jsonl(dataset / "out" / "train.jsonl")}
    assert sorted(recs) == [1, 2, 7]
    r1 = recs[1]
    # sorted by top-left: triangle (y=5), box (y=40), line (y=62)
    assert [o.desc for o in r1.objects] == ["blue triangle", "red circle", "green line"]
    assert r1.objects[0].poly == codec.encode_xy([10, 5, 30, 5, 20, 25], 100, 80)
    assert r1.objects[1].bbox_2d == codec.encode_xy([50, 40, 70, 50], 100, 80)
    assert r1.objects[2].line == codec.encode_xy([0, 62, 99, 62], 100, 80)
    assert recs[2].objects[-1].bbox_2d[2:] == ["<|coord_999|>", "<|coord_999|>"]  # border edge clamps
    assert recs[7].objects == []
    assert (dataset / "out" / r1.images[0]).is_file()


def test_rle_reject_and_random_order_is_seeded(dataset):
    m = run(_params(dataset, rle="reject", object_ordering="random"), root=dataset)
    assert m["splits"]["train"]["rejects"]["rle_segmentation"] == 1
    first = (dataset / "out" / "train.jsonl").read_text()
    run(_params(dataset, rle="reject", object_ordering="random"), root=dataset)
    assert (dataset / "out" / "train.jsonl").read_text() == first


def test_resize_rescales_coordinates(dataset):
    run(_params(dataset, max_side=50), root=dataset)
    r1 = next(r for r in read_jsonl(dataset / "out" / "train.jsonl") if r.id == 1)
    assert (r1.width, r1.height) == (50, 40)
    with Image.open(dataset / "out" / r1.images[0]) as im:
        assert im.size == (50, 40)
    # the box [50, 40, 70, 50] in 100x80 is [25, 20, 35, 25] in 50x40
    assert r1.objects[1].bbox_2d == codec.encode_xy([25, 20, 35, 25], 50, 40)


def test_bad_coco_file_is_named(dataset):
    (dataset / "train.json").write_text("{broken")
    with pytest.raises(CocoFormatError, match=r"train\.json:1: not valid JSON"):
        run(_params(dataset), root=dataset)
    (dataset / "train.json").write_text(json.dumps({"images": []}))
    with pytest.raises(CocoFormatError, match="'annotations' list is missing"):
        run(_params(dataset), root=dataset)
    # nothing half-written is left where the output goes: only this run's rejects (none: it stopped at the file)
    assert [p.name for p in (dataset / "out").iterdir()] == ["rejects.jsonl"]
    assert (dataset / "out" / "rejects.jsonl").read_text() == ""
    assert not list(dataset.glob(".out.*"))


def test_empty_split_fails_and_keeps_previous_output(dataset):
    run(_params(dataset), root=dataset)
    before = (dataset / "out" / "train.jsonl").read_text()
    _coco(dataset, "val", [], [])
    with pytest.raises(ValueError, match=r"preprocess\.splits\.val: no record survived: .*val\.json lists no images"):
        run(_params(dataset), root=dataset)
    assert (dataset / "out" / "train.jsonl").read_text() == before


def _rejects(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_split_without_images_names_the_reasons_and_writes_the_rejects(dataset):
    """Every val image is missing: the error names the reasons with their counts and the rejects file,
    which holds this run's rejects (replacing the previous run's); the previous output stays otherwise."""
    run(_params(dataset), root=dataset)
    out = dataset / "out"
    old_rejects = _rejects(out / "rejects.jsonl")
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "rejects.jsonl"}
    gone = [{"id": i, "file_name": f"gone{i}.png", "width": 100, "height": 80} for i in (1, 2, 3)]
    degenerate = {"id": 4, "file_name": "a.png", "width": 100, "height": 80}
    anns = [{"id": i, "image_id": i, "category_id": 1, "bbox": [1, 1, 5, 5]} for i in (1, 2, 3)]
    anns.append({"id": 4, "image_id": 4, "category_id": 1, "bbox": [1, 1, 0, 0]})
    _coco(dataset, "val", [*gone, degenerate], anns)

    with pytest.raises(UserError) as err:
        run(_params(dataset), root=dataset)
    assert str(err.value) == (
        "preprocess.splits.val: no record survived: missing_image x 3, degenerate_box x 1, no_valid_objects x 1; "
        "the rejects are listed in out/rejects.jsonl"
    )
    rejects = _rejects(out / "rejects.jsonl")
    assert rejects != old_rejects
    val = [r for r in rejects if r["split"] == "val"]
    assert [r["reason"] for r in val] == ["missing_image"] * 3 + ["degenerate_box", "no_valid_objects"]
    assert [r["file_name"] for r in val if r["reason"] == "missing_image"] == ["gone1.png", "gone2.png", "gone3.png"]
    assert [r for r in rejects if r["split"] == "train"] == old_rejects  # train's, from this run, are there too
    # nothing of the half-built folder appears: the previous output is untouched but for its rejects file
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "rejects.jsonl"}
    assert after == before
    assert not list(dataset.glob(".out.*")) and not list(out.glob(".*"))


def test_failed_first_run_leaves_only_the_rejects(dataset):
    _coco(dataset, "val", [{"id": 1, "file_name": "gone.png"}], [])
    with pytest.raises(UserError, match=r"val: no record survived: missing_image x 1; the rejects are listed in"):
        run(_params(dataset), root=dataset)
    assert [p.name for p in (dataset / "out").iterdir()] == ["rejects.jsonl"]
    assert {r["split"] for r in _rejects(dataset / "out" / "rejects.jsonl")} == {"train", "val"}


@pytest.mark.parametrize(
    "kind, source, expected",
    [
        # counter-clockwise on screen, starting mid-way: reversed, then rotated to the top vertex
        ("poly", [20, 25, 30, 5, 10, 5], [10, 5, 30, 5, 20, 25]),
        # already clockwise, starting at the bottom: rotated only
        ("poly", [20, 25, 10, 5, 30, 5], [10, 5, 30, 5, 20, 25]),
        # a diamond listed top, left, bottom, right (counter-clockwise): top, right, bottom, left
        ("poly", [50, 0, 40, 10, 50, 20, 60, 10], [50, 0, 60, 10, 50, 20, 40, 10]),
        # a line drawn from its lower end, and a bent one: start at the top-most end
        ("line", [5, 60, 40, 10], [40, 10, 5, 60]),
        ("line", [0, 30, 50, 0, 90, 20], [90, 20, 50, 0, 0, 30]),
        # equal heights: the left end first
        ("line", [70, 8, 10, 8], [10, 8, 70, 8]),
        ("bbox_2d", [1, 2, 3, 4], [1, 2, 3, 4]),
    ],
)
def test_canonical_points(kind, source, expected):
    from coordexp.preprocess.coco import canonical_points

    assert canonical_points(kind, [float(v) for v in source]) == [float(v) for v in expected]


def test_canonical_points_is_idempotent_and_keeps_the_point_set():
    import random

    from coordexp.preprocess.coco import canonical_points

    rng = random.Random(0)
    for _ in range(200):
        kind = rng.choice(["poly", "line"])
        n = rng.randint(3, 6) if kind == "poly" else rng.randint(2, 4)
        vals = [float(rng.randint(0, 99)) for _ in range(2 * n)]
        once = canonical_points(kind, vals)
        assert canonical_points(kind, once) == once
        pairs = sorted(zip(vals[0::2], vals[1::2]))
        assert sorted(zip(once[0::2], once[1::2])) == pairs


def test_vertex_order_source_keeps_the_annotation_order(dataset):
    import copy

    coco = json.loads((dataset / "train.json").read_text())
    bad = copy.deepcopy(coco)
    bad["annotations"][1]["segmentation"] = [[20, 25, 30, 5, 10, 5]]  # counter-clockwise, bottom first
    (dataset / "train.json").write_text(json.dumps(bad))
    run(_params(dataset), root=dataset)
    tri = read_jsonl(dataset / "out" / "train.jsonl")[0].objects[0]
    assert tri.poly == codec.encode_xy([10, 5, 30, 5, 20, 25], 100, 80)
    run(_params(dataset, vertex_order="source"), root=dataset)
    tri = read_jsonl(dataset / "out" / "train.jsonl")[0].objects[0]
    assert tri.poly == codec.encode_xy([20, 25, 30, 5, 10, 5], 100, 80)


def test_stage_logs_its_outputs_as_mlflow_datasets(dataset, monkeypatch):
    """Each split's JSONL is a dataset input of the preprocess run: its path in the repository and
    the md5 DVC records for it, so the UI can follow it into the training run by digest."""
    import mlflow
    from dvc_data.hashfile.hash import file_md5

    from coordexp.preprocess import stage

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    monkeypatch.setenv("COORDEXP_STORE_ROOT", str(dataset))  # the repository's own store, in tmp
    metrics = stage.run(_params(dataset), dataset)
    (run,) = mlflow.search_runs(experiment_names=["coordexp-stage1"], output_format="list")
    assert run.info.run_name == "preprocess"
    got = {i.dataset.name: (i.dataset, {t.key: t.value for t in i.tags}) for i in run.inputs.dataset_inputs}
    assert set(got) == {"train", "val"}
    for split, context in (("train", "training"), ("val", "validation")):
        ds, tags = got[split]
        assert ds.digest == file_md5(str(dataset / "out" / f"{split}.jsonl"))
        assert json.loads(ds.source) == {"uri": f"out/{split}.jsonl"}  # relative to the repository
        assert tags == {
            "mlflow.data.context": context,
            "coordexp.records": str(metrics["splits"][split]["records_out"]),
        }


def test_an_image_claiming_a_huge_size_is_refused_by_name(tmp_path, monkeypatch):
    """A decompression bomb (a header claiming more pixels than Pillow decodes) is a reject naming the file, not
    a crash or a hang; the other image of the split is kept. Pillow's limit is lowered so a tiny file claims
    too much, as a 100k x 100k header would against the real one."""
    from PIL import Image as PILImage

    root = _one_image(tmp_path, [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20]}])
    _png(root / "img" / "bomb.png", 300, 300)
    data = json.loads((root / "train.json").read_text())
    data["images"].append({"id": 2, "file_name": "bomb.png", "width": 300, "height": 300})
    data["annotations"].append({"id": 2, "image_id": 2, "category_id": 1, "bbox": [1, 1, 5, 5]})
    (root / "train.json").write_text(json.dumps(data))
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 20_000)  # 100 x 80 is under it, 300 x 300 over twice it
    m = run(_params(root), root=root)
    assert m["splits"]["train"]["records_out"] == 1 and m["splits"]["train"]["rejects"] == {"image_too_large": 1}
    (rej,) = [json.loads(x) for x in (root / "out" / "rejects.jsonl").read_text().splitlines()]
    assert rej["reason"] == "image_too_large" and "bomb.png" in rej["detail"] and rej["objects_lost"] == 1
