"""Train the CIFAR-stem ResNet-18 teacher with one fixed recipe (CPU-sized).

Recipe (:class:`TrainRecipe` defaults; written into the weights manifest):

* data: the exact CIFAR-10 training images 0..3999 (``shared/data/cifar10-exact``) plus the
  JPEG-decoded training images of ``shared/data/cifar10`` whose original index is not in 0..3999
  (those 4,000 would duplicate the exact ones): 13,000 distinct labelled images;
* SGD, momentum 0.9 (Nesterov), weight decay 5e-4 on conv/linear weights only, batch 128;
* learning rate: linear warm-up over the first 10 steps to 0.05, then cosine to 0 over 100 steps
  in all (12,800 samples, about one epoch: about 35 minutes of one idle CPU core, 20 s per step);
* initialisation: torchvision's, with the last BatchNorm scale of every residual block set to 0
  (each block starts as the identity). A first run with peak 0.1, a 5-step warm-up and the plain
  initialisation collapsed to chance-level loss (2.3) by step 11 and stayed there for 40 steps;
* augmentation: random crop 32 from the 4-pixel zero-padded image and horizontal flip, per sample;
* seed 0 for the initialisation, the data order and the augmentation; one torch thread.

This is a short schedule; the teacher it gives is far from a converged ResNet-18 (about 95% on
CIFAR-10). The manifest records its measured top-1 on the exact test images 0..999; the
distillation benchmark measures it on the 10,000 JPEG-decoded test images.

Run: ``python -m convexedge.models.train_resnet18 [--weights W.npz --manifest W.json] [--steps 100]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convexedge.host.data import normalize_images, random_crop_flip
from convexedge.host.evaluate import predict_logits, top1
from convexedge.models.resnet18_cifar import (
    RESNET18_MANIFEST,
    RESNET18_WEIGHTS,
    resnet18_cifar,
    save_resnet18,
)

__all__ = ["TrainRecipe", "load_training_images", "train_resnet18"]

log = logging.getLogger(__name__)
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]


@dataclass(frozen=True, kw_only=True)
class TrainRecipe:
    """The fixed training recipe; change it only with a note in the manifest."""

    steps: int = 100
    batch_size: int = 128
    lr: float = 0.05
    warmup_steps: int = 10
    momentum: float = 0.9
    weight_decay: float = 5e-4
    pad: int = 4  # zero padding before the random 32x32 crop
    seed: int = 0
    threads: int = 1

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if not (0 <= self.warmup_steps < self.steps):
            raise ValueError(f"warmup_steps must lie in 0..steps-1, got {self.warmup_steps}")
        if self.lr <= 0 or not (0 <= self.momentum < 1) or self.weight_decay < 0:
            raise ValueError("lr must be > 0, momentum in [0, 1), weight_decay >= 0")

    def lr_at(self, step: int) -> float:
        """Learning rate of step ``step`` (0-based): linear warm-up, then cosine to 0."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
        return 0.5 * self.lr * (1.0 + math.cos(math.pi * t))


def load_training_images(shared: Path = SHARED) -> tuple[np.ndarray, np.ndarray]:
    """(13000, 32, 32, 3) uint8 images and their labels: exact 0..3999 + non-overlapping JPEG ones."""
    with np.load(shared / "cifar10-exact" / "train_0000_3999.npz", allow_pickle=False) as npz:
        xs, ys = [npz["x"]], [npz["y"].astype(np.int64)]
    for path in sorted((shared / "cifar10").glob("train_*.npz")):
        with np.load(path, allow_pickle=False) as npz:
            keep = ~((npz["orig_index"] >= 0) & (npz["orig_index"] < 4000))
            xs.append(npz["x"][keep])
            ys.append(npz["y"][keep].astype(np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _to_tensor(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(normalize_images(x, MEAN, STD))


def _top1(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    return top1(predict_logits(model, x, lambda b: normalize_images(b, MEAN, STD), batch_size=250), y)


def train_resnet18(
    recipe: TrainRecipe, x: np.ndarray, y: np.ndarray, *, log_every: int = 10
) -> tuple[nn.Module, list[dict]]:
    """Train a fresh :func:`resnet18_cifar` on ``x`` (N, 32, 32, 3) uint8 / ``y`` (N,) with ``recipe``."""
    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    model = resnet18_cifar(10)
    for block in (b for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for b in layer):
        nn.init.zeros_(block.bn2.weight)  # each residual block starts as the identity
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )
    order = np.empty(0, np.int64)
    history: list[dict] = []
    t0 = time.perf_counter()
    model.train()
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            order = np.concatenate([order, rng.permutation(len(x))])
        idx, order = order[: recipe.batch_size], order[recipe.batch_size :]
        xb = _to_tensor(random_crop_flip(x[idx], rng, recipe.pad))
        yb = torch.from_numpy(y[idx])
        for group in opt.param_groups:
            group["lr"] = recipe.lr_at(step)
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % log_every == 0 or step == recipe.steps - 1:
            rec = {
                "step": step,
                "loss": loss.item(),
                "lr": recipe.lr_at(step),
                "seconds": time.perf_counter() - t0,
            }
            history.append(rec)
            log.info(
                "step %d/%d loss %.3f lr %.4f %.0fs",
                step + 1,
                recipe.steps,
                rec["loss"],
                rec["lr"],
                rec["seconds"],
            )
    return model.eval(), history


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", type=Path, default=RESNET18_WEIGHTS)
    p.add_argument("--manifest", type=Path, default=RESNET18_MANIFEST)
    p.add_argument("--shared", type=Path, default=SHARED, help="the shared/data folder")
    p.add_argument("--steps", type=int, default=TrainRecipe.steps)
    p.add_argument("--batch-size", type=int, default=TrainRecipe.batch_size)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only (smoke test)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    warm = min(TrainRecipe.warmup_steps, max(0, args.steps - 1))
    recipe = TrainRecipe(
        steps=args.steps, batch_size=args.batch_size, threads=args.threads, warmup_steps=warm
    )
    x, y = load_training_images(args.shared)
    if args.limit:
        x, y = x[: args.limit], y[: args.limit]
    log.info("training on %d images, recipe %s", len(x), asdict(recipe))
    t0 = time.perf_counter()
    model, history = train_resnet18(recipe, x, y)
    seconds = time.perf_counter() - t0
    with np.load(args.shared / "cifar10-exact" / "test_0000_0999.npz", allow_pickle=False) as npz:
        acc = _top1(model, npz["x"], npz["y"].astype(np.int64))
    log.info("top-1 on the exact test images 0..999: %.4f (%.0f s of training)", acc, seconds)
    extra = {
        "source": "trained here by convexedge.models.train_resnet18 (fixed recipe)",
        "recipe": asdict(recipe),
        "train_images": int(len(x)),
        "train_seconds": round(seconds, 1),
        "top1_exact1k": acc,
        "history": history,
        "torch": torch.__version__,
    }
    model = model.eval()
    manifest = save_resnet18(model, args.weights, args.manifest, mean=MEAN, std=STD, extra=extra)
    print(json.dumps({k: manifest[k] for k in ("train_images", "train_seconds", "top1_exact1k")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
