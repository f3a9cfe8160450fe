"""Tests of convexedge.host.students: the conv and MLP students against the matrix form the solver
optimises (oracle, several geometries, hypothesis), drop_inactive, solution(), sizes, the
patch/row helpers, and shape errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.host.students import (
    ConvGeometry,
    GatedConvStudent,
    GatedMLPStudent,
    image_to_rows,
    patch_matrix,
    rows_to_image,
)

GEOMETRIES = [(1, 1, 0), (3, 1, 1), (3, 2, 1), (5, 2, 2)]


def _case(B, C, H, W, c, P, k, s, p, seed, zero_gates=()):
    rng = np.random.default_rng(seed)
    geom = ConvGeometry(in_channels=C, kernel_size=k, stride=s, padding=p)
    z = torch.from_numpy(rng.standard_normal((B, C, H, W)).astype(np.float32))
    G = rng.standard_normal((geom.d, P)).astype(np.float32)
    V = (rng.standard_normal((P, geom.d, c)) / np.sqrt(geom.d)).astype(np.float32)
    for i in zero_gates:
        V[i] = 0
    return geom, z, G, V


def _matrix_form(z, geom, G, V):
    """``sum_i mask_i * (patch_matrix(z) @ V_i)`` in float64 as an image, and a row mask that is
    False where some gate projection is too close to 0 for float32 to decide the mask."""
    Z = patch_matrix(z.double(), geom)
    proj = Z @ torch.from_numpy(G).double()
    masks = (proj >= 0).double()
    Vt = torch.from_numpy(V).double()
    rows = sum(masks[:, i, None] * (Z @ Vt[i]) for i in range(V.shape[0]))
    h, w = geom.out_hw(z.shape[2], z.shape[3])
    decided = (proj.abs() > 1e-4).all(1)
    return rows_to_image(rows, z.shape[0], h, w), rows_to_image(decided[:, None], z.shape[0], h, w)


def _assert_close(got, want, decided, tol=1e-5):
    assert got.shape == want.shape
    assert decided.float().mean() > 0.9
    d = decided.expand_as(want)
    np.testing.assert_allclose(got.double()[d].numpy(), want[d].numpy(), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------ conv oracle
@pytest.mark.parametrize("k,s,p", GEOMETRIES)
@pytest.mark.parametrize("seed", [0, 1])
def test_conv_student_equals_matrix_form(k, s, p, seed):
    geom, z, G, V = _case(B=2, C=3, H=9, W=7, c=4, P=5, k=k, s=s, p=p, seed=seed)
    student = GatedConvStudent(V, G, geom, drop_inactive=False)
    with torch.no_grad():
        out = student(z)
    want, decided = _matrix_form(z, geom, G, V)
    assert out.shape == (2, 4, *geom.out_hw(9, 7)) and out.dtype == torch.float32
    _assert_close(out, want, decided)


@pytest.mark.parametrize("k,s,p", GEOMETRIES)
def test_conv_student_output_relu(k, s, p):
    geom, z, G, V = _case(B=2, C=2, H=8, W=8, c=3, P=4, k=k, s=s, p=p, seed=3)
    with torch.no_grad():
        out = GatedConvStudent(V, G, geom, output_relu=True)(z)
    want, decided = _matrix_form(z, geom, G, V)
    assert float(out.min()) >= 0
    _assert_close(out, want.clamp_min(0), decided)


@settings(max_examples=25, deadline=None)
@given(
    geo=st.sampled_from(GEOMETRIES),
    B=st.integers(1, 3),
    C=st.integers(1, 4),
    H=st.integers(5, 10),
    W=st.integers(5, 10),
    c=st.integers(1, 4),
    P=st.integers(1, 6),
    seed=st.integers(0, 2**31),
)
def test_conv_student_equals_matrix_form_property(geo, B, C, H, W, c, P, seed):
    k, s, p = geo
    geom, z, G, V = _case(B=B, C=C, H=H, W=W, c=c, P=P, k=k, s=s, p=p, seed=seed)
    with torch.no_grad():
        out = GatedConvStudent(V, G, geom, drop_inactive=False)(z)
    _assert_close(out, *_matrix_form(z, geom, G, V))


# ------------------------------------------------------------------------------ active set
def test_drop_inactive_keeps_outputs():
    geom, z, G, V = _case(B=2, C=3, H=8, W=8, c=2, P=6, k=3, s=1, p=1, seed=4, zero_gates=(1, 4))
    full = GatedConvStudent(V, G, geom, drop_inactive=False)
    kept = GatedConvStudent(V, G, geom)  # drop_inactive=True is the default
    assert full.num_gates == 6 and kept.num_gates == 4
    with torch.no_grad():
        torch.testing.assert_close(kept(z), full(z), rtol=1e-6, atol=1e-6)
    active = [0, 2, 3, 5]
    torch.testing.assert_close(kept.solution(), torch.from_numpy(V[active]), rtol=0, atol=0)
    torch.testing.assert_close(kept.gate_bias, torch.from_numpy(G[-1, active]), rtol=0, atol=0)


def test_solution_inverts_constructor():
    geom, _, G, V = _case(B=1, C=3, H=6, W=6, c=5, P=3, k=5, s=2, p=2, seed=5)
    sol = GatedConvStudent(V, G, geom, drop_inactive=False).solution()
    assert sol.shape == (3, geom.d, 5)
    torch.testing.assert_close(sol, torch.from_numpy(V), rtol=0, atol=0)


def test_all_zero_student_keeps_one_gate_and_outputs_zero():
    geom, z, G, V = _case(B=2, C=2, H=5, W=5, c=3, P=4, k=3, s=1, p=1, seed=6, zero_gates=(0, 1, 2, 3))
    student = GatedConvStudent(V, G, geom)
    assert student.num_gates == 1
    with torch.no_grad():
        out = student(z)
    assert out.shape == (2, 3, 5, 5) and not bool(out.any())


# ------------------------------------------------------------------------------ sizes
def test_num_parameters_and_macs():
    C, k, c, P = 3, 3, 4, 5
    geom, _, G, V = _case(B=1, C=C, H=8, W=8, c=c, P=P, k=k, s=2, p=1, seed=7)
    student = GatedConvStudent(V, G, geom, drop_inactive=False)
    d = C * k * k + 1
    assert student.num_parameters(count_gates=False) == P * d * c
    assert student.num_parameters() == P * d * c + P * d
    assert student.num_parameters(count_gates=False) == sum(p.numel() for p in student.parameters())
    # per output position: P gate projections plus P*c output dot products, C*k*k MACs each
    assert student.macs((8, 8)) == 4 * 4 * (C * k * k) * P * (c + 1)
    assert student.macs((9, 7)) == 5 * 4 * (C * k * k) * P * (c + 1)


# ------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "V_shape,G_shape",
    [
        ((4, 28, 2), (27, 4)),  # V has the wrong patch dimension
        ((4, 28, 2), (28, 3)),  # G has the wrong number of gates
        ((4, 28), (28, 4)),  # V is not 3-D
        ((4, 28, 2), (28, 4, 1)),  # G is not 2-D
    ],
)
def test_conv_student_shape_mismatch(V_shape, G_shape):
    geom = ConvGeometry(in_channels=3)
    with pytest.raises(ValueError, match=r"expected V \(P, 28, c\) and G \(28, P\)"):
        GatedConvStudent(np.zeros(V_shape), np.zeros(G_shape), geom)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"in_channels": 0},
        {"in_channels": 3, "kernel_size": 0},
        {"in_channels": 3, "stride": 0},
        {"in_channels": 3, "padding": -1},
    ],
)
def test_conv_geometry_validation(kwargs):
    with pytest.raises(ValueError, match="invalid conv geometry"):
        ConvGeometry(**kwargs)


def test_conv_geometry_d_and_out_hw():
    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    assert geom.d == 32 * 9 + 1
    assert geom.out_hw(16, 16) == (8, 8)
    assert ConvGeometry(in_channels=1, kernel_size=5, stride=1, padding=0).out_hw(7, 9) == (3, 5)
    assert geom.to_dict() == {"in_channels": 32, "kernel_size": 3, "stride": 2, "padding": 1}


# ------------------------------------------------------------------------------ MLP student
@pytest.mark.parametrize("drop", [True, False])
def test_mlp_student_equals_matrix_form(drop):
    rng = np.random.default_rng(8)
    n, d, c, P = 40, 6, 3, 5
    x = rng.standard_normal((n, d)).astype(np.float32)
    G = rng.standard_normal((d + 1, P)).astype(np.float32)
    V = rng.standard_normal((P, d + 1, c)).astype(np.float32)
    V[2] = 0
    student = GatedMLPStudent(V, G, drop_inactive=drop)
    assert student.V.shape[0] == (4 if drop else 5)
    with torch.no_grad():
        out = student(torch.from_numpy(x))
    Z = np.concatenate([x, np.ones((n, 1), np.float32)], 1).astype(np.float64)
    proj = Z @ G
    want = sum((proj[:, i] >= 0)[:, None] * (Z @ V[i].astype(np.float64)) for i in range(P))
    decided = (np.abs(proj) > 1e-4).all(1)
    assert out.shape == (n, c)
    np.testing.assert_allclose(out.numpy()[decided], want[decided], rtol=1e-5, atol=1e-5)
    P_kept = student.V.shape[0]
    assert student.num_parameters(count_gates=False) == P_kept * (d + 1) * c
    assert student.num_parameters() == P_kept * (d + 1) * (c + 1)


def test_mlp_student_shape_mismatch():
    with pytest.raises(ValueError, match=r"expected V \(P, d\+1, c\) and G \(d\+1, P\)"):
        GatedMLPStudent(np.zeros((3, 5, 2)), np.zeros((4, 3)))
    with pytest.raises(ValueError, match=r"expected V \(P, d\+1, c\)"):
        GatedMLPStudent(np.zeros((5, 2)), np.zeros((5, 3)))


# ------------------------------------------------------------------------------ helpers
@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), c=st.integers(1, 5), H=st.integers(1, 6), W=st.integers(1, 6))
def test_rows_image_round_trip(B, c, H, W):
    y = torch.randn(B, c, H, W)
    rows = image_to_rows(y)
    assert rows.shape == (B * H * W, c)
    torch.testing.assert_close(rows_to_image(rows, B, H, W), y, rtol=0, atol=0)
    # row (b, h, w) holds the channel vector y[b, :, h, w]
    torch.testing.assert_close(rows[(B - 1) * H * W + (H - 1) * W + (W - 1)], y[B - 1, :, H - 1, W - 1])


def test_patch_matrix_layout():
    z = torch.randn(2, 3, 4, 5)
    Z1 = patch_matrix(z, ConvGeometry(in_channels=3, kernel_size=1, stride=1, padding=0))
    assert Z1.shape == (2 * 4 * 5, 4)
    torch.testing.assert_close(Z1[:, :-1], image_to_rows(z), rtol=0, atol=0)
    assert bool((Z1[:, -1] == 1).all())
    geom = ConvGeometry(in_channels=3, kernel_size=3, stride=2, padding=1)
    Z3 = patch_matrix(z, geom)
    assert Z3.shape == (2 * 2 * 3, geom.d)
    # row for (b=1, h'=1, w'=2) is the channel-major 3x3 patch centred at (2, 4), zero padded
    zp = torch.nn.functional.pad(z, (1, 1, 1, 1))
    patch = zp[1, :, 2:5, 4:7].reshape(-1)
    torch.testing.assert_close(Z3[1 * 6 + 1 * 3 + 2, :-1], patch, rtol=0, atol=0)
