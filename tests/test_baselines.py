"""Tests of convexedge.host.baselines on a tiny two-block CNN: every student kind fits the span,
swapping keeps every other weight bit-identical, training is label-free, deterministic, honours
its time budget and returns the best model on KeyboardInterrupt."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.baselines import (
    BMConvStudent,
    PrunedSpan,
    ReluConvStudent,
    TrainConfig,
    bm_gates_for,
    relu_hidden_for,
    span_parameters,
    train_student,
)
from convexedge.host.capture import capture_block
from convexedge.host.distill import make_gates
from convexedge.host.evaluate import count_macs, count_parameters
from convexedge.host.students import ConvGeometry
from convexedge.host.swap import swapped

GEOM = ConvGeometry(in_channels=4, kernel_size=3, stride=1, padding=1)


def toy_cnn(seed: int = 0) -> nn.Module:
    """stem (3->4) -> block1 (4->4, 8x8) -> block2 (4->6, stride 2) -> pool -> linear."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.ReLU(),
        nn.Sequential(
            nn.Conv2d(4, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.Conv2d(8, 4, 3, padding=1),
            nn.ReLU(),
        ),
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 3),
    ).eval()


class ImagesOnly:
    """A data object whose labels raise: reading them fails the test."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.x = np.random.default_rng(seed).integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)

    @property
    def y(self) -> np.ndarray:
        raise AssertionError("labels were read on a label-free path")


def _transform(x: np.ndarray) -> np.ndarray:
    return (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - 0.5) / 0.25


@pytest.fixture(scope="module")
def acts(tmp_path_factory):
    """Captured (inputs, outputs) of span "2" of the toy CNN on 48 label-free images."""
    model = toy_cnn()
    data = ImagesOnly(48)
    shards = capture_block(
        model, "2", data.x, tmp_path_factory.mktemp("acts"), transform=_transform, progress=False
    )
    z_in, z_out = shards.load("inputs"), shards.load("outputs")
    return model, z_in[:40], z_out[:40], z_in[40:], z_out[40:]


def _students(span: nn.Module, target: int) -> dict[str, nn.Module]:
    _, G = make_gates(GEOM.d, bm_gates_for(target, GEOM, 4), seed=1)
    return {
        "bm": BMConvStudent(G, GEOM, 4, seed=0),
        "nonconvex": ReluConvStudent(GEOM, 4, relu_hidden_for(target, GEOM, 4), seed=0),
        "magnitude_pruned": PrunedSpan(span, target),
    }


CFG = TrainConfig(epochs=30, lr=1e-2, batch_size=8, progress=False)


@pytest.mark.parametrize("kind", ["bm", "nonconvex", "magnitude_pruned"])
def test_each_student_fits_the_span_and_swaps(acts, kind):
    model, zi, zo, vi, vo = acts
    span = model[2]
    target = count_parameters(span) // 2
    student = _students(span, target)[kind]
    assert span_parameters(student) <= target
    initial = train_student(student, zi, zo, TrainConfig(epochs=1, lr=1e-12, progress=False), val=(vi, vo))
    res = train_student(student, zi, zo, CFG, val=(vi, vo))
    assert res.status == "completed" and res.epochs == 30
    assert res.val_loss < 0.8 * initial.val_loss  # it learned something
    # the reported held-out loss is that of the returned weights
    with torch.no_grad():
        pred = res.module(torch.from_numpy(vi))
    assert float(0.5 * ((pred - torch.from_numpy(vo)) ** 2).mean()) == pytest.approx(res.val_loss, rel=1e-4)
    # swap: the student is used, every other weight is bit-identical, the teacher is untouched
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = swapped(model, "2", res.module)
    assert new[2] is not model[2]
    for key, val in model.state_dict().items():
        assert torch.equal(val, before[key])
        if not key.startswith("2."):
            assert torch.equal(new.state_dict()[key], val), key
    x = torch.from_numpy(_transform(ImagesOnly(4, seed=9).x))
    assert new(x).shape == model(x).shape


def test_pruned_span_masks_stay_zero_and_count_matches(acts):
    model, zi, zo, vi, vo = acts
    span = model[2]
    pruned = PrunedSpan(span, 300)
    zeros_before = [~m for m in pruned.masks()]
    train_student(pruned, zi, zo, TrainConfig(epochs=3, progress=False), val=(vi, vo))
    for conv, dead in zip(pruned._targets, zeros_before, strict=True):
        assert torch.all(conv.weight[dead] == 0)
    nonzero = sum(int((p != 0).sum()) for p in pruned.parameters())
    assert pruned.num_parameters() == 300 or pruned.num_parameters() >= nonzero
    assert pruned.num_parameters() <= 300
    dense_macs = count_macs(span, (4, 8, 8))
    assert 0 < pruned.macs((8, 8)) < dense_macs
    with pytest.raises(ValueError, match="leaves no weights"):
        PrunedSpan(span, 10)


def test_bm_counts_match_evaluate(acts):
    _, G = make_gates(GEOM.d, 3, seed=0)
    bm = BMConvStudent(G, GEOM, 4, width=2)
    assert count_parameters(bm) == bm.num_parameters(count_gates=True)
    assert bm.num_parameters(count_gates=False) == 3 * 2 * GEOM.d + 4 * (3 * 2 + 1)
    assert count_macs(bm, (4, 8, 8)) == bm.macs((8, 8)) == 64 * (36 * (3 + 6) + 6 * 4)
    # gates are frozen buffers, not trained
    assert not any(p is bm.gate_weight for p in bm.parameters())
    with pytest.raises(ValueError, match="expected gates"):
        BMConvStudent(G[:-1], GEOM, 4)


def test_gated_bm_mask_semantics():
    """Hidden channel i*r + j is gated by gate i: with r=1 and an identity 1x1 read-out, the output is
    the value conv where the gate conv is >= 0 and zero elsewhere."""
    torch.manual_seed(0)
    _, G = make_gates(GEOM.d, 4, seed=3)
    bm = BMConvStudent(G, GEOM, 4, output_relu=False)
    with torch.no_grad():
        bm.out_weight.copy_(torch.eye(4).view(4, 4, 1, 1))
        bm.out_bias.zero_()
    z = torch.randn(2, 4, 8, 8)
    gate = torch.nn.functional.conv2d(z, bm.gate_weight, bm.gate_bias, padding=1) >= 0
    val = torch.nn.functional.conv2d(z, bm.value_weight, bm.value_bias, padding=1)
    assert torch.allclose(bm(z), val * gate)


def test_label_free_training_paths(acts, tmp_path):
    """Capture and every baseline's training run on an object whose labels raise when read."""
    model, *_ = acts
    data = ImagesOnly(20, seed=5)
    out = capture_block(model, "2", data.x, tmp_path, transform=_transform, progress=False)
    zi, zo = out.load("inputs"), out.load("outputs")
    for student in _students(model[2], 400).values():
        res = train_student(
            student, zi[:16], zo[:16], TrainConfig(epochs=2, progress=False), val=(zi[16:], zo[16:])
        )
        assert res.status == "completed"


def test_deterministic_with_seed(acts):
    _, zi, zo, vi, vo = acts
    weights = []
    for _ in range(2):
        s = ReluConvStudent(GEOM, 4, 6, seed=3)
        train_student(s, zi, zo, TrainConfig(epochs=3, seed=7, progress=False), val=(vi, vo))
        weights.append([p.detach().clone() for p in s.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_time_budget_stops_training(acts):
    _, zi, zo, vi, vo = acts
    res = train_student(
        ReluConvStudent(GEOM, 4, 6), zi, zo, TrainConfig(epochs=100000, time_budget_s=0.3, progress=False)
    )
    assert res.status == "time_budget" and res.seconds < 5 and res.epochs < 100000
    assert np.isnan(res.val_loss)


class InterruptAfter(ReluConvStudent):
    """Raises KeyboardInterrupt on the n-th training forward (as Ctrl-C would)."""

    def __init__(self, n: int) -> None:
        super().__init__(GEOM, 4, 6)
        self.calls, self.n = 0, n

    def forward(self, z):
        if torch.is_grad_enabled():
            self.calls += 1
            if self.calls == self.n:
                raise KeyboardInterrupt
        return super().forward(z)


def test_keyboard_interrupt_returns_best_so_far(acts):
    _, zi, zo, vi, vo = acts
    student = InterruptAfter(12)  # 5 steps per epoch: interrupted in epoch 3
    res = train_student(student, zi, zo, TrainConfig(epochs=50, batch_size=8, progress=False), val=(vi, vo))
    assert res.status == "interrupted" and res.epochs == 3 and res.steps == 11
    assert res.val_loss == min(v for _, _, v in res.history)
    with torch.no_grad():
        pred = res.module(torch.from_numpy(vi))
    assert float(0.5 * ((pred - torch.from_numpy(vo)) ** 2).mean()) == pytest.approx(res.val_loss, rel=1e-4)


def test_input_validation(acts):
    _, zi, zo, vi, vo = acts
    with pytest.raises(DataError, match="as many inputs as outputs"):
        train_student(ReluConvStudent(GEOM, 4, 2), zi, zo[:3], CFG)
    with pytest.raises(DataError, match="floating point"):
        train_student(ReluConvStudent(GEOM, 4, 2), zi.astype(np.int32), zo, CFG)
    with pytest.raises(DataError, match="the student maps"):
        train_student(ReluConvStudent(GEOM, 5, 2), zi, zo, CFG)
    with pytest.raises(DataError, match="held-out activations"):
        train_student(ReluConvStudent(GEOM, 4, 2), zi, zo, CFG, val=(vi[:, :2], vo))
    with pytest.raises(ValueError, match="epochs, batch_size"):
        TrainConfig(epochs=0)
    with pytest.raises(ValueError, match="lr must be"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="time_budget_s"):
        TrainConfig(time_budget_s=0)
    with pytest.raises(ValueError, match="lr_schedule"):
        TrainConfig(lr_schedule="step")
    with pytest.raises(ValueError, match="hidden and out_channels"):
        ReluConvStudent(GEOM, 4, 0)


@settings(max_examples=40, deadline=None)
@given(
    params=st.integers(50, 200_000),
    cin=st.integers(1, 32),
    k=st.sampled_from([1, 3, 5]),
    cout=st.integers(1, 64),
    width=st.integers(1, 3),
)
def test_sizing_never_exceeds_the_budget(params, cin, k, cout, width):
    geom = ConvGeometry(in_channels=cin, kernel_size=k, padding=k // 2)
    h = relu_hidden_for(params, geom, cout)
    P = bm_gates_for(params, geom, cout, width=width)
    relu_n = ReluConvStudent(geom, cout, h).num_parameters()
    bm_n = P * geom.d + P * width * geom.d + (P * width + 1) * cout
    if h > 1:
        assert relu_n <= params < ReluConvStudent(geom, cout, h + 1).num_parameters()
    if P > 1:
        assert bm_n <= params < bm_n + geom.d + width * (geom.d + cout)
