"""Stage-1 loss fused with the LM head: ``hidden @ weight.T + bias`` is never materialised.

:func:`fused_stage1_loss` returns exactly what :func:`coordexp.losses.stage1_loss` returns on the
materialised logits ``z = hidden @ weight.T + bias`` (same :class:`Stage1LossResult`, same
formulas, same global normalisation), but never holds more than one row chunk
``[chunk_size, V]`` of fp32 logits. Why: at V = 151,936 the fp32 logits of an 8k-token micro-batch
are 4.9 GB, plus as much again for their gradient; everything the loss needs from them is
small (DESIGN §3):

* one full-vocab log-sum-exp per supervised row, computed ONCE and shared by text CE and gate
  (text rows: ``L = lse(z)``; coord rows: ``L = lse((z - s_max) / T)``, shifted by the row's
  largest coord logit for the same precision reason as ``losses._RowStats``);
* the target logit ``z[y]`` of text rows (``[n_text]``);
* the coord slice ``s = h W_coord^T + b_coord`` of coord rows (``[n_coord, K]``), gathered from the
  1000 coord rows of ``weight`` once.

:class:`_FusedHead` computes these three outputs; everything downstream (softCE, W1, gate, the
reductions) is ordinary autograd on those small tensors, written exactly like ``stage1_loss``.

Why the gradient of ``L`` is computed *during the forward* (Liger-Kernel's "fused linear cross
entropy" idea): the full-vocab gradient ``dL_r/dz_r = a_r softmax(a_r (z_r - c_r))`` needs the
chunk's logits, and computing them again in the backward costs a fourth ``N x V x D`` matmul
(~1.33x the unfused FLOPs). Its upstream weight ``g_r = dtotal/dL_r`` is, for the loss anyone
backpropagates (``total``), known in the forward up to one scalar: ``w_text`` on text rows and
``w_coord * [gate_r >= 0]`` on coord rows (the clamp's derivative), times the caller's
grad_output ``alpha``. So the forward accumulates ``grad_hidden``, ``grad_weight`` and
``grad_bias`` for ``g = w`` chunk by chunk, and the backward scales them by ``alpha``. The
backward CHECKS that the incoming ``g_L`` really is ``alpha * w`` (e.g. someone backpropagates
``result.text_ce`` or a custom mix instead of ``total``); if not, it falls back to recomputing
the chunks (exact for any upstream gradient). Both paths are tested.

The small pieces (``s`` and ``z[y]``) get their gradients exactly in the backward from the
incoming ``g_s`` / ``g_zy``: they are scattered into the SAME ``grad_weight`` buffer, because
letting autograd differentiate ``weight[coord_ids]`` would allocate a second dense ``[V, D]``
gradient.

Memory (fp32 ``weight``): one ``[chunk_size, V]`` fp32 workspace, the supervised hidden rows in
fp32 (``[n_sup, D]``), and ``grad_weight`` itself (``[V, D]``, allocated in the forward instead of
the backward: it is the parameter's gradient, which the unfused path allocates too). With a
non-fp32 ``weight`` (bf16 on GPU) the arithmetic is still fp32: the weight is upcast once per
call (a transient ``[V, D]`` fp32 copy) and ``grad_weight`` is accumulated in fp32 and rounded
once at the end. A GPU kernel would instead run bf16 tensor-core matmuls with fp32 accumulation
(as Liger / Apple's Cut-Cross-Entropy do) and avoid that copy; none is written here because
no GPU was available to test it.

Eval / no-grad calls skip all gradient work (just the chunked log-sum-exp).

CPU performance (bench/fused_loss.py, bench/RESULTS.md ``## fused_loss``): the chunk size trades
memory for speed. Every chunk streams the whole ``[V, D]`` weight twice and its gradient once, so
small chunks (the ~1/16-of-the-rows default, needed to stay under 10% of the logits' memory at
N = 1k) run the matmuls at roughly half the GFLOP/s of big ones; with 256-row chunks the fused
path was as fast as or faster than the unfused one at N = 1k. A further speed-up that keeps
the memory small would tile vocab-outer (one ``[N, V/16]`` tile at a time, big GEMMs, the weight
gradient written once) at the price of recomputing the logits in the backward.
"""

from __future__ import annotations

import dataclasses

import torch

from coordexp.codec import K
from coordexp.losses import (
    IGNORE_INDEX,
    GlobalCounts,
    Stage1LossResult,
    assemble_result,
    check_labels_and_weights,
    _masks,
    coord_ids_in_bin_order,
    soft_target_table,
)

__all__ = ["DEFAULT_CHUNK_ELEMS", "fused_stage1_loss"]

DEFAULT_CHUNK_ELEMS = 1 << 23
"""Smallest default chunk: ``2**23`` fp32 elements (32 MB; 55 rows at V = 152k)."""

MAX_CHUNK_ELEMS = 1 << 26
"""Largest default chunk: ``2**26`` elements (256 MB; 441 rows at V = 152k)."""


def _default_chunk(v: int, n_rows: int | None = None) -> int:
    """Rows per chunk: ~1/16 of the supervised rows, clamped to [32 MB, 256 MB] of fp32 logits.

    Why adaptive: the workspace is then ~6% of the logits the unfused path would materialise
    (the memory goal is <= 10%), while big batches get big chunks, which matter on CPU: a
    ``[55, D] x [D, 152k]`` matmul runs at ~half the GFLOP/s of a ``[220, D]`` one, and every
    chunk re-reads the ``[V, D]`` weight gradient it accumulates into."""
    lo = max(1, DEFAULT_CHUNK_ELEMS // max(v, 1))
    hi = max(lo, MAX_CHUNK_ELEMS // max(v, 1))
    if n_rows is None:
        return lo
    return int(min(hi, max(lo, -(-n_rows // 16))))


class _FusedHead(torch.autograd.Function):
    """``(L [n_sup], s [n_coord, K], zy [n_text])`` from hidden rows and the LM head, chunked.

    Inputs: ``hidden [N, D]``, ``weight [V, D]``, ``bias [V] | None`` (any float dtypes), the
    sorted supervised rows ``rows``, ``is_coord`` per supervised row, ``text_tgt`` (target id per
    supervised row; ignored on coord rows), ``coord_ids`` (bin order), ``inv_t = 1/T``,
    ``chunk`` (rows per chunk), and the predicted upstream weights ``w_text, w_coord`` (see the
    module docstring; ``None`` disables the in-forward gradient).

    ``L_r = lse(a_r (z_r - c_r))`` with ``a_r = 1, c_r = 0`` on text rows and ``a_r = 1/T``,
    ``c_r = max s_r`` on coord rows. All arithmetic fp32; gradients in the inputs' dtypes; rows
    not supervised get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, w_text, w_coord):  # type: ignore[override]
        with _no_autocast(hidden.device):
            return _FusedHead._forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, w_text, w_coord)

    @staticmethod
    def backward(ctx, g_l, g_s, g_zy, g_pred):  # type: ignore[override]
        with _no_autocast(ctx.h.device):
            return _FusedHead._backward(ctx, g_l, g_s, g_zy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, w_text, w_coord):
        dev = hidden.device
        v, d = weight.shape
        n = rows.numel()
        f32 = torch.float32
        h = hidden.index_select(0, rows).to(f32)  # [n, D] fp32 copy of the supervised rows only
        wf = weight if weight.dtype == f32 else weight.to(f32)
        bf = None if bias is None else bias.to(f32)
        crow = torch.nonzero(is_coord).flatten()
        trow = torch.nonzero(~is_coord).flatten()
        tgt = text_tgt.index_select(0, trow)
        n_c = crow.numel()

        # the small exact pieces: coord slice and text target logits
        wc = wf.index_select(0, coord_ids)  # [K, D] fp32
        hc = h.index_select(0, crow)
        s = hc @ wc.T
        wy = wf.index_select(0, tgt)
        zy = (h.index_select(0, trow) * wy).sum(1)
        if bf is not None:
            s = s + bf.index_select(0, coord_ids)
            zy = zy + bf.index_select(0, tgt)

        shift = torch.zeros(n, dtype=f32, device=dev)
        scale = torch.ones(n, dtype=f32, device=dev)
        if n_c:
            s_max = s.max(dim=1).values
            shift[crow] = s_max
            scale[crow] = inv_t
        cum = [0] + torch.cumsum(is_coord.long(), 0).tolist()

        need = ctx.needs_input_grad
        need_h, need_w = bool(need[0]), bool(need[1])
        need_b = bias is not None and bool(need[2])
        eager = w_text is not None and (need_h or need_w or need_b) and n > 0
        wpred = None
        if eager:
            wpred = torch.full((n,), float(w_text), dtype=f32, device=dev)
            if n_c:
                # same ops as the downstream gate, so the clamp mask matches bitwise
                lse_d = torch.logsumexp((s - s_max[:, None]) * inv_t, dim=1)
                wpred[crow] = float(w_coord)
        gh = torch.zeros(n, d, dtype=f32, device=dev) if eager and need_h else None
        gw = torch.zeros(v, d, dtype=f32, device=dev) if eager and need_w else None
        gb = torch.zeros(v, dtype=f32, device=dev) if eager and need_b else None

        L = torch.empty(n, dtype=f32, device=dev)
        pred = torch.empty(n, dtype=torch.long, device=dev)  # argmax per row, for token accuracy
        ws = torch.empty(min(chunk, n), v, dtype=f32, device=dev)
        wt = wf.T
        for a in range(0, n, chunk):
            b = min(a + chunk, n)
            x = ws[: b - a]
            if bf is None:
                torch.mm(h[a:b], wt, out=x)
            else:
                torch.addmm(bf, h[a:b], wt, out=x)
            has_c = cum[b] > cum[a]
            if has_c:
                # (z - c) / T: the difference first is exact near the max (see losses._RowStats)
                x.sub_(shift[a:b, None]).mul_(scale[a:b, None])
            # log-sum-exp in place (torch.logsumexp would allocate a second chunk-sized temporary):
            # e = exp(x - max) stays in x, so the softmax below is e / sum(e) without another exp
            m, pred[a:b] = x.max(dim=1)  # (z - c) * a with a > 0 keeps the argmax of z
            x.sub_(m[:, None]).exp_()
            ssum = x.sum(dim=1)
            lse = m + ssum.log()
            L[a:b] = lse
            if eager:
                coef = wpred[a:b]
                if has_c:
                    ca = crow[cum[a] : cum[b]]
                    gate_raw = lse[ca - a] - lse_d[cum[a] : cum[b]]
                    coef = coef.clone()
                    coef[ca - a] = torch.where(gate_raw >= 0, coef[ca - a], 0.0)
                    wpred[a:b] = coef
                    coef = coef * scale[a:b]
                g = x.mul_((coef / ssum)[:, None])  # softmax * coef = dtotal/dz for alpha = 1
                if gh is not None:
                    torch.mm(g, wf, out=gh[a:b])
                if gw is not None:
                    gw.addmm_(g.T, h[a:b])
                if gb is not None:
                    gb.add_(g.sum(0))
        del ws

        ctx.save_for_backward(hidden, weight, bias, rows, is_coord, tgt, coord_ids)
        ctx.h, ctx.crow, ctx.trow, ctx.shift, ctx.scale, ctx.L = h, crow, trow, shift, scale, L
        ctx.chunk, ctx.cum = chunk, cum
        ctx.wpred, ctx.gh, ctx.gw, ctx.gb = wpred, gh, gw, gb
        ctx.eager = eager
        ctx.mark_non_differentiable(pred)
        return L, s, zy, pred

    @staticmethod
    def _backward(ctx, g_l, g_s, g_zy):
        hidden, weight, bias, rows, is_coord, tgt, coord_ids = ctx.saved_tensors
        h, crow, trow, shift, scale, L = ctx.h, ctx.crow, ctx.trow, ctx.shift, ctx.scale, ctx.L
        need = ctx.needs_input_grad
        need_h, need_w = bool(need[0]), bool(need[1])
        need_b = bias is not None and bool(need[2])
        f32 = torch.float32
        n, d = h.shape
        v = weight.shape[0]
        dev = h.device

        gh = gw = gb = None
        alpha = _scalar_multiple(g_l, ctx.wpred) if ctx.eager else None
        if alpha is not None:
            # the in-forward gradients are valid: scale by the caller's grad_output
            gh, gw, gb = ctx.gh, ctx.gw, ctx.gb
            ctx.gh = ctx.gw = ctx.gb = None  # a second backward (retain_graph) recomputes
            ctx.eager = False
            if alpha != 1.0:
                for t in (gh, gw, gb):
                    if t is not None:
                        t.mul_(alpha)
        wf = None
        if alpha is None and n:
            # exact fallback for any upstream gradient: recompute the chunks
            wf = weight if weight.dtype == f32 else weight.to(f32)
            bf = None if bias is None else bias.to(f32)
            gh = torch.zeros(n, d, dtype=f32, device=dev) if need_h else None
            gw = torch.zeros(v, d, dtype=f32, device=dev) if need_w else None
            gb = torch.zeros(v, dtype=f32, device=dev) if need_b else None
            coef_all = g_l.to(f32) * scale
            ws = torch.empty(min(ctx.chunk, n), v, dtype=f32, device=dev)
            cum = ctx.cum
            for a in range(0, n, ctx.chunk):
                b = min(a + ctx.chunk, n)
                x = ws[: b - a]
                if bf is None:
                    torch.mm(h[a:b], wf.T, out=x)
                else:
                    torch.addmm(bf, h[a:b], wf.T, out=x)
                if cum[b] > cum[a]:
                    x.sub_(shift[a:b, None]).mul_(scale[a:b, None])
                g = x.sub_(L[a:b, None]).exp_().mul_(coef_all[a:b, None])
                if gh is not None:
                    torch.mm(g, wf, out=gh[a:b])
                if gw is not None:
                    gw.addmm_(g.T, h[a:b])
                if gb is not None:
                    gb.add_(g.sum(0))
            del ws
        if n == 0:
            gh = torch.zeros(0, d, dtype=f32, device=dev) if need_h else None
            gw = torch.zeros(v, d, dtype=f32, device=dev) if need_w else None
            gb = torch.zeros(v, dtype=f32, device=dev) if need_b else None

        # the exact small pieces, into the same buffers
        if crow.numel() or trow.numel():
            if wf is None:
                wf = weight if weight.dtype == f32 else None
            gs = g_s.to(f32)
            gz = g_zy.to(f32)
            hc = h.index_select(0, crow)
            ht = h.index_select(0, trow)
            if gh is not None:
                wc = (wf.index_select(0, coord_ids) if wf is not None else weight.index_select(0, coord_ids).to(f32))
                wy = (wf.index_select(0, tgt) if wf is not None else weight.index_select(0, tgt).to(f32))
                gh.index_add_(0, crow, gs @ wc)
                gh.index_add_(0, trow, gz[:, None] * wy)
            if gw is not None:
                gw.index_add_(0, coord_ids, gs.T @ hc)
                gw.index_add_(0, tgt, gz[:, None] * ht)
            if gb is not None:
                gb.index_add_(0, coord_ids, gs.sum(0))
                gb.index_add_(0, tgt, gz)

        grad_hidden = grad_weight = grad_bias = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows, gh.to(hidden.dtype))
        if need_w:
            grad_weight = gw if weight.dtype == f32 else gw.to(weight.dtype)
        if need_b:
            grad_bias = gb.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def _no_autocast(device: torch.device):
    """Autocast off: under ``torch.autocast`` (bf16 mixed precision, as trainers run the loss) the
    matmuls here would silently drop to bf16; the loss promises fp32 arithmetic."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        import contextlib

        return contextlib.nullcontext()


def _scalar_multiple(g: torch.Tensor, w: torch.Tensor | None) -> float | None:
    """``alpha`` if ``g == alpha * w`` to fp32 round-off (the in-forward gradient applies), else
    ``None``. Tolerance ``1e-6 max|g|``: two autograd roundings of the same product differ by a
    few ulp; a genuinely different upstream weighting differs by O(max|g|)."""
    if w is None or g is None:
        return None
    g = g.to(torch.float32)
    wmax, i = w.abs().max(dim=0)
    gmax = float(g.abs().max())
    if float(wmax) == 0.0:
        return 0.0 if gmax == 0.0 else None
    alpha = float(g[i]) / float(w[i])
    err = float((g - alpha * w).abs().max())
    return alpha if err <= 1e-6 * gmax else None


def fused_stage1_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    coord_id_map: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    soft_ce_weight: float = 1.0,
    w1_weight: float = 1.0,
    gate_weight: float = 1.0,
    temperature: float = 1.0,
    target_sigma: float = 2.0,
    target_truncate: int = 16,
    normalizer: GlobalCounts | None = None,
) -> Stage1LossResult:
    """Stage-1 loss of ``hidden [N, D] | [B, L, D]`` through the LM head ``weight [V, D]``
    (``+ bias [V]``), equal to ``stage1_loss(hidden @ weight.T + bias, labels, ...)``.

    ``labels [N] | [B, L]`` must be ALIGNED with ``hidden`` (row i predicts ``labels[i]``; the
    caller shifts), ``-100`` ignored. ``chunk_size`` = rows of logits held at once (default
    ~1/16 of the supervised rows, clamped to 32..256 MB of fp32 logits, see ``_default_chunk``). Only supervised rows are touched; all arithmetic is fp32; gradients
    come back in the inputs' dtypes. ``total`` is the loss to backpropagate (its gradient is
    precomputed in the forward; any other scalar still backpropagates exactly, by recompute).
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.dtype.is_floating_point:
        raise ValueError(f"hidden must be a float [N, D] or [B, L, D] tensor, got {tuple(getattr(hidden, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError("weight must be a float [V, D] tensor (the LM head, e.g. model.lm_head.weight)")
    v, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden has D={hidden.shape[-1]} but weight is [V={v}, D={d}]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != v or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float [V={v}] tensor or None")
    check_labels_and_weights(labels, hidden, "hidden", temperature, soft_ce_weight, w1_weight, gate_weight)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    dev = hidden.device
    coord_ids = coord_ids_in_bin_order(coord_id_map.to(dev), v)
    q_table, cdf_table = soft_target_table(target_sigma, target_truncate, dev)

    h2 = hidden.reshape(-1, d)
    flat = labels.reshape(-1).to(device=dev, dtype=torch.long)
    bad = (flat != IGNORE_INDEX) & ((flat < 0) | (flat >= v))
    if bool(bad.any()):
        raise ValueError(f"labels must be -100 or a token id in [0, {v}), got {int(flat[bad][0])}")
    sup, is_coord, bins = _masks(flat, coord_id_map.to(dev).long())
    rows = torch.nonzero(sup).flatten()
    row_is_coord = is_coord[rows]
    text_tgt = torch.where(row_is_coord, 0, flat[rows])
    k_star = bins[rows[row_is_coord]]
    inv_t = 1.0 / float(temperature)
    n_coord = int(k_star.numel())
    n_text = int(rows.numel()) - n_coord
    if chunk_size is None:
        chunk_size = _default_chunk(v, int(rows.numel()))
    dt, dc = float(max(n_text, 1)), float(max(n_coord, 1))

    # dtotal/dL per row kind, up to the caller's grad_output (see module docstring)
    if normalizer is None:
        w_text, w_coord = 1.0 / dt, gate_weight / dc
    else:
        w_text = normalizer.world_size / normalizer.text_denominator
        w_coord = normalizer.world_size * gate_weight / normalizer.coord_denominator

    wants_grad = torch.is_grad_enabled() and (
        hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
    )
    if not wants_grad:  # eval: no in-forward gradient work at all
        w_text = w_coord = None
    with _no_autocast(dev):
        L, s, zy, pred = _FusedHead.apply(h2, weight, bias, rows, row_is_coord, text_tgt, coord_ids, inv_t,
                                          int(chunk_size), w_text, w_coord)
        result = _assemble((L, s, zy), row_is_coord, k_star, q_table, cdf_table, inv_t, n_text, n_coord,
                           soft_ce_weight, w1_weight, gate_weight, normalizer)
    argmax = torch.full_like(flat, IGNORE_INDEX)
    argmax[rows] = pred
    return dataclasses.replace(result, argmax=argmax)


def _assemble(outs, row_is_coord, k_star, q_table, cdf_table, inv_t, n_text, n_coord,
              soft_ce_weight, w1_weight, gate_weight, normalizer) -> Stage1LossResult:
    """``stage1_loss``'s formulas on the small outputs ``(L, s, zy)`` of :class:`_FusedHead`."""
    L, s, zy = outs
    text_ce_sum = (L[~row_is_coord] - zy).sum()  # lse(z) - z[y]
    rel_crd = L[row_is_coord]  # lse(z/T) - s_max/T
    d = (s - s.detach().max(dim=1, keepdim=True).values) * inv_t  # anchored at s_max
    return assemble_result(text_ce_sum, rel_crd, d, k_star, q_table, cdf_table, n_text,
                           soft_ce_weight=soft_ce_weight, w1_weight=w1_weight, gate_weight=gate_weight,
                           normalizer=normalizer)
