"""``convexedge demo``: the main job end to end on the bundled teacher and real CIFAR-10 images.

capture (label-free) -> convex solve along a lam path -> select by held-out activation loss ->
student module -> swap into a copy of the teacher -> evaluate -> table, report.json, PNGs, weights.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from convexedge.device.errors import DataError
from convexedge.host.capture import CaptureConfig, capture_block
from convexedge.host.data import load_images, normalize_images
from convexedge.host.distill import (
    build_conv_problem,
    fit_path,
    infer_geometry,
    make_gates,
    save_lowrank_student,
    save_student,
    select_by_validation,
)
from convexedge.host.evaluate import count_macs, count_parameters, predict_logits, top1
from convexedge.host.lowrank import LowRankConfig, neuron_student
from convexedge.host.report import format_table, plot_accuracy_vs_params, plot_convergence
from convexedge.host.solvers import FistaConfig
from convexedge.host.students import GatedConvStudent
from convexedge.host.swap import swapped
from convexedge.models import BUNDLED_DATA_DIR, TEACHER_WEIGHTS, load_teacher, teacher_normalization

__all__ = ["DemoOptions", "run_demo"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    """Settings of ``convexedge demo``; ``None`` fields take the quick or full default."""

    quick: bool = False
    out: str = "convexedge-demo"
    data: str | None = None  # folder of train_*/test_* shards; None = the bundled slice
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0  # gates and the choice of capture images
    images: int | None = None  # unlabeled training images captured (quick 200, full 2000)
    test_images: int | None = None  # test images evaluated (quick 500, full: all)
    gates: int | None = None  # P, gate 0 being the linear path (quick 4, full 8)
    span: str = "layer3"  # module replaced by the student
    kernel_size: int = 3
    lam_ratios: tuple[float, ...] | None = None  # lam / lam_max path, decreasing
    val_fraction: float = 0.1  # captured images held out for label-free model selection
    tol: float = 1e-4  # relative KKT residual the solver stops at
    max_iter: int = 500
    dtype: Literal["float32", "float64"] = "float32"
    progress: bool = True
    device_step: bool = True  # export a convex head, load it with convexedge.device, shift, refit
    lowrank: bool = True  # neuron form of the selected student, saved when accepted and smaller
    lowrank_tolerance: float = 0.02  # held-out loss increase the neuron form may cost (relative)

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must lie in (0, 0.5), got {self.val_fraction}")
        if not self.lowrank_tolerance >= 0:
            raise ValueError(f"lowrank_tolerance must be >= 0, got {self.lowrank_tolerance}")

    def resolved(self) -> DemoOptions:
        """A copy with every ``None`` default filled in for the quick or full run."""
        q = self.quick
        fill = {
            "images": self.images or (200 if q else 2000),
            "gates": self.gates or (4 if q else 8),
            "lam_ratios": self.lam_ratios or ((0.1, 0.01, 0.002) if q else (0.1, 0.03, 0.01, 0.003, 0.001)),
            "test_images": self.test_images or (500 if q else None),
        }
        return DemoOptions(**{**asdict(self), **fill})


def _device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DataError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return choice


def run_demo(options: DemoOptions = DemoOptions()) -> dict:
    """Run the demo; returns the report (also written to ``<out>/report.json``)."""
    t_start = time.perf_counter()
    opt = options.resolved()
    device = _device(opt.device)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(opt.data) if opt.data else BUNDLED_DATA_DIR
    mean, std = teacher_normalization()

    def transform(x: np.ndarray) -> np.ndarray:
        return normalize_images(x, mean, std)

    # 1. teacher and its reference accuracy (evaluation is the only place labels are read)
    teacher = load_teacher().to(device)
    test = load_images(data_dir, "test", limit=opt.test_images)
    t0 = time.perf_counter()
    teacher_logits = predict_logits(teacher, test.x, transform, device=device)
    teacher_top1 = top1(teacher_logits, test.y)
    eval_seconds = time.perf_counter() - t0
    print(f"teacher ResNet-20: top-1 {100 * teacher_top1:.1f}% on {len(test)} test images ({data_dir})")

    # 2. label-free capture of the span on unlabeled training images
    train = load_images(data_dir, "train", labels=False)
    if len(train) < 10:
        raise DataError(f"need at least 10 training images in {data_dir}, found {len(train)}")
    rng = np.random.default_rng(opt.seed)
    take = np.sort(rng.choice(len(train), size=min(opt.images, len(train)), replace=False))
    t0 = time.perf_counter()
    shards = capture_block(
        teacher,
        opt.span,
        train.x[take],
        out / "activations",
        transform=transform,
        config=CaptureConfig(device=device),
        progress=opt.progress,
    )
    capture_seconds = time.perf_counter() - t0
    z_in, z_out = shards.load("inputs"), shards.load("outputs")
    n_val = max(1, int(round(opt.val_fraction * len(take))))
    geom = infer_geometry(shards.input_shape, shards.output_shape, opt.kernel_size)
    spec, G = make_gates(geom.d, opt.gates, opt.seed)
    problem = build_conv_problem(z_in[:-n_val], z_out[:-n_val], geom, G, dtype=opt.dtype, device=device)
    val_problem = build_conv_problem(z_in[-n_val:], z_out[-n_val:], geom, G, dtype=opt.dtype, device=device)
    del z_in, z_out

    # 3. convex solves along the lam path
    from tqdm.auto import tqdm

    config = FistaConfig(tol=opt.tol, max_iter=opt.max_iter)
    bar = tqdm(desc="FISTA", unit="it", disable=not opt.progress)

    def on_iteration(it: int, objective: float, kkt: float) -> None:
        bar.update(1)
        bar.set_postfix(obj=f"{objective:.4g}", kkt=f"{kkt:.2e}", refresh=False)

    t0 = time.perf_counter()
    points = fit_path(problem, opt.lam_ratios, config, val_problem=val_problem, on_iteration=on_iteration)
    solve_seconds = time.perf_counter() - t0
    bar.close()
    chosen = select_by_validation(points)
    chosen_index = points.index(chosen)

    # 4. students, swap, evaluate every path point (labels read here only, for evaluation)
    span_teacher = dict(teacher.named_modules())[opt.span]
    span_params_teacher = count_parameters(span_teacher)
    model_params_teacher = count_parameters(teacher)
    in_hw = tuple(shards.input_shape[1:])
    macs_span_teacher = count_macs(span_teacher, tuple(shards.input_shape))
    macs_teacher = count_macs(teacher, (3, *test.x.shape[1:3]))
    rows = []
    for p in points:
        student = GatedConvStudent(p.result.V.float().cpu(), G, geom, output_relu=True).to(device)
        model = swapped(teacher, opt.span, student)
        acc = top1(predict_logits(model, test.x, transform, device=device), test.y)
        rows.append(
            {
                "lam_ratio": p.lam_ratio,
                "lam": p.result.lam,
                "top1": acc,
                "active_gates": p.active_gates,
                "iterations": p.result.iterations,
                "converged": p.result.converged,
                "kkt_residual": p.result.kkt_residual,
                "objective": p.result.objective,
                "val_loss": p.val_loss,
                "seconds": p.result.seconds,
                "span_params": count_parameters(student, count_gates=True),
                "span_params_gates_from_seed": count_parameters(student, count_gates=False),
                "model_params": count_parameters(model),
                "span_macs": student.macs(in_hw),
                "model_macs": count_macs(model, (3, *test.x.shape[1:3])),
            }
        )
    best = rows[chosen_index]
    active = (chosen.result.V.flatten(1).abs().amax(1) > 0).cpu().numpy()
    meta = {
        "span": opt.span,
        "geometry": geom.to_dict(),
        "gates": spec.to_dict(),
        "output_relu": True,
        "lam": chosen.result.lam,
        "lam_ratio": chosen.lam_ratio,
        "teacher": {"weights": TEACHER_WEIGHTS.name, "architecture": "resnet20"},
    }
    neuron_form = None
    # 4b. neuron form: per-gate SVD + least-squares refit, label-free acceptance
    if opt.lowrank and chosen.active_gates > 0:
        t0 = time.perf_counter()
        small, lr = neuron_student(problem, val_problem, chosen.result.V, G, geom, output_relu=True,
                                   config=LowRankConfig(tolerance=opt.lowrank_tolerance))  # fmt: skip
        model = swapped(teacher, opt.span, small.to(device))
        neuron_form = {
            "neurons": lr.neurons,
            "gates": small.num_gates,
            "top1": top1(predict_logits(model, test.x, transform, device=device), test.y),
            "span_params": count_parameters(small, count_gates=True),
            "span_params_gates_from_seed": count_parameters(small, count_gates=False),
            "model_params": count_parameters(model),
            "span_macs": small.macs(in_hw),
            "model_macs": count_macs(model, (3, *test.x.shape[1:3])),
            "val_loss": lr.val_loss,
            "val_loss_gate_form": lr.val_loss_full,
            "accepted": lr.accepted,
            "candidates": lr.candidates,
            "seconds": time.perf_counter() - t0,
        }
        neuron_form["saved"] = bool(lr.accepted and neuron_form["span_params"] < best["span_params"])
    if neuron_form and neuron_form["saved"]:
        weights, manifest = save_lowrank_student(
            out, "student", small.cpu(), {**meta, "student_kind": "convex_lowrank"}
        )
        saved = {
            "kind": "convex_lowrank",
            **{k: neuron_form[k] for k in ("top1", "span_params", "model_params")},
        }
    else:
        weights, manifest = save_student(
            out,
            "student",
            chosen.result.V.float().cpu().numpy()[active],
            G[:, active],
            {**meta, "kind": "gated_conv", "active_gate_indices": np.flatnonzero(active).tolist()},
        )
        saved = {"kind": "convex", **{k: best[k] for k in ("top1", "span_params", "model_params")}}
    plot_convergence(
        [(f"lam={p.lam_ratio:g} lam_max", p.result.history) for p in points], out / "convergence.png"
    )
    plot_accuracy_vs_params(
        [(r["span_params"], r["top1"], f"{r['lam_ratio']:g}") for r in rows],
        (span_params_teacher, teacher_top1),
        out / "accuracy_vs_params.png",
        selected=chosen_index,
    )

    report = {
        "teacher_top1": teacher_top1,
        "student_top1": best["top1"],
        "span": opt.span,
        "span_params_teacher": span_params_teacher,
        "span_params_student": best["span_params"],
        "span_params_student_gates_from_seed": best["span_params_gates_from_seed"],
        "span_compression": span_params_teacher / best["span_params"],
        "model_params_teacher": model_params_teacher,
        "model_params_student": best["model_params"],
        "model_compression": model_params_teacher / best["model_params"],
        "span_macs_teacher": macs_span_teacher,
        "span_macs_student": best["span_macs"],
        "model_macs_teacher": macs_teacher,
        "model_macs_student": best["model_macs"],
        "solve_seconds": solve_seconds,
        "solver_iterations": sum(r["iterations"] for r in rows),
        "selected_solve_iterations": best["iterations"],
        "kkt_residual": best["kkt_residual"],
        "converged": best["converged"],
        "lam": best["lam"],
        "lam_ratio": best["lam_ratio"],
        "active_gates": best["active_gates"],
        "path": rows,
        "neuron_form": neuron_form,
        "saved": saved,
        "labels_read": "evaluation only: capture, solve and model selection are label-free",
        "capture": {
            "images": int(len(take)),
            "held_out_images": n_val,
            "samples": problem.n,
            "features": problem.d,
            "outputs": problem.c,
            "gates": problem.P,
            "seconds": capture_seconds,
            "shards": str(shards.root),
        },
        "test_images": len(test),
        "eval_seconds_teacher": eval_seconds,
        "data": str(data_dir),
        "options": {**asdict(opt), "device": device},
        "environment": {
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
        "files": {
            "student_weights": weights,
            "student_manifest": manifest,
            "convergence_png": str(out / "convergence.png"),
            "accuracy_png": str(out / "accuracy_vs_params.png"),
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    print(_table(report))
    if opt.device_step:
        from convexedge.host.demo_device import run_device_step

        report["device"] = run_device_step(
            teacher,
            train.x[take],
            test.x,
            test.y,
            transform,
            out,
            seed=opt.seed,
            stream_images=min(1024, len(take)),
            device=device,
        )
    report["total_seconds"] = time.perf_counter() - t_start
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(
        f"wrote {out / 'report.json'}, {out / 'convergence.png'}, {out / 'accuracy_vs_params.png'}, {weights}"
    )
    return report


def _neuron_rows(r: dict) -> list[tuple[str, str, str]]:
    nf = r.get("neuron_form")
    if not nf:
        return []
    verdict = "accepted" if nf["accepted"] else "refused: held-out loss above tolerance"
    return [
        (
            f"neuron form: top-1 / params of {r['span']}",
            "",
            f"{100 * nf['top1']:.1f}% / {nf['span_params']:,} "
            f"({r['span_params_teacher'] / nf['span_params']:.1f}x smaller)",
        ),
        ("neuron form: neurons / gates", "", f"{nf['neurons']} / {nf['gates']} ({verdict})"),
    ]


def _table(r: dict) -> str:
    k = 1000
    rows = [
        ("top-1", f"{100 * r['teacher_top1']:.1f}%", f"{100 * r['student_top1']:.1f}%"),
        (
            f"params of {r['span']} (gates counted)",
            f"{r['span_params_teacher']:,}",
            f"{r['span_params_student']:,} ({r['span_compression']:.1f}x smaller)",
        ),
        (
            f"params of {r['span']} (gates from seed)",
            f"{r['span_params_teacher']:,}",
            f"{r['span_params_student_gates_from_seed']:,}",
        ),
        (
            "params of the whole model",
            f"{r['model_params_teacher']:,}",
            f"{r['model_params_student']:,} ({r['model_compression']:.2f}x smaller)",
        ),
        (
            f"MACs of {r['span']} / image",
            f"{r['span_macs_teacher'] / k:,.0f}k",
            f"{r['span_macs_student'] / k:,.0f}k",
        ),
        (
            "MACs of the whole model / image",
            f"{r['model_macs_teacher'] / k:,.0f}k",
            f"{r['model_macs_student'] / k:,.0f}k",
        ),
        ("active gates / lam", "", f"{r['active_gates']} / {r['lam_ratio']:g} lam_max"),
        ("solve time (whole lam path)", "", f"{r['solve_seconds']:.1f} s"),
        *_neuron_rows(r),
        ("saved student (student.npz)", "", r["saved"]["kind"]),
        ("iterations (path / selected)", "", f"{r['solver_iterations']} / {r['selected_solve_iterations']}"),
        (
            "final relative KKT residual",
            "",
            f"{r['kkt_residual']:.2e}" + ("" if r["converged"] else " (not converged)"),
        ),
    ]
    return format_table(rows, ("", "teacher", "convex student"))
