"""What training reports when a loss term stops being finite.

A NaN or inf that reaches the optimizer ruins the weights and every later checkpoint, so the
Stage-1 loss checks its terms on every micro-batch (:func:`check_finite`) and stops training with
:class:`NonFiniteLossError` before the optimizer step. The message names the step and the images
of the batch (:func:`batch_images`) and is also written to ``coordexp_failure.txt`` in the
trainer's output folder, where the train stage picks it up for its own error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class NonFiniteLossError(FloatingPointError):
    """A loss term became NaN or inf; training stops before the optimizer step uses it."""


def batch_images(trainer: Any, labels: torch.Tensor, cfg: dict[str, Any]) -> list[str]:
    """The images of a batch, found by matching each row's supervised answer text to the training rows.

    Batches carry no sample ids (ms-swift drops unknown columns), but every answer is the rendered
    JSON of one record, so the decoded labels identify it. Only run when something went wrong.
    """
    rows_file = cfg.get("train_rows")
    tok = getattr(getattr(trainer, "template", None), "tokenizer", None)
    if not rows_file or tok is None or not Path(rows_file).is_file():
        return ["(unknown)"]
    by_answer: dict[str, list[str]] = {}
    for line in Path(rows_file).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answer = next((m["content"] for m in row["messages"] if m["role"] == "assistant"), "")
        by_answer.setdefault(answer.strip(), []).extend(row.get("images", []))
    found = []
    for b in range(labels.shape[0]):
        ids = [int(t) for t in labels[b].tolist() if t != -100]
        text = tok.decode(ids, skip_special_tokens=True).strip()
        found.append(",".join(by_answer.get(text, ["(unmatched)"])))
    return found


def check_finite(
    trainer: Any, res: Any, loss: torch.Tensor, labels: torch.Tensor | None = None, cfg: dict[str, Any] | None = None
) -> None:
    """Raise :class:`NonFiniteLossError` (and write ``coordexp_failure.txt``) if ``loss`` or any
    Stage-1 term of ``res`` is not finite."""
    terms = {"loss": loss, "text_ce": res.text_ce, "soft_ce": res.soft_ce, "w1": res.w1, "gate": res.gate}
    for name in ("text_gate", "coord_ce"):  # the optional terms, when their weight is > 0
        if getattr(res, name, None) is not None:
            terms[name] = getattr(res, name)
    bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())]
    if bad:
        step = getattr(getattr(trainer, "state", None), "global_step", "?")
        try:
            ids = batch_images(trainer, labels, cfg or {}) if labels is not None else None
        except Exception as exc:  # noqa: BLE001 - the diagnosis must not hide the NaN itself
            ids = [f"(could not identify: {exc})"]
        msg = (
            f"non-finite loss term(s) {', '.join(bad)} at step {step} (batch images: {ids}); training "
            f"stopped before the optimizer used it; the last good checkpoint is intact. Lower "
            f"train.learning_rate or check those samples."
        )
        out = getattr(getattr(trainer, "args", None), "output_dir", None)
        if out:
            Path(out).mkdir(parents=True, exist_ok=True)
            (Path(out) / "coordexp_failure.txt").write_text(msg + "\n")
        raise NonFiniteLossError(msg)
