"""Small gated-ReLU problems and heads shared by the device solver tests (not a test module)."""

from __future__ import annotations

import numpy as np

from convexedge.device import ConvexHead, GateSpec
from convexedge.device.fista import FistaConfig, RowData, kkt_residual, make_operator

D_IN, P_H, C_H = 16, 4, 3


def gated_rows(seed=0, n=300, d_in=6, P=4, c=2, group="gate") -> RowData:
    """Random features, a linear path (gate 0) plus random gates, ReLU-ish targets with noise."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d_in)).astype(np.float32)
    G = rng.standard_normal((d_in + 1, P)).astype(np.float32)
    G[:, 0] = 0  # gate 0: the linear path
    Y = (np.maximum(Z[:, :c] * 2, 0) + 0.1 * rng.standard_normal((n, c))).astype(np.float32)
    return RowData(Z, Y, (Z @ G[:-1] + G[-1]) >= 0, group)


def objective(data: RowData, V, lam, anchor=None, mu=0.0) -> float:
    """F(V) in float64, straight from the definition (an oracle independent of every solver)."""
    Z1 = np.concatenate([data.Z, np.ones((data.n, 1), np.float32)], axis=1).astype(np.float64)
    pred = sum(data.masks[:, [i]] * (Z1 @ V[i].astype(np.float64)) for i in range(V.shape[0]))
    f = float(((pred - data.Y) ** 2).sum()) / (2 * data.n)
    axis = (1, 2) if data.group == "gate" else 1
    f += lam * float(np.sqrt((V.astype(np.float64) ** 2).sum(axis=axis)).sum())
    if anchor is not None:
        f += 0.5 * mu * float(((V - anchor).astype(np.float64) ** 2).sum())
    return f


def small_head() -> ConvexHead:
    return ConvexHead(
        V=np.zeros((P_H, D_IN + 1, C_H), np.float32), gate_spec=GateSpec(d=D_IN + 1, P=P_H), lam=1e-3
    )


def linear_stream(n, seed):
    """Features and targets a small head can fit (linear plus one ReLU)."""
    x = np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)
    W = np.random.default_rng(42).standard_normal((D_IN, C_H)).astype(np.float32)
    return x, (x @ W + 0.5 * np.maximum(x[:, :1], 0)).astype(np.float32)


def certified(data: RowData, out, lam, tol, group, V0=None, mu=0.0) -> bool:
    """Whether the device FISTA module's KKT residual, computed independently at a solver's answer
    ``out.x``, meets ``tol`` (1% slack for float32 rounding)."""
    op = make_operator(data, FistaConfig(), anchor=V0, mu=mu)
    grad = op.full_grad(out.x, op.image(out.x))
    return kkt_residual(op, out.x, lam, grad, group) <= 1.01 * tol
