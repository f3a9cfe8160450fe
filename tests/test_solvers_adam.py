"""Tests of convexedge.host.solvers.adam: proximal Adam reaches the FISTA optimum (its fixed points
are the minimisers), reports the true objective, warns on non-convergence, validates its config."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers import AdamConfig, FistaConfig, GatedProblem, solve
from convexedge.host.solvers.adam import adam_init, adam_step


def make_problem(group="gate", n=200, d=6, c=2, P=5, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    Y = np.maximum(Z @ rng.standard_normal((d, 3)), 0) @ rng.standard_normal((3, c))
    return GatedProblem.from_arrays(Z, Y, Z @ rng.standard_normal((d, P)) >= 0, group=group, dtype="float64")


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_adam_reaches_fista_optimum(group):
    prob = make_problem(group, n=100, P=4)
    lam = 0.1 * prob.lam_max()
    ref = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=20_000))
    res = solve(prob, lam, AdamConfig(lr=3e-2, tol=1e-5, max_iter=20_000, check_every=5), method="adam")
    assert res.converged and res.kkt_residual <= 1e-5
    assert res.objective == pytest.approx(ref.objective, rel=1e-5)
    assert res.objective == pytest.approx(prob.objective(res.V, lam), rel=1e-14)  # the true one
    assert res.operator in ("direct", "gram") and res.group == group


def test_adam_state_resumes():
    prob = make_problem()
    lam, cfg = 0.1 * prob.lam_max(), AdamConfig(lr=1e-2)
    s = adam_init(prob, lam, cfg)
    for _ in range(5):
        s = adam_step(prob, lam, cfg, s)
    s2 = adam_init(prob, lam, cfg)
    for _ in range(3):
        s2 = adam_step(prob, lam, cfg, s2)
    s2 = s2._replace()  # a NamedTuple snapshot resumes as is
    for _ in range(2):
        s2 = adam_step(prob, lam, cfg, s2)
    torch.testing.assert_close(s.x, s2.x)
    assert s.it == s2.it == 5


def test_adam_iteration_cap_warns():
    prob = make_problem()
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        res = solve(prob, 0.01 * prob.lam_max(), AdamConfig(max_iter=3, tol=1e-12), method="adam")
    assert not res.converged and res.iterations == 3


def test_adam_time_cap_warns():
    prob = make_problem()
    with pytest.warns(ConvergenceWarning, match="raise max_seconds"):
        res = solve(prob, 0.01 * prob.lam_max(), AdamConfig(max_seconds=1e-9, tol=0.0), method="adam")
    assert not res.converged


def test_adam_zero_solution_above_lam_max():
    prob = make_problem()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = solve(prob, prob.lam_max(), method="adam")
    assert res.converged and res.iterations == 0 and tuple(res.V.shape) == (5, 6, 2)
    assert not res.V.any()


def test_adam_rejects_bad_v0():
    prob = make_problem()
    with pytest.raises(ValueError, match=r"V0 must have shape"):
        solve(prob, 0.1 * prob.lam_max(), method="adam", V0=torch.zeros(1, 2, 3))


def test_wrong_config_type():
    prob = make_problem()
    with pytest.raises(TypeError, match="takes a AdamConfig"):
        solve(prob, 0.1, FistaConfig(), method="adam")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, "lr must be"),
        ({"lr": float("nan")}, "lr must be"),
        ({"beta1": 1.0}, "beta1 must be"),
        ({"beta2": -0.1}, "beta2 must be"),
        ({"eps": 0}, "eps must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"tol": -1}, "tol must be"),
        ({"check_every": 0}, "check_every must be"),
        ({"max_seconds": 0}, "max_seconds must be"),
        ({"operator": "dense"}, "operator must be"),
        ({"gram_max_bytes": -1}, "gram_max_bytes must be"),
    ],
)
def test_adam_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AdamConfig(**kwargs)
