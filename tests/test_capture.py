"""Tests of convexedge.host.capture: captured activations against a hook-free forward (oracle),
shard layout and manifest, float16 storage, hygiene (no hooks left, weights unchanged), and every
error of capture_block, CaptureConfig and ActivationShards.open."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from torch import nn

from convexedge.device.errors import ArtifactError, DataError
from convexedge.host.capture import ActivationShards, CaptureConfig, capture_block
from convexedge.host.data import load_images
from convexedge.models import BUNDLED_DATA_DIR

N = 30
CFG = CaptureConfig(batch_size=10, shard_images=20)


@pytest.fixture(scope="module")
def images():
    return load_images(BUNDLED_DATA_DIR, "test", limit=N, labels=False).x


@pytest.fixture(scope="module")
def direct(teacher, transform, images):
    """Hook-free activations: stem, layer1, layer2 by hand, then layer3 block by block."""
    with torch.no_grad():
        x = torch.from_numpy(transform(images))
        z2 = teacher.layer2(teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(x)))))
        z31 = teacher.layer3[1](teacher.layer3[0](z2))
        z3 = teacher.layer3[2](z31)
    return {"layer3": (z2.numpy(), z3.numpy()), "layer3.2": (z31.numpy(), z3.numpy())}


@pytest.fixture(scope="module")
def captured(teacher, transform, images, tmp_path_factory):
    """One float32 capture of layer3, shared by the read-only tests below."""
    out = tmp_path_factory.mktemp("cap_layer3")
    return capture_block(teacher, "layer3", images, out, transform=transform, config=CFG, progress=False)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ------------------------------------------------------------------------------ oracle
@pytest.mark.parametrize(
    "module,in_shape,out_shape",
    [
        ("layer3", (32, 16, 16), (64, 8, 8)),
        ("layer3.2", (64, 8, 8), (64, 8, 8)),
    ],
)
def test_capture_matches_direct_forward(
    teacher, transform, images, direct, tmp_path, module, in_shape, out_shape
):
    shards = capture_block(teacher, module, images, tmp_path, transform=transform, config=CFG, progress=False)
    assert shards.module == module
    assert shards.input_shape == in_shape and shards.output_shape == out_shape
    assert shards.count == N
    zin, zout = shards.load("inputs"), shards.load("outputs")
    assert zin.dtype == np.float32 and zin.shape == (N, *in_shape)
    assert zout.shape == (N, *out_shape)
    np.testing.assert_allclose(zin, direct[module][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(zout, direct[module][1], rtol=1e-6, atol=1e-6)


def test_shards_and_manifest(captured):
    root = captured.root
    assert [c for _, _, c in captured.shards] == [20, 10]
    assert captured.shards[0][:2] == ("inputs_0000.npy", "outputs_0000.npy")
    assert captured.shards[1][:2] == ("inputs_0001.npy", "outputs_0001.npy")
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["format"] == "convexedge.activations" and manifest["format_version"] == 1
    assert manifest["module"] == "layer3" and manifest["count"] == N
    assert manifest["input_shape"] == [32, 16, 16] and manifest["output_shape"] == [64, 8, 8]
    assert manifest["dtype"] == "float32"
    assert manifest["config"]["batch_size"] == 10 and manifest["config"]["shard_images"] == 20
    assert not (root / "manifest.json.tmp").exists()
    arrs = captured.arrays("inputs")
    assert [a.shape[0] for a in arrs] == [20, 10]
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in arrs)


def test_reopen_and_load_limit(captured, direct):
    again = ActivationShards.open(captured.root)
    assert again == captured
    for limit in (5, 20, 25, N):
        part = again.load("outputs", limit=limit)
        np.testing.assert_allclose(part, direct["layer3"][1][:limit], rtol=1e-6, atol=1e-6)


def test_float16_storage_close_to_float32(teacher, transform, images, direct, tmp_path):
    cfg = CaptureConfig(batch_size=10, shard_images=20, dtype="float16")
    shards = capture_block(
        teacher, "layer3", images, tmp_path, transform=transform, config=cfg, progress=False
    )
    assert shards.dtype == "float16"
    assert all(a.dtype == np.float16 for a in shards.arrays("inputs") + shards.arrays("outputs"))
    for which, ref in (("inputs", direct["layer3"][0]), ("outputs", direct["layer3"][1])):
        got = shards.load(which)
        assert got.dtype == np.float32
        # float16 keeps ~11 significant bits: relative error <= 2^-11 per entry.
        np.testing.assert_allclose(got, ref, rtol=2**-10, atol=1e-4)


def test_batch_not_dividing_count(teacher, transform, images, direct, tmp_path):
    cfg = CaptureConfig(batch_size=4, shard_images=8)
    shards = capture_block(
        teacher, "layer3", images[:13], tmp_path, transform=transform, config=cfg, progress=False
    )
    assert [c for _, _, c in shards.shards] == [8, 5]
    np.testing.assert_allclose(shards.load("inputs"), direct["layer3"][0][:13], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------ hygiene
def test_model_unchanged_and_no_hooks_left(teacher, transform, images, tmp_path):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    capture_block(teacher, "layer3.2", images[:10], tmp_path, transform=transform, config=CFG, progress=False)
    assert _hooks(teacher) == 0
    assert teacher.layer3._forward_hooks == {} and teacher.layer3[2]._forward_hooks == {}
    after = teacher.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_hook_removed_when_transform_fails(teacher, images, tmp_path):
    def broken(_x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        capture_block(teacher, "layer3", images, tmp_path, transform=broken, config=CFG, progress=False)
    assert _hooks(teacher) == 0
    assert not (tmp_path / "manifest.json").exists()


# ------------------------------------------------------------------------------ errors
def test_unknown_module(teacher, transform, images, tmp_path):
    with pytest.raises(DataError, match=r"module 'layer9' not found.*'layer3'"):
        capture_block(teacher, "layer9", images, tmp_path, transform=transform, config=CFG, progress=False)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((2, 32, 32, 3), np.float32),
        np.zeros((32, 32, 3), np.uint8),
        [[0]],
    ],
)
def test_non_uint8_images(teacher, transform, tmp_path, bad):
    with pytest.raises(DataError, match=r"expected images as an \(N, H, W, C\) uint8 array"):
        capture_block(teacher, "layer3", bad, tmp_path, transform=transform, config=CFG, progress=False)


def test_empty_images(teacher, transform, tmp_path):
    with pytest.raises(DataError, match="no images to capture"):
        capture_block(
            teacher,
            "layer3",
            np.zeros((0, 32, 32, 3), np.uint8),
            tmp_path,
            transform=transform,
            config=CFG,
            progress=False,
        )


def test_module_that_does_not_run(tmp_path):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Flatten(), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    model = Net()
    with pytest.raises(DataError, match="did not run in the model's forward pass"):
        capture_block(
            model,
            "unused",
            np.zeros((2, 2, 2, 3), np.uint8),
            tmp_path,
            transform=lambda x: x.astype(np.float32),
            config=CaptureConfig(batch_size=2, shard_images=2),
            progress=False,
        )
    assert _hooks(model) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"batch_size": 0}, "batch_size and shard_images must be >= 1"),
        ({"shard_images": 0}, "batch_size and shard_images must be >= 1"),
        ({"dtype": "bfloat16"}, "dtype must be 'float32' or 'float16'"),
        ({"batch_size": 3, "shard_images": 10}, r"must be a multiple of batch_size \(3\)"),
    ],
)
def test_capture_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CaptureConfig(**kwargs)


@pytest.fixture
def capture_copy(captured, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(captured.root, dst)
    return dst


def test_open_without_manifest(capture_copy):
    (capture_copy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="holds no manifest.json: not a finished capture"):
        ActivationShards.open(capture_copy)


def test_open_invalid_json(capture_copy):
    (capture_copy / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="is not valid JSON"):
        ActivationShards.open(capture_copy)


@pytest.mark.parametrize("field,value", [("format_version", 2), ("format", "other")])
def test_open_wrong_version(capture_copy, field, value):
    path = capture_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[field] = value
    path.write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="expected convexedge.activations v1"):
        ActivationShards.open(capture_copy)


def test_open_shard_with_wrong_shape(capture_copy):
    np.save(capture_copy / "inputs_0001.npy", np.zeros((10, 32, 16, 15), np.float32))
    with pytest.raises(ArtifactError, match=r"inputs_0001.npy: expected shape \(10, 32, 16, 16\)"):
        ActivationShards.open(capture_copy)


def test_open_shard_with_wrong_count(capture_copy):
    np.save(capture_copy / "outputs_0000.npy", np.zeros((19, 64, 8, 8), np.float32))
    with pytest.raises(ArtifactError, match=r"outputs_0000.npy: expected shape \(20, 64, 8, 8\)"):
        ActivationShards.open(capture_copy)


def test_open_missing_shard(capture_copy):
    (capture_copy / "outputs_0001.npy").unlink()
    with pytest.raises(ArtifactError, match="outputs_0001.npy: missing or unreadable shard"):
        ActivationShards.open(capture_copy)


def test_recapture_overwrites(teacher, transform, images, direct, captured, capture_copy):
    shards = capture_block(
        teacher, "layer3.2", images[:10], capture_copy, transform=transform, config=CFG, progress=False
    )
    assert shards.module == "layer3.2" and shards.count == 10 and len(shards.shards) == 1
    np.testing.assert_allclose(shards.load("inputs"), direct["layer3.2"][0][:10], rtol=1e-6, atol=1e-6)
