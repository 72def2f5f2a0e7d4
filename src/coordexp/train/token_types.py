"""Token types of the assistant answer: description, structure, coord.

Stage-1 diagnostics split loss and accuracy by what a token *is*: ``coord`` tokens are
known from the coord id map; ``desc`` tokens are those whose text lies inside the value of a
``"desc"`` key of the JSON answer; everything else (braces, keys, quotes, separators, the end of
turn) is ``structure``. Types come from the teacher-forced labels only, so packing and
truncation cannot confuse them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

DESC = 0
STRUCTURE = 1
COORD = 2
TYPE_NAMES = {DESC: "desc", STRUCTURE: "structure", COORD: "coord"}
PREFIX = "token_type/"

_DESC_VALUE = re.compile(r'"desc"\s*:\s*"((?:[^"\\]|\\.)*)')


class TokenTyper:
    """Classifies supervised label positions; token strings are decoded once per id and cached."""

    def __init__(self, tokenizer: Any, coord_id_map: torch.Tensor):
        self.tokenizer = tokenizer
        self.cmap = coord_id_map.cpu()
        self._text: dict[int, str] = {}

    def _piece(self, token_id: int) -> str:
        piece = self._text.get(token_id)
        if piece is None:
            piece = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._text[token_id] = piece
        return piece

    def types(self, labels: torch.Tensor) -> torch.Tensor:
        """``[B, L]`` aligned labels -> ``[B, L]`` types (-1 where unsupervised)."""
        out = torch.full(labels.shape, -1, dtype=torch.long)
        lab = labels.detach().cpu()
        for b in range(lab.shape[0]):
            pos = torch.nonzero(lab[b] != -100).flatten().tolist()
            if not pos:
                continue
            ids = [int(lab[b, p]) for p in pos]
            pieces = [self._piece(i) for i in ids]
            starts, text = [], ""
            for piece in pieces:
                starts.append(len(text))
                text += piece
            inside = [False] * (len(text) + 1)
            for m in _DESC_VALUE.finditer(text):
                for c in range(m.start(1), m.end(1)):
                    inside[c] = True
            for p, tid, start, piece in zip(pos, ids, starts, pieces):
                if 0 <= tid < self.cmap.numel() and self.cmap[tid] >= 0:
                    out[b, p] = COORD
                elif piece and any(inside[start : start + len(piece)]):
                    out[b, p] = DESC
                else:
                    out[b, p] = STRUCTURE
        return out


@torch.no_grad()
def token_type_metrics(
    typer: TokenTyper, logits: torch.Tensor, labels: torch.Tensor, coord_id_map: torch.Tensor
) -> dict[str, tuple[float, int]]:
    """Loss and accuracy per token type of aligned ``logits [B, L, V]`` / ``labels [B, L]``.

    Returns ``name -> (mean, token count)``. Coord accuracy is the arg-max *bin* over the coord
    slice against the target bin: exact (``coord_acc``) and within two bins (``coord_acc_pm2``).
    """
    types = typer.types(labels).to(logits.device)
    sup = types >= 0
    z = logits[sup].float()
    y = labels.to(logits.device)[sup].long()
    t = types[sup]
    out: dict[str, tuple[float, int]] = {}
    if z.numel() == 0:
        for name in TYPE_NAMES.values():
            out[f"{PREFIX}{name}_loss"] = (0.0, 0)
            out[f"{PREFIX}{name}_acc"] = (0.0, 0)
        out[f"{PREFIX}coord_acc_pm2"] = (0.0, 0)
        return out
    nll = torch.logsumexp(z, dim=-1) - z.gather(1, y[:, None]).squeeze(1)
    hit = (z.argmax(-1) == y).float()
    for code, name in TYPE_NAMES.items():
        m = t == code
        n = int(m.sum())
        out[f"{PREFIX}{name}_loss"] = (float(nll[m].mean()) if n else 0.0, n)
        if code != COORD:  # coord accuracy is measured in bins below
            out[f"{PREFIX}{name}_acc"] = (float(hit[m].mean()) if n else 0.0, n)
    m = t == COORD
    n = int(m.sum())
    if n:
        cmap = coord_id_map.to(logits.device)
        ids = torch.nonzero(cmap >= 0).flatten()
        ids = ids[torch.argsort(cmap[ids])]
        pred_bin = z[m][:, ids].argmax(-1)
        true_bin = cmap[y[m]]
        out[f"{PREFIX}coord_acc"] = (float((pred_bin == true_bin).float().mean()), n)
        out[f"{PREFIX}coord_acc_pm2"] = (float(((pred_bin - true_bin).abs() <= 2).float().mean()), n)
    else:
        out[f"{PREFIX}coord_acc"] = (0.0, 0)
        out[f"{PREFIX}coord_acc_pm2"] = (0.0, 0)
    return out
