"""Quantization-aware refit of a convex student for its full-integer int8 TFLite file (label-free).

Why: in the int8 file the layers before the student run in int8, so the student sees a shifted
input, and its masks come from an int8 gate projection (rounded to the tensor's step, so gates near
zero flip). The fp32 student was fitted on the fp32 input; the teacher's own block is robust to the
shift, the one-layer student less so.

What (:func:`refit_student_for_int8`), on unlabeled images:

1. run the int8 file (LiteRT builtin kernels, no delegate) and read, per image, the dequantized
   tensor entering the student and the masks its ``GREATER_EQUAL`` computes (:func:`int8_student_inputs`);
2. the targets are the fp32 teacher's outputs of the replaced span on the same images;
3. solve the same convex problem as the fit (same gates, same ``lam``, group lasso, our FISTA) with
   ``Z`` from the int8 input and ``D`` from the int8 masks, warm-started at the fp32 student's ``V``.

The result is a new student (same gates, new ``V``) for the int8 file only; the fp32 student is not
changed. Re-quantising the refit model keeps the upstream layers, their weights and their calibrated
scales as they were (same inputs, same calibration images), and so the same masks; the caller checks it.
No label is read.

Measured (``convexedge demo`` student, 8 gates, refit on the 2000 bundled training images, 1k test
images; fp32 top-1 59.9%): with the quantizer's moving-average ranges int8 top-1 goes 55.9% -> 56.2%,
with min/max ranges (the default of :func:`~convexedge.converters.tflite.quantize_tflite_int8`)
60.5% -> 60.4% (top-1 agreement with the fp32 model 98.2% -> 95.8%: the refit V is another student);
the activation loss against the teacher only drops 47.73 -> 47.66. The int8 part of
the student's error is small next to its fit error (its loss against the fp32 student's own outputs on
the int8 inputs is 0.49), so a refit to the teacher cannot target it. The loss came from the calibration
ranges, not from the student; hence ``convexedge export --int8-refit`` is opt-in.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convexedge.device.errors import ArtifactError

__all__ = ["Int8RefitConfig", "int8_student_inputs", "refit_student_for_int8", "span_outputs"]


@dataclass(frozen=True, kw_only=True)
class Int8RefitConfig:
    """Settings of the int8 refit.

    Attributes:
        max_iter: FISTA iteration cap (warm start: few are needed).
        tol: relative KKT residual to stop at.
        dtype: solver dtype.
        device: torch device of the solve.
    """

    max_iter: int = 300
    tol: float = 1e-5
    dtype: str = "float32"
    device: str = "cpu"

    def __post_init__(self) -> None:
        if not isinstance(self.max_iter, int) or self.max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {self.max_iter!r}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol!r}")
        if self.dtype not in ("float32", "float64"):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype!r}")


def _producers(ops: list[dict]) -> dict[int, dict]:
    return {t: op for op in ops for t in op["outputs"]}


def _dequantized(detail: dict, value: np.ndarray) -> np.ndarray:
    if np.issubdtype(value.dtype, np.integer):
        q = detail["quantization_parameters"]
        scale, zero = np.asarray(q["scales"], np.float32), np.asarray(q["zero_points"], np.float32)
        if scale.size != 1:
            raise ArtifactError(f"tensor {detail['name']!r} is quantized per channel; expected per tensor")
        return ((value.astype(np.float32) - zero[0]) * scale[0]).astype(np.float32)
    return value.astype(np.float32)


def int8_student_inputs(path: str | Path, x: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per gated layer of the TFLite file: the (dequantized) tensor entering it and its masks, on ``x``.

    The layer is found from its ``GREATER_EQUAL``: its input comes (through ``DEQUANTIZE`` /
    ``QUANTIZE``) from the gate projection ``CONV_2D``, whose data input (through ``PAD``) is the
    layer's input. Runs with the builtin kernels (no delegate), the kernels TFLite Micro mirrors.

    Args:
        path: a ``.tflite`` (fp32 or full integer) with a batch-1 input.
        x: (N, ...) float32 model inputs (quantised with the file's input scale when it is int8).

    Returns:
        one ``(inputs, masks)`` per ``GREATER_EQUAL`` in graph order: ``inputs`` (N, C, H, W) float32
        and ``masks`` (N, *mask shape of the file) bool, in the file's layout (NHWC: (N, H', W', P)).

    Raises:
        ArtifactError: the file is missing or invalid, or a mask op is not fed by a ``CONV_2D``.
    """
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from convexedge.converters.tflite import _interpreter, _to_input

    _interpreter(path, delegates=False)  # existence and validity, with a clear error
    interp = Interpreter(
        model_path=str(path),
        experimental_preserve_all_tensors=True,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
    )
    interp.allocate_tensors()
    ops = interp._get_ops_details()
    made_by = _producers(ops)
    details = {t["index"]: t for t in interp.get_tensor_details()}

    def back(t: int, through: set[str]) -> int:
        while t in made_by and made_by[t]["op_name"] in through:
            t = made_by[t]["inputs"][0]
        return t

    layers = []
    for op in ops:
        if op["op_name"] != "GREATER_EQUAL":
            continue
        proj = back(op["inputs"][0], {"DEQUANTIZE", "QUANTIZE"})
        conv = made_by.get(proj)
        if conv is None or conv["op_name"] != "CONV_2D":
            raise ArtifactError(f"{path}: a GREATER_EQUAL is not fed by a gate projection CONV_2D")
        layers.append((back(conv["inputs"][0], {"PAD", "PADV2"}), op["outputs"][0]))
    inp = interp.get_input_details()[0]
    grabbed: list[tuple[list[np.ndarray], list[np.ndarray]]] = [([], []) for _ in layers]
    for i in range(len(x)):
        interp.set_tensor(inp["index"], _to_input(inp, x[i : i + 1]))
        interp.invoke()
        for (zs, ms), (z_idx, m_idx) in zip(grabbed, layers, strict=True):
            zs.append(_dequantized(details[z_idx], interp.get_tensor(z_idx)))
            ms.append(interp.get_tensor(m_idx).astype(bool))
    out = []
    for zs, ms in grabbed:
        z = np.concatenate(zs)
        if z.ndim != 4:
            raise ArtifactError(f"{path}: the gated layer's input has shape {z.shape[1:]}, expected 3-D")
        out.append((np.ascontiguousarray(z.transpose(0, 3, 1, 2)), np.concatenate(ms)))  # NHWC -> NCHW
    return out


def _masks_nchw(file_masks: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float]:
    """``file_masks`` (N, ...) in the axis order of ``reference`` (N, P, H, W) that agrees best with it."""
    best, best_agree = None, -1.0
    for perm in itertools.permutations(range(1, file_masks.ndim)):
        cand = file_masks.transpose(0, *perm)
        if cand.shape == reference.shape:
            agree = float((cand == reference).mean())
            if agree > best_agree:
                best, best_agree = cand, agree
    if best is None:
        raise ArtifactError(f"mask shape {file_masks.shape[1:]} matches no layout of {reference.shape[1:]}")
    return np.ascontiguousarray(best), best_agree


def span_outputs(model, span: str, x: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """Outputs (N, ...) of ``model.<span>`` on model inputs ``x`` (a forward hook; eval mode, no grad)."""
    import torch

    module = dict(model.named_modules()).get(span)
    if module is None:
        raise ValueError(f"the model has no module {span!r}")
    got: list[np.ndarray] = []
    handle = module.register_forward_hook(lambda _m, _i, out: got.append(out.detach().cpu().numpy()))
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
    finally:
        handle.remove()
    return np.concatenate(got)


def refit_student_for_int8(
    student,
    int8_path: str | Path,
    x: np.ndarray,
    targets: np.ndarray,
    lam: float,
    config: Int8RefitConfig = Int8RefitConfig(),
) -> tuple[Any, dict]:
    """Refit ``student``'s ``V`` to the input and masks it has inside the int8 file (label-free).

    Args:
        student: the fitted :class:`~convexedge.host.students.GatedConvStudent` (not modified).
        int8_path: the full-integer file quantised from the model holding ``student`` (one gated layer).
        x: (N, 3, H, W) float32 model inputs (normalised unlabeled images).
        targets: (N, c, H', W') the fp32 teacher's outputs of the span the student replaces, on ``x``.
        lam: the group-lasso strength of the fit (``student.json``'s ``lam``).
        config: solver settings.

    Returns:
        ``(refit_student, info)``: a new ``GatedConvStudent`` (same gates and geometry, refit ``V``) and
        a JSON-able dict (objective and activation-matching loss of both ``V`` on the int8 inputs,
        iterations, convergence, mask agreement of the file's masks with masks recomputed in float).

    Raises:
        ArtifactError: the file has no or several gated layers, or shapes do not match the student.
        ValueError: bad ``x`` / ``targets`` / ``lam``.
    """
    import torch

    from convexedge.host.solvers import FistaConfig, GatedProblem, group_norms, solve
    from convexedge.host.students import GatedConvStudent, image_to_rows, patch_matrix

    if not isinstance(student, GatedConvStudent):
        raise TypeError(f"student must be a GatedConvStudent, got {type(student).__name__}")
    x, targets = np.asarray(x, np.float32), np.asarray(targets, np.float32)
    if x.ndim != 4 or targets.ndim != 4 or len(x) != len(targets) or len(x) < 1:
        raise ValueError(f"x (N, C, H, W) and targets (N, c, H', W') must match in N; got {x.shape}, "
                         f"{targets.shape}")  # fmt: skip
    if not (np.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be finite and >= 0, got {lam!r}")
    t0 = time.perf_counter()
    layers = int8_student_inputs(int8_path, x)
    if len(layers) != 1:
        raise ArtifactError(f"{int8_path}: expected one gated layer, found {len(layers)}")
    z_in, file_masks = layers[0]
    geom, P, c = student.geom, student.num_gates, student.out_channels
    if z_in.shape[1] != geom.in_channels or targets.shape[1] != c:
        raise ArtifactError(f"the file's gated layer reads {z_in.shape[1:]}, the student {geom.in_channels} "
                            f"channels -> {c}; targets {targets.shape[1:]}")  # fmt: skip
    read_seconds = time.perf_counter() - t0
    tdtype = torch.float64 if config.dtype == "float64" else torch.float32
    Z = patch_matrix(torch.from_numpy(z_in).to(tdtype), geom)
    G = torch.cat([student.gate_weight.reshape(P, -1).T, student.gate_bias[None]], 0).to(tdtype)
    recomputed = (Z @ G >= 0).reshape(len(x), *targets.shape[2:], P).permute(0, 3, 1, 2).numpy()
    masks, mask_agree = _masks_nchw(file_masks, recomputed)
    D = torch.from_numpy(masks).permute(0, 2, 3, 1).reshape(-1, P)  # rows (b, h, w) like patch_matrix
    Y = image_to_rows(torch.from_numpy(targets).to(tdtype))
    problem = GatedProblem.from_arrays(Z, Y, D, dtype=config.dtype, device=config.device)
    V0 = student.solution().to(tdtype).to(config.device)
    before_loss = float(problem.smooth(V0)[0])
    before_objective = before_loss + lam * float(group_norms(V0.double(), problem.group).sum())
    t1 = time.perf_counter()
    res = solve(problem, lam, FistaConfig(max_iter=config.max_iter, tol=config.tol), V0=V0)
    V = res.V.float().cpu()
    refit = GatedConvStudent(V, G.float(), geom, output_relu=student.output_relu, drop_inactive=False)
    info = {
        "images": int(len(x)),
        "lam": float(lam),
        "gates": int(P),
        "loss_before": before_loss,  # 1/(2n) ||A(V) - Y||^2 on the int8 inputs and masks
        "loss_after": float(problem.smooth(res.V)[0]),
        "objective_before": before_objective,  # the convex objective at the fp32 student's V
        "objective_after": res.objective,
        "iterations": res.iterations,
        "converged": res.converged,
        "kkt_residual": res.kkt_residual,
        "mask_agreement_file_vs_float": mask_agree,  # the file's masks vs 1[Z g >= 0] on its own input
        "read_seconds": read_seconds,
        "solve_seconds": time.perf_counter() - t1,
        "config": asdict(config),
    }
    return refit.eval(), info
