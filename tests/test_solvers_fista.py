"""Tests of convexedge.host.solvers.fista: cvxpy oracle, KKT certificate, resume, monotone,
non-convergence status, float32, config validation."""

from __future__ import annotations

import dataclasses
import itertools
import json
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
    fista_init,
    fista_step,
    kkt_residual,
    solve,
)

GROUPS = ("gate", "gate_output")


def make_problem(n=160, d=8, c=3, P=6, seed=0, group="gate", dtype="float64", bias=True):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d - 1 if bias else d))
    Z = np.hstack([X, np.ones((n, 1))]) if bias else X
    G = rng.standard_normal((Z.shape[1], P))
    # targets from a planted two-layer ReLU net plus noise, so the fit is meaningful
    W1 = rng.standard_normal((Z.shape[1], 4))
    Y = np.maximum(Z @ W1, 0) @ rng.standard_normal((4, c)) + 0.1 * rng.standard_normal((n, c))
    return GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype=dtype)


def cvxpy_solution(prob: GatedProblem, lam: float) -> torch.Tensor:
    cp = pytest.importorskip("cvxpy")
    Z, Y = prob.Z.numpy(), prob.Y.numpy()
    M = prob.masks.numpy().astype(float)
    Vs = [cp.Variable((prob.d, prob.c)) for _ in range(prob.P)]
    pred = sum(cp.multiply(M[:, [i]], Z @ Vs[i]) for i in range(prob.P))
    if prob.group == "gate":
        pen = sum(cp.norm(V, "fro") for V in Vs)
    else:
        pen = sum(cp.norm(V[:, j], 2) for V in Vs for j in range(prob.c))
    obj = cp.sum_squares(pred - Y) / (2 * prob.n) + lam * pen
    cp.Problem(cp.Minimize(obj)).solve(solver=cp.CLARABEL)
    return torch.tensor(np.stack([V.value for V in Vs]))


# ------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("frac", [0.05, 0.3])
def test_matches_cvxpy(group, frac):
    prob = make_problem(group=group, seed=GROUPS.index(group) + int(100 * frac))
    lam = frac * prob.lam_max()
    res = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=20_000))
    assert res.converged and res.kkt_residual <= 1e-10
    ref = prob.objective(cvxpy_solution(prob, lam), lam)
    # group-lasso optima need not be unique: accept the same objective or a better one
    assert res.objective <= ref * (1 + 1e-6)
    assert res.objective == pytest.approx(ref, rel=1e-6) or res.objective <= ref
    assert res.objective == pytest.approx(prob.objective(res.V, lam), rel=1e-14)
    # the fitted values are unique (strictly convex loss in the prediction)
    pred_ref = prob.forward(cvxpy_solution(prob, lam))
    torch.testing.assert_close(prob.forward(res.V), pred_ref, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def variant_problem():
    prob = make_problem(n=80, d=5, c=2, P=4, seed=7)
    lam = 0.1 * prob.lam_max()
    return prob, lam, solve(prob, lam, FistaConfig(tol=1e-10, max_iter=20_000)).objective


@pytest.mark.parametrize("restart", ["gradient", "function", "none"])
@pytest.mark.parametrize("monotone", [False, True])
@pytest.mark.parametrize("momentum_a", [None, 1.0, 3.0])  # Beck & Teboulle, our default, Chambolle & Dossal
def test_every_variant_reaches_the_same_objective(variant_problem, restart, monotone, momentum_a):
    prob, lam, ref = variant_problem
    cfg = FistaConfig(tol=1e-8, max_iter=20_000, restart=restart, monotone=monotone, momentum_a=momentum_a)
    res = solve(prob, lam, cfg)
    assert res.converged and res.kkt_residual <= 1e-8
    assert res.objective == pytest.approx(ref, rel=1e-9)
    if restart == "none":
        assert res.restarts == 0


# ------------------------------------------------------------------------------ certificate
@pytest.mark.parametrize("group", GROUPS)
def test_kkt_residual_at_returned_point_is_below_tol(group):
    prob = make_problem(group=group, seed=3)
    lam = 0.1 * prob.lam_max()
    tol = 1e-7
    res = solve(prob, lam, FistaConfig(tol=tol))
    assert res.converged
    # recomputed from scratch (its own forward and adjoint), not the solver's running gradient
    assert kkt_residual(prob, res.V, lam) <= tol
    assert res.kkt_residual == pytest.approx(kkt_residual(prob, res.V, lam), rel=1e-6, abs=1e-12)
    assert res.history["kkt"][-1] == res.kkt_residual
    assert set(res.history) >= {"objective", "kkt", "step", "seconds"}
    assert all(len(v) == len(res.history["kkt"]) for v in res.history.values())


def test_kkt_residual_is_zero_at_zero_above_lam_max_and_positive_below():
    prob = make_problem(seed=4)
    V0 = torch.zeros(prob.P, prob.d, prob.c, dtype=torch.float64)
    lm = prob.lam_max()
    assert kkt_residual(prob, V0, lm) == 0.0
    # below lam_max, zero is not optimal; the residual is relative to ||grad f(0)||
    assert 0 < kkt_residual(prob, V0, 0.5 * lm) < 1
    assert kkt_residual(prob, V0, 0.0) == pytest.approx(1.0, rel=1e-12)


def test_lam_at_or_above_lam_max_returns_zero_solution():
    prob = make_problem(group="gate_output")
    res = solve(prob, 2 * prob.lam_max())
    assert res.converged and res.iterations == 0 and res.kkt_residual == 0.0
    assert res.V.shape == (prob.P, prob.d, prob.c) and torch.count_nonzero(res.V) == 0
    assert res.objective == pytest.approx(0.5 * float((prob.Y**2).sum()) / prob.n, rel=1e-12)
    assert (res.group, res.dtype, res.device) == ("gate_output", "float64", "cpu")


# ------------------------------------------------------------------------------ resume
def test_init_step_resume_equals_uninterrupted_solve():
    prob = make_problem(seed=5)
    lam = 0.05 * prob.lam_max()
    cfg = FistaConfig(tol=0.0, max_iter=40)
    with pytest.warns(ConvergenceWarning):
        full = solve(prob, lam, cfg)
    state = fista_init(prob, lam, cfg)
    for _ in range(15):
        state = fista_step(prob, lam, cfg, state)
    paused = state  # e.g. stored between idle slots
    for _ in range(25):
        paused = fista_step(prob, lam, cfg, paused)
    assert paused.it == full.iterations == 40
    assert torch.equal(paused.x, full.V)
    assert paused.restarts == full.restarts
    # the step function is pure: stepping the stored state again gives the same iterate
    again = state
    for _ in range(25):
        again = fista_step(prob, lam, cfg, again)
    assert torch.equal(again.x, paused.x)


def test_warm_start_from_solution_stops_at_once():
    prob = make_problem(seed=6)
    lam = 0.1 * prob.lam_max()
    cfg = FistaConfig(tol=1e-8)
    res = solve(prob, lam, cfg)
    warm = solve(prob, lam, cfg, V0=res.V)
    assert warm.converged and warm.iterations == 0
    with pytest.raises(ValueError, match=r"V0 must have shape"):
        solve(prob, lam, cfg, V0=res.V[:-1])


# ------------------------------------------------------------------------------ monotone
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    frac=st.floats(0.01, 0.9),
    group=st.sampled_from(GROUPS),
    restart=st.sampled_from(["gradient", "function", "none"]),
)
def test_monotone_objective_never_increases(seed, frac, group, restart):
    prob = make_problem(n=80, d=5, c=2, P=4, seed=seed, group=group)
    cfg = FistaConfig(tol=1e-9, max_iter=60, monotone=True, restart=restart)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solve(prob, frac * prob.lam_max(), cfg)
    objs = res.history["objective"]
    assert len(objs) == res.iterations + 1
    assert all(b <= a for a, b in itertools.pairwise(objs))


# ------------------------------------------------------------------------------ status
def test_max_iter_returns_not_converged_with_warning():
    prob = make_problem()
    with pytest.warns(ConvergenceWarning, match=r"max_iter=3; raise max_iter \(or loosen tol\)"):
        res = solve(prob, 0.01 * prob.lam_max(), FistaConfig(max_iter=3, tol=1e-12))
    assert not res.converged and res.iterations == 3
    assert res.kkt_residual > 1e-12


def test_max_seconds_returns_not_converged_with_warning():
    prob = make_problem()
    cfg = FistaConfig(max_iter=10**6, tol=0.0, max_seconds=0.05)
    with pytest.warns(ConvergenceWarning, match=r"max_seconds=0.05; raise max_seconds"):
        res = solve(prob, 0.01 * prob.lam_max(), cfg)
    assert not res.converged and 0 < res.iterations < 10**6


def test_progress_and_check_every():
    prob = make_problem()
    calls = []
    cfg = FistaConfig(tol=1e-8, check_every=5)
    res = solve(prob, 0.1 * prob.lam_max(), cfg, progress=lambda *a: calls.append(a))
    assert res.converged and res.iterations % 5 == 0
    its = [c[0] for c in calls]
    assert its == res.history["iteration"] and all(i % 5 == 0 for i in its)


@pytest.mark.parametrize("method", ["fista", "adam"])
def test_progress_returning_true_stops_the_solve(method):
    """A callback that returns True (here: a target objective reached) ends the solve at that
    check, unconverged and with a warning; a callback returning other truthy values does not."""
    from convexedge.host.solvers.adam import AdamConfig

    prob = make_problem()
    lam = 0.01 * prob.lam_max()
    cfg = FistaConfig(tol=1e-10) if method == "fista" else AdamConfig(lr=1e-2, tol=1e-10, max_iter=20_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = solve(prob, lam, cfg, method=method)
    target = full.history["objective"][0] - 0.9 * (full.history["objective"][0] - full.objective)
    with pytest.warns(ConvergenceWarning, match="request to stop"):
        res = solve(prob, lam, cfg, method=method, progress=lambda it, f, kkt: f <= target)
    assert not res.converged and 0 < res.iterations < full.iterations
    assert res.history["objective"][-1] <= target < res.history["objective"][-2]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        same = solve(prob, lam, cfg, method=method, progress=lambda *a: 1)
    assert same.iterations == full.iterations


def test_float32_reaches_moderate_tol():
    prob = make_problem(n=2000, d=20, c=6, P=8, seed=8, dtype="float32")
    res = solve(prob, 0.01 * prob.lam_max(), FistaConfig(tol=1e-4))
    assert res.converged and res.kkt_residual <= 1e-4
    assert res.V.dtype == torch.float32 and res.dtype == "float32"
    assert kkt_residual(prob, res.V, 0.01 * prob.lam_max()) <= 2e-4


def test_float32_with_unreachable_tol_terminates_finite():
    prob = make_problem(n=300, d=8, c=3, P=6, seed=9, dtype="float32")
    lam = 0.05 * prob.lam_max()
    with pytest.warns(ConvergenceWarning, match=r"raise max_iter \(or loosen tol\)"):
        res = solve(prob, lam, FistaConfig(tol=1e-14, max_iter=400))
    assert torch.isfinite(res.V).all() and not res.converged
    ref = solve(make_problem(n=300, d=8, c=3, P=6, seed=9), lam, FistaConfig(tol=1e-10))
    assert res.objective == pytest.approx(ref.objective, rel=1e-5)


# ------------------------------------------------------------------------------ config / API
def test_config_is_json_serialisable():
    cfg = FistaConfig(tol=1e-5, restart="function", max_seconds=2.5)
    assert FistaConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_iter": -1}, "max_iter must be an int >= 0"),
        ({"tol": -1e-3}, "tol must be a finite number >= 0"),
        ({"step_init": 0.0}, "step_init must be None or a finite number > 0"),
        ({"backtrack": 1.0}, r"backtrack must be in \(0, 1\)"),
        ({"grow": 0.9}, "grow must be a finite number >= 1"),
        ({"restart": "always"}, "restart must be 'function', 'gradient' or 'none'"),
        ({"monotone": 1}, "monotone must be a bool"),
        ({"momentum_a": 0.0}, "momentum_a must be None or a finite number > 0"),
        ({"check_every": 0}, "check_every must be an int >= 1"),
        ({"max_seconds": 0}, "max_seconds must be None or > 0"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FistaConfig(**kwargs)


def test_solve_rejects_unknown_method_and_bad_lam():
    prob = make_problem()
    with pytest.raises(ValueError, match=r"method must be one of \('fista', 'adam', 'pyscnn'\), got 'lbfgs'"):
        solve(prob, 0.1, method="lbfgs")
    with pytest.raises(ValueError, match=r"lam must be a finite number >= 0"):
        solve(prob, -1.0)
