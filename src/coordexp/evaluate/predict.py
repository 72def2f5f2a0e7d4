"""``coordexp predict``: run a checkpoint on your own images; JSON objects in pixels plus drawn copies.

``<out>/predictions.json`` (written atomically, also when some inputs were refused)::

    {
      "units": "pixels",
      "coordinates": "<how pixels and bins relate>",
      "checkpoint": "artifacts/train/final", "readout": "median", "score": "desc_coord_geomean",
      "images": [
        {"image": "my_image.jpg", "width": 640, "height": 480, "drawn": "predictions/my_image.pred.png",
         "objects": [{"desc": "red circle", "bbox_2d": [x1, y1, x2, y2],
                      "bins": {"bbox_2d": [k1, k2, k3, k4]}, "score": 0.93, "score_status": "ok"}],
         "text": "<the raw answer>", "ok": true, "problems": []}
      ],
      "refused": [{"image": "notes.png", "reason": "not an image (Pillow cannot identify its format)"}]
    }

Each object's geometry (``bbox_2d``, ``poly`` or ``line``: a flat ``[x, y, x, y, ...]`` list) is in
pixels of the input image, ``x = k / 999 * (width - 1)`` (:func:`coordexp.core.codec.decode_xy`),
not rounded; ``bins`` holds the bins ``k`` in [0, 999], under the same geometry key, read from the coord
distribution at each slot with the chosen readout (``--readout``, default ``evaluate.readout`` of the project's
``params.yaml``, else ``median``; :mod:`coordexp.evaluate.readout`). With ``argmax`` they are the integers the
model emitted; with the other readouts they are continuous (floats between bins). ``score`` is the
``evaluate.score`` definition (default the geometric mean of the coord tokens' probabilities). ``ok`` says
the answer parsed cleanly (:attr:`coordexp.evaluate.parse.ParseResult.ok`); ``problems`` lists what was
wrong with it otherwise.

An input that cannot be read (missing, a directory, not an image, corrupt or truncated, or a header that
claims more pixels than Pillow decodes: a decompression bomb) is refused with one line on stderr and listed
under ``refused``; the other inputs go on. Only errors about the input (Pillow's decoding errors, OSErrors while
reading it) are refusals; anything else is a bug and raises.

The inputs are the files named on the command line, read wherever they are (symlinks included): the user chose
them, so no base folder applies. Paths *inside* data files are another matter and are held to their folder
(:func:`coordexp.core.paths.inside`).
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, Literal

from PIL import Image, ImageDraw

from coordexp.core import codec, imaging
from coordexp.core.contract import Record
from coordexp.core.geometry import geometry_of
from coordexp.core.io import write_json
from coordexp.evaluate.generate import Detector
from coordexp.evaluate.grammar import Grammar, GrammarLimits, model_vocab_size

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]

UNITS = "pixels"
COORDINATES = (
    f"bbox_2d / poly / line are flat [x, y, x, y, ...] lists in pixels of the input image: "
    f"x = k / {codec.K - 1} * (width - 1), y = k / {codec.K - 1} * (height - 1), where k is the bin "
    f"in [0, {codec.K - 1}] read from the model's coord distribution (the emitted bin for the argmax readout, "
    f"a continuous value for expectation, median and local_expectation); the bins are under 'bins', with the "
    f"same geometry key"
)


def to_pixels(objects: list[dict[str, Any]], width: int, height: int) -> list[dict[str, Any]]:
    """Parsed objects (geometry in bins) -> the same objects with the geometry in pixels and the bins under ``bins``
    (integers stay integers, continuous readouts stay floats); the evaluation-only ``readouts`` and ``scores``
    (every readout's bins and every score definition) are left out."""
    out = []
    for o in objects:
        kind, bins = geometry_of(o)
        bins = [k if isinstance(k, int) else float(k) for k in bins]
        rest = {k: v for k, v in o.items() if k not in ("desc", kind, "readouts", "scores")}
        out.append({"desc": o["desc"], kind: codec.decode_xy(bins, width, height), "bins": {kind: bins}, **rest})
    return out


def draw(image: Image.Image, objects: list[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with ``objects`` (geometry in pixels, as :func:`to_pixels` returns) drawn on it."""
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    for i, o in enumerate(objects):
        kind, values = geometry_of(o)
        pts = [float(v) for v in values]
        c = _COLOURS[i % len(_COLOURS)]
        if kind == "bbox_2d":
            d.rectangle(pts, outline=c, width=2)
        elif kind == "poly":
            d.polygon(pts, outline=c)
        else:
            d.line(pts, fill=c, width=2)
        d.text((pts[0] + 2, pts[1] + 1), f"{o['desc']} {o.get('score', 0):.2f}", fill=c)
    return im


def read_image(path: Path) -> Image.Image | str:
    """The decoded image (RGB), or why ``path`` cannot be used as an input image."""
    if path.is_dir():
        return "a directory, not an image file"
    if not path.exists():
        return "no such file"
    return open_image(path)


def open_image(source: Path | BinaryIO) -> Image.Image | str:
    """The decoded image (RGB) of a file or a byte stream, or why it cannot be used as an input image.

    Shared by ``coordexp predict`` (files) and the served MLflow model (request bytes); what is refused, a
    decompression bomb included, is decided by :mod:`coordexp.core.imaging` for every stage alike.
    """
    try:
        return imaging.load_rgb(source)
    except imaging.ImageRefused as exc:
        return str(exc)


def detect(
    det: Detector,
    images: list[Image.Image],
    max_new_tokens: int,
    *,
    grammar: Grammar | None = None,
    readout: str = "median",
    score: str = "desc_coord_geomean",
) -> list[dict[str, Any]]:
    """One generation batch over decoded images: per image its size, objects in pixels (coordinates by
    ``readout``, ranked by ``score``), raw answer, whether it parsed cleanly (``ok``) and its problems. With a
    ``grammar`` the answers are decoded under it (:mod:`coordexp.evaluate.grammar`).

    The one template wants contract records whose image paths are relative to a root, so the images are
    written (losslessly, whatever their source format) to a temporary folder for the batch.
    """
    if not images:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        recs = []
        for n, im in enumerate(images):
            name = f"image_{n}.png"
            im.save(Path(tmp) / name)
            recs.append(Record(id=n, images=[name], width=im.width, height=im.height, objects=[]))
        procs = [grammar.processor(max_new_tokens)] if grammar is not None else None
        gens = det.generate(det.rows(recs, Path(tmp)), max_new_tokens, logits_processors=procs)
    out = []
    for rec, gen in zip(recs, gens):
        pred, parse = gen.prediction(rec.id, rec.width, rec.height, readout=readout, score=score)
        out.append(
            {
                "width": rec.width,
                "height": rec.height,
                "objects": to_pixels(pred["objects"], rec.width, rec.height),
                "text": gen.text,
                "ok": parse.ok,
                "problems": [p.__dict__ for p in parse.problems],
            }
        )
    return out


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def predict(
    checkpoint: Path,
    images: list[Path],
    out_dir: Path,
    *,
    max_new_tokens: int = 256,
    decoding: Literal["constrained", "free"] = "constrained",
    readout: str = "median",
    score: str = "desc_coord_geomean",
    local_window: int = 8,
    warn: Callable[[str], None] = _warn,
) -> dict[str, Any]:
    """Detect objects in ``images``; writes ``<out_dir>/predictions.json`` and ``<stem>.pred.png`` copies.

    ``decoding: constrained`` (the default, as in ``evaluate``) keeps every answer inside the contract grammar
    with free-text descriptions and the default bounds; ``free`` is plain greedy decoding.

    Returns what ``predictions.json`` holds (see the module docstring). A checkpoint that cannot be
    loaded raises :class:`coordexp.core.checkpoint.CheckpointError` before anything is written; an
    unreadable input is refused (one ``warn`` line naming it) and the others go on.
    """
    det = Detector(checkpoint, local_window=local_window)
    grammar = (
        Grammar(det.tokenizer, det.eos_ids, model_vocab_size(det.model), limits=GrammarLimits())
        if decoding == "constrained"
        else None
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    done: list[dict[str, Any]] = []
    refused: list[dict[str, str]] = []
    drawn_names: set[str] = set()
    for path in images:
        im = read_image(path)
        if isinstance(im, str):
            warn(f"refused {path}: {im}")
            refused.append({"image": str(path), "reason": im})
            continue
        (found,) = detect(det, [im], max_new_tokens, grammar=grammar, readout=readout, score=score)
        objects = found["objects"]
        name = f"{path.stem}.pred.png"
        i = 1
        while name in drawn_names:  # two inputs with one stem (a/x.png, b/x.jpg) keep both drawings
            i += 1
            name = f"{path.stem}-{i}.pred.png"
        drawn_names.add(name)
        draw(im, objects).save(out_dir / name)
        done.append(
            {
                "image": str(path),
                "width": found["width"],
                "height": found["height"],
                "drawn": str(out_dir / name),
                "objects": objects,
                "text": found["text"],
                "ok": found["ok"],
                "problems": found["problems"],
            }
        )
    result = {
        "units": UNITS,
        "coordinates": COORDINATES,
        "checkpoint": str(checkpoint),
        "readout": readout,
        "score": score,
        "images": done,
        "refused": refused,
    }
    write_json(out_dir / "predictions.json", result, sort_keys=False)  # "units" first, objects as listed
    return result
