"""Tests of convexedge.host.data: shard loading contract (shapes, order, limit, label-free reads,
skipped files) and every DataError at the boundary; normalize_images against the formula."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from convexedge.device.errors import DataError
from convexedge.host.data import ImageSet, load_images, normalize_images
from convexedge.models import BUNDLED_DATA_DIR


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------ contract
def test_bundled_folder_shapes_and_dtypes():
    train = load_images(BUNDLED_DATA_DIR, "train")
    test = load_images(BUNDLED_DATA_DIR, "test")
    for split, n in ((train, 2000), (test, 1000)):
        assert isinstance(split, ImageSet)
        assert len(split) == n
        assert split.x.shape == (n, 32, 32, 3) and split.x.dtype == np.uint8
        assert split.y.shape == (n,) and split.y.dtype == np.int64
        assert 0 <= split.y.min() and split.y.max() <= 9
        assert len(split.files) == 1
    assert train.files[0].endswith("train_0000_1999.npz")


def test_tiny_folder_matches_bundled_prefix(tiny_data_dir):
    tiny = load_images(tiny_data_dir, "test")
    full = load_images(BUNDLED_DATA_DIR, "test", limit=60)
    np.testing.assert_array_equal(tiny.x, full.x)
    np.testing.assert_array_equal(tiny.y, full.y)
    assert len(load_images(tiny_data_dir, "train")) == 40


def test_labels_false_gives_no_labels_and_needs_no_y(tmp_path):
    x = _images(5)
    np.savez(tmp_path / "train_a.npz", x=x)  # no 'y' at all
    got = load_images(tmp_path, "train", labels=False)
    assert got.y is None
    np.testing.assert_array_equal(got.x, x)
    with pytest.raises(DataError, match="has images but no 'y' labels"):
        load_images(tmp_path, "train")


def test_labels_false_ignores_bad_labels(tmp_path):
    np.savez(tmp_path / "test_a.npz", x=_images(4), y=np.array([0, 1, 99, -1]))
    assert load_images(tmp_path, "test", labels=False).y is None


def test_shards_concatenated_in_file_name_order(tmp_path):
    a, b = _images(3, seed=1), _images(4, seed=2)
    np.savez(tmp_path / "train_1.npz", x=b, y=np.full(4, 1))
    np.savez(tmp_path / "train_0.npz", x=a, y=np.full(3, 0))
    got = load_images(tmp_path, "train")
    np.testing.assert_array_equal(got.x, np.concatenate([a, b]))
    np.testing.assert_array_equal(got.y, [0, 0, 0, 1, 1, 1, 1])
    assert [p.rsplit("/", 1)[-1] for p in got.files] == ["train_0.npz", "train_1.npz"]


def test_limit_truncates_and_reads_no_more_shards_than_needed(tmp_path):
    np.savez(tmp_path / "train_0.npz", x=_images(3, 1), y=np.zeros(3, np.int64))
    np.savez(tmp_path / "train_1.npz", x=_images(4, 2), y=np.ones(4, np.int64))
    np.savez(tmp_path / "train_2.npz", x=_images(4, 3), y=np.ones(4, np.int64))
    one = load_images(tmp_path, "train", limit=2)
    assert len(one) == 2 and one.y.shape == (2,) and len(one.files) == 1
    two = load_images(tmp_path, "train", limit=5)
    assert len(two) == 5 and len(two.files) == 2
    np.testing.assert_array_equal(two.y, [0, 0, 0, 1, 1])


def test_limit_above_available_returns_all_and_warns(tiny_data_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="convexedge.host.data"):
        got = load_images(tiny_data_dir, "train", limit=1000)
    assert len(got) == 40
    assert "holds only 40" in caplog.text


def test_shard_without_x_is_skipped(tmp_path):
    np.savez(tmp_path / "train_labels_all.npz", y=np.zeros(50, np.int64))
    np.savez(tmp_path / "train_z.npz", x=_images(2), y=np.array([3, 4]))
    got = load_images(tmp_path, "train")
    assert len(got) == 2 and len(got.files) == 1
    assert got.files[0].endswith("train_z.npz")


def test_other_split_and_other_keys_ignored(tiny_data_dir):
    np.savez(tiny_data_dir / "other_00.npz", x=_images(1))
    assert len(load_images(tiny_data_dir, "test")) == 60  # 'index' key is ignored too


def test_image_size_and_num_classes_parameters(tmp_path):
    np.savez(tmp_path / "test_a.npz", x=_images(3, size=8), y=np.array([0, 1, 2]))
    assert load_images(tmp_path, "test", image_size=8, num_classes=3).x.shape == (3, 8, 8, 3)
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.1, got 0\.\.2"):
        load_images(tmp_path, "test", image_size=8, num_classes=2)


# ------------------------------------------------------------------------------ errors
def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_images(tmp_path / "absent", "train")


def test_no_shards(tmp_path):
    with pytest.raises(DataError, match=r"no train_\*\.npz image shards"):
        load_images(tmp_path, "train")
    np.savez(tmp_path / "train_labels.npz", y=np.zeros(3, np.int64))  # only a label file
    with pytest.raises(DataError, match=r"no train_\*\.npz image shards"):
        load_images(tmp_path, "train")


def test_bad_split_and_limit(tiny_data_dir):
    with pytest.raises(DataError, match="split must be 'train' or 'test'"):
        load_images(tiny_data_dir, "val")
    with pytest.raises(DataError, match="limit must be a positive number"):
        load_images(tiny_data_dir, "train", limit=0)


def test_float_images(tmp_path):
    np.savez(tmp_path / "train_a.npz", x=_images(2).astype(np.float32) / 255, y=np.array([0, 1]))
    with pytest.raises(DataError, match="expected uint8 images.*float32"):
        load_images(tmp_path, "train")


@pytest.mark.parametrize("shape", [(2, 32, 32), (2, 32, 32, 1), (2, 3, 32, 32), (2, 28, 28, 3)])
def test_wrong_image_shape(tmp_path, shape):
    np.savez(tmp_path / "train_a.npz", x=np.zeros(shape, np.uint8), y=np.array([0, 1]))
    with pytest.raises(DataError, match=r"expected images of shape \(N, 32, 32, 3\)"):
        load_images(tmp_path, "train", labels=False)


@pytest.mark.parametrize("y", [[0, 10], [-1, 0]])
def test_labels_out_of_range(tmp_path, y):
    np.savez(tmp_path / "train_a.npz", x=_images(2), y=np.array(y))
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9"):
        load_images(tmp_path, "train")


@pytest.mark.parametrize("y", [np.zeros(3, np.int64), np.zeros((2, 1), np.int64)])
def test_label_count_mismatch(tmp_path, y):
    np.savez(tmp_path / "train_a.npz", x=_images(2), y=y)
    with pytest.raises(DataError, match=r"expected 2 labels of shape \(2,\)"):
        load_images(tmp_path, "train")


def test_float_labels(tmp_path):
    np.savez(tmp_path / "train_a.npz", x=_images(2), y=np.array([0.0, 1.0]))
    with pytest.raises(DataError, match="expected integer labels"):
        load_images(tmp_path, "train")


def test_truncated_npz(tiny_data_dir):
    path = tiny_data_dir / "train_00.npz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="not a readable .npz shard"):
        load_images(tiny_data_dir, "train")


def test_garbage_file(tmp_path):
    (tmp_path / "train_a.npz").write_bytes(b"this is not an npz file at all")
    with pytest.raises(DataError, match="not a readable .npz shard"):
        load_images(tmp_path, "train")


# ------------------------------------------------------------------------------ normalize
def test_normalize_images_formula():
    x = _images(3, seed=5, size=4)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    out = normalize_images(x, mean, std)
    assert out.shape == (3, 3, 4, 4) and out.dtype == np.float32
    for c in range(3):
        expect = (x[..., c].astype(np.float64) / 255.0 - mean[c]) / std[c]
        np.testing.assert_allclose(out[:, c], expect, rtol=1e-6, atol=1e-6)


def test_normalize_images_extremes():
    x = np.stack([np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 255, np.uint8)])
    out = normalize_images(x, [0.5] * 3, [0.5] * 3)
    np.testing.assert_allclose(out[0], -1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], 1.0, atol=1e-6)
