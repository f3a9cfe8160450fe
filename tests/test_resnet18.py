"""Tests of the CIFAR-stem ResNet-18 (convexedge.models.resnet18_cifar) and its training recipe
(convexedge.models.train_resnet18): stem and stage shapes, pickle-free save/load with checks,
the learning-rate schedule, the augmentation, and one training step that lowers the loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from convexedge.device.errors import ArtifactError
from convexedge.host.data import random_crop_flip
from convexedge.models.resnet18_cifar import load_resnet18, resnet18_cifar, save_resnet18
from convexedge.models.train_resnet18 import TrainRecipe, train_resnet18


def test_cifar_stem_and_stage_shapes():
    model = resnet18_cifar().eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    shapes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        getattr(model, name).register_forward_hook(
            lambda m, i, o, n=name: shapes.__setitem__(n, tuple(o.shape))
        )
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    assert shapes == {"layer1": (2, 64, 32, 32), "layer2": (2, 128, 16, 16), "layer3": (2, 256, 8, 8),
                      "layer4": (2, 512, 4, 4)}  # fmt: skip
    assert sum(p.numel() for p in model.parameters()) == 11_173_962


def test_save_load_round_trip_and_checks(tmp_path):
    model = resnet18_cifar().eval()
    w, m = tmp_path / "r18.npz", tmp_path / "r18.json"
    manifest = save_resnet18(model, w, m, mean=[0.5] * 3, std=[0.25] * 3, extra={"note": "test"})
    assert manifest["note"] == "test" and all(d == "float16" for d in manifest["dtypes"].values())
    loaded = load_resnet18(w, m)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # float16 storage: equal up to half-precision rounding of the weights
        torch.testing.assert_close(loaded(x), model(x), rtol=2e-2, atol=2e-2)
    bad = json.loads(m.read_text())
    key = next(iter(bad["sha256"]))
    bad["sha256"][key] = "0" * 64
    m.write_text(json.dumps(bad))
    with pytest.raises(ArtifactError, match="SHA-256"):
        load_resnet18(w, m)
    with pytest.raises(ArtifactError, match="train_resnet18"):
        load_resnet18(tmp_path / "none.npz", tmp_path / "none.json")


def test_lr_schedule_warmup_then_cosine_to_zero():
    r = TrainRecipe(steps=20, warmup_steps=4, lr=0.1)
    lrs = [r.lr_at(s) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    assert lrs[4] == pytest.approx(0.1) and all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert lrs[-1] < 0.01
    with pytest.raises(ValueError, match="warmup_steps"):
        TrainRecipe(steps=4, warmup_steps=4)


def test_augment_is_a_crop_of_the_padded_image_or_its_flip():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(16, 32, 32, 3), dtype=np.uint8)
    out = random_crop_flip(x, np.random.default_rng(1), pad=4)
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    for i in range(16):
        found = any(
            np.array_equal(out[i], c) or np.array_equal(out[i], c[:, ::-1])
            for dy in range(9) for dx in range(9) for c in [padded[i, dy:dy + 32, dx:dx + 32]]
        )  # fmt: skip
        assert found


@pytest.mark.slow
def test_a_few_steps_lower_the_loss():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    y = np.arange(8) % 2
    model, history = train_resnet18(TrainRecipe(steps=6, batch_size=8, warmup_steps=1, lr=0.02, pad=0), x, y,
                                     log_every=1)  # fmt: skip
    assert history[-1]["loss"] < history[0]["loss"]
