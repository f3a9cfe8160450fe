"""Shared training pieces of the linearization searches: data splits, KD loss, fine-tuning, compute.

Compute is counted in *sample passes*: a forward pass of one sample is 1, a training step on one
sample (forward + backward) is 3. Both searches charge every pass they make (teacher forwards for
distillation included) to a :class:`Ledger`, so "matched compute" is a comparison of two numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FinetuneConfig", "Ledger", "Split", "accuracy", "finetune_", "kd_loss"]


@dataclass(frozen=True)
class Split:
    """Tensors of one dataset split: ``x`` (N, ...) float32 model inputs, ``y`` (N,) int64 labels."""

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0] or self.x.shape[0] == 0:
            raise ValueError(
                f"split needs matching non-empty x and y, got {self.x.shape[0]} and {self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class Ledger:
    """Sample passes spent (forward = 1, train step = 3 per sample) and wall seconds."""

    forward: int = 0
    train: int = 0
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def units(self) -> int:
        return self.forward + 3 * self.train

    def to_json(self) -> dict:
        return {"forward": self.forward, "train": self.train, "units": self.units, "seconds": self.seconds}


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Weight fine-tuning with the masks fixed (the same for SNL and BCD).

    Loss: ``CE(y, s) + T^2 * KL(softmax(t/T) || softmax(s/T))`` (KD of Hinton et al., temperature T).
    ``schedule="cosine"`` anneals the weights' learning rate from ``lr`` to 0 over the run
    (Loshchilov & Hutter, SGDR, ICLR 2017, one cycle without restarts), so the weights at the end
    are not one noisy step of a constant-rate walk; SNL's mask scores (``extra_params``) keep ``lr``.
    """

    epochs: float = 1.0  # passes over the training split (fractions allowed)
    lr: float = 1e-3  # Adam
    batch_size: int = 128
    temperature: float = 4.0
    schedule: Literal["constant", "cosine"] = "constant"

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0:
            raise ValueError(f"FinetuneConfig: need epochs >= 0, lr > 0, batch_size >= 1, T > 0; got {self}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"FinetuneConfig: schedule is 'constant' or 'cosine', not {self.schedule!r}")


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, y: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Cross-entropy on labels plus ``T^2``-scaled KL divergence to the teacher's softened outputs."""
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1), log_target=True, reduction="batchmean"
    )
    return F.cross_entropy(student, y) + t * t * kl


@torch.no_grad()
def logits_of(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1000, ledger: Ledger | None = None
) -> torch.Tensor:
    """Eval-mode logits of ``model`` on ``x`` in batches."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    model.train(was)
    if ledger is not None:
        ledger.forward += int(x.shape[0])
    return out


def accuracy(model: nn.Module, split: Split, batch_size: int = 1000, ledger: Ledger | None = None) -> float:
    """Top-1 of ``model`` (eval mode) on ``split``."""
    logits = logits_of(model, split.x, batch_size, ledger)
    return float((logits.argmax(1) == split.y).float().mean())


def finetune_(
    model: nn.Module,
    teacher_logits: torch.Tensor,
    train: Split,
    config: FinetuneConfig,
    *,
    generator: torch.Generator,
    ledger: Ledger | None = None,
    extra_params: list[nn.Parameter] | None = None,
    extra_loss=None,
    on_epoch=None,
) -> None:
    """Train the weights of ``model`` in place by KD to ``teacher_logits`` (N, classes), masks fixed.

    ``extra_params`` / ``extra_loss`` let SNL train its mask scores in the same loop (the extra loss
    is a callable returning a scalar, added to every step). ``on_epoch(epoch) -> bool`` is called
    after each full epoch; returning True stops early. Data order comes from ``generator``.
    """
    params = [
        p
        for p in model.parameters()
        if p.requires_grad and (extra_params is None or all(p is not q for q in extra_params))
    ]
    groups = [{"params": params}]
    if extra_params:
        groups.append({"params": extra_params})
    opt = torch.optim.Adam(groups, lr=config.lr)
    n = len(train)
    steps = int(round(config.epochs * n / config.batch_size))
    per_epoch = max(1, -(-n // config.batch_size))
    model.train()
    step = 0
    epoch = 0
    while step < steps:
        order = torch.randperm(n, generator=generator)
        for i in range(per_epoch):
            if step >= steps:
                break
            idx = order[i * config.batch_size : (i + 1) * config.batch_size].to(train.x.device)
            out = model(train.x[idx])
            loss = kd_loss(out, teacher_logits[idx], train.y[idx], config.temperature)
            if extra_loss is not None:
                loss = loss + extra_loss()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.schedule == "cosine":
                opt.param_groups[0]["lr"] = 0.5 * config.lr * (1.0 + math.cos(math.pi * step / steps))
            opt.step()
            if extra_params:
                with torch.no_grad():
                    for p in extra_params:
                        p.clamp_(0.0, 1.0)
            if ledger is not None:
                ledger.train += int(idx.shape[0])
            step += 1
        epoch += 1
        if on_epoch is not None and step < steps and on_epoch(epoch):
            break
    model.eval()


def numpy_rng_state(rng: np.random.Generator) -> dict:
    """JSON-serialisable state of a numpy Generator (PCG64)."""
    return rng.bit_generator.state


def rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
