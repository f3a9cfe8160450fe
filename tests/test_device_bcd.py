"""Block coordinate solver: same optimum as the device FISTA, monotone block steps, KKT certificate,
cancellation and deadline, and a working set that fits a microcontroller-sized refit."""

import math
import time
import tracemalloc

import numpy as np
import pytest
from device_problems import certified
from device_problems import gated_rows as _problem
from device_problems import linear_stream as _stream
from device_problems import objective as _objective
from device_problems import small_head as _head
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device import BcdConfig, BufferConfig, RefitConfig, RefitRuntime
from convexedge.device.bcd import (
    _metric_prox_step,
    bcd_block_step_,
    bcd_init,
    bcd_kkt,
    bcd_objective,
    bcd_solve,
    block_grad,
)
from convexedge.device.fista import FistaConfig, RowData
from convexedge.device.worker import solve


@pytest.mark.parametrize("group", ["gate", "gate_output"])
@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_reaches_the_fista_objective(group, mu):
    data = _problem(1, group=group)
    V0 = 0.1 * np.random.default_rng(2).standard_normal((4, 7, 2)).astype(np.float32)
    lam = 0.01
    a = solve(data, V0, lam, FistaConfig(tol=1e-6, max_iter=20000), group, anchor_mu=mu)
    b = bcd_solve(data, V0, lam, BcdConfig(tol=1e-6, max_iter=20000), group, anchor_mu=mu)
    assert a.converged and b.converged
    fa, fb = _objective(data, a.x, lam, V0, mu), _objective(data, b.x, lam, V0, mu)
    # group-L1 optima need not be unique: the same objective, or no worse
    assert fb <= fa + 1e-5 * abs(fa)
    assert np.array_equal(np.linalg.norm(a.x, axis=(1, 2)) > 0, np.linalg.norm(b.x, axis=(1, 2)) > 0)


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_kkt_certificate_at_the_returned_point(group):
    """The FISTA module's KKT residual, evaluated independently at BCD's answer, meets the tolerance."""
    data = _problem(3, n=400, d_in=8, P=5, c=3, group=group)
    V0 = np.zeros((5, 9, 3), np.float32)
    lam, tol = 0.02, 1e-5
    out = bcd_solve(data, V0, lam, BcdConfig(tol=tol, max_iter=20000), group)
    assert out.converged and out.kkt <= tol
    assert certified(data, out, lam, tol, group)
    # a large lam zeroes everything and is certified at once
    big = bcd_solve(data, V0, 1e3, BcdConfig(tol=tol), group)
    assert big.converged and big.iterations == 0 and not big.x.any()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    P=st.integers(1, 5),
    c=st.integers(1, 3),
    lam=st.floats(0.0, 0.5),
    mu=st.sampled_from([0.0, 0.3, 3.0]),
    group=st.sampled_from(["gate", "gate_output"]),
    relax=st.sampled_from([1.0, 1.5]),
    rank=st.sampled_from([0, 1, 2]),
)
def test_objective_never_increases_per_block_step(seed, P, c, lam, mu, group, relax, rank):
    rng = np.random.default_rng(seed)
    data = _problem(seed, n=int(rng.integers(20, 120)), d_in=int(rng.integers(c, 7)), P=P, c=c, group=group)
    d = data.Z.shape[1] + 1
    V0 = rng.standard_normal((P, d, c)).astype(np.float32)
    anchor = rng.standard_normal((P, d, c)).astype(np.float32)
    cfg = BcdConfig(row_chunk=int(rng.integers(1, 40)), power_iters=2, relax=relax, rank=rank)
    s = bcd_init(data, V0, lam, cfg, anchor=anchor, mu=mu)
    g, work = np.empty((d, c), np.float32), np.empty((s.chunk, c), np.float32)
    f = _objective(data, s.V, lam, anchor, mu)
    assert math.isclose(bcd_objective(s), f, rel_tol=1e-4, abs_tol=1e-4)
    for _ in range(3):
        for i in range(P):
            block_grad(s, i, g, work)
            bcd_block_step_(s, i, g, work)
            f_new = _objective(data, s.V, lam, anchor, mu)
            assert f_new <= f + 1e-5 * max(1.0, abs(f))
            f = f_new
    # the maintained residual is the true one
    Z1 = np.concatenate([data.Z, np.ones((data.n, 1), np.float32)], axis=1)
    R = sum(data.masks[:, [i]] * (Z1 @ s.V[i]) for i in range(P)) - data.Y
    assert np.allclose(s.R, R, atol=1e-3 * max(1.0, float(np.abs(R).max())))


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    k=st.integers(1, 3),
    c=st.integers(1, 3),
    lam=st.floats(0.0, 2.0),
    group=st.sampled_from(["gate", "gate_output"]),
)
def test_metric_prox_solves_its_subproblem(seed, k, c, lam, group):
    """The prox in the block metric is the minimiser: no random perturbation does better."""
    rng = np.random.default_rng(seed)
    d = 6
    Vi = rng.standard_normal((d, c)).astype(np.float32)
    g = rng.standard_normal((d, c)).astype(np.float32)
    U = np.linalg.qr(rng.standard_normal((d, k)))[0].astype(np.float32)
    alpha = float(rng.uniform(0.1, 2.0))
    lams = alpha + rng.uniform(0.0, 20.0, k)
    Q = U @ np.diag(lams) @ U.T + alpha * (np.eye(d) - U @ U.T)

    def F(X):
        D = (X - Vi).astype(np.float64)
        pen = np.linalg.norm(X) if group == "gate" else np.linalg.norm(X, axis=0).sum()
        return float((g * D).sum() + 0.5 * (D * (Q @ D)).sum() + lam * pen)

    X = _metric_prox_step(Vi, g, U, lams, alpha, lam, group)
    fx = F(X)
    for j in range(20):
        t = 10.0 ** -(j % 4 + 1)
        assert F(X + t * rng.standard_normal(X.shape)) >= fx - 1e-6 * max(1.0, abs(fx))
    assert F(np.zeros_like(X)) >= fx - 1e-6 * max(1.0, abs(fx))


def test_cancel_deadline_and_max_iter_return_not_converged():
    data = _problem(4, n=500, d_in=10, P=6, c=3)
    V0 = np.zeros((6, 11, 3), np.float32)
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 3  # stop between blocks, in the first epoch

    out = bcd_solve(data, V0, 1e-3, BcdConfig(tol=1e-9), should_stop=stop)
    assert out.cancelled and not out.converged and out.iterations == 0 and len(calls) == 4
    assert np.isfinite(out.x).all() and out.x.any()  # a valid iterate: the blocks done so far
    past = bcd_solve(data, V0, 1e-3, BcdConfig(tol=1e-9), deadline=time.perf_counter() - 1)
    assert not past.converged and not past.cancelled and past.iterations == 0
    one = bcd_solve(data, V0, 1e-3, BcdConfig(tol=1e-9, max_iter=2))
    assert not one.converged and one.iterations == 2 and one.kkt > 1e-9
    seen = []
    bcd_solve(data, V0, 1e-3, BcdConfig(tol=1e-9, max_iter=3), on_iter=lambda *a: seen.append(a))
    assert [s[0] for s in seen] == [1, 2, 3]
    assert all(b[1] <= a[1] + 1e-9 for a, b in zip(seen, seen[1:], strict=False))  # objective per epoch


def test_warm_start_from_the_solution_stops_at_once():
    data = _problem(5)
    V0 = np.zeros((4, 7, 2), np.float32)
    out = bcd_solve(data, V0, 0.01, BcdConfig(tol=1e-6, max_iter=20000))
    again = bcd_solve(data, out.x, 0.01, BcdConfig(tol=1e-5))
    assert again.converged and again.iterations == 0


def test_working_set_of_an_mcu_sized_solve_is_below_128_kb():
    """d_in=128, P=8, c=10, n=1024 float32: V is 41 KB, the residual 40 KB; the solver stays < 128 KB."""
    rng = np.random.default_rng(0)
    n, d_in, P, c = 1024, 128, 8, 10
    Z = rng.standard_normal((n, d_in)).astype(np.float32)
    G = rng.standard_normal((d_in + 1, P)).astype(np.float32)
    G[:, 0] = 0
    Y = (Z[:, :c] + np.maximum(Z[:, c : 2 * c], 0)).astype(np.float32)
    data = RowData(Z, Y, (Z @ G[:-1] + G[-1]) >= 0)
    V0 = 0.01 * rng.standard_normal((P, d_in + 1, c)).astype(np.float32)
    cfg = BcdConfig(tol=1e-3, max_iter=200)
    bcd_solve(data, V0, 0.05, cfg, anchor_mu=1.0)  # warm imports and caches outside the measurement
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        out = bcd_solve(data, V0, 0.05, cfg, anchor_mu=1.0)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert out.iterations > 0
    assert peak < 128 * 1024, f"{peak / 1024:.1f} KB"
    # FISTA on the same problem needs several times more (its state is ~10 V-sized arrays)
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        solve(data, V0, 0.05, FistaConfig(tol=1e-3, max_iter=200), "gate", anchor_mu=1.0)
        fista_peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert fista_peak > 3 * peak


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_runtime_refits_with_bcd_like_with_fista(executor):
    buf = BufferConfig(capacity=512, val_capacity=128)
    x, y = _stream(700, 0)
    results = {}
    for solver in ("fista", "bcd"):
        cfg = RefitConfig(solver=solver, fista=FistaConfig(tol=1e-5), bcd=BcdConfig(tol=1e-5))
        with RefitRuntime(_head(), memory_budget_mb=8, buffer=buf, config=cfg, executor=executor) as rt:
            for s in range(0, 700, 64):
                rt.observe(x[s : s + 64], y[s : s + 64])
            res = rt.refit(time_budget_s=30)
            assert res.status == "accepted" and res.converged and res.solver == solver, res.reason
            results[solver] = (res.val_loss_after, rt.head.V)
    fa, fb = results["fista"][0], results["bcd"][0]
    assert abs(fa - fb) <= 1e-3 * fa


def test_auto_picks_momentum_for_a_small_workspace_and_fista_for_gram():
    buf = BufferConfig(capacity=512, val_capacity=128)
    small = RefitRuntime(
        _head(), memory_budget_mb=8, buffer=buf, config=RefitConfig(solver="auto", auto_workspace_kb=1)
    )
    assert small.refit_solver == "momentum"
    big = RefitRuntime(_head(), memory_budget_mb=8, buffer=buf, config=RefitConfig(solver="auto"))
    assert big.refit_solver == "fista"
    gram = RefitRuntime(
        _head(), memory_budget_mb=8, buffer=BufferConfig(mode="gram"),
        config=RefitConfig(solver="auto", auto_workspace_kb=1),
    )  # fmt: skip
    assert gram.refit_solver == "fista"
    # the lean solvers' workspace estimates are far below FISTA's
    for lean in ("momentum", "bcd"):
        rt = RefitRuntime(_head(), memory_budget_mb=8, buffer=buf, config=RefitConfig(solver=lean))
        assert rt.refit_solver == lean
        assert rt.memory_bytes()["refit_workspace"] < big.memory_bytes()["refit_workspace"] / 2
    assert small.memory_bytes()["refit_workspace"] < big.memory_bytes()["refit_workspace"] / 2
    with pytest.raises(ValueError, match="solver='bcd' needs the stream's rows"):
        RefitRuntime(
            _head(), memory_budget_mb=8, buffer=BufferConfig(mode="gram"), config=RefitConfig(solver="bcd")
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"row_chunk": 0}, "row_chunk must be"),
        ({"power_iters": 0}, "power_iters must be"),
        ({"rank": -1}, "rank must be"),
        ({"relax": 2.0}, "relax must lie"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BcdConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"solver": "newton"}, "solver must be"),
        ({"bcd": FistaConfig()}, "bcd must be a BcdConfig"),
        ({"auto_workspace_kb": 0}, "auto_workspace_kb must be"),
    ],
)
def test_refit_config_solver_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RefitConfig(**kwargs)


def test_init_validates_shapes_and_numbers():
    data = _problem()
    with pytest.raises(ValueError, match="V0 must have shape"):
        bcd_init(data, np.zeros((4, 5, 2), np.float32), 0.1, BcdConfig())
    with pytest.raises(ValueError, match="anchor must have shape"):
        bcd_init(data, None, 0.1, BcdConfig(), anchor=np.zeros((1, 7, 2), np.float32), mu=1.0)
    with pytest.raises(ValueError, match="lam must be"):
        bcd_init(data, None, -1.0, BcdConfig())
    with pytest.raises(ValueError, match="mu must be"):
        bcd_init(data, None, 0.1, BcdConfig(), mu=float("nan"))
    s = bcd_init(data, None, 0.1, BcdConfig())
    assert bcd_kkt(s) > 0
