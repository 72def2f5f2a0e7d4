"""Dense warm-up of the tiny base model's vision tower (``build_base.tiny.vision_warmup``).

Why: Stage-1 fine-tunes a base checkpoint whose vision encoder already sees. A real Qwen3-VL
arrives that way; the tiny model of ``build_base`` mode ``tiny`` starts random, and measured on
the embedded shapes data its from-scratch ViT is the bottleneck of everything downstream
(bench/RESULTS.md, ``## embedded_default``): trained end to end through the decoder it had not
learnt to tell a rectangle from a diamond after 1,500 steps, and the decoder could not name what it
could not see. This module gives the tiny base what a pretrained checkpoint brings, cheaply: the
vision tower and its merger alone (no decoder, no text) are trained for a few hundred steps on
dense targets taken from the training split, so that every merged visual token - the unit the
decoder attends to - says what it lies on and where that thing is.

Targets, per merged visual token (its centre in image-side units ``(u, v)`` in [0, 1]):

* the class of the smallest training object whose box covers the centre: its ``desc`` among the
  split's distinct descriptions, or background;
* that object's box ``(x1, y1, x2, y2) / (K - 1)`` in bins (L1 through a sigmoid), only where
  there is an object.

A throw-away linear head reads both from the merged tokens and is discarded: only the vision
tower and merger weights change, and the decoder, embeddings and coord tokens stay exactly as
built. The same base serves the Stage-1 run and the plain-CE baseline, so comparisons between
losses stay fair. Deterministic for a given seed (data order, head init, dropout-free model).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from coordexp.core import imaging, paths
from coordexp.core.codec import K, parse_coord_token


def object_boxes(record: Any) -> list[tuple[str, tuple[float, float, float, float]]]:
    """``[(desc, (x1, y1, x2, y2))]`` of a coord-mode record, in bins / (K - 1) (the enclosing box of
    each geometry's points)."""
    out = []
    for obj in record.objects:
        vals = [parse_coord_token(t) / (K - 1) for t in obj.values]
        xs, ys = vals[0::2], vals[1::2]
        out.append((obj.desc, (min(xs), min(ys), max(xs), max(ys))))
    return out


def token_targets(
    boxes: Sequence[tuple[int, tuple[float, float, float, float]]],
    grid_h: int,
    grid_w: int,
) -> tuple[list[int], list[tuple[float, float, float, float] | None]]:
    """Per merged token in raster order: class index + 1 of the smallest box covering its centre (0 =
    background) and that box (None on background). ``boxes`` holds ``(class index, box)`` pairs."""
    classes: list[int] = []
    targets: list[tuple[float, float, float, float] | None] = []
    for i in range(grid_h):
        for j in range(grid_w):
            u, v = (j + 0.5) / grid_w, (i + 0.5) / grid_h
            hits = [(c, b) for c, b in boxes if b[0] <= u <= b[2] and b[1] <= v <= b[3]]
            if hits:
                c, b = min(hits, key=lambda cb: (cb[1][2] - cb[1][0]) * (cb[1][3] - cb[1][1]))
                classes.append(c + 1)
                targets.append(b)
            else:
                classes.append(0)
                targets.append(None)
    return classes, targets


def warm_up_vision(
    model: Any,
    processor: Any,
    records: Sequence[Any],
    image_root: str | Path,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, float]:
    """Train ``model``'s vision tower and merger in place for ``steps`` steps; returns the last
    step's figures (``class_acc`` over all tokens, ``object_class_acc`` over tokens on objects,
    ``box_l1`` in image-side units, ``seconds``).

    AdamW at ``learning_rate`` with a 20-step linear warm-up and a cosine decay to 55% (the head
    starts at zero knowledge; the tower must not be kicked around by its first, random gradients).
    """
    if steps <= 0:
        return {}
    vision = model.model.visual
    descs = sorted({o.desc for r in records for o in r.objects})
    index = {d: i for i, d in enumerate(descs)}
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    width = model.config.text_config.hidden_size
    head = torch.nn.Linear(width, len(descs) + 1 + 4)
    with torch.no_grad():  # seeded init independent of the global RNG
        bound = 1 / math.sqrt(width)
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.zero_()
    params = list(vision.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0)
    warm = 20

    def lr_at(step: int) -> float:
        return min(1.0, (step + 1) / warm) * (0.55 + 0.45 * math.cos(math.pi * step / steps))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    root = Path(image_root)

    def encode(i: int):
        """(pixels, grid, token classes, token boxes, on-object mask) of record i; not cached, so memory
        stays flat whatever the data set's size (decoding is a small part of a step)."""
        rec = records[i]
        with imaging.load(paths.inside(root, rec.images[0], where=f"record {rec.id}: image")) as im:
            enc = processor.image_processor(images=[im.convert("RGB")], return_tensors="pt")
        grid = enc["image_grid_thw"]
        merge = vision.spatial_merge_size
        gh, gw = int(grid[0, 1]) // merge, int(grid[0, 2]) // merge
        cls, boxes = token_targets([(index[d], b) for d, b in object_boxes(rec)], gh, gw)
        on = torch.tensor([b is not None for b in boxes])
        box_t = torch.tensor([b if b is not None else (0.0, 0.0, 0.0, 0.0) for b in boxes])
        return enc["pixel_values"], grid, torch.tensor(cls), box_t, on

    vision.train()
    t0 = time.time()
    figures: dict[str, float] = {}
    bar = tqdm(range(steps), desc="vision warm-up", unit="step", disable=not progress or None)
    order: list[int] = []
    for step in bar:
        if len(order) < batch_size:
            order = list(range(len(records)))
            rng.shuffle(order)
        batch = [encode(order.pop()) for _ in range(min(batch_size, len(records)))]
        pixels = torch.cat([b[0] for b in batch])
        grid = torch.cat([b[1] for b in batch])
        cls = torch.cat([b[2] for b in batch])
        box_t = torch.cat([b[3] for b in batch])
        on = torch.cat([b[4] for b in batch])
        feats = vision(pixels, grid_thw=grid, return_dict=True).pooler_output
        out = head(feats)
        logits, box = out[:, : len(descs) + 1], torch.sigmoid(out[:, len(descs) + 1 :])
        loss_cls = torch.nn.functional.cross_entropy(logits, cls)
        loss_box = (box[on] - box_t[on]).abs().mean() if bool(on.any()) else box.sum() * 0
        loss = loss_cls + 10.0 * loss_box
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(
                f"vision warm-up: non-finite loss at step {step}; lower build_base.tiny.vision_warmup.learning_rate"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            pred = logits.argmax(-1)
            figures = {
                "loss": float(loss),
                "class_acc": float((pred == cls).float().mean()),
                "object_class_acc": float((pred[on] == cls[on]).float().mean()) if bool(on.any()) else 0.0,
                "box_l1": float(loss_box),
            }
        bar.set_postfix(loss=f"{figures['loss']:.3f}", obj_acc=f"{figures['object_class_acc']:.2f}")
    bar.close()
    vision.eval()
    figures["seconds"] = round(time.time() - t0, 2)
    return figures
