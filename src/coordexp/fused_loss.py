"""Stage-1 loss fused with the LM head: ``hidden @ weight.T + bias`` is never materialised.

:func:`fused_stage1_loss` returns exactly what :func:`coordexp.losses.stage1_loss` returns on the
materialised logits ``z = hidden @ weight.T + bias`` (same :class:`Stage1LossResult`, same
formulas, same global normalisation), but never holds more than one vocabulary chunk
``[n_sup, chunk_size]`` of fp32 logits. Why: at V = 151,936 the fp32 logits of an 8k-token
micro-batch are 4.9 GB, plus as much again for their gradient; everything the loss needs from them
is small (DESIGN §3):

* one full-vocab log-sum-exp per supervised row, computed ONCE and shared by text CE and gate
  (text rows: ``L = lse(z)``; coord rows: ``L = lse((z - s_max) / T)``, shifted by the row's
  largest coord logit for the same precision reason as ``losses._RowStats``);
* the target logit ``z[y]`` of text rows (``[n_text]``);
* the coord slice ``s = h W_coord^T + b_coord`` of coord rows (``[n_coord, K]``), gathered from the
  1000 coord rows of ``weight`` once;
* the arg-max of every row (for token accuracy: the trainer has no logits to take it from).

:class:`_FusedHead` computes these; everything downstream (softCE, W1, gate, the reductions) is
ordinary autograd on those small tensors, written exactly like ``stage1_loss``.

Why the chunks run over the VOCABULARY (all supervised rows at once, ``chunk_size`` columns of
the LM head at a time) and not over rows: on a CPU the three big products of the unfused path
(logits, grad of hidden, grad of weight) run at full speed because every one is a fat GEMM.
Row chunks make them skinny (``[N/16, D] x [D, V]``) and re-read and re-write the whole
``[V, D]`` weight gradient once per chunk, which measured 1.56x the unfused time at N = 1k,
D = 1024 (bench/RESULTS.md). Vocabulary chunks keep every product fat (``[n_sup, D] x [D, V/16]``)
and write each block of the weight gradient exactly once. The price: the log-sum-exp of a row is
only known after the last chunk, so the forward keeps a running (max, sum) per row (the online
log-sum-exp of flash attention) and the backward recomputes each chunk's logits, i.e. four
``N x V x D`` products instead of three. The backward is therefore exact for ANY upstream
gradient (``total``, a single term, a custom mix) with no special cases.

Memory (fp32 ``weight``): one ``[n_sup, chunk_size]`` fp32 workspace, the supervised hidden rows
in fp32 (``[n_sup, D]``) and, in the backward, the weight gradient the unfused path produces too.
With a non-fp32 ``weight`` (bf16 on GPU) the arithmetic is still fp32: the weight is upcast once
per call (a transient ``[V, D]`` fp32 copy) and the weight gradient rounded once per block. A GPU
kernel would instead run bf16 tensor-core matmuls with fp32 accumulation (as Liger /
Cut-Cross-Entropy do); none is written here because no GPU was available to test it.

Eval / no-grad calls do only the forward (one product, chunked).
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
"""Smallest default workspace: ``2**23`` fp32 elements (32 MB)."""

MAX_CHUNK_ELEMS = 1 << 26
"""Largest default workspace: ``2**26`` elements (256 MB)."""


def _default_chunk(v: int, n_rows: int) -> int:
    """Vocabulary columns per chunk: a workspace of ~1/32 of the logits, clamped to [32 MB, 256 MB].

    Why adaptive: the workspace is then ~3% of the logits the unfused path would materialise; with
    the fp32 row copies ``[n_sup, D]`` and the ``[n_coord, K]`` coord terms the whole loss stays
    under 10% of them (the memory goal) at D = 2048 too, while its products stay fat enough for
    full GEMM speed (``[n_sup, D] x [D, V/32]``)."""
    elems = min(MAX_CHUNK_ELEMS, max(DEFAULT_CHUNK_ELEMS, -(-n_rows * v // 32)))
    return int(max(1, min(v, elems // max(n_rows, 1))))


class _FusedHead(torch.autograd.Function):
    """``(L [n_sup], s [n_coord, K], zy [n_text], argmax [n_sup])`` from hidden rows and the LM head.

    Inputs: ``hidden [N, D]``, ``weight [V, D]``, ``bias [V] | None`` (any float dtypes), the
    sorted supervised rows ``rows``, ``is_coord`` per supervised row, ``text_tgt`` (target id per
    supervised row; ignored on coord rows), ``coord_ids`` (bin order), ``inv_t = 1/T`` and
    ``chunk`` (vocabulary columns per chunk).

    ``L_r = lse(a_r (z_r - c_r))`` with ``a_r = 1, c_r = 0`` on text rows and ``a_r = 1/T``,
    ``c_r = max s_r`` on coord rows. All arithmetic fp32; gradients in the inputs' dtypes; rows
    not supervised get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk):  # type: ignore[override]
        with _no_autocast(hidden.device):
            return _FusedHead._forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk)

    @staticmethod
    def backward(ctx, g_l, g_s, g_zy, g_pred):  # type: ignore[override]
        with _no_autocast(ctx.h.device):
            return _FusedHead._backward(ctx, g_l, g_s, g_zy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk):
        dev = hidden.device
        v = weight.shape[0]
        n = rows.numel()
        f32 = torch.float32
        h = hidden.index_select(0, rows).to(f32)  # [n, D] fp32 copy of the supervised rows only
        wf = weight if weight.dtype == f32 else weight.to(f32)
        bf = None if bias is None else bias.to(f32)
        crow = torch.nonzero(is_coord).flatten()
        trow = torch.nonzero(~is_coord).flatten()
        tgt = text_tgt.index_select(0, trow)

        # the small exact pieces: coord slice and text target logits
        s = h.index_select(0, crow) @ wf.index_select(0, coord_ids).T
        zy = (h.index_select(0, trow) * wf.index_select(0, tgt)).sum(1)
        if bf is not None:
            s = s + bf.index_select(0, coord_ids)
            zy = zy + bf.index_select(0, tgt)

        shift = torch.zeros(n, dtype=f32, device=dev)
        scale = torch.ones(n, dtype=f32, device=dev)
        if crow.numel():
            shift[crow] = s.max(dim=1).values
            scale[crow] = inv_t

        # The chunk logits x: without a bias, x = (a h) W^T = a z straight from the GEMM (the rows
        # pre-scaled once) and the shift a c is taken off the finished log-sum-exp; with a bias,
        # x = a (h W^T + b - c) (two more passes per chunk). Either way L = lse(x) - off.
        fold = bf is None
        hx = h * scale[:, None] if fold and crow.numel() and inv_t != 1.0 else h
        off = shift * scale if fold else torch.zeros(n, dtype=f32, device=dev)

        # online log-sum-exp over vocabulary chunks: running max m and sum of exp(x - m) per row
        m = torch.full((n,), float("-inf"), dtype=f32, device=dev)
        ssum = torch.zeros(n, dtype=f32, device=dev)
        pred = torch.zeros(n, dtype=torch.long, device=dev)  # argmax per row, for token accuracy
        ws = torch.empty(n * min(chunk, v), dtype=f32, device=dev)
        for c0 in range(0, v if n else 0, chunk):
            x = _chunk_logits(ws, hx, wf, bf, c0, min(c0 + chunk, v), shift, scale, crow.numel() > 0)
            cmax, carg = x.max(dim=1)  # x is a (z - c) or a z with a > 0: the argmax of z
            pred = torch.where(cmax > m, carg + c0, pred)  # strict: the first maximum wins, like argmax
            m_new = torch.maximum(m, cmax)
            ssum.mul_(torch.exp(m - m_new)).add_(x.sub_(m_new[:, None]).exp_().sum(dim=1))
            m = m_new
        del ws
        lse_x = m + ssum.log()
        L = lse_x - off

        ctx.save_for_backward(hidden, weight, bias, rows, tgt, coord_ids)
        ctx.h, ctx.hx, ctx.crow, ctx.trow, ctx.shift, ctx.scale = h, hx, crow, trow, shift, scale
        ctx.lse_x, ctx.chunk = lse_x, chunk
        ctx.mark_non_differentiable(pred)
        return L, s, zy, pred

    @staticmethod
    def _backward(ctx, g_l, g_s, g_zy):
        hidden, weight, bias, rows, tgt, coord_ids = ctx.saved_tensors
        h, hx, crow, trow, shift, scale = ctx.h, ctx.hx, ctx.crow, ctx.trow, ctx.shift, ctx.scale
        lse_x, chunk = ctx.lse_x, ctx.chunk
        need = ctx.needs_input_grad
        need_h, need_w = bool(need[0]), bool(need[1])
        need_b = bias is not None and bool(need[2])
        f32 = torch.float32
        n, d = h.shape
        v = weight.shape[0]
        dev = h.device
        wf = weight if weight.dtype == f32 else weight.to(f32)
        bf = None if bias is None else bias.to(f32)

        gh = torch.zeros(n, d, dtype=f32, device=dev) if need_h else None
        gw = torch.zeros(v, d, dtype=f32, device=dev) if need_w else None
        gb = torch.zeros(v, dtype=f32, device=dev) if need_b else None
        if g_l is not None and n and (need_h or need_w or need_b):
            # dL_r/dz_r = k_r softmax(x_r) with k_r = g_r a_r: recompute each chunk, write each
            # weight block once. k folds into the exponent, k exp(x - lse) = sign(k) exp(x - (lse - log|k|))
            # (k = 0 gives exp(-inf) = 0), so a chunk costs one subtraction and one exp.
            k = g_l.to(f32) * scale
            base = lse_x - k.abs().log()
            negative = bool((k < 0).any())
            ws = torch.empty(n * min(chunk, v), dtype=f32, device=dev)
            for c0 in range(0, v, chunk):
                c1 = min(c0 + chunk, v)
                x = _chunk_logits(ws, hx, wf, bf, c0, c1, shift, scale, crow.numel() > 0)
                g = x.sub_(base[:, None]).exp_()
                if negative:
                    g.mul_(k.sign()[:, None])
                if gh is not None:
                    gh.addmm_(g, wf[c0:c1])
                if gw is not None:
                    torch.mm(g.T, h, out=gw[c0:c1])
                if gb is not None:
                    torch.sum(g, dim=0, out=gb[c0:c1])
            del ws

        # the exact small pieces, into the same buffers
        if g_s is not None and crow.numel():
            gs = g_s.to(f32)
            if gh is not None:
                gh.index_add_(0, crow, gs @ wf.index_select(0, coord_ids))
            if gw is not None:
                gw.index_add_(0, coord_ids, gs.T @ h.index_select(0, crow))
            if gb is not None:
                gb.index_add_(0, coord_ids, gs.sum(0))
        if g_zy is not None and trow.numel():
            gz = g_zy.to(f32)
            if gh is not None:
                gh.index_add_(0, trow, gz[:, None] * wf.index_select(0, tgt))
            if gw is not None:
                gw.index_add_(0, tgt, gz[:, None] * h.index_select(0, trow))
            if gb is not None:
                gb.index_add_(0, tgt, gz)

        grad_hidden = grad_weight = grad_bias = None
        if need_h:
            grad_hidden = torch.zeros_like(hidden)
            grad_hidden.index_copy_(0, rows, gh.to(hidden.dtype))
        if need_w:
            grad_weight = gw if weight.dtype == f32 else gw.to(weight.dtype)
        if need_b:
            grad_bias = gb.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None


def _chunk_logits(ws, hx, wf, bf, c0, c1, shift, scale, has_coord):
    """The chunk's ``x`` into the front of the flat workspace ``ws`` (contiguous): ``hx W[c0:c1]^T``
    without a bias (``hx`` = the pre-scaled rows ``a h``), ``a (h W[c0:c1]^T + b[c0:c1] - c)`` with one."""
    x = ws[: hx.shape[0] * (c1 - c0)].view(hx.shape[0], c1 - c0)
    if bf is None:
        torch.mm(hx, wf[c0:c1].T, out=x)
        return x
    torch.addmm(bf[c0:c1], hx, wf[c0:c1].T, out=x)
    if has_coord:
        # (z - c) / T: the difference first is exact near the max (see losses._RowStats)
        x.sub_(shift[:, None]).mul_(scale[:, None])
    return x


def _no_autocast(device: torch.device):
    """Autocast off: under ``torch.autocast`` (bf16 mixed precision, as trainers run the loss) the
    matmuls here would silently drop to bf16; the loss promises fp32 arithmetic."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        import contextlib

        return contextlib.nullcontext()


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
    caller shifts), ``-100`` ignored. ``chunk_size`` = vocabulary columns of logits held at once
    for all supervised rows (default: a workspace of ~1/32 of the logits, clamped to 32..256 MB,
    see ``_default_chunk``). Only supervised rows are touched; all arithmetic is fp32; gradients
    come back in the inputs' dtypes, exact for any scalar built from the result. ``argmax`` holds
    each supervised position's predicted token id.
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

    with _no_autocast(dev):
        L, s, zy, pred = _FusedHead.apply(h2, weight, bias, rows, row_is_coord, text_tgt, coord_ids, inv_t,
                                          int(chunk_size))
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
