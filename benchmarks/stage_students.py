"""Which convex student should replace the last stage of ResNet-20? Measure the options.

One gated 3x3 layer sees a 3x3 window of the stage input, while the stage (three residual blocks)
sees the whole 16x16 map. This benchmark measures, on the bundled teacher and real CIFAR-10 images
(label-free fits; labels only for top-1), the options the foundation issue names:

* the whole stage by one gated conv, with more gates (P = 2, 4, 8);
* the same without the linear (always-on) gate, i.e. without a residual/linear path;
* a wider window (5x5 patches);
* one student per block, fitted in sequence (each block's student takes the previous student's
  outputs as input and matches the teacher block's outputs);
* only the last block replaced (a reference point: much easier, but little to compress).

Each fit solves the convex problem on a warm-started lam path and keeps the path point with the
lowest held-out activation loss, as ``convexedge demo`` does.

Run: ``python -m benchmarks.stage_students [--quick]``; writes ``benchmarks/results/stage_students.json``.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchmarks._common import environment, table, write_json
from convexedge.host.capture import capture_block
from convexedge.host.data import load_images, normalize_images
from convexedge.host.distill import (
    build_conv_problem,
    fit_path,
    infer_geometry,
    make_gates,
    select_by_validation,
)
from convexedge.host.evaluate import count_parameters, predict_logits, top1
from convexedge.host.solvers import FistaConfig
from convexedge.host.students import GatedConvStudent
from convexedge.host.swap import swapped
from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization


@dataclass(frozen=True)
class Option:
    name: str
    spans: tuple[str, ...]  # one student per span, fitted in sequence
    kernel_size: int = 3
    gates: int = 4
    linear_gate: bool = True


OPTIONS = [
    Option("stage, P=2", ("layer3",), gates=2),
    Option("stage, P=4", ("layer3",), gates=4),
    Option("stage, P=8", ("layer3",), gates=8),
    Option("stage, P=4, no linear gate", ("layer3",), gates=4, linear_gate=False),
    Option("stage, 5x5 patches, P=2", ("layer3",), kernel_size=5, gates=2),
    Option("one student per block, P=2 each", ("layer3.0", "layer3.1", "layer3.2"), gates=2),
    Option("last block only, P=2", ("layer3.2",), gates=2),
]


def _apply(student: nn.Module, z: np.ndarray, batch: int = 500) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate(
            [student(torch.from_numpy(z[i : i + batch])).numpy() for i in range(0, len(z), batch)]
        )


def run_option(
    opt: Option, teacher: nn.Module, acts: dict, n_val: int, lam_ratios, config, seed: int, test, transform
) -> dict:
    t0 = time.perf_counter()
    students, iters, kkts = [], 0, []
    z_prev = None  # the previous student's outputs on the training images
    val_r2 = []
    for span in opt.spans:
        z_in, z_out = acts[span]
        z_in = z_in if z_prev is None else z_prev
        geom = infer_geometry(z_in.shape[1:], z_out.shape[1:], opt.kernel_size)
        spec, G = make_gates(geom.d, opt.gates, seed, linear_gate=opt.linear_gate)
        prob = build_conv_problem(z_in[:-n_val], z_out[:-n_val], geom, G)
        val = build_conv_problem(z_in[-n_val:], z_out[-n_val:], geom, G)
        points = fit_path(prob, lam_ratios, config, val_problem=val)
        best = select_by_validation(points)
        iters += sum(p.result.iterations for p in points)
        kkts.append(best.result.kkt_residual)
        var = float(((val.Y - val.Y.mean(0)) ** 2).sum() / (2 * val.n))
        val_r2.append(1 - best.val_loss / var)
        student = GatedConvStudent(best.result.V.float(), G, geom, output_relu=True)
        students.append(student)
        z_prev = _apply(student, z_in)
    seconds = time.perf_counter() - t0
    model = teacher
    for span, student in zip(opt.spans, students, strict=True):
        model = swapped(model, span, student)
    acc = top1(predict_logits(model, test.x, transform), test.y)
    span_teacher = sum(count_parameters(dict(teacher.named_modules())[s]) for s in opt.spans)
    span_student = sum(count_parameters(s) for s in students)
    return {
        "option": opt.name,
        "top1": acc,
        "val_r2": float(np.mean(val_r2)),
        "val_r2_per_student": val_r2,
        "span_params_teacher": span_teacher,
        "span_params_student": span_student,
        "compression": span_teacher / span_student,
        "active_gates": [s.num_gates for s in students],
        "solve_seconds": seconds,
        "iterations": iters,
        "kkt_residual_max": max(kkts),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--images", type=int, default=None, help="unlabeled training images (500; quick 150)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images = args.images or (150 if args.quick else 500)
    lam_ratios = (0.01, 0.003, 0.001)
    config = FistaConfig(tol=1e-3 if args.quick else 1e-4, max_iter=500)
    options = [o for o in OPTIONS if not (args.quick and o.gates > 4)]

    teacher = load_teacher()
    mean, std = teacher_normalization()

    def transform(x):
        return normalize_images(x, mean, std)

    train = load_images(BUNDLED_DATA_DIR, "train", labels=False, limit=images)
    test = load_images(BUNDLED_DATA_DIR, "test", limit=300 if args.quick else None)
    acts = {}
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for span in ("layer3", "layer3.0", "layer3.1", "layer3.2"):
            sh = capture_block(teacher, span, train.x, f"{tmp}/{span}", transform=transform, progress=False)
            acts[span] = (sh.load("inputs"), sh.load("outputs"))
    n_val = max(1, images // 10)
    teacher_acc = top1(predict_logits(teacher, test.x, transform), test.y)
    rows = []
    for opt in options:
        row = run_option(opt, teacher, acts, n_val, lam_ratios, config, args.seed, test, transform)
        rows.append(row)
        print(f"  {opt.name}: top-1 {100 * row['top1']:.1f}%  ({row['solve_seconds']:.0f} s)", flush=True)
    print(
        f"\nteacher top-1 {100 * teacher_acc:.1f}% on {len(test)} exact test images; "
        f"{images} unlabeled training images ({n_val} held out)"
    )
    print(
        table(
            rows,
            [
                ("option", "student", "s"),
                ("top1", "top-1", ".3f"),
                ("val_r2", "val R2", ".3f"),
                ("span_params_student", "params", ",d"),
                ("span_params_teacher", "teacher params", ",d"),
                ("compression", "compression", ".2f"),
                ("solve_seconds", "solve s", ".1f"),
                ("iterations", "iters", "d"),
            ],
        )
    )
    payload = {
        "benchmark": "stage_students",
        "environment": environment(),
        "settings": {
            "images": images,
            "held_out": n_val,
            "test_images": len(test),
            "lam_ratios": lam_ratios,
            "tol": config.tol,
            "seed": args.seed,
            "dtype": "float32",
        },
        "teacher_top1": teacher_acc,
        "rows": rows,
    }
    path = write_json("stage_students", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
