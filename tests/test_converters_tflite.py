"""TFLite fp32 export: parity with torch in the LiteRT interpreter, mask ops, bad files."""

import numpy as np
import pytest

pytest.importorskip("litert_torch", reason="the [tflite] extra (litert-torch) is not installed")
pytest.importorskip("ai_edge_litert", reason="the [tflite] extra (ai-edge-litert) is not installed")

import torch  # noqa: E402

from convexedge.converters.tflite import export_tflite, run_tflite, tflite_ops  # noqa: E402
from convexedge.device.errors import ArtifactError  # noqa: E402
from convexedge.host.distill import make_gates  # noqa: E402
from convexedge.host.students import ConvGeometry, GatedConvStudent  # noqa: E402
from convexedge.host.swap import swapped  # noqa: E402
from convexedge.models import load_teacher  # noqa: E402


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    _, G = make_gates(geom.d, 3, seed=0)
    V = np.random.default_rng(0).standard_normal((3, geom.d, 64)).astype(np.float32) * 0.05
    model = swapped(load_teacher(), "layer3", GatedConvStudent(V, G, geom, output_relu=True)).eval()
    path = export_tflite(model, tmp_path_factory.mktemp("tfl") / "m.tflite")
    return model, path


def test_tflite_matches_torch(compressed):
    model, path = compressed
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = run_tflite(path, x)
    assert np.abs(out - ref).max() <= 1e-4
    assert (out.argmax(1) == ref.argmax(1)).all()


def test_masks_are_builtin_compares(compressed):
    ops = tflite_ops(compressed[1])
    assert "GREATER_EQUAL" in ops and "CONV_2D" in ops and "DELEGATE" not in ops


def test_bad_tflite_file(tmp_path, compressed):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(compressed[1].read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="not a valid TFLite model"):
        run_tflite(bad, np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ArtifactError, match="not found"):
        tflite_ops(tmp_path / "missing.tflite")


@pytest.fixture(scope="module")
def int8_file(compressed, tmp_path_factory):
    pytest.importorskip("ai_edge_quantizer", reason="the [tflite] extra (ai-edge-quantizer) is not installed")
    from convexedge.converters.tflite import quantize_tflite_int8
    from convexedge.host.data import load_images, normalize_images
    from convexedge.models import BUNDLED_DATA_DIR, teacher_normalization

    mean, std = teacher_normalization()
    calib = normalize_images(load_images(BUNDLED_DATA_DIR, "train", limit=32).x, mean, std)
    test = load_images(BUNDLED_DATA_DIR, "test", limit=64)
    path = quantize_tflite_int8(compressed[1], tmp_path_factory.mktemp("tfl8") / "m8.tflite", calib)
    return path, normalize_images(test.x, mean, std)


def test_int8_is_full_integer_in_tflm_and_keeps_the_masks(compressed, int8_file):
    from ai_edge_litert.interpreter import Interpreter

    from convexedge.converters.export import gate_agreement, torch_gate_masks
    from convexedge.converters.tflite import ops_outside_tflm, tflite_float_ops, tflite_gate_masks

    model, _ = compressed
    path, x = int8_file
    it = Interpreter(model_path=str(path))
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    ops = tflite_ops(path)
    assert "GREATER_EQUAL" in ops and "CONV_2D" in ops and not ops_outside_tflm(ops)
    # everything is int8 except the mask island the quantizer leaves in float (documented in tflite.py)
    island = {op.split("(")[0] for op in tflite_float_ops(path)}
    assert island <= {"DEQUANTIZE", "GREATER_EQUAL", "CAST", "QUANTIZE"}, island
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    out = run_tflite(path, x)
    agree = (out.argmax(1) == ref.argmax(1)).mean()
    gates = gate_agreement(torch_gate_masks(model, x), tflite_gate_masks(path, x))
    print(f"int8 vs torch on 64 images: top-1 agreement {agree:.3f}, gate agreement {gates:.4f}")
    assert agree >= 0.8 and gates >= 0.9
    fp32_gates = gate_agreement(torch_gate_masks(model, x), tflite_gate_masks(compressed[1], x))
    assert fp32_gates >= 0.9999


def test_ops_outside_tflm_and_bad_inputs(compressed, tmp_path):
    from convexedge.converters.tflite import ops_outside_tflm, quantize_tflite_int8

    assert ops_outside_tflm(["CONV_2D", "FLEX_FOO", "CUSTOM:x"]) == ["CUSTOM:x", "FLEX_FOO"]
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(ArtifactError, match="not a valid TFLite model"):
        tflite_ops(junk)
    bad = tmp_path / "trunc.tflite"
    bad.write_bytes(compressed[1].read_bytes()[:1000])
    with pytest.raises(ArtifactError, match="not a valid TFLite model"):
        tflite_ops(bad)
    with pytest.raises(ValueError, match="calibration must be"):
        quantize_tflite_int8(compressed[1], tmp_path / "x.tflite", np.zeros((0, 3, 32, 32), np.float32))


def test_lowrank_student_converts_with_parity(tmp_path):
    from convexedge.host.lowrank import neurons_of
    from convexedge.host.students import LowRankGatedConvStudent

    geom = ConvGeometry(in_channels=32, kernel_size=3, stride=2, padding=1)
    _, G = make_gates(geom.d, 3, seed=0)
    V = torch.from_numpy(np.random.default_rng(0).standard_normal((3, geom.d, 64)).astype(np.float32) * 0.05)
    A, W, gate_of = neurons_of(V)
    keep = slice(0, 40)  # a truncated network: 40 of 192 neurons
    student = LowRankGatedConvStudent(A[:, keep], W[keep], G, gate_of[keep], geom, output_relu=True)
    model = swapped(load_teacher(), "layer3", student).eval()
    path = export_tflite(model, tmp_path / "lr.tflite")
    x = np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    assert np.abs(run_tflite(path, x) - ref).max() <= 1e-4
    assert "GREATER_EQUAL" in tflite_ops(path)
