"""Minutes-long, in-process design probe for the embedded default (issue 7): train, then decode.

Why: a full ``dvc repro`` of a lever takes 11 minutes and says only where it ended. This trains a
base checkpoint in-process with the library's Stage-1 loss (or plain CE) on pre-encoded samples
(same chat template as training, same AdamW + cosine schedule + clip 1.0 as the train stage), and
reports along the way:

* teacher-forced, every ``--tf-every`` steps, on 64 val samples, with their true images and with
  the images shifted by one sample (what the model reads from the image, not from the prior):
  NLL of the colour and the shape words, coord NLL, mean |expected bin - target bin| and the
  median |arg-max bin - target bin|;
* greedy decoding at the ``--evals`` steps on ``--neval`` val images, scored by the evaluate
  stage's own code (``bbox_mAP50``, ``parse_rate``, F1 ...), as one JSON line each.

It is a probe, not the pipeline: no ms-swift, no MLflow, no DVC. Numbers agree with the pipeline's
in direction; a lever that looks good here is then confirmed with ``bench/levers.py``.

    .venv/bin/python bench/quick_probe.py --ck artifacts/base --root artifacts/preprocess \\
        --wce 0.1 --ww1 1 --wgate 0.1 --steps 1500 --evals 750,1500 --tag my_lever
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from coordexp.core.config import CoordSoftCEW1Config
from coordexp.core.contract import read_jsonl, record_to_json
from coordexp.core.template import build_messages, to_hf_messages
from coordexp.core.vocab import coord_id_map
from coordexp.evaluate.generate import Detector
from coordexp.evaluate.stage import compute_metrics, predict_records
from coordexp.train.loss import stage1_loss

COLOURS = ("red", "green", "blue")
SHAPES = ("circle", "rectangle", "triangle", "diamond", "line")

LOSS_DEFAULTS = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
"""Temperature and soft-target width of the schema; the three weights come from the command line."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ck", default="artifacts/base", help="base checkpoint")
    ap.add_argument("--root", default="artifacts/preprocess", help="folder with train.jsonl / val.jsonl")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--bs", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wce", type=float, default=1.0, help="soft_ce_weight")
    ap.add_argument("--ww1", type=float, default=1.0, help="w1_weight")
    ap.add_argument("--wgate", type=float, default=1.0, help="gate_weight")
    ap.add_argument("--ce", action="store_true", help="plain full-vocab CE instead of Stage-1")
    ap.add_argument("--evals", default="1500", help="steps at which to decode and score, comma-separated")
    ap.add_argument("--tf-every", type=int, default=250)
    ap.add_argument("--neval", type=int, default=100, help="val images decoded at each eval")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tag", default="probe")
    ap.add_argument("--work", type=Path, default=Path("/tmp/coordexp-probe"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    random.seed(0)

    proc = AutoProcessor.from_pretrained(a.ck)
    tok = proc.tokenizer
    model = AutoModelForImageTextToText.from_pretrained(a.ck)
    model.train()
    root = Path(a.root)
    train = read_jsonl(root / "train.jsonl")
    val = read_jsonl(root / "val.jsonl")[: a.neval]
    cmap = coord_id_map(a.ck)
    start_id = tok.convert_tokens_to_ids("<|im_start|>")
    c0 = tok.convert_tokens_to_ids("<|coord_0|>")

    def encode(rec):
        inp = proc.apply_chat_template(
            [to_hf_messages(build_messages(rec, root, with_answer=True))],
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
        ids = inp["input_ids"][0]
        lab = ids.clone()
        lab[: (ids == start_id).nonzero()[-1].item() + 3] = -100  # supervise the answer only
        return ids, lab, inp["pixel_values"], inp["image_grid_thw"], inp["mm_token_type_ids"][0]

    def collate(items):
        n = max(len(i[0]) for i in items)
        ids = torch.full((len(items), n), tok.pad_token_id)
        lab = torch.full((len(items), n), -100)
        am = torch.zeros((len(items), n), dtype=torch.long)
        mt = torch.zeros((len(items), n), dtype=torch.long)
        for b, it in enumerate(items):
            k = len(it[0])
            ids[b, :k], lab[b, :k], am[b, :k], mt[b, :k] = it[0], it[1], 1, it[4]
        return dict(
            input_ids=ids,
            attention_mask=am,
            mm_token_type_ids=mt,
            pixel_values=torch.cat([i[2] for i in items]),
            image_grid_thw=torch.cat([i[3] for i in items]),
        ), lab

    t0 = time.time()
    cache = [encode(r) for r in train]
    vcache = [encode(r) for r in val[:64]]
    vshift = [(v[0], v[1], vcache[(i + 1) % len(vcache)][2], v[3], v[4]) for i, v in enumerate(vcache)]
    print(f"encoded {len(cache)} samples in {time.time() - t0:.0f}s", flush=True)

    def word_ids(words):
        ids = {tok.convert_tokens_to_ids(t) for w in words for t in (w, "Ġ" + w)}
        return ids - {None, tok.unk_token_id}

    colour_ids, shape_ids = word_ids(COLOURS), word_ids(SHAPES)

    @torch.no_grad()
    def teacher_forced(items):
        model.eval()
        inp, labels = collate(items)
        lp = model(**inp).logits[:, :-1].float().log_softmax(-1)
        tg = labels[:, 1:]
        nll = -lp.gather(-1, tg.clamp(min=0)[..., None])[..., 0]
        is_col = torch.isin(tg, torch.tensor(sorted(colour_ids)))
        is_shp = torch.isin(tg, torch.tensor(sorted(shape_ids)))
        crd = (tg >= c0) & (tg < c0 + 1000)
        p = lp[..., c0 : c0 + 1000].exp()
        p = p / p.sum(-1, keepdim=True)
        err = ((p * torch.arange(1000.0)).sum(-1) - (tg - c0).float()).abs()
        arg_err = (p.argmax(-1) - (tg - c0)).abs().float()
        model.train()
        return (
            nll[is_col].mean().item(),
            nll[is_shp].mean().item(),
            nll[crd].mean().item(),
            err[crd].mean().item(),
            arg_err[crd].median().item(),
        )

    def report_tf(step):
        t, s = teacher_forced(vcache), teacher_forced(vshift)
        names = ("colour", "shape", "coordNLL", "coordErr", "argmaxMedErr")
        print(f"TF step {step} " + " ".join(f"{n} {x:.3f}/{y:.3f}" for n, x, y in zip(names, t, s)), flush=True)

    def decode_and_score(step):
        ck = a.work / a.tag
        model.save_pretrained(ck)
        proc.save_pretrained(ck)
        (ck / "coord_vocab.json").write_text((Path(a.ck) / "coord_vocab.json").read_text())
        t1 = time.time()
        preds, parses, _ = predict_records(
            Detector(ck, device="cpu"), val, root, batch_size=20, max_new_tokens=256, desc="decode"
        )
        m = compute_metrics([record_to_json(r) for r in val], preds, parses)
        keys = ("bbox_mAP50", "bbox_mAP", "parse_rate", "f1_at_0.5", "f1_at_0.3", "recall_at_0.5")
        print(
            json.dumps(
                {
                    "tag": a.tag,
                    "step": step,
                    "t": round(time.time() - t0),
                    "eval_s": round(time.time() - t1),
                    **{k: round(m[k], 4) for k in keys},
                }
            ),
            flush=True,
        )
        model.train()

    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    warm = max(1, int(0.05 * a.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm)))
    )
    evals = {int(x) for x in a.evals.split(",")}
    order: list[int] = []
    t0 = time.time()
    report_tf(0)
    for step in range(1, a.steps + 1):
        if not order:
            order = list(range(len(cache)))
            random.shuffle(order)
        inp, lab = collate([cache[order.pop()] for _ in range(a.bs)])
        logits = model(**inp).logits
        tg = torch.nn.functional.pad(lab[:, 1:], (0, 1), value=-100).reshape(-1)
        flat = logits.reshape(-1, logits.shape[-1])
        if a.ce:
            loss = torch.nn.functional.cross_entropy(flat.float(), tg, ignore_index=-100)
        else:
            loss = stage1_loss(
                flat, tg, cmap, **{**LOSS_DEFAULTS, "soft_ce_weight": a.wce, "w1_weight": a.ww1, "gate_weight": a.wgate}
            ).total
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0:
            print(f"step {step} t={time.time() - t0:.0f}s loss {loss.item():.3f}", flush=True)
        if step % a.tf_every == 0:
            report_tf(step)
        if step in evals:
            decode_and_score(step)


if __name__ == "__main__":
    main()
