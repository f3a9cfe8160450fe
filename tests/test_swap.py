"""Tests of convexedge.host.swap: swapped() works on a copy, swap_() in place (attribute and
Sequential index), and unknown names raise DataError."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.swap import swap_, swapped
from convexedge.models import BasicBlock


class Scale(nn.Module):
    """A stand-in student: multiplies by a constant."""

    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


class Zeros(nn.Module):
    """A stand-in layer3 student: (B, 32, 16, 16) -> zeros (B, 64, 8, 8)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], 64, 8, 8)


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_swapped_leaves_original_untouched(teacher, x):
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        ref = teacher(x)
    student = nn.Identity()
    model = swapped(teacher, "layer3.2", student)
    assert model is not teacher
    assert model.layer3[2] is student
    assert isinstance(teacher.layer3[2], BasicBlock)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(teacher(x), ref, rtol=0, atol=0)
    assert not torch.allclose(out, ref, atol=1e-3)
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the copy does not share parameters with the original
    assert model.conv1.weight.data_ptr() != teacher.conv1.weight.data_ptr()


def test_swapped_model_uses_the_student(teacher, x):
    model = swapped(teacher, "linear", Scale(0.0))
    with torch.no_grad():
        assert not bool(model(x).any())
    # layer3 replaced by a student that outputs zeros: the logits are the linear layer's bias
    model = swapped(teacher, "layer3", Zeros())
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, teacher.linear.bias.detach().expand(2, -1), rtol=0, atol=0)


def test_swap_in_place_attribute(teacher):
    model = swapped(teacher, "layer3", nn.Identity())  # a private copy to modify in place
    old = model.layer3
    student = Scale(2.0)
    returned = swap_(model, "layer3", student)
    assert returned is old
    assert model.layer3 is student
    assert dict(model.named_modules())["layer3"] is student


def test_swap_in_place_sequential_index(teacher):
    model = swapped(teacher, "linear", nn.Identity())
    old = model.layer3[2]
    student = Scale(1.0)
    returned = swap_(model, "layer3.2", student)
    assert returned is old and isinstance(old, BasicBlock)
    assert model.layer3[2] is student
    assert len(model.layer3) == 3
    assert dict(model.named_modules())["layer3.2"] is student


def test_swap_in_place_nested_attribute_and_module_list():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])
    model.head = nn.Sequential(nn.Linear(2, 2))
    model.head[0].inner = nn.ReLU()
    student = nn.Identity()
    swap_(model, "blocks.1", student)
    assert model.blocks[1] is student
    swap_(model, "head.0.inner", student)
    assert model.head[0].inner is student


@pytest.mark.parametrize("name", ["layer9", "layer3.7", "layer3.2.conv9", ""])
def test_unknown_name_raises(teacher, name):
    with pytest.raises(DataError, match=rf"module {name!r} not found in the model"):
        swapped(teacher, name, nn.Identity())
    with pytest.raises(DataError, match="top-level modules are"):
        swap_(teacher, name, nn.Identity())
    assert isinstance(teacher.layer3[2], BasicBlock)  # nothing changed


def test_swap_in_place_named_sequential_child():
    from collections import OrderedDict

    model = nn.Module()
    model.body = nn.Sequential(OrderedDict(conv=nn.Conv2d(1, 1, 1), act=nn.ReLU()))
    student = nn.Identity()
    swap_(model, "body.act", student)
    assert model.body.act is student


def test_swap_in_place_module_dict_digit_key():
    model = nn.Module()
    model.heads = nn.ModuleDict({"0": nn.ReLU()})
    student = nn.Identity()
    swap_(model, "heads.0", student)
    assert model.heads["0"] is student
