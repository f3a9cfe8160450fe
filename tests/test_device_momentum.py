"""Proximal heavy ball (device/momentum.py): the FISTA optimum, an exact KKT certificate, its
safeguards, cancellation and deadline, the runtime, and a working set of two V-sized arrays."""

import math
import tracemalloc

import numpy as np
import pytest
from device_problems import certified as _certified
from device_problems import gated_rows as _problem
from device_problems import linear_stream as _stream
from device_problems import objective as _objective
from device_problems import small_head as _head
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device import BufferConfig, MomentumConfig, RefitConfig, RefitRuntime
from convexedge.device.fista import FistaConfig, RowData
from convexedge.device.momentum import lipschitz, momentum_solve
from convexedge.device.worker import solve


@pytest.mark.parametrize("group", ["gate", "gate_output"])
@pytest.mark.parametrize("mu", [0.0, 1.0])
def test_reaches_the_fista_objective_with_a_kkt_certificate(group, mu):
    data = _problem(1, group=group)
    V0 = 0.1 * np.random.default_rng(2).standard_normal((4, 7, 2)).astype(np.float32)
    lam, tol = 0.01, 1e-5
    a = solve(data, V0, lam, FistaConfig(tol=1e-6, max_iter=20000), group, anchor_mu=mu)
    b = momentum_solve(data, V0, lam, MomentumConfig(tol=tol, max_iter=20000), group, anchor_mu=mu)
    assert a.converged and b.converged and b.kkt <= tol
    assert _certified(data, b, lam, tol, group, V0, mu)
    fa, fb = _objective(data, a.x, lam, V0, mu), _objective(data, b.x, lam, V0, mu)
    assert fb <= fa + 1e-5 * abs(fa)
    assert b.x.shape == V0.shape and b.x.dtype == np.float32 and b.x.flags["C_CONTIGUOUS"]


def test_large_lam_gives_zero_and_warm_start_at_the_optimum_stops_at_once():
    data = _problem(3, n=400, d_in=8, P=5, c=3)
    V0 = np.zeros((5, 9, 3), np.float32)
    big = momentum_solve(data, V0, 1e3, MomentumConfig(tol=1e-5))
    assert big.converged and not big.x.any()
    sol = momentum_solve(data, V0, 0.02, MomentumConfig(tol=1e-6, max_iter=20000))
    again = momentum_solve(data, sol.x, 0.02, MomentumConfig(tol=1e-5))
    assert again.converged and again.iterations <= 2  # a check step certifies it


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    P=st.integers(1, 6),
    c=st.integers(1, 3),
    lam=st.floats(1e-4, 0.2),
    mu=st.sampled_from([0.0, 0.3, 3.0]),
    group=st.sampled_from(["gate", "gate_output"]),
    fast=st.booleans(),
)
def test_converges_on_random_problems_and_never_ends_above_the_start(seed, P, c, lam, mu, group, fast):
    """With Polyak's constants (fast) or only the iPiano-safe ones (max_restarts=0 after one
    restart), the solve ends certified and no worse than its warm start."""
    data = _problem(seed, n=120, d_in=4, P=P, c=c, group=group)
    V0 = 0.3 * np.random.default_rng(seed + 1).standard_normal((P, 5, c)).astype(np.float32)
    cfg = MomentumConfig(tol=1e-4, max_iter=50000, max_restarts=20 if fast else 0)
    out = momentum_solve(data, V0, lam, cfg, group, anchor_mu=mu)
    assert out.converged and out.kkt <= 1e-4
    assert _certified(data, out, lam, 1e-4, group, V0, mu)
    assert _objective(data, out.x, lam, V0, mu) <= _objective(data, V0, lam, V0, mu) * (1 + 1e-6) + 1e-9


def test_lipschitz_matches_the_largest_eigenvalue():
    data = _problem(4, n=200, d_in=5, P=3, c=2)
    Z1 = np.concatenate([data.Z, np.ones((data.n, 1), np.float32)], axis=1).astype(np.float64)
    A = np.concatenate([data.masks[:, [i]] * Z1 for i in range(3)], axis=1)
    exact = np.linalg.eigvalsh(A.T @ A / data.n)[-1]
    est = lipschitz(data, 100, chunk=7)
    assert est <= exact * (1 + 1e-4) and est >= 0.99 * exact


def test_cancel_deadline_and_max_iter_return_not_converged():
    data = _problem(5)
    V0 = np.zeros((4, 7, 2), np.float32)
    cancelled = momentum_solve(data, V0, 1e-4, MomentumConfig(tol=1e-12), should_stop=lambda: True)
    assert cancelled.cancelled and not cancelled.converged and cancelled.iterations == 0
    late = momentum_solve(data, V0, 1e-4, MomentumConfig(tol=1e-12), deadline=0.0)
    assert not late.converged and late.iterations == 0 and math.isfinite(late.kkt)
    capped = momentum_solve(data, V0, 1e-4, MomentumConfig(tol=1e-12, max_iter=3))
    assert capped.iterations == 3 and not capped.converged and capped.kkt > 1e-12
    seen = []
    momentum_solve(data, V0, 1e-3, MomentumConfig(tol=1e-4), on_iter=lambda i, f, k: seen.append(i))
    assert seen == list(range(1, len(seen) + 1)) and seen


def test_working_set_of_an_mcu_sized_solve_is_two_v_sized_arrays():
    """d_in=128, P=8, c=10, n=1024 float32 (V = 41 KB): x and the second array, one row chunk and
    a few small arrays; FISTA on the same problem needs several times more."""
    rng = np.random.default_rng(0)
    n, d_in, P, c = 1024, 128, 8, 10
    Z = rng.standard_normal((n, d_in)).astype(np.float32)
    G = rng.standard_normal((d_in + 1, P)).astype(np.float32)
    Y = (Z[:, :c] + np.maximum(Z[:, c : 2 * c], 0)).astype(np.float32)
    data = RowData(Z, Y, (Z @ G[:-1] + G[-1]) >= 0)
    V0 = 0.01 * rng.standard_normal((P, d_in + 1, c)).astype(np.float32)
    cfg = MomentumConfig(tol=1e-3, max_iter=200)
    momentum_solve(data, V0, 0.05, cfg, anchor_mu=1.0)  # warm imports and caches outside the measurement
    peaks = {}
    for name, run in (
        ("momentum", lambda: momentum_solve(data, V0, 0.05, cfg, anchor_mu=1.0)),
        ("fista", lambda: solve(data, V0, 0.05, FistaConfig(tol=1e-3, max_iter=200), "gate", anchor_mu=1.0)),
    ):
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out = run()
            peaks[name] = tracemalloc.get_traced_memory()[1] - base
        finally:
            tracemalloc.stop()
        assert out.iterations > 0
    v = V0.nbytes
    chunk = cfg.row_chunk * P * c * 4
    assert peaks["momentum"] < 2 * v + chunk + 24 * 1024, f"{peaks['momentum'] / 1024:.1f} KB"
    assert peaks["fista"] > 3 * peaks["momentum"]


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_runtime_refits_with_momentum_like_with_fista(executor):
    buf = BufferConfig(capacity=512, val_capacity=128)
    x, y = _stream(700, 0)
    results = {}
    for solver in ("fista", "momentum"):
        cfg = RefitConfig(solver=solver, fista=FistaConfig(tol=1e-5), momentum=MomentumConfig(tol=1e-5))
        with RefitRuntime(_head(), memory_budget_mb=8, buffer=buf, config=cfg, executor=executor) as rt:
            for s in range(0, 700, 64):
                rt.observe(x[s : s + 64], y[s : s + 64])
            res = rt.refit(time_budget_s=30)
            assert res.status == "accepted" and res.converged and res.solver == solver, res.reason
            results[solver] = res.val_loss_after
    assert abs(results["fista"] - results["momentum"]) <= 1e-3 * results["fista"]


def test_momentum_needs_rows():
    with pytest.raises(ValueError, match="solver='momentum' needs the stream's rows"):
        RefitRuntime(
            _head(),
            memory_budget_mb=8,
            buffer=BufferConfig(mode="gram"),
            config=RefitConfig(solver="momentum"),
        )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tol": -1}, "tol must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"row_chunk": 0}, "row_chunk must be"),
        ({"power_iters": 0}, "power_iters must be"),
        ({"max_restarts": -1}, "max_restarts must be"),
        ({"safety": 0.5}, "safety must lie"),
        ({"check_factor": 0}, "check_factor must be"),
        ({"max_condition": 1}, "max_condition must be"),
    ],
)
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MomentumConfig(**kwargs)


def test_solve_validates_its_inputs():
    data = _problem()
    with pytest.raises(ValueError, match="V0 must have shape"):
        momentum_solve(data, np.zeros((4, 5, 2), np.float32), 0.1, MomentumConfig())
    with pytest.raises(ValueError, match="lam must be"):
        momentum_solve(data, np.zeros((4, 7, 2), np.float32), -1.0, MomentumConfig())
    with pytest.raises(ValueError, match="anchor_mu must be"):
        momentum_solve(data, np.zeros((4, 7, 2), np.float32), 0.1, MomentumConfig(), anchor_mu=math.nan)
    with pytest.raises(ValueError, match="momentum must be a MomentumConfig"):
        RefitConfig(momentum=FistaConfig())


def test_single_gate_does_not_write_into_the_warm_start():
    """With P = 1 the (d, P, c) view of V0 is contiguous: the solver must still copy it (V0 is the
    caller's array and the anchor)."""
    data = _problem(0, n=120, d_in=4, P=1, c=2)
    V0 = 0.3 * np.random.default_rng(1).standard_normal((1, 5, 2)).astype(np.float32)
    keep = V0.copy()
    out = momentum_solve(data, V0, 1e-3, MomentumConfig(tol=1e-5, max_iter=20000), anchor_mu=0.3)
    assert np.array_equal(V0, keep)
    assert out.converged and _certified(data, out, 1e-3, 1e-5, "gate", keep, 0.3)
