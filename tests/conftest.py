"""Shared fixtures: the bundled teacher, its input transform, and a tiny data folder."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest

from convexedge.host.data import normalize_images
from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization


@pytest.fixture(scope="session")
def teacher():
    """The bundled ResNet-20 (eval mode). Tests that modify it must work on a copy."""
    return load_teacher()


@pytest.fixture(scope="session")
def transform():
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) normalised with the teacher's mean/std."""
    mean, std = teacher_normalization()
    return partial(normalize_images, mean=mean, std=std)


def _first(path, count: int) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k][:count] for k in ("x", "y", "index")}


@pytest.fixture
def tiny_data_dir(tmp_path):
    """A folder with ``train_00.npz`` (40 bundled train images) and ``test_00.npz`` (60 test
    images), each with keys ``x`` (N, 32, 32, 3) uint8, ``y`` (N,) int64, ``index`` (N,) int64."""
    folder = tmp_path / "tiny_data"
    folder.mkdir()
    np.savez(folder / "train_00.npz", **_first(BUNDLED_DATA_DIR / "train_0000_1999.npz", 40))
    np.savez(folder / "test_00.npz", **_first(BUNDLED_DATA_DIR / "test_0000_0999.npz", 60))
    return folder
