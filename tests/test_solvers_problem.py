"""Tests of convexedge.host.solvers.problem: operator oracle, adjointness, chunking, lam_max,
validation, and prox properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from convexedge.device.errors import DataError
from convexedge.host.solvers import FistaConfig, GatedProblem, group_norms, prox_group, solve

GROUPS = ("gate", "gate_output")


def make_data(n=150, d=7, c=3, P=5, seed=0):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    G = rng.standard_normal((d, P))
    Y = rng.standard_normal((n, c))
    return Z, Y, Z @ G >= 0


def make_problem(group="gate", dtype="float64", row_chunk=16384, **kw):
    Z, Y, M = make_data(**kw)
    return GatedProblem.from_arrays(Z, Y, M, group=group, dtype=dtype, row_chunk=row_chunk)


# ------------------------------------------------------------------------------ operator
@pytest.mark.parametrize("group", GROUPS)
def test_forward_adjoint_match_per_gate_loop(group):
    prob = make_problem(group)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(prob.P, prob.d, prob.c, generator=gen, dtype=torch.float64)
    R = torch.randn(prob.n, prob.c, generator=gen, dtype=torch.float64)
    Dm = prob.masks.to(torch.float64)
    pred = sum(Dm[:, i, None] * (prob.Z @ V[i]) for i in range(prob.P))
    adj = torch.stack([(Dm[:, i, None] * prob.Z).T @ R for i in range(prob.P)])
    torch.testing.assert_close(prob.forward(V), pred, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(prob.adjoint(R), adj, rtol=1e-12, atol=1e-12)
    # gates with V_i == 0 are skipped in forward; the result must not change
    V[[1, 3]] = 0
    pred = sum(Dm[:, i, None] * (prob.Z @ V[i]) for i in range(prob.P))
    torch.testing.assert_close(prob.forward(V), pred, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(prob.forward(torch.zeros_like(V))) == 0


def test_adjoint_is_the_true_adjoint():
    prob = make_problem(row_chunk=37)
    gen = torch.Generator().manual_seed(2)
    V = torch.randn(prob.P, prob.d, prob.c, generator=gen, dtype=torch.float64)
    R = torch.randn(prob.n, prob.c, generator=gen, dtype=torch.float64)
    lhs = torch.sum(prob.forward(V) * R)
    rhs = torch.sum(V * prob.adjoint(R))
    assert abs(float(lhs - rhs)) <= 1e-10 * max(1.0, abs(float(lhs)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_chunked_equals_unchunked(dtype):
    Z, Y, M = make_data(n=301)
    whole = GatedProblem.from_arrays(Z, Y, M, dtype=dtype, row_chunk=10_000)
    chunked = GatedProblem.from_arrays(Z, Y, M, dtype=dtype, row_chunk=16)
    V = torch.randn(whole.P, whole.d, whole.c, generator=torch.Generator().manual_seed(3))
    V = V.to(whole.Z.dtype)
    tol = 1e-5 if dtype == "float32" else 1e-12
    tol = {"rtol": tol, "atol": tol}
    torch.testing.assert_close(chunked.forward(V), whole.forward(V), **tol)
    torch.testing.assert_close(chunked.adjoint(whole.Y), whole.adjoint(whole.Y), **tol)
    assert chunked.lam_max() == pytest.approx(whole.lam_max(), rel=1e-5)


def test_sizes_smooth_penalty_objective():
    prob = make_problem(group="gate_output", n=40, d=3, c=2, P=4)
    assert (prob.n, prob.d, prob.c, prob.P) == (40, 3, 2, 4)
    V = torch.randn(4, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    value, pred = prob.smooth(V)
    assert pred.shape == (40, 2)
    assert value == pytest.approx(0.5 * float(((pred - prob.Y) ** 2).sum()) / 40, rel=1e-12)
    pen = float(prob.penalty(V))
    assert pen == pytest.approx(float(V.norm(dim=1).sum()), rel=1e-12)
    assert prob.objective(V, 0.3) == pytest.approx(value + 0.3 * pen, rel=1e-12)


@pytest.mark.parametrize("group", GROUPS)
def test_lam_max_is_exact(group):
    prob = make_problem(group)
    lm = prob.lam_max()
    # lam_max is the largest group norm of the gradient at zero.
    g0 = prob.adjoint(prob.Y) / prob.n
    assert lm == pytest.approx(float(group_norms(g0, group).max()), rel=1e-12)
    above = solve(prob, lm * 1.0001)
    assert above.converged and above.iterations == 0
    assert torch.count_nonzero(above.V) == 0 and above.V.shape == (prob.P, prob.d, prob.c)
    below = solve(prob, 0.99 * lm, FistaConfig(tol=1e-8))
    assert below.converged and torch.count_nonzero(below.V) > 0
    assert below.objective < above.objective


def test_float32_problem_keeps_dtype_and_memmap_input(tmp_path):
    Z, Y, M = make_data()
    mm = np.lib.format.open_memmap(tmp_path / "z.npy", mode="w+", dtype=np.float64, shape=Z.shape)
    mm[:] = Z
    mm.flush()
    ro = np.load(tmp_path / "z.npy", mmap_mode="r")
    prob = GatedProblem.from_arrays(ro, torch.from_numpy(Y), M)
    assert prob.Z.dtype == prob.Y.dtype == torch.float32 and prob.masks.dtype == torch.bool
    np.testing.assert_allclose(prob.Z.numpy(), Z.astype(np.float32))


# ------------------------------------------------------------------------------ validation
def test_from_arrays_rejects_nan():
    Z, Y, M = make_data()
    Z[3, 2] = np.nan
    with pytest.raises(DataError, match=r"Z must hold finite values, got 1 NaN/Inf"):
        GatedProblem.from_arrays(Z, Y, M)
    Z, Y, M = make_data()
    Y[0, 0] = np.inf
    with pytest.raises(DataError, match=r"Y must hold finite values"):
        GatedProblem.from_arrays(Z, Y, M)


def test_from_arrays_rejects_overflow_to_float32():
    Z, Y, M = make_data()
    Z[0, 0] = 1e300
    with pytest.raises(DataError, match=r"overflow float32"):
        GatedProblem.from_arrays(Z, Y, M, dtype="float32")


def test_from_arrays_rejects_mismatched_n():
    Z, Y, M = make_data()
    with pytest.raises(DataError, match=r"same number of rows n"):
        GatedProblem.from_arrays(Z, Y[:-1], M)


def test_from_arrays_rejects_non_bool_masks():
    Z, Y, M = make_data()
    with pytest.raises(DataError, match=r"masks must be bool .*astype\(bool\)"):
        GatedProblem.from_arrays(Z, Y, M.astype(np.int64))


def test_from_arrays_rejects_1d():
    Z, Y, M = make_data()
    with pytest.raises(DataError, match=r"Y must be 2-D .* Y.reshape\(-1, 1\); got shape \(150,\)"):
        GatedProblem.from_arrays(Z, Y[:, 0], M)


def test_from_arrays_rejects_empty():
    Z, Y, M = make_data()
    with pytest.raises(DataError, match=r"masks must be non-empty"):
        GatedProblem.from_arrays(Z, Y, M[:, :0])


def test_bad_settings_raise_value_error():
    Z, Y, M = make_data()
    with pytest.raises(ValueError, match=r"group must be one of"):
        GatedProblem.from_arrays(Z, Y, M, group="neuron")
    with pytest.raises(ValueError, match=r"dtype must be one of"):
        GatedProblem.from_arrays(Z, Y, M, dtype="float16")
    with pytest.raises(ValueError, match=r"row_chunk must be a positive int"):
        GatedProblem.from_arrays(Z, Y, M, row_chunk=0)


def test_constructor_checks_shapes_and_dtypes():
    Z, Y, M = (torch.from_numpy(a) for a in make_data())
    with pytest.raises(DataError, match=r"masks must be bool"):
        GatedProblem(Z, Y, M.to(torch.int8))
    with pytest.raises(DataError, match=r"share a float32/float64 dtype"):
        GatedProblem(Z, Y.float(), M)
    with pytest.raises(DataError, match=r"must be 2-D"):
        GatedProblem(Z, Y[:, 0], M)
    with pytest.raises(DataError, match=r"same number of rows"):
        GatedProblem(Z, Y[1:], M)


# ------------------------------------------------------------------------------ prox
def _variables(max_side=4):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side), st.integers(1, max_side))
    return hnp.arrays(np.float64, shapes, elements=st.floats(-10, 10, allow_subnormal=False))


def _prox_value(U, V, thresh, group):
    return 0.5 * float(((U - V) ** 2).sum()) + thresh * float(group_norms(U, group).sum())


@settings(max_examples=60, deadline=None)
@given(
    V=_variables(),
    thresh=st.floats(0, 5),
    group=st.sampled_from(GROUPS),
    seed=st.integers(0, 2**16),
)
def test_prox_is_the_argmin(V, thresh, group, seed):
    V = torch.from_numpy(V)
    U = prox_group(V, thresh, group)
    best = _prox_value(U, V, thresh, group)
    gen = torch.Generator().manual_seed(seed)
    for scale in (1e-3, 1e-1, 1.0):
        W = U + scale * torch.randn(U.shape, generator=gen, dtype=torch.float64)
        assert best <= _prox_value(W, V, thresh, group) + 1e-9 * (1.0 + abs(best))


@settings(max_examples=60, deadline=None)
@given(
    V=_variables(),
    thresh=st.floats(0, 5),
    group=st.sampled_from(GROUPS),
    seed=st.integers(0, 2**16),
)
def test_prox_is_nonexpansive(V, thresh, group, seed):
    V1 = torch.from_numpy(V)
    V2 = V1 + torch.randn(V1.shape, generator=torch.Generator().manual_seed(seed), dtype=V1.dtype)
    d_out = torch.linalg.vector_norm(prox_group(V1, thresh, group) - prox_group(V2, thresh, group))
    assert float(d_out) <= float(torch.linalg.vector_norm(V1 - V2)) * (1 + 1e-12) + 1e-12


@settings(max_examples=60, deadline=None)
@given(V=_variables(), extra=st.floats(0, 3), group=st.sampled_from(GROUPS))
def test_prox_zeroes_groups_below_threshold(V, extra, group):
    V = torch.from_numpy(V)
    norms = group_norms(V, group)
    thresh = float(norms.flatten()[0]) + extra  # at least the first group's norm
    U = prox_group(V, thresh, group)
    zero = group_norms(U, group) == 0
    assert bool(zero[norms <= thresh].all())
    # an all-zero group stays exactly zero at any threshold, including 0
    V0 = torch.zeros_like(V)
    assert torch.count_nonzero(prox_group(V0, 0.0, group)) == 0
    assert torch.count_nonzero(prox_group(V0, thresh, group)) == 0
    assert not torch.isnan(prox_group(V0, thresh, group)).any()
