"""A checkpoint's teacher-forced coord distributions against the Stage-1 soft target.

The eval report shows, at a few coord positions of one val sample, where the model puts its
probability over the ``K`` bins and where the loss wants it: the target drawn is the row of the
loss's own table (:func:`coordexp.train.loss.soft_target_table`), so the plot and the training
objective cannot disagree.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from transformers import AutoModelForImageTextToText
from transformers.utils import logging as hf_logging

from coordexp.core.codec import K
from coordexp.core.template import encode_record, load_template
from coordexp.core.vocab import coord_id_map
from coordexp.report.figures import grid, note
from coordexp.train.loss import coord_ids_in_bin_order, soft_target_table


def soft_target_row(center: int, sigma: float, truncate: int) -> np.ndarray:
    """The soft target for bin ``center`` as float64 numpy (row ``center`` of the loss's table), for plotting."""
    q, _ = soft_target_table(sigma, truncate)
    return q[center].double().numpy()


def coord_distributions(
    checkpoint: str | Path, record: Any, image_root: str | Path, n_positions: int = 4, temperature: float = 1.0
) -> list[dict[str, Any]]:
    """Teacher-forced coord distributions of ``checkpoint`` on one record.

    Encodes the record with the training template, runs one forward pass, and for the first
    ``n_positions`` coord labels returns ``{"position", "target_bin", "probs"[K], "coord_mass"}``:
    the softmax over the ``K`` coord logits in bin order (temperature as in training), and the
    probability mass the full-vocabulary softmax puts on coord tokens at that position.
    Logits at ``t - 1`` predict the label at ``t`` (swift passes labels unshifted).

    The swift banner, the weight-loading progress bar and ``FutureWarning``s are silenced for the
    call only, and the global torch seed is set inside a forked RNG state: the caller's logging,
    warning filters and random streams are as they were afterwards.
    """
    # lazy: ms-swift is slow to import, and only this forward pass needs it (the plots do not)
    from swift.utils import get_logger

    swift_logger = get_logger()  # initialise swift's logger first, or it resets the level later
    saved = swift_logger.level, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    swift_logger.setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", category=FutureWarning)
            ckpt = Path(checkpoint)
            tpl = load_template(ckpt, mode="train")
            enc = encode_record(tpl, record, image_root)
            batch = tpl.data_collator([enc])
            cmap = coord_id_map(ckpt, tpl.processor.tokenizer if hasattr(tpl.processor, "tokenizer") else None)
            model = AutoModelForImageTextToText.from_pretrained(str(ckpt), local_files_only=True).eval()
            ordered = coord_ids_in_bin_order(cmap)
            labels = batch["labels"][0]
            cpos = [
                int(t) for t in torch.nonzero((labels >= 0) & (cmap[labels.clamp(min=0)] >= 0)).flatten()[:n_positions]
            ]
            inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
            torch.manual_seed(0)
            with torch.no_grad():
                logits = model(**inputs).logits[0].float()
    finally:
        swift_logger.setLevel(saved[0])
        hf_logging.set_verbosity(saved[1])
        if saved[2]:
            hf_logging.enable_progress_bar()
    out = []
    for t in cpos:
        z = logits[t - 1]
        full = torch.softmax(z, dim=-1)
        probs = torch.softmax(z[ordered] / temperature, dim=-1)
        out.append(
            {
                "position": t,
                "target_bin": int(cmap[labels[t]]),
                "probs": probs.numpy().astype(np.float64),
                "coord_mass": float(full[ordered].sum()),
            }
        )
    return out


def plot_coord_distributions(
    dists: Sequence[Mapping[str, Any]], sigma: float, truncate: int, window: int = 60
) -> plt.Figure:
    """Predicted coord distribution (steps) against the soft target (line), zoomed around the GT bin,
    with the full bin range in an inset line so mass far from the target is visible too. The y axis
    is logarithmic: an untrained model's near-uniform ``1/K`` would be invisible next to a peak."""
    floor = 1e-5
    fig, axes = grid(max(1, len(dists)), 2, size=(4.4, 3.0))
    if not dists:
        note(axes[0], "no coord label in the sample")
        return fig
    for ax, d in zip(axes, dists):
        k = d["target_bin"]
        p = np.asarray(d["probs"])
        q = soft_target_row(k, sigma, truncate)
        lo, hi = max(0, k - window), min(len(p) - 1, k + window)
        x = np.arange(lo, hi + 1)
        ax.step(x, np.maximum(p[lo : hi + 1], floor), where="mid", color="C0", lw=1.0, label="predicted")
        ax.plot(
            x,
            np.where(q[lo : hi + 1] > 0, q[lo : hi + 1], np.nan),
            color="C3",
            lw=1.3,
            label=f"target (sigma={sigma:g}, trunc={truncate})",
        )
        ax.axhline(1.0 / len(p), color="0.5", lw=0.6, ls="--", label="uniform")
        ax.set_yscale("log")
        ax.set_ylim(floor, 1.0)
        ax.axvline(k, color="k", lw=0.6, ls=":")
        ax.set_title(
            f"position {d['position']}: GT bin {k}, argmax {int(p.argmax())}, coord mass {d['coord_mass']:.2f}",
            fontsize=7,
        )
        ax.set_xlabel("bin")
        ax.legend(fontsize=6, loc="upper right")
        ins = ax.inset_axes([0.03, 0.66, 0.3, 0.3])
        ins.plot(np.arange(len(p)), p, color="C0", lw=0.6)
        ins.axvline(k, color="C3", lw=0.6)
        ins.set_xticks([0, K - 1])
        ins.set_yticks([])
        ins.tick_params(labelsize=5)
    fig.tight_layout()
    return fig
