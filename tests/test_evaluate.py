"""Tests of convexedge.host.evaluate: top-1 on hand-made logits, parameter counts with and without
gate buffers, MACs against hand formulas and the known ResNet-20 figure, predict_logits batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.evaluate import count_macs, count_parameters, predict_logits, top1
from convexedge.host.students import ConvGeometry, GatedConvStudent, GatedMLPStudent
from convexedge.host.swap import swapped
from convexedge.models import resnet20


def _conv_student(C=32, c=64, P=6, k=3, stride=2, seed=0):
    geom = ConvGeometry(in_channels=C, kernel_size=k, stride=stride, padding=k // 2)
    rng = np.random.default_rng(seed)
    V = rng.standard_normal((P, geom.d, c)).astype(np.float32)
    G = rng.standard_normal((geom.d, P)).astype(np.float32)
    return GatedConvStudent(V, G, geom, output_relu=True, drop_inactive=False)


# ------------------------------------------------------------------------------ top1
def test_top1_hand_made():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    assert top1(logits, np.array([1, 0, 2, 1])) == 1.0
    assert top1(logits, np.array([1, 0, 2, 2])) == 0.75
    assert top1(logits, np.array([0, 1, 0, 0])) == 0.0
    assert isinstance(top1(logits, np.array([1, 0, 2, 1])), float)


def test_top1_mismatch():
    with pytest.raises(DataError, match="top1: 3 predictions but 2 labels"):
        top1(np.zeros((3, 4)), np.zeros(2, np.int64))


def test_predict_logits_independent_of_batch_size():
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 3, 4))
    images = np.random.default_rng(0).integers(0, 256, (11, 2, 2, 3), dtype=np.uint8)
    tf = lambda x: x.transpose(0, 3, 1, 2).astype(np.float32) / 255  # noqa: E731
    a = predict_logits(model, images, tf, batch_size=3)
    b = predict_logits(model, images, tf, batch_size=500)
    assert a.shape == (11, 4) and a.dtype == np.float32
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(a, model(torch.from_numpy(tf(images))).numpy(), rtol=1e-6)


# ------------------------------------------------------------------------------ parameters
def test_count_parameters_plain_model():
    model = resnet20()
    n = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == count_parameters(model, count_gates=False) == n == 269_722


def test_count_parameters_counts_conv_student_gates_only_when_asked():
    student = _conv_student(C=32, c=64, P=6)
    d = 32 * 9 + 1
    model = swapped(resnet20(), "layer3", student)
    base = sum(p.numel() for p in model.parameters())
    assert count_parameters(student, count_gates=False) == 6 * d * 64
    assert count_parameters(student) == 6 * d * 64 + 6 * d
    assert count_parameters(model, count_gates=False) == base
    assert count_parameters(model) == base + 6 * d
    # the model without layer3 plus the student
    layer3 = sum(p.numel() for p in resnet20().layer3.parameters())
    assert count_parameters(model, count_gates=False) == 269_722 - layer3 + 6 * d * 64


def test_count_parameters_mlp_student():
    V, G = np.ones((3, 5, 2), np.float32), np.ones((5, 3), np.float32)
    model = nn.Sequential(nn.Linear(4, 4), GatedMLPStudent(V, G))
    assert count_parameters(model, count_gates=False) == 20 + 30
    assert count_parameters(model) == 20 + 30 + 15


# ------------------------------------------------------------------------------ MACs
@pytest.mark.parametrize(
    "cin,cout,k,s,p,groups,hw",
    [
        (3, 8, 3, 1, 1, 1, 10),
        (3, 8, 3, 2, 1, 1, 10),
        (4, 6, 5, 1, 0, 1, 9),
        (4, 8, 3, 1, 1, 2, 7),
        (6, 6, 1, 1, 0, 1, 4),
    ],
)
def test_count_macs_conv2d(cin, cout, k, s, p, groups, hw):
    conv = nn.Conv2d(cin, cout, k, s, p, groups=groups)
    ho = (hw + 2 * p - k) // s + 1
    assert count_macs(conv, (cin, hw, hw)) == cout * ho * ho * k * k * (cin // groups)


def test_count_macs_linear_and_sequence():
    assert count_macs(nn.Linear(5, 7), (5,)) == 35
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, 1, 1, bias=False),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 10),
    )
    assert count_macs(model, (3, 6, 6)) == 4 * 36 * 27 + 144 * 10


def test_count_macs_restores_mode_and_removes_hooks():
    model = resnet20().train()
    count_macs(model, (3, 32, 32))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    model.eval()
    count_macs(model, (3, 32, 32))
    assert not model.training


def test_resnet20_macs():
    assert abs(count_macs(resnet20(), (3, 32, 32)) - 40.55e6) <= 0.01 * 40.55e6


def test_student_swap_changes_macs_by_difference():
    model = resnet20()
    student = _conv_student(C=32, c=64, P=6)
    full = count_macs(model, (3, 32, 32))
    layer3 = count_macs(model.layer3, (32, 16, 16))
    assert count_macs(student, (32, 16, 16)) == student.macs((16, 16))
    assert student.macs((16, 16)) == 8 * 8 * (32 * 9) * 6 * (64 + 1)
    swapped_macs = count_macs(swapped(model, "layer3", student), (3, 32, 32))
    assert swapped_macs == full - layer3 + student.macs((16, 16))
