"""``convexedge distill``: the convex distillation front end, and its data-parallel solve.

Two paths share the command:

* :func:`run_pipeline` (``--model M --span S --samples-per-class K``): for ``resnet20`` (bundled),
  ``resnet18`` (CIFAR-stem, ``convexedge.models.train_resnet18``) or any ``pkg.module:factory``
  model, draw ``K * num_classes`` unlabeled training images at random, capture the span's input and
  output, solve the convex student's lam path, prune and polish, swap, evaluate on the test split
  and save the compressed model and a report (JSON + PNG). One process.
* :func:`run_distill` (no ``--model`` / ``--samples-per-class``): the data-parallel capture and
  solve of one span of the bundled ResNet-20, described below.

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

__all__ = ["DistillOptions", "PipelineOptions", "TeacherSpec", "resolve_model", "run_distill", "run_pipeline"]

log = logging.getLogger(__name__)


def _check_path_settings(val_fraction: float, lam_ratios) -> None:
    """The held-out fraction and the lam path shared by both distill front ends."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must lie in (0, 0.5), got {val_fraction}")
    ratios = list(lam_ratios)
    decreasing = all(b < a for a, b in zip(ratios, ratios[1:], strict=False))
    if not ratios or any(r <= 0 for r in ratios) or not decreasing:
        raise ValueError(f"lam_ratios must be positive and strictly decreasing, got {ratios}")


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
        _check_path_settings(self.val_fraction, self.lam_ratios)
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


# ============================================================================ the full front end
@dataclass(frozen=True, kw_only=True)
class PipelineOptions:
    """Settings of ``convexedge distill --model M --span S --samples-per-class K``.

    Capture, solve, prune/polish, swap, evaluate, save: one process (``--nproc`` is the
    data-parallel solve of :class:`DistillOptions`).
    """

    model: str = "resnet20"  # resnet20 | resnet18 | pkg.module:factory
    weights: str | None = None  # resnet18 only: weights .npz (manifest: the .json beside it)
    spans: tuple[tuple[str, ...], ...] = (("layer3",),)  # each: (module,) or (first, last)
    samples_per_class: int = 100  # K: K * num_classes images are drawn at random, without labels
    out: str = "convexedge-distill"
    data: str | None = None  # train_*.npz (capture; labels never read) + test_*.npz (evaluation)
    test_images: int | None = None  # limit of test images (None: all)
    val_fraction: float = 0.1  # of the drawn images, held out for label-free model selection
    gates: int = 8
    kernel_size: int = 3
    lam_ratios: tuple[float, ...] = (0.1, 0.03, 0.01)
    tol: float = 1e-4
    max_iter: int = 500
    polish: bool = True  # optimal-set pruning + group elastic-net refit, kept if held-out loss drops
    lowrank: bool = True  # neuron form (per-gate SVD + least-squares refit), kept if within tolerance
    lowrank_tolerance: float = 0.02  # relative held-out loss increase allowed by the neuron form
    per_block: bool = False  # also fit one student per block of the span, in sequence; saved instead
    kd: bool = False  # extra row: end-to-end KD fine-tune of the swapped model (not label-free figures)
    kd_temperature: float = 4.0
    kd_epochs: int = 20
    kd_seconds: float | None = None  # time budget of the KD fine-tune
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples_per_class < 1:
            raise ValueError(f"samples_per_class must be >= 1, got {self.samples_per_class}")
        if not self.spans or any(not s or len(s) > 2 for s in self.spans):
            raise ValueError(f"each span is one module name or 'first,last', got {self.spans}")
        _check_path_settings(self.val_fraction, self.lam_ratios)
        if self.gates < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"gates must be >= 1 and kernel_size odd, got {self.gates}, {self.kernel_size}")
        if self.test_images is not None and self.test_images < 1:
            raise ValueError(f"test_images must be >= 1, got {self.test_images}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if not self.lowrank_tolerance >= 0:
            raise ValueError(f"lowrank_tolerance must be >= 0, got {self.lowrank_tolerance}")


@dataclass
class TeacherSpec:
    """A resolved ``--model``: the model (eval mode), its input normalisation and its identity."""

    model: torch.nn.Module
    mean: list[float]
    std: list[float]
    identity: dict


_DEFAULT_MEAN, _DEFAULT_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def resolve_model(name: str, weights: str | None = None) -> TeacherSpec:
    """``resnet20`` (bundled), ``resnet18`` (trained CIFAR-stem ResNet-18) or ``pkg.module:factory``.

    A factory is called without arguments and must return an ``nn.Module`` (with its weights);
    it may set ``input_mean`` / ``input_std`` attributes (RGB in [0, 1]), else the bundled teacher's
    normalisation is used. ``weights`` (ResNet-18 only) points at a ``.npz`` outside ``models/``;
    its manifest is the ``.json`` beside it.

    Raises:
        DataError: unknown name, unimportable module, missing factory, or not an ``nn.Module``.
        ArtifactError: the weights of a built-in model are missing or fail their checks.
    """
    import importlib

    from convexedge.models import TEACHER_WEIGHTS, load_teacher, teacher_normalization
    from convexedge.models.resnet18_cifar import RESNET18_WEIGHTS, load_resnet18, resnet18_normalization

    if name == "resnet20":
        mean, std = teacher_normalization()
        return TeacherSpec(
            load_teacher(), mean, std, {"weights": TEACHER_WEIGHTS.name, "architecture": "resnet20"}
        )
    if weights is not None and name != "resnet18":
        raise DataError(f"--weights applies to --model resnet18 only, got --model {name}")
    if name == "resnet18":
        w = Path(weights) if weights else RESNET18_WEIGHTS
        model = load_resnet18(w, w.with_suffix(".json"))
        mean, std = resnet18_normalization(w.with_suffix(".json"))
        return TeacherSpec(model, mean, std, {"weights": w.name, "architecture": "resnet18"})
    if ":" not in name:
        raise DataError(f"unknown model {name!r}; use resnet20, resnet18 or a factory 'pkg.module:function'")
    mod_name, _, fn_name = name.partition(":")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as exc:
        raise DataError(f"--model {name}: cannot import module {mod_name!r} ({exc})") from None
    factory = getattr(module, fn_name, None)
    if not callable(factory):
        raise DataError(f"--model {name}: module {mod_name!r} has no callable {fn_name!r}")
    model = factory()
    if not isinstance(model, torch.nn.Module):
        raise DataError(f"--model {name}: the factory returned {type(model).__name__}, not a torch nn.Module")
    mean = list(getattr(model, "input_mean", _DEFAULT_MEAN))
    std = list(getattr(model, "input_std", _DEFAULT_STD))
    return TeacherSpec(model.eval(), mean, std, {"factory": name, "architecture": "factory"})


def _check_chain(
    teacher: torch.nn.Module, span: list[str], images: np.ndarray, transform, device: str
) -> None:
    """Fail unless the teacher computes ``span[-1](...(span[0](x)))`` in sequence (swap is valid)."""
    import copy

    from convexedge.host.distill import span_module, swap_span_
    from convexedge.host.evaluate import predict_logits

    if len(span) == 1:
        return
    probe = swap_span_(copy.deepcopy(teacher), span, copy.deepcopy(span_module(teacher, span)))
    a = predict_logits(teacher, images, transform, batch_size=250, device=device)
    b = predict_logits(probe, images, transform, batch_size=250, device=device)
    if not np.allclose(a, b, rtol=1e-4, atol=1e-4):
        raise DataError(
            f"span {span} is not a sequential chain in the model's forward (replacing it by its modules "
            "in sequence changes the outputs); pick modules whose outputs feed each other directly"
        )


def _span_name(span: list[str]) -> str:
    return span[0] if len(span) == 1 else f"{span[0]}..{span[-1]}"


def run_pipeline(opt: PipelineOptions) -> dict:
    """Capture, solve, prune/polish, swap, evaluate and save, for every span of ``opt``.

    Label-free: the training images are loaded without labels (``load_images(..., labels=False)``),
    ``K * num_classes`` of them are drawn uniformly at random (no class balancing: that would read
    labels), and capture, solve, pruning, polishing and the optional KD read images and
    activations only. Labels are read once, for top-1 on the test split.

    Writes ``OUT/report.json``, ``OUT/accuracy_vs_params.png`` and per span the compressed model
    (``student.npz`` + ``student.json``, no pickle; in ``OUT`` for one span, ``OUT/<span>/``
    otherwise); with KD also ``kd_model.npz`` + ``kd_model.json`` (full state dict).

    Returns:
        The report.
    """
    import copy

    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import (
        build_conv_problem,
        capture_span,
        check_span,
        expand_blocks,
        fit_chain,
        fit_path,
        infer_geometry,
        make_gates,
        save_chain_student,
        save_lowrank_student,
        save_student,
        select_by_validation,
        span_module,
        swap_span_,
    )
    from convexedge.host.evaluate import count_macs, count_parameters, predict_logits, top1
    from convexedge.host.solvers import FistaConfig
    from convexedge.host.students import GatedConvStudent, StudentChain
    from convexedge.models import BUNDLED_DATA_DIR

    t_start = time.perf_counter()
    device = _device(opt.device)
    out = Path(opt.out)
    spec = resolve_model(opt.model, opt.weights)
    teacher = spec.model.to(device).eval()
    spans = [check_span(teacher, s) for s in opt.spans]  # fail fast on a bad name, before any work
    data_dir = Path(opt.data) if opt.data else BUNDLED_DATA_DIR

    def transform(x: np.ndarray) -> np.ndarray:
        return normalize_images(x, spec.mean, spec.std)

    train = load_images(data_dir, "train", labels=False)  # never the labels on this path
    probe_logits = predict_logits(teacher, train.x[:2], transform, batch_size=250, device=device)
    num_classes = int(probe_logits.shape[1])
    n = opt.samples_per_class * num_classes
    if n > len(train):
        raise DataError(
            f"{opt.samples_per_class} per class x {num_classes} classes = {n} images, but {data_dir} holds "
            f"{len(train)} training images; lower --samples-per-class"
        )
    draw = np.random.default_rng(opt.seed).choice(len(train), size=n, replace=False)
    n_val = max(2, int(round(opt.val_fraction * n)))
    if n - n_val < 2:
        raise DataError(
            f"{n} images leave too few to fit after holding out {n_val}; raise --samples-per-class"
        )
    fit_x, val_x = train.x[draw[:-n_val]], train.x[draw[-n_val:]]
    for s in spans:
        _check_chain(teacher, s, fit_x[:4], transform, device)

    test = load_images(data_dir, "test", limit=opt.test_images)  # labels: evaluation only
    t0 = time.perf_counter()
    teacher_top1 = top1(predict_logits(teacher, test.x, transform, batch_size=250, device=device), test.y)
    model_params = count_parameters(teacher)
    model_macs = count_macs(teacher, (3, *train.x.shape[1:3]))
    log.info(
        "teacher top-1 %.4f on %d test images (%.0fs)", teacher_top1, len(test), time.perf_counter() - t0
    )
    rows: list[dict] = []
    steps = (
        ["capture", "solve"]
        + (["pruning", "polishing"] if opt.polish else [])
        + (["neuron-form refit"] if opt.lowrank else [])
        + (["per-block students"] if opt.per_block else [])
        + (["KD"] if opt.kd else [])
    )
    report: dict = {
        "options": {k: (list(map(list, v)) if k == "spans" else v) for k, v in asdict(opt).items()},
        "teacher": {**spec.identity, "top1": teacher_top1, "params": model_params, "macs": model_macs},
        "label_use": (
            f"label-free: {n} training images ({opt.samples_per_class} x {num_classes} classes) drawn "
            "uniformly at random without reading labels (so classes are not exactly balanced); "
            f"{', '.join(steps)} read images and activations only; labels are read only "
            f"to score top-1 on the {len(test)} test images"
        ),
        "data": {
            "folder": str(data_dir),
            "train_pool": len(train),
            "drawn": n,
            "held_out": n_val,
            "test_images": len(test),
            "test_files": list(test.files),
        },
        "rows": rows,
        "spans": {},
    }

    for span in spans:
        name = _span_name(span)
        folder = out if len(spans) == 1 else out / name.replace("..", "__")
        t_span = time.perf_counter()
        tmod = span_module(teacher, span)
        span_params = count_parameters(tmod)
        t0 = time.perf_counter()
        fit_in, fit_out = capture_span(teacher, span, fit_x, transform=transform, device=device)
        val_in, val_out = capture_span(teacher, span, val_x, transform=transform, device=device)
        capture_s = time.perf_counter() - t0
        span_macs = count_macs(tmod, tuple(fit_in.shape[1:]))
        geom = infer_geometry(fit_in.shape[1:], fit_out.shape[1:], opt.kernel_size)
        output_relu = bool(fit_out.min() >= 0)  # a post-ReLU span output: clamp the student's too
        gspec, G = make_gates(geom.d, opt.gates, opt.seed)
        prob = build_conv_problem(fit_in, fit_out, geom, G, device=device)
        val_prob = build_conv_problem(val_in, val_out, geom, G, device=device)
        t0 = time.perf_counter()
        points = fit_path(
            prob, opt.lam_ratios, FistaConfig(tol=opt.tol, max_iter=opt.max_iter), val_problem=val_prob
        )
        solve_s = time.perf_counter() - t0
        chosen = select_by_validation(points)

        row = _RowMaker(
            rows,
            teacher,
            test,
            transform,
            device,
            span,
            name,
            opt.samples_per_class,
            span_params,
            span_macs,
            model_params,
            model_macs,
            tuple(fit_in.shape[1:]),
        )
        rows.append(
            {
                "student": "teacher",
                "span": name,
                "samples_per_class": None,
                "top1": teacher_top1,
                "span_params": span_params,
                "span_params_gates_from_seed": span_params,
                "span_compression": 1.0,
                "model_params": model_params,
                "model_compression": 1.0,
                "macs": model_macs,
                "seconds": 0.0,
            }
        )
        path_rows = []
        for p in points:
            if p.active_gates == 0:
                continue
            st = GatedConvStudent(p.result.V.float().cpu(), G, geom, output_relu=output_relu)
            kind = "convex" if p is chosen else "convex_path"
            path_rows.append(
                row(
                    kind,
                    st,
                    p.result.seconds,
                    active_gates=p.active_gates,
                    lam_ratio=p.lam_ratio,
                    val_loss=p.val_loss,
                )
            )
        V_final, final_kind = chosen.result.V.float().cpu(), "convex"
        polish_info = None
        if opt.polish:
            from convexedge.host.polish import PolishConfig, polish
            from convexedge.host.prune import prune_to_minimal

            t0 = time.perf_counter()
            pr = prune_to_minimal(prob, chosen.result)
            pol = polish(prob, val_prob, pr.V.float(), PolishConfig())
            pp_s = time.perf_counter() - t0
            polish_info = {
                "pruned_active": pr.active_after,
                "kept": len(pol.kept),
                "improved": pol.improved,
                "val_loss_before": pol.val_loss_before,
                "val_loss_after": pol.val_loss_after,
                "seconds": pp_s,
            }
            st = GatedConvStudent(pol.V.float().cpu(), G, geom, output_relu=output_relu)
            row(
                "convex_pruned_polished",
                st,
                solve_s + pp_s,
                active_gates=len(pol.kept),
                val_loss=pol.val_loss_after,
                polish_improved=pol.improved,
            )
            if pol.improved:
                V_final, final_kind = pol.V.float().cpu(), "convex_pruned_polished"
        student = GatedConvStudent(V_final, G, geom, output_relu=output_relu)
        keep = np.abs(V_final.numpy()).reshape(V_final.shape[0], -1).max(1) > 0
        meta = {
            "span": span[0],
            "span_modules": span,
            "geometry": geom.to_dict(),
            "gates": gspec.to_dict(),
            "output_relu": output_relu,
            "lam": chosen.result.lam,
            "lam_ratio": chosen.lam_ratio,
            "teacher": spec.identity,
        }
        lowrank_info = None
        if opt.lowrank and bool(V_final.abs().amax() > 0):  # an all-zero student has no neurons
            from convexedge.host.lowrank import LowRankConfig, neuron_student

            t0 = time.perf_counter()
            small, lr = neuron_student(
                prob, val_prob, V_final.to(prob.Z.dtype), G, geom, output_relu=output_relu,
                config=LowRankConfig(tolerance=opt.lowrank_tolerance),
            )  # fmt: skip
            lr_s = time.perf_counter() - t0
            smaller = small.num_parameters() < student.num_parameters()
            lowrank_info = {
                "neurons": lr.neurons,
                "accepted": lr.accepted,
                "smaller": smaller,
                "val_loss": lr.val_loss,
                "val_loss_unfactored": lr.val_loss_full,
                "candidates": lr.candidates,
                "seconds": lr_s,
            }
            row("convex_lowrank", small, solve_s + lr_s, neurons=lr.neurons, val_loss=lr.val_loss)
            if lr.accepted and smaller:
                student, final_kind = small, "convex_lowrank"
        chain_info = None
        blocks = expand_blocks(teacher, span) if opt.per_block else []
        if len(blocks) > 1:
            t0 = time.perf_counter()
            links = fit_chain(
                teacher,
                blocks,
                fit_x,
                val_x,
                transform=transform,
                gates=opt.gates,
                lam_ratios=opt.lam_ratios,
                config=FistaConfig(tol=opt.tol, max_iter=opt.max_iter),
                kernel_size=opt.kernel_size,
                seed=opt.seed,
                lowrank_tolerance=opt.lowrank_tolerance if opt.lowrank else None,
                device=device,
            )
            chain = StudentChain(*(link.student for link in links))
            chain_s = time.perf_counter() - t0
            chain_info = {
                "blocks": [
                    {
                        "block": link.block,
                        "kind": link.kind,
                        "lam_ratio": link.lam_ratio,
                        "active_gates": link.active_gates,
                        "neurons": link.neurons,
                        "val_loss": link.val_loss,
                        "seconds": link.seconds,
                    }
                    for link in links
                ],
                "seconds": chain_s,
            }
            row("convex_blocks", chain, chain_s, blocks=blocks)
            student, final_kind = chain, "convex_blocks"
        if final_kind == "convex_blocks":
            save_chain_student(
                str(folder), "student", student, {**meta, "student_kind": final_kind, "blocks": blocks}
            )
        elif final_kind == "convex_lowrank":
            save_lowrank_student(str(folder), "student", student, {**meta, "student_kind": final_kind})
        else:
            save_student(
                str(folder),
                "student",
                student.solution().numpy(),
                G[:, keep] if keep.any() else G[:, :1],
                {
                    **meta,
                    "kind": "gated_conv",
                    "active_gate_indices": np.flatnonzero(keep).tolist(),
                    "student_kind": final_kind,
                },
            )
        span_report = {
            "modules": span,
            "input_shape": list(fit_in.shape[1:]),
            "output_shape": list(fit_out.shape[1:]),
            "geometry": geom.to_dict(),
            "output_relu": output_relu,
            "saved": str(folder / "student.npz"),
            "saved_kind": final_kind,
            "seconds": {"capture": capture_s, "solve": solve_s},
            "path": [
                {
                    "lam_ratio": p.lam_ratio,
                    "active_gates": p.active_gates,
                    "val_loss": p.val_loss,
                    "iterations": p.result.iterations,
                    "converged": p.result.converged,
                    "kkt_residual": p.result.kkt_residual,
                }
                for p in points
            ],
            "polish": polish_info,
            "lowrank": lowrank_info,
            "per_block": chain_info,
        }
        if opt.kd:
            from convexedge.host.kd import KDConfig, kd_finetune

            compressed = swap_span_(copy.deepcopy(teacher), span, copy.deepcopy(student))
            cfg = KDConfig(
                temperature=opt.kd_temperature,
                epochs=opt.kd_epochs,
                time_budget_s=opt.kd_seconds,
                seed=opt.seed,
                device=device,
            )
            kd = kd_finetune(compressed, teacher, fit_x, transform, cfg, val_images=val_x)
            kd_info = {**cfg.to_dict(), "status": kd.status, "epochs": kd.epochs}
            kd_info.update(val_kd_loss_before=kd.val_loss_before, val_kd_loss=kd.val_loss)
            row("convex+kd", student, kd.seconds, model=kd.model, kd=kd_info, note=_KD_NOTE)
            _save_state(
                folder / "kd_model",
                kd.model,
                {"span_modules": span, "teacher": spec.identity, "kd": cfg.to_dict()},
            )
        span_report["seconds"]["total"] = time.perf_counter() - t_span
        report["spans"][name] = span_report

    report["seconds"] = time.perf_counter() - t_start
    out.mkdir(parents=True, exist_ok=True)
    _plot_rows(rows, teacher_top1, out / "accuracy_vs_params.png", len(test))
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1, default=float))
    os.replace(tmp, out / "report.json")
    print(_pipeline_table(report))
    return report


_KD_NOTE = (
    "end-to-end fine-tune of every weight with KD from the teacher (T=4) on the same unlabeled images: "
    "not a label-free activation-matching figure"
)


class _RowMaker:
    """Scores a student swapped into the teacher at one span and appends its report row."""

    def __init__(
        self,
        rows,
        teacher,
        test,
        transform,
        device,
        span,
        name,
        k,
        span_params,
        span_macs,
        model_params,
        model_macs,
        in_shape,
    ) -> None:
        self.__dict__.update(locals())
        del self.__dict__["self"]

    def __call__(self, kind: str, student: torch.nn.Module, seconds: float, *, model=None, **extra) -> dict:
        import copy

        from convexedge.host.distill import swap_span_
        from convexedge.host.evaluate import count_macs, count_parameters, predict_logits, top1

        if model is None:
            model = swap_span_(copy.deepcopy(self.teacher), self.span, student)
        sp = count_parameters(student)
        kept = self.model_params - self.span_params + sp
        r = {
            "student": kind,
            "span": self.name,
            "samples_per_class": self.k,
            "top1": top1(
                predict_logits(model, self.test.x, self.transform, batch_size=250, device=self.device),
                self.test.y,
            ),
            "span_params": sp,
            "span_params_gates_from_seed": count_parameters(student, count_gates=False),
            "span_compression": self.span_params / sp,
            "model_params": kept,
            "model_compression": self.model_params / kept,
            "macs": self.model_macs - self.span_macs + count_macs(student, self.in_shape),
            "seconds": seconds,
            **extra,
        }
        self.rows.append(r)
        return r


def _save_state(stem: Path, model: torch.nn.Module, meta: dict) -> None:
    """Full state dict as ``stem.npz`` (float32, no pickle) + ``stem.json`` with a SHA-256 per array."""
    import hashlib

    arrays = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez(stem.with_suffix(".npz"), **arrays)
    manifest = {
        "format": "convexedge.weights",
        "format_version": 1,
        **meta,
        "sha256": {
            k: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest() for k, a in arrays.items()
        },
        "shapes": {k: list(a.shape) for k, a in arrays.items()},
        "dtypes": {k: str(a.dtype) for k, a in arrays.items()},
    }
    stem.with_suffix(".json").write_text(json.dumps(manifest, indent=1))


def _plot_rows(rows: list[dict], teacher_top1: float, path: Path, n_test: int) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    for ci, span in enumerate(sorted({r["span"] for r in rows})):
        conv = sorted(
            (r["span_params"], 100 * r["top1"])
            for r in rows
            if r["span"] == span and r["student"] in ("convex", "convex_path")
        )
        if conv:
            ax.plot(*zip(*conv, strict=True), "o-", color=f"C{ci}", label=f"convex path, {span}")
        for r in rows:
            if r["span"] != span:
                continue
            marker = {"teacher": "*", "convex_pruned_polished": "s", "convex+kd": "D"}.get(r["student"])
            if marker:
                mfc = None if r["student"] == "teacher" else "none"
                label = f"{r['student']}, {span}"
                ax.plot(
                    [r["span_params"]], [100 * r["top1"]], marker, color=f"C{ci}", ms=9, mfc=mfc, label=label
                )
    ax.axhline(100 * teacher_top1, color="k", ls="--", lw=1)
    ax.set(
        xscale="log",
        xlabel="parameters of the replaced span (gates counted)",
        ylabel=f"top-1 % ({n_test} test images)",
        title="accuracy vs span parameters",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def _pipeline_table(report: dict) -> str:
    lines = [
        f"convexedge distill: teacher {report['teacher'].get('architecture')} top-1 "
        f"{100 * report['teacher']['top1']:.2f}% ({report['data']['test_images']} test images); "
        f"{report['data']['drawn']} unlabeled images drawn at random",
        f"{'student':24s} {'span':16s} {'top-1':>7} {'span params':>12} {'x span':>7} {'x model':>8} "
        f"{'s':>7}",
    ]
    for r in report["rows"]:
        lines.append(
            f"{r['student']:24s} {r['span']:16s} {100 * r['top1']:6.2f}% {r['span_params']:>12,d} "
            f"{r['span_compression']:7.2f} {r['model_compression']:8.2f} {r['seconds']:7.1f}"
        )
    lines.append(report["label_use"])
    return "\n".join(lines)
