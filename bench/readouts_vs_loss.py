"""What the coord distribution buys at inference: checkpoints side by side, under every readout and score (issue 20).

Each checkpoint is evaluated once, exactly as the evaluate stage does (``coordexp.evaluate.stage.evaluate_checkpoint``:
one generation, decoded as ``evaluate.decoding`` says, every coordinate readout and every object-score definition
measured from it), on the first ``--limit`` records of the val split of this checkout's ``artifacts/preprocess``.
Typical use: the Stage-1 default against the plain-CE baseline trained from the same base for the same steps
(``bench/levers.py --reuse-base ce_baseline`` leaves it in ``/tmp/coordexp-levers/ce_baseline``)::

    .venv/bin/python bench/readouts_vs_loss.py stage1=artifacts/train/final \\
        ce=/tmp/coordexp-levers/ce_baseline/artifacts/train/final --decoding constrained free

Prints one Markdown table per decoding (checkpoint x readout: mAP, mAP50, mAP75, F1@0.5), one of the scores, and
the calibration; appends every result as a JSON line to ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from coordexp.core.config import load_params
from coordexp.core.contract import read_jsonl
from coordexp.evaluate.stage import evaluate_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _f(v: object, nd: int = 3) -> str:
    return "-" if v is None else f"{float(v):.{nd}f}"


def tables(rows: list[dict]) -> str:
    out = [
        "| checkpoint | decoding | parse_rate | readout | bbox_mAP | bbox_mAP50 | bbox_mAP75 | f1_at_0.5 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        for name, v in m["readouts"].items():
            out.append(
                f"| {r['name']} | {m['decoding']} | {_f(m['parse_rate'])} | {name} | {_f(v['bbox_mAP'])} | "
                f"{_f(v['bbox_mAP50'])} | {_f(v['bbox_mAP75'])} | {_f(v['f1_at_0.5'])} |"
            )
    out += [
        "",
        "| checkpoint | decoding | score (readout: headline) | bbox_mAP | bbox_mAP50 |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        m = r["metrics"]
        for name, v in m["scores"].items():
            out.append(
                f"| {r['name']} | {m['decoding']} | {name} ({m['readout']}) | {_f(v['bbox_mAP'])} | "
                f"{_f(v['bbox_mAP50'])} |"
            )
    out += [
        "",
        "| checkpoint | decoding | ECE (raw) | ECE (isotonic, held-out half) | matched share |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        c = r["metrics"]["calibration"]
        out.append(
            f"| {r['name']} | {r['metrics']['decoding']} | {_f(c.get('ece'))} | {_f(c.get('ece_fitted'))} | "
            f"{_f(c.get('matched_rate'))} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="NAME=PATH of each checkpoint folder")
    ap.add_argument("--decoding", nargs="+", default=["constrained"], choices=["constrained", "free"])
    ap.add_argument("--limit", type=int, default=200, help="val records (the embedded default evaluates 200)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/readouts_vs_loss.jsonl"))
    a = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    records = read_jsonl(ROOT / params.preprocess.out_dir / f"{params.evaluate.split}.jsonl")[: a.limit]
    rows = []
    for decoding in a.decoding:
        p = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"decoding": decoding})})
        for spec in a.checkpoints:
            name, path = spec.split("=", 1)
            metrics, _, _, ips = evaluate_checkpoint(p, ROOT, Path(path).resolve(), records)
            row = {"name": name, "checkpoint": path, "images_per_second": ips, "metrics": metrics}
            rows.append(row)
            with a.out.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    print(tables(rows))


if __name__ == "__main__":
    main()
