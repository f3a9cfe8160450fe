"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of 16/32/64 channels, option-A shortcuts.

Written here from the paper; the layer names match the state dict of the bundled ResNet-20 weights
(see ``PROVENANCE.md``), so the no-pickle ``.npz`` loads with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet20"]


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a ReLU between and after the residual sum.

    The shortcut is option A of the paper: identity, or (when the shape changes) stride-2
    subsampling plus zero channels padded on both sides. It has no parameters.
    """

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()
        self.downsample = stride != 1 or cin != cout
        self.pad = (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample:
            x = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return self.relu2(out + x)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: stem, ``layer1..layer3`` of ``n`` blocks, pool, ``linear``.

    Args:
        n: blocks per stage (3 gives ResNet-20).
        num_classes: outputs of the final linear layer.

    Input ``(B, 3, 32, 32)`` normalised images; output ``(B, num_classes)`` logits. ``layer3``
    maps ``(B, 32, 16, 16)`` to ``(B, 64, 8, 8)``.
    """

    def __init__(self, n: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        cin = 16
        for stage, (cout, stride) in enumerate([(16, 1), (32, 2), (64, 2)], start=1):
            blocks = []
            for j in range(n):
                blocks.append(BasicBlock(cin, cout, stride if j == 0 else 1))
                cin = cout
            setattr(self, f"layer{stage}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.linear(self.pool(out).flatten(1))


def resnet20(num_classes: int = 10) -> CifarResNet:
    """An untrained ResNet-20 (0.27 M parameters); see :func:`convexedge.models.load_teacher`."""
    return CifarResNet(3, num_classes)
