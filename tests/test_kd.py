"""Tests of convexedge.host.kd: the KD loss (zero iff the softened outputs agree, nonnegative,
scaled by T^2), and the end-to-end fine-tune (label-free, leaves its input untouched, lowers the
held-out KD loss of a perturbed copy of the teacher)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.kd import KDConfig, kd_finetune, kd_loss


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.5, 8.0))
def test_kd_loss_nonnegative_and_zero_on_equal_logits(seed, t):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert float(kd_loss(a, b, t)) >= -1e-6
    assert float(kd_loss(a, a, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(kd_loss(a + 3.0, a, t)) == pytest.approx(0.0, abs=1e-5)  # shift-invariant softmax


def test_kd_loss_matches_definition():
    s, t = torch.tensor([[1.0, 2.0, 0.5]]), torch.tensor([[0.2, 1.5, 2.5]])
    T = 4.0
    p = torch.softmax(t / T, 1)
    q = torch.softmax(s / T, 1)
    expect = T * T * float((p * (p.log() - q.log())).sum())
    assert float(kd_loss(s, t, T)) == pytest.approx(expect, rel=1e-5)


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()  # fmt: skip


def _transform(x: np.ndarray) -> np.ndarray:
    return (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.25


def test_kd_finetune_moves_the_student_toward_the_teacher():
    images = np.random.default_rng(0).integers(0, 256, size=(48, 8, 8, 3), dtype=np.uint8)
    teacher, student = _net(0), _net(1)
    before = copy.deepcopy(student.state_dict())
    cfg = KDConfig(epochs=15, lr=1e-2, batch_size=8, augment=False)
    res = kd_finetune(student, teacher, images[:40], _transform, cfg, val_images=images[40:])
    assert res.val_loss < 0.7 * res.val_loss_before and res.status == "completed" and res.epochs == 15
    for k, v in student.state_dict().items():  # the input model is not modified
        assert torch.equal(v, before[k])
    for p in teacher.parameters():  # nor the teacher's weights
        assert not p.requires_grad


def test_kd_finetune_time_budget_and_errors():
    images = np.random.default_rng(1).integers(0, 256, size=(16, 8, 8, 3), dtype=np.uint8)
    res = kd_finetune(_net(1), _net(0), images, _transform, KDConfig(epochs=10_000, time_budget_s=0.3))
    assert res.status == "time_budget" and res.epochs < 10_000
    with pytest.raises(DataError, match="uint8"):
        kd_finetune(_net(1), _net(0), images.astype(np.float32), _transform)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": 0}, "temperature"), ({"epochs": 0}, "epochs"), ({"lr": 0}, "lr"),
     ({"time_budget_s": -1.0}, "time_budget_s")],
)  # fmt: skip
def test_kd_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KDConfig(**kwargs)
