"""``convexedge export``: rebuild a model, export it, prove parity on real images, write parity.json.

Formats: ``onnx`` (fp32), ``tflite`` (fp32), ``tflite-int8`` (full integer; writes the fp32 file it is
quantised from too), ``c`` (the device head as C, fp32 and int8 kernels), ``head`` (the device head
artifact). Each row of the report compares the export with its reference on the test images:
torch for the model formats, the numpy :class:`~convexedge.device.ConvexHead` for ``c`` and ``head``.

``tflite-int8`` takes its activation ranges from the calibration images (``int8_ranges``: min / max, or
the quantizer's moving average) and, for a student with ``int8_refit``, refits the student's ``V`` to
the input and masks it has inside the int8 file (:mod:`convexedge.converters.int8_refit`) before
quantising again; its row then carries ``int8_refit`` (applied, the int8 parity before the refit, the
solve, and checks that the upstream int8 layers and the masks did not change). For a student the row
also gives the teacher's top-1 and the int8 file's top-1 agreement with the teacher.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from convexedge.device.errors import ArtifactError

__all__ = ["FORMATS", "ExportOptions", "gate_agreement", "run_export", "torch_gate_masks"]

FORMATS = ("onnx", "tflite", "tflite-int8", "c", "head")
Format = Literal["onnx", "tflite", "tflite-int8", "c", "head"]


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Settings of ``convexedge export``."""

    model: str  # "teacher", a folder written by `convexedge demo`, or (c / head) a head store folder
    format: Format = "onnx"
    out: str = "convexedge-export"
    data: str | None = None  # folder of test_*.npz shards for the parity check; None = bundled
    test_images: int | None = None  # None = all test images of the folder
    calib: str | None = None  # folder of train_*.npz (calibration / head fit); None = bundled train slice
    calib_images: int = 500  # calibration images (int8 ranges, C-head int8 scale, head fit)
    # tflite-int8: activation ranges from the calibration images, "minmax" (over all of them) or "ema"
    # (the quantizer's moving average of per-image extremes; measured worse, see tflite.quantize_tflite_int8)
    int8_ranges: str = "minmax"
    # tflite-int8 of a student: refit its V to the input and masks it has inside the int8 file
    # (converters.int8_refit; label-free, same lam, warm start), then re-quantise. The fp32 files keep
    # the fitted student; only the int8 file gets the refit V. Ignored for the teacher (no student).
    # Off by default: measured on the demo's student it moves int8 top-1 by -0.1 points with minmax
    # ranges (+0.3 with ema ranges), lowers agreement with fp32 (98.2% -> 95.8%) and adds minutes;
    # see converters/int8_refit.py.
    int8_refit: bool = False
    int8_refit_images: int = 2000  # unlabeled training images (of `calib`) the refit runs the int8 file on

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}; got {self.format!r}")
        for name in ("calib_images", "int8_refit_images"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        from convexedge.converters.tflite import CALIBRATIONS

        if self.int8_ranges not in CALIBRATIONS:
            raise ValueError(
                f"int8_ranges must be one of {', '.join(CALIBRATIONS)}; got {self.int8_ranges!r}"
            )


# ----------------------------------------------------------------------------- gates
def torch_gate_masks(model, x: np.ndarray, batch_size: int = 500) -> list[np.ndarray]:
    """Masks ``1[conv(z, g_i) >= 0]`` of every gated conv student (:class:`GatedConvStudent`,
    :class:`LowRankGatedConvStudent`) in ``model`` on inputs ``x``.

    Returns:
        one (N, P, H, W) bool array per student, in module order.
    """
    import torch
    import torch.nn.functional as F

    from convexedge.host.students import GatedConvStudent, LowRankGatedConvStudent

    students = [m for m in model.modules() if isinstance(m, (GatedConvStudent, LowRankGatedConvStudent))]
    if not students:
        return []
    grabbed: dict[int, list[np.ndarray]] = {k: [] for k in range(len(students))}

    def hook(k):
        def fn(mod, inputs, _out):
            g = mod.geom
            proj = F.conv2d(inputs[0], mod.gate_weight, mod.gate_bias, g.stride, g.padding)
            grabbed[k].append((proj >= 0).cpu().numpy())

        return fn

    handles = [s.register_forward_hook(hook(k)) for k, s in enumerate(students)]
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(torch.from_numpy(np.ascontiguousarray(x[i : i + batch_size])))
    finally:
        for h in handles:
            h.remove()
    return [np.concatenate(grabbed[k]) for k in range(len(students))]


def gate_agreement(reference: list[np.ndarray], exported: list[np.ndarray]) -> float | None:
    """Fraction of mask entries on which the export agrees with the reference (``None``: no gates).

    The export may hold a mask in another layout (TFLite: NHWC); for each mask the axis order of the
    reference (batch axis fixed) that agrees best is used, so a layout change is not a disagreement.

    Raises:
        ArtifactError: the export has a different number of mask ops, or a mask of another size.
    """
    if not reference:
        return None
    if len(reference) != len(exported):
        raise ArtifactError(
            f"the export has {len(exported)} mask ops, the model {len(reference)} gated layers"
        )
    agree = total = 0
    for ref, exp in zip(reference, exported, strict=True):
        best = -1
        for perm in itertools.permutations(range(1, ref.ndim)):
            cand = ref.transpose(0, *perm)
            if cand.shape == exp.shape:
                best = max(best, int((cand == exp).sum()))
        if best < 0:
            raise ArtifactError(f"mask shape {exp.shape} of the export matches no layout of {ref.shape}")
        agree, total = agree + best, total + ref.size
    return agree / total


# ----------------------------------------------------------------------------- inputs
def _load_model(spec: str):
    from convexedge.host.distill import load_compressed_model
    from convexedge.models import load_teacher

    if spec == "teacher":
        return load_teacher().eval()
    path = Path(spec)
    if not path.exists():
        raise ArtifactError(
            f"model {spec!r} not found; pass 'teacher' or a folder written by `convexedge demo`"
        )
    if not path.is_dir():
        raise ArtifactError(
            f"model {spec!r} is a file; pass 'teacher' or a folder written by `convexedge demo`"
        )
    try:
        return load_compressed_model(str(path))
    except ArtifactError:
        raise
    except (OSError, ValueError, KeyError, EOFError) as exc:  # e.g. a truncated npz or bad JSON
        raise ArtifactError(f"{path}: cannot load the saved student ({type(exc).__name__}: {exc})") from None


def _images(folder: str | None, split: str, limit: int | None):
    from convexedge.host.data import load_images
    from convexedge.models import BUNDLED_DATA_DIR

    return load_images(Path(folder) if folder else BUNDLED_DATA_DIR, split, limit=limit)  # type: ignore[arg-type]


def _find_head(spec: str):
    """The head store at ``spec`` (or ``spec/heads``), or ``None``."""
    from convexedge.device import HeadStore

    if spec == "teacher":
        return None
    path = Path(spec)
    if not path.is_dir():
        raise ArtifactError(f"model {spec!r} is not 'teacher' or a folder")
    for cand in (path, path / "heads"):
        if (cand / "STATE.json").is_file():
            return HeadStore.open(cand).head
    return None


def _row(fmt: str, path: Path | None, parity, *, gates=None, ops=None, seconds=None) -> dict[str, Any]:
    from convexedge.converters.tflite import ops_outside_tflm

    tflm = fmt.startswith("tflite") and ops is not None
    return {
        "format": fmt,
        "file": None if path is None else str(path),
        "bytes": None if path is None else _size(path),
        "ops": ops,
        "all_ops_in_tflm": (not ops_outside_tflm(ops)) if tflm else None,
        "ops_outside_tflm": ops_outside_tflm(ops) if tflm else None,
        "max_abs_diff": parity.max_abs_diff,
        "top1_agreement": parity.top1_agreement,
        "top1_reference": parity.top1_reference,
        "top1": parity.top1_export,
        "gate_agreement": gates,
        "samples": parity.samples,
        "export_seconds": seconds,
    }


def _size(path: Path) -> int:
    return (
        sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if path.is_dir()
        else path.stat().st_size
    )


# ----------------------------------------------------------------------------- formats
def _model_rows(opt: ExportOptions, out: Path) -> list[dict[str, Any]]:
    import torch

    from convexedge.converters.parity import compare_outputs
    from convexedge.host.data import normalize_images
    from convexedge.models import teacher_normalization

    model = _load_model(opt.model)
    if opt.format == "tflite-int8" and opt.int8_refit and opt.model != "teacher":
        _check_refittable(Path(opt.model))
    mean, std = teacher_normalization()
    test = _images(opt.data, "test", opt.test_images)
    x = normalize_images(test.x, mean, std)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x[i : i + 500])).numpy() for i in range(0, len(x), 500)])
    ref_masks = torch_gate_masks(model, x)
    rows = []
    if opt.format == "onnx":
        from convexedge.converters.onnx import export_onnx, onnx_gate_masks, onnx_ops, run_onnx

        t0 = time.perf_counter()
        path = export_onnx(model, out / "model.onnx")
        sec = time.perf_counter() - t0
        gates = gate_agreement(ref_masks, onnx_gate_masks(path, x)) if ref_masks else None
        rows.append(_row("onnx", path, compare_outputs(ref, run_onnx(path, x), test.y), gates=gates,
                         ops=onnx_ops(path), seconds=sec))  # fmt: skip
        return rows
    from convexedge.converters.tflite import (
        export_tflite,
        quantize_tflite_int8,
        run_tflite,
        tflite_float_ops,
        tflite_gate_masks,
        tflite_ops,
    )

    t0 = time.perf_counter()
    fp32 = export_tflite(model, out / ("model.tflite" if opt.format == "tflite" else "model_fp32.tflite"))
    sec = time.perf_counter() - t0
    gates = gate_agreement(ref_masks, tflite_gate_masks(fp32, x)) if ref_masks else None
    rows.append(_row("tflite", fp32, compare_outputs(ref, run_tflite(fp32, x), test.y), gates=gates,
                     ops=tflite_ops(fp32), seconds=sec))  # fmt: skip
    if opt.format == "tflite-int8":
        calib = normalize_images(_images(opt.calib, "train", opt.calib_images).x, mean, std)
        t0 = time.perf_counter()
        refit = opt.int8_refit and opt.model != "teacher"
        plain = out / ("model_int8_before_refit.tflite" if refit else "model_int8.tflite")
        path = quantize_tflite_int8(fp32, plain, calib, ranges=opt.int8_ranges)
        info = None
        if refit:
            plain_parity = compare_outputs(ref, run_tflite(path, x), test.y)
            path, info = _int8_refit(opt, out, fp32_path=fp32, plain=plain, calib=calib)
            info["before_refit"] = {"file": str(plain), **plain_parity.to_dict()}
        sec = time.perf_counter() - t0
        gates = gate_agreement(ref_masks, tflite_gate_masks(path, x)) if ref_masks else None
        y8 = run_tflite(path, x)
        rows.append(_row("tflite-int8", path, compare_outputs(ref, y8, test.y), gates=gates,
                         ops=tflite_ops(path), seconds=sec))  # fmt: skip
        rows[-1]["float_ops"] = tflite_float_ops(path)  # what is not integer in the "int8" file
        rows[-1]["int8_ranges"] = opt.int8_ranges
        rows[-1]["int8_refit"] = info if refit else {"applied": False}
        if opt.model != "teacher":  # the int8 student against the teacher it replaces a block of
            from convexedge.models import load_teacher

            teacher = load_teacher().eval()
            with torch.no_grad():
                tref = np.concatenate(
                    [teacher(torch.from_numpy(x[i : i + 500])).numpy() for i in range(0, len(x), 500)]
                )
            vs = compare_outputs(tref, y8, test.y)
            rows[-1]["teacher_top1"] = vs.top1_reference
            rows[-1]["top1_agreement_with_teacher"] = vs.top1_agreement
    return rows


def _check_refittable(folder: Path) -> None:
    """The int8 refit re-solves a full convex student (``V``); refuse other kinds before any export."""
    import json

    kind = json.loads((folder / "student.json").read_text()).get("kind", "gated_conv")
    if kind != "gated_conv":
        raise ArtifactError(
            f"{folder}: the int8 refit re-solves the full convex student; this folder holds a {kind!r} "
            "student (export without --int8-refit, or distill with --no-lowrank)"
        )


def _int8_refit(opt: ExportOptions, out: Path, *, fp32_path: Path, plain: Path, calib: np.ndarray):
    """Refit the student's V on the int8 file ``plain``, re-export and re-quantise; returns (path, info)."""
    from convexedge.converters.int8_refit import (
        Int8RefitConfig,
        int8_student_inputs,
        refit_student_for_int8,
        span_outputs,
    )
    from convexedge.converters.tflite import export_tflite, quantize_tflite_int8
    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import load_student
    from convexedge.host.swap import swapped
    from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

    student, manifest = load_student(opt.model)
    if "lam" not in manifest:
        raise ArtifactError(
            f"{opt.model}/student.json has no 'lam'; cannot refit for int8 (use --no-int8-refit)"
        )
    mean, std = teacher_normalization()
    folder = Path(opt.calib) if opt.calib else BUNDLED_DATA_DIR
    images = load_images(folder, "train", labels=False, limit=opt.int8_refit_images).x  # no labels read
    xr = normalize_images(images, mean, std)
    targets = span_outputs(load_teacher().eval(), manifest["span"], xr)
    new_student, info = refit_student_for_int8(student, plain, xr, targets, float(manifest["lam"]),
                                               Int8RefitConfig())  # fmt: skip
    model = swapped(load_teacher(), manifest["span"], new_student).eval()
    fp32_refit = export_tflite(model, out / "model_fp32_int8_refit.tflite")
    path = quantize_tflite_int8(fp32_refit, out / "model_int8.tflite", calib, ranges=opt.int8_ranges)
    # the layers before the student, their calibrated scales and so the masks must be those of `plain`
    k = min(len(xr), 64)
    (z0, m0), (z1, m1) = int8_student_inputs(plain, xr[:k])[0], int8_student_inputs(path, xr[:k])[0]
    info.update(
        applied=True,
        fp32_refit_file=str(fp32_refit),
        fp32_file=str(fp32_path),
        upstream_unchanged=bool(z0.shape == z1.shape and np.array_equal(z0, z1)),
        masks_unchanged=bool(m0.shape == m1.shape and np.array_equal(m0, m1)),
        checked_images=k,
    )
    return path, info


def _head_rows(opt: ExportOptions, out: Path) -> list[dict[str, Any]]:
    from convexedge.converters.parity import compare_outputs
    from convexedge.device import HeadStore
    from convexedge.host.data import normalize_images
    from convexedge.host.head_export import HEAD_PRESETS, export_head, pooled_features
    from convexedge.models import load_teacher, teacher_normalization

    teacher = load_teacher().eval()
    mean, std = teacher_normalization()

    def transform(b: np.ndarray) -> np.ndarray:
        return normalize_images(b, mean, std)

    calib = _images(opt.calib, "train", opt.calib_images)
    head = _find_head(opt.model)
    t0 = time.perf_counter()
    if head is None:  # no head yet: fit one (label-free, teacher logits) on the calibration images
        if opt.model != "teacher":
            _load_model(opt.model)  # a demo folder without heads/: check it is one, then fit from the teacher
        store, _ = export_head(teacher, calib.x, transform, out / "heads", HEAD_PRESETS["mcu"])
        head = store.head
    elif opt.format == "head":
        HeadStore.create(out / "heads", head)
    fit_seconds = time.perf_counter() - t0
    span = head.info.get("input", {}).get("span", "layer2")
    grid = int(head.info.get("input", {}).get("pool", [2])[0])
    test = _images(opt.data, "test", opt.test_images)
    feats, _ = pooled_features(teacher, test.x, transform, span=span, grids=(grid,))
    ftest = feats[grid]
    if ftest.shape[1] != head.d_in:
        raise ArtifactError(f"the head reads {head.d_in} features, {span} pooled to {grid}x{grid} gives "
                            f"{ftest.shape[1]}")  # fmt: skip
    ref = head.predict(ftest)
    ref_masks = [head.masks(head.normalize(ftest))[:, head._active]]  # type: ignore[attr-defined]
    if opt.format == "head":
        loaded = HeadStore.open(out / "heads").head  # through the device loader: checksums verified
        exp_masks = [loaded.masks(loaded.normalize(ftest))[:, loaded._active]]  # type: ignore[attr-defined]
        return [_row("head", out / "heads", compare_outputs(ref, loaded.predict(ftest), test.y),
                     gates=gate_agreement(ref_masks, exp_masks), seconds=fit_seconds)]  # fmt: skip
    from convexedge.converters.c_head import compile_c_head, export_c_head, run_c_head

    cfeats, _ = pooled_features(teacher, calib.x, transform, span=span, grids=(grid,))
    t0 = time.perf_counter()
    files = export_c_head(head, out / "c", calib_features=cfeats[grid])
    lib = compile_c_head(files)
    sec = time.perf_counter() - t0
    rows = []
    for variant, fmt in (("f32", "c"), ("i8", "c-int8")):
        got, masks = run_c_head(lib, files.name, ftest, head.c, len(head._active), variant)  # type: ignore[attr-defined]
        parity = compare_outputs(ref, got, test.y)
        row = _row(fmt, files.header, parity, gates=gate_agreement(ref_masks, [masks]), seconds=sec)
        row["bytes"] = files.header.stat().st_size + files.source.stat().st_size
        rows.append(row)
    return rows


def run_export(opt: ExportOptions) -> dict:
    """Export ``opt.model`` in ``opt.format``, compare with its reference, print a table, write parity.json.

    Returns:
        The report: ``rows`` (one per file written; ``tflite-int8`` also reports the fp32 file it
        was quantised from, ``c`` its fp32 and int8 kernels) and ``options``.

    Raises:
        ArtifactError: the model, its student or its head is missing, truncated or inconsistent.
    """
    out = Path(opt.out)
    if opt.format in ("c", "head"):
        if opt.model != "teacher" and not Path(opt.model).exists():
            raise ArtifactError(
                f"model {opt.model!r} not found; pass 'teacher' or a `convexedge demo` folder"
            )
        out.mkdir(parents=True, exist_ok=True)
        rows = _head_rows(opt, out)
    else:
        model_check = _load_model(opt.model)  # fail fast, before any folder is made
        del model_check
        out.mkdir(parents=True, exist_ok=True)
        rows = _model_rows(opt, out)
    report = {"model": opt.model, "format": opt.format, "rows": rows, "options": asdict(opt)}
    (out / "parity.json").write_text(json.dumps(report, indent=1))
    print(format_table(rows))
    for r in rows:
        if r["ops"]:
            tflm = "" if r["all_ops_in_tflm"] is None else f" (all in TFLM: {r['all_ops_in_tflm']})"
            print(f"{r['format']} ops: {', '.join(r['ops'])}{tflm}")
        if r.get("float_ops"):
            print(f"{r['format']} float ops (not integer): {', '.join(r['float_ops'])}")
        if r.get("int8_ranges"):
            print(f"{r['format']} activation ranges: {r['int8_ranges']} over {opt.calib_images} images")
        refit = r.get("int8_refit") or {}
        if refit.get("applied"):
            before = refit["before_refit"]
            print(
                f"{r['format']} int8 refit applied (label-free, {refit['images']} images, lam "
                f"{refit['lam']:.3g}, {refit['iterations']} FISTA iterations): top-1 "
                f"{100 * before['top1_export']:.1f}% -> {100 * r['top1']:.1f}% (fp32 "
                f"{100 * r['top1_reference']:.1f}%); activation loss {refit['loss_before']:.4g} -> "
                f"{refit['loss_after']:.4g}; upstream unchanged: {refit['upstream_unchanged']}, masks "
                f"unchanged: {refit['masks_unchanged']}"
            )
        if r.get("teacher_top1") is not None:
            print(
                f"{r['format']} vs the teacher: top-1 {100 * r['top1']:.1f}% vs "
                f"{100 * r['teacher_top1']:.1f}%, agreement {100 * r['top1_agreement_with_teacher']:.1f}%"
            )
    files = ", ".join(dict.fromkeys(r["file"] for r in rows))
    print(f"wrote {files} and {out / 'parity.json'} ({rows[0]['samples']} test images)")
    return report


def format_table(rows: list[dict[str, Any]]) -> str:
    """The parity table printed by ``convexedge export``."""

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    head = (
        f"{'format':<12} {'max |diff|':>10} {'top-1 agree':>11} {'top-1 ref':>9} {'top-1':>7} {'gates':>8} "
        f"{'bytes':>11}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['format']:<12} {r['max_abs_diff']:>10.2e} {pct(r['top1_agreement']):>11} "
            f"{pct(r['top1_reference']):>9} {pct(r['top1']):>7} {pct(r['gate_agreement']):>8} "
            f"{r['bytes']:>11,}"
        )
    return "\n".join(lines)
