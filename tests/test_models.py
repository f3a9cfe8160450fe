"""Tests of convexedge.models: the bundled teacher's accuracy (oracle: the labelled test slice), the
checked loader's refusals (tampered, wrong version, missing, truncated), and the architecture size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from convexedge.device.errors import ArtifactError
from convexedge.host.data import load_images
from convexedge.host.evaluate import predict_logits, top1
from convexedge.models import (
    BUNDLED_DATA_DIR,
    TEACHER_MANIFEST,
    TEACHER_WEIGHTS,
    CifarResNet,
    load_teacher,
    resnet20,
    teacher_normalization,
)


def _arrays() -> dict[str, np.ndarray]:
    with np.load(TEACHER_WEIGHTS, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _manifest() -> dict:
    return json.loads(TEACHER_MANIFEST.read_text())


# ------------------------------------------------------------------------------ the teacher
def test_teacher_top1_on_bundled_test_slice(teacher, transform):
    test = load_images(BUNDLED_DATA_DIR, "test")
    assert len(test) == 1000
    logits = predict_logits(teacher, test.x, transform)
    assert logits.shape == (1000, 10)
    assert top1(logits, test.y) >= 0.905  # measured 0.915


def test_teacher_is_eval_mode_cifar_resnet(teacher):
    assert isinstance(teacher, CifarResNet)
    assert not teacher.training
    assert all(not m.training for m in teacher.modules())


def test_teacher_loads_every_manifest_array_exactly(teacher):
    state = teacher.state_dict()
    for key, arr in _arrays().items():
        np.testing.assert_array_equal(state[key].numpy(), arr)


def test_teacher_normalization_matches_manifest():
    mean, std = teacher_normalization()
    m = _manifest()["input"]
    assert mean == m["mean"] and std == m["std"]
    assert len(mean) == len(std) == 3 and all(s > 0 for s in std)


def test_resnet20_parameter_count():
    # BN running statistics are buffers, not parameters, so they are not counted here.
    model = resnet20()
    assert sum(p.numel() for p in model.parameters()) == 269_722


def test_resnet20_shapes():
    model = resnet20(num_classes=7).eval()
    with torch.no_grad():
        x = torch.zeros(2, 3, 32, 32)
        assert model(x).shape == (2, 7)
        z = model.layer2(model.layer1(model.relu(model.bn1(model.conv1(x)))))
        assert z.shape == (2, 32, 16, 16)
        assert model.layer3(z).shape == (2, 64, 8, 8)


# ------------------------------------------------------------------------------ refusals
def test_tampered_array_raises_sha256(tmp_path):
    arrays = _arrays()
    w = arrays["conv1.weight"].copy()
    w.flat[0] += np.float32(1e-3)  # same shape and dtype, different bytes
    arrays["conv1.weight"] = w
    path = tmp_path / "tampered.npz"
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="SHA-256 of array 'conv1.weight'"):
        load_teacher(path)


def test_untampered_copy_loads(tmp_path):
    path = tmp_path / "copy.npz"
    np.savez(path, **_arrays())
    assert isinstance(load_teacher(path), CifarResNet)


def test_wrong_shape_or_dtype_raises(tmp_path):
    arrays = _arrays()
    arrays["linear.bias"] = arrays["linear.bias"].astype(np.float64)
    path = tmp_path / "dtype.npz"
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match="array 'linear.bias' is float64"):
        load_teacher(path)


def test_missing_or_extra_array_raises(tmp_path):
    arrays = _arrays()
    del arrays["linear.bias"]
    arrays["surprise"] = np.zeros(3, np.float32)
    path = tmp_path / "keys.npz"
    np.savez(path, **arrays)
    with pytest.raises(ArtifactError, match=r"missing \['linear.bias'\], extra \['surprise'\]"):
        load_teacher(path)


@pytest.mark.parametrize("field,value", [("format_version", 2), ("format", "something.else")])
def test_wrong_manifest_format_raises(tmp_path, field, value):
    manifest = _manifest()
    manifest[field] = value
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="expected format 'convexedge.weights' version 1"):
        load_teacher(manifest_path=path)
    with pytest.raises(ArtifactError, match="expected format"):
        teacher_normalization(path)


def test_missing_weights_file_raises(tmp_path):
    with pytest.raises(ArtifactError, match="weights file .* not found"):
        load_teacher(tmp_path / "absent.npz")


def test_missing_manifest_raises(tmp_path):
    with pytest.raises(ArtifactError, match="weights manifest .* not found"):
        load_teacher(manifest_path=tmp_path / "absent.json")


def test_invalid_manifest_json_raises(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_teacher(manifest_path=path)


def test_truncated_weights_raise(tmp_path):
    path = tmp_path / "truncated.npz"
    data = TEACHER_WEIGHTS.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="unreadable or truncated"):
        load_teacher(path)
