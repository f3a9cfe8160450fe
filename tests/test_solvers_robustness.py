"""Robustness tests for what pyscnn gets wrong (issue 4): gates under feature normalisation, float32
stalls, the zero solution at lam >= lam_max, and the reported objective being the true one."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from convexedge.host.solvers import AdamConfig, FistaConfig, GatedProblem, kkt_residual, solve
from convexedge.host.solvers.scnn_adapter import scnn_available

METHODS = ["fista", "adam"] + (["pyscnn"] if scnn_available() else [])


def data(n=200, d=6, c=2, P=5, seed=0, scale=None):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d)) * (scale if scale is not None else 1.0)
    G = rng.standard_normal((d, P))
    Y = np.maximum(Z @ rng.standard_normal((d, 3)), 0) @ rng.standard_normal((3, c))
    return Z, Y, G


def test_normalised_features_keep_the_gates():
    # Column-normalising Z must carry the gates along (g' = S g), so the masks and hence the model
    # class are unchanged; pyscnn's unitize_data=True rescales X but keeps G, changing the masks.
    Z, Y, G = data(scale=np.array([100.0, 0.01, 1.0, 5.0, 0.2, 30.0]))
    s = np.linalg.norm(Z, axis=0)
    Zn, Gn = Z / s, G * s[:, None]
    assert np.array_equal(Z @ G >= 0, Zn @ Gn >= 0)
    assert not np.array_equal(Z @ G >= 0, Zn @ G >= 0)  # what pyscnn's normalisation does
    p = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, dtype="float64")
    pn = GatedProblem.from_arrays(Zn, Y, Zn @ Gn >= 0, dtype="float64")
    assert torch.equal(p.masks, pn.masks)
    b = solve(pn, 0.05 * pn.lam_max(), FistaConfig(tol=1e-8, max_iter=50_000))
    assert b.converged
    # a normalised solution maps back exactly to the original features: V_i = S^-1 V'_i
    back = b.V / torch.as_tensor(s)[None, :, None]
    torch.testing.assert_close(p.forward(back), pn.forward(b.V))


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_float32_does_not_stall_above_tol(group):
    Z, Y, G = data(n=2000, d=20, c=4, P=16, seed=1, scale=np.linspace(0.3, 3, 20))
    p32 = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype="float32")
    p64 = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype="float64")
    lam = 0.01 * p64.lam_max()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stall would be a ConvergenceWarning
        res = solve(p32, lam, FistaConfig(tol=1e-5, max_iter=50_000))
    assert res.converged and res.kkt_residual <= 1e-5
    # the certificate holds in float64 too, not just in float32 arithmetic
    assert kkt_residual(p64, res.V.double(), lam) <= 3e-5
    ref = solve(p64, lam, FistaConfig(tol=1e-10, max_iter=50_000))
    assert (res.objective - ref.objective) / ref.objective <= 1e-5


def test_float32_block_metric_does_not_stall_on_real_activations():
    # Real ResNet-20 activations (60 bundled images, layer3's 3x3 patches, d = 289) give badly
    # conditioned gate blocks. The block-metric step used to rebuild z = Q z_rot, adding a float32
    # error of about eps ||y|| to every step, and the KKT residual sat at about 1.8e-6 for 1,000
    # iterations; taking the step as y + Q (z_rot - y_rot) reaches 1e-6 in about 160.
    from benchmarks.solvers import patches

    Z, Y, M = patches(60, 8)
    p32 = GatedProblem.from_arrays(Z, Y, M, group="gate_output", dtype="float32")
    lam = 0.01 * p32.lam_max()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a stall would be a ConvergenceWarning
        res = solve(p32, lam, FistaConfig(metric="block", tol=1e-6, max_iter=600))
    assert res.converged and res.kkt_residual <= 1e-6
    p64 = GatedProblem.from_arrays(Z, Y, M, group="gate_output", dtype="float64")
    assert kkt_residual(p64, res.V.double(), lam) <= 3e-6


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("group", ["gate", "gate_output"])
@pytest.mark.parametrize("factor", [1.0, 3.0])
def test_zero_solution_at_or_above_lam_max(method, group, factor):
    if method == "pyscnn" and group == "gate":
        pytest.skip("pyscnn solves only the one-vs-all form")
    Z, Y, G = data()
    for dtype in ("float32", "float64"):
        p = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype=dtype)
        res = solve(p, factor * p.lam_max(), method=method)
        assert tuple(res.V.shape) == (p.P, p.d, p.c) and res.V.dtype == p.Z.dtype
        assert not res.V.any() and res.converged and res.kkt_residual == 0.0
        assert res.objective == pytest.approx(float((p.Y.double() ** 2).sum()) / (2 * p.n), rel=1e-12)
    # just below lam_max the solution is not zero
    p = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype="float64")
    assert solve(p, 0.99 * p.lam_max(), FistaConfig(tol=1e-10, max_iter=50_000)).V.any()


@pytest.mark.parametrize("method", METHODS)
def test_reported_objective_is_the_true_one(method):
    Z, Y, G = data(n=500, seed=2)
    p = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group="gate_output", dtype="float32")
    lam = 0.05 * p.lam_max()
    config = {"fista": FistaConfig(tol=1e-5), "adam": AdamConfig(tol=1e-4)}.get(method)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve(p, lam, config, method=method)
    V = res.V.double()
    pred = sum(p.masks[:, [i]].double() * (p.Z.double() @ V[i]) for i in range(p.P))
    true = float(((pred - p.Y.double()) ** 2).sum() / (2 * p.n) + lam * V.norm(dim=1).sum())
    assert res.objective == pytest.approx(true, rel=1e-12)
