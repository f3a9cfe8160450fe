"""Build a device head from the teacher: pooled features, a convex fit, a checksummed artifact.

The head replaces everything after ``span`` (for the bundled ResNet-20 with ``span="layer2"``: the
last stage, the pooling and the classifier) and is fitted to the teacher's *logits*, label-free:

1. :func:`pooled_features`: one forward pass per batch records the ``span`` output (B, C, H, W),
   average-pools it to ``grid x grid`` and flattens it to ``(B, C * grid^2)``; the same pass gives
   the teacher's logits ``(B, classes)``.
2. :func:`fit_head`: standardise the features, draw seeded Gaussian gates (the device regenerates
   them from the seed), and solve the convex problem on a warm-started ``lam`` path with the host
   FISTA; keep the point with the lowest held-out loss.
3. :func:`export_head`: write the head into a :class:`~convexedge.device.HeadStore` (npz + JSON
   manifest, SHA-256 per array, optional ed25519 signature) that ``convexedge.device`` loads.

Presets (``HEAD_PRESETS``), from the device-refit benchmark: ``mcu`` pools to 2x2 (128 features) with
P=8 gates, ``phone`` pools to 4x4 (512 features) with P=16.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convexedge.device import ConvexHead, GateSpec, HeadStore, sample_gates
from convexedge.device.errors import DataError
from convexedge.host.distill import fit_path, select_by_validation
from convexedge.host.solvers import FistaConfig
from convexedge.host.solvers.problem import GatedProblem

__all__ = ["HEAD_PRESETS", "HeadExportConfig", "export_head", "fit_head", "pooled_features"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HeadExportConfig:
    """How to build a head (JSON-serialisable; written into the head's provenance)."""

    span: str = "layer2"  # module whose output the head reads
    grid: int = 2  # adaptive average pooling to grid x grid
    gates: int = 8  # P, gate 0 being the linear path
    seed: int = 0  # gate seed
    lam_ratios: tuple[float, ...] = (0.1, 0.03, 0.01, 0.003, 0.001)  # lam / lam_max, decreasing
    val_fraction: float = 0.2  # samples held out to choose lam (label-free)
    tol: float = 1e-4
    max_iter: int = 1000
    batch_size: int = 250

    def __post_init__(self) -> None:
        if self.grid < 1 or self.gates < 1 or self.batch_size < 1:
            raise ValueError(
                f"grid, gates and batch_size must be >= 1, got {self.grid}, {self.gates}, {self.batch_size}"
            )
        if not 0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction must lie in (0, 0.5), got {self.val_fraction}")
        ratios = list(self.lam_ratios)
        if not ratios or any(r <= 0 for r in ratios) or ratios != sorted(ratios, reverse=True):
            raise ValueError(f"lam_ratios must be positive and decreasing, got {ratios}")


HEAD_PRESETS: dict[str, HeadExportConfig] = {
    "mcu": HeadExportConfig(grid=2, gates=8),
    "phone": HeadExportConfig(grid=4, gates=16),
}


class _Stop(Exception):
    pass


def pooled_features(
    teacher: nn.Module,
    images: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    *,
    span: str = "layer2",
    grids: tuple[int, ...] = (2,),
    batch_size: int = 250,
    device: str = "cpu",
) -> tuple[dict[int, np.ndarray], np.ndarray]:
    """The ``span`` output pooled to each grid, and the teacher's logits, in one pass.

    Args:
        teacher: the model (eval mode is set; it is not modified).
        images: (N, H, W, C) uint8.
        transform: uint8 batch -> float32 NCHW batch the teacher expects.
        span: dotted module name.
        grids: pooling sizes; features for grid ``g`` are ``(N, C * g * g)`` float32, channel-major.

    Returns:
        ``({g: features}, logits (N, classes) float32)``.

    Raises:
        DataError: ``span`` is not a module of ``teacher`` or ``images`` is not (N, H, W, C) uint8.
    """
    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            f"images must be an (N, H, W, C) uint8 array, got {getattr(images, 'dtype', type(images))}"
        )
    modules = dict(teacher.named_modules())
    if span not in modules:
        raise DataError(f"module {span!r} not found in the teacher; top-level modules: "
                        f"{[n for n in modules if n and '.' not in n]}")  # fmt: skip
    teacher.eval().to(device)
    grabbed: dict[str, torch.Tensor] = {}
    handle = modules[span].register_forward_hook(lambda m, i, o: grabbed.__setitem__("z", o))
    feats: dict[int, list[np.ndarray]] = {g: [] for g in grids}
    logits = []
    try:
        with torch.no_grad():
            for s in range(0, images.shape[0], batch_size):
                x = torch.from_numpy(transform(images[s : s + batch_size])).to(device)
                logits.append(teacher(x).float().cpu().numpy())
                z = grabbed.pop("z")
                for g in grids:
                    feats[g].append(F.adaptive_avg_pool2d(z, g).flatten(1).float().cpu().numpy())
    finally:
        handle.remove()
    return {g: np.concatenate(v) for g, v in feats.items()}, np.concatenate(logits)


def fit_head(
    features: np.ndarray, targets: np.ndarray, config: HeadExportConfig, *, info: dict[str, Any] | None = None
) -> tuple[ConvexHead, dict[str, Any]]:
    """Fit a head to ``targets`` (teacher logits) from ``features`` with the host FISTA.

    Solves ``min_V 1/(2n) ||sum_i D_i Z1 V_i - Y||_F^2 + lam sum_i ||V_i||_F`` on the standardised
    features ``Z1 = [(X - mean) / std, 1]`` along ``config.lam_ratios``; the last ``val_fraction`` of
    the rows choose ``lam``.

    Args:
        features: (n, d_in) float32.
        targets: (n, c) float32.

    Returns:
        ``(head, report)``; the report has the path (lam, held-out loss, iterations, active gates).
    """
    X = np.asarray(features, np.float32)
    Y = np.asarray(targets, np.float32)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0] or X.shape[0] < 10:
        raise DataError(f"features (n, d) and targets (n, c) need the same n >= 10, got {X.shape}, {Y.shape}")
    mean = X.mean(axis=0)
    std = X.std(axis=0)
    std = np.where(std > 1e-6 * max(float(std.max()), 1e-30), std, 1.0).astype(np.float32)
    Z = (X - mean) / std
    spec = GateSpec(d=X.shape[1] + 1, P=config.gates, seed=config.seed)
    G = sample_gates(spec)
    Z1 = np.concatenate([Z, np.ones((Z.shape[0], 1), np.float32)], axis=1)
    masks = Z1 @ G >= 0
    n_val = max(1, int(round(config.val_fraction * Z.shape[0])))
    prob = GatedProblem.from_arrays(Z1[:-n_val], Y[:-n_val], masks[:-n_val])
    val = GatedProblem.from_arrays(Z1[-n_val:], Y[-n_val:], masks[-n_val:])
    points = fit_path(
        prob, config.lam_ratios, FistaConfig(tol=config.tol, max_iter=config.max_iter), val_problem=val
    )
    best = select_by_validation(points)
    V = best.result.V.float().cpu().numpy()
    head = ConvexHead(
        V=V, gate_spec=spec, mean=mean, std=std, lam=best.result.lam, group="gate",
        info={"export": asdict(config), **(info or {})},
    )  # fmt: skip
    report = {
        "lam": best.result.lam,
        "lam_ratio": best.lam_ratio,
        "path": [
            {"lam_ratio": p.lam_ratio, "val_loss": p.val_loss, "iterations": p.result.iterations,
             "active_gates": p.active_gates, "converged": p.result.converged}
            for p in points
        ],
    }  # fmt: skip
    return head, report


def export_head(
    teacher: nn.Module,
    images: np.ndarray,
    transform: Callable[[np.ndarray], np.ndarray],
    out_dir: str | Path,
    config: HeadExportConfig = HEAD_PRESETS["mcu"],
    *,
    signing_key: bytes | None = None,
    info: dict[str, Any] | None = None,
    device: str = "cpu",
) -> tuple[HeadStore, dict[str, Any]]:
    """Capture pooled features of ``images``, fit a head, and start a head store in ``out_dir``.

    Returns:
        ``(store, report)``: the store holding the head (confirmed) and the fit report.
    """
    feats, logits = pooled_features(
        teacher,
        images,
        transform,
        span=config.span,
        grids=(config.grid,),
        batch_size=config.batch_size,
        device=device,
    )
    provenance = {
        "input": {
            "span": config.span,
            "pool": [config.grid, config.grid],
            "features": int(feats[config.grid].shape[1]),
        },
        "student": {"kind": "gated_mlp_head", "replaces": f"after {config.span}: rest of the network"},
        **(info or {}),
    }
    head, report = fit_head(feats[config.grid], logits, config, info=provenance)
    store = HeadStore.create(out_dir, head, signing_key=signing_key)
    log.info("exported head to %s (lam_ratio %g)", out_dir, report["lam_ratio"])
    return store, report
