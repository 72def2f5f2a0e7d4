import sys, torch, time, random, argparse, math
from pathlib import Path
from transformers import AutoProcessor, AutoModelForImageTextToText
from coordexp.contract import read_jsonl
from coordexp.template import build_messages, to_hf_messages
from coordexp.losses import stage1_loss
from coordexp.vocab import coord_id_map
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--ck", default="artifacts/base"); ap.add_argument("--steps", type=int, default=1000)
ap.add_argument("--lr", type=float, default=1e-3); ap.add_argument("--bs", type=int, default=8)
ap.add_argument("--w", type=float, default=1.0); ap.add_argument("--ce", action="store_true")
ap.add_argument("--every", type=int, default=250); ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--sigma", type=float, default=2.0); ap.add_argument("--save", default=None); ap.add_argument("--root", default="artifacts/preprocess")
a = ap.parse_args(); torch.set_num_threads(a.threads)
torch.manual_seed(0); random.seed(0)
proc = AutoProcessor.from_pretrained(a.ck); tok = proc.tokenizer; tok.padding_side = "right"
model = AutoModelForImageTextToText.from_pretrained(a.ck); model.train()
root = Path(a.root)
train = read_jsonl(root/"train.jsonl"); val = read_jsonl(root/"val.jsonl")[:48]
cmap = coord_id_map(a.ck); c0 = tok.convert_tokens_to_ids("<|coord_0|>")
colour_ids = {tok.convert_tokens_to_ids(t) for t in ("red","green","blue","Ġred","Ġgreen","Ġblue")} - {None, tok.unk_token_id}
def enc(recs, img_recs=None):
    m = []
    for i, r in enumerate(recs):
        row = build_messages(r, root, with_answer=True)
        if img_recs is not None: row["images"] = build_messages(img_recs[i], root, with_answer=True)["images"]
        m.append(to_hf_messages(row))
    inp = proc.apply_chat_template(m, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    ids = inp["input_ids"]; labels = ids.clone(); start = tok.convert_tokens_to_ids("<|im_start|>")
    for b in range(ids.shape[0]):
        pos = (ids[b] == start).nonzero()[-1].item() + 3; labels[b, :pos] = -100
    labels[inp["attention_mask"] == 0] = -100
    return inp, labels
def metrics(inp, labels):
    lg = model(**inp).logits[:, :-1].float(); tg = labels[:, 1:]
    lp = lg.log_softmax(-1); m = tg != -100
    nll = -lp.gather(-1, tg.clamp(min=0)[..., None])[..., 0]
    col = torch.zeros_like(m)
    for c in colour_ids: col |= tg == c
    crd = tg >= c0
    p = lp[..., c0:c0+1000].exp(); p = p / p.sum(-1, keepdim=True)
    eb = (p * torch.arange(1000.)).sum(-1); err = (eb - (tg - c0).float()).abs()
    return nll[m].mean().item(), nll[col].mean().item(), nll[crd].mean().item(), err[crd].mean().item()
vinp, vlab = enc(val); sinp, slab = enc(val, val[1:] + val[:1])


opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
warm = max(1, int(0.05 * a.steps))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, a.steps - warm))))
t0 = time.time(); order = []
for step in range(a.steps + 1):
    if step % a.every == 0 or step == a.steps:
        model.eval()
        with torch.no_grad(): t = metrics(vinp, vlab); s = metrics(sinp, slab)
        model.train()
        print(f"step {step} t={time.time()-t0:.0f}s ce {t[0]:.3f} colour {t[1]:.3f}/{s[1]:.3f} coordNLL {t[2]:.3f}/{s[2]:.3f} coordErr {t[3]:.1f}/{s[3]:.1f}", flush=True)
    if step == a.steps: break
    if not order: order = list(range(len(train))); random.shuffle(order)
    batch = [train[order.pop()] for _ in range(a.bs)]
    inp, lab = enc(batch)
    lg = model(**inp).logits
    tg = torch.nn.functional.pad(lab[:, 1:], (0, 1), value=-100)
    if a.ce:
        l = torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]).float(), tg.reshape(-1), ignore_index=-100)
    else:
        l = stage1_loss(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), cmap, soft_ce_weight=a.w, w1_weight=a.w, gate_weight=a.w, target_sigma=a.sigma).total
    opt.zero_grad(); l.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); sched.step()
if a.save: model.save_pretrained(a.save); proc.save_pretrained(a.save)
