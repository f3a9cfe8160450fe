"""Export parity, size, ops and latency (BENCHMARKS.md section 4).

For the teacher and the distilled model (a `convexedge demo` folder): ONNX fp32 (onnxruntime), TFLite
fp32 and full-integer int8 (LiteRT interpreter); for the device head: the C head (fp32, int8) and the
head artifact. Each row: max abs diff of the outputs vs the reference (torch; the numpy head for
c / head), gate (mask) agreement, top-1 agreement and accuracy on the exact 1k test images, bytes,
ops (and whether every op is a TFLite Micro builtin), and per-image latency at batch 1 on one thread as
a ratio to torch CPU (to the numpy head for c / head).

The int8 files use min/max activation ranges over the calibration images (``--int8-ranges ema``: the
quantizer's moving average); for the distilled model, the int8 refit of its student
(``converters.int8_refit``) with ``--int8-refit``; the summary gives the distilled model's fp32
and int8 top-1, the int8 top-1 before the refit, and the teacher's top-1.

Run (TFLite needs the [tflite] extra): ``OMP_NUM_THREADS=1 python -m benchmarks.export --student DIR
[--quick]``; without ``--student`` a quick demo is run first. Writes ``benchmarks/results/export.json``.
"""

from __future__ import annotations

import os
import sys

if "numpy" not in sys.modules:
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from benchmarks._common import environment, table, write_json  # noqa: E402

LAT_N = 100


def _latency(fn, xs) -> float:
    fn(xs[0])
    t0 = time.perf_counter()
    for x in xs:
        fn(x)
    return (time.perf_counter() - t0) / len(xs)


def _model_latency(model_spec: str, fmt: str, files: dict, x: np.ndarray) -> float | None:
    import torch

    from convexedge.converters.export import _load_model

    xs = [x[i : i + 1] for i in range(LAT_N)]
    model = _load_model(model_spec)
    with torch.no_grad():
        t_torch = _latency(lambda v: model(torch.from_numpy(v)), xs)
    if fmt == "onnx":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(files["onnx"], opts, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return _latency(lambda v: sess.run(None, {name: v}), xs) / t_torch
    from ai_edge_litert.interpreter import Interpreter

    from convexedge.converters.tflite import _to_input

    it = Interpreter(model_path=files[fmt], num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]

    def run(v):
        it.set_tensor(inp["index"], _to_input(inp, v))
        it.invoke()
        return it.get_tensor(out["index"])

    return _latency(run, xs) / t_torch


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--student", type=Path, default=None, help="`convexedge demo` folder (default: run --quick)"
    )
    ap.add_argument("--quick", action="store_true", help="200 test images, 200 calibration images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--int8-ranges", choices=["minmax", "ema"], default="minmax", help="int8 activation ranges"
    )
    ap.add_argument(
        "--int8-refit",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="refit the distilled model's student for its int8 file (converters.int8_refit; default off)",
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from convexedge.converters.export import ExportOptions, run_export
    from convexedge.host.data import normalize_images
    from convexedge.models import BUNDLED_DATA_DIR, teacher_normalization

    tmp = Path(tempfile.mkdtemp(prefix="convexedge-export-bench-"))
    student = args.student
    if student is None:
        from convexedge.host.demo import DemoOptions, run_demo

        student = tmp / "demo"
        run_demo(DemoOptions(quick=True, out=str(student), progress=False))
    n_test = 200 if args.quick else None
    n_cal = 200 if args.quick else 500
    have_tflite = all(
        importlib.util.find_spec(m) for m in ("litert_torch", "ai_edge_litert", "ai_edge_quantizer")
    )
    from convexedge.host.data import load_images

    mean, std = teacher_normalization()
    x = normalize_images(load_images(BUNDLED_DATA_DIR, "test", limit=LAT_N).x, mean, std)
    rows = []
    for label, spec in (("teacher", "teacher"), ("distilled", str(student))):
        for fmt in ("onnx", "tflite-int8") if have_tflite else ("onnx",):
            out = tmp / f"{label}-{fmt}"
            rep = run_export(ExportOptions(model=spec, format=fmt, out=str(out), test_images=n_test,
                                           calib_images=n_cal, int8_ranges=args.int8_ranges,
                                           int8_refit=args.int8_refit))  # fmt: skip
            files = {r["format"]: r["file"] for r in rep["rows"]}
            for r in rep["rows"]:
                r = {
                    "model": label,
                    **r,
                    "latency_ratio_vs_torch": _model_latency(spec, r["format"], files, x),
                }
                rows.append(r)
    # the device head: the demo's current head, C (fp32 / int8) and the artifact; latency vs numpy predict
    from convexedge.device import HeadStore

    head = HeadStore.open(student / "heads").head
    feats = (
        np.random.default_rng(0).standard_normal((LAT_N, head.d_in)).astype(np.float32) * head.std + head.mean
    )
    t_np = _latency(lambda v: head.predict(v), [feats[i : i + 1] for i in range(LAT_N)])
    for fmt in ("c", "head"):
        rep = run_export(ExportOptions(model=str(student), format=fmt, out=str(tmp / f"head-{fmt}"),
                                       test_images=n_test, calib_images=n_cal))  # fmt: skip
        for r in rep["rows"]:
            ratio = None
            if r["format"].startswith("c"):
                from convexedge.converters.c_head import run_c_head

                lib = next(Path(r["file"]).parent.glob("*.so"))
                variant = "i8" if r["format"] == "c-int8" else "f32"
                pa = len(head._active)
                ratio = (
                    _latency(
                        lambda v, lib=lib, pa=pa, variant=variant: run_c_head(
                            lib, "ce_head", v, head.c, pa, variant
                        ),
                        [feats[i : i + 1] for i in range(LAT_N)],
                    )
                    / t_np
                )
            rows.append({"model": "head", **r, "latency_ratio_vs_torch": ratio})
    fp32 = [r for r in rows if r["format"] in ("onnx", "tflite", "c")]
    drops = []
    for label in ("teacher", "distilled", "head"):
        ref = next((r for r in rows if r["model"] == label and r["format"] in ("tflite", "c")), None)
        q = next((r for r in rows if r["model"] == label and r["format"] in ("tflite-int8", "c-int8")), None)
        if ref and q:
            drops.append(100 * (ref["top1"] - q["top1"]))
    summary = {
        "fp32_max_abs_diff_max": max(r["max_abs_diff"] for r in fp32),
        "fp32_top1_agreement_min": min(r["top1_agreement"] for r in fp32),
        "int8_top1_drop_max": max(drops) if drops else None,
        "int8_all_ops_in_tflm": all(r["all_ops_in_tflm"] for r in rows if r["format"] == "tflite-int8"),
        "tflite_measured": have_tflite,
        "int8_ranges": args.int8_ranges,
    }
    q8 = next((r for r in rows if r["model"] == "distilled" and r["format"] == "tflite-int8"), None)
    if q8 is not None:  # the distilled int8 file: fp32 vs int8, the refit's effect, and vs the teacher
        refit = q8.get("int8_refit") or {}
        before = refit.get("before_refit") or {}
        summary.update(
            distilled_fp32_top1=q8["top1_reference"],
            distilled_int8_top1=q8["top1"],
            distilled_int8_refit_applied=bool(refit.get("applied")),
            distilled_int8_top1_before_refit=before.get("top1_export"),
            distilled_int8_top1_agreement_before_refit=before.get("top1_agreement"),
            teacher_top1=q8.get("teacher_top1"),
            distilled_int8_top1_agreement_with_teacher=q8.get("top1_agreement_with_teacher"),
        )
    for r in rows:
        r["ops_text"] = ",".join(r["ops"]) if r["ops"] else None
    columns = [
        ("model", "model", ""),
        ("format", "format", ""),
        ("max_abs_diff", "max|diff|", ".2e"),
        ("top1_agreement", "agree", ".4f"),
        ("top1", "top-1", ".3f"),
        ("gate_agreement", "gates", ".4f"),
        ("bytes", "bytes", ",d"),
        ("all_ops_in_tflm", "TFLM", ""),
        ("latency_ratio_vs_torch", "lat/torch", ".2f"),
    ]
    print(table(rows, columns))  # fmt: skip
    print(summary)
    path = write_json("export", {"environment": environment(), "quick": args.quick, "student": str(student),
                                 "rows": rows, "summary": summary})  # fmt: skip
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
