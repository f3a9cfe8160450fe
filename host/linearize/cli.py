"""``convexedge linearize``: cut a model's ReLUs to a budget (SNL, or BCD warm-started from SNL).

Writes to the output folder: ``linearized.npz`` (weights and masks, no pickle), ``model.onnx``
(masks as constants), ``report.json`` (budget, ReLUs counted and read back from the ONNX graph,
top-1, compute, config), ``accuracy_vs_relus.png`` (BCD) and ``checkpoint/`` (BCD state: rerun
the same command to resume).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from convexedge.device.errors import ArtifactError
from convexedge.host.linearize.bcd import BcdConfig, bcd_linearize
from convexedge.host.linearize.export import count_onnx_relus, export_linearized_onnx
from convexedge.host.linearize.masks import count_relus, linearize_
from convexedge.host.linearize.pipeline import plot_histories
from convexedge.host.linearize.snl import SnlConfig, apply_snapshot_, snl_path
from convexedge.host.linearize.train import FinetuneConfig, Ledger, Split, accuracy, finetune_, logits_of

__all__ = ["LinearizeOptions", "run_linearize"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LinearizeOptions:
    """Options of ``convexedge linearize``."""

    budget: int
    method: Literal["snl", "bcd"] = "bcd"
    dataset: Literal["cifar10", "mnist1d"] = "cifar10"
    out: str = "convexedge-linearize"
    data: str | None = None  # CIFAR-10 folder of train_*/test_*.npz (default: the bundled slice)
    train_images: int | None = None  # CIFAR-10 training images (default: all, less the validation ones)
    val_images: int = 500
    granularity: Literal["pixel", "channel"] = "pixel"
    seed: int = 0
    snl_epochs: int = 150
    snl_alpha_lr: float | None = None
    finetune_epochs: float = 5.0
    warm_factor: float = 2.0
    drc: int = 16
    rt: int = 8
    adt: float = 0.01
    progress: bool = True

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise ValueError(f"--budget must be a positive ReLU count, got {self.budget}")
        if self.method not in ("snl", "bcd") or self.dataset not in ("cifar10", "mnist1d"):
            raise ValueError(f"unknown method {self.method!r} or dataset {self.dataset!r}")
        if self.warm_factor < 1:
            raise ValueError(f"--warm-factor must be >= 1, got {self.warm_factor}")


def _load(opts: LinearizeOptions):
    if opts.dataset == "mnist1d":
        from convexedge.host.linearize.mnist1d import ResNet1d, load_mnist1d, train_classifier

        train, val, test = load_mnist1d(opts.val_images)
        torch.manual_seed(opts.seed)
        return train_classifier(ResNet1d(), train, epochs=20, seed=opts.seed), train, val, test
    from convexedge.host.data import load_images, normalize_images
    from convexedge.models.bundled import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

    mean, std = teacher_normalization()
    folder = opts.data or BUNDLED_DATA_DIR
    limit = None if opts.train_images is None else opts.train_images + opts.val_images
    tr = load_images(folder, "train", limit=limit)
    te = load_images(folder, "test")
    if len(tr) <= opts.val_images:
        raise ValueError(
            f"{folder} holds {len(tr)} training images, fewer than --val-images {opts.val_images} + 1"
        )

    def split(x, y):
        return Split(torch.from_numpy(normalize_images(x, mean, std)), torch.from_numpy(y))

    n = len(tr) - opts.val_images
    return load_teacher(), split(tr.x[:n], tr.y[:n]), split(tr.x[n:], tr.y[n:]), split(te.x, te.y)


def run_linearize(opts: LinearizeOptions) -> dict:
    """Linearize, fine-tune, export, check the ONNX ReLU count, and write the report; returns it."""
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    teacher, train, val, test = _load(opts)
    example = train.x[:2]
    model = linearize_(teacher, example, granularity=opts.granularity)
    full = count_relus(model, example)
    if opts.budget >= full:
        raise ValueError(f"--budget {opts.budget} is not below the model's {full} ReLUs")
    teacher_top1 = accuracy(model, test)
    teacher_logits = logits_of(model, train.x)
    ledger = Ledger(forward=len(train))
    warm = min(full, int(round(opts.budget * opts.warm_factor))) if opts.method == "bcd" else opts.budget
    resuming = opts.method == "bcd" and (out / "checkpoint" / "bcd_state.json").exists()
    if resuming:  # weights, mask and compute so far come from the checkpoint
        log.info("resuming BCD from %s (skipping the SNL warm start)", out / "checkpoint")
    else:
        snl_cfg = SnlConfig(max_epochs=opts.snl_epochs, alpha_lr=opts.snl_alpha_lr)
        snap = snl_path(
            model,
            teacher_logits,
            train,
            [warm],
            snl_cfg,
            seed=opts.seed,
            ledger=ledger,
            progress=opts.progress,
        )
        apply_snapshot_(model, snap[warm], warm)
    ft = FinetuneConfig(epochs=opts.finetune_epochs)
    report: dict = {"options": asdict(opts), "relus_before": full, "teacher_top1": teacher_top1}
    if opts.method == "bcd":
        cfg = BcdConfig(budget=opts.budget, drc=opts.drc, rt=opts.rt, adt=opts.adt, seed=opts.seed)
        res = bcd_linearize(
            model,
            teacher_logits,
            train,
            val,
            cfg,
            checkpoint=out / "checkpoint",
            ledger=ledger,
            progress=opts.progress,
        )
        plot_histories({f"BCD to {opts.budget}": res.history}, out / "accuracy_vs_relus.png", "BCD")
        report["bcd"] = {
            "finetune_rounds": res.finetune_rounds,
            "forced": res.forced,
            "val_top1": res.val_accuracy,
        }
    finetune_(
        model,
        teacher_logits,
        train,
        ft,
        generator=torch.Generator().manual_seed(opts.seed + 7),
        ledger=ledger,
    )
    counted = count_relus(model, example)
    onnx_path = export_linearized_onnx(model, out / "model.onnx", tuple(train.x.shape[1:]))
    in_onnx, other = count_onnx_relus(onnx_path)
    if in_onnx != opts.budget or counted != opts.budget:
        raise ArtifactError(
            f"ReLU count check failed: budget {opts.budget}, counted {counted}, in ONNX {in_onnx}"
        )
    np.savez(out / "linearized.npz", **{k: v.detach().cpu().numpy() for k, v in model.state_dict().items()})
    report.update(
        relus_counted=counted,
        relus_in_onnx=in_onnx,
        onnx_other_relu_like_ops=other,
        top1=accuracy(model, test),
        compute=ledger.to_json(),
        seconds=time.perf_counter() - t0,
    )
    (out / "report.json").write_text(json.dumps(report, indent=1, default=float))
    print(
        json.dumps(
            {k: report[k] for k in ("relus_before", "relus_in_onnx", "teacher_top1", "top1", "seconds")}
        )
    )
    return report
