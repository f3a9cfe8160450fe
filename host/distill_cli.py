"""``convexedge distill``: capture a span of the bundled teacher and solve its convex student,
data parallel on ``torch.distributed``.

Every rank runs :func:`_rank_main` (one process: world size 1, the same code):

1. picks the unlabeled training images (seeded), holds the last ``val_fraction`` out, and captures
   its block of each set (:func:`~convexedge.host.distributed.capture_sharded`, memory-mapped
   shards per rank under ``OUT/activations{,-val}/rankRRRRR/`` plus a merged manifest);
2. builds the conv student's convex problem on its rows with the reduction hook
   (``GatedProblem(..., comm=...)``) and solves the ``lam`` path
   (:func:`~convexedge.host.solvers.solve_path`), checkpointing to ``OUT/checkpoints/``
   (``--resume`` continues an interrupted run);
3. picks the path point with the lowest held-out (all-reduced) loss; rank 0 writes
   ``OUT/student.npz/json`` (readable by ``convexedge export OUT``) and ``OUT/distill.json``.

Ranks: ``--nproc N`` spawns N local gloo ranks; under ``torchrun`` the ranks come from its
environment (``RANK``, ``WORLD_SIZE``, ...; nccl for CUDA). No labels are read.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from convexedge.device.errors import DataError

__all__ = ["DistillOptions", "run_distill"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """Settings of ``convexedge distill``."""

    out: str = "convexedge-distill"
    data: str | None = None  # folder of train_*.npz shards; None = the bundled slice
    span: str = "layer3"  # module of the teacher replaced by the student
    images: int = 2000  # unlabeled training images captured (fit + held out)
    val_fraction: float = 0.1  # of the images, held out for label-free model selection
    gates: int = 8  # P, gate 0 being the linear path
    kernel_size: int = 3
    seed: int = 0  # gates and the choice of images
    lam_ratios: tuple[float, ...] = (0.1, 0.03, 0.01)  # lam / lam_max, decreasing
    tol: float = 1e-4  # relative KKT residual the solver stops at
    max_iter: int = 500
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    nproc: int = 1  # local gloo ranks to spawn (1 under torchrun, which starts the ranks itself)
    checkpoint_every: int = 50  # iterations between solver checkpoints
    resume: bool = False  # continue from OUT/checkpoints instead of starting afresh
    progress: bool = True

    def __post_init__(self) -> None:
        if self.images < 2:
            raise ValueError(f"images must be >= 2, got {self.images}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must lie in (0, 0.5), got {self.val_fraction}")
        ratios = list(self.lam_ratios)
        if (
            not ratios
            or any(r <= 0 for r in ratios)
            or any(b >= a for a, b in zip(ratios, ratios[1:], strict=False))
        ):
            raise ValueError(f"lam_ratios must be positive and strictly decreasing, got {ratios}")
        if self.nproc < 1:
            raise ValueError(f"nproc must be >= 1, got {self.nproc}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")


def run_distill(opt: DistillOptions) -> dict:
    """Run the distillation on ``opt.nproc`` local ranks, or on the ranks ``torchrun`` started.

    Returns:
        The report rank 0 wrote to ``OUT/distill.json`` (on every rank that can read it).
    """
    from convexedge.host.distributed import init_from_env, launch

    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if opt.nproc != 1:
            raise ValueError(
                "under torchrun the ranks come from torchrun: drop --nproc (or run without torchrun)"
            )
        _rank_main(init_from_env("auto", _device(opt.device, local=True)), opt)
    else:
        if opt.nproc > 1 and _device(opt.device) != "cpu":
            raise ValueError("--nproc spawns gloo ranks on the CPU; use torchrun for GPUs (nccl)")
        launch(_rank_main, opt.nproc, opt)
    return json.loads((Path(opt.out) / "distill.json").read_text())


def _device(choice: str, local: bool = False) -> str:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise DataError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
        if local:
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return choice


def _rank_main(comm, opt: DistillOptions) -> None:
    """Everything one rank does (see the module docstring); rank 0 writes the outputs."""
    from functools import partial

    from convexedge.host.capture import CaptureConfig
    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import (
        PathPoint,
        build_conv_problem,
        infer_geometry,
        make_gates,
        save_student,
        select_by_validation,
    )
    from convexedge.host.distributed import capture_sharded
    from convexedge.host.solvers import FistaConfig, GatedProblem, SolverCheckpoint, solve_path
    from convexedge.models import BUNDLED_DATA_DIR, TEACHER_WEIGHTS, load_teacher, teacher_normalization

    t_start = time.perf_counter()
    device = _device(opt.device, local=True)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)  # one GPU per rank (LOCAL_RANK), as nccl expects
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(opt.data) if opt.data else BUNDLED_DATA_DIR
    teacher = load_teacher().to(device)
    mean, std = teacher_normalization()
    train = load_images(data_dir, "train", labels=False)
    if len(train) < opt.images:
        raise DataError(f"{data_dir} holds {len(train)} training images, fewer than images={opt.images}")
    take = np.sort(np.random.default_rng(opt.seed).choice(len(train), size=opt.images, replace=False))
    n_val = max(comm.world_size, int(round(opt.val_fraction * opt.images)))
    if opt.images - n_val < comm.world_size:
        raise DataError(f"{opt.images} images are too few for {comm.world_size} ranks")
    fit_idx, val_idx = take[:-n_val], take[-n_val:]

    # 1. capture: each rank its block, to its own memory-mapped shards
    t0 = time.perf_counter()
    cap = {"transform": partial(normalize_images, mean=mean, std=std), "config": CaptureConfig(device=device)}
    fit = capture_sharded(teacher, opt.span, train.x[fit_idx], out / "activations", comm, **cap,
                          progress=opt.progress)  # fmt: skip
    val = capture_sharded(teacher, opt.span, train.x[val_idx], out / "activations-val", comm, **cap)
    capture_seconds = time.perf_counter() - t0

    # 2. the convex problem on this rank's rows, with the reduction hook
    geom = infer_geometry(fit.input_shape, fit.output_shape, opt.kernel_size)
    spec, G = make_gates(geom.d, opt.gates, opt.seed)

    def problem(shards) -> GatedProblem:
        p = build_conv_problem(
            shards.load("inputs"), shards.load("outputs"), geom, G, dtype=opt.dtype, device=device
        )
        return GatedProblem(Z=p.Z, Y=p.Y, masks=p.masks, comm=comm)

    prob, val_prob = problem(fit), problem(val)
    ck_dir = out / "checkpoints"
    if not opt.resume:  # a fresh run: drop this rank's old checkpoints
        for f in ck_dir.glob(f"*.rank{comm.rank:05d}-of-*.npz"):
            f.unlink()
    comm.barrier()
    lam_max = prob.lam_max()
    t0 = time.perf_counter()
    results = solve_path(
        prob,
        [r * lam_max for r in opt.lam_ratios],
        FistaConfig(tol=opt.tol, max_iter=opt.max_iter),
        checkpoint=SolverCheckpoint(folder=str(ck_dir), every=opt.checkpoint_every),
    )
    solve_seconds = time.perf_counter() - t0
    points = []
    for ratio, res in zip(opt.lam_ratios, results, strict=True):
        active = int(res.V.flatten(1).ne(0).any(1).sum())
        val_loss = val_prob.smooth(res.V)[0]  # all-reduced: the same on every rank
        points.append(PathPoint(lam_ratio=ratio, result=res, active_gates=active, val_loss=val_loss))
    chosen = select_by_validation(points)

    # 3. rank 0 writes the student and the report
    if comm.rank == 0:
        V = chosen.result.V.float().cpu().numpy()
        keep = np.abs(V).reshape(V.shape[0], -1).max(1) > 0
        save_student(str(out), "student", V[keep], G[:, keep], {
            "kind": "gated_conv", "span": opt.span, "geometry": geom.to_dict(), "gates": spec.to_dict(),
            "active_gate_indices": np.flatnonzero(keep).tolist(), "output_relu": True,
            "lam": chosen.result.lam, "lam_ratio": chosen.lam_ratio,
            "teacher": {"weights": TEACHER_WEIGHTS.name, "architecture": "resnet20"},
        })  # fmt: skip
        item = torch.finfo(prob.Z.dtype).bits // 8
        rows_per_image = prob.n // len(fit_idx)
        report = {
            "options": asdict(opt),
            "world_size": comm.world_size,
            "device": str(device),
            "images": {"fit": len(fit_idx), "held_out": n_val},
            "samples": prob.n,
            "samples_this_rank": prob.n_local,
            "problem": {"d": prob.d, "c": prob.c, "P": prob.P, "lam_max": lam_max},
            "bytes_per_image": {
                "activations_on_disk": int(
                    (np.prod(fit.input_shape) + np.prod(fit.output_shape)) * np.dtype(fit.dtype).itemsize
                ),
                "Z": rows_per_image * prob.d * item,
                "Y": rows_per_image * prob.c * item,
                "masks": rows_per_image * prob.P,
                "predictions": 2 * rows_per_image * prob.c * item,  # A(x), A(y) of the FISTA state
            },
            "seconds": {
                "capture": capture_seconds,
                "solve": solve_seconds,
                "total": time.perf_counter() - t_start,
            },
            "path": [
                {
                    "lam_ratio": p.lam_ratio,
                    "lam": p.result.lam,
                    "objective": p.result.objective,
                    "kkt_residual": p.result.kkt_residual,
                    "converged": p.result.converged,
                    "iterations": p.result.iterations,
                    "active_gates": p.active_gates,
                    "val_loss": p.val_loss,
                    "seconds": p.result.seconds,
                }
                for p in points
            ],
            "selected_lam_ratio": chosen.lam_ratio,
        }
        tmp = out / "distill.json.tmp"
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out / "distill.json")
        print(_table(report))
    comm.barrier()


def _table(report: dict) -> str:
    head = (
        f"convexedge distill: {report['samples']} samples ({report['images']['fit']} images) on "
        f"{report['world_size']} rank(s), solve {report['seconds']['solve']:.1f}s"
    )
    lines = [
        head,
        f"{'lam/lam_max':>11} {'objective':>12} {'KKT':>9} {'iters':>6} {'gates':>5} {'held-out':>10}",
    ]
    for p in report["path"]:
        mark = " *" if p["lam_ratio"] == report["selected_lam_ratio"] else ""
        lines.append(
            f"{p['lam_ratio']:>11g} {p['objective']:>12.6g} {p['kkt_residual']:>9.2e} {p['iterations']:>6d} "
            f"{p['active_gates']:>5d} {p['val_loss']:>10.5g}{mark}"
        )
    return "\n".join(lines)
