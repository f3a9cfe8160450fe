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
