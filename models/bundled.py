"""Paths of the bundled files and the checked loader of the bundled teacher."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from convexedge.device.errors import ArtifactError
from convexedge.models.resnet_cifar import CifarResNet, resnet20

__all__ = [
    "BUNDLED_DATA_DIR",
    "TEACHER_MANIFEST",
    "TEACHER_WEIGHTS",
    "load_teacher",
    "teacher_normalization",
]

_HERE = Path(__file__).resolve().parent
#: Folder of the bundled CIFAR-10 slice (``train_*.npz`` / ``test_*.npz`` shards, ``classes.json``).
BUNDLED_DATA_DIR = _HERE / "cifar10"
TEACHER_WEIGHTS = _HERE / "resnet20_cifar10.npz"
TEACHER_MANIFEST = _HERE / "resnet20_cifar10.json"
_WEIGHTS_FORMAT = "convexedge.weights"
_WEIGHTS_VERSION = 1


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"weights manifest {path} not found; reinstall convexedge") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"weights manifest {path} is not valid JSON ({exc})") from None
    if manifest.get("format") != _WEIGHTS_FORMAT or manifest.get("format_version") != _WEIGHTS_VERSION:
        raise ArtifactError(
            f"{path}: expected format {_WEIGHTS_FORMAT!r} version {_WEIGHTS_VERSION}, got "
            f"{manifest.get('format')!r} version {manifest.get('format_version')!r}"
        )
    return manifest


def load_verified_arrays(weights: Path, manifest: dict) -> dict[str, np.ndarray]:
    """Load every array of ``weights`` and check it against the manifest's sha256/shape/dtype."""
    try:
        with np.load(weights, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise ArtifactError(f"weights file {weights} not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise ArtifactError(f"weights file {weights} is unreadable or truncated ({exc})") from None
    expected = manifest["sha256"]
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))
        raise ArtifactError(f"{weights}: arrays differ from the manifest (missing {missing}, extra {extra})")
    for key, arr in arrays.items():
        if list(arr.shape) != manifest["shapes"][key] or str(arr.dtype) != manifest["dtypes"][key]:
            raise ArtifactError(
                f"{weights}: array {key!r} is {arr.dtype}{list(arr.shape)}, manifest says "
                f"{manifest['dtypes'][key]}{manifest['shapes'][key]}"
            )
        if hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest() != expected[key]:
            raise ArtifactError(f"{weights}: SHA-256 of array {key!r} does not match the manifest")
    return arrays


def teacher_normalization(manifest_path: Path = TEACHER_MANIFEST) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` the teacher expects on RGB inputs scaled to [0, 1]."""
    manifest = _read_manifest(manifest_path)
    return list(manifest["input"]["mean"]), list(manifest["input"]["std"])


def load_teacher(weights: Path = TEACHER_WEIGHTS, manifest_path: Path = TEACHER_MANIFEST) -> CifarResNet:
    """The bundled CIFAR-10 ResNet-20 in eval mode, weights verified against their manifest.

    Raises:
        ArtifactError: a file is missing, truncated, of the wrong format/version, or an array's
            SHA-256, shape or dtype differs from the manifest.
    """
    manifest = _read_manifest(Path(manifest_path))
    arrays = load_verified_arrays(Path(weights), manifest)
    model = resnet20(int(manifest["num_classes"]))
    state = {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ArtifactError(f"{weights}: state dict mismatch (missing {missing}, unexpected {unexpected})")
    return model.eval()
