"""Convex distillation vs the alternatives (protocol: shared/BENCHMARKS.md section 2).

Teacher: the bundled ResNet-20 (``--model resnet20``) or the CIFAR-stem ResNet-18 trained here
(``--model resnet18``, ``convexedge.models.train_resnet18``). A span of its last stages is replaced
by a student fitted label-free on the teacher's activations of K unlabeled training images per class:

* ``convex``: the exact convex gated-ReLU conv student (FISTA on a lam path, selected by held-out
  activation loss);
* ``convex_pruned_polished``: the same after optimal-set pruning (``prune_to_minimal``) and a group
  elastic-net refit of the kept gates (``convexedge.host.polish``), kept only where it lowers the
  held-out loss;
* ``convex_lowrank``: the ``convex`` student in neuron form (``convexedge.host.lowrank``): per-gate
  SVD, the fewest neurons (global singular-value order) whose least-squares-refitted second layer is
  within ``--lowrank-tolerance`` of the unfactored student's held-out activation loss. BM and
  non-convex students are trained again at *its* size (rows with ``size_of: convex_lowrank``);
* ``convex_blocks``: one convex student per block of the span (``layer3`` -> ``layer3.0/.1/.2``),
  fitted in sequence on the previous students' outputs (``convexedge.host.distill.fit_chain``), each
  in neuron form when within ``--block-tolerance``; baselines are trained again at its size
  (``size_of: convex_blocks``);
* ``nonconvex_blocks`` (with ``convex_blocks``): the same depth trained the usual way: one
  conv kxk -> ReLU -> conv 1x1 student per block, each of its convex link's size, trained with Adam in
  sequence (on the previous non-convex students' outputs) for its link's wall time;
* ``bm``: the conv Burer-Monteiro form ``CNN3_1x1(CNN2(z) * 1[CNN1(z) >= 0])`` with CNN1 frozen,
  trained with Adam;
* ``nonconvex``: conv kxk -> ReLU -> conv 1x1 of the convex student's parameter count, Adam;
* ``magnitude_pruned``: the teacher span globally magnitude-pruned to that count, fine-tuned;
* ``convex+kd`` (``--kd``, last span only): the model with the convex student swapped in, fine-tuned
  end to end (every weight) with KD from the teacher (temperature 4) on the same K-per-class
  unlabeled images. It changes weights outside the span, so it is a separate row and never enters
  the label-free summary figures.

BM, non-convex and pruned students get the same data and the same wall time as the convex solve
(the solve's seconds, at least ``--min-budget``; for the ``convex_lowrank`` size, the solve's plus the
factorization's seconds). Labels: the K images per class are chosen with the
training labels (choosing a class-balanced sample needs them); capture, solves and training read
images and activations only. Labels are read again only for top-1 on the test sets: the 10,000
JPEG-decoded CIFAR-10 test images (``shared/data/cifar10``) and the exact test images 0..999
(``models/cifar10``). Parameters count the gates; MACs of the pruned span count surviving weights.

Run: ``python -m benchmarks.distill [--model resnet20|resnet18] [--quick] [--spans last,last2]
[--samples 10,100,500] [--kinds ...] [--kd] [--merge]``; writes ``benchmarks/results/distill.json``
and ``distill.png``. With ``--merge`` the rows of other (model, span, K) cells, and of student
kinds not re-run in a cell, are kept.
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks._common import RESULTS, environment, results_lock, table, write_json
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
    capture_span,
    expand_blocks,
    fit_chain,
    fit_path,
    infer_geometry,
    make_gates,
    select_by_validation,
    span_module,
    swap_span_,
)
from convexedge.host.evaluate import count_macs, count_parameters, top1
from convexedge.host.lowrank import LowRankConfig, neuron_student
from convexedge.host.polish import PolishConfig, polish
from convexedge.host.prune import prune_to_minimal
from convexedge.host.solvers import FistaConfig
from convexedge.host.students import GatedConvStudent, StudentChain
from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
KINDS = (
    "convex",
    "convex_pruned_polished",
    "convex_lowrank",
    "convex_blocks",
    "nonconvex_blocks",
    "bm",
    "nonconvex",
    "magnitude_pruned",
)


def _load_resnet20(weights: str | None = None):
    if weights is not None:
        raise SystemExit("--weights applies to --model resnet18 only")
    return load_teacher().eval(), teacher_normalization()


def _load_resnet18(weights: str | None = None):
    from convexedge.models.resnet18_cifar import RESNET18_WEIGHTS, load_resnet18, resnet18_normalization

    w = Path(weights) if weights else RESNET18_WEIGHTS
    return load_resnet18(w, w.with_suffix(".json")).eval(), resnet18_normalization(w.with_suffix(".json"))


#: per model: loader -> (model, (mean, std)), spans, the head after the last stage, weights file
MODELS = {
    "resnet20": {
        "load": _load_resnet20,
        "spans": {"last": ("layer3",), "last2": ("layer2", "layer3")},
        "head": lambda m, h: m.linear(m.pool(h).flatten(1)),
        "weights": "models/resnet20_cifar10.npz (bundled)",
    },
    "resnet18": {
        "load": _load_resnet18,
        "spans": {"last": ("layer4",), "last2": ("layer3", "layer4")},
        "head": lambda m, h: m.fc(m.avgpool(h).flatten(1)),
        "weights": "~/.cache/convexedge/resnet18_cifar10.npz (trained by convexedge.models.train_resnet18)",
    },
}
SPANS = MODELS["resnet20"]["spans"]


# ------------------------------------------------------------------ prefix / span / head of a ResNet
def _features(model, images, span, transform, batch=250) -> np.ndarray:
    """Activations entering ``span`` (the forward stops there)."""
    return capture_span(model, list(span), images, transform=transform, batch_size=batch, outputs=False)[0]


def _span_module(model: nn.Module, span: tuple[str, ...]) -> nn.Module:
    return span_module(model, list(span))


@torch.no_grad()
def _top1(model, student: nn.Module, feats: np.ndarray, labels: np.ndarray, batch=500, head=None) -> float:
    student.eval()
    logits = []
    for s in range(0, feats.shape[0], batch):
        logits.append(head(model, student(torch.from_numpy(feats[s : s + batch]))).numpy())
    return top1(np.concatenate(logits), labels)


@torch.no_grad()
def _full_top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, transform, batch=500) -> float:
    model.eval()
    out = [
        model(torch.from_numpy(transform(images[s : s + batch]))).numpy()
        for s in range(0, len(images), batch)
    ]
    return top1(np.concatenate(out), labels)


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
            "model": args.model,
            "student": student_kind,
            "span": name,
            "samples_per_class": k,
            "top1": _top1(teacher, module, tests["feats"][span][0], tests["jpeg"].y, head=args.head),
            "top1_exact1k": _top1(teacher, module, tests["feats"][span][1], tests["exact"].y, head=args.head),
            "test_images": len(tests["jpeg"]),
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
    if args.kd and span == args.last_span:
        _kd_row(args, teacher, span, convex, x, n_val, tests, transform, rows, record_base=rows[-1])
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
    if "convex_pruned_polished" in args.kinds:
        _pruned_polished(args, problem, val_problem, chosen, solve_s, G, geom, record)
    sizes = [("convex", convex, solve_s)]
    if "convex_lowrank" in args.kinds:
        t0 = time.perf_counter()
        lowrank, lr = neuron_student(problem, val_problem, chosen.result.V, G, geom, output_relu=True,
                                     config=LowRankConfig(tolerance=args.lowrank_tolerance))  # fmt: skip
        lr_s = solve_s + time.perf_counter() - t0
        record(
            "convex_lowrank",
            lowrank,
            lr_s,
            {"neurons": lr.neurons, "active_gates": lowrank.num_gates, "lam_ratio": chosen.lam_ratio,
             "val_loss": lr.val_loss, "val_loss_unfactored": lr.val_loss_full, "accepted": lr.accepted,
             "candidates": lr.candidates,
             "criterion": "held-out 1/(2n)||pred - Y||^2 (pre-ReLU) within tolerance of the unfactored"},
        )  # fmt: skip
        sizes.append(("convex_lowrank", lowrank, lr_s))
    if "convex_blocks" in args.kinds:
        blocks = expand_blocks(teacher, list(span))
        t0 = time.perf_counter()
        links = fit_chain(
            teacher, blocks, x[:-n_val], x[-n_val:], transform=transform, gates=args.block_gates,
            lam_ratios=args.lam_ratios, config=FistaConfig(tol=args.tol, max_iter=args.max_iter),
            kernel_size=args.kernel_size, seed=args.seed, lowrank_tolerance=args.block_tolerance,
        )  # fmt: skip
        chain = StudentChain(*(link.student for link in links))
        chain_s = time.perf_counter() - t0
        record(
            "convex_blocks",
            chain,
            chain_s,
            {"blocks": [{"block": lk.block, "kind": lk.kind, "lam_ratio": lk.lam_ratio, "neurons": lk.neurons,
                         "active_gates": lk.active_gates, "val_loss": lk.val_loss} for lk in links],
             "gates_per_block": args.block_gates, "tolerance": args.block_tolerance},
        )  # fmt: skip
        sizes.append(("convex_blocks", chain, chain_s))
        if "nonconvex_blocks" in args.kinds:
            _nonconvex_chain(args, teacher, links, x, n_val, transform, record)
    if not {"bm", "nonconvex", "magnitude_pruned"} & set(args.kinds):
        return rows
    for size_of, ref, seconds in sizes:
        if args.baseline_sizes and size_of not in args.baseline_sizes:
            continue
        _baselines(args, span, span_mod, ref, geom, c_out, seconds, base, fit_in, fit_out, val_in, val_out,
                   record, size_of=size_of)  # fmt: skip
    return rows


def _pruned_polished(args, problem, val_problem, chosen, solve_s, G, geom, record) -> None:
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


def _baselines(args, span, span_mod, convex, geom, c_out, solve_s, base, fit_in, fit_out, val_in, val_out,
               record, size_of="convex") -> None:  # fmt: skip

    # equal-size baselines, same data and wall time as the convex student they are sized to
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
    jobs = [(kind, student, True) for kind, student in students.items() if kind in args.kinds]
    # the pruned teacher at milder compressions: where the size/accuracy curve meets the teacher
    span_total = base["span_params"][span]
    for factor in args.prune_compressions if "magnitude_pruned" in args.kinds and size_of == "convex" else ():
        jobs.append(("magnitude_pruned", PrunedSpan(span_mod, int(span_total / factor)), False))
    for kind, student, equal in jobs:
        res = train_student(student, fit_in, fit_out, cfg, val=(val_in, val_out))
        record(
            kind, res.module, res.seconds,
            {"status": res.status, "epochs": res.epochs, "val_loss": res.val_loss, "time_budget_s": budget,
             "equal_size": equal, "size_of": size_of},
        )  # fmt: skip


def _nonconvex_chain(args, teacher, links, x, n_val, transform, record) -> None:
    """``nonconvex_blocks``: a ReLU student per block, each of its convex link's size and wall time."""
    students, seconds, prev = [], 0.0, None
    for k, link in enumerate(links):
        z_in, z_out = capture_span(teacher, [link.block], x, transform=transform)
        z_in = z_in if prev is None else prev
        geom, c = link.student.geom, z_out.shape[1]
        student = ReluConvStudent(
            geom, c, relu_hidden_for(span_parameters(link.student), geom, c), seed=args.seed + k
        )
        cfg = TrainConfig(
            epochs=args.epochs, time_budget_s=max(args.min_budget, link.seconds), lr=args.lr,
            batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
        res = train_student(student, z_in[:-n_val], z_out[:-n_val], cfg, val=(z_in[-n_val:], z_out[-n_val:]))
        seconds += res.seconds
        students.append(res.module.eval())
        with torch.no_grad():
            prev = np.concatenate(
                [res.module(torch.from_numpy(z_in[i : i + 500])).numpy() for i in range(0, len(z_in), 500)]
            )
    extra = {"size_of": "convex_blocks", "equal_size": True, "blocks": [lk.block for lk in links]}
    record("nonconvex_blocks", StudentChain(*students), seconds, extra)


def _kd_row(args, teacher, span, convex, x, n_val, tests, transform, rows, record_base) -> None:
    """``convex+kd``: the swapped model fine-tuned end to end with KD (T=4) on the cell's images."""
    import copy

    from convexedge.host.kd import KDConfig, kd_finetune

    model = swap_span_(copy.deepcopy(teacher), list(span), copy.deepcopy(convex))
    cfg = KDConfig(temperature=4.0, epochs=args.kd_epochs, time_budget_s=args.kd_seconds, lr=args.kd_lr,
                   batch_size=args.kd_batch_size, seed=args.seed)  # fmt: skip
    res = kd_finetune(model, teacher, x[:-n_val], transform, cfg, val_images=x[-n_val:])
    row = {
        **record_base,
        "student": "convex+kd",
        "top1": _full_top1(res.model, tests["jpeg"].x, tests["jpeg"].y, transform),
        "top1_exact1k": _full_top1(res.model, tests["exact"].x, tests["exact"].y, transform),
        "seconds": record_base["seconds"] + res.seconds,
        "kd_seconds": res.seconds,
        "kd": {**cfg.to_dict(), "status": res.status, "epochs": res.epochs, "steps": res.steps,
               "val_kd_loss_before": res.val_loss_before, "val_kd_loss": res.val_loss},
        "label_free": False,
        "note": "end-to-end KD fine-tune of every weight of the swapped model on the same unlabeled images; "
        "not a label-free activation-matching figure (excluded from the summary)",
    }  # fmt: skip
    rows.append(row)
    print(f"  {'convex+kd':24s} top-1 {100 * row['top1']:.1f}% (exact1k {100 * row['top1_exact1k']:.1f}%) "
          f"KD {res.seconds:.0f}s, {res.epochs} epochs", flush=True)  # fmt: skip


def summarize(rows: list[dict], last: str = "layer3") -> dict:
    """The issue's summary over ``rows`` of one model (span = last stage for the comparisons).

    Label-free figures only: ``convex+kd`` rows (end-to-end KD) are left out.
    """
    rows = [r for r in rows if r["student"] != "convex+kd"]
    teacher = next(r for r in rows if r["student"] == "teacher" and r["span"] == last)
    t = teacher["top1"]
    out: dict = {"teacher_top1": t, "teacher_top1_exact1k": teacher["top1_exact1k"]}

    def find(kind: str, k: int, size_of: str = "convex") -> dict | None:
        return next(
            (
                r
                for r in rows
                if r["student"] == kind and r["span"] == last and r["samples_per_class"] == k
                and r.get("equal_size", True) and r.get("size_of", "convex") == size_of
            ),
            None,
        )  # fmt: skip

    for k in sorted({r["samples_per_class"] for r in rows if r["samples_per_class"]}):
        cv, nc, cpp = find("convex", k), find("nonconvex", k), find("convex_pruned_polished", k)
        if cv and nc:
            out[f"convex_minus_nonconvex_at_{k}pc"] = 100 * (cv["top1"] - nc["top1"])
            if cpp:
                out[f"pruned_polished_minus_nonconvex_at_{k}pc"] = 100 * (cpp["top1"] - nc["top1"])
        for kind, tag in (("convex_lowrank", "lowrank"), ("convex_blocks", "blocks")):
            cv_k, nc_k = find(kind, k), find("nonconvex", k, kind)
            if cv_k and nc_k:
                out[f"{tag}_minus_nonconvex_at_{k}pc"] = 100 * (cv_k["top1"] - nc_k["top1"])
                out[f"{tag}_span_compression_at_{k}pc"] = cv_k["span_compression"]
        cb, ncb = find("convex_blocks", k), find("nonconvex_blocks", k, "convex_blocks")
        if cb and ncb:
            out[f"blocks_minus_nonconvex_blocks_at_{k}pc"] = 100 * (cb["top1"] - ncb["top1"])
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


def _plot(rows: list[dict], path: Path, test_label: str) -> None:
    """One panel per (model, span): top-1 vs span parameters, one curve per student kind and K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r.get("model", "resnet20"), r["span"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (model, span) in zip(axes[0], panels, strict=True):
        sel_rows = [r for r in rows if r.get("model", "resnet20") == model and r["span"] == span]
        kinds = (*KINDS, "convex+kd")
        ks = sorted({r["samples_per_class"] for r in sel_rows if r["samples_per_class"]})
        for ci, kind in enumerate(kinds):
            pts = sorted(
                (r["span_params"], 100 * r["top1"], r["samples_per_class"])
                for r in sel_rows
                if r["student"] == kind or (kind == "convex" and r["student"] == "convex_path")
            )
            for k in sorted({p[2] for p in pts}):
                sel = [p for p in pts if p[2] == k]
                style = ("-", "--", ":", "-.")[ks.index(k) % 4]
                marker = ("o", "s", "^", "D")[ks.index(k) % 4]
                ax.plot(
                    [p[0] for p in sel], [p[1] for p in sel], marker=marker, ls=style, color=f"C{ci}",
                    label=f"{kind} K={k}", ms=4,
                )  # fmt: skip
        teacher = [r for r in sel_rows if r["student"] == "teacher"]
        if teacher:
            ax.axhline(100 * teacher[0]["top1"], color="k", ls="--", lw=1, label="teacher")
        ax.set_xscale("log")
        ax.set_xlabel("span parameters (gates counted)")
        ax.set_ylabel(f"top-1 % ({test_label})")
        ax.set_title(f"{model}, span {span}")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(MODELS), default="resnet20", help="teacher")
    ap.add_argument(
        "--weights",
        default=None,
        help="resnet18 weights .npz (default ~/.cache/convexedge/resnet18_cifar10.npz)",
    )
    ap.add_argument("--quick", action="store_true", help="1 span, K=10, 1,000 test images (minutes)")
    ap.add_argument("--spans", default=None, help="comma list of last,last2 (default: last,last2)")
    ap.add_argument("--samples", default=None, help="comma list of images per class (default 10,100,500)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"students to run (convex always runs): {KINDS}")
    ap.add_argument("--kd", action="store_true", help="add the convex+kd row (last span)")
    ap.add_argument("--kd-epochs", type=int, default=30, help="KD epochs (upper bound)")
    ap.add_argument("--kd-seconds", type=float, default=120.0, help="KD time budget per cell")
    ap.add_argument("--kd-lr", type=float, default=3e-4)
    ap.add_argument("--kd-batch-size", type=int, default=32)
    ap.add_argument("--train-data", default=str(SHARED / "cifar10"), help="train_*.npz pool (with labels)")
    ap.add_argument("--test-data", default=str(SHARED / "cifar10"), help="test_*.npz shards (10k JPEG)")
    ap.add_argument("--test-images", type=int, default=None, help="limit of JPEG test images")
    ap.add_argument("--exact-images", type=int, default=None, help="limit of the exact test images (1,000)")
    ap.add_argument("--gates", type=int, default=8)
    ap.add_argument("--kernel-size", type=int, default=3)
    ap.add_argument("--lam-ratios", default="0.1,0.03,0.01,0.003,0.001")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=500)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument(
        "--baseline-sizes", default="",
        help="comma list of students whose size the baselines are trained at (default: every one run)",
    )  # fmt: skip
    ap.add_argument("--block-gates", type=int, default=4, help="convex_blocks: gates per block student")
    ap.add_argument(
        "--block-tolerance", type=float, default=0.1,
        help="convex_blocks: neuron-form tolerance per block (a size knob: 0.02 keeps the stage's size)",
    )  # fmt: skip
    ap.add_argument(
        "--lowrank-tolerance", type=float, default=0.02,
        help="convex_lowrank: relative held-out loss increase allowed over the unfactored student",
    )  # fmt: skip
    ap.add_argument("--epochs", type=int, default=1000, help="upper bound; the time budget ends training")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--min-budget", type=float, default=1.0, help="minimum training seconds of baselines")
    ap.add_argument(
        "--prune-compressions", default="1.5,2,3", help="extra magnitude-pruned sizes (span compression)"
    )
    ap.add_argument("--merge", action="store_true", help="keep rows of other cells/kinds in the JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--out", default=None, help="result name under benchmarks/results/ (distill[_quick])")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    spec = MODELS[args.model]
    spans = [s for s in (args.spans or ("last" if args.quick else "last,last2")).split(",") if s]
    for s in spans:
        if s not in spec["spans"]:
            raise SystemExit(f"unknown span {s!r}; choose from {sorted(spec['spans'])}")
    kinds = tuple(k for k in args.kinds.split(",") if k)
    for k in kinds:
        if k not in KINDS:
            raise SystemExit(f"unknown student kind {k!r}; choose from {KINDS}")
    args.kinds = kinds
    args.baseline_sizes = tuple(k for k in args.baseline_sizes.split(",") if k)
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
    span_of = {s: spec["spans"][s] for s in spans}
    args.last_span = spec["spans"]["last"]

    teacher, (mean, std) = spec["load"](args.weights)
    head = spec["head"]

    def transform(x: np.ndarray) -> np.ndarray:
        return normalize_images(x, mean, std)

    train = load_images(args.train_data, "train")  # labels used only to draw K images per class
    jpeg = load_images(args.test_data, "test", limit=args.test_images)
    exact = load_images(BUNDLED_DATA_DIR, "test", limit=args.exact_images)
    t0 = time.perf_counter()
    tests = {"jpeg": jpeg, "exact": exact, "feats": {}}
    for sp in span_of.values():
        tests["feats"][sp] = (
            _features(teacher, jpeg.x, sp, transform),
            _features(teacher, exact.x, sp, transform),
        )
    base = {
        "model_params": count_parameters(teacher),
        "model_macs": count_macs(teacher, (3, 32, 32)),
        "span_params": {sp: count_parameters(_span_module(teacher, sp)) for sp in span_of.values()},
        "span_macs": {},
    }
    for sp in span_of.values():
        base["span_macs"][sp] = count_macs(_span_module(teacher, sp), tuple(tests["feats"][sp][0].shape[1:]))
    args_json = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "head"}
    args.head = head
    rows = []
    for sp in span_of.values():
        span_mod = _span_module(teacher, sp).eval()
        t_jpeg = _top1(teacher, span_mod, tests["feats"][sp][0], jpeg.y, head=head)
        t_exact = _top1(teacher, span_mod, tests["feats"][sp][1], exact.y, head=head)
        print(
            f"teacher {args.model}: top-1 {100 * t_jpeg:.2f}% on {len(jpeg)} JPEG test images, "
            f"{100 * t_exact:.1f}% on the exact 1k ({time.perf_counter() - t0:.0f}s for test features)"
        )
        rows.append({
            "model": args.model, "student": "teacher", "span": "+".join(sp), "samples_per_class": None,
            "top1": t_jpeg, "top1_exact1k": t_exact, "test_images": len(jpeg),
            "span_params": base["span_params"][sp],
            "span_params_gates_from_seed": base["span_params"][sp], "model_params": base["model_params"],
            "span_compression": 1.0, "model_compression": 1.0, "macs": base["model_macs"],
            "span_macs": base["span_macs"][sp], "seconds": 0.0,
        })  # fmt: skip
        for k in samples:
            print(f"{args.model} span {'+'.join(sp)}, {k} images per class", flush=True)
            rows.extend(run_cell(args, teacher, sp, k, train, tests, transform, base))

    held = ExitStack()  # --merge runs may overlap: read, merge and write under one lock
    held.enter_context(results_lock(args.out))
    path = RESULTS / f"{args.out}.json"
    old_meta = {}
    if args.merge and path.exists():
        import json

        old_payload = json.loads(path.read_text())
        old_meta = old_payload.get("meta", {})
        new_kinds: dict[tuple, set] = {}
        for r in rows:  # a row is (student, size_of): baselines sized to another student are other rows
            new_kinds.setdefault((r["model"], r["span"], r["samples_per_class"]), set()).add(
                (r["student"], r.get("size_of", "convex"))
            )
        old = []
        for r in old_payload["rows"]:
            r.setdefault("model", "resnet20")
            kinds_here = new_kinds.get((r["model"], r["span"], r["samples_per_class"]), set())
            if (r["student"], r.get("size_of", "convex")) not in kinds_here:
                old.append(r)
        rows = old + rows
    models_present = sorted({r.get("model", "resnet20") for r in rows})
    by_model = {}
    for m in models_present:
        m_rows = [r for r in rows if r.get("model", "resnet20") == m]
        if any(
            r["student"] == "teacher" and r["span"] == "+".join(MODELS[m]["spans"]["last"]) for r in m_rows
        ):
            by_model[m] = summarize(m_rows, "+".join(MODELS[m]["spans"]["last"]))
    summary = {**by_model.get("resnet20", {}), "by_model": by_model}
    runs = list(old_meta.get("runs", []))
    runs.append(
        {"model": args.model, "args": args_json, "test_images": len(jpeg), "environment": environment()}
    )
    payload = {
        "meta": {
            **environment(),
            "teachers": {m: MODELS[m]["weights"] for m in models_present},
            "train_data": args.train_data,
            "test_data": f"{args.test_data} (JPEG-decoded test images; how many: rows' test_images, "
            "meta.runs[*].test_images; 10,000 where absent)",
            "test_data_exact1k": str(BUNDLED_DATA_DIR),
            "label_use": "labels choose the K-per-class training sample and score top-1; capture, solves, "
            "pruning, polishing and all student training read images/activations only; convex+kd rows "
            "fine-tune the whole swapped model with KD on the same unlabeled images and are excluded from "
            "the summary",
            "params_note": "gates counted; magnitude_pruned counts surviving weights + BatchNorm affine; "
            "its MACs count surviving weights only",
            "args": args_json,
            "runs": runs[-20:],
            "spans": {m: {s: list(v) for s, v in MODELS[m]["spans"].items()} for m in models_present},
        },
        "rows": rows,
        "summary": summary,
    }
    print(
        table(
            [r for r in rows if r.get("model", "resnet20") == args.model],
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
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in by_model.get(args.model, {}).items()})
    path = write_json(args.out, payload)
    held.close()
    _plot(rows, RESULTS / f"{args.out}.png", f"{len(jpeg):,} JPEG test images")
    print(f"wrote {path} and {RESULTS / (args.out + '.png')}")
    return payload


if __name__ == "__main__":
    main()
