"""Tests of convexedge.host.distill: geometry inference, the conv problem's shapes and errors, the
lam path (KKT certificate at every point, objective no worse than zero, warm starts), selection
by held-out loss, and the saved student artifact (no pickle, SHA-256 in the JSON)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch

from convexedge.device.errors import DataError
from convexedge.host import distill
from convexedge.host.distill import (
    PathPoint,
    build_conv_problem,
    fit_path,
    infer_geometry,
    make_gates,
    save_student,
    select_by_validation,
)
from convexedge.host.gates import GateSpec, sample_gates
from convexedge.host.solvers import FistaConfig, SolveResult
from convexedge.host.students import ConvGeometry, GatedConvStudent, patch_matrix, rows_to_image

TOL = 1e-8
RATIOS = [0.5, 0.2, 0.05]


# ------------------------------------------------------------------------------ geometry
def test_infer_geometry_layer3():
    geom = infer_geometry((32, 16, 16), (64, 8, 8))
    assert geom == ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)


@pytest.mark.parametrize(
    "in_shape,out_shape,k,expect",
    [
        ((16, 32, 32), (16, 32, 32), 3, (1, 1)),
        ((4, 6, 6), (8, 6, 6), 5, (1, 2)),
        ((4, 10, 10), (8, 5, 5), 3, (2, 1)),
        ((4, 8, 8), (8, 8, 8), 1, (1, 0)),
    ],
)
def test_infer_geometry_maps_shapes(in_shape, out_shape, k, expect):
    geom = infer_geometry(in_shape, out_shape, kernel_size=k)
    assert (geom.stride, geom.padding) == expect and geom.in_channels == in_shape[0]
    assert geom.out_hw(*in_shape[1:]) == tuple(out_shape[1:])


def test_infer_geometry_odd_input_size():
    geom = infer_geometry((4, 9, 9), (8, 5, 5))
    assert (geom.stride, geom.padding) == (2, 1)


@pytest.mark.parametrize(
    "in_shape,out_shape,k",
    [
        ((32, 16, 16), (64, 5, 5), 3),
        ((32, 16, 16), (64, 16, 16), 2),
        ((32, 8, 8), (64, 16, 16), 3),
    ],
)
def test_infer_geometry_impossible(in_shape, out_shape, k):
    with pytest.raises(DataError, match=f"no {k}x{k} conv maps"):
        infer_geometry(in_shape, out_shape, kernel_size=k)


def test_infer_geometry_needs_chw():
    with pytest.raises(DataError, match=r"conv students need \(C, H, W\) activations"):
        infer_geometry((32, 16), (64, 8, 8))


# ------------------------------------------------------------------------------ problem
def _synthetic(B=6, C=4, H=6, c=3, P=4, seed=0, noise=0.05):
    """Targets from a planted gated student plus noise, (B, C, H, H) -> (B, c, H, H)."""
    rng = np.random.default_rng(seed)
    geom = ConvGeometry(in_channels=C, kernel_size=3, stride=1, padding=1)
    spec, G = make_gates(geom.d, P, seed=seed)
    z_in = rng.standard_normal((B, C, H, H))
    V = rng.standard_normal((P, geom.d, c)) / np.sqrt(geom.d)
    V[P - 1] = 0  # one gate is not used by the planted student
    Z = patch_matrix(torch.from_numpy(z_in), geom).numpy()
    Y = sum(((Z @ G[:, i]) >= 0)[:, None] * (Z @ V[i]) for i in range(P))
    z_out = rows_to_image(torch.from_numpy(Y), B, H, H).numpy()
    z_out = z_out + noise * rng.standard_normal(z_out.shape)
    return geom, spec, G, z_in, z_out


def test_make_gates():
    spec, G = make_gates(10, 3, seed=4, linear_gate=False)
    assert spec == GateSpec(kind="gaussian", d=10, P=3, seed=4, linear_gate=False)
    np.testing.assert_array_equal(G, sample_gates(spec))


def test_build_conv_problem_shapes():
    B, C, H, c, P = 5, 3, 8, 2, 4
    geom = ConvGeometry(in_channels=C, kernel_size=3, stride=2, padding=1)
    _, G = make_gates(geom.d, P, seed=0)
    rng = np.random.default_rng(0)
    z_in = rng.standard_normal((B, C, H, H)).astype(np.float32)
    z_out = rng.standard_normal((B, c, 4, 4)).astype(np.float32)
    prob = build_conv_problem(z_in, z_out, geom, G)
    assert (prob.n, prob.d, prob.c, prob.P) == (B * 4 * 4, C * 9 + 1, c, P)
    assert prob.Z.dtype == torch.float32
    np.testing.assert_array_equal(prob.Z.numpy(), patch_matrix(torch.from_numpy(z_in), geom))
    # row (b, h, w) of Y is the channel vector z_out[b, :, h, w]
    np.testing.assert_array_equal(prob.Y.numpy()[1 * 16 + 2 * 4 + 3], z_out[1, :, 2, 3])
    np.testing.assert_array_equal(prob.masks.numpy(), prob.Z.numpy() @ G >= 0)
    assert bool(prob.masks[:, 0].all())  # the linear gate
    prob64 = build_conv_problem(z_in, z_out, geom, G, dtype="float64")
    assert prob64.Z.dtype == torch.float64 and prob64.Y.dtype == torch.float64


def test_build_conv_problem_mismatch():
    geom = ConvGeometry(in_channels=2, kernel_size=3, stride=1, padding=1)
    _, G = make_gates(geom.d, 3, seed=0)
    with pytest.raises(DataError, match="4 captured inputs but 3 outputs"):
        build_conv_problem(np.zeros((4, 2, 6, 6)), np.zeros((3, 1, 6, 6)), geom, G)
    with pytest.raises(DataError, match=r"maps \(6, 6\) to \(6, 6\), but the outputs are \(3, 3\)"):
        build_conv_problem(np.zeros((4, 2, 6, 6)), np.zeros((4, 1, 3, 3)), geom, G)


# ------------------------------------------------------------------------------ path
@pytest.fixture(scope="module")
def synthetic_path():
    geom, spec, G, z_in, z_out = _synthetic()
    prob = build_conv_problem(z_in[:4], z_out[:4], geom, G, dtype="float64")
    val = build_conv_problem(z_in[4:], z_out[4:], geom, G, dtype="float64")
    calls = []
    points = fit_path(
        prob,
        RATIOS,
        FistaConfig(tol=TOL, max_iter=5000),
        val_problem=val,
        on_iteration=lambda it, f, kkt: calls.append((it, f, kkt)),
    )
    return geom, G, z_in, prob, val, points, calls


def test_fit_path_certificates(synthetic_path):
    _, _, _, prob, _, points, calls = synthetic_path
    assert [p.lam_ratio for p in points] == RATIOS
    lam_max = prob.lam_max()
    V0 = torch.zeros(prob.P, prob.d, prob.c, dtype=torch.float64)
    for p in points:
        res = p.result
        assert isinstance(res, SolveResult)
        assert res.lam == pytest.approx(p.lam_ratio * lam_max, rel=1e-12)
        assert res.converged and res.kkt_residual <= TOL
        assert res.objective <= prob.objective(V0, res.lam) + 1e-12
        assert res.objective == pytest.approx(prob.objective(res.V, res.lam), rel=1e-12)
        assert res.V.shape == (prob.P, prob.d, prob.c) and res.V.dtype == torch.float64
        assert p.active_gates == int((res.V.flatten(1).abs().amax(1) > 0).sum())
        assert 1 <= p.active_gates <= prob.P
        assert math.isfinite(res.iterations) and 0 < res.iterations <= 5000
    assert calls and all(kkt >= 0 for _, _, kkt in calls)


def test_fit_path_val_loss_is_held_out_smooth_loss(synthetic_path):
    _, _, _, _, val, points, _ = synthetic_path
    for p in points:
        assert p.val_loss == pytest.approx(val.smooth(p.result.V)[0], rel=1e-12)
        assert p.val_loss >= 0


def test_fit_path_warm_starts(monkeypatch):
    geom, _, G, z_in, z_out = _synthetic(B=3, seed=1)
    prob = build_conv_problem(z_in, z_out, geom, G, dtype="float64")
    seen = []
    real_solve = distill.solve

    def spy(problem, lam, config, V0=None, progress=None):
        seen.append(None if V0 is None else V0.clone())
        return real_solve(problem, lam, config, V0=V0, progress=progress)

    monkeypatch.setattr(distill, "solve", spy)
    points = fit_path(prob, RATIOS, FistaConfig(tol=TOL, max_iter=5000))
    assert seen[0] is None
    for prev, v0 in zip(points[:-1], seen[1:], strict=True):
        torch.testing.assert_close(v0, prev.result.V, rtol=0, atol=0)
    assert all(math.isnan(p.val_loss) for p in points)  # no val_problem


def test_fit_path_above_lam_max_gives_zero():
    geom, _, G, z_in, z_out = _synthetic(B=2, seed=2)
    prob = build_conv_problem(z_in, z_out, geom, G, dtype="float64")
    (point,) = fit_path(prob, [1.5], FistaConfig(tol=TOL))
    assert point.active_gates == 0 and point.result.iterations == 0
    assert not bool(point.result.V.any())


def test_selected_student_reproduces_problem_prediction(synthetic_path):
    geom, G, z_in, prob, _, points, _ = synthetic_path
    V = select_by_validation(points).result.V
    student = GatedConvStudent(V.numpy(), G, geom)
    with torch.no_grad():
        out = student(torch.from_numpy(z_in[:4]).float()).double()
    want = rows_to_image(prob.forward(V), 4, 6, 6)
    Gr = torch.from_numpy(G[:, 1:]).double()  # gate 0 is the zero (always-on) gate: exact in both
    decided = rows_to_image((prob.Z @ Gr).abs().gt(1e-4).all(1)[:, None], 4, 6, 6).expand_as(want)
    assert decided.float().mean() > 0.9
    np.testing.assert_allclose(out[decided].numpy(), want[decided].numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("ratios", [[], [0.1, 0.5], [0.5, 0.0], [0.5, -0.1], [0.3, 0.2, 0.25]])
def test_fit_path_bad_ratios(ratios):
    geom, _, G, z_in, z_out = _synthetic(B=1, seed=3)
    prob = build_conv_problem(z_in, z_out, geom, G, dtype="float64")
    with pytest.raises(ValueError, match="lam_ratios must be positive and decreasing"):
        fit_path(prob, ratios, FistaConfig())


# ------------------------------------------------------------------------------ selection
def _point(ratio, val, active, res=None):
    return PathPoint(lam_ratio=ratio, result=res, active_gates=active, val_loss=val)


def test_select_by_validation_min_val_loss():
    pts = [_point(0.5, 3.0, 1), _point(0.2, 1.0, 2), _point(0.1, 2.0, 4)]
    assert select_by_validation(pts) is pts[1]


def test_select_by_validation_tie_prefers_fewer_gates_and_skips_nan():
    pts = [_point(0.5, float("nan"), 1), _point(0.2, 1.0, 3), _point(0.1, 1.0, 2)]
    assert select_by_validation(pts) is pts[2]


def test_select_by_validation_all_nan_gives_last():
    pts = [_point(0.5, float("nan"), 1), _point(0.2, float("nan"), 3)]
    assert select_by_validation(pts) is pts[-1]


def test_select_by_validation_on_real_path(synthetic_path):
    points = synthetic_path[5]
    best = select_by_validation(points)
    assert best.val_loss == min(p.val_loss for p in points)


def test_select_by_validation_empty():
    with pytest.raises(ValueError, match="no path points to select from"):
        select_by_validation([])


# ------------------------------------------------------------------------------ artifact
def test_save_student(tmp_path):
    rng = np.random.default_rng(0)
    V, G = rng.standard_normal((3, 10, 2)), rng.standard_normal((10, 3))  # float64 in
    npz_path, json_path = save_student(
        str(tmp_path / "out"), "student", V, G, {"module": "layer3", "lam": 0.1}
    )
    assert npz_path.endswith("student.npz") and json_path.endswith("student.json")
    with np.load(npz_path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    assert set(arrays) == {"V", "G"}
    np.testing.assert_array_equal(arrays["V"], V.astype(np.float32))
    np.testing.assert_array_equal(arrays["G"], G.astype(np.float32))
    manifest = json.loads(open(json_path).read())
    assert manifest["format"] == "convexedge.student" and manifest["format_version"] == 1
    assert manifest["module"] == "layer3" and manifest["lam"] == 0.1
    for key, arr in arrays.items():
        entry = manifest["arrays"][key]
        assert arr.dtype == np.float32 and entry["dtype"] == "float32"
        assert entry["shape"] == list(arr.shape)
        assert entry["sha256"] == hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
    assert not list((tmp_path / "out").glob("*.tmp"))


# ---- load_student / load_compressed_model: the artifact save_student writes, read back checked ----


def _saved(tmp_path, teacher_weights="resnet20_cifar10.npz"):
    from convexedge.host.distill import make_gates, save_student
    from convexedge.host.students import ConvGeometry

    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    spec, G = make_gates(geom.d, 2, seed=0)
    V = np.random.default_rng(0).standard_normal((2, geom.d, 64)).astype(np.float32)
    save_student(
        str(tmp_path),
        "student",
        V,
        G,
        {
            "span": "layer3",
            "geometry": geom.to_dict(),
            "gates": spec.to_dict(),
            "output_relu": True,
            "teacher": {"weights": teacher_weights},
        },
    )
    return V, G


def test_load_student_round_trip(tmp_path):
    from convexedge.host.distill import load_student

    V, G = _saved(tmp_path)
    student, manifest = load_student(str(tmp_path))
    assert torch.allclose(student.solution(), torch.from_numpy(V))
    assert manifest["span"] == "layer3" and student.output_relu


def test_load_student_refuses_tampered_and_missing(tmp_path):
    import json

    from convexedge.device.errors import ArtifactError
    from convexedge.host.distill import load_compressed_model, load_student

    with pytest.raises(ArtifactError, match="not found"):
        load_student(str(tmp_path))
    V, G = _saved(tmp_path)
    np.savez(tmp_path / "student.npz", V=V + 1, G=G)
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_student(str(tmp_path))
    (tmp_path / "student.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ArtifactError, match="truncated"):
        load_student(str(tmp_path))
    manifest = json.loads((tmp_path / "student.json").read_text())
    (tmp_path / "student.json").write_text(json.dumps({**manifest, "format_version": 9}))
    with pytest.raises(ArtifactError, match="version 1"):
        load_student(str(tmp_path))
    other = tmp_path / "other"
    _saved(other, teacher_weights="someone_else.npz")
    with pytest.raises(ArtifactError, match="only the bundled"):
        load_compressed_model(str(other))
