"""Stage-1 loss against a plain float64 reference, in the style of Liger-Kernel's tests.

The reference below is written straight from the formulas of ``coordexp.train.loss``'s docstring with explicit ops
(max-shifted log-sum-exp, explicit softmax, explicit cumsum); it shares no code with
``coordexp.train.loss``. Values and gradients (autograd w.r.t. the logits) of every term are compared.

Tolerances, and why they are what they are:

* fp32 logits: the library works in fp32 on the exact fp32 input. Relative error of a value is
  a few ulp times the condition of the formula, so ``rtol = 1e-5``. Where ``|z| / T`` is large
  the anchored log-sum-exp keeps errors proportional to the *value* (a difference ``z_i - z_j``
  is rounded once, error ``eps |z_i - z_j| / T``); the bound we assert is
  ``|lib - ref| <= 1e-5 |ref| + 4 eps32 max|z| / T * 1e-3 + 1e-6`` — the middle term is the
  justified worst case ``eps32 * |logit| / T`` scaled by the 1e-3 of a loss term whose value is
  itself that small; in practice the observed error is far below it (see ``_close``).
* gradients: elementwise relative error is meaningless for entries that are ~0; we bound
  ``max |g_lib - g_ref| <= 1e-5 max |g_ref| + 4 eps32 max|z| / T * 1e-3 max|g_ref| + 4 eps32 / T``.
  The last term covers gradients that cancel far below their natural scale ``softmax / T``:
  the gate's gradient ``(softmax(z/T) - softmax_coord(s/T)) / T`` when nearly all mass is on
  coord tokens is the difference of two O(1/T) fp32 numbers, so it is known to a few eps / T
  absolute. For the same reason a gate below ~1e-7 is known to ~1e-7 absolute, not relative.
* bf16 / fp16 logits: the upcast to fp32 is exact, so values meet the fp32 tolerance against a
  reference fed the same (rounded) logits; gradients come back in the logits' dtype, so they are
  within one rounding of that dtype: ``max|g| * 2^-8`` (bf16) or ``2^-11`` (fp16) plus fp16's
  subnormal floor.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train.loss import (
    GlobalCounts,
    Stage1LossResult,
    count_tokens,
    global_counts,
    soft_target_table,
    stage1_loss,
)

pytestmark = pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")

EPS32 = torch.finfo(torch.float32).eps
N_TEXT_IDS = 50
V = K + N_TEXT_IDS
TERMS = ("text_ce", "soft_ce", "w1", "gate", "coord_vocab_mass", "total")
OPTIONAL = ("text_gate", "coord_ce")
WEIGHTS = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
"""The loss keywords at the config's defaults; tests override the ones they are about."""


def weights(**kw) -> dict:
    """:data:`WEIGHTS` with ``kw`` overriding."""
    return {**WEIGHTS, **kw}


# ------------------------------------------------------------------------------------------------
# fixtures: a vocabulary whose coord ids are scattered and NOT in bin order
# ------------------------------------------------------------------------------------------------


def make_vocab(seed: int = 0, v: int = V) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coord_id_map, coord ids in bin order, text ids)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(v, generator=g)
    coord_ids = perm[:K]  # coord_ids[k] = token id of bin k
    text_ids = perm[K:].sort().values
    cmap = torch.full((v,), -1, dtype=torch.long)
    cmap[coord_ids] = torch.arange(K)
    return cmap, coord_ids, text_ids


CMAP, COORD_IDS, TEXT_IDS = make_vocab()


def make_labels(n: int, n_coord: int, n_ignored: int, *, seed: int, bins: list[int] | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    b = torch.randint(0, K, (n_coord,), generator=g)
    if bins:
        b[: len(bins)] = torch.tensor(bins[:n_coord])
    coord = COORD_IDS[b]
    text = TEXT_IDS[torch.randint(0, len(TEXT_IDS), (n - n_coord,), generator=g)]
    lab = torch.cat([coord, text])
    lab = lab[torch.randperm(n, generator=g)]
    lab[torch.randperm(n, generator=g)[:n_ignored]] = -100
    return lab


# ------------------------------------------------------------------------------------------------
# the float64 reference, straight from the formulas
# ------------------------------------------------------------------------------------------------


def _lse(x: torch.Tensor) -> torch.Tensor:
    m = x.max(dim=-1, keepdim=True).values
    return (x - m).exp().sum(dim=-1).log() + m.squeeze(-1)


def reference(
    z: torch.Tensor,
    labels: torch.Tensor,
    *,
    T: float,
    sigma: float,
    truncate: int,
    w_ce: float = WEIGHTS["soft_ce_weight"],
    w_w1: float = WEIGHTS["w1_weight"],
    w_gate: float = WEIGHTS["gate_weight"],
    w_text_gate: float = WEIGHTS["text_gate_weight"],
    w_coord_ce: float = WEIGHTS["coord_ce_weight"],
) -> dict[str, torch.Tensor]:
    """Means of each term over its own tokens, float64; 0 for a term without tokens."""
    z = z.reshape(-1, z.shape[-1]).double()
    y = labels.reshape(-1)
    text_terms, ce_terms, w1_terms, gate_terms, mass_terms = [], [], [], [], []
    text_gate_terms, coord_ce_terms = [], []
    noncoord = CMAP < 0
    i = torch.arange(K, dtype=torch.float64)
    for r in range(z.shape[0]):
        t = int(y[r])
        if t == -100:
            continue
        k = int(CMAP[t])
        if k < 0:  # text: full-vocab CE with plain logits; text gate = -log(1 - m) = lse(z/T) - lse(z_nc/T)
            text_terms.append(_lse(z[r]) - z[r, t])
            text_gate_terms.append(_lse(z[r] / T) - _lse(z[r, noncoord] / T))
            continue
        coord_ce_terms.append(_lse(z[r]) - z[r, t])  # hard full-vocab CE at T = 1
        s = z[r, COORD_IDS] / T
        log_p = s - _lse(s)
        p = log_p.exp()
        w = torch.exp(-0.5 * ((i - k) / sigma) ** 2) * ((i - k).abs() <= truncate).double()
        q = w / w.sum()
        ce_terms.append(-(q * log_p).sum())
        w1_terms.append((p.cumsum(0) - q.cumsum(0)).abs().sum() / (K - 1))
        gate = _lse(z[r] / T) - _lse(s)
        gate_terms.append(gate)
        mass_terms.append(torch.exp(-gate))

    def mean(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs).mean() if xs else z.sum() * 0.0

    out = {
        "text_ce": mean(text_terms),
        "soft_ce": mean(ce_terms),
        "w1": mean(w1_terms),
        "gate": mean(gate_terms),
        "coord_vocab_mass": mean(mass_terms),
        "text_gate": mean(text_gate_terms),
        "coord_ce": mean(coord_ce_terms),
    }
    out["total"] = (
        out["text_ce"]
        + w_text_gate * out["text_gate"]
        + w_ce * out["soft_ce"]
        + w_w1 * out["w1"]
        + w_gate * out["gate"]
        + w_coord_ce * out["coord_ce"]
    )
    return out


def _grad(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(y, x, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def _value_tol(ref: torch.Tensor, zmax: float, T: float) -> float:
    return 1e-5 * abs(float(ref.detach())) + 4 * EPS32 * zmax / T * 1e-3 + 1e-6


def check_against_reference(
    z32: torch.Tensor,
    labels: torch.Tensor,
    *,
    T: float,
    sigma: float,
    truncate: int,
    grad_rtol: float = 1e-5,
    value_extra: float = 0.0,
    text_gate_weight: float = 0.0,
    coord_ce_weight: float = 0.0,
) -> None:
    z_lib = z32.detach().clone().requires_grad_()
    z_ref = z32.detach().double().clone().requires_grad_()
    kw = weights(temperature=T, target_sigma=sigma, target_truncate=truncate)
    kw.update(text_gate_weight=text_gate_weight, coord_ce_weight=coord_ce_weight)
    res = stage1_loss(z_lib, labels, CMAP, **kw)
    ref = reference(
        z_ref, labels, T=T, sigma=sigma, truncate=truncate, w_text_gate=text_gate_weight, w_coord_ce=coord_ce_weight
    )
    zmax = float(z32.detach().abs().max()) if z32.numel() else 0.0
    names = TERMS + tuple(n for n, w in zip(OPTIONAL, (text_gate_weight, coord_ce_weight)) if w > 0)
    for name in TERMS + OPTIONAL:
        if name not in names:  # a term whose weight is 0 is not computed
            assert getattr(res, name) is None and getattr(res, f"{name}_sum") is None, name
    for name in names:
        got, want = getattr(res, name), ref[name]
        assert torch.isfinite(got), name
        tol = _value_tol(want, zmax, T) + value_extra
        assert abs(float(got.detach()) - float(want.detach())) <= tol, (
            name,
            float(got.detach()),
            float(want.detach()),
            tol,
        )
        g_lib, g_ref = _grad(got, z_lib), _grad(want, z_ref)
        assert g_lib.dtype == z32.dtype and g_lib.shape == z32.shape
        scale = float(g_ref.abs().max()) if g_ref.numel() else 0.0
        err = float((g_lib.double() - g_ref).abs().max()) if g_ref.numel() else 0.0
        # the natural scale of a per-row gradient is softmax / T; a term whose gradient cancels
        # to far below that (the gate when almost all mass is on coord tokens) is only known to
        # an absolute few eps / T
        gtol = grad_rtol * scale + 4 * EPS32 * zmax / T * 1e-3 * scale + 4 * EPS32 / T
        assert err <= gtol, (name, err, gtol, scale)


# ------------------------------------------------------------------------------------------------
# reference agreement
# ------------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 10),
    coord_frac=st.floats(0.0, 1.0),
    n_ignored=st.integers(0, 3),
    T=st.floats(0.05, 10.0),
    sigma=st.floats(0.5, 50.0),
    truncate=st.integers(0, 999),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0, 1e4]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_float64_reference(n, coord_frac, n_ignored, T, sigma, truncate, scale, seed):
    n_coord = round(coord_frac * n)
    labels = make_labels(n, n_coord, min(n_ignored, n - 1), seed=seed, bins=[0, 999])
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, V, generator=g) * scale).float()
    check_against_reference(z, labels, T=T, sigma=sigma, truncate=truncate)


@pytest.mark.parametrize("T", [0.05, 1.0, 10.0])
@pytest.mark.parametrize("bins", [[0, 0], [999, 999], [0, 999]])
def test_extreme_logits_and_edge_bins(T, bins):
    """Logits of +/-1e4 with targets at the first and last bin: values and gradients still meet
    the documented bound (errors proportional to eps * |logit| / T only through the values)."""
    labels = make_labels(6, 2, 0, seed=1, bins=bins)
    g = torch.Generator().manual_seed(2)
    z = (torch.rand(6, V, generator=g) * 2 - 1) * 1e4
    z[0, COORD_IDS[500]] = 1e4  # a far-away argmax inside the coord slice
    check_against_reference(z.float(), labels, T=T, sigma=2.0, truncate=16)


@pytest.mark.parametrize("dtype,grad_rel", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)])
def test_low_precision_logits(dtype, grad_rel):
    labels = make_labels(12, 5, 2, seed=3, bins=[0, 999])
    g = torch.Generator().manual_seed(4)
    z = (torch.randn(12, V, generator=g) * 4).to(dtype)
    z_lib = z.clone().requires_grad_()
    res = stage1_loss(z_lib, labels, CMAP, **weights(temperature=0.7))
    z_ref = z.double().requires_grad_()
    ref = reference(z_ref, labels, T=0.7, sigma=WEIGHTS["target_sigma"], truncate=WEIGHTS["target_truncate"])
    for name in TERMS:
        got, want = getattr(res, name), ref[name]
        assert got.dtype == torch.float32 and torch.isfinite(got)
        assert abs(float(got.detach()) - float(want.detach())) <= 1e-5 * abs(float(want.detach())) + 1e-6, name
        g_lib, g_ref = _grad(got, z_lib), _grad(want, z_ref)
        assert g_lib.dtype == dtype and torch.isfinite(g_lib).all()
        scale = float(g_ref.abs().max())
        assert float((g_lib.double() - g_ref).abs().max()) <= grad_rel * scale + 1e-7, name


# ------------------------------------------------------------------------------------------------
# closed forms
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [0.3, 1.0, 4.0])
def test_truncate_zero_soft_ce_is_ce_over_coord_slice(T):
    labels = make_labels(8, 8, 0, seed=5, bins=[0, 999])
    z = torch.randn(8, V, generator=torch.Generator().manual_seed(6)) * 3
    res = stage1_loss(z, labels, CMAP, **weights(temperature=T, target_truncate=0))
    bins = CMAP[labels]
    want = F.cross_entropy(z.double()[:, COORD_IDS] / T, bins)
    assert float(res.soft_ce) == pytest.approx(float(want), rel=1e-6)


def test_w1_of_identical_distributions_is_zero():
    sigma, T = 300.0, 1.0  # q > 0 on every bin, so log q is finite
    q_table, _ = soft_target_table(sigma, 999)
    bins = torch.tensor([0, 17, 500, 999])
    z = torch.full((4, V), -30.0)
    z[:, COORD_IDS] = q_table[bins].log()  # p = softmax(log q) = q
    res = stage1_loss(z, COORD_IDS[bins], CMAP, **weights(temperature=T, target_sigma=sigma, target_truncate=999))
    assert abs(float(res.w1)) < 1e-6
    entropy = -(q_table[bins].double() * q_table[bins].double().log()).sum(1).mean()
    assert float(res.soft_ce) == pytest.approx(float(entropy), rel=1e-5)


@pytest.mark.parametrize("a,b", [(0, 999), (999, 0), (0, 0), (3, 10), (500, 123)])
def test_w1_between_point_masses(a, b):
    z = torch.zeros(1, V)
    z[0, COORD_IDS[a]] = 1e4  # p = one-hot(a) exactly in fp32
    res = stage1_loss(z, COORD_IDS[[b]], CMAP, **weights(target_truncate=0))  # q = one-hot(b)
    assert float(res.w1) == pytest.approx(abs(a - b) / (K - 1), abs=1e-7)


def test_gate_zero_when_all_mass_on_coord_tokens():
    z = torch.randn(5, V, generator=torch.Generator().manual_seed(11)) * 2
    z[:, TEXT_IDS] = -1e4
    res = stage1_loss(z, make_labels(5, 5, 0, seed=7), CMAP, **weights(temperature=0.5))
    # the gate is a difference of two fp32 logsumexps of size ~|z|/T: zero up to a few of their ulps
    ulps = 4 * torch.finfo(torch.float32).eps * float(torch.logsumexp(z / 0.5, dim=-1).abs().max())
    assert abs(float(res.gate)) <= ulps
    assert float(res.coord_vocab_mass) == pytest.approx(1.0, abs=ulps)


def test_gate_is_nonnegative_and_mass_in_unit_interval():
    z = torch.randn(40, V) * 5
    z[:, TEXT_IDS] -= 50  # push mass onto the coord slice so round-off could go negative
    res = stage1_loss(z, make_labels(40, 40, 0, seed=8), CMAP, **WEIGHTS)
    assert float(res.gate) >= 0.0
    assert 0.0 < float(res.coord_vocab_mass) <= 1.0


# ------------------------------------------------------------------------------------------------
# degenerate batches and shapes
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["no_coord", "no_text", "all_ignored", "empty"])
def test_degenerate_batches_are_finite_zero_and_differentiable(kind):
    n = 0 if kind == "empty" else 6
    labels = {
        "no_coord": make_labels(n, 0, 1, seed=9),
        "no_text": make_labels(n, n, 1, seed=9),
        "all_ignored": torch.full((n,), -100),
        "empty": torch.zeros(0, dtype=torch.long),
    }[kind]
    z = torch.randn(n, V, requires_grad=True)
    res = stage1_loss(z, labels, CMAP, **WEIGHTS)
    for name in TERMS:
        assert torch.isfinite(getattr(res, name)), name
    if kind in ("no_coord", "all_ignored", "empty"):
        assert res.coord_tokens == 0
        for name in ("soft_ce", "w1", "gate", "coord_vocab_mass"):
            assert float(getattr(res, name)) == 0.0
    if kind in ("no_text", "all_ignored", "empty"):
        assert res.text_tokens == 0 and float(res.text_ce) == 0.0
    res.total.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert (z.grad[labels == -100] == 0).all()
    if kind in ("all_ignored", "empty"):
        assert float(res.total) == 0.0 and (z.grad == 0).all()


def test_batched_and_flat_agree_and_noncontiguous_input():
    B, L = 3, 5
    labels = make_labels(B * L, 6, 3, seed=10).view(B, L)
    z3 = torch.randn(B, L + 1, V, generator=torch.Generator().manual_seed(11))[:, :-1]  # a shifted view
    assert not z3.is_contiguous()
    a = z3.clone().requires_grad_()
    b = z3.reshape(B * L, V).clone().requires_grad_()
    c = torch.randn(B, L + 1, V)
    c[:, :-1] = z3
    c.requires_grad_()
    ra = stage1_loss(a, labels, CMAP, **weights(temperature=0.8))
    rb = stage1_loss(b, labels.reshape(-1), CMAP, **weights(temperature=0.8))
    rc = stage1_loss(c[:, :-1], labels, CMAP, **weights(temperature=0.8))
    for name in TERMS:
        assert float(getattr(ra, name)) == pytest.approx(float(getattr(rb, name)), rel=1e-6, abs=1e-7)
        assert float(getattr(rc, name)) == pytest.approx(float(getattr(rb, name)), rel=1e-6, abs=1e-7)
    ra.total.backward()
    rb.total.backward()
    rc.total.backward()
    torch.testing.assert_close(a.grad.reshape(B * L, V), b.grad)
    torch.testing.assert_close(c.grad[:, :-1].reshape(B * L, V), b.grad)
    assert (c.grad[:, -1] == 0).all()


def test_result_fields_and_sums():
    labels = make_labels(10, 4, 2, seed=12)
    z = torch.randn(10, V)
    res = stage1_loss(z, labels, CMAP, **weights(soft_ce_weight=0.5, w1_weight=2.0, gate_weight=0.25))
    assert isinstance(res, Stage1LossResult)
    sup = labels != -100
    is_coord = sup & (CMAP[labels.clamp_min(0)] >= 0)
    n_t, n_c = int((sup & ~is_coord).sum()), int(is_coord.sum())
    assert n_t > 0 and n_c > 0
    assert (res.text_tokens, res.coord_tokens) == count_tokens(labels, CMAP) == (n_t, n_c)
    assert float(res.text_ce_sum) == pytest.approx(float(res.text_ce) * n_t, rel=1e-6)
    assert float(res.soft_ce_sum) == pytest.approx(float(res.soft_ce) * n_c, rel=1e-6)
    assert float(res.w1_sum) == pytest.approx(float(res.w1) * n_c, rel=1e-6)
    assert float(res.gate_sum) == pytest.approx(float(res.gate) * n_c, rel=1e-6)
    assert float(res.mass_sum) == pytest.approx(float(res.coord_vocab_mass) * n_c, rel=1e-6)
    want = res.text_ce + 0.5 * res.soft_ce + 2.0 * res.w1 + 0.25 * res.gate
    assert float(res.total) == pytest.approx(float(want), rel=1e-6)
    logs = res.log_dict()
    assert logs["coord_softce_w1/coord_tokens"] == float(n_c) and "coord_softce_w1/w1" in logs


# ------------------------------------------------------------------------------------------------
# global normalisation (single process; the 2-rank test is in test_losses_distributed.py)
# ------------------------------------------------------------------------------------------------


def test_normalizer_over_micro_batches_equals_whole_batch():
    labels = make_labels(16, 6, 3, seed=13)
    labels[8:][CMAP[labels[8:].clamp_min(0)] >= 0] = TEXT_IDS[0]  # 2nd micro-batch: no coord
    z = torch.randn(16, V, generator=torch.Generator().manual_seed(14))
    whole = z.clone().requires_grad_()
    stage1_loss(whole, labels, CMAP, **weights(w1_weight=3.0)).total.backward()
    parts = z.clone().requires_grad_()
    counts = global_counts([labels[:8], labels[8:]], CMAP)
    assert counts == GlobalCounts(*count_tokens(labels, CMAP), world_size=1, micro_batches=2)
    total = 0.0
    for sl in (slice(0, 8), slice(8, 16)):
        r = stage1_loss(parts[sl], labels[sl], CMAP, normalizer=counts, **weights(w1_weight=3.0))
        r.total.backward()
        total += float(r.total)
    whole_total = float(stage1_loss(z, labels, CMAP, **weights(w1_weight=3.0)).total)
    assert total == pytest.approx(whole_total, rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-5, atol=1e-8)


def test_normalizer_clamps_empty_denominators():
    counts = GlobalCounts(0, 0, world_size=2)
    assert counts.text_denominator == 1.0 and counts.coord_denominator == 1.0
    z = torch.randn(3, V, requires_grad=True)
    r = stage1_loss(z, torch.full((3,), -100), CMAP, normalizer=counts, **WEIGHTS)
    r.total.backward()
    assert float(r.total) == 0.0 and torch.isfinite(z.grad).all()


def test_global_counts_without_distributed_is_local():
    labels = [make_labels(7, 3, 0, seed=15), make_labels(5, 0, 0, seed=16).view(1, 5)]
    labels[0][0] = -100
    c = global_counts(labels, CMAP)
    assert (c.text_tokens + c.coord_tokens, c.world_size) == (6 + 5, 1)
    assert c.coord_tokens in (2, 3) and (c.text_tokens, c.coord_tokens) == tuple(
        map(sum, zip(*(count_tokens(x, CMAP) for x in labels)))
    )


# ------------------------------------------------------------------------------------------------
# soft targets, validation, memory discipline
# ------------------------------------------------------------------------------------------------


def test_soft_target_table_is_cached_normalised_and_truncated():
    q, cdf = soft_target_table(2.0, 16)
    assert soft_target_table(2.0, 16)[0] is q  # built once per configuration
    torch.testing.assert_close(q.sum(1), torch.ones(K))
    torch.testing.assert_close(cdf[:, -1], torch.ones(K))
    assert (q[500, :484] == 0).all() and (q[500, 517:] == 0).all() and (q[500, 484:517] > 0).all()
    one_hot, _ = soft_target_table(2.0, 0)
    assert torch.equal(one_hot, torch.eye(K))
    assert int(q[0].argmax()) == 0 and int(q[999].argmax()) == 999


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(labels=torch.zeros(4, dtype=torch.long)), "labels shape"),
        (dict(cmap=CMAP[:-1]), "coord_id_map has"),
        (dict(cmap=torch.where(CMAP == 999, -1, CMAP)), "exactly 1000"),
        (dict(cmap=torch.where(CMAP == 999, 998, CMAP)), "exactly once"),
        (dict(cmap=CMAP.float()), "integer"),
        (dict(labels=torch.full((3,), V)), "token id"),
        (dict(temperature=0.0), "temperature"),
        (dict(target_sigma=-1.0), "target_sigma"),
        (dict(target_truncate=-1), "target_truncate"),
        (dict(logits=torch.randn(V)), "logits must be"),
    ],
)
def test_input_validation(kwargs, match):
    logits = kwargs.pop("logits", torch.randn(3, V))
    labels = kwargs.pop("labels", make_labels(3, 1, 0, seed=17))
    cmap = kwargs.pop("cmap", CMAP)
    with pytest.raises(ValueError, match=match):
        stage1_loss(logits, labels, cmap, **weights(**kwargs))


def test_no_full_vocab_fp32_copy_is_saved_for_backward():
    """The autograd graph keeps the logits by reference and O(N + N_coord K) floats besides:
    no [N, V] fp32 upcast or log-softmax is held between forward and backward."""
    n = 64
    z = torch.randn(n, V, dtype=torch.bfloat16, requires_grad=True)
    labels = make_labels(n, 13, 5, seed=18)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        res = stage1_loss(z, labels, CMAP, **weights(temperature=0.5))
    big = [t for t in saved if t.numel() >= n * V]
    assert big and all(t.data_ptr() == z.data_ptr() for t in big)
    res.total.backward()
    assert z.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("missing", sorted(WEIGHTS))
def test_loss_settings_have_no_defaults_here(missing):
    """The config schema is the one source of the loss settings' defaults: the function has none."""
    kw = {k: v for k, v in WEIGHTS.items() if k != missing}
    with pytest.raises(TypeError, match=missing):
        stage1_loss(torch.randn(3, V), make_labels(3, 1, 0, seed=17), CMAP, **kw)


# ------------------------------------------------------------------------------------------------
# the optional terms: text gate and hard coord CE
# ------------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 10),
    coord_frac=st.floats(0.0, 1.0),
    n_ignored=st.integers(0, 3),
    T=st.floats(0.05, 10.0),
    scale=st.sampled_from([0.1, 1.0, 10.0, 100.0, 1e4]),
    text_gate_weight=st.sampled_from([0.0, 0.3, 2.0]),
    coord_ce_weight=st.sampled_from([0.0, 0.5, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_optional_terms_match_float64_reference(
    n, coord_frac, n_ignored, T, scale, text_gate_weight, coord_ce_weight, seed
):
    labels = make_labels(n, round(coord_frac * n), min(n_ignored, n - 1), seed=seed, bins=[0, 999])
    z = (torch.randn(n, V, generator=torch.Generator().manual_seed(seed)) * scale).float()
    check_against_reference(
        z,
        labels,
        T=T,
        sigma=2.0,
        truncate=16,
        text_gate_weight=text_gate_weight,
        coord_ce_weight=coord_ce_weight,
    )


@pytest.mark.parametrize("T", [0.05, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("mass", ["near_one", "near_zero", "even", "huge"])
def test_text_gate_extreme_coord_mass(T, mass):
    """Text rows whose coord-vocabulary mass is within ~1e-30 of 1 (the gate is large and exactly its
    log-odds), ~1e-30 (the gate is ~m, still to relative precision), about 1/2, and logits of +/-1e4
    (mass exactly 0 or 1 in any float): values and gradients of both terms meet the reference."""
    labels = make_labels(8, 3, 1, seed=21, bins=[0, 999])
    z = torch.randn(8, V, generator=torch.Generator().manual_seed(22)) * 2 * T  # z / T: std 2 whatever T
    shift = {"near_one": 70.0 * T, "near_zero": -70.0 * T, "even": 0.0}.get(mass)
    if shift is None:
        z = (torch.rand(8, V, generator=torch.Generator().manual_seed(23)) * 2 - 1) * 1e4
        z[:4, COORD_IDS[7]] = 2e4  # mass 1 at four rows, whatever T
        z[4:, TEXT_IDS[3]] = 2e4  # mass 0 at the others
    else:
        z[:, COORD_IDS] += shift
    check_against_reference(z.float(), labels, T=T, sigma=2.0, truncate=16, text_gate_weight=1.5, coord_ce_weight=0.7)
    res = stage1_loss(z, labels, CMAP, **weights(temperature=T, text_gate_weight=1.5, coord_ce_weight=0.7))
    assert float(res.text_gate) >= 0.0 and torch.isfinite(res.text_gate)
    if mass == "near_zero":  # -log(1 - m) ~ m ~ 1e-28: relative, not absolute, precision
        z64, text = z.double(), (labels != -100) & (CMAP[labels.clamp_min(0)] < 0)
        m = torch.exp(_lse(z64[text][:, COORD_IDS] / T) - _lse(z64[text] / T))  # float64 keeps m to 1e-16 relative
        assert 0 < float(m.max()) < 1e-20
        assert float(res.text_gate) == pytest.approx(float(-torch.log1p(-m).mean()), rel=1e-4)


@pytest.mark.parametrize("T", [0.3, 1.0, 2.5])
def test_zero_weights_leave_every_other_number_unchanged(T):
    """Weights of 0 compute nothing: the other terms, the total and the gradient are bitwise what they
    are with the optional terms on, minus those terms; the result carries None for them."""
    labels = make_labels(20, 8, 3, seed=24, bins=[0, 999])
    z = torch.randn(20, V, generator=torch.Generator().manual_seed(25)) * 4
    off_z, on_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    off = stage1_loss(off_z, labels, CMAP, **weights(temperature=T))
    on = stage1_loss(on_z, labels, CMAP, **weights(temperature=T, text_gate_weight=0.4, coord_ce_weight=0.6))
    for name in ("text_ce", "soft_ce", "w1", "gate", "coord_vocab_mass"):
        assert torch.equal(getattr(off, name), getattr(on, name)), name
    for name in OPTIONAL:
        assert getattr(off, name) is None and getattr(off, f"{name}_sum") is None
        assert f"coord_softce_w1/{name}" not in off.log_dict()
        assert on.log_dict()[f"coord_softce_w1/{name}"] == pytest.approx(float(getattr(on, name)))
    want = off.text_ce + WEIGHTS["soft_ce_weight"] * off.soft_ce + WEIGHTS["w1_weight"] * off.w1
    assert torch.equal(off.total, want + WEIGHTS["gate_weight"] * off.gate)
    assert float(on.total) == pytest.approx(float(off.total + 0.4 * on.text_gate + 0.6 * on.coord_ce), rel=1e-6)
    off.total.backward()
    on.total.backward()
    assert not torch.equal(off_z.grad, on_z.grad)


def test_optional_terms_fields_sums_and_global_normalisation():
    labels = make_labels(16, 6, 3, seed=26)
    z = torch.randn(16, V, generator=torch.Generator().manual_seed(27)) * 3
    kw = weights(temperature=0.6, text_gate_weight=0.8, coord_ce_weight=1.2)
    res = stage1_loss(z, labels, CMAP, **kw)
    assert float(res.text_gate_sum) == pytest.approx(float(res.text_gate) * res.text_tokens, rel=1e-6)
    assert float(res.coord_ce_sum) == pytest.approx(float(res.coord_ce) * res.coord_tokens, rel=1e-6)
    # 2 micro-batches with the step's counts == the whole batch (the 2-rank version is in test_losses_distributed)
    whole, parts = z.clone().requires_grad_(), z.clone().requires_grad_()
    stage1_loss(whole, labels, CMAP, **kw).total.backward()
    counts = global_counts([labels[:7], labels[7:]], CMAP)
    total = 0.0
    for sl in (slice(0, 7), slice(7, 16)):
        r = stage1_loss(parts[sl], labels[sl], CMAP, normalizer=counts, **kw)
        r.total.backward()
        total += float(r.total)
    assert total == pytest.approx(float(res.total), rel=1e-6)
    torch.testing.assert_close(parts.grad, whole.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("kind", ["no_coord", "no_text", "all_ignored"])
def test_optional_terms_on_degenerate_batches(kind):
    n = 6
    labels = {
        "no_coord": make_labels(n, 0, 1, seed=9),
        "no_text": make_labels(n, n, 1, seed=9),
        "all_ignored": torch.full((n,), -100),
    }[kind]
    z = torch.randn(n, V, requires_grad=True)
    res = stage1_loss(z, labels, CMAP, **weights(temperature=0.7, text_gate_weight=1.0, coord_ce_weight=1.0))
    assert torch.isfinite(res.text_gate) and torch.isfinite(res.coord_ce)
    if res.text_tokens == 0:
        assert float(res.text_gate) == 0.0
    if res.coord_tokens == 0:
        assert float(res.coord_ce) == 0.0
    res.total.backward()
    assert torch.isfinite(z.grad).all() and (z.grad[labels == -100] == 0).all()


@pytest.mark.parametrize("T", [0.5, 1.0])
def test_optional_terms_save_no_full_vocab_copy(T):
    n = 64
    z = torch.randn(n, V, dtype=torch.bfloat16, requires_grad=True)
    labels = make_labels(n, 13, 5, seed=18)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t), t)[1], lambda t: t):
        res = stage1_loss(z, labels, CMAP, **weights(temperature=T, text_gate_weight=1.0, coord_ce_weight=1.0))
    big = [t for t in saved if t.numel() >= n * V]
    assert big and all(t.data_ptr() == z.data_ptr() for t in big)
    res.total.backward()
    assert z.grad.dtype == torch.bfloat16 and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ["text_gate_weight", "coord_ce_weight"])
def test_optional_weights_must_be_nonnegative(name):
    with pytest.raises(ValueError, match=name):
        stage1_loss(torch.randn(3, V), make_labels(3, 1, 0, seed=17), CMAP, **weights(**{name: -0.1}))
