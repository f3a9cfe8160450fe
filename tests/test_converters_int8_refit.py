"""The int8 refit of a student (converters.int8_refit) through ``convexedge export --format tflite-int8``."""

import hashlib
import json
import warnings

import numpy as np
import pytest
import torch

from convexedge.converters.export import ExportOptions
from convexedge.converters.int8_refit import (
    Int8RefitConfig,
    _masks_nchw,
    refit_student_for_int8,
    span_outputs,
)
from convexedge.device.errors import ArtifactError, ConvergenceWarning
from convexedge.host.distill import build_conv_problem, make_gates, save_student
from convexedge.host.solvers import FistaConfig, solve
from convexedge.host.students import ConvGeometry, GatedConvStudent
from convexedge.models import TEACHER_WEIGHTS, load_teacher


def test_options_and_inputs_are_checked():
    with pytest.raises(ValueError, match="int8_ranges"):
        ExportOptions(model="teacher", format="tflite-int8", int8_ranges="percentile")
    with pytest.raises(ValueError, match="int8_refit_images"):
        ExportOptions(model="teacher", format="tflite-int8", int8_refit_images=0)
    with pytest.raises(ValueError, match="max_iter"):
        Int8RefitConfig(max_iter=0)
    with pytest.raises(TypeError, match="GatedConvStudent"):
        refit_student_for_int8(
            torch.nn.Identity(), "x.tflite", np.zeros((1, 3, 32, 32)), np.zeros((1, 64, 8, 8)), 0.1
        )
    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    student = GatedConvStudent(np.ones((2, geom.d, 64)), np.ones((geom.d, 2)), geom)
    with pytest.raises(ValueError, match="must match in N"):
        refit_student_for_int8(student, "x.tflite", np.zeros((2, 3, 32, 32)), np.zeros((1, 64, 8, 8)), 0.1)
    with pytest.raises(ValueError, match="lam"):
        refit_student_for_int8(student, "x.tflite", np.zeros((1, 3, 32, 32)), np.zeros((1, 64, 8, 8)), -1.0)


def test_mask_layout_is_found_even_when_axes_have_equal_sizes():
    rng = np.random.default_rng(0)
    ref = rng.random((5, 4, 4, 4)) < 0.5  # (N, P, H, W) with P == H == W: shapes cannot tell the layout
    nhwc = ref.transpose(0, 2, 3, 1).copy()
    nhwc[0, 0, 0, 0] = ~nhwc[0, 0, 0, 0]  # one flipped gate, as an int8 file has
    got, agree = _masks_nchw(nhwc, ref)
    assert got.shape == ref.shape and agree == pytest.approx(1 - 1 / ref.size)
    assert (got == ref).sum() == ref.size - 1
    with pytest.raises(ArtifactError, match="matches no layout"):
        _masks_nchw(np.zeros((5, 3, 3), bool), ref)


def test_span_outputs_reads_the_block():
    teacher = load_teacher().eval()
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    out = span_outputs(teacher, "layer3", x, batch_size=2)
    assert out.shape == (3, 64, 8, 8) and (out >= 0).all()  # post-ReLU block output
    with pytest.raises(ValueError, match="no module"):
        span_outputs(teacher, "layer9", x)


# ----------------------------------------------------------------------------- the full path (slow)
@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    """A small student really fitted (label-free) to the teacher's layer3 on 96 training images."""
    from convexedge.host.data import load_images, normalize_images
    from convexedge.models import BUNDLED_DATA_DIR, teacher_normalization

    mean, std = teacher_normalization()
    x = normalize_images(load_images(BUNDLED_DATA_DIR, "train", labels=False, limit=96).x, mean, std)
    teacher = load_teacher().eval()
    grabbed = []
    handle = teacher.layer3.register_forward_hook(lambda _m, i, o: grabbed.append((i[0].numpy(), o.numpy())))
    with torch.no_grad():
        teacher(torch.from_numpy(x))
    handle.remove()
    z_in, z_out = grabbed[0]
    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    spec, G = make_gates(geom.d, 3, seed=0)
    problem = build_conv_problem(z_in, z_out, geom, G)
    lam = 0.01 * problem.lam_max()
    with warnings.catch_warnings():  # a rough fit is enough here; the refit starts from it
        warnings.simplefilter("ignore", ConvergenceWarning)
        V = solve(problem, lam, FistaConfig(max_iter=100, tol=1e-4)).V.numpy()
    folder = tmp_path_factory.mktemp("student")
    meta = {"kind": "gated_conv", "span": "layer3", "geometry": geom.to_dict(), "gates": spec.to_dict(),
            "output_relu": True, "lam": lam, "teacher": {"weights": TEACHER_WEIGHTS.name}}  # fmt: skip
    save_student(str(folder), "student", V, G, meta)
    return folder


@pytest.fixture(scope="module")
def exported(student_folder, tmp_path_factory):
    pytest.importorskip("litert_torch", reason="the [tflite] extra (litert-torch) is not installed")
    pytest.importorskip("ai_edge_quantizer", reason="the [tflite] extra (ai-edge-quantizer) is not installed")
    from convexedge.converters.export import run_export

    before = hashlib.sha256((student_folder / "student.npz").read_bytes()).hexdigest()
    out = tmp_path_factory.mktemp("export")
    report = run_export(ExportOptions(model=str(student_folder), format="tflite-int8", out=str(out),
                                      test_images=96, calib_images=32, int8_refit=True,
                                      int8_refit_images=96))  # fmt: skip
    after = hashlib.sha256((student_folder / "student.npz").read_bytes()).hexdigest()
    return report, out, before == after


@pytest.mark.slow
def test_int8_refit_runs_and_does_not_hurt(exported):
    report, out, student_unchanged = exported
    fp32, q8 = report["rows"]
    assert student_unchanged  # the fitted student is not modified
    assert fp32["format"] == "tflite" and fp32["max_abs_diff"] <= 1e-4  # fp32 export: the fitted student
    refit = q8["int8_refit"]
    assert refit["applied"] and refit["images"] == 96
    # same upstream int8 layers and calibration -> same student input and same masks in the new file
    assert refit["upstream_unchanged"] and refit["masks_unchanged"]
    assert refit["objective_after"] < refit["objective_before"]  # what FISTA minimises, from V0 = fp32 V
    before = refit["before_refit"]
    print(f"int8 agreement with fp32: {before['top1_agreement']:.3f} -> {q8['top1_agreement']:.3f}")
    assert q8["top1_agreement"] >= before["top1_agreement"] - 2 / 96
    assert q8["gate_agreement"] >= 0.9 and q8["all_ops_in_tflm"]
    assert q8["teacher_top1"] is not None and 0 <= q8["top1_agreement_with_teacher"] <= 1
    saved = json.loads((out / "parity.json").read_text())
    assert saved["rows"][1]["int8_refit"]["applied"] and saved["options"]["int8_refit"]
    assert (out / "model_int8.tflite").is_file() and (out / "model_int8_before_refit.tflite").is_file()


def test_int8_refit_refuses_a_neuron_form_student_before_exporting(tmp_path):
    from convexedge.converters.export import run_export
    from convexedge.host.distill import save_lowrank_student
    from convexedge.host.lowrank import neurons_of
    from convexedge.host.students import LowRankGatedConvStudent

    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    _, G = make_gates(geom.d, 2, seed=0)
    A, W, g = neurons_of(torch.randn(2, geom.d, 64) * 0.01)
    meta = {"span": "layer3", "teacher": {"architecture": "resnet20", "weights": TEACHER_WEIGHTS.name}}
    save_lowrank_student(str(tmp_path), "student", LowRankGatedConvStudent(A, W, G, g, geom), meta)
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match="full convex student"):
        run_export(ExportOptions(model=str(tmp_path), format="tflite-int8", out=str(out), int8_refit=True,
                                 test_images=8, calib_images=8))  # fmt: skip
    assert not any(out.glob("*.tflite"))
