"""Read folders of CIFAR-style image shards, validated once at the boundary.

A data folder holds ``train_*.npz`` and ``test_*.npz`` shards, each with ``x`` (N, H, W, 3) uint8
RGB images and ``y`` (N,) integer labels in ``0..num_classes-1`` (the format of the bundled slice
and of ``shared/data/cifar10``). Other keys are ignored; a ``train_*.npz`` without ``x`` (such as
``train_labels_all_50000.npz``) is skipped. Label-free paths call :func:`load_images` with
``labels=False`` and never read ``y``.
"""

from __future__ import annotations

import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from convexedge.device.errors import DataError

__all__ = ["ImageSet", "load_images", "normalize_images", "random_crop_flip"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageSet:
    """Images of one split.

    Attributes:
        x: (N, H, W, 3) uint8 RGB images.
        y: (N,) int64 labels, or ``None`` when loaded label-free.
        files: the shards read, in order.
    """

    x: np.ndarray
    y: np.ndarray | None
    files: tuple[str, ...]

    def __len__(self) -> int:
        return int(self.x.shape[0])


def _check_images(x: np.ndarray, where: str, image_size: int) -> None:
    if x.dtype != np.uint8:
        raise DataError(
            f"{where}: expected uint8 images in 0..255, got dtype {x.dtype}; store pixels as uint8 HWC"
        )
    if x.ndim != 4 or x.shape[1:] != (image_size, image_size, 3):
        raise DataError(
            f"{where}: expected images of shape (N, {image_size}, {image_size}, 3), got {x.shape}"
        )


def _check_labels(y: np.ndarray, n: int, where: str, num_classes: int) -> None:
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{where}: expected {n} labels of shape ({n},), got {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: expected integer labels, got dtype {y.dtype}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"{where}: labels must lie in 0..{num_classes - 1}, got {y.min()}..{y.max()}")


def load_images(
    data_dir: str | Path,
    split: Literal["train", "test"],
    *,
    labels: bool = True,
    limit: int | None = None,
    num_classes: int = 10,
    image_size: int = 32,
) -> ImageSet:
    """Load the ``split`` shards of ``data_dir`` in file-name order.

    Args:
        data_dir: folder of ``train_*.npz`` / ``test_*.npz`` shards.
        split: which shards to read.
        labels: read and validate ``y``; ``False`` never touches the labels (label-free capture).
        limit: keep only the first ``limit`` images (reads no more shards than needed).
        num_classes: labels must lie in ``0..num_classes-1``.
        image_size: images must be ``image_size`` x ``image_size`` RGB.

    Raises:
        DataError: missing folder or shards, unreadable file, wrong dtype/shape/labels.
    """
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    if limit is not None and limit < 1:
        raise DataError(f"limit must be a positive number of images, got {limit}")
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data folder {folder} does not exist; pass --data DIR with {split}_*.npz shards")
    paths = sorted(folder.glob(f"{split}_*.npz"))
    xs, ys, used = [], [], []
    count = 0
    for path in paths:
        try:
            with np.load(path, allow_pickle=False) as npz:
                if "x" not in npz.files:
                    log.info("skipping %s: no 'x' array (not an image shard)", path)
                    continue
                x = npz["x"]
                _check_images(x, str(path), image_size)
                if labels:
                    if "y" not in npz.files:
                        raise DataError(f"{path}: has images but no 'y' labels")
                    y = npz["y"]
                    _check_labels(y, x.shape[0], str(path), num_classes)
                    ys.append(y.astype(np.int64))
        except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path}: not a readable .npz shard ({exc})") from None
        xs.append(x)
        used.append(str(path))
        count += x.shape[0]
        if limit is not None and count >= limit:
            break
    if not xs:
        raise DataError(f"no {split}_*.npz image shards in {folder}")
    x = np.concatenate(xs)[:limit]
    y = np.concatenate(ys)[:limit] if labels else None
    if limit is not None and x.shape[0] < limit:
        log.warning("asked for %d %s images, %s holds only %d", limit, split, folder, x.shape[0])
    return ImageSet(x=x, y=y, files=tuple(used))


def normalize_images(x: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float32 ``(x/255 - mean) / std``."""
    m = np.asarray(mean, np.float32).reshape(1, 3, 1, 1)
    s = np.asarray(std, np.float32).reshape(1, 3, 1, 1)
    return (x.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - m) / s


def random_crop_flip(x: np.ndarray, rng: np.random.Generator, pad: int = 4) -> np.ndarray:
    """The standard CIFAR augmentation: a random crop of the ``pad``-pixel zero-padded image and a
    random horizontal flip, per image; (B, H, W, 3) uint8 in and out."""
    b, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(x)
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
    flip = rng.random(b) < 0.5
    for i in range(b):
        crop = padded[i, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop[:, ::-1] if flip[i] else crop
    return out
