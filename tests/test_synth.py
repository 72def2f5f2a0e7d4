"""Tests for the synthetic shapes data set (coordexp.preprocess.synth)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from coordexp.preprocess import synth

N_TRAIN, N_VAL, SIZE = 60, 10, 128


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("shapes")
    summary = synth.generate_coco_shapes(out, n_train=N_TRAIN, n_val=N_VAL, seed=0, progress=False)
    return out, summary


def _load(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def _shape_of(coco: dict) -> dict[int, str]:
    return {c["id"]: c["supercategory"] for c in coco["categories"]}


def _all_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_layout_and_summary_counts(dataset):
    out, summary = dataset
    assert summary["num_categories"] == 15
    total = 0
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        coco = _load(out, split)
        s = summary["splits"][split]
        assert s["images"] == n == len(coco["images"])
        assert s["annotations"] == len(coco["annotations"])
        assert sum(s["per_category"].values()) == s["annotations"]
        names = {c["id"]: c["name"] for c in coco["categories"]}
        for name, count in s["per_category"].items():
            assert count == sum(names[a["category_id"]] == name for a in coco["annotations"])
        assert sorted(p.name for p in (out / split).iterdir()) == [f"{i:06d}.png" for i in range(n)]
        assert s["png_bytes"] == sum(p.stat().st_size for p in (out / split).iterdir())
        assert s["json_bytes"] == (out / "annotations" / f"instances_{split}.json").stat().st_size
        total += s["png_bytes"] + s["json_bytes"]
        # 1..max_objects objects per image (nothing dropped at these settings)
        per_img = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=n + 1)[1:]
        assert per_img.min() >= 1 and per_img.max() <= 4
        assert s["dropped_objects"] == 0
    assert summary["total_bytes"] == total


def test_deterministic_bytes(dataset, tmp_path):
    out, _ = dataset
    again = tmp_path / "again"
    synth.generate_coco_shapes(again, n_train=N_TRAIN, n_val=N_VAL, seed=0, progress=False)
    a, b = _all_files(out), _all_files(again)
    assert a.keys() == b.keys() and len(a) == N_TRAIN + N_VAL + 2
    assert all(a[k] == b[k] for k in a)
    # an image depends only on (seed, split, index), not on how many were generated
    small = tmp_path / "small"
    synth.generate_coco_shapes(small, n_train=5, n_val=0, seed=0, progress=False)
    for i in range(5):
        assert (small / "train" / f"{i:06d}.png").read_bytes() == a[f"train/{i:06d}.png"]
    # a different seed gives different images
    other = tmp_path / "other"
    synth.generate_coco_shapes(other, n_train=5, n_val=0, seed=1, progress=False)
    assert (other / "train" / "000000.png").read_bytes() != a["train/000000.png"]


def test_pycocotools_loads(dataset):
    out, _ = dataset
    for split in ("train", "val"):
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        assert len(coco.getCatIds()) == 15
        names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
        assert len(set(names)) == 15 and "red circle" in names and "blue line" in names
        for c in coco.loadCats(coco.getCatIds()):
            assert c["name"].split()[1] == c["supercategory"] and c["supercategory"] in synth.SHAPES
        for img in coco.loadImgs(coco.getImgIds()):
            assert img["file_name"] == f"{img['id'] - 1:06d}.png"
            assert (img["width"], img["height"]) == (SIZE, SIZE)
            with Image.open(out / split / img["file_name"]) as im:
                assert im.size == (SIZE, SIZE) and im.mode == "RGB"
        ids = [a["id"] for a in coco.dataset["annotations"]]
        assert ids == list(range(1, len(ids) + 1))


def test_boxes_inside_and_non_degenerate(dataset):
    out, _ = dataset
    for split in ("train", "val"):
        coco = _load(out, split)
        for a in coco["annotations"]:
            x, y, w, h = a["bbox"]
            assert all(isinstance(v, float) for v in a["bbox"])
            assert w >= 4 and h >= 4, a
            assert 0 <= x and 0 <= y and x + w <= SIZE and y + h <= SIZE, a
            assert a["iscrowd"] == 0 and a["area"] > 0


def test_geometry_fields_per_shape(dataset):
    out, _ = dataset
    coco = _load(out, "train")
    shape = _shape_of(coco)
    for a in coco["annotations"]:
        s = shape[a["category_id"]]
        assert a["geometry"] == synth.SHAPE_GEOMETRY[s]
        if s in ("circle", "rectangle"):
            assert "segmentation" not in a and "line" not in a
        elif s in ("triangle", "diamond"):
            assert "line" not in a
            assert len(a["segmentation"]) == 1
            assert len(a["segmentation"][0]) == (6 if s == "triangle" else 8)
        else:
            assert "segmentation" not in a
            assert len(a["line"]) in (4, 6) and a["stroke_width"] >= 4


def test_polygon_bbox_matches(dataset):
    out, _ = dataset
    coco = _load(out, "train")
    shape = _shape_of(coco)
    n = 0
    for a in coco["annotations"]:
        if "segmentation" not in a:
            continue
        pts = np.array(a["segmentation"][0]).reshape(-1, 2)
        assert 3 <= len(pts) <= 8
        assert (pts >= 0).all() and (pts <= SIZE).all()
        x, y, w, h = a["bbox"]
        np.testing.assert_allclose([pts[:, 0].min(), pts[:, 1].min()], [x, y], atol=1.0)
        np.testing.assert_allclose([pts[:, 0].max(), pts[:, 1].max()], [x + w, y + h], atol=1.0)
        # and the painted shape's pixel extent agrees with the bbox within 1 px
        _assert_raster_extent(a, shape[a["category_id"]], atol=1.0)
        n += 1
    assert n > 10


def _assert_raster_extent(a: dict, shape: str, atol: float) -> None:
    m = synth.render_mask(a, shape, SIZE, SIZE)
    ys, xs = np.nonzero(m)
    x, y, w, h = a["bbox"]
    got = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]  # pixel i covers [i, i+1]
    np.testing.assert_allclose(got, [x, y, x + w, y + h], atol=atol, err_msg=str(a))


def test_box_like_raster_equals_bbox(dataset):
    out, _ = dataset
    coco = _load(out, "train")
    shape = _shape_of(coco)
    for a in coco["annotations"]:
        s = shape[a["category_id"]]
        if s in ("circle", "rectangle"):
            _assert_raster_extent(a, s, atol=0.0)
            if s == "circle":
                assert a["bbox"][2] == a["bbox"][3]


def test_line_points_inside_and_enclosed(dataset):
    out, _ = dataset
    coco = _load(out, "train")
    shape = _shape_of(coco)
    n = 0
    for a in coco["annotations"]:
        if "line" not in a:
            continue
        pts = np.array(a["line"]).reshape(-1, 2)
        assert len(pts) >= 2
        assert (pts >= 0).all() and (pts <= SIZE).all()
        x, y, w, h = a["bbox"]
        assert (pts[:, 0] >= x).all() and (pts[:, 0] <= x + w).all()
        assert (pts[:, 1] >= y).all() and (pts[:, 1] <= y + h).all()
        # bbox = points' bounds padded by half the stroke (clipped to the image)
        half = a["stroke_width"] / 2
        assert x == pytest.approx(max(pts[:, 0].min() - half, 0))
        assert x + w == pytest.approx(min(pts[:, 0].max() + half, SIZE))
        # the painted stroke stays inside the bbox (1 px slack for PIL's rasteriser)
        ys, xs = np.nonzero(synth.render_mask(a, shape[a["category_id"]], SIZE, SIZE))
        assert xs.min() >= x - 1 and xs.max() + 1 <= x + w + 1
        assert ys.min() >= y - 1 and ys.max() + 1 <= y + h + 1
        n += 1
    assert n > 5


def test_all_categories_used(dataset):
    out, summary = dataset
    coco = _load(out, "train")
    used = {a["category_id"] for a in coco["annotations"]}
    assert used == {c["id"] for c in coco["categories"]}
    assert all(v > 0 for v in summary["splits"]["train"]["per_category"].values())


def _check_occlusion_and_pixels(out: Path, split: str, max_occlusion: float) -> int:
    """Re-rasterise every image from its annotations (in id = paint order): each object's
    visible fraction respects the bound and matches ``occluded``, each visible pixel has its
    category's colour, and uncovered pixels are light background."""
    coco = _load(out, split)
    shape = _shape_of(coco)
    colour = {c["id"]: np.array(synth.COLOURS[c["name"].split()[0]]) for c in coco["categories"]}
    by_img: dict[int, list[dict]] = {}
    for a in coco["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    n_checked = 0
    for img in coco["images"]:
        pix = np.asarray(Image.open(out / split / img["file_name"]).convert("RGB")).astype(int)
        anns = sorted(by_img.get(img["id"], []), key=lambda a: a["id"])
        masks = [synth.render_mask(a, shape[a["category_id"]], SIZE, SIZE) for a in anns]
        top = np.full((SIZE, SIZE), -1)
        for k, m in enumerate(masks):
            top[m] = k
        for k, (a, m) in enumerate(zip(anns, masks)):
            vis = np.count_nonzero(top == k) / np.count_nonzero(m)
            assert vis >= 1 - max_occlusion - 1e-9, (img, a, vis)
            assert a["occluded"] == pytest.approx(1 - vis, abs=0.006)
            assert a["area"] == np.count_nonzero(m)
            diff = np.abs(pix[top == k] - colour[a["category_id"]])
            assert diff.max() <= synth._COLOUR_JITTER, (img, a)
            n_checked += 1
        assert (pix[top == -1] >= 200).all()
    return n_checked


def test_occlusion_bound_and_pixels(dataset):
    out, _ = dataset
    assert _check_occlusion_and_pixels(out, "train", 0.3) > 100
    assert _check_occlusion_and_pixels(out, "val", 0.3) > 5
    occluded = [a["occluded"] for a in _load(out, "train")["annotations"]]
    assert max(occluded) > 0.05  # occlusion actually happens


def test_min_extent_and_line_aspect(tmp_path):
    """The two knobs the embedded default turns: no object smaller than ``min_extent`` of the side,
    and no line whose points' box is thinner than ``line_min_aspect`` of its longer side. The
    unconstrained default does produce both (so the check can fail)."""

    def figures(out: Path) -> tuple[float, float]:
        coco = _load(out, "train")
        smallest = min(max(a["bbox"][2], a["bbox"][3]) for a in coco["annotations"] if "line" not in a)
        thinnest = 1.0
        for a in coco["annotations"]:
            if "line" in a:
                span = np.ptp(np.array(a["line"]).reshape(-1, 2), axis=0)
                thinnest = min(thinnest, span.min() / span.max())
        return smallest, thinnest

    plain, tight = tmp_path / "plain", tmp_path / "tight"
    synth.generate_coco_shapes(plain, n_train=80, n_val=0, progress=False)
    summary = synth.generate_coco_shapes(
        tight, n_train=80, n_val=0, min_extent=0.25, line_min_aspect=0.35, progress=False
    )
    smallest, thinnest = figures(plain)
    assert smallest < 0.2 * SIZE and thinnest < 0.2
    smallest, thinnest = figures(tight)
    # sides are rounded to whole pixels and vertices to pixel centres: one pixel of slack
    assert smallest >= 0.25 * SIZE - 1
    assert thinnest >= 0.3
    info = _load(tight, "train")["info"]
    assert info["min_extent"] == 0.25 and info["line_min_aspect"] == 0.35
    assert summary["splits"]["train"]["per_category"]["red line"] > 0


def test_zero_occlusion(tmp_path):
    synth.generate_coco_shapes(tmp_path, n_train=15, n_val=0, max_objects=3, max_occlusion=0.0, progress=False)
    assert _check_occlusion_and_pixels(tmp_path, "train", 0.0) >= 15
    assert all(a["occluded"] == 0 for a in _load(tmp_path, "train")["annotations"])


def test_cli_and_stale_files(tmp_path, capsys):
    out = tmp_path / "cli"
    assert synth.main(["--out", str(out), "--n-train", "6", "--n-val", "2", "--no-progress", "--image-size", "96"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["images"] == 6 and summary["image_size"] == 96
    assert _load(out, "train")["images"][0]["width"] == 96
    # a smaller re-run removes the now unreferenced numbered PNGs, nothing else
    (out / "train" / "notes.txt").write_text("keep me")
    synth.main(["--out", str(out), "--n-train", "3", "--n-val", "2", "--no-progress"])
    assert sorted(p.name for p in (out / "train").iterdir()) == ["000000.png", "000001.png", "000002.png", "notes.txt"]
    assert not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    "kw",
    [
        {"min_objects": 0},
        {"min_objects": 3, "max_objects": 2},
        {"max_occlusion": 1.0},
        {"seed": -1},
        {"n_train": -1},
        {"min_extent": 0.7},
        {"min_extent": 0.0},
        {"line_min_aspect": -0.1},
        {"line_min_aspect": 0.9},
    ],
)
def test_invalid_arguments(tmp_path, kw):
    kw = dict(kw)
    with pytest.raises(ValueError):
        synth.generate_coco_shapes(tmp_path, n_train=kw.pop("n_train", 1), n_val=0, progress=False, **kw)


def test_coordexp_synth_command_passes_every_option(tmp_path, capsys):
    """``coordexp synth --out ...`` is the README's command: options before any positional must reach
    the generator (argparse's REMAINDER alone would reject them)."""
    from coordexp.cli import main

    out = tmp_path / "via_cli"
    assert (
        main(["synth", "--out", str(out), "--n-train", "2", "--n-val", "1", "--min-extent", "0.3", "--no-progress"])
        == 0
    )
    assert json.loads(capsys.readouterr().out)["splits"]["train"]["images"] == 2
    assert _load(out, "train")["info"]["min_extent"] == 0.3
