"""Tests of convexedge.host.polish: the group elastic-net solver meets its optimality conditions and
agrees with the host FISTA on the group lasso, polishing never worsens the held-out loss it
reports (property), it improves an over-shrunk solution, and it validates its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import DataError
from convexedge.host.polish import PolishConfig, group_elastic_net, polish
from convexedge.host.solvers import FistaConfig, GatedProblem, solve


def _problems(seed: int, n: int = 300, d: int = 6, c: int = 3, P: int = 5, noise: float = 0.3):
    """Train and held-out problems from one planted gated-ReLU model with shared gates."""
    rng = np.random.default_rng(seed)
    G = rng.standard_normal((d, P))
    V_true = rng.standard_normal((P, d, c)) * (rng.random(P) < 0.6)[:, None, None]

    def make(m: int) -> GatedProblem:
        Z = np.c_[rng.standard_normal((m, d - 1)), np.ones(m)]
        masks = Z @ G >= 0
        Y = sum(masks[:, [i]] * (Z @ V_true[i]) for i in range(P)) + noise * rng.standard_normal((m, c))
        return GatedProblem.from_arrays(Z, Y, masks, dtype="float64")

    return make(n), make(n // 2)


def _gram(problem: GatedProblem) -> tuple[torch.Tensor, torch.Tensor]:
    g = problem.gram()
    return g.G.to(torch.float64), g.B.to(torch.float64)


@pytest.mark.parametrize("l1_ratio", [1.0, 0.5])
def test_group_elastic_net_kkt(l1_ratio):
    prob, _ = _problems(0)
    G, B = _gram(prob)
    lam = 0.05 * float(torch.linalg.vector_norm(B.reshape(prob.P, -1), dim=1).max()) / prob.n
    V, it = group_elastic_net(G, B, prob.n, lam, l1_ratio, max_iter=20000, tol=1e-12)
    assert it < 20000
    l1, l2 = lam * l1_ratio, lam * (1 - l1_ratio)
    grad = ((G @ V.reshape(-1, prob.c)).view_as(V) - B) / prob.n + l2 * V
    for i in range(prob.P):
        nv = float(torch.linalg.vector_norm(V[i]))
        if nv > 0:  # stationarity: grad_i + l1 V_i / ||V_i|| = 0
            assert torch.allclose(grad[i], -l1 * V[i] / nv, atol=1e-7 * max(1.0, lam))
        else:  # subgradient: ||grad_i|| <= l1
            assert float(torch.linalg.vector_norm(grad[i])) <= l1 * (1 + 1e-6)


def test_group_lasso_matches_host_fista():
    """a = 1 is the convex student's own group lasso: same objective as the host solver's optimum."""
    prob, _ = _problems(1)
    G, B = _gram(prob)
    lam = 0.02 * prob.lam_max()
    V, _ = group_elastic_net(G, B, prob.n, lam, 1.0, max_iter=20000, tol=1e-12)
    ref = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=50000))
    assert prob.objective(V, lam) == pytest.approx(prob.objective(ref.V, lam), rel=1e-8, abs=1e-10)


def test_polish_improves_an_overshrunk_solution():
    prob, val = _problems(2, noise=0.05)
    heavy = solve(prob, 0.3 * prob.lam_max(), FistaConfig(tol=1e-10, max_iter=20000)).V
    assert int((heavy.flatten(1).abs().amax(1) > 0).sum()) >= 1
    out = polish(prob, val, heavy)
    assert out.improved and out.val_loss_after < 0.7 * out.val_loss_before
    # the reported loss is that of the returned V, and V lives on the input's active gates only
    assert float(val.smooth(out.V.double())[0]) == pytest.approx(out.val_loss_after, rel=1e-5)
    active_in = set(torch.nonzero(heavy.flatten(1).abs().amax(1) > 0).flatten().tolist())
    assert set(out.kept) <= active_in
    assert out.chosen is not None and len(out.candidates) == 7  # 3 lam x 2 mixes + least squares


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), ratio=st.sampled_from([0.5, 0.1, 0.01, 0.001]), relu=st.booleans())
def test_polish_never_worsens_held_out_loss(seed, ratio, relu):
    prob, val = _problems(seed, n=120, P=4)
    V = solve(prob, ratio * prob.lam_max(), FistaConfig(tol=1e-6, max_iter=3000)).V
    cfg = PolishConfig(lam_ratios=(0.01, 0.0), l1_ratios=(1.0,), max_iter=300, output_relu=relu)
    out = polish(prob, val, V, cfg)
    assert out.val_loss_after <= out.val_loss_before
    pred = val.forward(out.V.double())
    pred = pred.clamp_min(0) if relu else pred
    reported = float(0.5 * ((pred - val.Y) ** 2).sum() / val.n)
    assert reported == pytest.approx(out.val_loss_after, rel=1e-5, abs=1e-12)
    if not out.improved:
        assert torch.equal(out.V, V.float())


def test_polish_of_nothing_and_bad_inputs():
    prob, val = _problems(3, n=60)
    out = polish(prob, val, torch.zeros(prob.P, prob.d, prob.c, dtype=torch.float64))
    assert not out.improved and out.kept == [] and out.val_loss_after == out.val_loss_before
    with pytest.raises(DataError, match="V must be"):
        polish(prob, val, torch.zeros(prob.P + 1, prob.d, prob.c))
    bad = torch.zeros(prob.P, prob.d, prob.c)
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        polish(prob, val, bad)
    other, _ = _problems(4, n=60, P=3)
    with pytest.raises(DataError, match="same gates"):
        polish(prob, other, torch.zeros(prob.P, prob.d, prob.c))
    with pytest.raises(ValueError, match="lam_ratios"):
        PolishConfig(lam_ratios=())
    with pytest.raises(ValueError, match="l1_ratios"):
        PolishConfig(l1_ratios=(0.0,))
    with pytest.raises(ValueError, match="ridge"):
        PolishConfig(tol=0)
