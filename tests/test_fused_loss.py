"""``fused_stage1_loss`` (hidden + LM head, chunked) against ``stage1_loss`` on materialised logits
and against a float64 reference written straight from the formulas of ``coordexp.train.loss``'s
docstring, in both of its modes ("vocab" and "rows"; tests that apply to both are parametrized over
``mode``), to the same tolerances. The mode that ran is the result's ``mode``; rows mode's backward
(the gradient formed in the forward, plus a recompute of rows whose upstream gradient it does not
cover) is observed by wrapping the module's backward helpers (the ``backward_counts`` fixture).

Tolerances, and why:

* fp32 inputs: both paths compute the logits with an fp32 matmul, but with different blocking
  (one vocabulary or row chunk at a time vs the whole product), so each logit differs by a few
  ulp of ``sum |h_i w_i|``; everything after is fp32 on the same formulas. Values: ``1e-5`` relative (+1e-6 absolute for
  terms that are ~0, e.g. a gate of 1e-7 is the difference of two O(1) log-sum-exps), plus
  ``4 eps32 max|z| / T``: a logit that differs by one matmul rounding moves a log-sum-exp of
  ``z / T`` by up to that much, and the gate is a difference of two such (observed: at
  ``max|z| = 22, T = 0.125`` the materialised path is 3e-6 off float64, the fused one 6e-7).
  Gradients w.r.t. hidden, weight, bias: ``max|g - g_ref| <= 1e-5 max|g_ref| + 1e-7``; the
  absolute floor covers entries whose gradient cancels (softmax minus one-hot summed over rows).
* bf16 inputs: the upcast to fp32 is exact, so values meet the fp32 tolerance against the
  materialised fp32 path fed the same (rounded) inputs; gradients come back in bf16, so they
  are within one bf16 rounding of the fp32 gradient: ``2**-8 max|g|`` (+ the fp32 tolerance).
"""

from __future__ import annotations

import collections

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train import fused_loss
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import GlobalCounts, stage1_loss

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

EPS32 = torch.finfo(torch.float32).eps
N_TEXT_IDS = 100
V = K + N_TEXT_IDS
D = 48
WEIGHTS = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
"""The loss keywords at the config's defaults; tests override the ones they are about."""
TERMS = (
    "total",
    "text_ce",
    "soft_ce",
    "w1",
    "gate",
    "coord_vocab_mass",
    "text_ce_sum",
    "soft_ce_sum",
    "w1_sum",
    "gate_sum",
    "mass_sum",
)


def make_vocab(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coord_id_map, coord ids in bin order, text ids), coord ids scattered over the vocab."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(V, generator=g)
    cmap = torch.full((V,), -1, dtype=torch.long)
    cmap[perm[:K]] = torch.arange(K)
    return cmap, perm[:K], perm[K:].sort().values


CMAP, COORD_IDS, TEXT_IDS = make_vocab()


def make_case(
    n: int,
    coord_frac: float,
    ignored_frac: float,
    *,
    seed: int,
    scale: float = 1.0,
    bias: bool = True,
    dtype: torch.dtype = torch.float32,
):
    g = torch.Generator().manual_seed(seed)
    is_c = torch.rand(n, generator=g) < coord_frac
    lab = torch.where(
        is_c,
        COORD_IDS[torch.randint(0, K, (n,), generator=g)],
        TEXT_IDS[torch.randint(0, N_TEXT_IDS, (n,), generator=g)],
    )
    lab[torch.rand(n, generator=g) < ignored_frac] = -100
    h = torch.randn(n, D, generator=g) * scale
    w = torch.randn(V, D, generator=g) / D**0.5
    b = torch.randn(V, generator=g) * 0.5 if bias else None
    h, w = h.to(dtype), w.to(dtype)
    b = None if b is None else b.to(dtype)
    return lab, h, w, b


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _grads(y, xs):
    xs_ = [x for x in xs if x is not None]
    gs = torch.autograd.grad(y, xs_, allow_unused=True)
    gs = [torch.zeros_like(x) if g is None else g for x, g in zip(xs_, gs)]
    it = iter(gs)
    return [None if x is None else next(it) for x in xs]


def _close_value(got, want, rtol=1e-5, atol=1e-6):
    got, want = float(torch.as_tensor(got).detach()), float(torch.as_tensor(want).detach())
    assert abs(got - want) <= rtol * abs(want) + atol, (got, want)


def _close_grad(g, g_ref, rtol=1e-5, atol=1e-7):
    if g_ref is None:
        assert g is None
        return
    assert g.shape == g_ref.shape
    scale = float(g_ref.abs().max()) if g_ref.numel() else 0.0
    err = float((g.double() - g_ref.double()).abs().max()) if g_ref.numel() else 0.0
    assert err <= rtol * scale + atol, (err, scale)


def weights(**kw) -> dict:
    """:data:`WEIGHTS` with ``kw`` overriding."""
    return {**WEIGHTS, **kw}


def chunking(mode: str, chunk: int) -> dict:
    """``fused_stage1_loss`` keywords for ``mode`` with ``chunk`` vocabulary columns (vocab mode) or
    supervised rows (rows mode) per chunk."""
    return {"mode": mode, ("chunk_size" if mode == "vocab" else "row_chunk"): chunk}


@pytest.fixture
def backward_counts(monkeypatch):
    """Which backward path ran, counted by wrapping ``fused_loss``'s helpers: ``"backward:saved"`` per
    backward that used the gradient a rows-mode forward saved (only those split the upstream
    gradient, ``_split_upstream``), ``"backward:recomputed_rows"`` += the supervised rows whose
    logits a backward recomputed (``_add_recomputed_grads``; all rows in vocab mode)."""
    counts = collections.Counter()
    split, recompute = fused_loss._split_upstream, fused_loss._add_recomputed_grads

    def counted_split(g, k):
        counts["backward:saved"] += 1
        return split(g, k)

    def counted_recompute(gh, gw, gb, h, *rest):
        counts["backward:recomputed_rows"] += h.shape[0]
        return recompute(gh, gw, gb, h, *rest)

    monkeypatch.setattr(fused_loss, "_split_upstream", counted_split)
    monkeypatch.setattr(fused_loss, "_add_recomputed_grads", counted_recompute)
    return counts


def run_both(lab, h, w, b, *, chunks, loss_of=lambda r: r.total, **kw):
    """(fused result, fused grads, materialised result, materialised grads) of ``loss_of``;
    ``chunks`` = the fused-only keywords (see :func:`chunking`)."""
    kw = weights(**kw)
    hf, wf, bf = _leaves(h, w, b)
    res_f = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **chunks, **kw)
    g_f = _grads(loss_of(res_f), [hf, wf, bf])
    hm, wm, bm = _leaves(h.float(), w.float(), None if b is None else b.float())
    z = hm @ wm.T + (0 if bm is None else bm)
    res_m = stage1_loss(z, lab, CMAP, **kw)
    g_m = _grads(loss_of(res_m), [hm, wm, bm])
    return res_f, g_f, res_m, g_m


def _check_all(res_f, g_f, res_m, g_m):
    for name in TERMS:
        _close_value(getattr(res_f, name), getattr(res_m, name))
    assert (res_f.coord_tokens, res_f.text_tokens) == (res_m.coord_tokens, res_m.text_tokens)
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


# ------------------------------------------------------------------------------------------------
# float64 reference, straight from the formulas (no library code)
# ------------------------------------------------------------------------------------------------


def reference64(
    lab,
    h,
    w,
    b,
    *,
    temperature,
    target_sigma,
    target_truncate,
    soft_ce_weight,
    w1_weight,
    gate_weight,
    text_gate_weight,
    coord_ce_weight,
):
    z = h.double() @ w.double().T + (0 if b is None else b.double())
    T = temperature
    i = torch.arange(K, dtype=torch.float64)
    text, ce, w1s, gates, text_gates, hard = [], [], [], [], [], []
    for r in range(z.shape[0]):
        t = int(lab[r])
        if t == -100:
            continue
        k = int(CMAP[t])
        if k < 0:
            text.append(torch.logsumexp(z[r], 0) - z[r, t])
            # -log(1 - coord mass of softmax(z / T)) = lse(z / T) - lse(z_noncoord / T)
            text_gates.append(torch.logsumexp(z[r] / T, 0) - torch.logsumexp(z[r, CMAP < 0] / T, 0))
            continue
        hard.append(torch.logsumexp(z[r], 0) - z[r, t])
        s = z[r, COORD_IDS] / T
        log_p = s - torch.logsumexp(s, 0)
        q = torch.exp(-0.5 * ((i - k) / target_sigma) ** 2) * ((i - k).abs() <= target_truncate)
        q = q / q.sum()
        ce.append(-(q * log_p).sum())
        w1s.append((log_p.exp().cumsum(0) - q.cumsum(0)).abs().sum() / (K - 1))
        gates.append(torch.logsumexp(z[r] / T, 0) - torch.logsumexp(s, 0))

    def mean(xs):
        return torch.stack(xs).mean() if xs else z.sum() * 0.0

    out = {"text_ce": mean(text), "soft_ce": mean(ce), "w1": mean(w1s), "gate": mean(gates)}
    out.update(text_gate=mean(text_gates), coord_ce=mean(hard))
    out["total"] = (
        out["text_ce"]
        + text_gate_weight * out["text_gate"]
        + soft_ce_weight * out["soft_ce"]
        + w1_weight * out["w1"]
        + gate_weight * out["gate"]
        + coord_ce_weight * out["coord_ce"]
    )
    return out


# ------------------------------------------------------------------------------------------------
# agreement with the materialised path and with float64, in both modes
# ------------------------------------------------------------------------------------------------


# vocab mode: columns per chunk (1 column .. all of V); rows mode: rows per chunk: single rows, 13
# (the 46-53 supervised rows leave a last chunk of 1, 7 or 9 rows) and all rows in one chunk
@pytest.mark.parametrize(
    "mode,chunk",
    [("vocab", 1), ("vocab", 7), ("vocab", 64), ("vocab", 1000), ("rows", 1), ("rows", 13), ("rows", 1000)],
)
@pytest.mark.parametrize("temperature", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_materialised_fp32(mode, chunk, temperature, bias, backward_counts):
    lab, h, w, b = make_case(61, 0.5, 0.2, seed=chunk * 7 + int(temperature * 10), bias=bias)
    kw = dict(temperature=temperature, soft_ce_weight=0.7, w1_weight=1.3, gate_weight=0.9)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, chunk), **kw)
    _check_all(res_f, g_f, res_m, g_m)
    assert res_f.mode == mode and res_m.mode is None
    if mode == "rows":  # total: the gradient the forward formed is used as is
        assert backward_counts["backward:saved"] == 1 and backward_counts["backward:recomputed_rows"] == 0


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_matches_float64_reference(mode, temperature):
    lab, h, w, b = make_case(23, 0.6, 0.15, seed=3, scale=2.0)
    kw = weights(temperature=temperature, soft_ce_weight=0.5, w1_weight=2.0, gate_weight=1.5)
    hf, wf, bf = _leaves(h, w, b)
    res = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **chunking(mode, 5), **kw)
    h64, w64, b64 = _leaves(h.double(), w.double(), b.double())
    ref = reference64(lab, h64, w64, b64, **kw)
    for name in ("total", "text_ce", "soft_ce", "w1", "gate"):
        _close_value(getattr(res, name), ref[name])
    for g, gr in zip(_grads(res.total, [hf, wf, bf]), _grads(ref["total"], [h64, w64, b64])):
        _close_grad(g, gr)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 40),
    coord_frac=st.floats(0.0, 1.0),
    ignored_frac=st.floats(0.0, 0.5),
    mode=st.sampled_from(["vocab", "rows"]),
    chunk=st.integers(1, 50),
    temperature=st.floats(0.1, 5.0),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_random_cases(n, coord_frac, ignored_frac, mode, chunk, temperature, scale, seed):
    lab, h, w, b = make_case(n, coord_frac, ignored_frac, seed=seed, scale=scale)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, chunk), temperature=temperature)
    zmax = float((h @ w.T + b).abs().max())
    for name in TERMS:
        n_terms = res_m.coord_tokens if name.endswith("_sum") and name != "text_ce_sum" else 1
        _close_value(
            getattr(res_f, name), getattr(res_m, name), atol=1e-6 + 4 * EPS32 * zmax / temperature * max(n_terms, 1)
        )
    # Gradients: 1e-5 plus the same fp32 conditioning term as the values. With peaked coord rows
    # (|z| / T ~ 100) the total's gradient is a near-cancellation of the full and the coord-slice
    # softmax, each carrying a relative error of ~eps |z| / T from its own rounding of the logits
    # (hypothesis found rows mode 1.6e-5 off at n=7, T=0.25, scale 5, seed 0; vocab mode 4e-7).
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr, rtol=1e-5 + 4 * EPS32 * zmax / temperature)


# ------------------------------------------------------------------------------------------------
# edge cases
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,chunk", [("vocab", 1), ("vocab", 7), ("vocab", 1000), ("rows", 1), ("rows", 10)])
@pytest.mark.parametrize("temperature", [1.0, 0.3])
@pytest.mark.parametrize("grad", [False, True])
def test_argmax_is_the_materialised_logits_argmax(mode, chunk, temperature, grad):
    """token_acc in fused training comes from this: the argmax of every supervised row (coord rows
    are shifted and scaled by 1/T inside the head, which must not move it), -100 elsewhere."""
    lab, h, w, b = make_case(61, 0.5, 0.2, seed=3, bias=True)
    hf = h.clone().requires_grad_(grad)
    res = fused_stage1_loss(hf, w, lab, CMAP, bias=b, **weights(temperature=temperature), **chunking(mode, chunk))
    z = h @ w.T + b
    sup = lab != -100
    assert res.argmax.shape == lab.reshape(-1).shape
    assert torch.equal(res.argmax[sup], z[sup].argmax(dim=1))
    assert bool((res.argmax[~sup] == -100).all())


def test_argmax_ties_take_the_first_maximum():
    """Rows of equal logits (a zero hidden row, no bias): every column ties, torch.argmax says 0."""
    lab, h, w, _ = make_case(20, 0.5, 0.0, seed=2, bias=False)
    h[::2] = 0.0
    for mode in ("vocab", "rows"):
        res = fused_stage1_loss(h, w, lab, CMAP, **WEIGHTS, **chunking(mode, 3))
        assert torch.equal(res.argmax, (h @ w.T).argmax(dim=1))


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_no_coord_rows(mode):
    lab, h, w, b = make_case(30, 0.0, 0.2, seed=4)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 8), temperature=0.7)
    assert res_f.coord_tokens == 0
    _check_all(res_f, g_f, res_m, g_m)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_only_coord_rows(mode):
    lab, h, w, b = make_case(30, 1.0, 0.2, seed=5)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 8), temperature=0.7)
    assert res_f.text_tokens == 0
    _check_all(res_f, g_f, res_m, g_m)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_all_ignored(mode):
    lab, h, w, b = make_case(12, 0.5, 0.0, seed=6)
    lab[:] = -100
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 5))
    assert res_f.coord_tokens == res_f.text_tokens == 0
    assert float(res_f.total) == 0.0 and torch.isfinite(res_f.coord_vocab_mass)
    assert res_f.mode == mode
    for g in g_f:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_unsupervised_rows_get_zero_gradient(mode):
    lab, h, w, b = make_case(20, 0.5, 0.0, seed=7)
    lab[::3] = -100
    hf, wf, bf = _leaves(h, w, b)
    res = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **WEIGHTS, **chunking(mode, 4))
    (gh,) = torch.autograd.grad(res.total, [hf])
    assert torch.equal(gh[::3], torch.zeros_like(gh[::3]))
    assert bool((gh[1::3].abs().sum(1) > 0).all())


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("world", [1, 2])
def test_normalizer(mode, world, backward_counts):
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=8)
    norm = GlobalCounts(text_tokens=97, coord_tokens=53, world_size=world)
    _check_all(*run_both(lab, h, w, b, chunks=chunking(mode, 9), temperature=0.8, normalizer=norm, gate_weight=2.0))
    if mode == "rows":  # k follows the global divisors: still the saved gradient
        assert backward_counts["backward:saved"] == 1 and backward_counts["backward:recomputed_rows"] == 0


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_batched_3d_input(mode):
    lab, h, w, b = make_case(24, 0.5, 0.2, seed=9)
    hf, wf, bf = _leaves(h.reshape(4, 6, D), w, b)
    res = fused_stage1_loss(hf, wf, lab.reshape(4, 6), CMAP, bias=bf, **WEIGHTS, **chunking(mode, 5))
    (gh,) = torch.autograd.grad(res.total, [hf])
    res2, g2, _, _ = run_both(lab, h, w, b, chunks=chunking("vocab", 5))
    _close_value(res.total, res2.total, rtol=1e-6)
    assert gh.shape == (4, 6, D)
    _close_grad(gh.reshape(24, D), g2[0])


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_gate_clamp_rows(mode):
    """Coord rows whose non-coord logits are hugely negative: the true gate is ~1e-30, so both
    paths return pure round-off of ``lse(z) - lse(s)`` (a few ulp of L ~ 10, ~1e-6; the online
    log-sum-exp over ~300 chunks of 6 columns rounds differently from one pass) and the clamp at 0
    may zero either one's gate gradient, which is itself ~1e-30: values within 1e-5, gradients equal.
    In rows mode a clamped row's upstream gradient differs from the ``k`` the forward assumed, so
    the backward recomputes that row."""
    lab, h, w, b = make_case(30, 0.7, 0.0, seed=10)
    b = torch.zeros(V)
    b[TEXT_IDS] = -80.0
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 6), temperature=1.0)
    assert 0.0 <= float(res_f.gate) < 1e-5
    for name in TERMS:
        _close_value(
            getattr(res_f, name),
            getattr(res_m, name),
            atol=1e-5 if name in ("total", "gate", "gate_sum", "coord_vocab_mass", "mass_sum") else 1e-6,
        )
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


# ------------------------------------------------------------------------------------------------
# the backward is exact for any scalar built from the result, not only ``total``
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("which", ["scaled_total", "text_ce", "gate_plus_w1", "mass", "total_plus_text_ce"])
def test_any_upstream_gradient_is_exact(mode, which):
    loss_of = {
        "scaled_total": lambda r: 3.5 * r.total,
        "text_ce": lambda r: r.text_ce,
        "gate_plus_w1": lambda r: 2.0 * r.gate + r.w1 - 0.5 * r.text_ce,
        "mass": lambda r: r.coord_vocab_mass,
        "total_plus_text_ce": lambda r: r.total + 3 * r.text_ce,
    }[which]
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=12)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 9), temperature=0.6, loss_of=loss_of)
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


@pytest.mark.parametrize("scale", [0.25, 1.0, 7.0])
def test_rows_mode_uses_the_saved_gradient_for_multiples_of_total(scale, backward_counts):
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=18)
    res_f, g_f, res_m, g_m = run_both(
        lab, h, w, b, chunks=chunking("rows", 9), temperature=0.6, loss_of=lambda r: scale * r.total
    )
    _check_all(res_f, g_f, res_m, g_m)
    assert res_f.mode == "rows"
    assert backward_counts["backward:saved"] == 1 and backward_counts["backward:recomputed_rows"] == 0


@pytest.mark.parametrize("which", ["text_ce", "total_plus_text_ce"])
def test_rows_mode_recomputes_only_the_rows_off_the_saved_gradient(which, backward_counts):
    """A text-CE-only (or text-CE-heavy) backward differs from ``k`` on one kind of row only: just
    those are recomputed, and the gradient is still exact."""
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=19)
    loss_of = (lambda r: r.text_ce) if which == "text_ce" else (lambda r: r.total + 3 * r.text_ce)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking("rows", 9), temperature=0.6, loss_of=loss_of)
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)
    assert res_f.mode == "rows" and backward_counts["backward:saved"] == 1
    assert backward_counts["backward:recomputed_rows"] in (res_f.text_tokens, res_f.coord_tokens)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_retain_graph_second_backward(mode, backward_counts):
    lab, h, w, b = make_case(30, 0.5, 0.1, seed=13)
    hf, wf, bf = _leaves(h, w, b)
    res = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **WEIGHTS, **chunking(mode, 7))
    g1 = torch.autograd.grad(res.total, [hf, wf, bf], retain_graph=True)
    g2 = torch.autograd.grad(res.total, [hf, wf, bf])
    for a, c in zip(g1, g2):
        _close_grad(c, a)
    if mode == "rows":  # the saved gradient serves the first backward; the second recomputes all rows
        n_sup = res.text_tokens + res.coord_tokens
        assert backward_counts["backward:saved"] == 1 and backward_counts["backward:recomputed_rows"] == n_sup


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_frozen_weight_and_no_grad(mode, monkeypatch):
    lab, h, w, b = make_case(30, 0.5, 0.1, seed=14)
    hf = h.clone().requires_grad_()
    res = fused_stage1_loss(hf, w, lab, CMAP, bias=b, **WEIGHTS, **chunking(mode, 7))
    (gh,) = torch.autograd.grad(res.total, [hf])
    _, g_f, _, _ = run_both(lab, h, w, b, chunks=chunking("vocab", 7))
    _close_grad(gh, g_f[0], rtol=1e-6)
    # no gradient wanted: rows mode computes no k and so forms no gradient in its forward
    monkeypatch.setattr(fused_loss, "_total_weights", lambda *a: pytest.fail("gradient work under no_grad"))
    with torch.no_grad():
        r0 = fused_stage1_loss(hf, w, lab, CMAP, bias=b, **WEIGHTS, **chunking(mode, 7))
    _close_value(r0.total, res.total, rtol=1e-6)
    r1 = fused_stage1_loss(h, w, lab, CMAP, bias=b, **WEIGHTS, **chunking(mode, 7))  # no input requires grad
    _close_value(r1.total, res.total, rtol=1e-6)


def test_auto_mode_picks_rows_for_tall_row_chunks(backward_counts, monkeypatch):
    lab, h, w, b = make_case(40, 0.5, 0.0, seed=20)
    res = fused_stage1_loss(h, w, lab, CMAP, bias=b, **WEIGHTS)  # default chunk: ceil(40 / 16) = 3 rows
    assert res.mode == "vocab" and not backward_counts  # no input requires grad: no backward
    monkeypatch.setattr(fused_loss, "MIN_ROW_CHUNK", 3)
    res = fused_stage1_loss(h, w, lab, CMAP, bias=b, **WEIGHTS)
    assert res.mode == "rows"


# ------------------------------------------------------------------------------------------------
# bf16 inputs
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("temperature", [1.0, 0.4])
def test_bf16_inputs(mode, temperature):
    lab, h, w, b = make_case(45, 0.5, 0.1, seed=15, dtype=torch.bfloat16)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 8), temperature=temperature)
    assert res_f.total.dtype == torch.float32
    for name in TERMS:  # fp32 arithmetic on exactly upcast inputs
        _close_value(getattr(res_f, name), getattr(res_m, name))
    for g, gr, x in zip(g_f, g_m, (h, w, b)):
        assert g.dtype == torch.bfloat16 == x.dtype
        _close_grad(g, gr, rtol=2**-8 + 1e-5)


# ------------------------------------------------------------------------------------------------
# validation
# ------------------------------------------------------------------------------------------------


def test_validation_errors():
    lab, h, w, b = make_case(8, 0.5, 0.0, seed=16)
    with pytest.raises(ValueError, match="D="):
        fused_stage1_loss(h[:, :10], w, lab, CMAP, **WEIGHTS)
    with pytest.raises(ValueError, match="aligned"):
        fused_stage1_loss(h, w, lab[:-1], CMAP, **WEIGHTS)
    with pytest.raises(ValueError, match="chunk_size"):
        fused_stage1_loss(h, w, lab, CMAP, chunk_size=0, **WEIGHTS)
    with pytest.raises(ValueError, match="row_chunk"):
        fused_stage1_loss(h, w, lab, CMAP, mode="rows", row_chunk=0, **WEIGHTS)
    with pytest.raises(ValueError, match="mode"):
        fused_stage1_loss(h, w, lab, CMAP, mode="columns", **WEIGHTS)
    with pytest.raises(ValueError, match="temperature"):
        fused_stage1_loss(h, w, lab, CMAP, **weights(temperature=0.0))
    with pytest.raises(ValueError, match="bias"):
        fused_stage1_loss(h, w, lab, CMAP, bias=torch.zeros(V - 1), **WEIGHTS)
    with pytest.raises(ValueError, match="gate_weight"):
        fused_stage1_loss(h, w, lab, CMAP, **weights(gate_weight=-1.0))
    for name in ("text_gate_weight", "coord_ce_weight"):
        with pytest.raises(ValueError, match=name):
            fused_stage1_loss(h, w, lab, CMAP, **weights(**{name: -1.0}))


@pytest.mark.parametrize("missing", sorted(WEIGHTS))
def test_loss_settings_have_no_defaults_here(missing):
    """The config schema is the one source of the loss settings' defaults: the function has none."""
    lab, h, w, b = make_case(8, 0.5, 0.0, seed=16)
    kw = {k: v for k, v in WEIGHTS.items() if k != missing}
    with pytest.raises(TypeError, match=missing):
        fused_stage1_loss(h, w, lab, CMAP, **kw)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_autocast_does_not_lower_precision(mode):
    """Trainers run the loss under bf16 autocast; the fused matmuls must stay fp32."""
    lab, h, w, b = make_case(30, 0.5, 0.1, seed=17)
    res_ref, g_ref, _, _ = run_both(lab, h, w, b, chunks=chunking(mode, 7), temperature=0.5)
    hf, wf, bf = _leaves(h, w, b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        res = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **weights(temperature=0.5), **chunking(mode, 7))
        gs = _grads(res.total, [hf, wf, bf])
    for name in TERMS:
        _close_value(getattr(res, name), getattr(res_ref, name), rtol=1e-6)
    for g, gr in zip(gs, g_ref):
        assert g.dtype == torch.float32
        _close_grad(g, gr, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# the optional terms: text gate and hard coord CE
# ------------------------------------------------------------------------------------------------

OPTIONAL_TERMS = TERMS + ("text_gate", "coord_ce", "text_gate_sum", "coord_ce_sum")
ON = dict(text_gate_weight=0.8, coord_ce_weight=0.6)


# vocab chunks of 1 column: some chunks are entirely coord columns, all -inf for the text gate's pass
@pytest.mark.parametrize("mode,chunk", [("vocab", 1), ("vocab", 7), ("rows", 1), ("rows", 13)])
@pytest.mark.parametrize("temperature", [1.0, 0.4])
@pytest.mark.parametrize("bias", [True, False])
def test_optional_terms_match_materialised_fp32(mode, chunk, temperature, bias):
    lab, h, w, b = make_case(61, 0.5, 0.2, seed=chunk * 3 + int(temperature * 10), bias=bias)
    kw = dict(temperature=temperature, soft_ce_weight=0.7, w1_weight=1.3, gate_weight=0.9, **ON)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, chunk), **kw)
    for name in OPTIONAL_TERMS:
        _close_value(getattr(res_f, name), getattr(res_m, name))
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)
    assert res_f.mode == mode


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("which", ["text_gate", "coord_ce", "both"])
def test_optional_terms_match_float64_reference(mode, temperature, which):
    lab, h, w, b = make_case(23, 0.6, 0.15, seed=3, scale=2.0)
    on = {"text_gate": dict(text_gate_weight=1.3), "coord_ce": dict(coord_ce_weight=0.9), "both": ON}[which]
    kw = weights(temperature=temperature, soft_ce_weight=0.5, w1_weight=2.0, gate_weight=1.5, **on)
    hf, wf, bf = _leaves(h, w, b)
    res = fused_stage1_loss(hf, wf, lab, CMAP, bias=bf, **chunking(mode, 5), **kw)
    h64, w64, b64 = _leaves(h.double(), w.double(), b.double())
    ref = reference64(lab, h64, w64, b64, **kw)
    names = [n for n in ("text_gate", "coord_ce") if kw[f"{n}_weight"] > 0]
    for name in ("total", "text_ce", "soft_ce", "w1", "gate", *names):
        _close_value(getattr(res, name), ref[name])
    for name in ("text_gate", "coord_ce"):
        if name not in names:
            assert getattr(res, name) is None
    for loss in ("total", *names):
        got = torch.autograd.grad(getattr(res, loss), [hf, wf, bf], retain_graph=True)
        want = torch.autograd.grad(ref[loss], [h64, w64, b64], retain_graph=True)
        for g, gr in zip(got, want):
            _close_grad(g, gr)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("coord_bias", [40.0, -40.0])
def test_text_gate_near_extreme_coord_mass(mode, coord_bias):
    """Coord columns biased by +/-40: at text rows the coord mass is within ~1e-14 of 1 (a large text
    gate) or ~1e-14 (a tiny one); the fused and materialised paths agree on both terms and the gradient."""
    lab, h, w, b = make_case(40, 0.4, 0.1, seed=30)
    b = torch.zeros(V)
    b[COORD_IDS] = coord_bias
    kw = dict(temperature=0.7, **ON)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 6), **kw)
    assert (float(res_m.text_gate) > 20) if coord_bias > 0 else (float(res_m.text_gate) < 1e-10)
    for name in ("total", "text_gate", "coord_ce"):
        _close_value(getattr(res_f, name), getattr(res_m, name), atol=1e-6 if coord_bias > 0 else 1e-12)
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("which", ["text_gate", "coord_ce", "text_gate_plus_w1"])
def test_optional_terms_any_upstream_gradient_is_exact(mode, which):
    loss_of = {
        "text_gate": lambda r: r.text_gate,
        "coord_ce": lambda r: 2.0 * r.coord_ce,
        "text_gate_plus_w1": lambda r: r.text_gate + r.w1 - 0.5 * r.coord_ce,
    }[which]
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=31)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 9), temperature=0.6, loss_of=loss_of, **ON)
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("world", [1, 2])
def test_optional_terms_normalizer(mode, world):
    lab, h, w, b = make_case(40, 0.5, 0.1, seed=32)
    norm = GlobalCounts(text_tokens=97, coord_tokens=53, world_size=world)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 9), temperature=0.8, normalizer=norm, **ON)
    for name in OPTIONAL_TERMS:
        _close_value(getattr(res_f, name), getattr(res_m, name))
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
def test_optional_terms_bf16_inputs(mode):
    lab, h, w, b = make_case(45, 0.5, 0.1, seed=33, dtype=torch.bfloat16)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking(mode, 8), temperature=0.4, **ON)
    for name in OPTIONAL_TERMS:
        _close_value(getattr(res_f, name), getattr(res_m, name))
    # each optional term's head pass returns its own bf16 gradient, which autograd adds to the main
    # one: up to one bf16 rounding per pass (3 here: main, text gate, hard CE at T != 1) and the sums'
    for g, gr in zip(g_f, g_m):
        assert g.dtype == torch.bfloat16
        _close_grad(g, gr, rtol=4 * 2**-8 + 1e-5)


@pytest.mark.parametrize("kind", ["no_text", "no_coord"])
def test_optional_terms_without_their_rows(kind):
    lab, h, w, b = make_case(30, 1.0 if kind == "no_text" else 0.0, 0.2, seed=34)
    res_f, g_f, res_m, g_m = run_both(lab, h, w, b, chunks=chunking("vocab", 8), temperature=0.7, **ON)
    for name in OPTIONAL_TERMS:
        _close_value(getattr(res_f, name), getattr(res_m, name))
    assert float(res_f.text_gate if kind == "no_text" else res_f.coord_ce) == 0.0
    for g, gr in zip(g_f, g_m):
        _close_grad(g, gr)
