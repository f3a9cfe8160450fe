"""Tests of host/optimal_set.py and host/constrained.py: optimal set, uniqueness, paths,
sensitivity, network recovery and the exact ReLU form, against brute force and cvxpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from convexedge.host.optimal_set import (
    GatedNetwork,
    ReluALConfig,
    ReluNetwork,
    check_uniqueness,
    describe_optimal_set,
    fitted_sensitivity,
    from_gated_network,
    from_relu_network,
    plot_path,
    prune_to_minimal,
    regularization_path,
    relu_objective,
    solve_relu,
    to_gated_network,
    to_relu_network,
)
from convexedge.host.solvers import FistaConfig, GatedProblem, solve

TIGHT = FistaConfig(tol=1e-11, max_iter=200000)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _problem(seed, n, d, c, P, group="gate", duplicate=False):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    G = rng.standard_normal((d, P))
    if duplicate:  # two gates with one mask: their columns are parallel
        G[:, -1] = 2.0 * G[:, 0]
    prob = GatedProblem.from_arrays(Z, rng.standard_normal((n, c)), Z @ G >= 0, group=group, dtype="float64")
    return prob, G


def _brute_force_unique(prob, V, lam, trials=4, tol=1e-4):
    """Unique iff every linear functional is constant on {V : A V = yhat, pen(V) <= pen*}.

    Uses only that yhat is unique (strict convexity of the loss in yhat), not the polyhedron.
    """
    import cvxpy as cp

    P, d, c = V.shape
    Z, M = prob.Z.numpy(), prob.masks.numpy().astype(float)
    yhat = prob.forward(V).numpy()
    Vs = [cp.Variable((d, c)) for _ in range(P)]
    fit = sum(cp.multiply(M[:, [i]], Z @ Vs[i]) for i in range(P))
    pen = sum(cp.norm(Vs[i], "fro") for i in range(P))
    base = cp.Problem(cp.Minimize(pen), [fit == yhat])
    base.solve(solver="CLARABEL")
    pstar = base.value
    rng = np.random.default_rng(0)
    spread = 0.0
    for _ in range(trials):
        C = rng.standard_normal((P, d, c))
        lin = sum(cp.sum(cp.multiply(C[i], Vs[i])) for i in range(P))
        vals = []
        for sense in (cp.Minimize, cp.Maximize):
            pr = cp.Problem(sense(lin), [fit == yhat, pen <= pstar * (1 + 1e-9) + 1e-12])
            pr.solve(solver="CLARABEL")
            vals.append(pr.value)
        spread = max(spread, (vals[1] - vals[0]) / max(1.0, abs(vals[0])))
    return spread <= tol


@pytest.mark.parametrize("duplicate", [False, True])
def test_uniqueness_agrees_with_brute_force(duplicate):
    prob, _ = _problem(5, 20, 3, 1, 5, duplicate=duplicate)
    lam = 0.05 * prob.lam_max()
    res = solve(prob, lam, TIGHT)
    V = res.V.clone()
    if duplicate:
        # The two gates share one mask, so any split of their sum is optimal: make both active.
        both = V[0] + V[-1]
        V[0], V[-1] = 0.5 * both, 0.5 * both
    u = check_uniqueness(prob, V, lam)
    bf = _brute_force_unique(prob, V, lam)
    assert u.unique == bf, (u.reason, bf)
    if duplicate:
        assert not u.unique and u.null_dim >= 1 and "null space" in u.reason
        # pruning reaches a vertex where the duplicates are no longer both active
        out = prune_to_minimal(prob, V, lam)
        assert out.independent and abs(out.rel_objective_change) <= 1e-8
    else:
        assert u.unique, u.reason


def test_uniqueness_zero_solution_and_entering_detection():
    prob, _ = _problem(1, 6, 2, 1, 4)
    V = torch.zeros(4, 2, 1, dtype=torch.float64)
    assert check_uniqueness(prob, V, 2 * prob.lam_max()).unique


def test_describe_optimal_set_contains_pruned_points():
    prob, _ = _problem(0, 10, 3, 2, 30)
    lam = 0.01 * prob.lam_max()
    res = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=100000))
    opt = describe_optimal_set(prob, res)
    assert opt.contains(opt.alpha)
    assert torch.allclose(opt.point(opt.alpha), res.V.double(), atol=1e-6)
    assert opt.rank <= prob.n * prob.c
    out = prune_to_minimal(prob, res)
    norms = torch.linalg.vector_norm(out.V.reshape(prob.P, -1), dim=1).numpy()
    alpha_pruned = np.array([norms[g] for g in opt.groups])
    assert opt.contains(alpha_pruned, tol=1e-7)
    assert abs(alpha_pruned.sum() - opt.penalty) <= 1e-8 * opt.penalty
    with pytest.raises(ValueError, match="alpha must have shape"):
        opt.point(np.zeros(1))
    with pytest.raises(ValueError, match="etol must be in"):
        describe_optimal_set(prob, res, etol=2.0)


def test_gate_output_constraints_equal_the_dense_column_matrix():
    """Per output the reduced rows are built block by block; they must span the same constraints
    as the dense (n c, |E|) matrix of columns (A_eq^T A_eq = cols^T cols, same rank)."""
    prob, _ = _problem(3, 12, 3, 3, 20, group="gate_output")
    lam = 0.01 * prob.lam_max()
    res = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=100000))
    opt = describe_optimal_set(prob, res)
    assert {g[1] for g in opt.groups} == {0, 1, 2}  # every output has groups: several blocks
    cols = np.zeros((prob.n * prob.c, len(opt.groups)))
    Z, M = prob.Z.numpy(), prob.masks.numpy().astype(float)
    for k, (i, j) in enumerate(opt.groups):
        col = np.zeros((prob.n, prob.c))
        col[:, j] = (Z @ opt.directions[k].numpy()) * M[:, i]
        cols[:, k] = col.ravel()
    np.testing.assert_allclose(opt.A_eq.T @ opt.A_eq, cols.T @ cols, atol=1e-9)
    assert opt.rank == np.linalg.matrix_rank(cols, tol=1e-9 * np.linalg.norm(cols, 2))
    assert opt.contains(opt.alpha)


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_sensitivity_matches_finite_differences(group):
    prob, _ = _problem(2, 12, 3, 2, 6, group=group)
    lam = 0.1 * prob.lam_max()
    res = solve(prob, lam, TIGHT)
    sens = fitted_sensitivity(prob, res)
    h = 1e-4 * lam
    lo = solve(prob, lam - h, TIGHT, V0=res.V)
    hi = solve(prob, lam + h, TIGHT, V0=res.V)
    act = lambda V: set(torch.nonzero(V.reshape(V.shape[0], -1).ne(0).any(1)).flatten().tolist())  # noqa: E731
    assert act(lo.V) == act(hi.V) == act(res.V)  # no change point inside the interval
    fd = (prob.forward(hi.V) - prob.forward(lo.V)) / (2 * h)
    err = float(torch.linalg.vector_norm(fd - sens.dfitted) / torch.linalg.vector_norm(fd))
    assert err <= 1e-4, err
    with pytest.raises(ValueError, match="max_size"):
        fitted_sensitivity(prob, res, max_size=1)


def test_regularization_path_change_points_and_png(tmp_path):
    prob, _ = _problem(4, 40, 4, 2, 8)
    path = regularization_path(prob, n_lams=6, lam_min_ratio=0.01, config=FistaConfig(tol=1e-8), prune=True)
    assert len(path.results) == 6 and path.gate_norms.shape == (6, 8)
    assert all(np.diff(path.lams) < 0)
    assert path.change_points and all(cp["added"] or cp["removed"] for cp in path.change_points)
    for cp in path.change_points:
        k = cp["index"]
        assert set(path.active[k]) ^ set(path.active[k - 1])
    assert (path.pruned_active <= np.array([len(a) for a in path.active])).all()
    png = plot_path(path, tmp_path / "path.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_path(path, tmp_path / "acc.png", accuracy=list(range(6)), accuracy_label="top-1")
    with pytest.raises(ValueError, match="one value per path point"):
        plot_path(path, tmp_path / "x.png", accuracy=[1.0])
    with pytest.raises(ValueError, match="n_lams must be"):
        regularization_path(prob, n_lams=1)
    with pytest.raises(ValueError, match="lam_min_ratio < lam_max_ratio"):
        regularization_path(prob, lam_min_ratio=0.9, lam_max_ratio=0.5)


def test_gated_network_round_trip():
    prob, G = _problem(3, 30, 4, 3, 6)
    res = solve(prob, 0.02 * prob.lam_max(), FistaConfig(tol=1e-8))
    net = to_gated_network(res.V, G)
    Z = prob.Z
    assert torch.allclose(net.predict(Z), prob.forward(res.V), rtol=0, atol=1e-12)
    V2, G2 = from_gated_network(net, P=prob.P)
    assert torch.allclose(V2, res.V, atol=1e-12)
    # network -> convex -> network: predictions unchanged
    rng = torch.Generator().manual_seed(0)
    raw = GatedNetwork(torch.randn(4, 5, generator=rng, dtype=torch.float64),
                       torch.randn(5, 3, generator=rng, dtype=torch.float64),
                       torch.from_numpy(G[:, [0, 1, 1, 2, 5]]).double(), [0, 1, 1, 2, 5])  # fmt: skip
    V3, G3 = from_gated_network(raw)
    back = to_gated_network(V3, G3)
    assert torch.allclose(back.predict(Z), raw.predict(Z), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="expected V"):
        to_gated_network(res.V, G[:, :2])
    with pytest.raises(ValueError, match="smaller than the largest gate index"):
        from_gated_network(raw, P=2)


def test_relu_network_round_trip():
    rng = torch.Generator().manual_seed(1)
    Z = torch.randn(25, 3, generator=rng, dtype=torch.float64)
    net = ReluNetwork(torch.randn(3, 7, generator=rng, dtype=torch.float64),
                      torch.randn(7, 2, generator=rng, dtype=torch.float64))  # fmt: skip
    U, W, masks = from_relu_network(net, Z)
    # cone constraints hold by construction
    K = (2 * masks.double() - 1).T[:, :, None] * Z[None]  # (m, n, d)
    assert (torch.einsum("mnd,mdc->mnc", K, U) >= -1e-12).all()
    assert (torch.einsum("mnd,mdc->mnc", K, W) >= -1e-12).all()
    prob = GatedProblem.from_arrays(Z, torch.zeros(25, 2, dtype=torch.float64), masks,
                                    group="gate_output", dtype="float64")  # fmt: skip
    convex_pred = prob.forward(U - W)
    assert torch.allclose(convex_pred, net.predict(Z), rtol=0, atol=1e-12)
    back = to_relu_network(U, W)
    assert torch.allclose(back.predict(Z), net.predict(Z), rtol=0, atol=1e-12)
    # balanced network: weight decay equals the convex penalty
    assert back.objective(Z, prob.Y, 0.3) == pytest.approx(relu_objective(prob, U, W, 0.3), rel=1e-12)
    with pytest.raises(ValueError, match="U and W must both be"):
        to_relu_network(U, W[:2])


def _all_patterns(Z: np.ndarray, draws: int = 20000) -> np.ndarray:
    """Every activation pattern 1[Z g >= 0] of a tiny Z (dense random search, then unique)."""
    rng = np.random.default_rng(0)
    G = rng.standard_normal((Z.shape[1], draws))
    return np.unique((Z @ G >= 0).T, axis=0).T


def test_constrained_form_equals_best_relu_network():
    """n = 6 points in 2-D (with a bias column): all sign patterns, the AL solution, cvxpy on the
    same constrained program, and non-convex training of two-layer ReLU networks."""
    import cvxpy as cp

    rng = np.random.default_rng(0)
    n = 6
    Z = np.hstack([rng.standard_normal((n, 2)), np.ones((n, 1))])
    y = rng.standard_normal((n, 1))
    M = _all_patterns(Z)
    prob = GatedProblem.from_arrays(Z, y, M, dtype="float64")
    lam = 0.05 * prob.lam_max()
    res = solve_relu(prob, lam)
    assert res.converged and res.max_violation <= 1e-6
    P = M.shape[1]
    U = cp.Variable((P, 3))
    W = cp.Variable((P, 3))
    pred = sum(cp.multiply(M[:, i], Z @ (U[i] - W[i])) for i in range(P))
    cons = []
    for i in range(P):
        K = (2 * M[:, i] - 1)[:, None] * Z
        cons += [K @ U[i] >= 0, K @ W[i] >= 0]
    obj = cp.sum_squares(pred - y[:, 0]) / (2 * n) + lam * (
        cp.sum(cp.norm(U, axis=1)) + cp.sum(cp.norm(W, axis=1))
    )
    oracle = cp.Problem(cp.Minimize(obj), cons)
    oracle.solve(solver="CLARABEL")
    assert res.objective == pytest.approx(oracle.value, rel=1e-5)
    # the network read off the convex solution attains the convex value
    net = to_relu_network(res.U, res.W)
    Zt, yt = torch.from_numpy(Z), torch.from_numpy(y)
    assert net.objective(Zt, yt, lam) == pytest.approx(res.objective, rel=1e-5)
    # no two-layer ReLU network beats it (weight decay, random restarts, L-BFGS)
    best = np.inf
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        W1 = torch.randn(3, 12, generator=g, dtype=torch.float64).requires_grad_()
        W2 = (0.1 * torch.randn(12, 1, generator=g, dtype=torch.float64)).requires_grad_()
        opt = torch.optim.LBFGS([W1, W2], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe")

        def closure(opt=opt, W1=W1, W2=W2):
            opt.zero_grad()
            r = torch.relu(Zt @ W1) @ W2 - yt
            loss = 0.5 * r.square().sum() / n + 0.5 * lam * (W1.square().sum() + W2.square().sum())
            loss.backward()
            return loss

        opt.step(closure)
        best = min(best, ReluNetwork(W1.detach(), W2.detach()).objective(Zt, yt, lam))
    assert best >= res.objective - 1e-6 * abs(res.objective)


def test_constrained_errors():
    prob, _ = _problem(0, 6, 2, 2, 3)
    with pytest.raises(ValueError, match="one output at a time"):
        solve_relu(prob, 0.1)
    prob1, _ = _problem(0, 6, 2, 1, 3)
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        solve_relu(prob1, 0.0)
    with pytest.raises(ValueError, match="penalty must be a finite number > 0"):
        ReluALConfig(penalty=-1.0)
    with pytest.raises(ValueError, match="growth must be >= 1"):
        ReluALConfig(growth=0.5)
    with pytest.raises(ValueError, match="max_outer must be an int >= 1"):
        ReluALConfig(max_outer=0)
    with pytest.raises(TypeError, match="inner must be a FistaConfig"):
        ReluALConfig(inner=None)
