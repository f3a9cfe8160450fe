"""SNL vs BCD at a list of ReLU budgets, at matched compute, with ONNX read-back; and the plot.

For each budget ``B`` (one shared SNL L1 path, see :mod:`.snl`):

* **SNL**: the path's snapshot at ``B``, binarized to ``B`` ReLUs, then fine-tuned.
* **BCD**: the path's snapshot at ``warm_factor * B`` binarized there and fine-tuned for
  ``bcd.warm_finetune`` epochs (SNL's own solution at the larger budget: the bare thresholded
  snapshot is near chance), BCD down to ``B``, then the same fine-tuning. BCD gets the warm
  snapshot's SNL scores as its sampling prior (used when ``bcd.prior_temperature`` is set) and, with
  ``bcd.select="kd"``, the teacher's validation logits (their forward pass charged to BCD).

Compute is matched in sample passes (:class:`~.train.Ledger`): the SNL path up to where each
method leaves it, BCD's warm fine-tune, candidate evaluations and fine-tune rounds are all charged,
and whichever method spent less gets the difference as extra final fine-tuning epochs. Both are
then exported to ONNX and the ReLUs in the graph are counted and checked against ``B``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from convexedge.host.linearize.bcd import BcdConfig, bcd_linearize
from convexedge.host.linearize.export import count_onnx_relus, export_linearized_onnx
from convexedge.host.linearize.masks import count_relus, linearize_
from convexedge.host.linearize.snl import SnlConfig, apply_snapshot_, snl_path
from convexedge.host.linearize.train import FinetuneConfig, Ledger, Split, accuracy, finetune_, logits_of

__all__ = ["CompareConfig", "compare_methods", "plot_histories"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Settings of one SNL-vs-BCD comparison."""

    budgets: tuple[int, ...]
    snl: SnlConfig = field(default_factory=SnlConfig)
    bcd: BcdConfig = field(default_factory=lambda: BcdConfig(budget=0))  # its budget is replaced per run
    final_finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=5.0))
    warm_factor: float = 2.0  # BCD starts from SNL's solution at this multiple of the budget
    match_compute: bool = True
    bcd_steps: int | None = None  # when set, each budget's block size is (warm - budget) / bcd_steps
    granularity: str = "pixel"

    def __post_init__(self) -> None:
        if not self.budgets or any(b < 1 for b in self.budgets):
            raise ValueError(f"budgets must be positive ReLU counts, got {self.budgets}")
        if self.warm_factor < 1:
            raise ValueError(f"warm_factor must be >= 1, got {self.warm_factor}")


def _final(
    model, teacher_logits, train, test, ft, seed, ledger, extra_units, input_shape, example, out_dir, tag
):
    epochs = ft.epochs + extra_units / (3 * len(train))
    cfg = dataclasses.replace(ft, epochs=epochs)
    finetune_(
        model, teacher_logits, train, cfg, generator=torch.Generator().manual_seed(seed + 7), ledger=ledger
    )
    top1 = accuracy(model, test)
    path = export_linearized_onnx(model, Path(out_dir) / f"{tag}.onnx", input_shape)
    in_onnx, other = count_onnx_relus(path)
    return top1, in_onnx, other, count_relus(model, example), epochs


def compare_methods(
    teacher: nn.Module,
    train: Split,
    val: Split,
    test: Split,
    config: CompareConfig,
    *,
    seed: int = 0,
    dataset: str = "",
    out_dir: str | Path | None = None,
    progress: bool = False,
    path_cache: dict | None = None,
) -> tuple[list[dict], dict]:
    """Run SNL and BCD at every budget of ``config``; the teacher is not modified.

    ``path_cache``: a dict that keeps the SNL path between calls on the same teacher, data, seed and
    SNL config (a hyper-parameter sweep of BCD reuses one path; the compute charged is unchanged).

    Returns:
        ``(rows, histories)``: one row per (method, budget) with ``dataset, method, budget,
        relus_in_onnx, relus_counted, top1, seconds, seed, compute_units`` and details; and the BCD
        accuracy-vs-ReLU histories per budget (for :func:`plot_histories`).
    """
    torch.manual_seed(seed)
    input_shape = tuple(train.x.shape[1:])
    example = train.x[:2]
    base = linearize_(copy.deepcopy(teacher).eval(), example, granularity=config.granularity)
    full = count_relus(base, example)
    teacher_logits = logits_of(teacher, train.x)
    warm = {b: min(full, int(round(b * config.warm_factor))) for b in config.budgets}
    path_budgets = sorted(set(config.budgets) | set(warm.values()), reverse=True)
    key = (seed, config.snl, config.granularity, tuple(path_budgets))
    if path_cache is not None and key in path_cache:
        snaps, ledger, path_seconds = path_cache[key]
    else:
        ledger = Ledger(forward=len(train))  # the teacher's logits, charged to both
        t0 = time.perf_counter()
        snaps = snl_path(
            copy.deepcopy(base),
            teacher_logits,
            train,
            path_budgets,
            config.snl,
            seed=seed,
            ledger=ledger,
            progress=progress,
        )
        path_seconds = time.perf_counter() - t0
        if path_cache is not None:
            path_cache[key] = (snaps, ledger, path_seconds)
    rows, histories = [], {}
    tmp = tempfile.TemporaryDirectory() if out_dir is None else None
    onnx_dir = Path(tmp.name if tmp else out_dir)
    try:
        for b in sorted(config.budgets, reverse=True):
            # BCD from the warm snapshot
            t1 = time.perf_counter()
            snap_w = snaps[warm[b]]
            model_b = copy.deepcopy(base)
            apply_snapshot_(model_b, snap_w, warm[b])
            led_b = copy.deepcopy(snap_w.ledger)
            drc = config.bcd.drc
            if config.bcd_steps is not None:
                drc = max(1, -(-(warm[b] - b) // config.bcd_steps))
            bcd_cfg = BcdConfig(**{**config.bcd.__dict__, "budget": b, "seed": seed, "drc": drc})
            val_teacher = None
            if bcd_cfg.select == "kd":  # the teacher's outputs on the validation split, charged to BCD
                val_teacher = logits_of(teacher, val.x, ledger=led_b)
            res = bcd_linearize(
                model_b,
                teacher_logits,
                train,
                val,
                bcd_cfg,
                ledger=led_b,
                progress=progress,
                val_teacher_logits=val_teacher,
                prior=snap_w.scores,
            )
            histories[b] = res.history
            bcd_search_s = (
                time.perf_counter() - t1 + path_seconds * snap_w.ledger.units / max(1, ledger.units)
            )
            # SNL at b
            model_s = copy.deepcopy(base)
            apply_snapshot_(model_s, snaps[b], b)
            led_s = copy.deepcopy(snaps[b].ledger)
            snl_search_s = path_seconds * led_s.units / max(1, ledger.units)
            extra_s = extra_b = 0
            if config.match_compute:
                gap = led_b.units - led_s.units
                extra_s, extra_b = max(0, gap), max(0, -gap)
            for method, model, led, extra, search_s, info in (
                (
                    "snl",
                    model_s,
                    led_s,
                    extra_s,
                    snl_search_s,
                    {
                        "snl_epoch": snaps[b].epoch,
                        "snl_converged": snaps[b].converged,
                        "path_units": snaps[b].ledger.units,
                    },
                ),
                (
                    "bcd",
                    model_b,
                    led_b,
                    extra_b,
                    bcd_search_s,
                    {
                        "warm_budget": warm[b],
                        "bcd_drc": drc,
                        "bcd_finetune_rounds": res.finetune_rounds,
                        "bcd_forced": res.forced,
                        "bcd_val_top1": res.val_accuracy,
                        "bcd_binarized_val_top1": res.history[0][1],
                        "bcd_warm_val_top1": next(
                            (h[1] for h in res.history if h[2] == "finetune (warm start)"), res.history[0][1]
                        ),
                        "path_units": snap_w.ledger.units,
                        "bcd_units": led_b.units - snap_w.ledger.units,
                    },
                ),
            ):
                t2 = time.perf_counter()
                top1, in_onnx, other, counted, epochs = _final(
                    model,
                    teacher_logits,
                    train,
                    test,
                    config.final_finetune,
                    seed,
                    led,
                    extra,
                    input_shape,
                    example,
                    onnx_dir,
                    f"{dataset or 'model'}_{method}_{b}_seed{seed}",
                )
                rows.append(
                    {
                        "dataset": dataset,
                        "method": method,
                        "budget": b,
                        "relus_in_onnx": in_onnx,
                        "relus_counted": counted,
                        "onnx_other_relu_like_ops": other,
                        "top1": top1,
                        "seconds": search_s + time.perf_counter() - t2,
                        "seed": seed,
                        "compute_units": led.units,
                        "final_finetune_epochs": epochs,
                        **info,
                    }
                )
                if in_onnx != b or counted != b:
                    log.warning("%s at budget %d: %d ReLUs in ONNX, %d counted", method, b, in_onnx, counted)
    finally:
        if tmp is not None:
            tmp.cleanup()
    return rows, histories


def plot_histories(curves: dict[str, list], path: str | Path, title: str = "") -> Path:
    """PNG of validation accuracy vs live ReLU count; ``curves`` maps a label to ``[(relus, acc, ...)]``."""
    from matplotlib.figure import Figure  # no pyplot: no process-wide backend switch

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, hist in curves.items():
        ax.plot([h[0] for h in hist], [h[1] for h in hist], lw=1, label=label)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("live ReLUs")
    ax.set_ylabel("validation top-1")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if len(curves) <= 12:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
