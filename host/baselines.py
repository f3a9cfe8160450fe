"""Comparison students for a span, all trained label-free on captured ``(input, output)`` activations.

Each student is an ``nn.Module`` with the span's input and output shapes, so it swaps in with
:func:`convexedge.host.swap.swapped` exactly like the convex :class:`GatedConvStudent`:

* :class:`BMConvStudent`: the conv Burer-Monteiro form of Varshney & Pilanci ("Convex
  Distillation"), ``CNN3_1x1(CNN2(z) * 1[CNN1(z) >= 0])``, with ``CNN1`` frozen (the gates, stored
  as buffers) and ``CNN2`` / ``CNN3`` trained with Adam. Departure (marked): the gate test is
  ``>= 0`` to match the convex student's masks, where the paper writes ``> 0``.
* :class:`ReluConvStudent`: a plain non-convex ``conv kxk -> ReLU -> conv 1x1`` student, sized with
  :func:`relu_hidden_for` to a target parameter count.
* :class:`PrunedSpan`: a copy of the teacher span, magnitude-pruned (global unstructured over its
  conv weights) to a target parameter count; the masks stay fixed while it is fine-tuned.

:func:`train_student` fits any of them (or any module) to the captured targets with Adam on
``1/2 mean ||student(z_in) - z_out||^2``; it reads activations only (no labels exist on this path),
keeps the best-so-far weights by held-out activation loss, honours a wall-time budget, and turns
``KeyboardInterrupt`` into ``status="interrupted"`` with the best model so far.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.students import ConvGeometry

__all__ = [
    "BMConvStudent",
    "PrunedSpan",
    "ReluConvStudent",
    "TrainConfig",
    "TrainResult",
    "bm_gates_for",
    "relu_hidden_for",
    "span_parameters",
    "train_student",
]

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- students
class BMConvStudent(nn.Module):
    """``conv1x1(conv_kxk(z) * 1[gate_kxk(z) >= 0])``, gates frozen: the conv Burer-Monteiro student.

    Args:
        G: (C*k*k + 1, P) fixed gates (last row = gate bias), the same layout as the convex
            student's, e.g. from :func:`convexedge.host.distill.make_gates`.
        geom: patch geometry of the gate and value convolutions.
        out_channels: channels of the span output.
        width: hidden channels per gate (``r``); ``CNN2`` has ``P * r`` output channels and hidden
            channel ``i * r + j`` is multiplied by gate ``i``.
        output_relu: apply a ReLU to the output (for spans whose output is post-ReLU).
        seed: seed of the initial weights of ``CNN2`` and ``CNN3``.

    Input (B, C, H, W) -> output (B, out_channels, H', W').
    """

    def __init__(
        self,
        G: np.ndarray | torch.Tensor,
        geom: ConvGeometry,
        out_channels: int,
        *,
        width: int = 1,
        output_relu: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        G = torch.as_tensor(np.asarray(G) if not isinstance(G, torch.Tensor) else G).float()
        if G.ndim != 2 or G.shape[0] != geom.d:
            raise ValueError(f"expected gates G ({geom.d}, P), got {tuple(G.shape)}")
        if width < 1 or out_channels < 1:
            raise ValueError(f"width and out_channels must be >= 1, got {width}, {out_channels}")
        P, k, cin = G.shape[1], geom.kernel_size, geom.in_channels
        self.geom, self.width, self.output_relu = geom, width, output_relu
        self.num_gates, self.out_channels = P, out_channels
        self.register_buffer("gate_weight", G[:-1].T.reshape(P, cin, k, k).contiguous())
        self.register_buffer("gate_bias", G[-1].contiguous())
        gen = torch.Generator().manual_seed(seed)
        fan_in = cin * k * k
        self.value_weight = nn.Parameter(torch.randn(P * width, cin, k, k, generator=gen) / math.sqrt(fan_in))
        self.value_bias = nn.Parameter(torch.zeros(P * width))
        self.out_weight = nn.Parameter(
            torch.randn(out_channels, P * width, 1, 1, generator=gen) / math.sqrt(P * width)
        )
        self.out_bias = nn.Parameter(torch.zeros(out_channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.geom
        masks = F.conv2d(z, self.gate_weight, self.gate_bias, g.stride, g.padding) >= 0
        h = F.conv2d(z, self.value_weight, self.value_bias, g.stride, g.padding)
        h = h * masks.repeat_interleave(self.width, dim=1)
        out = F.conv2d(h, self.out_weight, self.out_bias)
        return out.clamp_min(0) if self.output_relu else out

    def num_parameters(self, *, count_gates: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n + (self.gate_weight.numel() + self.gate_bias.numel() if count_gates else 0)

    def macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates per sample: gate conv, value conv, 1x1 output conv."""
        h, w = self.geom.out_hw(*in_hw)
        patch = self.geom.d - 1
        hidden = self.num_gates * self.width
        return h * w * (patch * (self.num_gates + hidden) + hidden * self.out_channels)


class ReluConvStudent(nn.Module):
    """``conv1x1(relu(conv_kxk(z)))`` (+ output ReLU): the non-convex student of chosen width.

    Input (B, C, H, W) -> output (B, out_channels, H', W').
    """

    def __init__(
        self, geom: ConvGeometry, out_channels: int, hidden: int, *, output_relu: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        if hidden < 1 or out_channels < 1:
            raise ValueError(f"hidden and out_channels must be >= 1, got {hidden}, {out_channels}")
        gen = torch.Generator().manual_seed(seed)
        k, cin = geom.kernel_size, geom.in_channels
        self.geom, self.hidden, self.out_channels, self.output_relu = geom, hidden, out_channels, output_relu
        # He initialisation for the ReLU layer, 1/sqrt(fan_in) for the linear read-out.
        self.weight1 = nn.Parameter(
            torch.randn(hidden, cin, k, k, generator=gen) * math.sqrt(2.0 / (cin * k * k))
        )
        self.bias1 = nn.Parameter(torch.zeros(hidden))
        self.weight2 = nn.Parameter(
            torch.randn(out_channels, hidden, 1, 1, generator=gen) / math.sqrt(hidden)
        )
        self.bias2 = nn.Parameter(torch.zeros(out_channels))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.geom
        h = F.relu(F.conv2d(z, self.weight1, self.bias1, g.stride, g.padding))
        out = F.conv2d(h, self.weight2, self.bias2)
        return out.clamp_min(0) if self.output_relu else out

    def num_parameters(self, *, count_gates: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def macs(self, in_hw: tuple[int, int]) -> int:
        h, w = self.geom.out_hw(*in_hw)
        return h * w * self.hidden * ((self.geom.d - 1) + self.out_channels)


def relu_hidden_for(params: int, geom: ConvGeometry, out_channels: int) -> int:
    """Largest hidden width of a :class:`ReluConvStudent` with at most ``params`` parameters (>= 1)."""
    return max(1, (params - out_channels) // (geom.d + out_channels))


def bm_gates_for(params: int, geom: ConvGeometry, out_channels: int, *, width: int = 1) -> int:
    """Largest gate count ``P`` of a :class:`BMConvStudent` with at most ``params`` parameters, gates
    counted (>= 1)."""
    per_gate = geom.d + width * (geom.d + out_channels)
    return max(1, (params - out_channels) // per_gate)


class PrunedSpan(nn.Module):
    """A copy of ``span`` with its conv / linear weights magnitude-pruned to at most ``params`` parameters.

    Global unstructured pruning: the weights of every ``Conv2d`` / ``Linear`` compete on ``|w|``;
    the largest survive so that the remaining parameters (surviving weights + every other
    parameter such as BatchNorm affine terms) do not exceed ``params``. The masks are buffers and
    are re-applied after every optimiser step by :func:`train_student` (via :meth:`apply_masks_`).

    Raises:
        ValueError: ``params`` is below the span's unprunable parameters.
    """

    def __init__(self, span: nn.Module, params: int) -> None:
        super().__init__()
        self.span = copy.deepcopy(span)
        prunable = [m for m in self.span.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        fixed = sum(p.numel() for p in self.span.parameters()) - sum(m.weight.numel() for m in prunable)
        budget = params - fixed
        if budget < 1:
            raise ValueError(
                f"params={params} leaves no weights: the span has {fixed} parameters outside its "
                "conv/linear weights; ask for more parameters"
            )
        flat = torch.cat([m.weight.detach().abs().flatten() for m in prunable])
        keep = min(budget, flat.numel())
        # threshold at the keep-th largest magnitude; ties broken by order (stable top-k).
        top = torch.topk(flat, keep, sorted=False).indices
        keep_mask = torch.zeros_like(flat, dtype=torch.bool)
        keep_mask[top] = True
        self._targets = prunable
        start = 0
        for i, m in enumerate(prunable):
            n = m.weight.numel()
            self.register_buffer(f"mask{i}", keep_mask[start : start + n].view_as(m.weight).clone())
            start += n
        self.apply_masks_()

    def masks(self) -> list[torch.Tensor]:
        return [getattr(self, f"mask{i}") for i in range(len(self._targets))]

    @torch.no_grad()
    def apply_masks_(self) -> None:
        for m, mask in zip(self._targets, self.masks(), strict=True):
            m.weight.mul_(mask)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.span(z)

    def num_parameters(self, *, count_gates: bool = True) -> int:
        """Surviving weights plus every non-prunable parameter."""
        dense = sum(p.numel() for p in self.span.parameters())
        return dense - sum(int((~mask).sum()) for mask in self.masks())

    def macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates of the surviving weights only (what a sparse kernel would execute)."""
        total = 0
        hooks = []

        def hook(m: nn.Module, _inp: tuple, out: torch.Tensor) -> None:
            nonlocal total
            mask = self.masks()[self._targets.index(m)]
            if isinstance(m, nn.Conv2d):
                total += int(out[0, 0].numel()) * int(mask.sum())
            else:
                total += int(mask.sum())

        for m in self._targets:
            hooks.append(m.register_forward_hook(hook))
        try:
            p = next(self.parameters())
            x = torch.zeros(1, self._in_channels(), *in_hw, device=p.device)
            with torch.no_grad():
                self.span.eval()(x)
        finally:
            for h in hooks:
                h.remove()
        return total

    def _in_channels(self) -> int:
        first = self._targets[0]
        return first.in_channels if isinstance(first, nn.Conv2d) else first.in_features


def span_parameters(module: nn.Module, *, count_gates: bool = True) -> int:
    """Parameters of a student or span: its own ``num_parameters`` when it has one (gated students
    count their gates, :class:`PrunedSpan` its surviving weights), else every parameter."""
    if hasattr(module, "num_parameters"):
        return int(module.num_parameters(count_gates=count_gates))
    return sum(p.numel() for p in module.parameters())


# --------------------------------------------------------------------------------- training
@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Adam training of a student on captured activations."""

    epochs: int = 200  # upper bound; the time budget usually ends training first
    time_budget_s: float | None = None  # wall-clock budget (e.g. the convex solve's seconds)
    lr: float = 3e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"  # cosine over epochs (or over the budget)
    batch_size: int = 64  # images per step
    weight_decay: float = 0.0
    seed: int = 0  # batch order
    eval_every: int = 1  # epochs between held-out evaluations
    progress: bool = True
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1:
            raise ValueError(
                f"epochs, batch_size and eval_every must be >= 1, got {self.epochs}, "
                f"{self.batch_size}, {self.eval_every}"
            )
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    """What :func:`train_student` returns.

    Attributes:
        module: the student holding the best weights seen (by held-out loss when given).
        status: ``"completed"`` (all epochs), ``"time_budget"`` or ``"interrupted"``.
        epochs: epochs run (a partial last epoch counts).
        steps: optimiser steps.
        seconds: wall-clock training time.
        train_loss: ``1/2 mean ||pred - target||^2`` over the last epoch's batches.
        val_loss: held-out loss of the returned weights (``nan`` without held-out data).
        history: ``(epoch, train_loss, val_loss)`` per evaluation.
    """

    module: nn.Module
    status: str
    epochs: int
    steps: int
    seconds: float
    train_loss: float
    val_loss: float
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _as_float_tensor(a: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if not t.is_floating_point():
        raise DataError(f"{name} must be floating point activations, got {t.dtype}")
    return t.float()


@torch.no_grad()
def _loss(module: nn.Module, z_in: torch.Tensor, z_out: torch.Tensor, batch: int, device: str) -> float:
    total = 0.0
    for s in range(0, z_in.shape[0], batch):
        pred = module(z_in[s : s + batch].to(device))
        total += float(((pred - z_out[s : s + batch].to(device)) ** 2).sum())
    return total / (2 * z_in.shape[0] * int(np.prod(z_out.shape[1:])))


def set_cosine_lr(
    opt: torch.optim.Optimizer, lr: float, t0: float, time_budget_s: float | None, step: int, total: int
) -> None:
    """Cosine decay from ``lr`` to 0 over the time budget (when set, from ``t0``) or over ``total`` steps."""
    if time_budget_s is not None:
        frac = min(1.0, (time.perf_counter() - t0) / time_budget_s)
    else:
        frac = step / max(1, total)
    for grp in opt.param_groups:
        grp["lr"] = lr * 0.5 * (1 + math.cos(math.pi * frac))


def train_student(
    student: nn.Module,
    z_in: np.ndarray | torch.Tensor,
    z_out: np.ndarray | torch.Tensor,
    config: TrainConfig = TrainConfig(),
    *,
    val: tuple[np.ndarray | torch.Tensor, np.ndarray | torch.Tensor] | None = None,
) -> TrainResult:
    """Fit ``student`` to ``z_out`` from ``z_in`` with Adam on ``1/2 mean ||student(z_in) - z_out||^2``.

    Label-free: only activations are read. Modules with ``apply_masks_`` (:class:`PrunedSpan`) get
    their masks re-applied after each step; BatchNorm layers stay in eval mode (their running
    statistics are the teacher's and are not updated), so the student's forward is the same in
    training and at evaluation.

    Args:
        student: module mapping (B, C, H, W) -> (B, c, H', W'); trained in place, and the best
            weights are loaded back into it before returning.
        z_in: (N, C, H, W) captured span inputs.
        z_out: (N, c, H', W') captured span outputs.
        config: optimiser, budget, seed.
        val: held-out ``(z_in, z_out)`` for best-so-far selection (recommended).

    Returns:
        :class:`TrainResult`; ``status="interrupted"`` on ``KeyboardInterrupt`` (best model so far).

    Raises:
        DataError: non-float activations, mismatched counts or a student whose output shape is
            not that of ``z_out``.

    Example:
        >>> student = ReluConvStudent(geom, 64, 32)  # doctest: +SKIP
        >>> res = train_student(student, z_in, z_out, val=(v_in, v_out))  # doctest: +SKIP
    """
    zi, zo = _as_float_tensor(z_in, "z_in"), _as_float_tensor(z_out, "z_out")
    if zi.shape[0] != zo.shape[0] or zi.shape[0] == 0:
        raise DataError(f"need as many inputs as outputs (>0), got {zi.shape[0]} and {zo.shape[0]}")
    vi = vo = None
    if val is not None:
        vi, vo = _as_float_tensor(val[0], "val inputs"), _as_float_tensor(val[1], "val outputs")
        if vi.shape[0] != vo.shape[0] or vi.shape[1:] != zi.shape[1:] or vo.shape[1:] != zo.shape[1:]:
            raise DataError(
                f"held-out activations {tuple(vi.shape)} -> {tuple(vo.shape)} do not match the "
                f"training ones {tuple(zi.shape)} -> {tuple(zo.shape)}"
            )
    dev = config.device
    student.to(dev)
    with torch.no_grad():
        probe = student.eval()(zi[:1].to(dev))
    if tuple(probe.shape[1:]) != tuple(zo.shape[1:]):
        raise DataError(
            f"the student maps {tuple(zi.shape[1:])} to {tuple(probe.shape[1:])}, the targets are "
            f"{tuple(zo.shape[1:])}"
        )
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    gen = torch.Generator().manual_seed(config.seed)
    n, bs = zi.shape[0], config.batch_size
    steps_per_epoch = math.ceil(n / bs)
    total_steps = config.epochs * steps_per_epoch
    mask_fn = getattr(student, "apply_masks_", None)

    def evaluate() -> float:
        student.eval()
        if vi is None:
            return _loss(student, zi, zo, 512, dev)
        return _loss(student, vi, vo, 512, dev)

    best_state = copy.deepcopy(student.state_dict())
    best_val = evaluate()
    history: list[tuple[int, float, float]] = [(0, float("nan"), best_val)]
    status, epoch, steps, train_loss = "completed", 0, 0, float("nan")
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    bar = tqdm(total=config.epochs, desc=type(student).__name__, unit="ep", disable=not config.progress)
    try:
        for epoch in range(1, config.epochs + 1):
            student.eval()  # BatchNorm keeps the teacher's statistics; no dropout in these students
            order = torch.randperm(n, generator=gen)
            run, seen = 0.0, 0
            for s in range(0, n, bs):
                if config.lr_schedule == "cosine":
                    set_cosine_lr(opt, config.lr, t0, config.time_budget_s, steps, total_steps)
                idx = order[s : s + bs]
                xb, yb = zi[idx].to(dev), zo[idx].to(dev)
                loss = 0.5 * ((student(xb) - yb) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if mask_fn is not None:
                    mask_fn()
                steps += 1
                run += float(loss.detach()) * idx.numel()
                seen += idx.numel()
                if config.time_budget_s is not None and time.perf_counter() - t0 >= config.time_budget_s:
                    status = "time_budget"
                    break
            train_loss = run / max(seen, 1)
            if epoch % config.eval_every == 0 or status != "completed" or epoch == config.epochs:
                v = evaluate()
                history.append((epoch, train_loss, v))
                if v < best_val:
                    best_val, best_state = v, copy.deepcopy(student.state_dict())
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{best_val:.4g}", refresh=False)
            if status != "completed":
                break
    except KeyboardInterrupt:
        status = "interrupted"
        log.warning(
            "training of %s interrupted after %d steps; returning the best model so far",
            type(student).__name__,
            steps,
        )
    finally:
        bar.close()
    student.load_state_dict(best_state)
    student.eval()
    return TrainResult(
        module=student,
        status=status,
        epochs=epoch,
        steps=steps,
        seconds=time.perf_counter() - t0,
        train_loss=train_loss,
        val_loss=best_val if vi is not None else float("nan"),
        history=history,
    )
