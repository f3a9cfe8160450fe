"""Tests of host/prune.py: optimal-set pruning keeps the objective and reaches a vertex."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import DataError
from convexedge.host.prune import dual_certificate, magnitude_prune, prune_to_minimal
from convexedge.host.solvers import FistaConfig, GatedProblem, solve


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny problems: torch's thread pool only adds overhead on a shared 2-core machine.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _problem(seed: int, n: int, d: int, c: int, P: int, group: str) -> GatedProblem:
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    G = rng.standard_normal((d, P))
    return GatedProblem.from_arrays(Z, rng.standard_normal((n, c)), Z @ G >= 0, group=group, dtype="float64")


@pytest.fixture(scope="module", params=["gate", "gate_output"])
def solved(request):
    """More gates than samples (P = 30 > n = 10): the optimum is not unique."""
    prob = _problem(0, 10, 3, 2, 30, request.param)
    res = solve(prob, 0.01 * prob.lam_max(), FistaConfig(tol=1e-10, max_iter=100000))
    assert res.converged
    return prob, res


def test_prune_keeps_objective_and_reaches_vertex(solved):
    prob, res = solved
    out = prune_to_minimal(prob, res)
    assert abs(out.rel_objective_change) <= 1e-8
    assert out.fitted_change <= 1e-8
    assert out.independent
    assert out.rank == out.groups_after  # independent active columns
    assert out.active_after < out.active_before  # this instance has a dependent optimum
    assert out.groups_after <= out.bound == prob.n * prob.c
    if prob.group == "gate_output":  # per output column at most n groups
        per_col = (torch.linalg.vector_norm(out.V, dim=1) > 0).sum(0)
        assert int(per_col.max()) <= prob.n
    # pruning a vertex again changes nothing
    again = prune_to_minimal(prob, out.V, res.lam)
    assert again.steps == 0 and again.active_after == out.active_after


def test_pruned_point_is_still_optimal(solved):
    prob, res = solved
    out = prune_to_minimal(prob, res)
    dual = dual_certificate(prob, out.V, res.lam)
    assert dual.max_violation <= 1e-6
    assert torch.allclose(dual.fitted, dual_certificate(prob, res).fitted, rtol=0, atol=1e-10)


def test_magnitude_pruning_costs_objective(solved):
    prob, res = solved
    out = prune_to_minimal(prob, res)
    mag = magnitude_prune(prob, res, out.active_after)
    ref = magnitude_prune(prob, res, out.active_after, refit=True)
    assert mag.active_after <= out.active_after and mag.method == "magnitude"
    assert mag.rel_objective_change > 1e-6  # strictly worse than the optimal-set prune here
    assert 0 <= ref.objective_after - out.objective_after + 1e-9
    assert ref.objective_after <= mag.objective_after + 1e-12
    assert magnitude_prune(prob, res, 0).active_after == 0


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 8),
    d=st.integers(1, 4),
    c=st.integers(1, 3),
    P=st.integers(1, 16),
    group=st.sampled_from(["gate", "gate_output"]),
    density=st.floats(0.2, 1.0),
)
def test_property_prune_keeps_fit_and_penalty(seed, n, d, c, P, group, density):
    """For *any* V (optimal or not) the walk keeps A(V) and sum_g ||V_g||, so F.

    Off the optimal set a null direction of the columns may change the penalty (only at an optimum
    is sum_g delta_g = <A delta, rho>/lam = 0 automatic), so the walk ends with at most rank + 1
    groups and no penalty-preserving move left; independence is tested on solved problems.
    """
    prob = _problem(seed, n, d, c, P, group)
    rng = np.random.default_rng(seed + 1)
    V = torch.from_numpy(rng.standard_normal((P, d, c)))
    V[torch.from_numpy(rng.random(P) > density)] = 0.0
    lam = 0.1
    out = prune_to_minimal(prob, V, lam)
    assert abs(out.rel_objective_change) <= 1e-8
    assert out.groups_after <= min(out.groups_before, out.rank + (1 if group == "gate" else c))
    assert prune_to_minimal(prob, out.V, lam).steps == 0
    pen0 = float(torch.linalg.vector_norm(V.reshape(P, -1) if group == "gate" else V, dim=1).sum())
    pen1 = float(torch.linalg.vector_norm(out.V.reshape(P, -1) if group == "gate" else out.V, dim=1).sum())
    assert abs(pen1 - pen0) <= 1e-9 * max(pen0, 1.0)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), group=st.sampled_from(["gate", "gate_output"]))
def test_property_prune_solved_problems(seed, group):
    """Random small problems solved by FISTA: the objective is unchanged and a vertex is reached."""
    prob = _problem(seed, 6, 2, 1 if group == "gate" else 2, 12, group)
    res = solve(prob, 0.05 * prob.lam_max(), FistaConfig(tol=1e-9, max_iter=50000))
    out = prune_to_minimal(prob, res)
    assert abs(out.rel_objective_change) <= 1e-8
    assert out.independent and out.groups_after <= prob.n * prob.c


def test_float32_problem_is_pruned_in_float64():
    prob = _problem(3, 6, 2, 1, 10, "gate")
    p32 = GatedProblem.from_arrays(prob.Z, prob.Y, prob.masks, dtype="float32")
    V = torch.randn(10, 2, 1, dtype=torch.float64)
    out = prune_to_minimal(p32, V, 0.1)
    assert out.V.dtype == torch.float64 and abs(out.rel_objective_change) <= 1e-8


def test_errors():
    prob = _problem(0, 5, 2, 1, 4, "gate")
    V = torch.zeros(4, 2, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="rtol must be in"):
        prune_to_minimal(prob, V, 0.1, rtol=0.0)
    with pytest.raises(ValueError, match="lam is required"):
        prune_to_minimal(prob, V)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        prune_to_minimal(prob, V, -1.0)
    with pytest.raises(DataError, match="V must have shape"):
        prune_to_minimal(prob, torch.zeros(3, 2, 1), 0.1)
    with pytest.raises(DataError, match="NaN/Inf"):
        prune_to_minimal(prob, torch.full((4, 2, 1), float("nan")), 0.1)
    res = solve(prob, 0.5 * prob.lam_max())
    with pytest.raises(ValueError, match="differs from the solution's lam"):
        prune_to_minimal(prob, res, lam=123.0)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        magnitude_prune(prob, res, -1)
    # zero solution: nothing to prune
    assert prune_to_minimal(prob, V, 0.1).active_after == 0
