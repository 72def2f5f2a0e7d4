"""Stage-1 loss: full-vocab CE on text targets + softCE, W1 and a vocab gate on coord targets.

The formulas (DESIGN.md section 3, spec ``stage1-softce-w1.md``), with ``z`` the full-vocab
logits of one position upcast to fp32, ``s = z[coord ids in bin order]`` and temperature ``T``:

    text CE   = logsumexp(z) - z[y]                       (non-coord targets only)
    p         = softmax(s / T)
    q         = truncated Gaussian around the target bin k*, normalised
    softCE    = -sum_i q_i log p_i
    W1        = sum_i |CDF_p(i) - CDF_q(i)| / (K - 1)
    gate      = logsumexp(z / T) - logsumexp(s / T)   (>= 0, = -log coord-vocab mass)
    total     = text CE + w_ce softCE + w_w1 W1 + w_gate gate

Why it is shaped the way it is:

* **One full-vocab pass per row.** Everything that touches all ``V`` logits of a row is one
  ``logsumexp`` (of ``z`` for text rows, of ``z / T`` for coord rows). It lives in a single
  autograd Function, :class:`_FullVocabTerms`, that also hands out the ``[Nc, K]`` coord
  slice, so autograd never materialises extra ``[N, V]`` gradients for the gathers. Its
  backward writes the ``[N, V]`` gradient once, ``softmax(z a) * a * g`` row by row, then
  adds the sparse parts (the one-hot of the anchor and the coord-slice gradient). Rows are
  processed in small chunks so the fp32 temporaries stay in cache and a bf16/fp16 input
  is never upcast as a whole. On a 2-core CPU this is about 2x faster than
  ``F.cross_entropy`` forward+backward on the same logits (see ``bench/RESULTS.md``).
* **Precision at large logits.** ``logsumexp`` is kept relative to an *anchor* logit
  ``z[t]`` of the row: ``rel = logsumexp(z a) - a z[t] = a (max z - z[t]) + log sum
  exp(a (z - max z))``. With ``t`` the label, ``rel`` *is* the text CE; with ``t`` the
  argmax of the coord slice, ``gate = rel - logsumexp(a (s - s[t]))``. Differences of
  nearby fp32 numbers are exact (Sterbenz), so no term loses digits to a large common
  offset: with logits of magnitude 1e4 and ``T = 0.05`` values and gradients still match a
  float64 reference to about 1e-5 relative (``tests/test_losses.py``), where the naive
  ``logsumexp(z / T)`` in fp32 would be off by ``ulp(2e5) ~ 0.016`` absolute.
* **Reduction.** Every term also comes back as a raw sum so that a trainer can divide by
  the token counts of the *global* batch (all micro-batches, all ranks): see
  :class:`GlobalCounts`, :func:`global_counts` and the ``normalizer`` argument.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from coordexp.codec import K

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "GlobalCounts",
    "Stage1LossResult",
    "coord_ids_in_bin_order",
    "count_tokens",
    "global_counts",
    "soft_target_table",
    "stage1_loss",
    "validate_stage1_inputs",
]


# --------------------------------------------------------------------------------------
# results and global normalisation


@dataclass
class Stage1LossResult:
    """Output of :func:`stage1_loss`.

    ``total`` is what to call ``backward()`` on. The per-term fields are means over this
    call's own tokens (0, still attached to the graph, when there are none) and are meant
    for logging; the ``*_sum`` fields are the raw sums used for global normalisation.
    """

    total: Tensor
    text_ce: Tensor
    soft_ce: Tensor
    w1: Tensor
    gate: Tensor
    coord_vocab_mass: Tensor
    coord_tokens: int
    text_tokens: int
    text_ce_sum: Tensor
    soft_ce_sum: Tensor
    w1_sum: Tensor
    gate_sum: Tensor
    mass_sum: Tensor


@dataclass(frozen=True)
class GlobalCounts:
    """Supervised token counts of the whole optimiser step (all micro-batches, all ranks).

    ``world_size`` is the number of data-parallel ranks whose gradients DDP *averages*; the
    loss of a micro-batch is ``sum / count * world_size`` so that the average of the ranks'
    summed gradients equals the gradient of the global token mean.
    """

    text: int
    coord: int
    world_size: int = 1

    def __post_init__(self) -> None:
        if self.text < 0 or self.coord < 0 or self.world_size < 1:
            raise ValueError(f"GlobalCounts needs text, coord >= 0 and world_size >= 1, got {self}")


def count_tokens(labels: Tensor, coord_id_map: Tensor) -> tuple[int, int]:
    """``(text, coord)``: supervised non-coord and coord targets in ``labels`` (any shape)."""
    text, coord = _count_tensor(labels, coord_id_map).tolist()
    return int(text), int(coord)


def _count_tensor(labels: Tensor, coord_id_map: Tensor) -> Tensor:
    labels = labels.reshape(-1)
    supervised = labels != IGNORE_INDEX
    cmap = coord_id_map.to(labels.device)
    is_coord = supervised & (cmap[labels.clamp(min=0)] >= 0)
    n_sup = supervised.sum()
    n_coord = is_coord.sum()
    return torch.stack([n_sup - n_coord, n_coord]).to(torch.int64)


def global_counts(
    labels_list: list[Tensor] | tuple[Tensor, ...],
    coord_id_map: Tensor,
    *,
    group: object | None = None,
    device: torch.device | str | None = None,
) -> GlobalCounts:
    """Count the text/coord targets of all this rank's micro-batches, summed over all ranks.

    Call it once per optimiser step *before* the micro-batch forwards. When
    ``torch.distributed`` is initialised the counts are all-reduced **unconditionally**:
    every rank makes exactly one ``all_reduce`` here, whatever its data, so a rank with no
    coord tokens can neither hang the others nor divide by zero (denominators are clamped
    to 1 in :func:`stage1_loss`). ``device`` is where the reduction happens (it must suit
    the backend: CUDA for NCCL); by default the labels' device.
    """
    if device is None:
        device = labels_list[0].device if len(labels_list) else coord_id_map.device
    totals = torch.zeros(2, dtype=torch.int64, device=device)
    for labels in labels_list:
        totals += _count_tensor(labels, coord_id_map).to(device)
    world_size = 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals, group=group)
        world_size = torch.distributed.get_world_size(group)
    text, coord = totals.tolist()
    return GlobalCounts(text=int(text), coord=int(coord), world_size=world_size)


# --------------------------------------------------------------------------------------
# validation


def _check_hparams(temperature: float, target_sigma: float, target_truncate: int, weights: dict) -> None:
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(target_sigma, (int, float)) and math.isfinite(target_sigma) and target_sigma > 0):
        raise ValueError(f"target_sigma must be a finite number > 0 (in bins), got {target_sigma!r}")
    if isinstance(target_truncate, bool) or not isinstance(target_truncate, int) or target_truncate < 0:
        raise ValueError(
            f"target_truncate must be an int >= 0 (radius in bins; 0 = one-hot), got {target_truncate!r}"
        )
    for name, w in weights.items():
        if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {w!r}")


def validate_stage1_inputs(logits: Tensor, labels: Tensor, coord_id_map: Tensor) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument if the inputs cannot be used.

    Checks shapes and dtypes, that ``labels`` hold ``-100`` or a vocab id, and that
    ``coord_id_map`` maps exactly one vocab id to each bin ``0..K-1`` and ``-1`` elsewhere.
    (Value checks read the tensors, i.e. they synchronise with the GPU.)
    """
    if not isinstance(logits, Tensor) or not logits.is_floating_point():
        raise TypeError(f"logits must be a floating-point tensor, got {getattr(logits, 'dtype', type(logits))}")
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [N, V] or [B, L, V], got shape {tuple(logits.shape)}")
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64/int32 tensor, got {getattr(labels, 'dtype', type(labels))}")
    if tuple(labels.shape) != tuple(logits.shape[:-1]):
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}; labels must already be aligned (shifted) to the logits"
        )
    V = logits.shape[-1]
    if not isinstance(coord_id_map, Tensor) or coord_id_map.dtype != torch.int64 or coord_id_map.dim() != 1:
        raise TypeError("coord_id_map must be a 1-D int64 tensor of size V (bin index at coord ids, -1 elsewhere)")
    if coord_id_map.numel() != V:
        raise ValueError(
            f"coord_id_map has {coord_id_map.numel()} entries but the logits have V={V}; "
            "build it from the same tokenizer/model vocabulary (including added tokens)"
        )
    if labels.numel():
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= V))
        if bool(bad.any()):
            idx = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels{list(idx)} = {int(labels[idx])} is neither {IGNORE_INDEX} (ignore) nor a vocab id in [0, {V})"
            )
    cmap = coord_id_map
    if bool(((cmap < -1) | (cmap >= K)).any()):
        raise ValueError(f"coord_id_map values must be -1 or a bin in [0, {K - 1}]")
    bins = cmap[cmap >= 0]
    if bins.numel() != K or not torch.equal(torch.sort(bins).values, torch.arange(K, device=cmap.device)):
        raise ValueError(
            f"coord_id_map must map exactly one vocab id to each of the {K} bins; it has {bins.numel()} "
            f"non-negative entries (missing or duplicate coord tokens in the vocabulary?)"
        )


# --------------------------------------------------------------------------------------
# cached tables


def coord_ids_in_bin_order(coord_id_map: Tensor) -> Tensor:
    """Vocab ids of ``<|coord_0|>..<|coord_{K-1}|>`` in bin order (LongTensor ``[K]``)."""
    ids = (coord_id_map >= 0).nonzero().squeeze(1)
    return ids[torch.argsort(coord_id_map[ids])]


@functools.lru_cache(maxsize=16)
def _target_tables(sigma: float, truncate: int, device: str) -> tuple[Tensor, Tensor]:
    i = torch.arange(K, dtype=torch.float64)
    d = i[None, :] - i[:, None]  # [k*, i]
    w = torch.exp(-0.5 * (d / sigma) ** 2) * (d.abs() <= truncate)
    q = w / w.sum(dim=1, keepdim=True)  # centre weight is 1, so the sum is >= 1
    return q.to(device, torch.float32), q.cumsum(dim=1).to(device, torch.float32)


def soft_target_table(sigma: float, truncate: int, device: torch.device | str = "cpu") -> Tensor:
    """``[K, K]`` fp32 table, row ``k*`` = soft target ``q`` for target bin ``k*``.

    Built in float64 once per ``(sigma, truncate, device)`` and cached (with its CDF).
    """
    return _target_tables(float(sigma), int(truncate), str(torch.device(device)))[0]


# --------------------------------------------------------------------------------------
# the full-vocab autograd Function


def _chunk_rows(V: int, device: torch.device) -> int:
    """Rows per chunk: small enough for the fp32 temporaries to stay in cache on a CPU,
    large enough that kernel-launch overhead vanishes on a GPU."""
    budget = (256 << 20) if device.type == "cuda" else (2 << 20)
    return max(1, budget // (4 * V))


class _RowAccess:
    """Read rows of ``[N, V]`` or ``[B, L, V]`` logits by flat row index without copying
    the whole tensor (a shifted ``logits[:, :-1]`` is not viewable as ``[N, V]``)."""

    def __init__(self, z: Tensor):
        self.z = z
        self.V = z.shape[-1]
        self.flat = None
        try:
            self.flat = z.view(-1, self.V)
        except RuntimeError:
            self.L = z.shape[1]

    def gather(self, rows: Tensor, cols: Tensor | None = None) -> Tensor:
        """Whole rows (``cols=None``), or ``[rows, cols]`` without touching other columns."""
        if cols is not None:
            rows, cols = rows[:, None], cols[None, :]
            if self.flat is not None:
                return self.flat[rows, cols]
            return self.z[rows // self.L, rows % self.L, cols]
        if self.flat is not None:
            return self.flat.index_select(0, rows)
        return self.z[rows // self.L, rows % self.L]

    def elements(self, rows: Tensor, cols: Tensor) -> Tensor:
        """``z[rows[i], cols[i]]`` for each i."""
        if self.flat is not None:
            return self.flat[rows, cols]
        return self.z[rows // self.L, rows % self.L, cols]

    def rows(self, lo: int, hi: int, rows: Tensor) -> Tensor:
        """Rows ``rows`` (known to be the contiguous range ``lo..hi-1`` if ``hi > lo``)."""
        if self.flat is not None and hi > lo:
            return self.flat[lo:hi]
        return self.gather(rows)


class _FullVocabTerms(torch.autograd.Function):
    """Per supervised row ``r``: ``rel_r = logsumexp(a_r z_r) - a_r z_r[t_r]``; plus the
    coord slice ``s = z[coord_rows][:, coord_ids]`` in fp32.

    Gradients are exact: ``d rel_r / d z_r = a_r (softmax(a_r z_r) - onehot(t_r))`` and
    the slice gradient is scattered back into the coord columns.
    """

    @staticmethod
    def forward(ctx, z, rows, scale, anchor, coord_rows, coord_ids, rows_cpu, scaled_cpu):
        acc = _RowAccess(z)
        R = rows.numel()
        m = torch.empty(R, dtype=torch.float32, device=z.device)
        log_s = torch.empty(R, dtype=torch.float32, device=z.device)
        chunks = _plan_chunks(rows_cpu, _chunk_rows(acc.V, z.device))
        for i0, i1, lo, hi in chunks:
            x = acc.rows(lo, hi, rows[i0:i1]).float()
            mx = x.amax(dim=1)
            t = x - mx[:, None]
            if bool(scaled_cpu[i0:i1].any()):
                t.mul_(scale[i0:i1, None])
            log_s[i0:i1] = t.exp_().sum(dim=1).log_()
            m[i0:i1] = mx
        # rel = a (max - z[t]) + log sum exp(a (z - max)); exact differences, see module doc
        z_anchor = acc.elements(rows, anchor).float()
        rel = scale * (m - z_anchor) + log_s
        s = acc.gather(coord_rows, coord_ids).float()
        ctx.save_for_backward(z, rows, scale, anchor, coord_rows, coord_ids, m, log_s)
        ctx.chunks = chunks
        ctx.scaled_cpu = scaled_cpu
        return rel, s

    @staticmethod
    def backward(ctx, g_rel, g_s):
        z, rows, scale, anchor, coord_rows, coord_ids, m, log_s = ctx.saved_tensors
        acc = _RowAccess(z)
        grad = torch.empty(z.shape, dtype=z.dtype, device=z.device)  # contiguous
        gflat = grad.view(-1, acc.V)
        gfac = g_rel * scale
        covered = torch.zeros(gflat.shape[0], dtype=torch.bool)
        for i0, i1, lo, hi in ctx.chunks:
            x = acc.rows(lo, hi, rows[i0:i1])
            direct = hi > lo and grad.dtype == torch.float32
            out = gflat[lo:hi] if direct else torch.empty(x.shape, dtype=torch.float32, device=z.device)
            torch.sub(x, m[i0:i1, None], out=out)  # upcasts a bf16/fp16 x chunk
            if bool(ctx.scaled_cpu[i0:i1].any()):
                out.mul_(scale[i0:i1, None])
            out.sub_(log_s[i0:i1, None]).exp_().mul_(gfac[i0:i1, None])
            if not direct:
                if hi > lo:
                    gflat[lo:hi].copy_(out)
                else:
                    gflat.index_copy_(0, rows[i0:i1], out.to(grad.dtype))
            if hi > lo:
                covered[lo:hi] = True
            else:
                covered[rows[i0:i1].cpu()] = True
        if not bool(covered.all()):
            gflat.index_fill_(0, (~covered).nonzero().squeeze(1).to(z.device), 0)
        if rows.numel():
            gflat.index_put_((rows, anchor), (-gfac).to(grad.dtype), accumulate=True)
        if coord_rows.numel():
            gflat.index_put_((coord_rows[:, None], coord_ids[None, :]), g_s.to(grad.dtype), accumulate=True)
        return grad, None, None, None, None, None, None, None


def _plan_chunks(rows_cpu: Tensor, per: int) -> list[tuple[int, int, int, int]]:
    """``(i0, i1, lo, hi)``: rows[i0:i1] per chunk, and the flat range ``lo:hi`` they fill
    when contiguous (else ``lo == hi``, meaning "gather")."""
    out = []
    r = rows_cpu.tolist()
    i0 = 0
    while i0 < len(r):
        i1 = min(i0 + per, len(r))
        lo, hi = r[i0], r[i1 - 1] + 1
        out.append((i0, i1, lo, hi) if hi - lo == i1 - i0 else (i0, i1, 0, 0))
        i0 = i1
    return out


# --------------------------------------------------------------------------------------
# the loss


def stage1_loss(
    logits: Tensor,
    labels: Tensor,
    coord_id_map: Tensor,
    *,
    soft_ce_weight: float = 1.0,
    w1_weight: float = 1.0,
    gate_weight: float = 1.0,
    temperature: float = 1.0,
    target_sigma: float = 2.0,
    target_truncate: int = 16,
    normalizer: GlobalCounts | None = None,
    validate: bool = True,
) -> Stage1LossResult:
    """Stage-1 loss on already aligned ``logits`` (``[N, V]`` or ``[B, L, V]``) and ``labels``.

    ``labels[..., i]`` is the target of ``logits[..., i, :]`` (the caller shifts); ``-100``
    is ignored. ``coord_id_map`` (LongTensor ``[V]``) holds the bin at coord token ids and
    -1 elsewhere. All arithmetic is fp32 whatever the logits' dtype.

    Without ``normalizer`` the total is the sum of per-call means. With a
    :class:`GlobalCounts` for the optimiser step it is
    ``world_size * (text_ce_sum / text + sum_j w_j term_j_sum / coord)`` (counts clamped to
    >= 1), so that summing ``backward()`` over micro-batches and averaging over DDP ranks
    gives the gradient of the global token mean. The logged per-term means are local either
    way. ``validate=False`` skips :func:`validate_stage1_inputs` (it synchronises a GPU).
    """
    _check_hparams(
        temperature,
        target_sigma,
        target_truncate,
        {"soft_ce_weight": soft_ce_weight, "w1_weight": w1_weight, "gate_weight": gate_weight},
    )
    if validate:
        validate_stage1_inputs(logits, labels, coord_id_map)
    device = logits.device
    flat_labels = labels.reshape(-1).to(device=device, dtype=torch.int64)
    cmap = coord_id_map.to(device)
    coord_ids = coord_ids_in_bin_order(cmap)

    # Which rows are supervised, and how: text rows (a = 1, anchor = label) and coord rows
    # (a = 1/T, anchor = argmax of the coord slice). One host sync here.
    supervised = flat_labels != IGNORE_INDEX
    target_bin = torch.where(supervised, cmap[flat_labels.clamp(min=0)], -1)
    is_coord = target_bin >= 0
    rows = supervised.nonzero().squeeze(1)
    row_is_coord = is_coord[rows]
    coord_rows = rows[row_is_coord]
    inv_t = 1.0 / float(temperature)
    scale = torch.where(row_is_coord, inv_t, 1.0).to(torch.float32)
    with torch.no_grad():
        s_det = _RowAccess(logits).gather(coord_rows, coord_ids)
        j = s_det.argmax(dim=1)
    anchor = flat_labels[rows].clone()
    anchor[row_is_coord] = coord_ids[j]
    rows_cpu = rows.cpu()
    scaled_cpu = row_is_coord.cpu() if inv_t != 1.0 else torch.zeros(rows.numel(), dtype=torch.bool)

    rel, s = _FullVocabTerms.apply(logits, rows, scale, anchor, coord_rows, coord_ids, rows_cpu, scaled_cpu)

    # text rows: rel is the CE
    text_ce_sum = rel[~row_is_coord].sum()
    n_text = int(rows.numel() - coord_rows.numel())
    n_coord = int(coord_rows.numel())

    # coord rows: everything else lives on the small [Nc, K] slice
    q_table, cdf_table = _target_tables(float(target_sigma), int(target_truncate), str(device))
    k_star = target_bin[coord_rows]
    s_max = s.gather(1, j[:, None])  # = z[anchor]; keeps the argmax's gradient
    logits_c = (s - s_max) * inv_t
    log_p = torch.log_softmax(logits_c, dim=1)
    soft_ce_sum = -(q_table[k_star] * log_p).sum()
    cdf_p = torch.cumsum(log_p.exp(), dim=1)
    w1_sum = (cdf_p - cdf_table[k_star]).abs().sum() / (K - 1)
    gate_rows = (rel[row_is_coord] - torch.logsumexp(logits_c, dim=1)).clamp(min=0)
    gate_sum = gate_rows.sum()
    mass_sum = torch.exp(-gate_rows).sum()

    def mean(x: Tensor, n: int) -> Tensor:
        return x / max(n, 1)

    if normalizer is None:
        nt, nc, ws = n_text, n_coord, 1
    else:
        nt, nc, ws = normalizer.text, normalizer.coord, normalizer.world_size
    coord_part = soft_ce_weight * soft_ce_sum + w1_weight * w1_sum + gate_weight * gate_sum
    total = ws * (mean(text_ce_sum, nt) + mean(coord_part, nc))
    return Stage1LossResult(
        total=total,
        text_ce=mean(text_ce_sum, n_text),
        soft_ce=mean(soft_ce_sum, n_coord),
        w1=mean(w1_sum, n_coord),
        gate=mean(gate_sum, n_coord),
        coord_vocab_mass=mean(mass_sum, n_coord),
        coord_tokens=n_coord,
        text_tokens=n_text,
        text_ce_sum=text_ce_sum,
        soft_ce_sum=soft_ce_sum,
        w1_sum=w1_sum,
        gate_sum=gate_sum,
        mass_sum=mass_sum,
    )
