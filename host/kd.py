"""End-to-end knowledge distillation of a swapped model from its teacher, on unlabeled images.

This is the *optional* step after the label-free convex swap: every weight of the compressed model
(the student span and the teacher's other layers) is fine-tuned to match the teacher's softened
outputs (Hinton, Vinyals & Dean 2015):

    loss = T^2 * KL( softmax(t / T) || softmax(s / T) ),    T = temperature (4 by default)

averaged over the batch, where ``t`` and ``s`` are the teacher's and the student model's logits.
No label is read: the targets are the teacher's outputs on the same (augmented) images. The
model is kept in eval mode while training (BatchNorm keeps its running statistics; batches of a
low-sample regime are too small to re-estimate them). The result is reported as a separate row
(``convex+kd``), never mixed with the label-free activation-matching figures, because it changes
weights outside the replaced span.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.baselines import set_cosine_lr
from convexedge.host.data import random_crop_flip

__all__ = ["KDConfig", "KDResult", "kd_finetune", "kd_loss"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class KDConfig:
    """Settings of :func:`kd_finetune`."""

    temperature: float = 4.0
    epochs: int = 20  # upper bound; the time budget may end training first
    time_budget_s: float | None = None
    lr: float = 3e-4  # Adam, cosine to 0 over the epochs (or over the budget)
    weight_decay: float = 0.0
    batch_size: int = 64
    augment: bool = True  # random crop (4-pixel zero padding) and horizontal flip
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class KDResult:
    """What :func:`kd_finetune` returns: the fine-tuned copy (best held-out KD loss) and its trace."""

    model: nn.Module
    status: str  # "completed" | "time_budget"
    epochs: int
    steps: int
    seconds: float
    val_loss_before: float
    val_loss: float
    history: list[tuple[int, float, float]] = field(default_factory=list)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(t/T) || softmax(s/T))`` averaged over the batch; logits (B, C)."""
    t = temperature
    log_p_s = F.log_softmax(student_logits / t, dim=1)
    log_p_t = F.log_softmax(teacher_logits / t, dim=1)
    return (t * t) * F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


@torch.no_grad()
def _val_loss(model, teacher_logits: torch.Tensor, x: torch.Tensor, t: float, device: str) -> float:
    total = 0.0
    for s in range(0, x.shape[0], 256):
        total += float(kd_loss(model(x[s : s + 256].to(device)), teacher_logits[s : s + 256], t)) * min(
            256, x.shape[0] - s
        )
    return total / x.shape[0]


def kd_finetune(
    model: nn.Module,
    teacher: nn.Module,
    images: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    config: KDConfig = KDConfig(),
    *,
    val_images: np.ndarray | None = None,
) -> KDResult:
    """Fine-tune a copy of ``model`` end to end to the teacher's softened outputs (label-free).

    Args:
        model: the swapped (compressed) model; not modified (a deep copy is trained).
        teacher: the original model (frozen, eval mode).
        images: (N, H, W, 3) uint8 unlabeled training images.
        transform: uint8 batch -> the float32 NCHW batch both models expect.
        config: temperature, optimiser, budget.
        val_images: held-out unlabeled images; the weights with the lowest held-out KD loss are
            returned (the last ones without held-out images).

    Returns:
        :class:`KDResult`.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8 or not len(images):
        raise DataError(
            f"kd_finetune: expected (N, H, W, 3) uint8 images, got {getattr(images, 'shape', '?')}"
        )
    dev, t = config.device, config.temperature
    student = copy.deepcopy(model).to(dev).eval()
    teacher = teacher.to(dev).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    vx = vt = None
    if val_images is not None and len(val_images):
        vx = torch.from_numpy(transform(val_images))
        with torch.no_grad():
            vt = torch.cat([teacher(vx[s : s + 256].to(dev)) for s in range(0, len(vx), 256)])
    before = _val_loss(student, vt, vx, t, dev) if vx is not None else float("nan")
    best, best_state = before, copy.deepcopy(student.state_dict())
    history: list[tuple[int, float, float]] = [(0, float("nan"), before)]
    n, bs = images.shape[0], config.batch_size
    total = config.epochs * math.ceil(n / bs)
    status, steps, epoch = "completed", 0, 0
    t0 = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(n)
        run, seen = 0.0, 0
        for s in range(0, n, bs):
            idx = order[s : s + bs]
            xb = images[idx]
            if config.augment:
                xb = random_crop_flip(xb, rng)
            xt = torch.from_numpy(transform(xb)).to(dev)
            set_cosine_lr(opt, config.lr, t0, config.time_budget_s, steps, total)
            with torch.no_grad():
                target = teacher(xt)
            loss = kd_loss(student(xt), target, t)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            run += float(loss.detach()) * len(idx)
            seen += len(idx)
            if config.time_budget_s is not None and time.perf_counter() - t0 >= config.time_budget_s:
                status = "time_budget"
                break
        v = _val_loss(student, vt, vx, t, dev) if vx is not None else float("nan")
        history.append((epoch, run / max(seen, 1), v))
        if vx is None or v < best:
            best, best_state = v, copy.deepcopy(student.state_dict())
        log.info("kd epoch %d: train %.4f held-out %.4f", epoch, run / max(seen, 1), v)
        if status != "completed":
            break
    student.load_state_dict(best_state)
    return KDResult(
        model=student.eval(),
        status=status,
        epochs=epoch,
        steps=steps,
        seconds=time.perf_counter() - t0,
        val_loss_before=before,
        val_loss=best,
        history=history,
    )
