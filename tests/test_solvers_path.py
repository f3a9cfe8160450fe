"""Tests of convexedge.host.solvers.path: the screened, warm-started path equals cold solves at
every lam; screening discards gates; the KKT check re-adds gates the rule wrongly dropped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convexedge.host.solvers import FistaConfig, GatedProblem, solve, solve_path
from convexedge.host.solvers.path import _solve_screened

TIGHT = FistaConfig(tol=1e-10, max_iter=50_000)


def make_problem(group="gate", n=240, d=6, c=2, P=16, seed=3, dtype="float64"):
    rng = np.random.default_rng(seed)
    Z = np.hstack([rng.standard_normal((n, d - 1)), np.ones((n, 1))])
    Y = np.maximum(Z @ rng.standard_normal((d, 2)), 0) @ rng.standard_normal((2, c))
    Y += 0.05 * rng.standard_normal((n, c))
    return GatedProblem.from_arrays(Z, Y, Z @ rng.standard_normal((d, P)) >= 0, group=group, dtype=dtype)


@pytest.mark.parametrize(
    ("group", "operator"),
    [
        ("gate", "gram"),
        ("gate_output", "gram"),
        pytest.param("gate", "direct", marks=pytest.mark.slow),
        pytest.param("gate_output", "direct", marks=pytest.mark.slow),
    ],
)
def test_path_equals_cold_solves(group, operator):
    prob = make_problem(group)
    lm = prob.lam_max()
    lams = list(lm * np.geomspace(0.9, 0.05, 5))
    cfg = FistaConfig(tol=1e-10, max_iter=50_000, operator=operator)
    path = solve_path(prob, lams, cfg)
    assert len(path) == len(lams)
    for lam, res in zip(lams, path, strict=True):
        cold = solve(prob, lam, cfg)
        assert res.lam == lam and res.converged and res.kkt_residual <= 1e-10
        assert res.objective == pytest.approx(cold.objective, rel=1e-8)
        assert res.objective == pytest.approx(prob.objective(res.V, lam), rel=1e-14)
        assert tuple(res.V.shape) == (prob.P, prob.d, prob.c)
        # same fitted values (unique), same active gates up to the tolerance
        torch.testing.assert_close(prob.forward(res.V), prob.forward(cold.V), rtol=1e-5, atol=1e-6)
    # the strong rule discarded gates at the large lams
    assert min(r.history["screening"][0] for r in path) < prob.P


def test_kkt_check_readds_wrongly_discarded_gates():
    prob = make_problem()
    lam = 0.05 * prob.lam_max()
    cold = solve(prob, lam, TIGHT)
    active = cold.V.reshape(prob.P, -1).ne(0).any(dim=1)
    assert active.sum() >= 2
    res, info, _ = _solve_screened(prob, lam, torch.tensor([0]), TIGHT, None, "fista", None)
    assert info["readded_gates"] > 0 and info["rounds"] >= 2
    assert res.converged and res.kkt_residual <= 1e-10
    assert res.objective == pytest.approx(cold.objective, rel=1e-8)


def test_path_warm_start_and_lam_above_max():
    prob = make_problem()
    lm = prob.lam_max()
    path = solve_path(prob, [2 * lm, lm, 0.3 * lm], TIGHT)
    assert not path[0].V.any() and not path[1].V.any() and path[0].iterations == 0
    again = solve_path(prob, [0.2 * lm], TIGHT, V0=path[2].V)
    assert again[0].objective == pytest.approx(solve(prob, 0.2 * lm, TIGHT).objective, rel=1e-8)


def test_path_without_screening_and_with_adam():
    from convexedge.host.solvers import AdamConfig

    prob = make_problem(n=120, P=4)
    lm = prob.lam_max()
    plain = solve_path(prob, [0.5 * lm, 0.3 * lm], TIGHT, screen="none")
    assert all(r.history["screening"][0] == prob.P for r in plain)
    adam = solve_path(prob, [0.5 * lm, 0.3 * lm], AdamConfig(lr=1e-2, tol=1e-5, max_iter=20_000),
                      method="adam")  # fmt: skip
    for a, b in zip(adam, plain, strict=True):
        assert a.objective == pytest.approx(b.objective, rel=1e-4)


@pytest.mark.parametrize(
    ("lams", "kwargs", "match"),
    [
        ([], {}, "at least one"),
        ([1.0, float("nan")], {}, "finite"),
        ([1.0, -0.5], {}, "finite numbers >= 0"),
        ([0.1, 0.5], {}, "strictly decreasing"),
        ([0.1], {"method": "pyscnn"}, "method must be"),
        ([0.1], {"screen": "safe"}, "screen must be"),
    ],
)
def test_path_validation(lams, kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_path(make_problem(P=4), lams, **kwargs)
