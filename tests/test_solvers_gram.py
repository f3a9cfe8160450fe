"""Tests of the Gram operator mode: Gram data against a dense A^T A, gram vs direct solutions,
cvxpy oracle in both modes, caching across a lam path, auto selection, pruned gates, state guard."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_solvers_fista import GROUPS, cvxpy_solution, make_problem

from convexedge.host.solvers import FistaConfig, GatedProblem, fista_init, fista_step, solve
from convexedge.host.solvers.fista import _Gram

TIGHT = {"tol": 1e-11, "max_iter": 50000}


def dense_A(prob: GatedProblem) -> torch.Tensor:
    """(n, P*d) float64 matrix [D_1 Z, ..., D_P Z], so A(V) = dense_A @ V.reshape(P*d, c)."""
    Z, M = prob.Z.double(), prob.masks.double()
    return torch.cat([Z * M[:, [i]] for i in range(prob.P)], dim=1)


# ------------------------------------------------------------------------------ Gram data
@pytest.mark.parametrize("row_chunk", [7, 16384])
def test_gram_data_equals_dense_normal_equations(row_chunk):
    prob = make_problem(n=150, d=5, c=3, P=4)
    prob.row_chunk = row_chunk
    A = dense_A(prob)
    g = prob.gram()
    torch.testing.assert_close(g.G, A.T @ A, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g.B.reshape(-1, prob.c), A.T @ prob.Y, rtol=1e-12, atol=1e-12)
    assert g.yy == pytest.approx(float(prob.Y.square().sum()), rel=1e-14)
    assert torch.equal(g.G, g.G.T)
    assert g.seconds >= 0 and prob.gram_bytes() == (prob.P * prob.d) ** 2 * 8


def test_gram_float32_is_close_to_float64_and_handles_a_dead_gate():
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((3000, 6))
    masks = Z @ rng.standard_normal((6, 5)) >= 0
    masks[:, 2] = False  # a gate that is never on: its rows and columns of G are zero
    Y = rng.standard_normal((3000, 2))
    p64 = GatedProblem.from_arrays(Z, Y, masks, dtype="float64", row_chunk=1000)
    p32 = GatedProblem.from_arrays(Z, Y, masks, dtype="float32", row_chunk=1000)
    G64, G32 = p64.gram().G, p32.gram().G
    assert G32.dtype == torch.float32
    assert float((G32.double() - G64).norm() / G64.norm()) < 1e-6
    assert not G64[12:18].any() and not G64[:, 12:18].any()


def test_gram_image_with_pruned_gates_equals_full_product():
    prob = make_problem(n=120, d=5, c=2, P=5)
    op = _Gram(prob)
    V = torch.randn((5, 5, 2), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    V[[1, 3]] = 0
    full = (prob.gram().G @ V.reshape(-1, 2)).view(5, 5, 2)
    torch.testing.assert_close(op.image(V), full, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(
        op.image(V).reshape(-1, 2), dense_A(prob).T @ prob.forward(V), rtol=1e-12, atol=1e-12
    )


def test_lam_max_is_identical_with_and_without_gram():
    a, b = make_problem(seed=3), make_problem(seed=3)
    before = a.lam_max()
    a.gram()
    assert a.lam_max() == before == b.lam_max()
    c = make_problem(seed=3)
    c.gram()  # Gram first, lam_max after: same adjoint, same bits
    assert c.lam_max() == before


# ------------------------------------------------------------------------------ solutions
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("frac", [0.02, 0.2])
def test_gram_and_direct_reach_the_same_solution(group, frac):
    prob = make_problem(group=group, seed=7)
    lam = frac * prob.lam_max()
    rd = solve(prob, lam, FistaConfig(operator="direct", **TIGHT))
    rg = solve(prob, lam, FistaConfig(operator="gram", **TIGHT))
    assert rd.converged and rg.converged
    assert (rd.operator, rg.operator) == ("direct", "gram")
    assert rg.objective == pytest.approx(rd.objective, rel=1e-9)
    rel = float(torch.linalg.vector_norm(rg.V - rd.V) / torch.linalg.vector_norm(rd.V))
    assert rel < 1e-9
    # the tracked objective matches the true (float64 forward) one
    assert rg.history["objective"][-1] == pytest.approx(rg.objective, rel=1e-10)


@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("operator", ["direct", "gram"])
def test_matches_cvxpy_in_both_modes(group, operator):
    prob = make_problem(group=group, seed=11)
    lam = 0.1 * prob.lam_max()
    res = solve(prob, lam, FistaConfig(tol=1e-9, max_iter=20000, operator=operator))
    assert res.converged and res.operator == operator
    ref = cvxpy_solution(prob, lam)
    f_ref = prob.objective(ref, lam)
    assert res.objective <= f_ref + 1e-7 * abs(f_ref)
    assert float(torch.linalg.vector_norm(res.V - ref) / torch.linalg.vector_norm(ref)) < 1e-4


def test_warm_started_path_builds_the_gram_once():
    prob = make_problem(seed=5)
    cfg = FistaConfig(tol=1e-8, operator="gram")
    V, grams = None, []
    for r in (0.3, 0.1, 0.03):
        res = solve(prob, r * prob.lam_max(), cfg, V0=V)
        assert res.converged
        V = res.V
        grams.append(prob.gram())
    assert grams[0] is grams[1] is grams[2]
    # resuming from the solution stops at once in gram mode too
    assert solve(prob, 0.03 * prob.lam_max(), cfg, V0=V).iterations == 0


def test_init_step_resume_equals_uninterrupted_solve_in_gram_mode():
    prob = make_problem(seed=2, group="gate_output")
    lam = 0.05 * prob.lam_max()
    cfg = FistaConfig(tol=1e-9, operator="gram")
    res = solve(prob, lam, cfg)
    state = fista_init(prob, lam, cfg)
    for _ in range(res.iterations):
        state = fista_step(prob, lam, cfg, state)
    assert torch.equal(state.x, res.V)


def test_state_from_one_operator_is_refused_by_the_other():
    prob = make_problem(seed=4)
    lam = 0.1 * prob.lam_max()
    state = fista_init(prob, lam, FistaConfig(operator="direct"))
    with pytest.raises(ValueError, match="other operator"):
        fista_step(prob, lam, FistaConfig(operator="gram"), state)


def test_float32_gram_reaches_moderate_tol_and_agrees_with_direct():
    prob = make_problem(n=2000, d=10, c=4, P=8, seed=9, dtype="float32")
    lam = 0.01 * prob.lam_max()
    rd = solve(prob, lam, FistaConfig(tol=1e-4, operator="direct"))
    rg = solve(prob, lam, FistaConfig(tol=1e-4, operator="gram"))
    assert rd.converged and rg.converged and rg.V.dtype == torch.float32
    assert rg.objective == pytest.approx(rd.objective, rel=1e-4)


# ------------------------------------------------------------------------------ auto / config
def test_auto_picks_gram_only_when_it_fits_and_n_exceeds_pd():
    lam_frac = 0.1
    tall = make_problem(n=200, d=5, c=2, P=4, seed=1)  # n = 200 > P d = 20
    assert solve(tall, lam_frac * tall.lam_max()).operator == "gram"
    assert tall.has_gram
    capped = make_problem(n=200, d=5, c=2, P=4, seed=1)
    res = solve(capped, lam_frac * capped.lam_max(), FistaConfig(gram_max_bytes=100))
    assert res.operator == "direct" and not capped.has_gram
    wide = make_problem(n=30, d=5, c=2, P=8, seed=1)  # n = 30 <= P d = 40
    assert solve(wide, lam_frac * wide.lam_max()).operator == "direct"
    assert not wide.has_gram
    # a Gram already on the problem is reused by auto whatever the sizes
    wide.gram()
    assert solve(wide, lam_frac * wide.lam_max()).operator == "gram"
    # above lam_max: zero at once, no Gram built
    fresh = make_problem(n=200, d=5, c=2, P=4, seed=1)
    res = solve(fresh, 2 * fresh.lam_max())
    assert res.iterations == 0 and not fresh.has_gram


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"operator": "dense"}, "operator"),
        ({"gram_max_bytes": -1}, "gram_max_bytes"),
        ({"gram_max_bytes": 1.5}, "gram_max_bytes"),
        ({"gram_max_bytes": True}, "gram_max_bytes"),
    ],
)
def test_operator_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FistaConfig(**kwargs)
