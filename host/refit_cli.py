"""``convexedge refit``: simulate a device on a folder of activations.

Opens a head store, streams every ``*.npz`` of the activations folder (arrays ``x`` (n, d_in) float
features and ``target`` (n, c) teacher outputs) into a :class:`~convexedge.device.RefitRuntime` in
chunks, runs one refit and prints its result as JSON. Only numpy and ``convexedge.device`` are used,
exactly what an app on the device would run.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from convexedge.device.errors import DataError

__all__ = ["RefitOptions", "run_refit"]


@dataclass(frozen=True, kw_only=True)
class RefitOptions:
    """Settings of ``convexedge refit``."""

    heads: str  # head store folder (written by the demo's device step or export_head)
    activations: str  # folder of *.npz with x (n, d_in) and target (n, c)
    memory_budget_mb: float = 4.0
    time_budget_s: float = 1.0
    mode: Literal["reservoir", "window", "gram"] = "reservoir"
    chunk: int = 64  # samples per observe() call
    confirm: bool = False  # confirm an accepted head (otherwise the next open may roll it back)
    anchor: float = 0.0  # RefitConfig.anchor: pull toward the serving head (0: none)
    # RefitConfig.renormalize: re-estimate the input normalisation from the stream ("mean", "mean_std")
    renormalize: Literal["off", "mean", "mean_std"] = "off"
    executor: Literal["thread", "process"] = "thread"  # where the solve runs


def run_refit(opt: RefitOptions) -> dict:
    """Stream the activations, refit once, return (and print) the result."""
    from convexedge.device import BufferConfig, HeadStore, RefitConfig, RefitRuntime

    files = sorted(Path(opt.activations).glob("*.npz"))
    if not files:
        raise DataError(f"no *.npz activation files in {opt.activations} (each needs x and target)")
    store = HeadStore.open(opt.heads)
    runtime = RefitRuntime(
        store,
        memory_budget_mb=opt.memory_budget_mb,
        buffer=BufferConfig(mode=opt.mode),
        config=RefitConfig(anchor=opt.anchor, renormalize=opt.renormalize),
        executor=opt.executor,
    )
    seen = 0
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as npz:
                x, target = npz["x"], npz["target"]
        except (KeyError, ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            raise DataError(f"{path}: expected an .npz with arrays x and target ({exc})") from None
        for s in range(0, len(x), opt.chunk):
            runtime.observe(x[s : s + opt.chunk], target[s : s + opt.chunk])
        seen += len(x)
    try:
        result = runtime.refit(time_budget_s=opt.time_budget_s)
    finally:
        runtime.close()
    if result.status == "accepted" and opt.confirm:
        store.confirm()
    report = {"observed": seen, "memory_bytes": runtime.memory_bytes(), **result.to_dict()}
    print(json.dumps(report, indent=1, default=str))
    return report
