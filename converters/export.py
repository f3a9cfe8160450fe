"""``convexedge export``: rebuild a model, export it, prove parity on real images, write parity.json."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

__all__ = ["ExportOptions", "run_export"]


@dataclass(frozen=True, kw_only=True)
class ExportOptions:
    """Settings of ``convexedge export``."""

    model: str  # "teacher" (the bundled ResNet-20) or a folder written by `convexedge demo`
    format: Literal["onnx", "tflite"] = "onnx"
    out: str = "convexedge-export"
    data: str | None = None  # folder of test_*.npz shards for the parity check; None = bundled
    test_images: int | None = None  # None = all test images of the folder

    def __post_init__(self) -> None:
        if self.format not in ("onnx", "tflite"):
            raise ValueError(f"format must be 'onnx' or 'tflite', got {self.format!r}")


def run_export(opt: ExportOptions) -> dict:
    """Export ``opt.model``, compare it with torch on the test images, return and write the report."""
    import numpy as np
    import torch

    from convexedge.converters.onnx import export_onnx, onnx_ops, run_onnx
    from convexedge.converters.parity import compare_outputs
    from convexedge.converters.tflite import export_tflite, run_tflite, tflite_ops
    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import load_compressed_model
    from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

    model = load_teacher() if opt.model == "teacher" else load_compressed_model(opt.model)
    out = Path(opt.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if opt.format == "onnx":
        path, run, ops = export_onnx(model, out / "model.onnx"), run_onnx, onnx_ops
    else:
        path, run, ops = export_tflite(model, out / "model.tflite"), run_tflite, tflite_ops
    export_seconds = time.perf_counter() - t0
    mean, std = teacher_normalization()
    test = load_images(Path(opt.data) if opt.data else BUNDLED_DATA_DIR, "test", limit=opt.test_images)
    x = normalize_images(test.x, mean, std)
    with torch.no_grad():
        ref = np.concatenate([model(torch.from_numpy(x[i : i + 500])).numpy() for i in range(0, len(x), 500)])
    parity = compare_outputs(ref, run(path, x), test.y)
    report = {
        "model": opt.model,
        "format": opt.format,
        "file": str(path),
        "bytes": path.stat().st_size,
        "ops": ops(path),
        "export_seconds": export_seconds,
        "parity": parity.to_dict(),
        "options": asdict(opt),
    }
    (out / "parity.json").write_text(json.dumps(report, indent=1))
    print(
        f"{'format':<8} {'max |diff|':>11} {'top-1 agree':>12} {'top-1 torch':>12} {'top-1 export':>13} "
        f"{'bytes':>10}"
    )
    print(
        f"{opt.format:<8} {parity.max_abs_diff:>11.2e} {100 * parity.top1_agreement:>11.2f}% "
        f"{100 * parity.top1_reference:>11.2f}% {100 * parity.top1_export:>12.2f}% {report['bytes']:>10,}"
    )
    print(f"ops: {', '.join(report['ops'])}")
    print(f"wrote {path} and {out / 'parity.json'} ({parity.samples} test images)")
    return report
