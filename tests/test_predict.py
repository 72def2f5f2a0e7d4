"""``coordexp predict``: unreadable inputs are refused one line each, predictions.json is always written, pixels."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
from test_build_base import SMALL, write_dataset

from coordexp.core import codec

ANSWER_BINS = [100, 250, 800, 900]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    from coordexp.build_base.tiny import build_tiny

    data = write_dataset(tmp_path_factory.mktemp("data"), n=4)
    return build_tiny(data, tmp_path_factory.mktemp("tiny") / "base", **SMALL)


def _png(size: tuple[int, int], seed: int = 0) -> bytes:
    from PIL import Image

    rng = random.Random(seed)
    im = Image.new("RGB", size)
    im.putdata([(rng.randrange(256), rng.randrange(256), rng.randrange(256)) for _ in range(size[0] * size[1])])
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def known_answer(monkeypatch):
    """The untrained model runs on the image for real; its answer is then replaced by a known one
    (one box at ANSWER_BINS), so the pixel conversion is checked on a real object."""
    from coordexp.evaluate.generate import Detector, Generation

    real = Detector.generate

    def generate(self, rows, max_new_tokens, logits_processors=None):
        gens = real(self, rows, max_new_tokens, logits_processors)
        coords = [codec.coord_token(k) for k in ANSWER_BINS]
        # the answer as the steps a tokenizer would give, each with probability 0.5, so every score definition
        # (the default one counts the description's tokens too) is 0.5
        toks = ['{"object_1": {"desc": "', "red", " circle", '", "bbox_2d": ["']
        for i, c in enumerate(coords):
            toks += [c, '", "' if i < 3 else '"]}}']
        text = "".join(toks)
        ends = [sum(len(t) for t in toks[: i + 1]) for i in range(len(toks))]
        spans = [(e - len(t), e) for t, e in zip(toks, ends)]
        n = len(toks)
        return [
            Generation(text=text, tokens=toks, probs=[0.5] * n, n_tokens=n, hit_limit=False, spans=spans) for _ in gens
        ]

    monkeypatch.setattr(Detector, "generate", generate)


def test_predict_refuses_unreadable_inputs_and_writes_pixels(checkpoint, tmp_path, capsys, known_answer):
    from PIL import Image

    from coordexp.cli import main

    good = tmp_path / "good.png"
    good.write_bytes(_png((160, 96)))
    text = tmp_path / "notes.png"
    text.write_text("not an image\n")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png((64, 64), seed=1)[:600])
    missing = tmp_path / "missing.png"
    folder = tmp_path / "a_folder"
    folder.mkdir()
    out = tmp_path / "out"

    args = ["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--max-new-tokens", "4"]
    rc = main([*args, str(good), str(text), str(truncated), str(missing), str(folder)])
    err = capsys.readouterr().err.splitlines()  # transformers' progress bars and warnings go there too

    assert rc == 1
    refused = [text, truncated, missing, folder]
    err = [line for line in err if any(str(p) in line for p in [good, *refused]) or line.startswith("refused")]
    assert len(err) == len(refused), err  # one line per refused input, none about the good one
    for line, path in zip(err, refused):
        assert line.startswith(f"refused {path}: ")
    assert "not an image" in err[0] and "truncated" in err[1] and "no such file" in err[2] and "directory" in err[3]

    res = json.loads((out / "predictions.json").read_text())
    assert list(res)[:2] == ["units", "coordinates"] and res["units"] == "pixels"  # first thing in the file
    assert [r["image"] for r in res["refused"]] == [str(p) for p in refused]
    assert all(r["reason"] for r in res["refused"])
    (entry,) = res["images"]
    assert entry["image"] == str(good) and (entry["width"], entry["height"]) == (160, 96)
    assert entry["ok"] is True and entry["problems"] == []
    assert res["readout"] == "median"  # the project's evaluate.readout
    (obj,) = entry["objects"]
    assert obj["desc"] == "red circle" and obj["bins"] == {"bbox_2d": ANSWER_BINS}
    assert obj["bbox_2d"] == pytest.approx(codec.decode_xy(ANSWER_BINS, 160, 96))
    assert obj["bbox_2d"] == pytest.approx([100 / 999 * 159, 250 / 999 * 95, 800 / 999 * 159, 900 / 999 * 95])
    assert [int(k) for k in codec.pixels_to_bins(obj["bbox_2d"], codec.xy_sizes(4, 160, 96))] == ANSWER_BINS
    assert obj["score"] == pytest.approx(0.5) and obj["score_status"] == "ok"
    with Image.open(entry["drawn"]) as im:
        assert im.size == (160, 96) and Path(entry["drawn"]) == out / "good.pred.png"
    assert not list(out.glob(".*tmp*"))  # written atomically: no temporary left


def test_predict_exit_codes(checkpoint, tmp_path, capsys):
    from coordexp.cli import main

    good = tmp_path / "good.png"
    good.write_bytes(_png((32, 32)))
    out = tmp_path / "out"
    assert (
        main(["predict", "--checkpoint", str(checkpoint), "--out", str(out), "--max-new-tokens", "2", str(good)]) == 0
    )
    assert "refused" not in capsys.readouterr().err
    res = json.loads((out / "predictions.json").read_text())
    assert res["refused"] == [] and len(res["images"]) == 1

    # only refused inputs: predictions.json still says so, exit 1
    out2 = tmp_path / "out2"
    assert main(["predict", "--checkpoint", str(checkpoint), "--out", str(out2), str(tmp_path / "nope.jpg")]) == 1
    assert json.loads((out2 / "predictions.json").read_text())["refused"][0]["reason"] == "no such file"
    capsys.readouterr()

    # no checkpoint: nothing can be done, one error line, exit 2, nothing written
    out3 = tmp_path / "out3"
    assert main(["predict", "--checkpoint", str(tmp_path / "no_ckpt"), "--out", str(out3), str(good)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no such checkpoint" in err[0]
    assert not (out3 / "predictions.json").exists()
