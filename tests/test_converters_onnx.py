"""ONNX export: parity with torch in onnxruntime, simple mask ops, dynamic batch, bad files."""

import json

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the [export] extra is not installed")
pytest.importorskip("onnxruntime", reason="the [export] extra is not installed")

import torch  # noqa: E402

from convexedge.converters import compare_outputs, export_onnx, onnx_ops, run_onnx  # noqa: E402
from convexedge.converters.export import ExportOptions, gate_agreement, run_export  # noqa: E402
from convexedge.device.errors import ArtifactError  # noqa: E402
from convexedge.host.distill import make_gates, save_student  # noqa: E402
from convexedge.host.students import ConvGeometry, GatedConvStudent  # noqa: E402
from convexedge.host.swap import swapped  # noqa: E402


@pytest.fixture(scope="module")
def student_folder(tmp_path_factory):
    """A saved student for layer3 (random V, 3 gates) as `convexedge demo` would write it."""
    folder = tmp_path_factory.mktemp("student")
    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    spec, G = make_gates(geom.d, 3, seed=0)
    V = np.random.default_rng(0).standard_normal((3, geom.d, 64)).astype(np.float32) * 0.05
    save_student(
        str(folder),
        "student",
        V,
        G,
        {
            "kind": "gated_conv",
            "span": "layer3",
            "geometry": geom.to_dict(),
            "gates": spec.to_dict(),
            "active_gate_indices": [0, 1, 2],
            "output_relu": True,
            "teacher": {"weights": "resnet20_cifar10.npz", "architecture": "resnet20"},
        },
    )
    return folder


@pytest.fixture(scope="module")
def exported(student_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    report = run_export(ExportOptions(model=str(student_folder), out=str(out), test_images=200))
    return out, report


def test_export_matches_torch_on_real_images(exported):
    out, report = exported
    (row,) = report["rows"]
    assert row["format"] == "onnx" and row["max_abs_diff"] <= 1e-4
    assert row["top1_agreement"] >= 0.999
    assert row["gate_agreement"] == 1.0  # the GreaterOrEqual masks equal torch's, entry for entry
    assert row["samples"] == 200 and row["bytes"] == (out / "model.onnx").stat().st_size
    assert json.loads((out / "parity.json").read_text())["rows"] == report["rows"]


def test_mask_is_a_compare_and_no_transposes(exported):
    out, _ = exported
    ops = onnx_ops(out / "model.onnx")
    assert "GreaterOrEqual" in ops and "Conv" in ops
    assert "Transpose" not in ops


def test_dynamic_batch(exported, student_folder):
    from convexedge.host.distill import load_compressed_model

    out, _ = exported
    model = load_compressed_model(str(student_folder))
    for batch in (1, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 32, 32)).astype(np.float32)
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(run_onnx(out / "model.onnx", x), ref, atol=1e-4)


def test_small_student_alone_exports_exactly(tmp_path):
    geom = ConvGeometry(in_channels=4, kernel_size=3, stride=1, padding=1)
    _, G = make_gates(geom.d, 4, seed=3)
    V = np.random.default_rng(1).standard_normal((4, geom.d, 5)).astype(np.float32)
    student = GatedConvStudent(V, G, geom)
    path = export_onnx(student, tmp_path / "s.onnx", input_shape=(4, 6, 6))
    x = np.random.default_rng(2).standard_normal((3, 4, 6, 6)).astype(np.float32)
    with torch.no_grad():
        ref = student(torch.from_numpy(x)).numpy()
    res = compare_outputs(ref.reshape(3, -1), run_onnx(path, x).reshape(3, -1))
    assert res.max_abs_diff <= 1e-4


def test_lowrank_student_exports_exactly_and_reloads(tmp_path):
    from convexedge.host.distill import load_compressed_model, save_lowrank_student
    from convexedge.host.lowrank import neurons_of
    from convexedge.host.students import LowRankGatedConvStudent
    from convexedge.models import load_teacher

    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    _, G = make_gates(geom.d, 3, seed=0)
    V = torch.from_numpy(np.random.default_rng(0).standard_normal((3, geom.d, 64)).astype(np.float32) * 0.05)
    A, W, gate_of = neurons_of(V)
    student = LowRankGatedConvStudent(A[:, :50], W[:50], G, gate_of[:50], geom, output_relu=True)
    save_lowrank_student(
        str(tmp_path), "student", student, {"span": "layer3", "teacher": _teacher_identity()}
    )
    model = load_compressed_model(str(tmp_path))
    path = export_onnx(model, tmp_path / "m.onnx")
    x = np.random.default_rng(2).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = swapped(load_teacher(), "layer3", student).eval()(torch.from_numpy(x)).numpy()
    assert compare_outputs(ref, run_onnx(path, x)).max_abs_diff <= 1e-4
    ops = onnx_ops(path)
    assert "GreaterOrEqual" in ops and "Transpose" not in ops


def test_student_chain_exports_exactly(tmp_path):
    from convexedge.host.students import StudentChain

    g1 = ConvGeometry(in_channels=4, kernel_size=3, stride=2, padding=1)
    g2 = ConvGeometry(in_channels=5, kernel_size=3, stride=1, padding=1)
    rng = np.random.default_rng(3)
    (_, G1), (_, G2) = make_gates(g1.d, 3, seed=1), make_gates(g2.d, 2, seed=2)
    chain = StudentChain(
        GatedConvStudent(rng.standard_normal((3, g1.d, 5)).astype(np.float32), G1, g1, output_relu=True),
        GatedConvStudent(rng.standard_normal((2, g2.d, 6)).astype(np.float32), G2, g2),
    )
    path = export_onnx(chain, tmp_path / "chain.onnx", input_shape=(4, 8, 8))
    x = rng.standard_normal((3, 4, 8, 8)).astype(np.float32)
    with torch.no_grad():
        ref = chain(torch.from_numpy(x)).numpy()
    assert compare_outputs(ref.reshape(3, -1), run_onnx(path, x).reshape(3, -1)).max_abs_diff <= 1e-4


def _teacher_identity() -> dict:
    from convexedge.models import TEACHER_WEIGHTS

    return {"architecture": "resnet20", "weights": TEACHER_WEIGHTS.name}


def test_truncated_file_is_a_clear_error(exported, tmp_path):
    out, _ = exported
    data = (out / "model.onnx").read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError, match="not a valid ONNX model"):
        run_onnx(bad, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ArtifactError, match="not found"):
        onnx_ops(tmp_path / "missing.onnx")


def test_compare_outputs_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        compare_outputs(np.zeros((2, 3)), np.zeros((2, 4)))


def test_export_options_reject_unknown_format():
    with pytest.raises(ValueError, match="format must be"):
        ExportOptions(model="teacher", format="coreml")
    with pytest.raises(ValueError, match="calib_images must be"):
        ExportOptions(model="teacher", calib_images=0)


def test_gate_agreement_layouts_and_errors():
    rng = np.random.default_rng(0)
    ref = rng.random((4, 3, 5, 6)) > 0.5
    nhwc = ref.transpose(0, 2, 3, 1).copy()
    assert gate_agreement([ref], [nhwc]) == 1.0
    nhwc[0, 0, 0, 0] ^= True
    assert gate_agreement([ref], [nhwc]) == 1 - 1 / ref.size
    assert gate_agreement([], []) is None
    with pytest.raises(ArtifactError, match="mask ops"):
        gate_agreement([ref], [])
    with pytest.raises(ArtifactError, match="matches no layout"):
        gate_agreement([ref], [ref[:, :2]])


@pytest.mark.parametrize("damage", ["truncated", "missing", "file", "not_a_folder_model"])
def test_cli_bad_model_is_one_line_error(student_folder, tmp_path, capsys, damage):
    import shutil

    from convexedge.host.cli import main

    bad = tmp_path / "bad"
    if damage == "truncated":
        shutil.copytree(student_folder, bad)
        data = (bad / "student.npz").read_bytes()
        (bad / "student.npz").write_bytes(data[: len(data) // 2])
    elif damage == "file":
        bad.write_bytes(b"\x00" * 64)
    elif damage == "not_a_folder_model":
        bad.mkdir()
    rc = main(["export", str(bad), "--format", "onnx", "--out", str(tmp_path / "out"), "--test-images", "5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("convexedge: error:") and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "out" / "parity.json").exists()


def test_swapped_reference_is_the_saved_student(student_folder):
    from convexedge.host.distill import load_compressed_model, load_student
    from convexedge.models import load_teacher

    student, manifest = load_student(str(student_folder))
    model = load_compressed_model(str(student_folder))
    again = swapped(load_teacher(), manifest["span"], student).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))
