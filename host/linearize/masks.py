"""Masked ReLUs swapped into any module in place, and an exact ReLU counter.

A :class:`MaskedReLU` computes ``y = m * relu(x) + (1 - m) * x``: where the mask bit is 1 the unit is
a ReLU, where it is 0 the unit is the identity (linear, free in private inference). Masks are per
pixel (one bit per element of the feature map of one sample) or per channel (one bit per channel,
covering all its pixels). The ReLU count of a model is the number of elements, per sample at the
model's input resolution, that still go through a ReLU.

Units: every mask bit is a *unit*; a unit covers ``cost`` ReLUs (1 per pixel, ``H*W`` per channel).
The concatenation of all masks in ``named_modules`` order is the *flat mask* that the search
algorithms (:mod:`.snl`, :mod:`.bcd`) work on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = [
    "MaskedReLU",
    "count_relus",
    "flat_mask",
    "linearize_",
    "live_relus",
    "masked_relus",
    "set_flat_mask_",
    "unit_costs",
]

Granularity = Literal["pixel", "channel"]

_RELU_FUNCS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu_}


class MaskedReLU(nn.Module):
    """``y = m * relu(x) + (1 - m) * x`` with a binary mask ``m`` (or SNL's continuous ``alpha``).

    The mask is a buffer, created on the first forward pass (see :func:`linearize_`) with shape
    ``x.shape[1:]`` (``granularity="pixel"``) or ``(x.shape[1],)`` (``"channel"``). While
    ``alpha`` (a parameter, set by SNL) is not ``None`` it replaces the binary mask.
    """

    def __init__(self, granularity: Granularity = "pixel") -> None:
        super().__init__()
        if granularity not in ("pixel", "channel"):
            raise ValueError(f"granularity must be 'pixel' or 'channel', got {granularity!r}")
        self.granularity = granularity
        self.register_buffer("mask", None)
        self.alpha: nn.Parameter | None = None
        self.feature_shape: tuple[int, ...] | None = None
        # (K, *mask.shape) candidate masks: the batch is K stacked copies of one input, copy k uses
        # candidate k (batched evaluation of block removals in BCD). None in normal use.
        self.candidates: torch.Tensor | None = None

    def materialize_(self, feature_shape: tuple[int, ...]) -> None:
        """Create an all-ones mask for per-sample features of ``feature_shape`` (C, ...)."""
        self.feature_shape = tuple(int(s) for s in feature_shape)
        shape = self.feature_shape if self.granularity == "pixel" else self.feature_shape[:1]
        self.mask = torch.ones(shape)

    @property
    def cost(self) -> int:
        """ReLUs per mask bit: 1 per pixel, the spatial size per channel."""
        if self.feature_shape is None:
            raise RuntimeError("MaskedReLU has no mask yet: run linearize_(model, example) first")
        return 1 if self.granularity == "pixel" else int(np.prod(self.feature_shape[1:], dtype=np.int64))

    def _expand(self, m: torch.Tensor, ndim: int) -> torch.Tensor:
        return m if self.granularity == "pixel" else m.view(m.shape[0], *([1] * (ndim - 2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mask is None:
            self.materialize_(tuple(x.shape[1:]))
            self.mask = self.mask.to(x.device)
        if self.alpha is not None:
            a = self._expand(self.alpha, x.dim())
            return x + a * torch.relu(-x)  # = a*relu(x) + (1-a)*x
        if self.candidates is not None:
            k = self.candidates.shape[0]
            xs = x.reshape(k, x.shape[0] // k, *x.shape[1:])
            m = self.candidates.bool()
            m = m.unsqueeze(1) if self.granularity == "pixel" else m.view(k, 1, -1, *([1] * (x.dim() - 2)))
            return torch.where(m, torch.relu(xs), xs).reshape(x.shape)
        return torch.where(self._expand(self.mask, x.dim()).bool(), torch.relu(x), x)

    def extra_repr(self) -> str:
        live = None if self.mask is None else int(self.mask.sum()) * self.cost
        return f"granularity={self.granularity!r}, live_relus={live}"


def masked_relus(model: nn.Module) -> list[tuple[str, MaskedReLU]]:
    """The model's masked ReLUs in ``named_modules`` order (the order of the flat mask)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MaskedReLU)]


class _FunctionalReluSpy(TorchFunctionMode):
    """Counts relu calls made outside ReLU modules (per-sample elements, or call sites)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.elements = 0
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.depth == 0 and func in _RELU_FUNCS:
            x = args[0]
            self.calls += 1
            self.elements += x.numel() // max(1, x.shape[0]) if x.dim() else 1
        return func(*args, **(kwargs or {}))


def _run_with_spy(model: nn.Module, example: torch.Tensor, on_module: Callable | None = None):
    spy = _FunctionalReluSpy()
    handles = []

    def pre(mod, inp):
        spy.depth += 1

    def post(mod, inp, out):
        spy.depth -= 1
        if on_module is not None:
            on_module(mod, inp[0])

    for m in model.modules():
        if isinstance(m, nn.ReLU | MaskedReLU):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), spy:
            model(example)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return spy


def _check_example(example: torch.Tensor) -> None:
    if not isinstance(example, torch.Tensor) or example.dim() < 2 or example.shape[0] < 1:
        raise ValueError(
            "example must be a batched input tensor (B, ...) at the model's input resolution, got "
            f"{type(example).__name__} {getattr(example, 'shape', '')}"
        )


def linearize_(
    model: nn.Module,
    example: torch.Tensor,
    *,
    granularity: Granularity = "pixel",
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
) -> nn.Module:
    """Replace every ``nn.ReLU`` of ``model`` (in place) by a :class:`MaskedReLU` with all bits 1.

    The masks are created by one forward pass on ``example`` (its batch size does not matter), so
    their shapes are those at the model's input resolution. Outputs are unchanged bit for bit.

    Args:
        model: any module whose ReLUs are ``nn.ReLU`` submodules (a module used twice in a forward
            pass cannot carry one mask and is rejected).
        example: (B, ...) input at the resolution the model will run at.
        granularity: ``"pixel"`` (one bit per element) or ``"channel"`` (one bit per channel).
        filter_fn: ``(qualified_name, relu_module) -> bool``; only ReLUs it accepts are swapped.

    Returns:
        ``model`` itself.

    Raises:
        ValueError: the model calls relu functionally (``F.relu``, ``torch.relu``, ``x.relu()``), so
            those ReLUs could neither be masked nor counted; make them ``nn.ReLU`` modules (or
            ``torch.fx``-rewrite the model) first. Also: a ReLU module reused, bad ``example``.

    Example:
        >>> model = linearize_(resnet20(), torch.zeros(1, 3, 32, 32))
        >>> count_relus(model, torch.zeros(1, 3, 32, 32))
        188416
    """
    _check_example(example)
    if granularity not in ("pixel", "channel"):
        raise ValueError(f"granularity must be 'pixel' or 'channel', got {granularity!r}")
    targets = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ReLU) and (filter_fn is None or filter_fn(name, m))
    ]
    for name, _ in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, MaskedReLU(granularity))
    seen: dict[int, int] = {}

    def on_module(mod, x):
        if isinstance(mod, MaskedReLU):
            seen[id(mod)] = seen.get(id(mod), 0) + 1

    spy = _run_with_spy(model, example, on_module)
    if spy.calls:
        raise ValueError(
            f"the model calls relu functionally at {spy.calls} place(s) (F.relu / torch.relu / .relu()); "
            "these cannot be masked: use nn.ReLU modules, one per call site"
        )
    if any(c > 1 for c in seen.values()):
        raise ValueError("a ReLU module is called more than once per forward pass; give each call its own")
    device = next((p.device for p in model.parameters()), example.device)
    for _, m in masked_relus(model):
        if m.mask is not None:
            m.mask = m.mask.to(device)
    return model


def count_relus(model: nn.Module, example: torch.Tensor) -> int:
    """Exact ReLUs per sample of one forward pass on ``example`` (forward hooks).

    ``nn.ReLU`` modules count every element of their input; :class:`MaskedReLU` counts the elements
    whose bit is 1; relu called functionally outside those modules counts every element too.
    """
    _check_example(example)
    total = 0

    def on_module(mod, x):
        nonlocal total
        per_sample = x.numel() // x.shape[0]
        if isinstance(mod, MaskedReLU):
            if mod.alpha is not None:
                raise ValueError("count_relus: a MaskedReLU still has SNL's continuous alpha; binarize it")
            total += int(mod.mask.sum().item()) * mod.cost
        else:
            total += per_sample

    spy = _run_with_spy(model, example, on_module)
    return total + spy.elements


def unit_costs(model: nn.Module) -> np.ndarray:
    """(U,) int64 ReLUs per unit of the flat mask."""
    parts = [np.full(m.mask.numel(), m.cost, np.int64) for _, m in masked_relus(model)]
    if not parts:
        raise ValueError("the model has no MaskedReLU: call linearize_ first")
    return np.concatenate(parts)


def flat_mask(model: nn.Module) -> np.ndarray:
    """(U,) bool: the concatenated binary masks."""
    mods = masked_relus(model)
    if not mods:
        raise ValueError("the model has no MaskedReLU: call linearize_ first")
    return np.concatenate([m.mask.detach().cpu().numpy().reshape(-1) > 0.5 for _, m in mods])


def set_flat_mask_(model: nn.Module, mask: np.ndarray) -> None:
    """Write a (U,) bool flat mask back into the model's masked ReLUs."""
    mods = masked_relus(model)
    mask = np.asarray(mask)
    total = sum(m.mask.numel() for _, m in mods)
    if mask.shape != (total,):
        raise ValueError(f"flat mask must have shape ({total},), got {mask.shape}")
    start = 0
    for _, m in mods:
        n = m.mask.numel()
        part = torch.from_numpy(mask[start : start + n].astype(np.float32)).view(m.mask.shape)
        m.mask = part.to(m.mask.device)
        start += n


def live_relus(model: nn.Module) -> int:
    """ReLUs still live in the masked ReLUs (binary masks)."""
    return int((flat_mask(model) * unit_costs(model)).sum())
