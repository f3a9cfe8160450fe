"""The fast protocol's task: MNIST-1D (Greydanus 2020) and a width-8 1D ResNet with 2,560 ReLUs.

The data comes from the ``mnist1d`` package's generator with the paper's default arguments (4,000
train / 1,000 test sequences of length 40, 10 classes, generator seed 42); nothing is downloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from convexedge.host.linearize.train import Split

__all__ = ["ResNet1d", "load_mnist1d", "train_classifier"]


class _Block1d(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)
        self.relu1 = nn.ReLU()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        return self.relu2(self.bn2(self.conv2(out)) + x)


class ResNet1d(nn.Module):
    """Stem conv-BN-ReLU, ``blocks`` residual blocks, conv-BN-ReLU head, pool, linear.

    Input ``(B, 1, L)``; with ``width=8``, ``blocks=3`` and ``L=40`` it has 8 ReLU layers of 320
    units each: 2,560 ReLUs.
    """

    def __init__(self, width: int = 8, blocks: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.blocks = nn.Sequential(*[_Block1d(width) for _ in range(blocks)])
        self.head = nn.Sequential(
            nn.Conv1d(width, width, 3, padding=1, bias=False), nn.BatchNorm1d(width), nn.ReLU()
        )
        self.linear = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(self.blocks(self.stem(x)))
        return self.linear(out.mean(2))


def load_mnist1d(val: int = 500) -> tuple[Split, Split, Split]:
    """``(train, val, test)`` splits of MNIST-1D: the last ``val`` training sequences validate.

    ``x`` is ``(N, 1, 40)`` float32. Generated in a few seconds by ``mnist1d.data.make_dataset``.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d", name="mnist1d") from exc
    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(data["y"], dtype=torch.int64)
    xt = torch.tensor(data["x_test"], dtype=torch.float32).unsqueeze(1)
    yt = torch.tensor(data["y_test"], dtype=torch.int64)
    if not 0 < val < x.shape[0]:
        raise ValueError(f"val must lie in 1..{x.shape[0] - 1}, got {val}")
    n = x.shape[0] - val
    return Split(x[:n], y[:n]), Split(x[n:], y[n:]), Split(xt, yt)


def train_classifier(
    model: nn.Module, train: Split, *, epochs: int, lr: float = 1e-2, seed: int = 0
) -> nn.Module:
    """Train ``model`` from scratch with Adam and cross-entropy (cosine learning-rate decay)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n, bs = len(train), 128
    steps = epochs * (-(-n // bs))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, bs):
            idx = order[i : i + bs]
            loss = nn.functional.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()
