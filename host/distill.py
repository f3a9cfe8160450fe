"""Label-free convex distillation of one conv span: captured activations -> convex student.

Steps, each with a named input and output:

1. :func:`build_conv_problem`: captured ``(z_in, z_out)`` -> :class:`GatedProblem` (patch matrix,
   targets, gate masks) for a student of given :class:`ConvGeometry` and :class:`GateSpec`.
2. :func:`fit_path`: problem -> one :class:`SolveResult` per ``lam`` on a decreasing path
   (``lam = ratio * lam_max``), each solve warm-started from the previous one.
3. :func:`select_by_validation`: pick the path point with the lowest activation-matching loss on
   held-out *unlabeled* samples (no labels anywhere on this path).
4. :class:`~convexedge.host.students.GatedConvStudent` from the selected ``V`` and gates.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from convexedge.device.errors import ArtifactError, DataError
from convexedge.host.gates import GateSpec, gate_masks, sample_gates
from convexedge.host.solvers import FistaConfig, GatedProblem, SolveResult, solve
from convexedge.host.students import (
    ConvGeometry,
    GatedConvStudent,
    LowRankGatedConvStudent,
    StudentChain,
    image_to_rows,
    patch_matrix,
)

__all__ = [
    "PathPoint",
    "build_conv_problem",
    "ChainLink",
    "capture_span",
    "check_span",
    "expand_blocks",
    "fit_chain",
    "fit_path",
    "infer_geometry",
    "load_compressed_model",
    "load_student",
    "make_gates",
    "save_chain_student",
    "save_lowrank_student",
    "save_student",
    "select_by_validation",
    "span_module",
    "swap_span_",
]

log = logging.getLogger(__name__)


def infer_geometry(in_shape: Sequence[int], out_shape: Sequence[int], kernel_size: int = 3) -> ConvGeometry:
    """Conv geometry mapping per-sample ``in_shape`` (C, H, W) to the spatial size of ``out_shape``.

    The padding is ``kernel_size // 2`` ("same" for stride 1); the stride is the smallest that maps
    ``(H, W)`` to ``(H', W')``.
    """
    if len(in_shape) != 3 or len(out_shape) != 3:
        raise DataError(
            f"conv students need (C, H, W) activations, got in {tuple(in_shape)}, out {tuple(out_shape)}"
        )
    for stride in range(1, max(in_shape[1], 1) + 1):
        geom = ConvGeometry(
            in_channels=in_shape[0], kernel_size=kernel_size, stride=stride, padding=kernel_size // 2
        )
        if geom.out_hw(in_shape[1], in_shape[2]) == tuple(out_shape[1:]):
            return geom
    raise DataError(
        f"no {kernel_size}x{kernel_size} conv maps {tuple(in_shape)} to "
        f"{tuple(out_shape)}; pick an odd kernel_size"
    )


def build_conv_problem(
    z_in: np.ndarray,
    z_out: np.ndarray,
    geom: ConvGeometry,
    gates: np.ndarray,
    *,
    dtype: str = "float32",
    device: str = "cpu",
) -> GatedProblem:
    """The convex problem of a conv student.

    Args:
        z_in: (B, C, H, W) captured span inputs.
        z_out: (B, c, H', W') captured span outputs (the targets).
        geom: patch geometry; ``geom.out_hw(H, W)`` must equal ``(H', W')``.
        gates: (geom.d, P) fixed gates.

    Returns:
        ``GatedProblem`` with ``Z`` (B*H'*W', geom.d), ``Y`` (B*H'*W', c), masks (B*H'*W', P).
    """
    if z_in.shape[0] != z_out.shape[0]:
        raise DataError(f"{z_in.shape[0]} captured inputs but {z_out.shape[0]} outputs")
    if geom.out_hw(*z_in.shape[2:]) != tuple(z_out.shape[2:]):
        raise DataError(
            f"geometry {geom} maps {z_in.shape[2:]} to {geom.out_hw(*z_in.shape[2:])}, "
            f"but the outputs are {z_out.shape[2:]}"
        )
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    zin = torch.as_tensor(np.asarray(z_in), dtype=tdtype)
    Z = patch_matrix(zin, geom)
    Y = image_to_rows(torch.as_tensor(np.asarray(z_out), dtype=tdtype))
    masks = gate_masks(Z, torch.as_tensor(gates, dtype=tdtype))
    return GatedProblem.from_arrays(Z, Y, masks, dtype=dtype, device=device)


@dataclass
class PathPoint:
    """One solve of the path and its held-out activation-matching loss."""

    lam_ratio: float
    result: SolveResult
    active_gates: int
    val_loss: float  # 1/(2n) ||pred - target||^2 on held-out unlabeled samples


def fit_path(
    problem: GatedProblem,
    lam_ratios: Sequence[float],
    config: FistaConfig,
    *,
    val_problem: GatedProblem | None = None,
    on_iteration: Callable[[int, float, float], None] | None = None,
) -> list[PathPoint]:
    """Solve at ``lam = r * lam_max`` for each ``r`` in decreasing ``lam_ratios``, warm-starting.

    The objective is ``1/(2n) ||sum_i D_i Z V_i - Y||_F^2 + lam * sum_i ||V_i||_F``.
    """
    ratios = list(lam_ratios)
    if not ratios or any(r <= 0 for r in ratios) or ratios != sorted(ratios, reverse=True):
        raise ValueError(f"lam_ratios must be positive and decreasing, got {ratios}")
    lam_max = problem.lam_max()
    points, V0 = [], None
    for r in ratios:
        t0 = time.perf_counter()
        res = solve(problem, r * lam_max, config, V0=V0, progress=on_iteration)
        V0 = res.V
        active = int((res.V.flatten(1).abs().amax(1) > 0).sum())
        if val_problem is not None:
            val = float(val_problem.smooth(res.V.to(val_problem.Z.device))[0])
        else:
            val = float("nan")
        log.info(
            "lam=%.3g lam_max: %d iterations, %d active gates, %.1fs",
            r,
            res.iterations,
            active,
            time.perf_counter() - t0,
        )
        points.append(PathPoint(lam_ratio=r, result=res, active_gates=active, val_loss=val))
    return points


def select_by_validation(points: Sequence[PathPoint]) -> PathPoint:
    """The path point with the lowest held-out loss (label-free model selection)."""
    if not points:
        raise ValueError("no path points to select from")
    if all(np.isnan(p.val_loss) for p in points):
        return points[-1]
    return min(points, key=lambda p: (np.nan_to_num(p.val_loss, nan=np.inf), p.active_gates))


def make_gates(d: int, P: int, seed: int, *, linear_gate: bool = True) -> tuple[GateSpec, np.ndarray]:
    """A Gaussian :class:`GateSpec` and its (d, P) gate matrix."""
    spec = GateSpec(kind="gaussian", d=d, P=P, seed=seed, linear_gate=linear_gate)
    return spec, sample_gates(spec)


def save_student(
    folder: str,
    name: str,
    V: np.ndarray,
    G: np.ndarray,
    meta: dict,
) -> tuple[str, str]:
    """Write ``name.npz`` (``V`` (P, d, c), ``G`` (d, P), float32, no pickle) and ``name.json``.

    The JSON holds ``meta`` plus the format version, shapes, dtypes and the SHA-256 of each array.
    The JSON is written last and atomically, so a reader that finds it finds a complete ``.npz``.
    """
    arrays = {"V": np.ascontiguousarray(V, np.float32), "G": np.ascontiguousarray(G, np.float32)}
    return _write_student(folder, name, arrays, meta)


def save_lowrank_student(
    folder: str, name: str, student: LowRankGatedConvStudent, meta: dict
) -> tuple[str, str]:
    """Write a :class:`LowRankGatedConvStudent` like :func:`save_student`.

    Arrays: ``A`` (d, R), ``W`` (R, c), ``G`` (d, P) float32 and ``gate_of`` (R,) int32; the
    manifest's ``kind`` is ``"gated_conv_lowrank"``.
    """
    arrays, _ = _student_arrays(student)
    meta = {
        **meta,
        "kind": "gated_conv_lowrank",
        "geometry": student.geom.to_dict(),
        "output_relu": student.output_relu,
    }
    return _write_student(folder, name, arrays, meta)


def _student_arrays(student: torch.nn.Module) -> tuple[dict[str, np.ndarray], str]:
    """The arrays and manifest kind of one gated conv student (full or neuron form)."""
    if isinstance(student, LowRankGatedConvStudent):
        A, W, G, gate_of = student.factors()
        return {
            "A": np.ascontiguousarray(A.cpu().numpy(), np.float32),
            "W": np.ascontiguousarray(W.cpu().numpy(), np.float32),
            "G": np.ascontiguousarray(G.cpu().numpy(), np.float32),
            "gate_of": np.ascontiguousarray(gate_of.cpu().numpy(), np.int32),
        }, "gated_conv_lowrank"
    if isinstance(student, GatedConvStudent):
        P = student.num_gates
        G = torch.cat([student.gate_weight.reshape(P, -1).T, student.gate_bias.reshape(1, P)], dim=0)
        return {
            "V": np.ascontiguousarray(student.solution().cpu().numpy(), np.float32),
            "G": np.ascontiguousarray(G.cpu().numpy(), np.float32),
        }, "gated_conv"
    raise TypeError(f"not a gated conv student: {type(student).__name__}")


def save_chain_student(folder: str, name: str, chain: StudentChain, meta: dict) -> tuple[str, str]:
    """Write a :class:`StudentChain` like :func:`save_student`: one ``.npz`` whose arrays are
    prefixed ``s0_``, ``s1_``, ... and a manifest of kind ``"gated_conv_chain"`` listing each
    student's kind, geometry and output ReLU."""
    arrays, parts = {}, []
    for k, student in enumerate(chain):
        a, kind = _student_arrays(student)
        arrays.update({f"s{k}_{key}": v for key, v in a.items()})
        parts.append({"kind": kind, "geometry": student.geom.to_dict(), "output_relu": student.output_relu})
    return _write_student(folder, name, arrays, {**meta, "kind": "gated_conv_chain", "students": parts})


def _write_student(folder: str, name: str, arrays: dict[str, np.ndarray], meta: dict) -> tuple[str, str]:
    import hashlib
    import json
    import os
    from pathlib import Path

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").unlink(missing_ok=True)  # the manifest marks a complete pair: remove it first
    np.savez(out / f"{name}.npz", **arrays)
    manifest = {
        "format": "convexedge.student",
        "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "arrays": {
            k: {
                "shape": list(a.shape),
                "dtype": str(a.dtype),
                "sha256": hashlib.sha256(a.tobytes()).hexdigest(),
            }
            for k, a in arrays.items()
        },
        **meta,
    }
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / f"{name}.json")
    return str(out / f"{name}.npz"), str(out / f"{name}.json")


_STUDENT_ARRAYS = {"gated_conv": ("V", "G"), "gated_conv_lowrank": ("A", "W", "G", "gate_of")}
_KINDS = (*_STUDENT_ARRAYS, "gated_conv_chain")


def _build_student(kind: str, arrays: dict[str, np.ndarray], part: dict, where: str) -> torch.nn.Module:
    missing = [k for k in _STUDENT_ARRAYS[kind] if k not in arrays]
    if missing:
        raise ArtifactError(f"{where}: a {kind} student needs arrays {missing}, which are not in the file")
    geom = ConvGeometry(**part["geometry"])
    relu = bool(part.get("output_relu", False))
    try:
        if kind == "gated_conv_lowrank":
            return LowRankGatedConvStudent(
                arrays["A"], arrays["W"], arrays["G"], arrays["gate_of"], geom, output_relu=relu
            )
        return GatedConvStudent(arrays["V"], arrays["G"], geom, output_relu=relu)
    except ValueError as exc:
        raise ArtifactError(f"{where}: inconsistent {kind} student ({exc})") from None


def load_student(
    folder: str, name: str = "student"
) -> tuple[GatedConvStudent | LowRankGatedConvStudent | StudentChain, dict]:
    """Read what :func:`save_student`, :func:`save_lowrank_student` or :func:`save_chain_student`
    wrote, checking format, shapes, dtypes and SHA-256 of every array.

    Returns:
        The student (:class:`GatedConvStudent`, :class:`LowRankGatedConvStudent` for kind
        ``gated_conv_lowrank``, :class:`StudentChain` for ``gated_conv_chain``) and its manifest.

    Raises:
        ArtifactError: a file is missing, unreadable, of another format/version/kind, or an array
            does not match the manifest.
    """
    import hashlib
    import json
    import zipfile
    from pathlib import Path

    root = Path(folder)
    where = str(root / f"{name}.npz")
    try:
        manifest = json.loads((root / f"{name}.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root / (name + '.json')} not found: not a convexedge student folder") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{root / (name + '.json')} is not valid JSON ({exc})") from None
    if manifest.get("format") != "convexedge.student" or manifest.get("format_version") != 1:
        raise ArtifactError(
            f"{root / (name + '.json')}: expected convexedge.student version 1, got "
            f"{manifest.get('format')!r} version {manifest.get('format_version')!r}"
        )
    kind = manifest.get("kind", "gated_conv")
    if kind not in _KINDS:
        raise ArtifactError(
            f"{root / (name + '.json')}: unknown student kind {kind!r}; known: {list(_KINDS)}"
        )
    specs = manifest.get("arrays", {})
    try:
        with np.load(root / f"{name}.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in specs}
    except (FileNotFoundError, KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"{where}: missing, truncated or incomplete ({exc})") from None
    for key, arr in arrays.items():
        spec = specs[key]
        if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
            raise ArtifactError(
                f"{name}.npz: {key} is {arr.dtype}{list(arr.shape)}, manifest says "
                f"{spec['dtype']}{spec['shape']}"
            )
        if hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != spec["sha256"]:
            raise ArtifactError(f"{name}.npz: SHA-256 of {key} does not match the manifest")
    if kind != "gated_conv_chain":
        return _build_student(kind, arrays, manifest, where), manifest
    parts = manifest.get("students") or []
    if not parts or any(p.get("kind") not in _STUDENT_ARRAYS for p in parts):
        raise ArtifactError(f"{where}: a gated_conv_chain manifest must list its students' kinds")
    students = []
    for k, part in enumerate(parts):
        sub = {key.removeprefix(f"s{k}_"): a for key, a in arrays.items() if key.startswith(f"s{k}_")}
        students.append(_build_student(part["kind"], sub, part, f"{where} (student {k})"))
    return StudentChain(*students), manifest


def load_compressed_model(
    folder: str, name: str = "student", *, teacher: torch.nn.Module | None = None
) -> torch.nn.Module:
    """The teacher with the saved student swapped in at its span, in eval mode.

    The teacher is rebuilt from the manifest for the bundled ResNet-20 and the trained ResNet-18
    (weights checked by name); for a model from a user factory pass it as ``teacher`` (it is copied,
    not modified). A multi-module span puts the student at its first module and ``nn.Identity`` at
    the others.

    Raises:
        ArtifactError: the files fail their checks, or the teacher cannot be rebuilt here.
    """
    import copy

    from convexedge.models import TEACHER_WEIGHTS, load_teacher
    from convexedge.models.resnet18_cifar import RESNET18_WEIGHTS, load_resnet18

    student, manifest = load_student(folder, name)
    info = manifest.get("teacher", {})
    span = list(manifest.get("span_modules") or [manifest["span"]])
    if teacher is not None:
        model = copy.deepcopy(teacher)
    elif info.get("architecture") == "resnet18" and info.get("weights") == RESNET18_WEIGHTS.name:
        model = load_resnet18()
    elif info.get("weights") == TEACHER_WEIGHTS.name:
        model = load_teacher()
    else:
        raise ArtifactError(
            f"{folder}: the student was fitted for teacher {info!r}; only the bundled "
            f"{TEACHER_WEIGHTS.name} and {RESNET18_WEIGHTS.name} can be rebuilt here "
            "(pass teacher= for other models)"
        )
    return swap_span_(model, span, student).eval()


# ----------------------------------------------------------------------------- spans of any model
def check_span(model: torch.nn.Module, names: Sequence[str]) -> list[str]:
    """Validate a span: one module name, or consecutive siblings (the children of one parent).

    Args:
        model: the teacher.
        names: ``["layer3"]``, or ``["layer2", "layer3"]`` (first and last of the span; every
            sibling registered between them belongs to the span too).

    Returns:
        The full list of the span's module names, in registration order.

    Raises:
        DataError: a name is not a module of ``model``, the names have different parents, or the
            last one is registered before the first.
    """
    modules = dict(model.named_modules())
    top = [n for n in modules if n and "." not in n]
    names = list(names)
    if not names or len(names) > 2:
        raise DataError(f"a span is one module name or 'first,last', got {names}")
    for n in names:
        if not n or n not in modules:
            raise DataError(f"span module {n!r} not found in the model; top-level modules are {top}")
    first, last = names[0], names[-1]
    parent, _, a = first.rpartition(".")
    parent_last, _, b = last.rpartition(".")
    if parent != parent_last:
        raise DataError(
            f"span modules {first!r} and {last!r} must be children of the same module; "
            f"got parents {parent!r} and {parent_last!r}"
        )
    siblings = [n for n, _ in modules[parent].named_children()]
    i, j = siblings.index(a), siblings.index(b)
    if j < i:
        raise DataError(f"span end {last!r} is registered before its start {first!r}; swap them")
    prefix = f"{parent}." if parent else ""
    return [prefix + n for n in siblings[i : j + 1]]


def span_module(model: torch.nn.Module, span: Sequence[str]) -> torch.nn.Module:
    """The teacher's span as one module (the module itself, or a ``Sequential`` of the siblings)."""
    modules = dict(model.named_modules())
    if len(span) == 1:
        return modules[span[0]]
    return torch.nn.Sequential(*[modules[n] for n in span])


def swap_span_(model: torch.nn.Module, span: Sequence[str], student: torch.nn.Module) -> torch.nn.Module:
    """Put ``student`` at ``span[0]`` and ``nn.Identity`` at the other span modules, in place."""
    from convexedge.host.swap import swap_

    swap_(model, span[0], student)
    for n in span[1:]:
        swap_(model, n, torch.nn.Identity())
    return model


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_span(
    model: torch.nn.Module,
    span: Sequence[str],
    images: np.ndarray,
    *,
    transform: Callable[[np.ndarray], np.ndarray],
    batch_size: int = 250,
    device: str = "cpu",
    outputs: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Inputs of ``span[0]`` and outputs of ``span[-1]`` of ``model`` on ``images`` (label-free).

    The forward stops right after the span (nothing later runs). Only ``images`` are read.

    Args:
        images: (N, H, W, 3) uint8.
        transform: uint8 batch -> float32 NCHW batch the model expects.
        outputs: also return the span outputs (``False`` stops at the span input).

    Returns:
        ``z_in`` (N, C, H, W) and ``z_out`` (N, c, H', W') float32 (``None`` when ``outputs=False``).
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            f"capture_span: expected (N, H, W, 3) uint8 images, got {getattr(images, 'shape', '?')}"
        )
    modules = dict(model.named_modules())
    rec: dict[str, torch.Tensor] = {}

    def pre_hook(_m, args):
        rec["in"] = args[0]
        if not outputs:
            raise _Stop

    def post_hook(_m, _args, out):
        rec["out"] = out
        raise _Stop

    handles = [modules[span[0]].register_forward_pre_hook(pre_hook)]
    if outputs:
        handles.append(modules[span[-1]].register_forward_hook(post_hook))
    ins, outs = [], []
    model.eval().to(device)
    try:
        for s in range(0, images.shape[0], batch_size):
            rec.clear()
            try:
                model(torch.from_numpy(transform(images[s : s + batch_size])).to(device))
            except _Stop:
                pass
            if "in" not in rec or (outputs and "out" not in rec):
                raise DataError(f"span {list(span)} did not run in the model's forward pass")
            ins.append(rec["in"].detach().float().cpu().numpy())
            if outputs:
                outs.append(rec["out"].detach().float().cpu().numpy())
    finally:
        for h in handles:
            h.remove()
    return np.concatenate(ins), (np.concatenate(outs) if outputs else None)


# ----------------------------------------------------------------------------- one student per block
def expand_blocks(model: torch.nn.Module, span: Sequence[str]) -> list[str]:
    """The blocks of a span: each span module that is an ``nn.Sequential`` with children is replaced
    by its children (``layer3`` -> ``layer3.0``, ``layer3.1``, ``layer3.2``); other modules stay."""
    modules = dict(model.named_modules())
    out = []
    for name in span:
        mod = modules[name]
        kids = (
            [f"{name}.{k}" for k, _ in mod.named_children()] if isinstance(mod, torch.nn.Sequential) else []
        )
        out.extend(kids or [name])
    return out


@dataclass
class ChainLink:
    """One block of :func:`fit_chain`: its student and how it was chosen."""

    block: str
    student: torch.nn.Module
    kind: str  # "convex" or "convex_lowrank" (the neuron form, when accepted and smaller)
    lam_ratio: float
    active_gates: int
    neurons: int | None
    val_loss: float  # held-out activation loss of the kept form, on the block's outputs
    seconds: float


def fit_chain(
    model: torch.nn.Module,
    blocks: Sequence[str],
    fit_x: np.ndarray,
    val_x: np.ndarray,
    *,
    transform: Callable[[np.ndarray], np.ndarray],
    gates: int,
    lam_ratios: Sequence[float],
    config: FistaConfig,
    kernel_size: int = 3,
    seed: int = 0,
    lowrank_tolerance: float | None = 0.02,
    device: str = "cpu",
) -> list[ChainLink]:
    """One convex student per block, fitted in sequence on unlabeled images (label-free).

    Block ``k``'s student matches the teacher block's outputs, taking as input the outputs of the
    students fitted before it (so the chain is trained on what it will see; block 0 takes the
    teacher's input). Each student is selected on a lam path by held-out loss, then replaced by its
    neuron form (:func:`convexedge.host.lowrank.factorize`) when that is within
    ``lowrank_tolerance`` and smaller (``None``: keep the full form).

    Returns:
        One :class:`ChainLink` per block; ``StudentChain(*(l.student for l in links))`` maps the
        span's input to its output.
    """
    from convexedge.host.lowrank import LowRankConfig, neuron_student

    def apply(student: torch.nn.Module, z: np.ndarray) -> np.ndarray:
        student.eval()
        with torch.no_grad():
            return np.concatenate(
                [
                    student(torch.from_numpy(z[i : i + 500]).to(device)).cpu().numpy()
                    for i in range(0, len(z), 500)
                ]
            )

    links: list[ChainLink] = []
    prev_fit = prev_val = None
    for k, block in enumerate(blocks):
        t0 = time.perf_counter()
        fit_in, fit_out = capture_span(model, [block], fit_x, transform=transform, device=device)
        val_in, val_out = capture_span(model, [block], val_x, transform=transform, device=device)
        if prev_fit is not None:
            fit_in, val_in = prev_fit, prev_val
        geom = infer_geometry(fit_in.shape[1:], fit_out.shape[1:], kernel_size)
        relu = bool(fit_out.min() >= 0)
        _, G = make_gates(geom.d, gates, seed + k)
        prob = build_conv_problem(fit_in, fit_out, geom, G, device=device)
        val = build_conv_problem(val_in, val_out, geom, G, device=device)
        points = fit_path(prob, lam_ratios, config, val_problem=val)
        chosen = select_by_validation(points)
        student: torch.nn.Module = GatedConvStudent(chosen.result.V.float().cpu(), G, geom, output_relu=relu)
        kind, neurons, val_loss = "convex", None, chosen.val_loss
        if lowrank_tolerance is not None and bool(chosen.result.V.abs().amax() > 0):
            small, lr = neuron_student(prob, val, chosen.result.V, G, geom, output_relu=relu,
                                       config=LowRankConfig(tolerance=lowrank_tolerance))  # fmt: skip
            if lr.accepted and small.num_parameters() < student.num_parameters():
                student, kind, neurons, val_loss = small, "convex_lowrank", lr.neurons, lr.val_loss
        student = student.to(device)
        prev_fit, prev_val = apply(student, fit_in), apply(student, val_in)
        links.append(
            ChainLink(
                block=block,
                student=student,
                kind=kind,
                lam_ratio=chosen.lam_ratio,
                active_gates=chosen.active_gates,
                neurons=neurons,
                val_loss=val_loss,
                seconds=time.perf_counter() - t0,
            )
        )
        log.info("block %s: %s, %.1fs", block, kind, links[-1].seconds)
    return links
