"""Convex distillation vs the alternatives (protocol: shared/BENCHMARKS.md section 2).

Teacher: the bundled ResNet-20. A span of its last stages is replaced by a student fitted
label-free on the teacher's activations of K unlabeled training images per class:

* ``convex``: the exact convex gated-ReLU conv student (FISTA on a lam path, selected by held-out
  activation loss);
* ``convex_pruned_polished``: the same after optimal-set pruning (``prune_to_minimal``) and a group
  elastic-net refit of the kept gates (``convexedge.host.polish``), kept only where it lowers the
  held-out loss;
* ``bm``: the conv Burer-Monteiro form ``CNN3_1x1(CNN2(z) * 1[CNN1(z) >= 0])`` with CNN1 frozen,
  trained with Adam;
* ``nonconvex``: conv kxk -> ReLU -> conv 1x1 of the convex student's parameter count, Adam;
* ``magnitude_pruned``: the teacher span globally magnitude-pruned to that count, fine-tuned.

BM, non-convex and pruned students get the same data and the same wall time as the convex solve
(the solve's seconds, at least ``--min-budget``). Labels: the K images per class are chosen with the
training labels (choosing a class-balanced sample needs them); capture, solves and training read
images and activations only. Labels are read again only for top-1 on the test sets: the 10,000
JPEG-decoded CIFAR-10 test images (``shared/data/cifar10``) and the exact test images 0..999
(``models/cifar10``). Parameters count the gates; MACs of the pruned span count surviving weights.

Run: ``python -m benchmarks.distill [--quick] [--spans last,last2] [--samples 10,100,500]``; writes
``benchmarks/results/distill.json`` and ``distill.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks._common import RESULTS, environment, table, write_json
from convexedge.host.baselines import (
    BMConvStudent,
    PrunedSpan,
    ReluConvStudent,
    TrainConfig,
    bm_gates_for,
    relu_hidden_for,
    span_parameters,
    train_student,
)
from convexedge.host.data import load_images, normalize_images
from convexedge.host.distill import (
    build_conv_problem,
    fit_path,
    infer_geometry,
    make_gates,
    select_by_validation,
)
from convexedge.host.evaluate import count_macs, count_parameters, top1
from convexedge.host.polish import PolishConfig, polish
from convexedge.host.prune import prune_to_minimal
from convexedge.host.solvers import FistaConfig
from convexedge.host.students import GatedConvStudent
from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPANS = {"last": ("layer3",), "last2": ("layer2", "layer3")}
STAGES = ("layer1", "layer2", "layer3")


# ------------------------------------------------------------------ ResNet-20 prefix / span / head
@torch.no_grad()
def _prefix(model: nn.Module, x: torch.Tensor, span: tuple[str, ...]) -> torch.Tensor:
    """Activations entering ``span`` (the stem and the stages before it)."""
    h = model.relu(model.bn1(model.conv1(x)))
    for name in STAGES[: STAGES.index(span[0])]:
        h = getattr(model, name)(h)
    return h


@torch.no_grad()
def _head(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.linear(model.pool(h).flatten(1))


def _span_module(model: nn.Module, span: tuple[str, ...]) -> nn.Module:
    return nn.Sequential(*[getattr(model, s) for s in span]) if len(span) > 1 else getattr(model, span[0])


@torch.no_grad()
def _features(model, images, span, transform, batch=500) -> np.ndarray:
    out = []
    for s in range(0, images.shape[0], batch):
        out.append(_prefix(model, torch.from_numpy(transform(images[s : s + batch])), span).numpy())
    return np.concatenate(out)


@torch.no_grad()
def _top1(model, student: nn.Module, feats: np.ndarray, labels: np.ndarray, batch=500) -> float:
    student.eval()
    logits = []
    for s in range(0, feats.shape[0], batch):
        logits.append(_head(model, student(torch.from_numpy(feats[s : s + batch]))).numpy())
    return top1(np.concatenate(logits), labels)


def _per_class(labels: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` images per class (labels are read here only, to choose the sample)."""
    idx = []
    for c in np.unique(labels):
        pool = np.flatnonzero(labels == c)
        if pool.size < k:
            raise SystemExit(f"class {c} has {pool.size} training images, {k} asked for")
        idx.append(rng.choice(pool, size=k, replace=False))
    return np.sort(np.concatenate(idx))


# ------------------------------------------------------------------ one (span, K) cell
def run_cell(args, teacher, span, k, train, tests, transform, base) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    take = _per_class(train.y, k, rng)
    rng.shuffle(take)
    x = train.x[take]  # images only from here on: label-free capture, solve and training
    span_mod = _span_module(teacher, span).eval()
    z_in = _features(teacher, x, span, transform)
    with torch.no_grad():
        z_out = np.concatenate(
            [span_mod(torch.from_numpy(z_in[s : s + 500])).numpy() for s in range(0, len(z_in), 500)]
        )
    n_val = max(2, int(round(args.val_fraction * len(x))))
    fit_in, fit_out, val_in, val_out = z_in[:-n_val], z_out[:-n_val], z_in[-n_val:], z_out[-n_val:]
    geom = infer_geometry(z_in.shape[1:], z_out.shape[1:], args.kernel_size)
    c_out = z_out.shape[1]
    in_shape = tuple(z_in.shape[1:])
    name = "+".join(span)
    rows = []

    def record(student_kind: str, module: nn.Module, seconds: float, extra: dict | None = None) -> dict:
        sp = span_parameters(module)
        module.eval()
        with torch.no_grad():  # held-out activation loss in one unit for every student: 1/2 mean sq. error
            pred = torch.cat(
                [module(torch.from_numpy(val_in[s : s + 250])) for s in range(0, len(val_in), 250)]
            )
            val_mse = float(0.5 * ((pred - torch.from_numpy(val_out)) ** 2).mean())
        macs = module.macs(tuple(in_shape[1:])) if hasattr(module, "macs") else count_macs(module, in_shape)
        row = {
            "student": student_kind,
            "span": name,
            "samples_per_class": k,
            "top1": _top1(teacher, module, tests["feats"][span][0], tests["jpeg"].y),
            "top1_exact1k": _top1(teacher, module, tests["feats"][span][1], tests["exact"].y),
            "span_params": sp,
            "span_params_gates_from_seed": span_parameters(module, count_gates=False),
            "model_params": base["model_params"] - base["span_params"][span] + sp,
            "span_compression": base["span_params"][span] / sp,
            "model_compression": base["model_params"]
            / (base["model_params"] - base["span_params"][span] + sp),
            "macs": base["model_macs"] - base["span_macs"][span] + macs,
            "span_macs": macs,
            "seconds": seconds,
            "val_mse": val_mse,
            **(extra or {}),
        }
        rows.append(row)
        print(
            f"  {student_kind:24s} K={k:4d} {name:14s} top-1 {100 * row['top1']:.1f}% "
            f"(exact1k {100 * row['top1_exact1k']:.1f}%)  params {sp:,}  {seconds:.1f}s",
            flush=True,
        )
        return row

    # (a) exact convex student
    spec, G = make_gates(geom.d, args.gates, args.seed)
    problem = build_conv_problem(fit_in, fit_out, geom, G)
    val_problem = build_conv_problem(val_in, val_out, geom, G)
    t0 = time.perf_counter()
    points = fit_path(
        problem, args.lam_ratios, FistaConfig(tol=args.tol, max_iter=args.max_iter), val_problem=val_problem
    )
    solve_s = time.perf_counter() - t0
    chosen = select_by_validation(points)
    convex = GatedConvStudent(chosen.result.V.float(), G, geom, output_relu=True)
    record(
        "convex",
        convex,
        solve_s,
        {"active_gates": chosen.active_gates, "lam_ratio": chosen.lam_ratio, "val_loss": chosen.val_loss},
    )
    # every other path point, as points of the convex size/accuracy curve
    for p in points:
        if p is chosen or p.active_gates == 0:
            continue
        record(
            "convex_path",
            GatedConvStudent(p.result.V.float(), G, geom, output_relu=True),
            p.result.seconds,
            {"active_gates": p.active_gates, "lam_ratio": p.lam_ratio, "val_loss": p.val_loss},
        )

    # (a') optimal-set pruning + polishing
    t0 = time.perf_counter()
    pr = prune_to_minimal(problem, chosen.result)
    pol = polish(problem, val_problem, pr.V.float(), PolishConfig())
    pp_s = time.perf_counter() - t0
    record(
        "convex_pruned_polished",
        GatedConvStudent(pol.V, G, geom, output_relu=True),
        solve_s + pp_s,
        {
            "active_gates": len(pol.kept),
            "pruned_active": pr.active_after,
            "polish_improved": pol.improved,
            "val_loss_before_polish": pol.val_loss_before,
            "val_loss": pol.val_loss_after,
            "polish_choice": pol.chosen,
            "polish_criterion": "held-out 1/(2n)||pred - Y||^2 (pre-ReLU, the convex problem's loss)",
        },
    )

    # equal-size baselines, same data and wall time as the convex solve
    target = span_parameters(convex)
    budget = max(args.min_budget, solve_s)
    cfg = TrainConfig(
        epochs=args.epochs, time_budget_s=budget, lr=args.lr, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress,
    )  # fmt: skip
    P_bm = bm_gates_for(target, geom, c_out)
    _, G_bm = make_gates(geom.d, P_bm, args.seed + 1)
    students = {
        "bm": BMConvStudent(G_bm, geom, c_out, seed=args.seed),
        "nonconvex": ReluConvStudent(geom, c_out, relu_hidden_for(target, geom, c_out), seed=args.seed),
        "magnitude_pruned": PrunedSpan(span_mod, target),
    }
    jobs = [(kind, student, True) for kind, student in students.items()]
    # the pruned teacher at milder compressions: where the size/accuracy curve meets the teacher
    span_total = base["span_params"][span]
    for factor in args.prune_compressions:
        jobs.append(("magnitude_pruned", PrunedSpan(span_mod, int(span_total / factor)), False))
    for kind, student, equal in jobs:
        res = train_student(student, fit_in, fit_out, cfg, val=(val_in, val_out))
        record(
            kind, res.module, res.seconds,
            {"status": res.status, "epochs": res.epochs, "val_loss": res.val_loss, "time_budget_s": budget,
             "equal_size": equal},
        )  # fmt: skip
    return rows


def summarize(rows: list[dict], last: str = "layer3") -> dict:
    """The issue's summary over ``rows`` (span = last stage for the comparisons)."""
    teacher = next(r for r in rows if r["student"] == "teacher")
    t = teacher["top1"]
    out: dict = {"teacher_top1": t, "teacher_top1_exact1k": teacher["top1_exact1k"]}

    def find(kind: str, k: int) -> dict | None:
        return next(
            (
                r
                for r in rows
                if r["student"] == kind and r["span"] == last and r["samples_per_class"] == k
                and r.get("equal_size", True)
            ),
            None,
        )  # fmt: skip

    for k in sorted({r["samples_per_class"] for r in rows if r["samples_per_class"]}):
        cv, nc, cpp = find("convex", k), find("nonconvex", k), find("convex_pruned_polished", k)
        if cv and nc:
            out[f"convex_minus_nonconvex_at_{k}pc"] = 100 * (cv["top1"] - nc["top1"])
            if cpp:
                out[f"pruned_polished_minus_nonconvex_at_{k}pc"] = 100 * (cpp["top1"] - nc["top1"])
    out.setdefault("convex_minus_nonconvex_at_100pc", None)
    within = [r for r in rows if r["span"] == last and r["student"] != "teacher" and r["top1"] >= t - 0.02]
    best = max(within, key=lambda r: r["span_compression"], default=None)
    out["best_span_compression_within_2pts"] = best["span_compression"] if best else None
    out["best_span_compression_within_2pts_student"] = (
        f"{best['student']} K={best['samples_per_class']}" if best else None
    )
    convex = [r for r in rows if r["span"] == last and r["student"].startswith("convex")]
    if convex:
        top = max(convex, key=lambda r: r["top1"])
        out["best_convex_top1_last_stage"] = top["top1"]
        out["best_convex_gap_to_teacher_pts"] = 100 * (t - top["top1"])
    return out


def _plot(rows: list[dict], teacher_top1: float, path: Path, test_label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spans = sorted({r["span"] for r in rows})
    fig, axes = plt.subplots(1, len(spans), figsize=(6 * len(spans), 4.2), squeeze=False)
    for ax, span in zip(axes[0], spans, strict=True):
        kinds = ("convex", "convex_pruned_polished", "bm", "nonconvex", "magnitude_pruned")
        ks = sorted({r["samples_per_class"] for r in rows if r["samples_per_class"]})
        for ci, kind in enumerate(kinds):
            pts = sorted(
                (r["span_params"], 100 * r["top1"], r["samples_per_class"])
                for r in rows
                if r["span"] == span
                and (r["student"] == kind or (kind == "convex" and r["student"] == "convex_path"))
            )
            for k in sorted({p[2] for p in pts}):
                sel = [p for p in pts if p[2] == k]
                style = ("-", "--", ":", "-.")[ks.index(k) % 4]
                marker = ("o", "s", "^", "D")[ks.index(k) % 4]
                ax.plot(
                    [p[0] for p in sel], [p[1] for p in sel], marker=marker, ls=style, color=f"C{ci}",
                    label=f"{kind} K={k}", ms=4,
                )  # fmt: skip
        ax.axhline(100 * teacher_top1, color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("span parameters (gates counted)")
        ax.set_ylabel(f"top-1 % ({test_label})")
        ax.set_title(f"ResNet-20, span {span}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 span, K=10, 1,000 test images (minutes)")
    ap.add_argument("--spans", default=None, help="comma list of last,last2 (default: last,last2)")
    ap.add_argument("--samples", default=None, help="comma list of images per class (default 10,100,500)")
    ap.add_argument("--train-data", default=str(SHARED / "cifar10"), help="train_*.npz pool (with labels)")
    ap.add_argument("--test-data", default=str(SHARED / "cifar10"), help="test_*.npz shards (10k JPEG)")
    ap.add_argument("--test-images", type=int, default=None, help="limit of JPEG test images")
    ap.add_argument("--gates", type=int, default=8)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--lam-ratios", default="0.1,0.03,0.01,0.003,0.001")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=1000, help="upper bound; the time budget ends training")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-budget", type=float, default=1.0, help="minimum training seconds of baselines")
    ap.add_argument(
        "--prune-compressions", default="1.5,2,3", help="extra magnitude-pruned sizes (span compression)"
    )
    ap.add_argument("--merge", action="store_true", help="keep rows of other (span, K) cells in the JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="result name under benchmarks/results/ (distill[_quick])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spans = [s for s in (args.spans or ("last" if args.quick else "last,last2")).split(",") if s]
    for s in spans:
        if s not in SPANS:
            raise SystemExit(f"unknown span {s!r}; choose from {sorted(SPANS)}")
    samples = [int(s) for s in (args.samples or ("10" if args.quick else "10,100,500")).split(",")]
    if args.quick:
        args.gates = min(args.gates, 4)
        args.test_images = args.test_images or 1000
        args.lam_ratios = "0.1,0.01,0.002"
        args.max_iter = min(args.max_iter, 200)
        args.prune_compressions = "2"
    args.out = args.out or ("distill_quick" if args.quick else "distill")
    args.lam_ratios = tuple(float(r) for r in args.lam_ratios.split(","))
    args.prune_compressions = tuple(float(f) for f in args.prune_compressions.split(",") if f)

    mean, std = teacher_normalization()

    def transform(x: np.ndarray) -> np.ndarray:
        return normalize_images(x, mean, std)

    teacher = load_teacher().eval()
    train = load_images(args.train_data, "train")  # labels used only to draw K images per class
    jpeg = load_images(args.test_data, "test", limit=args.test_images)
    exact = load_images(BUNDLED_DATA_DIR, "test")
    t0 = time.perf_counter()
    tests = {"jpeg": jpeg, "exact": exact, "feats": {}}
    for s in spans:
        tests["feats"][SPANS[s]] = (_features(teacher, jpeg.x, SPANS[s], transform),
                                    _features(teacher, exact.x, SPANS[s], transform))  # fmt: skip
    base = {
        "model_params": count_parameters(teacher),
        "model_macs": count_macs(teacher, (3, 32, 32)),
        "span_params": {SPANS[s]: count_parameters(_span_module(teacher, SPANS[s])) for s in spans},
        "span_macs": {},
    }
    for s in spans:
        sp = SPANS[s]
        feats = tests["feats"][sp][0]
        base["span_macs"][sp] = count_macs(_span_module(teacher, sp), tuple(feats.shape[1:]))
    rows = []
    teacher_rows = {}
    for s in spans:
        sp = SPANS[s]
        span_mod = _span_module(teacher, sp).eval()
        t_jpeg = _top1(teacher, span_mod, tests["feats"][sp][0], jpeg.y)
        t_exact = _top1(teacher, span_mod, tests["feats"][sp][1], exact.y)
        teacher_rows[s] = (t_jpeg, t_exact)
    t_jpeg, t_exact = next(iter(teacher_rows.values()))
    print(
        f"teacher ResNet-20: top-1 {100 * t_jpeg:.2f}% on {len(jpeg)} JPEG test images, "
        f"{100 * t_exact:.1f}% on the exact 1k ({time.perf_counter() - t0:.0f}s for test features)"
    )
    for s in spans:
        sp = SPANS[s]
        rows.append({
            "student": "teacher", "span": "+".join(sp), "samples_per_class": None, "top1": t_jpeg,
            "top1_exact1k": t_exact, "span_params": base["span_params"][sp],
            "span_params_gates_from_seed": base["span_params"][sp], "model_params": base["model_params"],
            "span_compression": 1.0, "model_compression": 1.0, "macs": base["model_macs"],
            "span_macs": base["span_macs"][sp], "seconds": 0.0,
        })  # fmt: skip
        for k in samples:
            print(f"span {'+'.join(sp)}, {k} images per class", flush=True)
            rows.extend(run_cell(args, teacher, sp, k, train, tests, transform, base))

    path = RESULTS / f"{args.out}.json"
    if args.merge and path.exists():
        import json

        done = {(r["span"], r["samples_per_class"]) for r in rows}
        old = [
            r for r in json.loads(path.read_text())["rows"] if (r["span"], r["samples_per_class"]) not in done
        ]
        rows = old + rows
    summary = summarize(rows)
    payload = {
        "meta": {
            **environment(),
            "teacher": "bundled ResNet-20 (models/resnet20_cifar10.npz)",
            "train_data": args.train_data,
            "test_data": f"{args.test_data} ({len(jpeg)} JPEG-decoded test images)",
            "test_data_exact1k": str(BUNDLED_DATA_DIR),
            "label_use": "labels choose the K-per-class training sample and score top-1; capture, solves, "
            "pruning, polishing and all student training read images/activations only",
            "params_note": "gates counted; magnitude_pruned counts surviving weights + BatchNorm affine; "
            "its MACs count surviving weights only",
            "args": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
            "spans": {s: list(SPANS[s]) for s in spans},
        },
        "rows": rows,
        "summary": summary,
    }
    print(
        table(
            rows,
            [
                ("student", "student", "s"),
                ("span", "span", "s"),
                ("samples_per_class", "K", "d"),
                ("top1", "top-1", ".4f"),
                ("top1_exact1k", "exact1k", ".3f"),
                ("span_params", "span params", ",d"),
                ("span_compression", "x span", ".2f"),
                ("model_params", "model params", ",d"),
                ("macs", "MACs", ",d"),
                ("seconds", "s", ".1f"),
            ],
        )  # fmt: skip
    )
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in summary.items()})
    path = write_json(args.out, payload)
    _plot(rows, summary["teacher_top1"], RESULTS / f"{args.out}.png", f"{len(jpeg):,} JPEG test images")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")
    return payload


if __name__ == "__main__":
    main()
