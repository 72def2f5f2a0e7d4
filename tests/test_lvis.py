"""LVIS: ``preprocess`` reads an LVIS file (``coco_url``, federated id lists, frequency groups) and
``evaluate.metrics: lvis`` scores with the ``lvis`` package's federated protocol, the same numbers as calling
the package directly on the same files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import SMALL_MODEL
from lvis import LVISEval
from PIL import Image

from coordexp.core import codec
from coordexp.core.config import Params
from coordexp.core.contract import read_jsonl, record_to_json
from coordexp.core.errors import MissingInputError
from coordexp.evaluate.metrics import LVIS_STAT_NAMES, lvis_map, lvis_numpy_compat, to_lvis_gt
from coordexp.evaluate.stage import compute_metrics, load_lvis_fields
from coordexp.preprocess.coco import run
from coordexp.preprocess.lvis import LvisFormatError

SIZE = 1000  # a pixel of a 1000-pixel side is one coord bin: the codec round trip keeps integer boxes
CATEGORIES = [
    {"id": 10, "name": "cat", "frequency": "r", "synonyms": ["cat"], "def": "a feline"},
    {"id": 20, "name": "dog", "frequency": "c", "synonyms": ["dog"], "def": "a canine"},
    {"id": 30, "name": "bird", "frequency": "f", "synonyms": ["bird"], "def": "has feathers"},
    {"id": 40, "name": "fish", "frequency": "r", "synonyms": ["fish"], "def": "swims"},
]
# image id -> (neg_category_ids, not_exhaustive_category_ids)
FEDERATED = {1: ([30], [20]), 2: ([10], []), 3: ([20, 30], []), 4: ([10, 20], [])}
GT = [  # (image id, category id, x, y, w, h)
    (1, 10, 100, 100, 200, 200),
    (1, 20, 500, 500, 300, 200),
    (2, 30, 50, 50, 400, 400),
    (2, 30, 600, 600, 20, 20),
    (2, 30, 700, 100, 60, 60),
    (3, 10, 300, 300, 100, 150),
]
DETECTIONS = [  # (image id, category id, x, y, w, h, score, what the federated protocol does with it)
    (1, 10, 100, 100, 200, 200, 0.9, "scored"),
    (1, 20, 500, 500, 300, 200, 0.8, "scored"),
    (1, 20, 0, 0, 50, 50, 0.95, "ignored: dog is not exhaustively annotated in image 1"),
    (1, 30, 700, 100, 100, 100, 0.7, "scored: bird is checked absent in image 1"),
    (2, 30, 50, 50, 400, 380, 0.6, "scored"),
    (2, 30, 602, 600, 20, 20, 0.5, "scored"),
    (2, 30, 705, 100, 60, 60, 0.55, "scored"),
    (2, 20, 100, 600, 200, 200, 0.97, "ignored: dog is neither present nor checked absent in image 2"),
    (3, 10, 300, 300, 100, 150, 0.4, "scored"),
    (3, 10, 800, 800, 100, 100, 0.85, "scored"),
    (4, 10, 10, 10, 200, 200, 0.88, "scored: cat is checked absent in image 4"),
    (4, 30, 400, 400, 100, 100, 0.9, "ignored: bird is neither present nor checked absent in image 4"),
]


def _lvis_file(tmp: Path, images=None, categories=None) -> Path:
    img_dir = tmp / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    if images is None:
        images = []
        for iid, (neg, nel) in FEDERATED.items():
            name = f"{iid:012d}.jpg"
            Image.new("RGB", (SIZE, SIZE), (200, 200, 200)).save(img_dir / name)
            images.append(
                {
                    "id": iid,
                    "width": SIZE,
                    "height": SIZE,
                    "coco_url": f"http://images.cocodataset.org/train2017/{name}",
                    "neg_category_ids": neg,
                    "not_exhaustive_category_ids": nel,
                }
            )
    anns = []
    for i, (iid, cid, x, y, w, h) in enumerate(GT, start=1):
        poly = [x, y, x + w, y, x + w, y + h, x, y + h]
        anns.append(
            {"id": i, "image_id": iid, "category_id": cid, "bbox": [x, y, w, h], "area": w * h, "segmentation": [poly]}
        )
    data = {"images": images, "annotations": anns, "categories": categories or CATEGORIES}
    path = tmp / "lvis_val.json"
    path.write_text(json.dumps(data))
    return path


def _params(tmp: Path, ann: Path, preprocess: dict | None = None, **evaluate) -> Params:
    split = {"annotations": str(ann), "images": str(tmp / "img")}
    return Params.model_validate(
        {
            "preprocess": {"splits": {"train": split, "val": split}, "out_dir": str(tmp / "out"), **(preprocess or {})},
            "train": {"out_dir": str(tmp / "train")},
            "evaluate": {"out_dir": str(tmp / "eval"), **evaluate},
        }
    )


def _predictions(records: list[dict], detections) -> list[dict]:
    names = {c["id"]: c["name"] for c in CATEGORIES}
    out = []
    for r in records:
        objs = [
            {"desc": names[cid], "bbox_2d": codec.encode_xy([x, y, x + w, y + h], SIZE, SIZE), "score": s}
            for iid, cid, x, y, w, h, s, _ in detections
            if iid == r["id"]
        ]
        out.append({"id": r["id"], "width": r["width"], "height": r["height"], "objects": objs})
    return out


def _package(tmp: Path, gt_file: Path, detections) -> dict[str, float]:
    """The ``lvis`` package on the hand-built file and the detections in its pixels, nothing of ours between."""
    res = [
        {"image_id": iid, "category_id": cid, "bbox": [x, y, w, h], "score": s}
        for iid, cid, x, y, w, h, s, _ in detections
    ]
    res_file = tmp / "direct_results.json"
    res_file.write_text(json.dumps(res))
    ev = LVISEval(str(gt_file), str(res_file), iou_type="bbox")
    with lvis_numpy_compat():  # lvis 0.5.3 on NumPy 2 (see the function)
        ev.run()
    return {k: float(v) for k, v in ev.results.items()}


@pytest.fixture
def lvis_project(tmp_path):
    ann = _lvis_file(tmp_path)
    params = _params(tmp_path, ann, metrics="lvis")
    counts = run(params, tmp_path)
    records = [record_to_json(r) for r in read_jsonl(tmp_path / "out" / "val.jsonl")]
    return tmp_path, ann, params, counts, records


def test_preprocess_reads_lvis_coco_urls_and_keeps_the_federated_fields(lvis_project):
    tmp, _, params, counts, records = lvis_project
    assert sorted(r["id"] for r in records) == [1, 2, 3, 4]
    assert sorted(p.name for p in (tmp / "out" / "images" / "val").iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3, 4)]
    fields = load_lvis_fields(params, tmp)
    assert {im["id"]: (im["neg_category_ids"], im["not_exhaustive_category_ids"]) for im in fields["images"]} == {
        iid: (sorted(neg), sorted(nel)) for iid, (neg, nel) in FEDERATED.items()
    }
    assert [(c["id"], c["name"], c["frequency"], c["def"]) for c in fields["categories"]] == [
        (c["id"], c["name"], c["frequency"], c["def"]) for c in CATEGORIES
    ]
    val = counts["splits"]["val"]
    assert val["negative_images"] == 1  # image 4: no annotation, kept with an empty answer
    assert val["objects_out"] == len(GT)
    assert val["lvis"] == {
        "images": 4,
        "categories": {"r": 2, "c": 1, "f": 1},
        "neg_category_ids": sum(len(n) for n, _ in FEDERATED.values()),
        "not_exhaustive_category_ids": sum(len(n) for _, n in FEDERATED.values()),
    }


def test_an_image_without_federated_lists_is_rejected_and_counted(tmp_path):
    ann = _lvis_file(tmp_path)
    data = json.loads(ann.read_text())
    del data["images"][2]["neg_category_ids"]  # image 3
    ann.write_text(json.dumps(data))
    counts = run(_params(tmp_path, ann), tmp_path)
    assert counts["splits"]["val"]["rejects"] == {"bad_lvis_image": 1}
    assert counts["splits"]["val"]["lvis"]["images"] == 3
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {(r["image_id"], r["reason"], r["file_name"]) for r in rejects} == {
        (3, "bad_lvis_image", "000000000003.jpg")
    }
    assert "neg_category_ids" in rejects[0]["detail"]


def test_a_category_without_frequency_group_is_named(tmp_path):
    cats = [dict(c) for c in CATEGORIES]
    cats[1]["frequency"] = "common"
    ann = _lvis_file(tmp_path, categories=cats)
    with pytest.raises(LvisFormatError, match=r"lvis_val\.json: categories\[1\] \(id 20, 'dog'\): 'frequency'"):
        run(_params(tmp_path, ann), tmp_path)
    assert not (tmp_path / "out" / "val.jsonl").exists()


def test_lvis_metrics_need_an_lvis_split(tmp_path):
    params = _params(tmp_path, tmp_path / "x.json", metrics="lvis")
    with pytest.raises(MissingInputError, match=r"val\.lvis\.json does not exist.*evaluate\.metrics: coco"):
        load_lvis_fields(params, tmp_path)
    assert load_lvis_fields(_params(tmp_path, tmp_path / "x.json"), tmp_path) is None  # coco: not read


def _lvis_numbers(m: dict) -> dict[str, float | None]:
    return {name: m[f"lvis_{name}"] for name in LVIS_STAT_NAMES}


def test_lvis_metrics_equal_the_package_on_the_same_files(lvis_project):
    tmp, ann, params, _, records = lvis_project
    fields = load_lvis_fields(params, tmp)
    m = compute_metrics(records, _predictions(records, DETECTIONS), None, lvis_fields=fields)
    direct = _package(tmp, ann, DETECTIONS)
    for name in LVIS_STAT_NAMES:
        expected = None if direct[name] == -1 else direct[name]
        assert m[f"lvis_{name}"] == pytest.approx(expected, rel=1e-9), name
    assert m["lvis_AR"] == pytest.approx(direct["AR@300"], rel=1e-9)
    assert m["lvis_unknown_desc"] == 0
    # every group and area range of the set is populated, so none is undefined
    assert all(m[f"lvis_{n}"] is not None for n in ("APr", "APc", "APf", "APs", "APm", "APl"))

    # the federated rules at work: dropping the detections the protocol ignores leaves every LVIS number as it
    # was, and moves COCO's, which counts them as false positives
    scored = [d for d in DETECTIONS if not d[-1].startswith("ignored")]
    m2 = compute_metrics(records, _predictions(records, scored), None, lvis_fields=fields)
    assert _lvis_numbers(m2) == pytest.approx(_lvis_numbers(m), rel=1e-9)
    assert m2["bbox_mAP"] > m["bbox_mAP"]
    assert m["lvis_AP"] > m["bbox_mAP"]
    assert _package(tmp, ann, scored)["AP"] == pytest.approx(direct["AP"], rel=1e-9)

    # and a detection the protocol does score moves it: the only image-4 false positive of a checked-absent class
    fewer = [d for d in DETECTIONS if not (d[0] == 4 and d[1] == 10)]
    m3 = compute_metrics(records, _predictions(records, fewer), None, lvis_fields=fields)
    assert m3["lvis_APr"] != pytest.approx(m["lvis_APr"])
    assert m3["lvis_APr"] == pytest.approx(_package(tmp, ann, fewer)["APr"], rel=1e-9)


def test_lvis_map_without_detections_is_zero_where_there_is_ground_truth(lvis_project):
    tmp, _, params, _, records = lvis_project
    gt = to_lvis_gt(records, load_lvis_fields(params, tmp))
    out = lvis_map(gt, [])
    assert (out["AP"], out["AP50"], out["APr"], out["APc"], out["APf"]) == (0.0, 0.0, 0.0, 0.0, 0.0)
    no_gt = lvis_map({**gt, "annotations": []}, [])
    assert math.isnan(no_gt["AP"]) and math.isnan(no_gt["APr"])


@pytest.mark.slow
def test_evaluate_stage_writes_and_logs_the_lvis_metrics(tmp_path, mlflow_store):
    """The stage end to end on an untrained tiny checkpoint (no training: what is checked is the plumbing):
    ``lvis_*`` in eval.json and MLflow, and the files the package scored, which it scores again the same."""
    from coordexp.build_base.tiny import build_tiny
    from coordexp.evaluate import stage

    ann = _lvis_file(tmp_path)
    params = _params(tmp_path, ann, {"max_side": 64}, metrics="lvis", max_new_tokens=40, batch_size=4, log_model="none")
    run(params, tmp_path)
    build_tiny(tmp_path / "out" / "train.jsonl", tmp_path / "train" / "final", **SMALL_MODEL)
    out = stage.run(params, tmp_path)
    saved = json.loads((tmp_path / "reports" / "metrics" / "eval.json").read_text())
    assert {k: saved[k] for k in saved if k.startswith("lvis_")} == {k: out[k] for k in out if k.startswith("lvis_")}
    assert set(LVIS_STAT_NAMES) <= {k.removeprefix("lvis_") for k in saved}
    gt = json.loads((tmp_path / "eval" / "lvis_gt.json").read_text())
    assert {im["id"]: im["neg_category_ids"] for im in gt["images"]} == {
        i: sorted(n) for i, (n, _) in FEDERATED.items()
    }
    assert len(gt["annotations"]) == len(GT)
    results = json.loads((tmp_path / "eval" / "lvis_results.json").read_text())
    again = lvis_map(gt, results)
    assert again["AP"] == pytest.approx(saved["lvis_AP"] or 0.0)
    import mlflow

    mlflow.set_tracking_uri(mlflow_store)
    logged = mlflow.search_runs(search_all_experiments=True).iloc[0]
    assert logged["metrics.lvis_AP"] == pytest.approx(saved["lvis_AP"])
    assert logged["metrics.lvis_unknown_desc"] == saved["lvis_unknown_desc"]
