"""Stage-1 loss: text CE + coord softCE + W1 + coord-vocab gate (+ two optional terms), from one set of logits.

``z`` is a row of full-vocab logits (upcast to fp32), ``K = 1000`` coord bins (``<|coord_0|>`` ..
``<|coord_999|>``), ``s = z[coord ids in bin order]`` the coord slice of the row, ``T`` the
temperature, ``k*`` the target bin, ``sigma`` / ``truncate`` the width and radius (in bins) of the
soft target, ``lse`` the log-sum-exp.

* text rows (target is a non-coord id):  CE   = lse(z) - z[y]
* coord rows (target is ``<|coord_k*|>``):
    p = softmax(s / T)                                       (the predicted bin distribution)
    q_i ∝ exp(-0.5 ((i - k*) / sigma)^2) for |i - k*| <= truncate, else 0   (truncate 0 = one-hot)
    softCE = -sum_i q_i log p_i            = lse(s/T) - sum_i q_i s_i / T
    W1     = sum_i |CDF_p(i) - CDF_q(i)| / (K - 1),  CDF_p(i) = sum_{j <= i} p_j
    gate   = lse(z/T) - lse(s/T)  >= 0     (= -log coord-vocab mass; round-off clamped at 0)
    coord_vocab_mass = exp(-gate)          (the share of softmax(z / T) on the coord tokens)
* optional, each computed only when its weight is > 0 (0 by default: the spec's loss):
    text rows:  text_gate = -log(1 - m),  m = coord-vocab mass of softmax(z / T)
                          = softplus(lse(s/T) - lse(z_nc/T))   (z_nc: the non-coord columns)
      the original CoordExp recipe's penalty on coord mass where text is due. Why softplus of
      that difference: both log-sum-exps are direct, so it is exact as m -> 0 (softplus(x) ~ e^x)
      and as m -> 1 (~ x), where -log1p(-exp(-gate)) would take the log of a round-off difference.
    coord rows: coord_ce = lse(z) - z[y]   (the hard full-vocab CE at T = 1, mixed back in)
* each term is a mean over the tokens of its kind (text CE and text gate over text rows, the
  others over coord rows; a kind with no tokens gives 0), and
  total = CE_text + text_gate_weight text_gate
          + soft_ce_weight softCE + w1_weight W1 + gate_weight gate + coord_ce_weight coord_ce

Coord-distribution diagnostics (``coord_diag=True``; :func:`coord_diagnostics`), no gradient, from the
same ``p = softmax(s / T)`` of the coord rows, per row and then a mean over the coord tokens like the terms:
``top1_acc`` (arg-max bin == k*), ``top5_acc``, ``within2_acc`` (|arg-max bin - k*| <= 2), ``p_target``
(p[k*]), ``expected_mae`` (|sum_i i p_i - k*|) and ``spread`` (the std of p, in bins). They tell whether
the coord heads learn where the loss terms cannot: a soft CE can fall while the arg-max stays put.

Why a custom autograd Function: the only ``[N, V]`` work is one logsumexp per supervised row
(``lse(z)`` for text rows, ``lse(z/T)`` for coord rows, shared by CE and gate), plus gathering
the target logit and the 1000-column coord slice. :class:`_RowStats` does exactly that, row-chunk
by row-chunk so that no ``[N, V]`` fp32 temporary is ever allocated, and saves only the logits
(by reference) and one float per row. Its backward rebuilds ``softmax(z/T)`` chunk by chunk and
writes the gradient straight into a single ``[N, V]`` buffer (fused softmax kernels both ways).
Everything downstream of the row statistics (softCE, W1, gate on ``[n_coord, K]``) is ordinary
autograd on small tensors, so gradients stay exact. Plain ``F.cross_entropy`` by contrast
materialises the ``[N, V]`` log-softmax and a dense ``[N, V]`` NLL gradient. The optional terms
add, only for the rows that need it, a second log-softmax in the same chunk pass (text gate: the
text rows at ``1/T`` with the coord columns masked; hard CE at ``T != 1``: the coord rows at T = 1;
at T = 1 the hard CE reuses the coord rows' own pass) and, for the text gate, the ``[n_text, K]``
coord slice of the text rows; the backward adds the second softmax into the same ``[N, V]``
gradient buffer.

Global reduction (gradient accumulation x data parallel), see :func:`global_counts`: each term is
a mean over the tokens of its kind in the *global* batch. The trainer counts tokens over all its
micro-batches, all-reduces the counts (unconditionally, on every rank), and passes the result as
``normalizer=``; then ``total`` of a micro-batch is

    world_size * ((text_ce_sum + text_gate_weight text_gate_sum) / n_text
                  + (soft_ce_weight softCE_sum + w1_weight W1_sum + gate_weight gate_sum
                     + coord_ce_weight coord_ce_sum) / n_coord)

with ``n_text`` / ``n_coord`` the global counts clamped at >= 1 and the ``*_sum`` over this
micro-batch's own rows, whose gradients, summed over micro-batches and averaged over ranks (as
DDP does), equal the gradient of the global-batch mean on one rank.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from coordexp.core.codec import K

__all__ = [
    "COORD_DIAG",
    "COORD_DIAG_PREFIX",
    "IGNORE_INDEX",
    "OPTIONAL_TERMS",
    "GlobalCounts",
    "Stage1LossResult",
    "coord_diagnostics",
    "coord_ids_in_bin_order",
    "count_tokens",
    "global_counts",
    "soft_target_table",
    "stage1_loss",
]

IGNORE_INDEX: int = -100
"""Label value of unsupervised positions (the HF / ms-swift convention)."""

OPTIONAL_TERMS: tuple[str, ...] = ("text_gate", "coord_ce")
"""The terms computed (and logged) only when their weight is > 0: ``text_gate_weight``, ``coord_ce_weight``."""

COORD_DIAG: tuple[str, ...] = ("top1_acc", "top5_acc", "within2_acc", "p_target", "expected_mae", "spread")
"""The coord-distribution diagnostics, in the column order of :func:`coord_diagnostics`."""

COORD_DIAG_PREFIX = "coord_diag/"
"""Metric prefix of the diagnostics (``coord_diag/top1_acc``, ...; ``eval_coord_diag/...`` in evaluation)."""

_CHUNK_ELEMS = 1 << 23
"""Elements per row chunk (~32 MB of fp32, ~55 rows at V = 152k): big enough to amortise per-op
overhead and keep both threads of a row-parallel kernel busy, small enough that the two
workspaces stay small and memory never grows with N."""


# --------------------------------------------------------------------------------------------
# Results and global normalisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GlobalCounts:
    """Token counts of a whole optimizer step (all micro-batches, all ranks).

    ``world_size`` is the data-parallel degree the counts were reduced over: DDP *averages*
    gradients over ranks, so each rank's loss is multiplied by it to recover a global sum.
    ``micro_batches`` is how many micro-batches each rank counted (the step's gradient
    accumulation); only the logging uses it (a micro-batch is ``1 / (world_size * micro_batches)``
    of the step), never the loss.
    """

    text_tokens: int
    coord_tokens: int
    world_size: int = 1
    micro_batches: int = 1

    @property
    def text_denominator(self) -> float:
        """Global text-token count clamped at 1 (a step without text tokens gives 0, not NaN)."""
        return float(max(self.text_tokens, 1))

    @property
    def coord_denominator(self) -> float:
        """Global coord-token count clamped at 1."""
        return float(max(self.coord_tokens, 1))


@dataclass
class Stage1LossResult:
    """All the numbers a trainer needs from one call.

    The per-term means (``text_ce``, ``soft_ce``, ``w1``, ``gate``, ``coord_vocab_mass``) are
    over this call's own tokens, 0 (attached to the graph) when it has none; they are for
    logging. ``total`` is the loss to backpropagate: the batch-local weighted sum of means, or,
    with ``normalizer=``, this micro-batch's share of the globally normalised loss. The ``*_sum``
    fields are the raw sums over this call's tokens, for callers that reduce themselves.

    The optional terms ``text_gate`` (over the text tokens) and ``coord_ce`` (over the coord tokens)
    and their sums are None when their weight is 0: they are then not computed at all (each costs
    an extra pass over the vocabulary for its rows), and not logged.
    """

    total: torch.Tensor
    text_ce: torch.Tensor
    soft_ce: torch.Tensor
    w1: torch.Tensor
    gate: torch.Tensor
    coord_vocab_mass: torch.Tensor
    coord_tokens: int
    text_tokens: int
    text_ce_sum: torch.Tensor
    soft_ce_sum: torch.Tensor
    w1_sum: torch.Tensor
    gate_sum: torch.Tensor
    mass_sum: torch.Tensor
    text_gate: torch.Tensor | None = None
    """Mean of ``-log(1 - coord-vocab mass)`` over the text tokens; None when ``text_gate_weight`` is 0."""
    coord_ce: torch.Tensor | None = None
    """Mean hard full-vocabulary CE over the coord tokens; None when ``coord_ce_weight`` is 0."""
    text_gate_sum: torch.Tensor | None = None
    coord_ce_sum: torch.Tensor | None = None
    argmax: torch.Tensor | None = None
    """Predicted token id per position of the flattened labels (-100 where not supervised). Only the
    fused loss sets it: its caller has no logits to take the argmax of (token accuracy)."""
    mode: str | None = None
    """Which chunking the fused loss ran, ``"vocab"`` or ``"rows"`` (what ``mode="auto"`` picked);
    None from :func:`stage1_loss`, which has no LM head to chunk."""
    coord_diag: torch.Tensor | None = None
    """``[len(COORD_DIAG)]`` means of the coord-distribution diagnostics over this call's coord tokens
    (0 without any), detached; None unless asked for (``coord_diag=True``)."""
    coord_diag_sum: torch.Tensor | None = None
    """The same as sums over this call's coord tokens, for callers that reduce themselves."""

    def log_dict(self, prefix: str = "coord_softce_w1/") -> dict[str, float]:
        """Detached floats under the metric names the trainer logs (``coord_softce_w1/...``); the
        optional terms only when their weight is > 0."""
        out = {
            f"{prefix}loss": float(self.total.detach()),
            f"{prefix}text_ce": float(self.text_ce.detach()),
            f"{prefix}soft_ce": float(self.soft_ce.detach()),
            f"{prefix}w1": float(self.w1.detach()),
            f"{prefix}gate": float(self.gate.detach()),
            f"{prefix}coord_vocab_mass": float(self.coord_vocab_mass.detach()),
            f"{prefix}coord_tokens": float(self.coord_tokens),
        }
        for name in OPTIONAL_TERMS:
            value = getattr(self, name)
            if value is not None:
                out[f"{prefix}{name}"] = float(value.detach())
        if self.coord_diag is not None:
            out.update(zip((f"{COORD_DIAG_PREFIX}{n}" for n in COORD_DIAG), self.coord_diag.tolist()))
        return out


# --------------------------------------------------------------------------------------------
# Vocabulary map, soft targets, token counts
# --------------------------------------------------------------------------------------------


def coord_ids_in_bin_order(coord_id_map: torch.Tensor, vocab_size: int | None = None) -> torch.Tensor:
    """Token ids of ``<|coord_0|>`` .. ``<|coord_999|>`` in bin order, after validating the map.

    ``coord_id_map`` must be an integer tensor of shape ``[V]`` holding each bin 0..K-1 exactly
    once and -1 everywhere else; anything else is a ``ValueError`` naming the problem.
    """
    if not isinstance(coord_id_map, torch.Tensor) or coord_id_map.dim() != 1:
        raise ValueError("coord_id_map must be a 1-D LongTensor of size V")
    if coord_id_map.dtype.is_floating_point or coord_id_map.dtype == torch.bool:
        raise ValueError(f"coord_id_map must be an integer tensor, got {coord_id_map.dtype}")
    if vocab_size is not None and coord_id_map.numel() != vocab_size:
        raise ValueError(f"coord_id_map has {coord_id_map.numel()} entries but the logits have V={vocab_size}")
    cmap = coord_id_map.long()
    if bool(((cmap < -1) | (cmap >= K)).any()):
        raise ValueError(f"coord_id_map values must be -1 or a bin in [0, {K - 1}]")
    ids = torch.nonzero(cmap >= 0).flatten()
    if ids.numel() != K:
        raise ValueError(f"coord_id_map must hold exactly {K} coord bins, found {ids.numel()}")
    bins = cmap[ids]
    ordered = torch.full((K,), -1, dtype=torch.long, device=cmap.device)
    ordered[bins] = ids
    if bool((ordered < 0).any()):
        raise ValueError(f"coord_id_map must map each bin 0..{K - 1} exactly once")
    return ordered


@functools.lru_cache(maxsize=32)
def _soft_target_table_cached(sigma: float, truncate: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(K, dtype=torch.float64)
    d = i[None, :] - i[:, None]  # d[k*, i] = i - k*
    w = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= truncate)
    q = w / w.sum(dim=1, keepdim=True)
    cdf = torch.cumsum(q, dim=1)
    return q.float().to(device), cdf.float().to(device)


def soft_target_table(
    sigma: float, truncate: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, CDF_Q)``, both ``[K, K]`` fp32: row ``k*`` is the soft target ``q`` for bin ``k*`` and
    its CDF. Built in fp64 once per ``(sigma, truncate, device)`` and cached (8 MB per entry), so
    a training step only gathers rows."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise ValueError(f"target_sigma must be a positive finite number, got {sigma}")
    if int(truncate) != truncate or truncate < 0:
        raise ValueError(f"target_truncate must be an integer >= 0, got {truncate}")
    return _soft_target_table_cached(float(sigma), int(truncate), str(torch.device(device)))


@torch.no_grad()
def coord_diagnostics(
    log_p: torch.Tensor, k_star: torch.Tensor, p: torch.Tensor | None = None, argmax: torch.Tensor | None = None
) -> torch.Tensor:
    """``[n, len(COORD_DIAG)]``: the diagnostics of each coord row, from its predicted bin distribution
    ``log_p = log_softmax(s / T)`` (``[n, K]``) and its target bin ``k_star`` (``[n]``); no gradient.
    ``p = log_p.exp()`` and ``argmax`` (the arg-max bin per row) where the caller has them already (the W1
    term has ``p``; the loss's anchor is the arg-max), else computed here: on the CPU an ``argmax`` over
    ``[n, K]`` costs as much as all the rest.

    The arg-max is the first maximum (``torch.argmax``'s rule), so a tie counts for the lower bin, and
    the top-5 rank follows the same order (a bin ranks above the target if it is more probable, or as
    probable and lower). Ranks are read in log space, where a far tail stays distinct instead of
    underflowing to tied zeros; the rank is counted exactly only on the rare rows where a tie with the
    target straddles 5th place (elsewhere ``#(log_p > log_p[k*]) >= 5`` or ``#(log_p >= log_p[k*]) <= 5``
    decides). The expected bin is ``p @ bins``, the spread ``sqrt(sum_i p_i (i - E)^2)`` (two passes:
    ``E[i^2] - E^2`` would cancel to noise for a point mass far from bin 0). Cost: a few elementwise
    passes over ``[n, K]`` (bench/RESULTS.md, ``## coord_diag_overhead``), nothing over ``[n, V]``. The
    comparisons are written as 0/1 floats into one workspace and summed: a sum over a bool tensor would
    first copy it to int64.
    """
    log_p = log_p.detach()
    n, k = log_p.shape
    tgt = k_star[:, None]
    lp_t = log_p.gather(1, tgt)
    ws = torch.empty_like(log_p)
    above = torch.gt(log_p, lp_t, out=ws).sum(1)  # strictly more probable bins
    top5 = (above < 5) & (torch.ge(log_p, lp_t, out=ws).sum(1) <= 5)
    straddle = torch.nonzero((above < 5) & ~top5).flatten()
    if straddle.numel():  # ties with the target across 5th place: count the lower tied bins too
        lower = torch.arange(k, device=log_p.device) < tgt[straddle]
        ties = ((log_p[straddle] == lp_t[straddle]) & lower).sum(1)
        top5[straddle] = above[straddle] + ties < 5
    argmax = log_p.argmax(1) if argmax is None else argmax
    p = log_p.exp() if p is None else p.detach()
    bins = torch.arange(k, device=p.device, dtype=p.dtype)
    expected = p @ bins
    spread = torch.sub(bins, expected[:, None], out=ws).square_().mul_(p).sum(1).sqrt_()
    return torch.stack(
        [
            (argmax == k_star).to(p.dtype),
            top5.to(p.dtype),
            ((argmax - k_star).abs() <= 2).to(p.dtype),
            lp_t.squeeze(1).exp(),
            (expected - k_star.to(p.dtype)).abs(),
            spread,
        ],
        dim=1,
    )


def _masks(labels: torch.Tensor, cmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(supervised, coord, bin) for labels of any shape; ``bin`` is -1 off coord positions."""
    sup = labels != IGNORE_INDEX
    safe = torch.where(sup, labels, torch.zeros_like(labels))
    bins = torch.where(sup, cmap.to(labels.device)[safe], torch.full_like(labels, -1))
    return sup, bins >= 0, bins


def count_tokens(labels: torch.Tensor, coord_id_map: torch.Tensor) -> tuple[int, int]:
    """``(text_tokens, coord_tokens)`` of ALIGNED labels: supervised (!= -100) positions whose
    target is a non-coord id, and those whose target is a coord id."""
    sup, is_coord, _ = _masks(labels.long(), coord_id_map.long())
    n_coord = int(is_coord.sum())
    return int(sup.sum()) - n_coord, n_coord


def global_counts(
    labels_list: Sequence[torch.Tensor] | torch.Tensor,
    coord_id_map: torch.Tensor,
    *,
    all_reduce: bool = True,
    group: object | None = None,
) -> GlobalCounts:
    """Count text and coord tokens over all micro-batches of an optimizer step, then sum over
    data-parallel ranks.

    Call it on EVERY rank before the step's first micro-batch. When ``all_reduce`` is true and
    torch.distributed is initialised it issues exactly one ``all_reduce`` whatever the local
    counts (a rank with no coord tokens still participates, so no rank can hang), and
    ``world_size`` is the group's size; otherwise counts are local and ``world_size`` is 1.
    """
    if isinstance(labels_list, torch.Tensor):
        labels_list = [labels_list]
    text = coord = 0
    for labels in labels_list:
        t, c = count_tokens(labels, coord_id_map)
        text += t
        coord += c
    world = 1
    if all_reduce and dist.is_available() and dist.is_initialized():
        backend = dist.get_backend(group)
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        buf = torch.tensor([text, coord], dtype=torch.int64, device=device)  # exact at any count
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        text, coord = int(buf[0]), int(buf[1])
        world = dist.get_world_size(group)
    return GlobalCounts(text_tokens=text, coord_tokens=coord, world_size=world, micro_batches=len(labels_list))


# --------------------------------------------------------------------------------------------
# The one [N, V] pass
# --------------------------------------------------------------------------------------------


def _plan(rows: torch.Tensor, v: int) -> list[tuple[int, int, int | None]]:
    """Chunks ``(a, b, r0)`` of the sorted supervised-row list: positions ``a..b`` of ``rows``;
    ``r0`` is the first row when ``rows[a:b]`` are consecutive (the chunk is then a view of the
    logits, no copy), else ``None`` (the chunk is gathered into a workspace)."""
    step = max(1, _CHUNK_ELEMS // max(v, 1))
    idx = rows.tolist()
    out: list[tuple[int, int, int | None]] = []
    for a in range(0, len(idx), step):
        b = min(a + step, len(idx))
        out.append((a, b, idx[a] if idx[b - 1] - idx[a] == b - a - 1 else None))
    return out


def _load(z2: torch.Tensor, rows: torch.Tensor, a: int, b: int, r0: int | None, ws: torch.Tensor) -> torch.Tensor:
    """Rows ``rows[a:b]`` of ``z2`` as fp32 ``[b - a, V]``: a view when possible, else a copy
    into the workspace ``ws`` (so no allocation per chunk)."""
    n = b - a
    if r0 is not None:
        view = z2[r0 : r0 + n]
        return view if view.dtype == torch.float32 else ws[:n].copy_(view)
    if z2.dtype == torch.float32:
        return torch.index_select(z2, 0, rows[a:b], out=ws[:n])
    return ws[:n].copy_(z2.index_select(0, rows[a:b]))


class _RowStats(torch.autograd.Function):
    """The only ``[N, V]`` work: one log-softmax per supervised row, read at one "anchor" column,
    plus, only for the rows an optional term needs, a second one.

    Inputs: flat logits ``z2 [N, V]`` (any float dtype), the sorted supervised rows, which of
    them are coord rows, the text targets, the coord ids in bin order, ``inv_t = 1/T``, and two
    switches: ``text_gate`` (the text rows need their coord-vocab mass) and ``coord_ce`` (the coord
    rows need the hard CE at T = 1). With ``a = 1`` for text rows and ``1/T`` for coord rows,
    returns fp32

    * ``rel [n_sup]`` = lse(a z_r) - a z_r[c_r] = -log_softmax(a z_r)[c_r], with anchor column
      ``c_r = y_r`` for text rows (so ``rel`` IS the text CE) and ``c_r = coord id of argmax s_r``
      for coord rows (so ``gate = rel - lse((s - s[t]) / T)``, a difference of small numbers)
    * ``s [n_slice, K]`` = z_r[coord ids in bin order] (raw, not divided by T) of the coord rows,
      and of the text rows too with ``text_gate`` (then ``n_slice = n_sup``, in row order)
    * ``anchor [n_coord]`` = argmax bin of ``s_r`` (not differentiable)
    * ``rel2 [n_sup]``, the second log-softmax, 0 on rows that need none: with ``text_gate``, on
      text rows ``lse_nc((z_r - n_r) / T)``, the log-sum-exp over the NON-coord columns only, with
      ``n_r`` the row's largest non-coord logit (``text_gate = softplus(lse((s - n) / T) - rel2)``);
      with ``coord_ce`` and ``T != 1``, on
      coord rows ``lse(z_r - s_max) = lse(z_r) - z_r[c_r]`` at T = 1 (at T = 1 that is ``rel``
      itself and no second pass runs)
    * ``shift2 [n_sup]`` = the constant ``rel2`` is anchored at (``n_r`` on text rows, ``s_max``
      on coord rows; not differentiable)

    Why log-softmax read at an anchor: it is torch's fused row kernel (max, sum-exp, write in one
    pass over a cache-resident row), and ``(a z_c - max) - log sum`` keeps a relative error of a
    few ulp even when ``|z| / T`` is 2e5, where a plain fp32 ``lse(z / T)`` is already off by
    ``ulp(2e5) ~ 0.016``. Rows go through in chunks of ~``_CHUNK_ELEMS`` elements, as views of
    the logits where the rows are consecutive, with two reused workspaces (a third for the
    second pass): nothing ``[N, V]`` is allocated or saved in the forward (the logits are saved
    by reference).

    Backward, exact: for text rows d rel / d z = softmax(z) - e_y. For coord rows the anchor is a
    constant: d rel / d z = softmax(z / T) / T; the caller subtracts the same constant from
    ``lse(s / T)`` (and log_softmax is shift-invariant), so it cancels in every term, and not
    differentiating it on either side avoids an ``eps * sum|grad|`` round-off spike at the argmax.
    ``rel2``'s anchors are constants in the same way: d rel2 / d z = a2 softmax(y2) of its own
    (masked, scaled) row ``y2``, rebuilt in place as ``exp(y2 - rel2)`` (``y2`` is 0 at its anchor
    column, so ``rel2`` is its log-sum-exp) and added to the row's gradient before it is stored.
    Each chunk's softmax is written straight into the ``[N, V]`` gradient (a fused kernel again);
    the gathered slice ``s`` scatters back; rows not supervised get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, z2, rows, is_coord, text_tgt, coord_ids, inv_t: float, text_gate: bool, coord_ce: bool):
        n_rows, v = z2.shape
        dev = z2.device
        n = rows.numel()
        plan = _plan(rows, v)
        cum = [0] + torch.cumsum(is_coord.long(), 0).tolist()
        n_c = cum[-1]
        scaled = inv_t != 1.0 and n_c > 0
        scale = torch.where(is_coord, inv_t, 1.0).to(torch.float32)[:, None]
        tcol = text_tgt.clone()  # anchor column per supervised row; coord rows filled below
        shift = torch.zeros(n, 1, dtype=torch.float32, device=dev)  # s_max on coord rows
        rel = torch.empty(n, dtype=torch.float32, device=dev)
        s = torch.empty(n if text_gate else n_c, K, dtype=torch.float32, device=dev)
        anchor = torch.empty(n_c, dtype=torch.long, device=dev)
        # the second log-softmax: text rows at 1/T without the coord columns, coord rows at T = 1
        extra = (~is_coord & text_gate) | (is_coord & (coord_ce and inv_t != 1.0))
        scale2 = torch.where(is_coord, 1.0, inv_t).to(torch.float32)[:, None]
        shift2 = torch.zeros(n, 1, dtype=torch.float32, device=dev)
        tcol2 = torch.zeros(n, dtype=torch.long, device=dev)  # the second pass's anchor column
        rel2 = torch.zeros(n, dtype=torch.float32, device=dev)
        rows_per = max((b - a for a, b, _ in plan), default=0)
        ws_in = torch.empty(rows_per, v, dtype=torch.float32, device=dev)
        ws_out = torch.empty_like(ws_in)
        ws_x = torch.empty_like(ws_in) if bool(extra.any()) else None
        for a, b, r0 in plan:
            x = _load(z2, rows, a, b, r0, ws_in)
            ca, cb = cum[a], cum[b]
            sc_all = x.index_select(1, coord_ids) if (cb > ca or text_gate) else None
            if text_gate:
                s[a:b] = sc_all
            if cb > ca:
                local = torch.nonzero(is_coord[a:b]).flatten()
                sc = sc_all[local]
                s_max, t = sc.max(dim=1)
                shift[a + local, 0] = s_max
                shift2[a + local, 0] = s_max
                if not text_gate:
                    s[ca:cb] = sc
                anchor[ca:cb] = t
                tcol[a + local] = coord_ids[t]
                tcol2[a + local] = coord_ids[t]
            if ws_x is not None:
                sel = torch.nonzero(extra[a:b]).flatten()
                if sel.numel():
                    y2 = _second_rows(x, sel, a, shift2, scale2, is_coord, coord_ids, ws_x, tcol2)
                    lsm2 = torch.log_softmax(y2, 1, out=ws_out[: sel.numel()])
                    rel2[a + sel] = lsm2.gather(1, tcol2[a + sel, None]).squeeze(1).neg_()
            if scaled:
                # (z - s_max) / T, not z / T - s_max / T: the difference first is exact near the
                # maximum, so the exponent's error is eps * (its own size), not eps * |z| / T
                y = torch.sub(x, shift[a:b], out=ws_out[: b - a]).mul_(scale[a:b])
                lsm = torch.log_softmax(y, 1, out=ws_in[: b - a])
            else:
                lsm = torch.log_softmax(x, 1, out=ws_out[: b - a])
            rel[a:b] = lsm.gather(1, tcol[a:b, None]).squeeze(1).neg_()
        ctx.save_for_backward(z2, rows, is_coord, tcol, coord_ids, scale, shift, extra, scale2, shift2, rel2)
        ctx.plan, ctx.cum, ctx.scaled, ctx.text_gate = plan, cum, scaled, text_gate
        ctx.mark_non_differentiable(anchor, shift2)
        return rel, s, anchor, rel2, shift2.squeeze(1)

    @staticmethod
    def backward(ctx, g_rel, g_s, _g_anchor, g_rel2, _g_shift2):
        z2, rows, is_coord, tcol, coord_ids, scale, shift, extra, scale2, shift2, rel2 = ctx.saved_tensors
        plan, cum, scaled, text_gate = ctx.plan, ctx.cum, ctx.scaled, ctx.text_gate
        n_rows, v = z2.shape
        grad = torch.empty((n_rows, v), dtype=z2.dtype, device=z2.device)
        nones = (None,) * 7
        if rows.numel() < n_rows:
            unsup = torch.ones(n_rows, dtype=torch.bool, device=z2.device)
            unsup[rows] = False
            grad.index_fill_(0, torch.nonzero(unsup).flatten(), 0)
        if rows.numel() == 0:
            return (grad, *nones)
        if g_rel is None:
            g_rel = torch.zeros_like(rel2)
        coef = (g_rel[:, None] * scale).contiguous()  # g for text rows, g / T for coord rows
        minus_g_text = torch.where(is_coord, 0.0, -g_rel)[:, None]
        if g_rel2 is not None and bool(extra.any()):
            extra = extra & (g_rel2 != 0)
            coef2 = g_rel2[:, None] * scale2
        else:
            extra = torch.zeros_like(extra)
        rows_per = max(b - a for a, b, _ in plan)
        ws_in = torch.empty(rows_per, v, dtype=torch.float32, device=z2.device)
        ws_out = torch.empty_like(ws_in)
        ws_x = torch.empty_like(ws_in) if bool(extra.any()) else None
        for a, b, r0 in plan:
            n = b - a
            x = _load(z2, rows, a, b, r0, ws_in)
            sel = torch.nonzero(extra[a:b]).flatten() if ws_x is not None else None
            if sel is not None and sel.numel():
                # a2 softmax(y2) = a2 exp(y2 - rel2), built in place while x is still loaded
                y2 = _second_rows(x, sel, a, shift2, scale2, is_coord, coord_ids, ws_x)
                y2.sub_(rel2[a + sel, None]).exp_().mul_(coef2[a + sel])
            if scaled:
                x = torch.sub(x, shift[a:b], out=ws_out[:n]).mul_(scale[a:b])
            direct = r0 is not None and grad.dtype == torch.float32
            dest = grad[r0 : r0 + n] if direct else (ws_in[:n] if scaled else ws_out[:n])
            torch._softmax(x, 1, False, out=dest)  # fused softmax, written in place of the grad
            dest.mul_(coef[a:b])
            dest.scatter_add_(1, tcol[a:b, None], minus_g_text[a:b])
            if g_s is not None:
                if text_gate:
                    dest.index_add_(1, coord_ids, g_s[a:b])
                else:
                    ca, cb = cum[a], cum[b]
                    if cb > ca:
                        local = torch.nonzero(is_coord[a:b]).flatten()
                        dest.index_put_((local[:, None], coord_ids[None, :]), g_s[ca:cb], accumulate=True)
            if sel is not None and sel.numel():
                dest.index_add_(0, sel, y2)
            if not direct:
                if r0 is not None:
                    grad[r0 : r0 + n].copy_(dest)
                else:
                    grad.index_copy_(0, rows[a:b], dest.to(grad.dtype))
        return (grad, *nones)


def _second_rows(
    x: torch.Tensor,
    sel: torch.Tensor,
    a: int,
    shift2: torch.Tensor,
    scale2: torch.Tensor,
    is_coord: torch.Tensor,
    coord_ids: torch.Tensor,
    ws: torch.Tensor,
    tcol2: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y2 = a2 (z - shift2)`` of the chunk rows ``sel`` (offset ``a`` in the supervised rows) into
    the workspace ``ws``, with the coord columns of text rows at ``-inf`` (their log-sum-exp is over
    the non-coord vocabulary): the row the second log-softmax of :class:`_RowStats` runs on.

    With ``tcol2`` (the forward) the text rows' ``shift2`` and anchor column ``tcol2`` are set here to
    their largest non-coord logit and its column. Why that anchor: ``rel2`` is then an O(log V)
    number read where ``y2 = 0``, and the text gate's ``lse((s - shift2) / T)`` is large only when the
    gate is; anchored at ``z[y]`` both would carry ``eps |z[y] - max| / T`` of round-off whatever
    the gate's size."""
    m = sel.numel()
    y2 = ws[:m].copy_(x) if m == x.shape[0] else torch.index_select(x, 0, sel, out=ws[:m])
    txt = torch.nonzero(~is_coord[a + sel]).flatten()
    if txt.numel():
        y2.index_put_((txt[:, None], coord_ids[None, :]), torch.tensor(float("-inf"), device=y2.device))
        if tcol2 is not None:
            top, col = y2.max(dim=1)  # coord rows' maxima are not used
            shift2[a + sel[txt], 0] = top[txt]
            tcol2[a + sel[txt]] = col[txt]
    y2.sub_(shift2[a + sel]).mul_(scale2[a + sel])
    return y2


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def check_labels_and_weights(
    labels: torch.Tensor,
    ref: torch.Tensor,
    ref_name: str,
    temperature: float,
    soft_ce_weight: float,
    w1_weight: float,
    gate_weight: float,
    text_gate_weight: float,
    coord_ce_weight: float,
) -> None:
    """Argument checks shared by :func:`stage1_loss` and ``coordexp.train.fused_loss``: aligned integer
    labels of ``ref``'s leading shape, ``T > 0`` and non-negative weights."""
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != tuple(ref.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(getattr(labels, 'shape', ()))} does not match {ref_name} "
            f"{tuple(ref.shape)} (expected {tuple(ref.shape[:-1])}; labels must be aligned)"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be > 0, got {temperature}")
    for name, w in (
        ("soft_ce_weight", soft_ce_weight),
        ("w1_weight", w1_weight),
        ("gate_weight", gate_weight),
        ("text_gate_weight", text_gate_weight),
        ("coord_ce_weight", coord_ce_weight),
    ):
        if not w >= 0:
            raise ValueError(f"{name} must be >= 0, got {w}")


def stage1_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    coord_id_map: torch.Tensor,
    *,
    soft_ce_weight: float,
    w1_weight: float,
    gate_weight: float,
    text_gate_weight: float,
    coord_ce_weight: float,
    temperature: float,
    target_sigma: float,
    target_truncate: int,
    normalizer: GlobalCounts | None = None,
    coord_diag: bool = False,
) -> Stage1LossResult:
    """Stage-1 loss of ALIGNED ``logits [N, V] | [B, L, V]`` and ``labels [N] | [B, L]``.

    "Aligned" means the logit at a position predicts the label at the same position: the caller
    shifts (``logits[:, :-1]`` against ``labels[:, 1:]``). ``-100`` labels are ignored.
    All arithmetic is fp32 whatever the logits' dtype; the gradient has the logits' dtype.
    See the module docstring for the formulas and for ``normalizer``. The weights (the optional
    ``text_gate_weight`` / ``coord_ce_weight`` too: 0 turns a term off), ``temperature`` and the
    soft target's ``target_sigma`` / ``target_truncate`` have no defaults here: the config schema
    (``coordexp.core.config.CoordSoftCEW1Config``) is their one source. ``coord_diag=True`` adds the
    coord-distribution diagnostics (:func:`coord_diagnostics`) to the result; the loss is the same.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, L, V], got shape {tuple(getattr(logits, 'shape', ()))}")
    if not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be floating point, got {logits.dtype}")
    check_labels_and_weights(
        labels,
        logits,
        "logits",
        temperature,
        soft_ce_weight,
        w1_weight,
        gate_weight,
        text_gate_weight,
        coord_ce_weight,
    )
    v = logits.shape[-1]
    coord_ids = coord_ids_in_bin_order(coord_id_map.to(logits.device), v)
    q_table, cdf_table = soft_target_table(target_sigma, target_truncate, logits.device)

    z2 = logits.reshape(-1, v)  # a view for contiguous logits; a copy otherwise
    flat = labels.reshape(-1).to(device=logits.device, dtype=torch.long)
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= v))
    if bool(bad.any()):
        raise ValueError(f"labels must be -100 or a token id in [0, {v}), got {int(flat[bad][0])}")
    sup, is_coord, bins = _masks(flat, coord_id_map.to(logits.device).long())
    rows = torch.nonzero(sup).flatten()  # sorted supervised rows
    row_is_coord = is_coord[rows]
    text_tgt = torch.where(row_is_coord, 0, flat[rows])
    k_star = bins[rows[row_is_coord]]
    inv_t = 1.0 / float(temperature)

    want_gate, want_ce = text_gate_weight > 0, coord_ce_weight > 0
    rel, s, anchor, rel2, shift2 = _RowStats.apply(
        z2, rows, row_is_coord, text_tgt, coord_ids, inv_t, want_gate, want_ce
    )
    rel_text, rel_crd = rel[~row_is_coord], rel[row_is_coord]

    # text rows: CE = lse(z) - z[y], which is exactly the anchored rel_text
    text_ce_sum = rel_text.sum()
    s_crd = s[row_is_coord] if want_gate else s  # with the text gate s covers every supervised row
    # coord rows, all on [n_coord, K]; the anchor s[t] is a constant here exactly as inside _RowStats
    # (it cancels in every term); d = (s - s[t]) / T <= 0 keeps every value small
    s_rel = s_crd - s_crd.gather(1, anchor[:, None]).detach()
    d = s_rel * inv_t
    text_gate_rows = coord_ce_rows = None
    if want_gate:
        # softplus(lse_coord(z/T) - lse_noncoord(z/T)) = -log(1 - m), both relative to the constant
        # largest non-coord logit n (see _second_rows). lse_coord's own log-sum-exp runs at the row's
        # coord maximum c, and (c - n) / T is added as a constant: the softmax its backward rebuilds is
        # then exact to a few ulp, where a log-sum-exp of size |c - n| / T would carry ulp(|c - n| / T)
        text = ~row_is_coord
        s_t = s[text]
        c = s_t.detach().max(dim=1, keepdim=True).values
        lse_coord = torch.logsumexp((s_t - c) * inv_t, dim=1) + (c.squeeze(1) - shift2[text]) * inv_t
        text_gate_rows = F.softplus(lse_coord - rel2[text])
    if want_ce:
        # lse(z) - z[y] = (lse(z) - s[t]) - (s[k*] - s[t]); the first is rel at T = 1, else rel2
        lse_hard = rel_crd if inv_t == 1.0 else rel2[row_is_coord]
        coord_ce_rows = lse_hard - s_rel.gather(1, k_star[:, None]).squeeze(1)
    n_text = int(rows.numel()) - int(k_star.numel())
    return assemble_result(
        text_ce_sum,
        rel_crd,
        d,
        k_star,
        q_table,
        cdf_table,
        n_text,
        text_gate_rows=text_gate_rows,
        coord_ce_rows=coord_ce_rows,
        soft_ce_weight=soft_ce_weight,
        w1_weight=w1_weight,
        gate_weight=gate_weight,
        text_gate_weight=text_gate_weight,
        coord_ce_weight=coord_ce_weight,
        normalizer=normalizer,
        coord_diag=coord_diag,
        argmax=anchor,
    )


def assemble_result(
    text_ce_sum: torch.Tensor,
    rel_crd: torch.Tensor,
    d: torch.Tensor,
    k_star: torch.Tensor,
    q_table: torch.Tensor,
    cdf_table: torch.Tensor,
    n_text: int,
    *,
    text_gate_rows: torch.Tensor | None,
    coord_ce_rows: torch.Tensor | None,
    soft_ce_weight: float,
    w1_weight: float,
    gate_weight: float,
    text_gate_weight: float,
    coord_ce_weight: float,
    normalizer: GlobalCounts | None,
    coord_diag: bool = False,
    argmax: torch.Tensor | None = None,
) -> Stage1LossResult:
    """softCE, W1, gate and the totals from the per-row statistics (shared with ``coordexp.train.fused_loss``).

    ``d = (s - a) / T`` are the coord logits shifted by a per-row constant ``a`` (an anchor that keeps
    every value small; it cancels in every term) and ``rel_crd = lse(z/T) - a/T`` for the same rows.
    ``text_gate_rows [n_text]`` / ``coord_ce_rows [n_coord]`` are the optional terms per row, None
    when their weight is 0 (then they are neither computed nor in the result). ``coord_diag`` adds the
    diagnostics of ``softmax(d)``, detached (the loss and its graph are the same either way); ``argmax`` is
    the arg-max bin of each coord row (the first maximum) where the caller has it.
    """
    lse_d = torch.logsumexp(d, dim=1)  # = lse(s/T) - a/T
    log_p = d - lse_d[:, None]  # log_softmax(s/T)
    q = q_table[k_star]
    soft_ce_rows = -(q * log_p).sum(dim=1)
    p = log_p.exp()
    w1_rows = (torch.cumsum(p, dim=1) - cdf_table[k_star]).abs().sum(dim=1) / (K - 1)
    gate_rows = (rel_crd - lse_d).clamp_min(0.0)  # lse(z/T) - lse(s/T), round-off clamped
    mass_rows = torch.exp(-gate_rows)

    soft_ce_sum, w1_sum, gate_sum, mass_sum = soft_ce_rows.sum(), w1_rows.sum(), gate_rows.sum(), mass_rows.sum()
    n_coord = int(k_star.numel())
    dt, dc = float(max(n_text, 1)), float(max(n_coord, 1))
    text_ce, soft_ce, w1, gate, mass = text_ce_sum / dt, soft_ce_sum / dc, w1_sum / dc, gate_sum / dc, mass_sum / dc

    coord_sum = soft_ce_weight * soft_ce_sum + w1_weight * w1_sum + gate_weight * gate_sum
    text_sum = text_ce_sum
    text_gate = text_gate_sum = coord_ce = coord_ce_sum = None
    if text_gate_rows is not None:
        text_gate_sum = text_gate_rows.sum()
        text_gate = text_gate_sum / dt
        text_sum = text_sum + text_gate_weight * text_gate_sum
    if coord_ce_rows is not None:
        coord_ce_sum = coord_ce_rows.sum()
        coord_ce = coord_ce_sum / dc
        coord_sum = coord_sum + coord_ce_weight * coord_ce_sum
    if normalizer is None:
        total = text_ce + soft_ce_weight * soft_ce + w1_weight * w1 + gate_weight * gate
        if text_gate is not None:
            total = total + text_gate_weight * text_gate
        if coord_ce is not None:
            total = total + coord_ce_weight * coord_ce
    else:
        total = normalizer.world_size * (
            text_sum / normalizer.text_denominator + coord_sum / normalizer.coord_denominator
        )
    diag = diag_sum = None
    if coord_diag:
        diag_sum = coord_diagnostics(log_p, k_star, p, argmax).sum(0)
        diag = diag_sum / dc
    return Stage1LossResult(
        total=total,
        text_ce=text_ce,
        soft_ce=soft_ce,
        w1=w1,
        gate=gate,
        coord_vocab_mass=mass,
        coord_tokens=n_coord,
        text_tokens=n_text,
        text_ce_sum=text_ce_sum,
        soft_ce_sum=soft_ce_sum,
        w1_sum=w1_sum,
        gate_sum=gate_sum,
        mass_sum=mass_sum,
        text_gate=text_gate,
        coord_ce=coord_ce,
        text_gate_sum=text_gate_sum,
        coord_ce_sum=coord_ce_sum,
        coord_diag=diag,
        coord_diag_sum=diag_sum,
    )
