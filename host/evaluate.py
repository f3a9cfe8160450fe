"""Measure a model: top-1 accuracy, parameter counts, multiply-accumulates."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from convexedge.device.errors import DataError

__all__ = ["count_macs", "count_parameters", "predict_logits", "top1"]


def predict_logits(
    model: nn.Module,
    images: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    *,
    batch_size: int = 500,
    device: str = "cpu",
) -> np.ndarray:
    """Logits (N, classes) of ``model`` in eval mode on (N, H, W, C) uint8 ``images``."""
    model.eval().to(device)
    out = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(transform(images[start : start + batch_size])).to(device)
            out.append(model(x).float().cpu().numpy())
    return np.concatenate(out)


def top1(logits: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose arg-max equals the label."""
    if logits.shape[0] != labels.shape[0]:
        raise DataError(f"top1: {logits.shape[0]} predictions but {labels.shape[0]} labels")
    return float((logits.argmax(1) == labels).mean())


def count_parameters(module: nn.Module, *, count_gates: bool = True) -> int:
    """Learned parameters plus, when ``count_gates``, stored gate buffers of gated students.

    BatchNorm running statistics are not counted (they fold into the conv at export).
    """
    n = sum(p.numel() for p in module.parameters())
    if count_gates:
        for m in module.modules():
            if hasattr(m, "num_parameters") and hasattr(m, "num_gates"):
                n += m.num_parameters(count_gates=True) - m.num_parameters(count_gates=False)
            elif hasattr(m, "gates") and isinstance(m.gates, torch.Tensor):
                n += m.gates.numel()
    return n


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates of one forward pass on a single sample of ``input_shape`` (C, H, W).

    Counts Conv2d, Linear and gated students (gate projections included); elementwise ops and
    BatchNorm are not counted.
    """
    total = 0
    hooks = []

    def conv_hook(m: nn.Conv2d, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        k = m.kernel_size[0] * m.kernel_size[1] * (m.in_channels // m.groups)
        total += int(out[0].numel()) * k

    def linear_hook(m: nn.Linear, _inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += int(out[0].numel()) * m.in_features

    def student_hook(m: nn.Module, inp: tuple, _out: torch.Tensor) -> None:
        nonlocal total
        total += m.macs(tuple(inp[0].shape[-2:]))

    students = [m for m in model.modules() if hasattr(m, "macs") and hasattr(m, "num_gates")]
    inside = {id(c) for s in students for c in s.modules()}
    for m in model.modules():
        if m in students:
            hooks.append(m.register_forward_hook(student_hook))
        elif id(m) in inside:
            continue
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    try:
        model.eval()
        p = next(model.parameters(), None)
        x = torch.zeros(1, *input_shape, device=p.device if p is not None else "cpu")
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total
