"""Coord-distribution diagnostics (``coord_diag/*``) against a plain float64 reference.

The reference is written from the definitions (``coordexp.train.loss``'s docstring) with explicit ops on
float64 and shares no code with the library: the predicted distribution ``p = softmax(s / T)`` of the coord
slice, its arg-max (the first maximum), the target's rank in the order (more probable first, the lower bin
first among equals), ``p[k*]``, ``|E - k*|`` and ``sqrt(sum p (i - E)^2)``. Checked: hand-built slices
(point masses, ties, bins 0 and 999, a target 2 and 3 bins off), the values a loss call reports on random
logits, the fused path against the materialised one (in the library and as ``Stage1SwiftLoss`` logs them), and
that turning them off logs no ``coord_diag/`` key and leaves the loss and its gradients bit-identical. The
2-rank x 2-micro-batch reduction of the logged values is in ``tests/test_logged_numbers.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from coordexp.core.codec import K
from coordexp.core.config import CoordSoftCEW1Config
from coordexp.train.fused_loss import fused_stage1_loss
from coordexp.train.loss import COORD_DIAG, coord_diagnostics, stage1_loss

WEIGHTS = CoordSoftCEW1Config().model_dump(exclude={"enabled"})
N_TEXT_IDS = 40
V = K + N_TEXT_IDS


def _vocab(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(coord_id_map, coord ids in bin order, text ids), coord ids scattered and not in bin order."""
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(seed))
    cmap = torch.full((V,), -1, dtype=torch.long)
    cmap[perm[:K]] = torch.arange(K)
    return cmap, perm[:K], perm[K:].sort().values


CMAP, COORD_IDS, TEXT_IDS = _vocab()


def reference(s: torch.Tensor, k_star: torch.Tensor, T: float) -> torch.Tensor:
    """``[n, 6]`` float64 diagnostics of coord slices ``s [n, K]`` with target bins ``k_star``, row by row."""
    out = []
    for row, k in zip(s.double(), k_star.tolist()):
        x = row / T
        p = torch.exp(x - x.max())
        p = p / p.sum()
        order = sorted(range(K), key=lambda i: (-float(x[i]), i))  # log-probability order, ties: lower bin
        rank = order.index(k)
        am = order[0]
        i = torch.arange(K, dtype=torch.float64)
        e = float((p * i).sum())
        var = float((p * (i - e) ** 2).sum())
        out.append(
            [float(rank == 0), float(rank < 5), float(abs(am - k) <= 2), float(p[k]), abs(e - k), math.sqrt(var)]
        )
    return torch.tensor(out, dtype=torch.float64)


def _lib(s: torch.Tensor, k_star: torch.Tensor, T: float) -> torch.Tensor:
    return coord_diagnostics(torch.log_softmax(s.float() / T, dim=1), k_star).double()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Accuracies exact; ``p_target`` to 1e-5 relative; ``expected_mae`` and ``spread`` (in bins) to 2e-3 bins
    (fp32 sums of up to 1000 products of size <= 999: a few ulp of 999 each)."""
    assert torch.equal(got[:, :3], want[:, :3]), (got[:, :3], want[:, :3])
    torch.testing.assert_close(got[:, 3], want[:, 3], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got[:, 4:], want[:, 4:], rtol=1e-5, atol=2e-3)


def _slice(*peaks: tuple[int, float], base: float = 0.0) -> torch.Tensor:
    s = torch.full((K,), base)
    for b, v in peaks:
        s[b] = v
    return s


CASES = [
    # (coord slice, target bin, what it checks)
    (_slice((500, 80.0)), 500, "point mass on the target"),
    (_slice((500, 80.0)), 502, "point mass 2 bins off: within +-2, not top-1"),
    (_slice((500, 80.0)), 503, "point mass 3 bins off: outside +-2"),
    (_slice((0, 80.0)), 0, "point mass at bin 0"),
    (_slice((999, 80.0)), 999, "point mass at bin 999"),
    (_slice((999, 80.0)), 0, "point mass at 999, target 0: the far tail is not a tie of zeros"),
    (_slice((0, 80.0)), 999, "point mass at 0, target 999"),
    (_slice((10, 5.0), (20, 5.0)), 20, "tie at the maximum: the lower bin is the arg-max"),
    (_slice((10, 5.0), (20, 5.0)), 10, "tie at the maximum, target the lower bin"),
    (_slice((3, 5.0), (4, 5.0), (5, 5.0), (6, 5.0), (7, 5.0), (8, 5.0)), 8, "six tied, target 6th: not top-5"),
    (_slice((3, 5.0), (4, 5.0), (5, 5.0), (6, 5.0), (7, 5.0), (8, 5.0)), 7, "six tied, target 5th: top-5"),
    (_slice(), 0, "uniform: the lower bin wins the tie; spread of the uniform"),
    (_slice(), 999, "uniform, target 999"),
    (torch.arange(K, dtype=torch.float32) * 0.01, 998, "a ramp: arg-max 999, target 1 bin off"),
    (_slice((100, 3.0), (900, 3.0)), 500, "two modes, target between them"),
]


@pytest.mark.parametrize("T", [1.0, 0.5])
def test_hand_built_slices_match_float64_reference(T):
    s = torch.stack([c[0] for c in CASES])
    k = torch.tensor([c[1] for c in CASES])
    _close(_lib(s, k, T), reference(s, k, T))


def test_hand_built_values():
    """A few values worked out by hand, independent of the reference too."""
    s = torch.stack([c[0] for c in CASES[:3]] + [CASES[7][0], CASES[11][0]])
    k = torch.tensor([500, 502, 503, 20, 0])
    got = _lib(s, k, 1.0)
    assert got[:, 0].tolist() == [1, 0, 0, 0, 1]  # top1
    assert got[:, 1].tolist() == [1, 0, 0, 1, 1]  # top5: the 999 tied bins below a point mass rank by bin
    assert got[:, 2].tolist() == [1, 1, 0, 0, 1]  # within2: |500 - 502| = 2 in, 3 out; tie arg-max 10 vs 20
    assert got[0, 3] == pytest.approx(1.0) and got[3, 3] == pytest.approx(math.e**5 / (2 * math.e**5 + K - 2))
    assert got[1, 4] == pytest.approx(2.0, abs=1e-3) and got[2, 4] == pytest.approx(3.0, abs=1e-3)
    assert got[0, 5] == pytest.approx(0.0, abs=1e-2)  # a point mass has no spread
    assert got[4, 5] == pytest.approx(math.sqrt((K**2 - 1) / 12), rel=1e-5)  # the uniform's std
    assert got[4, 4] == pytest.approx((K - 1) / 2, rel=1e-6)


def _case(n: int, coord_frac: float, *, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = TEXT_IDS[torch.randint(0, N_TEXT_IDS, (n,), generator=g)]
    coord = COORD_IDS[torch.randint(0, K, (n,), generator=g)]
    labels = torch.where(torch.rand(n, generator=g) < coord_frac, coord, labels)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    z = torch.randn(n, V, generator=g) * scale
    # some rows peaked near their target, so the accuracies are not all 0
    rows = torch.nonzero(CMAP[labels.clamp(min=0)] >= 0).flatten()[::2]
    bins = CMAP[labels[rows]]
    near = (bins + torch.randint(-3, 4, bins.shape, generator=g)).clamp(0, K - 1)
    z[rows, COORD_IDS[near]] += 12.0
    return z, labels


@pytest.mark.parametrize(("T", "text_gate_weight"), [(1.0, 0.0), (0.7, 0.0), (0.7, 0.3)])
def test_loss_call_logs_the_reference_means(T, text_gate_weight):
    """With the text gate on, the loss's coord slice also covers the text rows: the diagnostics still see
    the coord rows alone."""
    z, labels = _case(300, 0.4, seed=1)
    kw = {**WEIGHTS, "temperature": T, "text_gate_weight": text_gate_weight}
    res = stage1_loss(z, labels, CMAP, **kw, coord_diag=True)
    crd = CMAP[labels.clamp(min=0)] >= 0
    crd &= labels != -100
    ref = reference(z[crd][:, COORD_IDS], CMAP[labels[crd]], T)
    assert res.coord_diag_sum is not None and res.coord_diag is not None
    torch.testing.assert_close(res.coord_diag.double(), ref.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(res.coord_diag_sum.double(), ref.sum(0), rtol=1e-5, atol=1e-3)
    assert 0 < float(res.coord_diag[0]) < 1  # the case exercises both outcomes
    logged = res.log_dict()
    want = dict(zip(COORD_DIAG, ref.mean(0).tolist()))
    for name in COORD_DIAG:
        assert logged[f"coord_diag/{name}"] == pytest.approx(want[name], rel=1e-5, abs=1e-5), name
    assert not res.coord_diag.requires_grad


def test_no_coord_tokens_gives_zeros():
    z, labels = _case(30, 0.0, seed=2)
    res = stage1_loss(z, labels, CMAP, **WEIGHTS, coord_diag=True)
    assert res.coord_tokens == 0
    assert res.coord_diag.tolist() == [0.0] * len(COORD_DIAG)


@pytest.mark.parametrize("mode", ["vocab", "rows"])
@pytest.mark.parametrize("text_gate_weight", [0.0, 0.3])
def test_fused_and_materialised_paths_agree(mode, text_gate_weight):
    g = torch.Generator().manual_seed(5)
    n, d = 200, 32
    hidden = torch.randn(n, d, generator=g)
    weight = torch.randn(V, d, generator=g) * 0.5
    _, labels = _case(n, 0.4, seed=5)
    kw = {**WEIGHTS, "temperature": 0.8, "text_gate_weight": text_gate_weight}
    fused = fused_stage1_loss(hidden, weight, labels, CMAP, mode=mode, row_chunk=32, coord_diag=True, **kw)
    plain = stage1_loss(hidden @ weight.T, labels, CMAP, coord_diag=True, **kw)
    assert fused.mode == mode
    torch.testing.assert_close(fused.coord_diag[:3], plain.coord_diag[:3], rtol=0, atol=0)
    torch.testing.assert_close(fused.coord_diag, plain.coord_diag, rtol=1e-5, atol=1e-5)
    assert fused.log_dict().keys() == plain.log_dict().keys()


@pytest.mark.parametrize("fused", [False, True])
def test_off_logs_nothing_and_the_loss_is_bit_identical(fused):
    g = torch.Generator().manual_seed(9)
    n, d = 120, 24
    hidden0 = torch.randn(n, d, generator=g)
    weight0 = torch.randn(V, d, generator=g) * 0.5
    _, labels = _case(n, 0.4, seed=9)
    kw = {**WEIGHTS, "temperature": 0.9, "text_gate_weight": 0.3, "coord_ce_weight": 0.2}
    out = {}
    for on in (False, True):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        if fused:
            res = fused_stage1_loss(hidden, weight, labels, CMAP, coord_diag=on, **kw)
        else:
            res = stage1_loss(hidden @ weight.T, labels, CMAP, coord_diag=on, **kw)
        res.total.backward()
        out[on] = (res, hidden.grad, weight.grad)
    (off, gh0, gw0), (on, gh1, gw1) = out[False], out[True]
    assert off.coord_diag is None and off.coord_diag_sum is None
    assert not any(k.startswith("coord_diag/") for k in off.log_dict())
    assert {k for k in on.log_dict() if k.startswith("coord_diag/")} == {f"coord_diag/{n}" for n in COORD_DIAG}
    assert torch.equal(off.total, on.total)
    assert torch.equal(gh0, gh1) and torch.equal(gw0, gw1)
    off_logs = off.log_dict()
    assert {k: v for k, v in on.log_dict().items() if not k.startswith("coord_diag/")} == off_logs


def test_swift_loss_logs_the_same_diagnostics_fused_and_unfused():
    """Through ``Stage1SwiftLoss`` as the trainer drives it (step counts first, ms-swift's metric reduction):
    the fused path (hidden states through the LM head) logs the materialised path's ``coord_diag/*``."""
    import collections
    from types import SimpleNamespace

    from swift.metrics.utils import MeanMetric
    from swift.trainers.mixin import SwiftMixin

    from coordexp.train.loss import global_counts
    from coordexp.train.swift_loss import Stage1SwiftLoss

    g = torch.Generator().manual_seed(13)
    b, length, d = 2, 60, 32
    head = torch.nn.Linear(d, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g) * 0.5)
    hidden = torch.randn(b, length, d, generator=g)
    _, flat = _case(b * length, 0.4, seed=13)
    labels = flat.view(b, length)
    logs = {}
    for fused in (False, True):
        model = SimpleNamespace(training=True, get_output_embeddings=lambda: head)
        tr = SimpleNamespace(
            model=model,
            args=SimpleNamespace(average_tokens_across_devices=False, device=torch.device("cpu"), output_dir=None),
            model_accepts_loss_kwargs=True,
            custom_metrics={"train": collections.defaultdict(lambda: MeanMetric(nan_value=None))},
            coordexp_counts=global_counts([labels[:, 1:]], CMAP),
            token_typer=None,
            accelerator=SimpleNamespace(unwrap_model=lambda m: m),
        )
        fn = Stage1SwiftLoss.__new__(Stage1SwiftLoss)  # without the plugin config file
        fn.cfg = {"loss": {"enabled": True, **WEIGHTS}, "fused_loss": fused, "coord_diag": True}
        fn.loss_cfg, fn.cmap, fn.trainer = fn.cfg["loss"], CMAP, None
        out = SimpleNamespace(hidden_states=(hidden,)) if fused else SimpleNamespace(logits=head(hidden).detach())
        fn(out, labels, num_items_in_batch=torch.tensor(1), trainer=tr)
        logs[fused] = SwiftMixin.compute_custom_metrics(tr.custom_metrics["train"])
    diag = {k for k in logs[False] if k.startswith("coord_diag/")}
    assert diag == {f"coord_diag/{n}" for n in COORD_DIAG}
    for key in diag:
        assert logs[True][key] == pytest.approx(logs[False][key], rel=1e-5, abs=1e-6), key
