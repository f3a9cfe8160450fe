"""Device FISTA (numpy) against the host FISTA (torch), its KKT certificate, Gram = rows."""

import numpy as np
import pytest

from convexedge.device.fista import (
    FistaConfig,
    GramData,
    RowData,
    fista_init,
    fista_step,
    kkt_residual,
    lam_max,
    make_operator,
    prox_group,
)


def _problem(seed=0, n=300, d_in=6, P=4, c=2):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d_in)).astype(np.float32)
    G = rng.standard_normal((d_in + 1, P)).astype(np.float32)
    G[:, 0] = 0
    Y = (np.maximum(Z[:, :c] * 2, 0) + 0.1 * rng.standard_normal((n, c))).astype(np.float32)
    M = (Z @ G[:-1] + G[-1]) >= 0
    return Z, Y, M


def _solve(data, lam, cfg, group="gate", iters=3000):
    op = make_operator(data, cfg)
    s = fista_init(op, lam, cfg, None, group)
    for _ in range(iters):
        s = fista_step(op, lam, cfg, s, group)
        if kkt_residual(op, s.x, lam, s.grad_x, group) <= cfg.tol:
            break
    return op, s


def _gram(Z, Y, M, group="gate"):
    Z1 = np.concatenate([Z, np.ones((Z.shape[0], 1), np.float32)], axis=1)
    P, d = M.shape[1], Z1.shape[1]
    Dz = (M[:, :, None] * Z1[:, None, :]).reshape(-1, P * d).astype(np.float64)
    return GramData(
        (Dz.T @ Dz).astype(np.float32), (Dz.T @ Y).reshape(P, d, -1).astype(np.float32),
        float((Y.astype(np.float64) ** 2).sum()), float(Z.shape[0]), group,
    )  # fmt: skip


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_matches_the_host_solver_objective(group):
    torch = pytest.importorskip("torch")
    from convexedge.host.solvers import FistaConfig as HostConfig
    from convexedge.host.solvers import solve
    from convexedge.host.solvers.problem import GatedProblem

    Z, Y, M = _problem()
    Z1 = np.concatenate([Z, np.ones((Z.shape[0], 1), np.float32)], axis=1)
    prob = GatedProblem.from_arrays(Z1, Y, M, group=group, dtype="float64")
    lam = 0.05 * prob.lam_max()
    host = solve(prob, lam, HostConfig(tol=1e-8, max_iter=20000))
    cfg = FistaConfig(tol=1e-5)
    op, s = _solve(RowData(Z, Y, M, group), lam, cfg, group)
    assert abs(lam_max(op, group) - prob.lam_max()) <= 1e-4 * prob.lam_max()
    dev_obj = prob.objective(torch.from_numpy(s.x.astype(np.float64)), lam)
    # group-lasso optima need not be unique: same objective (to float32 accuracy) is the test
    assert dev_obj <= host.objective * (1 + 1e-4) + 1e-7


def test_kkt_certificate_at_the_returned_point():
    Z, Y, M = _problem(1)
    cfg = FistaConfig(tol=1e-6)
    op = make_operator(RowData(Z, Y, M), cfg)
    lam = 0.1 * lam_max(op, "gate")
    op, s = _solve(RowData(Z, Y, M), lam, cfg)
    grad = op.grad(op.image(s.x))  # recomputed, not the solver's extrapolated one
    assert kkt_residual(op, s.x, lam, grad, "gate") <= 1e-4


def test_gram_mode_reaches_the_same_solution_as_rows():
    Z, Y, M = _problem(2)
    cfg = FistaConfig(tol=1e-6)
    rows_op = make_operator(RowData(Z, Y, M), cfg)
    lam = 0.05 * lam_max(rows_op, "gate")
    _, a = _solve(RowData(Z, Y, M), lam, cfg)
    gop, b = _solve(_gram(Z, Y, M), lam, cfg)
    assert abs(lam_max(gop, "gate") - lam_max(rows_op, "gate")) <= 1e-4 * lam_max(rows_op, "gate")
    np.testing.assert_allclose(a.x, b.x, rtol=2e-2, atol=2e-3)
    assert abs(a.fx - b.fx) <= 1e-4 * abs(a.fx)


def test_warm_start_from_the_solution_stops_at_once():
    Z, Y, M = _problem(3)
    cfg = FistaConfig(tol=1e-5)
    op = make_operator(RowData(Z, Y, M), cfg)
    lam = 0.1 * lam_max(op, "gate")
    _, s = _solve(RowData(Z, Y, M), lam, cfg)
    s2 = fista_init(op, lam, cfg, s.x, "gate")
    assert kkt_residual(op, s2.x, lam, s2.grad_x, "gate") <= 1e-5


def test_adjoint_is_the_transpose_of_the_forward_operator():
    Z, Y, M = _problem(4, n=700)  # several row chunks
    op = make_operator(RowData(Z, Y, M), FistaConfig(row_chunk=128))
    rng = np.random.default_rng(0)
    V = rng.standard_normal(op.shape).astype(np.float32)
    R = rng.standard_normal((700, 2)).astype(np.float32)
    lhs = float((op.image(V).astype(np.float64) * R).sum())
    rhs = float((V.astype(np.float64) * op.adjoint(R)).sum())
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)


def test_prox_zeroes_small_groups_exactly():
    V = np.ones((3, 2, 2), np.float32)
    V[1] *= 0.1
    out = prox_group(V, 0.5, "gate")
    assert (out[1] == 0).all() and np.linalg.norm(out[0]) == pytest.approx(1.5, rel=1e-6)


def test_warm_start_shape_is_checked():
    Z, Y, M = _problem()
    op = make_operator(RowData(Z, Y, M), FistaConfig())
    with pytest.raises(ValueError, match=r"V0 must have shape \(P, d, c\)"):
        fista_init(op, 0.1, FistaConfig(), np.zeros((1, 2, 3), np.float32), "gate")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"step_init": 0.0}, "step_init must be"),
        ({"backtrack": 1.0}, "backtrack must be"),
        ({"grow": 0.5}, "grow must be"),
        ({"restart": "always"}, "restart must be"),
        ({"row_chunk": 0}, "row_chunk must be"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FistaConfig(**kwargs)


@pytest.mark.parametrize("gram", [False, True])
def test_anchored_solution_is_optimal_and_tends_to_the_anchor(gram):
    """With mu/2 ||V - V0||^2 added, the KKT residual certifies the anchored problem; large mu -> V0."""
    Z, Y, M = _problem(3)
    data = _gram(Z, Y, M) if gram else RowData(Z, Y, M)
    cfg = FistaConfig(tol=1e-5)
    V0 = np.random.default_rng(1).standard_normal((M.shape[1], Z.shape[1] + 1, Y.shape[1])).astype(np.float32)
    lam = 0.01
    dists = []
    for mu in (0.1, 1.0, 10.0):
        op = make_operator(data, cfg, anchor=V0, mu=mu)
        s = fista_init(op, lam, cfg, V0, "gate")
        for _ in range(5000):
            s = fista_step(op, lam, cfg, s, "gate")
            if kkt_residual(op, s.x, lam, s.grad_x, "gate") <= cfg.tol:
                break
        assert kkt_residual(op, s.x, lam, s.grad_x, "gate") <= 1e-4  # float32 floor with a large mu
        # optimality against the objective: a random small perturbation never does better
        f = s.fx
        for k in range(5):
            dV = 1e-3 * np.random.default_rng(k).standard_normal(V0.shape).astype(np.float32)
            t = s.x + dV
            img = op.image(t)
            ft = op.full_smooth(t, img) + lam * float(np.sqrt((t.reshape(t.shape[0], -1) ** 2).sum(1)).sum())
            assert ft >= f - 1e-6 * abs(f)
        dists.append(float(np.linalg.norm(s.x - V0)))
    assert dists[0] > dists[1] > dists[2] and dists[2] < 0.2 * dists[0]


def test_anchor_is_validated():
    Z, Y, M = _problem()
    with pytest.raises(ValueError, match="mu must be"):
        make_operator(RowData(Z, Y, M), FistaConfig(), anchor=np.zeros((4, 7, 2), np.float32), mu=-1.0)
    with pytest.raises(ValueError, match="anchor must have shape"):
        make_operator(RowData(Z, Y, M), FistaConfig(), anchor=np.zeros((1, 2, 3), np.float32), mu=1.0)
