"""``coordexp predict``: run a checkpoint on your own images; JSON objects plus drawn copies."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from PIL import Image, ImageDraw

from coordexp.core import codec
from coordexp.core.contract import Record
from coordexp.core.geometry import geometry_of
from coordexp.evaluate.generate import Detector

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def draw(image: Image.Image, objects: list[dict], width: int, height: int) -> Image.Image:
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    for i, o in enumerate(objects):
        kind, values = geometry_of(o)
        pts = [float(v) for v in codec.bins_to_pixels(values, codec.xy_sizes(len(values), width, height))]
        c = _COLOURS[i % len(_COLOURS)]
        if kind == "bbox_2d":
            d.rectangle(pts, outline=c, width=2)
        elif kind == "poly":
            d.polygon(pts, outline=c)
        else:
            d.line(pts, fill=c, width=2)
        d.text((pts[0] + 2, pts[1] + 1), f"{o['desc']} {o.get('score', 0):.2f}", fill=c)
    return im


def predict(checkpoint: Path, images: list[Path], out_dir: Path, *, max_new_tokens: int = 256) -> list[dict]:
    det = Detector(checkpoint)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for n, path in enumerate(images):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such image")
        with Image.open(path) as im:
            im.load()
            w, h = im.size
            with tempfile.TemporaryDirectory() as tmp:
                # the one template wants a contract record whose image path is relative to a root
                local = Path(tmp) / f"image{path.suffix or '.png'}"
                im.save(local)
                rec = Record(id=n, images=[local.name], width=w, height=h, objects=[])
                (gen,) = det.generate(det.rows([rec], Path(tmp)), max_new_tokens)
            pred, parse = gen.prediction(n, w, h)
            draw(im, pred["objects"], w, h).save(out_dir / f"{path.stem}.pred.png")
        results.append(
            {
                "image": str(path),
                "width": w,
                "height": h,
                "text": gen.text,
                "objects": pred["objects"],
                "problems": [p.__dict__ for p in parse.problems],
            }
        )
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=2))
    return results
