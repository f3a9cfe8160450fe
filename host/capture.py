"""Capture a block's input and output activations, streamed to memory-mapped shards on disk.

Capture is label-free: it takes images only. A forward hook on the named module records the
module's input (its first positional argument) and output for every batch; the rest of the forward
pass is cut short once the hooked module has run, so the model's later layers cost nothing. Each
shard is a pair of ``.npy`` files written through ``np.lib.format.open_memmap`` (so memory holds one
batch, not the whole set) plus a ``manifest.json`` written last, atomically. :func:`merge_captures`
lists several captures (e.g. one per rank of a data-parallel capture, see
``convexedge.host.distributed.capture_sharded``) in one manifest of the same format.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from convexedge.device.errors import ArtifactError, DataError

__all__ = ["ActivationShards", "CaptureConfig", "capture_block", "merge_captures"]

_MANIFEST = "manifest.json"
_FORMAT = "convexedge.activations"
_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class CaptureConfig:
    """How to run the capture."""

    batch_size: int = 200
    shard_images: int = 1000  # images per shard file pair
    dtype: Literal["float32", "float16"] = "float32"  # storage dtype of the shards
    device: str = "cpu"  # torch device the model runs on during capture

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.shard_images < 1:
            raise ValueError(
                f"batch_size and shard_images must be >= 1, got {self.batch_size}, {self.shard_images}"
            )
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        if self.shard_images % self.batch_size:
            raise ValueError(
                f"shard_images ({self.shard_images}) must be a multiple of batch_size ({self.batch_size})"
            )


class _StopForward(Exception):
    """Raised by the hook to end the forward pass once the captured module has run."""


@dataclass(frozen=True)
class ActivationShards:
    """Captured activations on disk: ``inputs_XXXX.npy`` / ``outputs_XXXX.npy`` shard pairs.

    Attributes:
        root: the folder.
        module: name of the hooked module.
        input_shape: per-sample input shape, e.g. (32, 16, 16).
        output_shape: per-sample output shape, e.g. (64, 8, 8).
        shards: list of ``(inputs_file, outputs_file, count)``.
    """

    root: Path
    module: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    shards: tuple[tuple[str, str, int], ...]
    dtype: str

    @property
    def count(self) -> int:
        return sum(c for _, _, c in self.shards)

    @classmethod
    def open(cls, root: str | Path) -> ActivationShards:
        """Open a capture folder, checking its manifest and every shard's shape.

        Raises:
            ArtifactError: no manifest, wrong format/version, or a shard missing or misshapen.
        """
        root = Path(root)
        try:
            manifest = json.loads((root / _MANIFEST).read_text())
        except FileNotFoundError:
            raise ArtifactError(f"{root} holds no {_MANIFEST}: not a finished capture") from None
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{root / _MANIFEST} is not valid JSON ({exc})") from None
        if manifest.get("format") != _FORMAT or manifest.get("format_version") != _VERSION:
            raise ArtifactError(
                f"{root}: expected {_FORMAT} v{_VERSION}, got "
                f"{manifest.get('format')!r} v{manifest.get('format_version')!r}"
            )
        shards = cls(
            root=root,
            module=manifest["module"],
            input_shape=tuple(manifest["input_shape"]),
            output_shape=tuple(manifest["output_shape"]),
            shards=tuple((s["inputs"], s["outputs"], int(s["count"])) for s in manifest["shards"]),
            dtype=manifest["dtype"],
        )
        for fin, fout, count in shards.shards:
            for name, shape in ((fin, shards.input_shape), (fout, shards.output_shape)):
                try:
                    arr = np.load(root / name, mmap_mode="r", allow_pickle=False)
                except (FileNotFoundError, ValueError, OSError) as exc:
                    raise ArtifactError(f"{root / name}: missing or unreadable shard ({exc})") from None
                if arr.shape != (count, *shape):
                    raise ArtifactError(f"{root / name}: expected shape {(count, *shape)}, got {arr.shape}")
        return shards

    def arrays(self, which: Literal["inputs", "outputs"]) -> list[np.ndarray]:
        """The shards of ``which`` as read-only memory maps, in capture order."""
        col = 0 if which == "inputs" else 1
        return [np.load(self.root / s[col], mmap_mode="r", allow_pickle=False) for s in self.shards]

    def load(self, which: Literal["inputs", "outputs"], limit: int | None = None) -> np.ndarray:
        """All samples of ``which`` (or the first ``limit``) as one float32 array in memory."""
        parts, got = [], 0
        for arr in self.arrays(which):
            take = arr if limit is None else arr[: max(0, limit - got)]
            parts.append(np.asarray(take, dtype=np.float32))
            got += take.shape[0]
            if limit is not None and got >= limit:
                break
        return np.concatenate(parts)


def capture_block(
    model: nn.Module,
    module: str,
    images: np.ndarray,
    out_dir: str | Path,
    *,
    transform: Callable[[np.ndarray], np.ndarray],
    config: CaptureConfig = CaptureConfig(),
    progress: bool = True,
) -> ActivationShards:
    """Run ``model`` on ``images`` and stream the input/output of ``model.<module>`` to disk.

    Args:
        model: the teacher; it is put in eval mode and not modified (the hook is removed after).
        module: dotted name of the captured submodule, e.g. ``"layer3"``.
        images: (N, H, W, C) uint8 images; no labels are taken.
        out_dir: folder for the shards (created; existing shard files are overwritten).
        transform: maps a uint8 batch to the float32 NCHW batch the model expects.
        config: batch size, shard size, storage dtype, device.
        progress: show a tqdm progress bar.

    Returns:
        The :class:`ActivationShards` describing what was written.

    Raises:
        DataError: ``images`` is not a non-empty 4-D uint8 array, or ``module`` is not in ``model``.
    """
    from tqdm.auto import tqdm

    if not isinstance(images, np.ndarray) or images.ndim != 4 or images.dtype != np.uint8:
        raise DataError(
            "capture_block: expected images as an (N, H, W, C) uint8 array, got "
            f"{type(images).__name__} {getattr(images, 'dtype', '')}"
            f"{getattr(images, 'shape', '')}"
        )
    if images.shape[0] == 0:
        raise DataError("capture_block: no images to capture")
    names = dict(model.named_modules())
    if module not in names:
        raise DataError(
            f"module {module!r} not found in the model; top-level modules are "
            f"{[n for n in names if n and '.' not in n]}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / _MANIFEST).unlink(missing_ok=True)  # a capture in progress has no manifest
    store = np.float16 if config.dtype == "float16" else np.float32
    model.eval().to(config.device)
    n = images.shape[0]
    record: dict[str, torch.Tensor] = {}

    def hook(_mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
        record["in"], record["out"] = args[0], output
        raise _StopForward

    handle = names[module].register_forward_hook(hook)
    shards: list[dict] = []
    in_map = out_map = None
    in_shape = out_shape = None
    try:
        bar = tqdm(total=n, desc=f"capture {module}", unit="img", disable=not progress)
        for start in range(0, n, config.batch_size):
            batch = torch.from_numpy(transform(images[start : start + config.batch_size]))
            with torch.no_grad():
                try:
                    model(batch.to(config.device))
                except _StopForward:
                    pass
            if "in" not in record:
                raise DataError(f"module {module!r} did not run in the model's forward pass")
            zin = record["in"].detach().cpu().numpy()
            zout = record["out"].detach().cpu().numpy()
            in_shape, out_shape = zin.shape[1:], zout.shape[1:]
            b = zin.shape[0]
            pos = start % config.shard_images
            if pos == 0:
                k = len(shards)
                count = min(config.shard_images, n - start)
                shards.append(
                    {"inputs": f"inputs_{k:04d}.npy", "outputs": f"outputs_{k:04d}.npy", "count": count}
                )
                in_map = np.lib.format.open_memmap(
                    out / shards[-1]["inputs"], mode="w+", dtype=store, shape=(count, *in_shape)
                )
                out_map = np.lib.format.open_memmap(
                    out / shards[-1]["outputs"], mode="w+", dtype=store, shape=(count, *out_shape)
                )
            in_map[pos : pos + b] = zin
            out_map[pos : pos + b] = zout
            if pos + b >= shards[-1]["count"]:
                in_map.flush()
                out_map.flush()
            bar.update(b)
        bar.close()
    finally:
        handle.remove()
    manifest = {
        "format": _FORMAT,
        "format_version": _VERSION,
        "module": module,
        "input_shape": list(in_shape),
        "output_shape": list(out_shape),
        "dtype": config.dtype,
        "count": n,
        "shards": shards,
        "config": asdict(config),
    }
    _write_manifest(out, manifest)
    return ActivationShards.open(out)


def _write_manifest(out: Path, manifest: dict) -> None:
    tmp = out / (_MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / _MANIFEST)


def merge_captures(root: str | Path, parts: list[str]) -> ActivationShards:
    """Write ``root/manifest.json`` listing the shards of the captures ``root/<part>`` in order.

    The shard files stay where they are (the manifest names them ``<part>/inputs_XXXX.npy``), so
    ``ActivationShards.open(root)`` reads all parts as one capture; ``"parts"`` in the manifest
    records each part's folder and sample count.

    Raises:
        ArtifactError: a part is not a finished capture, or parts differ in module, shapes or dtype.
    """
    root = Path(root)
    if not parts:
        raise ArtifactError(f"{root}: no captures to merge")
    opened = [ActivationShards.open(root / p) for p in parts]
    first = opened[0]
    for part, sh in zip(parts, opened, strict=True):
        key, want = (sh.module, sh.input_shape, sh.output_shape, sh.dtype), (
            first.module, first.input_shape, first.output_shape, first.dtype,
        )  # fmt: skip
        if key != want:
            raise ArtifactError(f"{root / part}: captured {key}, but {root / parts[0]} captured {want}")
    manifest = {
        "format": _FORMAT,
        "format_version": _VERSION,
        "module": first.module,
        "input_shape": list(first.input_shape),
        "output_shape": list(first.output_shape),
        "dtype": first.dtype,
        "count": sum(sh.count for sh in opened),
        "shards": [
            {"inputs": f"{part}/{fin}", "outputs": f"{part}/{fout}", "count": count}
            for part, sh in zip(parts, opened, strict=True)
            for fin, fout, count in sh.shards
        ],
        "parts": [{"folder": part, "count": sh.count} for part, sh in zip(parts, opened, strict=True)],
    }
    _write_manifest(root, manifest)
    return ActivationShards.open(root)
