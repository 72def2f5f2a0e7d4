"""Stage-1 loss fused with the LM head: ``hidden @ weight.T + bias`` is never materialised.

:func:`fused_stage1_loss` returns exactly what :func:`coordexp.train.loss.stage1_loss` returns on the
materialised logits ``z = hidden @ weight.T + bias`` (same :class:`Stage1LossResult`, same
formulas, same global normalisation), but never holds more than a chunk of fp32 logits. Why: at
V = 151,936 the fp32 logits of an 8k-token micro-batch are 4.9 GB, plus as much again for their
gradient; everything the loss needs from them is small (the formulas are in
:mod:`coordexp.train.loss`):

* one full-vocab log-sum-exp per supervised row, computed ONCE and shared by text CE and gate
  (text rows: ``L = lse(z)``; coord rows: ``L = lse((z - s_max) / T)``, shifted by the row's
  largest coord logit for the same precision reason as ``coordexp.train.loss._RowStats``);
* the target logit ``z[y]`` of text rows (``[n_text]``);
* the coord slice ``s = h W_coord^T + b_coord`` of coord rows (``[n_coord, K]``), gathered from the
  1000 coord rows of ``weight`` once;
* the arg-max of every row (for token accuracy: the trainer has no logits to take it from).

:class:`_FusedHead` computes these; everything downstream (softCE, W1, gate, the reductions) is
ordinary autograd on those small tensors, written exactly like ``stage1_loss``, and so are the
coord-distribution diagnostics (``coord_diag=True``), from the same coord slice (its arg-max is the
``s_max`` it is anchored at).

The optional terms (``text_gate_weight``, ``coord_ce_weight``; each only when its weight is > 0) run
one more :class:`_FusedHead` pass each, in vocab mode, over the rows they need (:func:`_extra_passes`):
the text gate the text rows' log-sum-exp over the non-coord columns at ``1/T`` (the coord columns
masked to ``-inf`` chunk by chunk) and their coord slice; the hard CE at ``T != 1`` the coord rows'
log-sum-exp at T = 1 (at T = 1 it is the main pass's ``L``). Their gradients are recomputed in the
backward (no saved rows-mode gradient), into a hidden and weight gradient of their own that autograd
adds to the main one: the price of an optional term is one more product forward and three backward
for its rows, and one more ``[V, D]`` gradient buffer while it is added.

Two ways to chunk the ``N x V x D`` work, because which one is faster depends on N (timings in
bench/RESULTS.md, ``## fused_loss``):

* ``"vocab"`` mode: all supervised rows at once, ``chunk_size`` columns of the LM head at a time.
  Every product stays fat (``[n_sup, D] x [D, V/32]``) and each weight-gradient block is written
  once, but a row's log-sum-exp is only final after the last chunk, so the forward keeps a running
  (max, sum) per row (the online log-sum-exp of flash attention) and the backward recomputes each
  chunk's logits: FOUR ``N x V x D`` products against the unfused path's three. At small N the
  unfused path's ``[N, V]`` elementwise passes cost about as much as the fourth product; at large
  N they cost less.
* ``"rows"`` mode (Liger-style): ``row_chunk`` supervised rows at a time against the whole
  vocabulary. A chunk's ``[R, V]`` logits give its rows' final log-sum-exp at once, so the
  gradient is formed right there, while the logits are still in the workspace: THREE products
  (logits, ``g W`` into the hidden gradient, ``g^T h`` accumulated into one ``[V, D]`` weight
  gradient), saved for the backward. Its cost is the skinny products and the weight gradient
  re-read and re-written once per chunk, which only pays off once chunks are tall enough
  (:data:`MIN_ROW_CHUNK`).

``mode="auto"`` picks rows when the default row chunk (``ceil(n_sup / ROW_CHUNKS)`` rows, a
workspace of 1/16 of the logits) is at least :data:`MIN_ROW_CHUNK` rows, vocab otherwise.

Why the rows-mode gradient is exact for ANY upstream gradient: ``total`` depends on ``L`` linearly,
``d total / d L_r = k_r`` with ``k`` independent of the logits (text rows through the text-CE mean,
coord rows through the gate and, at T = 1, the hard CE; the optional terms' own passes are separate
inputs of ``total``; with ``normalizer=`` the divisors are global counts), except where
the gate's clamp at 0 is active (a true gate of ~0 turned negative by round-off). ``k`` is taken by
autograd from the same assembly code the result uses (:func:`_total_weights`), and the forward
saves the gradients for upstream ``k``. The gradients are linear in the upstream ``g_l``: the
backward writes ``g_l = c k + r`` with one scalar ``c``, uses ``c`` times the saved gradients and
recomputes (vocabulary chunks, as in vocab mode) only the rows where the residual ``r`` is not
zero: none for ``total`` or any multiple of it, the clamped rows, or the rows of the terms a
single-term backward (``result.text_ce.backward()``) leaves out. A row counts as matched when
``|g_r - c k_r| <= 1e-6 |c k_r|``, far below the fp32 error of the products themselves.

Memory (fp32 ``weight``): one ``[n_sup, chunk_size]`` (vocab) or ``[row_chunk, V]`` (rows) fp32
workspace, the supervised hidden rows in fp32 (``[n_sup, D]``) and the weight gradient the
unfused path produces too (in rows mode allocated in the forward, in vocab mode in the backward),
plus in rows mode the ``[n_sup, D]`` hidden-row gradient from the forward to the backward. With a
non-fp32 ``weight`` (bf16 on GPU) the arithmetic is still fp32: the weight is upcast once per pass
(a transient ``[V, D]`` fp32 copy) and the weight gradient rounded once at the end. A GPU kernel
would instead run bf16 tensor-core matmuls with fp32 accumulation (as Liger / Cut-Cross-Entropy
do); this module has none, so its products are fp32 matmuls on every device.

Eval / no-grad calls do only the forward (one product, chunked, no gradient work in either mode).
The result's ``mode`` field says which mode ran.
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import math

import torch

from coordexp.core.codec import K
from coordexp.train.loss import (
    IGNORE_INDEX,
    GlobalCounts,
    Stage1LossResult,
    _masks,
    assemble_result,
    check_labels_and_weights,
    coord_ids_in_bin_order,
    soft_target_table,
)

__all__ = ["DEFAULT_CHUNK_ELEMS", "MIN_ROW_CHUNK", "ROW_CHUNKS", "fused_stage1_loss"]

DEFAULT_CHUNK_ELEMS = 1 << 23
"""Smallest default vocab-mode workspace: ``2**23`` fp32 elements (32 MB)."""

MAX_CHUNK_ELEMS = 1 << 26
"""Largest default vocab-mode workspace: ``2**26`` elements (256 MB)."""

ROW_CHUNKS = 16
"""Rows mode's default number of row chunks: a ``[n_sup / 16, V]`` workspace is 6.25% of the
logits, which leaves room under the 10% memory goal for the ``[n_sup, D]`` fp32 row copies and
hidden-row gradient (each ~1.3% at D = 2048, V = 152k)."""

MIN_ROW_CHUNK = 96
"""``mode="auto"`` uses rows mode only when its default chunk has at least this many rows. Why:
a row chunk's products are ``[R, D] x [D, V]`` and its weight-gradient update re-reads and
re-writes the whole ``[V, D]`` buffer, about ``R / 4`` flops per byte moved, so short chunks are
slower than vocab mode and tall ones faster; the threshold sits between the chunk heights
bench/RESULTS.md (``## fused_loss``) times on either side. With 16 chunks, 96 rows means rows
mode from 1,521 supervised rows."""


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
    supervised row; ignored on coord rows), ``coord_ids`` (bin order), ``inv_t = 1/T``, ``chunk``
    (vocabulary columns per chunk of the vocab-mode forward and of any backward recompute; None =
    :func:`_default_chunk` for the rows at hand), ``row_chunk`` (None = vocab mode, else rows mode
    with that many rows per chunk) and ``k`` (rows mode: ``d total / d L`` per supervised row,
    whose gradients the forward computes and saves; None when no gradient is wanted).

    ``L_r = lse(a_r (z_r - c_r))`` with ``a_r = 1, c_r = 0`` on text rows and ``a_r = 1/T``,
    ``c_r = max s_r`` on coord rows. All arithmetic fp32; gradients in the inputs' dtypes; rows
    not supervised get exactly zero gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, row_chunk, k, mask):
        with _no_autocast(hidden.device):
            return _FusedHead._forward(
                ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, row_chunk, k, mask
            )

    @staticmethod
    def backward(ctx, g_l, g_s, g_zy, g_pred):
        with _no_autocast(ctx.h.device):
            return _FusedHead._backward(ctx, g_l, g_s, g_zy)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, rows, is_coord, text_tgt, coord_ids, inv_t, chunk, row_chunk, k, mask):
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
        has_coord = crow.numel() > 0

        fast = None
        if row_chunk is None:
            lse_x, pred = _vocab_chunk_pass(hx, wf, bf, shift, scale, has_coord, chunk or _default_chunk(v, n), mask)
        else:
            need = ctx.needs_input_grad
            want = (bool(need[0]), bool(need[1]), bias is not None and bool(need[2]))
            coef = None if k is None else k * scale
            lse_x, pred, fast = _row_chunk_pass(h, hx, wf, bf, shift, scale, has_coord, row_chunk, coef, want, mask)
        L = lse_x - off

        ctx.save_for_backward(hidden, weight, bias, rows, tgt, coord_ids)
        ctx.h, ctx.hx, ctx.crow, ctx.trow, ctx.shift, ctx.scale = h, hx, crow, trow, shift, scale
        ctx.lse_x, ctx.chunk, ctx.k, ctx.fast, ctx.mask = lse_x, chunk, k, fast, mask
        ctx.mark_non_differentiable(pred)
        return L, s, zy, pred

    @staticmethod
    def _backward(ctx, g_l, g_s, g_zy):
        hidden, weight, bias, rows, tgt, coord_ids = ctx.saved_tensors
        h, hx, crow, trow, shift, scale = ctx.h, ctx.hx, ctx.crow, ctx.trow, ctx.shift, ctx.scale
        need = ctx.needs_input_grad
        need_h, need_w = bool(need[0]), bool(need[1])
        need_b = bias is not None and bool(need[2])
        f32 = torch.float32
        n, d = h.shape
        v = weight.shape[0]
        dev = h.device
        wf = weight if weight.dtype == f32 else weight.to(f32)
        bf = None if bias is None else bias.to(f32)

        # The gradients are linear in g_l: split g_l = c k + r, take c times the gradients the
        # rows-mode forward saved for k, and recompute the rows where the residual r is not zero.
        # The saved gradients serve one backward (scaled in place); a second one (retain_graph)
        # finds none and recomputes every row with a nonzero g_l, as vocab mode always does.
        g = torch.zeros(n, dtype=f32, device=dev) if g_l is None else g_l.to(f32)
        fast, ctx.fast = ctx.fast, None
        if fast is not None:
            c, r = _split_upstream(g, ctx.k)
            gh, gw, gb = (None if t is None else t.mul_(c) for t in fast)
        else:
            r = g
            gh = torch.zeros(n, d, dtype=f32, device=dev) if need_h else None
            gw = torch.zeros(v, d, dtype=f32, device=dev) if need_w else None
            gb = torch.zeros(v, dtype=f32, device=dev) if need_b else None
        del fast
        redo = torch.nonzero(r).flatten()
        if redo.numel() == n > 0:
            _add_recomputed_grads(
                gh,
                gw,
                gb,
                h,
                hx,
                ctx.lse_x,
                shift,
                scale,
                r * scale,
                wf,
                bf,
                crow.numel() > 0,
                ctx.chunk or _default_chunk(v, n),
                ctx.mask,
            )
        elif redo.numel():

            def pick(t):
                return t.index_select(0, redo)

            h_r = pick(h)
            gh_r = None if gh is None else torch.zeros(redo.numel(), d, dtype=f32, device=dev)
            _add_recomputed_grads(
                gh_r,
                gw,
                gb,
                h_r,
                h_r if hx is h else pick(hx),
                pick(ctx.lse_x),
                pick(shift),
                pick(scale),
                pick(r * scale),
                wf,
                bf,
                crow.numel() > 0,
                ctx.chunk or _default_chunk(v, redo.numel()),
                ctx.mask,
            )
            if gh is not None:
                gh.index_add_(0, redo, gh_r)

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
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None, None, None, None, None


def _vocab_chunk_pass(hx, wf, bf, shift, scale, has_coord, chunk, mask=None):
    """Vocab mode's forward: ``(lse(x) [n], argmax [n])`` of all rows, ``chunk`` vocabulary columns
    at a time, by the online log-sum-exp (a running max ``m`` and sum of ``exp(x - m)`` per row).
    With a ``mask`` (:class:`_ColumnMask`) a chunk can be all ``-inf``, so the running max is read as
    0 while it is still ``-inf`` (``exp(-inf - 0) = 0``, where ``-inf - (-inf)`` would be NaN)."""
    n, v = hx.shape[0], wf.shape[0]
    m = torch.full((n,), float("-inf"), dtype=torch.float32, device=hx.device)
    ssum = torch.zeros(n, dtype=torch.float32, device=hx.device)
    pred = torch.zeros(n, dtype=torch.long, device=hx.device)
    ws = torch.empty(n * min(chunk, v), dtype=torch.float32, device=hx.device)
    for c0 in range(0, v if n else 0, chunk):
        x = _chunk_logits(ws, hx, wf, bf, c0, min(c0 + chunk, v), shift, scale, has_coord, mask)
        cmax, carg = x.max(dim=1)  # x is a (z - c) or a z with a > 0: the argmax of z
        pred = torch.where(cmax > m, carg + c0, pred)  # strict: the first maximum wins, like argmax
        m_new = torch.maximum(m, cmax)
        if mask is not None:
            m_new = torch.where(torch.isinf(m_new), 0.0, m_new)
        ssum.mul_(torch.exp(m - m_new)).add_(x.sub_(m_new[:, None]).exp_().sum(dim=1))
        m = m_new
    return m + ssum.log(), pred


def _row_chunk_pass(h, hx, wf, bf, shift, scale, has_coord, row_chunk, coef, want, mask=None):
    """Rows mode's forward: ``(lse(x) [n], argmax [n], grads)``, ``row_chunk`` rows at a time.

    With ``coef = k a`` (``a`` = 1 or 1/T per row) it also forms, while each chunk's logits are in
    the workspace, the gradients for upstream ``k``: ``g = coef softmax(x)`` (= ``k dL/dz``),
    ``gh = g W`` (rows of the hidden gradient), ``gW += g^T h``, ``gb += sum_rows g``; ``grads`` is
    ``(gh, gW, gb)`` with None for what ``want`` (hidden, weight, bias) leaves out, or None without
    ``coef`` (no gradient wanted: only the log-sum-exp and argmax are computed)."""
    n, d = h.shape
    v = wf.shape[0]
    dev, f32 = h.device, torch.float32
    lse_x = torch.empty(n, dtype=f32, device=dev)
    pred = torch.empty(n, dtype=torch.long, device=dev)
    grads = None
    if coef is not None:
        grads = (
            torch.empty(n, d, dtype=f32, device=dev) if want[0] else None,
            torch.zeros(v, d, dtype=f32, device=dev) if want[1] else None,
            torch.zeros(v, dtype=f32, device=dev) if want[2] else None,
        )
    ws = torch.empty(min(row_chunk, n) * v, dtype=f32, device=dev)
    for r0 in range(0, n, row_chunk):
        r1 = min(r0 + row_chunk, n)
        x = _chunk_logits(ws, hx[r0:r1], wf, bf, 0, v, shift[r0:r1], scale[r0:r1], has_coord, mask)
        xmax, pred[r0:r1] = x.max(dim=1)  # the first maximum wins, like argmax
        e = x.sub_(xmax[:, None]).exp_()
        esum = e.sum(dim=1)  # >= 1: the maximum contributes exp(0)
        lse_x[r0:r1] = xmax + esum.log()
        if grads is None:
            continue
        gh, gw, gb = grads
        g = e.mul_((coef[r0:r1] / esum)[:, None])
        if gh is not None:
            torch.mm(g, wf, out=gh[r0:r1])
        if gw is not None:
            gw.addmm_(g.T, h[r0:r1])
        if gb is not None:
            gb.add_(g.sum(dim=0))
    return lse_x, pred, grads


def _add_recomputed_grads(gh, gw, gb, h, hx, lse_x, shift, scale, coef, wf, bf, has_coord, chunk, mask=None):
    """Adds ``g = coef softmax(x)`` of the given rows to ``gh`` (those rows), ``gW``, ``gb``, by
    recomputing their logits ``chunk`` vocabulary columns at a time; each weight-gradient block
    gets one update. ``coef`` folds into the exponent, ``coef exp(x - lse) = sign(coef)
    exp(x - (lse - log|coef|))`` (coef = 0 gives exp(-inf) = 0), so a chunk costs one subtraction
    and one exp."""
    n, v = h.shape[0], wf.shape[0]
    base = lse_x - coef.abs().log()
    sign = coef.sign()[:, None] if bool((coef < 0).any()) else None
    ws = torch.empty(n * min(chunk, v), dtype=torch.float32, device=h.device)
    for c0 in range(0, v, chunk):
        c1 = min(c0 + chunk, v)
        x = _chunk_logits(ws, hx, wf, bf, c0, c1, shift, scale, has_coord, mask)
        g = x.sub_(base[:, None]).exp_()
        if sign is not None:
            g.mul_(sign)
        if gh is not None:
            gh.addmm_(g, wf[c0:c1])
        if gw is not None:
            gw[c0:c1].addmm_(g.T, h)
        if gb is not None:
            gb[c0:c1].add_(g.sum(dim=0))


def _split_upstream(g: torch.Tensor, k: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``(c, r)`` with ``g = c k + r``, the residual ``r`` set to 0 where ``|r| <= 1e-6 |c k|`` (the
    rows the saved gradients cover, to well under fp32 matmul error). ``c`` is the ratio ``g / k``
    at the row with the largest ``|g|`` (right for ``total`` and its multiples, and for rows that
    a clamp zeroed) or 0 (right when ``g`` lives on rows ``k`` weighs differently, e.g. the
    coord-vocab mass), whichever leaves fewer rows to recompute."""
    if g.numel() == 0:
        return 0.0, g
    j = int(g.abs().argmax())
    best = (0.0, g)
    if float(k[j]) != 0.0:
        c = float(g[j] / k[j])
        ck = c * k
        r = g - ck
        r.masked_fill_(r.abs() <= 1e-6 * ck.abs(), 0.0)
        if int(torch.count_nonzero(r)) < int(torch.count_nonzero(g)):
            best = (c, r)
    return best


def _chunk_logits(ws, hx, wf, bf, c0, c1, shift, scale, has_coord, mask=None):
    """The logits ``x`` of the rows of ``hx`` against vocabulary columns ``c0:c1``, into the front of
    the flat workspace ``ws`` (contiguous): ``hx W[c0:c1]^T`` without a bias (``hx`` = the
    pre-scaled rows ``a h``), ``a (h W[c0:c1]^T + b[c0:c1] - c)`` with one (``shift`` = ``c``,
    ``scale`` = ``a``, per row of ``hx``). With a ``mask`` (:class:`_ColumnMask`) its columns are
    ``-inf``: out of every log-sum-exp and softmax built from ``x``."""
    x = ws[: hx.shape[0] * (c1 - c0)].view(hx.shape[0], c1 - c0)
    if bf is None:
        torch.mm(hx, wf[c0:c1].T, out=x)
    else:
        torch.addmm(bf[c0:c1], hx, wf[c0:c1].T, out=x)
        if has_coord:
            # (z - c) / T: the difference first is exact near the max (see coordexp.train.loss._RowStats)
            x.sub_(shift[:, None]).mul_(scale[:, None])
    if mask is not None:
        cols = mask.columns(c0, c1)
        if cols.numel():
            x.index_fill_(1, cols, float("-inf"))
    return x


class _ColumnMask:
    """Vocabulary columns left out of a head pass (the coord ids, for the text gate's log-sum-exp over
    the non-coord vocabulary). The ids are sorted once, on the host too, so that a chunk finds its
    own columns by bisection, without a device sync per chunk."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids.sort().values
        self.host = self.ids.tolist()

    def columns(self, c0: int, c1: int) -> torch.Tensor:
        """The masked columns in ``c0:c1``, relative to ``c0``."""
        lo, hi = bisect.bisect_left(self.host, c0), bisect.bisect_left(self.host, c1)
        return self.ids[lo:hi] - c0


def _no_autocast(device: torch.device):
    """Autocast off: under ``torch.autocast`` (bf16 mixed precision, as trainers run the loss) the
    matmuls here would silently drop to bf16; the loss promises fp32 arithmetic."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know: nothing to disable
        return contextlib.nullcontext()


def fused_stage1_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    coord_id_map: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    mode: str = "auto",
    chunk_size: int | None = None,
    row_chunk: int | None = None,
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
    """Stage-1 loss of ``hidden [N, D] | [B, L, D]`` through the LM head ``weight [V, D]``
    (``+ bias [V]``), equal to ``stage1_loss(hidden @ weight.T + bias, labels, ...)``.

    ``labels [N] | [B, L]`` must be ALIGNED with ``hidden`` (row i predicts ``labels[i]``; the
    caller shifts), ``-100`` ignored. ``mode``: ``"vocab"``, ``"rows"`` or ``"auto"`` (rows when
    ``ceil(n_sup / ROW_CHUNKS) >= MIN_ROW_CHUNK``; see the module docstring). ``chunk_size`` =
    vocabulary columns of logits held at once for all supervised rows, in the vocab-mode forward
    and in any backward recompute (default: a workspace of ~1/32 of the logits, clamped to
    32..256 MB, see ``_default_chunk``). ``row_chunk`` = supervised rows per chunk in rows mode
    (default ``ceil(n_sup / ROW_CHUNKS)``, a workspace of 1/16 of the logits). Only supervised
    rows are touched; all arithmetic is fp32; gradients come back in the inputs' dtypes, exact for
    any scalar built from the result. ``argmax`` holds each supervised position's predicted token
    id, ``mode`` the mode that ran. The loss weights, ``temperature``, ``target_sigma`` and
    ``target_truncate`` are required, as in :func:`coordexp.train.loss.stage1_loss`; ``coord_diag=True``
    adds the coord-distribution diagnostics of the coord slice, as there.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() not in (2, 3) or not hidden.dtype.is_floating_point:
        raise ValueError(
            f"hidden must be a float [N, D] or [B, L, D] tensor, got {tuple(getattr(hidden, 'shape', ()))}"
        )
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
        raise ValueError("weight must be a float [V, D] tensor (the LM head, e.g. model.lm_head.weight)")
    v, d = weight.shape
    if hidden.shape[-1] != d:
        raise ValueError(f"hidden has D={hidden.shape[-1]} but weight is [V={v}, D={d}]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != v or not bias.dtype.is_floating_point):
        raise ValueError(f"bias must be a float [V={v}] tensor or None")
    check_labels_and_weights(
        labels,
        hidden,
        "hidden",
        temperature,
        soft_ce_weight,
        w1_weight,
        gate_weight,
        text_gate_weight,
        coord_ce_weight,
    )
    if mode not in ("auto", "rows", "vocab"):
        raise ValueError(f"mode must be 'auto', 'rows' or 'vocab', got {mode!r}")
    for name, val in (("chunk_size", chunk_size), ("row_chunk", row_chunk)):
        if val is not None and (int(val) != val or val < 1):
            raise ValueError(f"{name} must be a positive integer, got {val}")
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
    n_sup = int(rows.numel())
    n_coord = int(k_star.numel())
    n_text = n_sup - n_coord
    weights = (soft_ce_weight, w1_weight, gate_weight, text_gate_weight, coord_ce_weight)

    default_rows = max(1, -(-n_sup // ROW_CHUNKS))
    if mode == "auto":
        mode = "rows" if default_rows >= MIN_ROW_CHUNK else "vocab"
    head_rows = None  # rows per chunk in rows mode; None selects vocab mode in the head
    if mode == "rows":
        head_rows = default_rows if row_chunk is None else int(row_chunk)
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))

    with _no_autocast(dev):
        k = None
        if head_rows is not None and wants_grad:
            k = _total_weights(row_is_coord, k_star, q_table, cdf_table, inv_t, n_text, n_coord, weights, normalizer)
        L, s, zy, pred = _FusedHead.apply(
            h2,
            weight,
            bias,
            rows,
            row_is_coord,
            text_tgt,
            coord_ids,
            inv_t,
            None if chunk_size is None else int(chunk_size),
            head_rows,
            k,
            None,
        )
        chunk = None if chunk_size is None else int(chunk_size)
        extras = _extra_passes(h2, weight, bias, rows, row_is_coord, coord_ids, inv_t, chunk, weights)
        result = _assemble(
            (L, s, zy),
            extras,
            row_is_coord,
            k_star,
            q_table,
            cdf_table,
            inv_t,
            n_text,
            n_coord,
            weights,
            normalizer,
            coord_diag=coord_diag,
        )
    argmax = torch.full_like(flat, IGNORE_INDEX)
    argmax[rows] = pred
    return dataclasses.replace(result, argmax=argmax, mode=mode)


def _total_weights(
    row_is_coord, k_star, q_table, cdf_table, inv_t, n_text, n_coord, weights, normalizer
) -> torch.Tensor:
    """``k = d total / d L`` per supervised row, by autograd through :func:`_assemble` itself (so it
    cannot drift from the formulas): ``total`` is linear in ``L`` wherever the gate's clamp at 0 is
    inactive, so ``k`` is the same at every such point. The point taken: ``s = 0`` (coord
    log-sum-exp ``log K``) and ``L = log K + 1`` on every row, i.e. every gate at 1. Rows whose real
    gate is clamped get a different upstream gradient; the backward recomputes those (see
    :class:`_FusedHead`). Cost: one assembly on ``[n_coord, K]``, small next to the logits."""
    dev = row_is_coord.device
    L0 = torch.full((row_is_coord.numel(),), math.log(K) + 1.0, device=dev, requires_grad=True)
    s0 = torch.zeros(n_coord, K, device=dev)
    zy0 = torch.zeros(n_text, device=dev)
    # the optional terms' own passes are constants here (they do not involve L)
    tg0 = (torch.zeros(n_text, device=dev), torch.zeros(n_text, K, device=dev)) if weights[3] > 0 else None
    hard0 = (torch.zeros(n_coord, device=dev), s0) if weights[4] > 0 and inv_t != 1.0 else None
    with torch.enable_grad():
        total = _assemble(
            (L0, s0, zy0),
            (tg0, hard0),
            row_is_coord,
            k_star,
            q_table,
            cdf_table,
            inv_t,
            n_text,
            n_coord,
            weights,
            normalizer,
        ).total
        (k,) = torch.autograd.grad(total, L0)
    return k


def _extra_passes(h2, weight, bias, rows, row_is_coord, coord_ids, inv_t, chunk, weights):
    """The head passes of the optional terms, each only when its weight is > 0 (vocab mode, so their
    gradient is recomputed in the backward; each pass adds its own hidden and weight gradient):

    * text gate: ``(L_t, s_t)``, ``L_t = lse_nc((z - s_max) / T)`` over the NON-coord columns (the coord
      columns masked to ``-inf``) and ``s_t`` the coord slice, of the text rows;
    * hard CE at ``T != 1``: ``(L_1, s_1)``, ``L_1 = lse(z - s_max)`` at T = 1 and the coord slice, of the
      coord rows (at T = 1 the main pass's ``L`` is that already: None).
    """
    dev = rows.device
    tg = hard = None
    if weights[3] > 0:
        trows = rows[~row_is_coord]
        n = trows.numel()
        if n:
            L_t, s_t, _, _ = _FusedHead.apply(
                *(h2, weight, bias, trows, torch.ones(n, dtype=torch.bool, device=dev)),
                *(torch.zeros(n, dtype=torch.long, device=dev), coord_ids, inv_t, chunk, None, None),
                _ColumnMask(coord_ids),
            )
        else:
            L_t, s_t = torch.zeros(0, device=dev), torch.zeros(0, K, device=dev)
        tg = (L_t, s_t)
    if weights[4] > 0 and inv_t != 1.0:
        crows = rows[row_is_coord]
        n = crows.numel()
        if n:
            L_1, s_1, _, _ = _FusedHead.apply(
                *(h2, weight, bias, crows, torch.ones(n, dtype=torch.bool, device=dev)),
                *(torch.zeros(n, dtype=torch.long, device=dev), coord_ids, 1.0, chunk, None, None, None),
            )
        else:
            L_1, s_1 = torch.zeros(0, device=dev), torch.zeros(0, K, device=dev)
        hard = (L_1, s_1)
    return tg, hard


def _assemble(
    outs,
    extras,
    row_is_coord,
    k_star,
    q_table,
    cdf_table,
    inv_t,
    n_text,
    n_coord,
    weights,
    normalizer,
    coord_diag: bool = False,
) -> Stage1LossResult:
    """``stage1_loss``'s formulas on the small outputs ``(L, s, zy)`` of :class:`_FusedHead` and the
    optional terms' ``extras`` (:func:`_extra_passes`); ``weights`` = ``(soft_ce_weight, w1_weight,
    gate_weight, text_gate_weight, coord_ce_weight)``; ``coord_diag`` adds the diagnostics of the coord
    slice (``coordexp.train.loss.coord_diagnostics``)."""
    L, s, zy = outs
    tg, hard = extras
    text_ce_sum = (L[~row_is_coord] - zy).sum()  # lse(z) - z[y]
    rel_crd = L[row_is_coord]  # lse(z/T) - s_max/T
    s_max, s_arg = s.detach().max(dim=1, keepdim=True)  # the first maximum, as torch.argmax
    s_rel = s - s_max  # anchored at s_max
    d = s_rel * inv_t
    soft_ce_weight, w1_weight, gate_weight, text_gate_weight, coord_ce_weight = weights
    text_gate_rows = coord_ce_rows = None
    if text_gate_weight > 0:
        # -log(1 - m) = softplus(lse_coord(z/T) - lse_noncoord(z/T)), both anchored at s_max
        L_t, s_t = tg
        lse_coord = torch.logsumexp((s_t - s_t.detach().max(dim=1, keepdim=True).values) * inv_t, dim=1)
        text_gate_rows = torch.nn.functional.softplus(lse_coord - L_t)
    if coord_ce_weight > 0:
        # lse(z) - z[y] = lse(z - s_max) - (s[k*] - s_max), from the main pass at T = 1
        L_1, s_rel_1 = (rel_crd, s_rel) if hard is None else (hard[0], hard[1] - hard[1].detach().max(1, True).values)
        coord_ce_rows = L_1 - s_rel_1.gather(1, k_star[:, None]).squeeze(1)
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
        argmax=s_arg.squeeze(1),
    )
