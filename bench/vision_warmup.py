"""Warm up a base checkpoint's vision tower on dense per-token targets (issue 7, a lever that was measured).

Why: a real base checkpoint arrives with a vision tower that already sees; the tiny random one does not. This
trains the vision tower and merger of BASE (with a throw-away linear head on the merged visual tokens) to predict,
for each merged token, the colour and the shape of the smallest ground-truth box covering the token's centre
(or background) and that box (L1, in image-side units), on the preprocessed train split only, and saves the
result as OUT. Feed OUT to ``bench/grounding_probe.py --ck OUT`` to see whether the decoder then reads the image
sooner (bench/RESULTS.md: it does not, at this scale).

    .venv/bin/python bench/vision_warmup.py artifacts/base /tmp/base_warm 300 2
    (arguments: BASE OUT STEPS [THREADS [LR]]; batch 32)
"""
import sys, torch, random, time, shutil
from pathlib import Path
from PIL import Image
from transformers import AutoProcessor, AutoModelForImageTextToText
from coordexp.contract import read_jsonl
src, dst, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 2); torch.manual_seed(0); random.seed(0)
shutil.copytree(src, dst, dirs_exist_ok=True)
proc = AutoProcessor.from_pretrained(src); model = AutoModelForImageTextToText.from_pretrained(src)
vis = model.model.visual; vis.train()
root = Path("artifacts/preprocess"); recs = read_jsonl(root / "train.jsonl")
COL = {"red": 1, "green": 2, "blue": 3}; SH = {"circle": 1, "rectangle": 2, "triangle": 3, "diamond": 4, "line": 5}

def box(o):
    v = [float(str(x).replace("<|coord_", "").replace("|>", "")) for x in o.values]
    xs, ys = v[0::2], v[1::2]; return min(xs) / 999, min(ys) / 999, max(xs) / 999, max(ys) / 999
def targets(r, g=4):
    col = torch.zeros(g * g, dtype=torch.long); sh = torch.zeros(g * g, dtype=torch.long); bx = torch.zeros(g * g, 4); m = torch.zeros(g * g, dtype=torch.bool)
    objs = [(box(o), o.desc.split()) for o in r.objects]
    for i in range(g):
        for j in range(g):
            cx, cy = (j + 0.5) / g, (i + 0.5) / g
            hit = [(b, d) for b, d in objs if b[0] <= cx <= b[2] and b[1] <= cy <= b[3]]
            if hit:
                b, d = min(hit, key=lambda t: (t[0][2] - t[0][0]) * (t[0][3] - t[0][1]))
                k = i * g + j; col[k] = COL[d[0]]; sh[k] = SH[d[1]]; bx[k] = torch.tensor(b); m[k] = True
    return col, sh, bx, m
head = torch.nn.Linear(vis.merger.linear_fc2.out_features if hasattr(vis.merger, "linear_fc2") else 128, 4 + 6 + 4)
opt = torch.optim.AdamW(list(vis.parameters()) + list(head.parameters()), lr=float(sys.argv[5]) if len(sys.argv) > 5 else 2e-3)
bs = 32; t0 = time.time()
for step in range(steps):
    batch = random.sample(recs, bs)
    ims = [Image.open(root / r.images[0]).convert("RGB") for r in batch]
    enc = proc.image_processor(images=ims, return_tensors="pt")
    out = vis(enc["pixel_values"], grid_thw=enc["image_grid_thw"], return_dict=True)
    f = out.pooler_output  # [B*16, D]
    t = [targets(r) for r in batch]
    col = torch.cat([x[0] for x in t]); sh = torch.cat([x[1] for x in t]); bx = torch.cat([x[2] for x in t]); m = torch.cat([x[3] for x in t])
    y = head(f)
    lc = torch.nn.functional.cross_entropy(y[:, :4], col); ls = torch.nn.functional.cross_entropy(y[:, 4:10], sh)
    lb = (torch.sigmoid(y[m, 10:]) - bx[m]).abs().mean() * 10
    loss = lc + ls + lb
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 50 == 0 or step == steps - 1:
        acc = (y[:, :4].argmax(-1) == col).float().mean().item()
        print(f"step {step} t={time.time()-t0:.0f}s col {lc.item():.3f} acc {acc:.2f} shape {ls.item():.3f} boxL1(px/128) {lb.item()/10*128:.1f}", flush=True)
model.save_pretrained(dst); print("saved", dst)
