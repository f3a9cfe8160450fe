"""Tests of FISTA's block-Jacobi metric (convexedge.host.solvers.metric and FistaConfig.metric)."""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers import FistaConfig, GatedProblem, solve
from convexedge.host.solvers.metric import BlockMetric, prox_in_metric
from convexedge.host.solvers.problem import _broadcast_groups, group_norms, prox_group

GROUPS = ("gate", "gate_output")


def correlated_problem(n=600, d=12, c=3, P=6, seed=0, group="gate", dtype="float64", decay=3.0):
    """Features with a spread spectrum (like real activations): the Euclidean step crawls."""
    rng = np.random.default_rng(seed)
    scales = np.logspace(0, -decay / 2, d - 1)
    R = np.linalg.qr(rng.standard_normal((d - 1, d - 1)))[0]
    X = (rng.standard_normal((n, d - 1)) * scales) @ R
    Z = np.hstack([X, np.ones((n, 1))])
    W1 = rng.standard_normal((d, 4))
    Y = np.maximum(Z @ W1, 0) @ rng.standard_normal((4, c)) + 0.05 * rng.standard_normal((n, c))
    return GatedProblem.from_arrays(Z, Y, Z @ rng.standard_normal((d, P)) >= 0, group=group, dtype=dtype)


# ------------------------------------------------------------------------------ the prox
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    group=st.sampled_from(GROUPS),
    thresh=st.floats(0.0, 3.0),
    spread=st.floats(0.0, 6.0),
)
def test_prox_in_metric_satisfies_its_optimality_condition(seed, group, thresh, spread):
    gen = torch.Generator().manual_seed(seed)
    P, d, c = 3, 5, 2
    u = torch.randn((P, d, c), generator=gen, dtype=torch.float64)
    w = torch.exp(spread * torch.rand((P, d), generator=gen, dtype=torch.float64) - spread / 2)
    z = prox_in_metric(u, w, thresh, group)
    W = w[:, :, None]
    zn = group_norms(z, group)
    active = _broadcast_groups(zn > 0, group)
    # active groups: W (z - u) + thresh z / ||z|| = 0
    unit = z / _broadcast_groups(torch.where(zn > 0, zn, 1.0), group)
    res = torch.where(active, W * (z - u) + thresh * unit, 0.0)
    assert float(res.abs().max()) <= 1e-9 * (1 + float((W * u).abs().max()))
    # zero groups: ||W u|| <= thresh (the subgradient condition at 0)
    wu = group_norms(W * u, group)
    assert bool((wu[zn == 0] <= thresh * (1 + 1e-12)).all())


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.sampled_from(GROUPS), w=st.floats(0.01, 100.0))
def test_prox_in_metric_with_constant_weights_is_the_group_soft_threshold(seed, group, w):
    u = torch.randn((4, 6, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    thresh = 0.7
    z = prox_in_metric(u, torch.full((4, 6), w, dtype=torch.float64), thresh, group)
    torch.testing.assert_close(z, prox_group(u, thresh / w, group), rtol=1e-10, atol=1e-12)


def test_prox_in_metric_keeps_dtype_and_zero_threshold_is_identity():
    u = torch.randn((2, 3, 4), dtype=torch.float32)
    w = torch.rand((2, 3), dtype=torch.float64) + 0.1
    assert prox_in_metric(u, w, 0.5, "gate").dtype == torch.float32
    torch.testing.assert_close(prox_in_metric(u, w, 0.0, "gate_output"), u)


def test_block_metric_solve_inverts_the_blocks():
    gen = torch.Generator().manual_seed(1)
    A = torch.randn((3, 5, 5), generator=gen, dtype=torch.float64)
    H = A @ A.transpose(1, 2) + 0.1 * torch.eye(5, dtype=torch.float64)
    m = BlockMetric.from_blocks(H, 1e-12, torch.float64)
    V = torch.randn((3, 5, 2), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(torch.bmm(H, m.solve(V)), V)
    torch.testing.assert_close(m.unrotate(m.rotate(V)), V)


def test_block_metric_floors_a_singular_block():
    H = torch.zeros((2, 3, 3), dtype=torch.float64)
    H[0] = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))  # H[1] = 0: a gate never on
    m = BlockMetric.from_blocks(H, 1e-3, torch.float32)
    assert float(m.w.min()) == pytest.approx(4e-3)
    assert m.Q.dtype == torch.float32


# ------------------------------------------------------------------------------ the problem's blocks
@pytest.mark.parametrize("group", GROUPS)
def test_gate_blocks_equal_the_grams_diagonal_and_the_direct_sum(group):
    prob = correlated_problem(group=group)
    direct = prob.gate_blocks()
    Z, M = prob.Z, prob.masks
    for i in range(prob.P):
        Zi = Z[M[:, i]]
        torch.testing.assert_close(direct[i], Zi.T @ Zi)
    prob2 = correlated_problem(group=group)
    G = prob2.gram().G
    d = prob2.d
    from_gram = prob2.gate_blocks()
    for i in range(prob2.P):
        torch.testing.assert_close(from_gram[i], G[i * d : (i + 1) * d, i * d : (i + 1) * d])
    torch.testing.assert_close(from_gram, direct)


# ------------------------------------------------------------------------------ FISTA with the metric
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("operator", ["direct", "gram"])
@pytest.mark.parametrize("frac", [0.3, 0.01])
def test_block_metric_reaches_the_same_optimum_as_the_euclidean_step(group, operator, frac):
    prob = correlated_problem(group=group)
    lam = frac * prob.lam_max()
    base = FistaConfig(tol=1e-9, max_iter=50_000, operator=operator)
    eu = solve(prob, lam, FistaConfig(**{**base.__dict__, "metric": "identity"}))
    bl = solve(prob, lam, FistaConfig(**{**base.__dict__, "metric": "block"}))
    assert eu.converged and bl.converged and bl.kkt_residual <= 1e-9
    assert bl.objective == pytest.approx(eu.objective, rel=1e-9)
    torch.testing.assert_close(prob.forward(bl.V), prob.forward(eu.V), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group", GROUPS)
def test_block_metric_needs_half_the_iterations_on_correlated_features(group):
    prob = correlated_problem(group=group, decay=6.0)
    lam = 0.01 * prob.lam_max()
    its = {}
    for metric in ("identity", "block"):
        its[metric] = solve(prob, lam, FistaConfig(tol=1e-7, max_iter=100_000, metric=metric)).iterations
    # measured 176 vs 421 (gate) and 153 vs 392 (gate_output); what is left is the coupling
    # between gates, which a block-diagonal metric does not touch
    assert its["block"] * 2 <= its["identity"], its


def test_auto_metric_is_block_in_gram_mode_and_identity_in_direct_mode():
    prob = correlated_problem()
    lam = 0.05 * prob.lam_max()
    for operator, metric in (("gram", "block"), ("direct", "identity")):
        auto = solve(prob, lam, FistaConfig(tol=1e-6, operator=operator))
        explicit = solve(prob, lam, FistaConfig(tol=1e-6, operator=operator, metric=metric))
        assert auto.iterations == explicit.iterations
        torch.testing.assert_close(auto.V, explicit.V)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), frac=st.floats(0.01, 0.9), group=st.sampled_from(GROUPS))
def test_monotone_block_metric_objective_never_increases(seed, frac, group):
    prob = correlated_problem(n=150, d=6, c=2, P=4, seed=seed, group=group)
    cfg = FistaConfig(tol=1e-9, max_iter=60, monotone=True, metric="block")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solve(prob, frac * prob.lam_max(), cfg)
    objs = res.history["objective"]
    assert all(b <= a for a, b in itertools.pairwise(objs))


def test_block_metric_float32_reaches_moderate_tol():
    prob = correlated_problem(dtype="float32", decay=2.0)
    res = solve(prob, 0.01 * prob.lam_max(), FistaConfig(tol=1e-5, max_iter=20_000, metric="block"))
    assert res.converged and res.kkt_residual <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"metric": "diagonal"}, "metric must be 'auto', 'identity' or 'block'"),
        ({"metric_floor": 0.0}, r"metric_floor must be a number in \(0, 1\)"),
        ({"metric_floor": 1.0}, r"metric_floor must be a number in \(0, 1\)"),
        ({"metric_floor": True}, r"metric_floor must be a number in \(0, 1\)"),
    ],
)
def test_metric_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FistaConfig(**kwargs)
