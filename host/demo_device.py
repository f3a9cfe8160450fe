"""The demo's device step: export a convex head, serve it through ``convexedge.device``, shift, refit.

The head (the ``mcu`` preset: stage-2 output pooled to 2x2, 128 features, 8 gates, 10 logits)
replaces the teacher's last stage, pooling and classifier. It is fitted to the teacher's logits on
the unlabeled training images, written to a head store, and loaded back through the numpy runtime.
The device then sees a shifted stream (Gaussian pixel noise, sigma 10/255) with teacher targets
computed on the device, and refits; labels are read only to print accuracy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

__all__ = ["run_device_step"]

_NOISE = 10.0  # pixel-noise sigma on the 0..255 scale


def _noisy(x: np.ndarray, seed: int) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0.0, _NOISE, x.shape)
    return np.clip(x.astype(np.float32) + noise, 0, 255).astype(np.uint8)


def run_device_step(
    teacher: nn.Module,
    train_x: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    out: Path,
    *,
    seed: int = 0,
    stream_images: int = 1024,
    device: str = "cpu",
) -> dict:
    """Export, load, shift, refit; returns the figures for the report (and prints one line)."""
    from convexedge.device import BufferConfig, HeadStore, RefitRuntime
    from convexedge.host.evaluate import top1
    from convexedge.host.head_export import HEAD_PRESETS, export_head, pooled_features

    config = HEAD_PRESETS["mcu"]
    teacher = teacher.to(device)
    t0 = time.perf_counter()
    _, fit = export_head(teacher, train_x, transform, out / "heads", config, device=device)
    export_seconds = time.perf_counter() - t0
    store = HeadStore.open(out / "heads")  # loaded back through the numpy runtime, checksums verified
    runtime = RefitRuntime(store, memory_budget_mb=4, buffer=BufferConfig(capacity=stream_images))
    grid = config.grid
    clean, _ = pooled_features(teacher, test_x, transform, span=config.span, grids=(grid,), device=device)
    shifted, teacher_shift = pooled_features(
        teacher, _noisy(test_x, seed + 1), transform, span=config.span, grids=(grid,), device=device
    )
    head_clean = top1(runtime.predict(clean[grid]), test_y)
    before = top1(runtime.predict(shifted[grid]), test_y)
    # the stream: other images under the same shift, teacher logits computed "on the device"
    idx = np.random.default_rng(seed + 2).permutation(len(train_x))[:stream_images]
    stream, targets = pooled_features(
        teacher, _noisy(train_x[idx], seed + 3), transform, span=config.span, grids=(grid,), device=device
    )
    for s in range(0, len(idx), 64):
        runtime.observe(stream[grid][s : s + 64], targets[s : s + 64])
    result = runtime.refit(time_budget_s=1.0)
    after = top1(runtime.predict(shifted[grid]), test_y)
    report = {
        "head": "mcu",
        "head_params": int(runtime.head.num_parameters()),
        "head_top1_clean": head_clean,
        "teacher_top1_shifted": top1(teacher_shift, test_y),
        "head_top1_shifted_before": before,
        "head_top1_shifted_after": after,
        "refit_status": result.status,
        "refit_reason": result.reason,
        "refit_seconds": result.seconds,
        "refit_iterations": result.iterations,
        "stream_samples": int(len(idx)),
        "shift": f"gaussian pixel noise sigma {_NOISE:g}/255",
        "export_seconds": export_seconds,
        "head_lam_ratio": fit.get("lam_ratio"),
        "store": str(out / "heads"),
    }
    print(
        f"device head (numpy runtime): {100 * head_clean:.1f}% clean; under noise "
        f"{100 * before:.1f}% -> {100 * after:.1f}% after an on-device refit ({result.status}, "
        f"{1000 * result.seconds:.0f} ms, {result.iterations} iterations; teacher under noise "
        f"{100 * report['teacher_top1_shifted']:.1f}%)"
    )
    return report
