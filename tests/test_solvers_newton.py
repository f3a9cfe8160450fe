"""Tests of convexedge.host.solvers.newton: the active-set Newton polish reaches tight KKT residuals,
agrees with FISTA and cvxpy, recovers a wrong support, handles non-unique optima, validates inputs."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers import (
    FistaConfig,
    GatedProblem,
    NewtonConfig,
    kkt_residual,
    newton_polish,
    solve,
)

GROUPS = ("gate", "gate_output")


def make_problem(n=160, d=8, c=3, P=6, seed=0, group="gate", dtype="float64"):
    rng = np.random.default_rng(seed)
    Z = np.hstack([rng.standard_normal((n, d - 1)), np.ones((n, 1))])
    G = rng.standard_normal((d, P))
    W1 = rng.standard_normal((d, 4))
    Y = np.maximum(Z @ W1, 0) @ rng.standard_normal((4, c)) + 0.1 * rng.standard_normal((n, c))
    return GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype=dtype)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("ratio", [0.3, 0.03, 0.003])
def test_reaches_tight_tolerance_and_matches_fista(group, ratio):
    prob = make_problem(group=group)
    lam = ratio * prob.lam_max()
    res = newton_polish(prob, lam, config=NewtonConfig(tol=1e-12))
    assert res.converged and res.kkt_residual <= 1e-12
    assert kkt_residual(prob, res.V, lam) == pytest.approx(res.kkt_residual)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=200_000))
    assert res.objective <= ref.objective * (1 + 1e-10)
    assert res.objective == pytest.approx(ref.objective, rel=1e-9)
    assert res.operator == "newton" and res.dtype == "float64"


@pytest.mark.parametrize("group", GROUPS)
def test_matches_cvxpy(group):
    cp = pytest.importorskip("cvxpy")
    prob = make_problem(n=60, d=4, c=2, P=5, group=group, seed=3)
    lam = 0.05 * prob.lam_max()
    res = newton_polish(prob, lam)
    Z, Y, M = (t.numpy() for t in (prob.Z, prob.Y, prob.masks))
    P, d, c = prob.P, prob.d, prob.c
    V = [cp.Variable((d, c)) for _ in range(P)]
    pred = sum(cp.multiply(M[:, [i]].astype(float), Z @ V[i]) for i in range(P))
    if group == "gate":
        pen = sum(cp.norm(V[i], "fro") for i in range(P))
    else:
        pen = sum(cp.norm(V[i][:, j]) for i in range(P) for j in range(c))
    obj = cp.sum_squares(pred - Y) / (2 * prob.n) + lam * pen
    cp.Problem(cp.Minimize(obj)).solve(solver="CLARABEL")
    assert res.objective <= obj.value * (1 + 1e-7)


@pytest.mark.parametrize("group", GROUPS)
def test_recovers_a_group_that_must_enter(group):
    prob = make_problem(group=group, seed=1)
    lam = 0.01 * prob.lam_max()
    good = newton_polish(prob, lam)
    V0 = good.V.clone()
    gate = int(torch.argmax(V0.reshape(prob.P, -1).norm(dim=1)))
    V0[gate] = 0  # a wrong support: the strongest gate is missing
    res = newton_polish(prob, lam, V0)
    assert res.converged
    assert res.objective == pytest.approx(good.objective, rel=1e-9)
    assert float(res.V[gate].norm()) > 0


def test_non_unique_optimum_dependent_columns():
    # More gated columns (P d = 192) than rows (n = 20): the active columns are dependent.
    rng = np.random.default_rng(0)
    Z = np.hstack([rng.standard_normal((20, 2)), np.ones((20, 1))])
    Y = np.maximum(Z @ rng.standard_normal((3, 5)), 0) @ rng.standard_normal((5, 1))
    G = rng.standard_normal((3, 64))
    prob = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group="gate", dtype="float64")
    lam = 1e-3 * prob.lam_max()
    res = newton_polish(prob, lam, config=NewtonConfig(tol=1e-10))
    assert res.converged and res.kkt_residual <= 1e-10


@settings(max_examples=12, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    ratio=st.floats(0.002, 0.5),
    group=st.sampled_from(GROUPS),
)
def test_property_polish_never_worse_than_its_warm_start(seed, ratio, group):
    prob = make_problem(n=80, d=5, c=2, P=6, seed=seed, group=group)
    lam = ratio * prob.lam_max()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        rough = solve(prob, lam, FistaConfig(tol=1e-4))
        res = newton_polish(prob, lam, rough.V)
    assert res.objective <= rough.objective + 1e-12 * abs(rough.objective)
    assert res.kkt_residual <= 1e-10 or not res.converged


def test_cap_warns_and_reports_not_converged():
    prob = make_problem(n=400, d=10, c=3, P=16, seed=2)
    with pytest.warns(ConvergenceWarning):
        res = newton_polish(prob, 0.001 * prob.lam_max(), config=NewtonConfig(
            tol=1e-300, max_rounds=1, fista=FistaConfig(max_iter=5)))  # fmt: skip
    assert not res.converged


def test_errors():
    prob32 = make_problem(dtype="float32")
    with pytest.raises(ValueError, match="float64"):
        newton_polish(prob32, 0.1)
    prob = make_problem()
    with pytest.raises(ValueError, match="lam"):
        newton_polish(prob, 0.0)
    with pytest.raises(ValueError, match="shape"):
        newton_polish(prob, 0.1, torch.zeros(1, 2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="max_rounds"):
        NewtonConfig(max_rounds=0)
    with pytest.raises(ValueError, match="tol"):
        NewtonConfig(tol=float("nan"))


def test_support_too_large_to_factorise_falls_back_to_fista():
    prob = make_problem(seed=4)
    lam = 0.01 * prob.lam_max()
    res = newton_polish(prob, lam, config=NewtonConfig(tol=1e-10, max_dim=1))
    assert res.converged and res.kkt_residual <= 1e-10
    ref = newton_polish(prob, lam)
    assert res.objective == pytest.approx(ref.objective, rel=1e-9)
