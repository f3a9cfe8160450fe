"""torchvision ResNet-18 with the CIFAR stem, and its pickle-free weights.

The CIFAR stem replaces the ImageNet stem (7x7 stride-2 conv and a max pool) by a 3x3 stride-1 conv
and no pool, so 32x32 inputs keep a 32x32 map in ``layer1`` (He et al. 2016 use the same stem for
their CIFAR networks). Stage shapes on a (B, 3, 32, 32) input: ``layer1`` 64x32x32, ``layer2``
128x16x16, ``layer3`` 256x8x8, ``layer4`` 512x4x4; then ``avgpool`` and ``fc``.

Weights are stored like the bundled ResNet-20 (in ``~/.cache/convexedge/`` by default, see
:data:`RESNET18_WEIGHTS`): ``resnet18_cifar10.npz`` (float16 arrays, state-dict names, no pickle) and
``resnet18_cifar10.json`` (format, SHA-256/shape/dtype of every array, input
normalisation, the training recipe and its measured accuracy). :func:`load_resnet18` checks every
array before it builds the model. The weights are produced by ``python -m
convexedge.models.train_resnet18`` (fixed recipe, see that module).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convexedge.device.errors import ArtifactError
from convexedge.models.bundled import _read_manifest, load_verified_arrays

__all__ = [
    "CACHE_DIR",
    "RESNET18_MANIFEST",
    "RESNET18_WEIGHTS",
    "load_resnet18",
    "resnet18_cifar",
    "resnet18_normalization",
    "save_resnet18",
]

_HERE = Path(__file__).resolve().parent
#: Where ``convexedge.models.train_resnet18`` writes the trained weights by default: outside the
#: package (about 21 MB, more than the wheel's budget for bundled files), unless a copy was placed
#: beside this module, which is then preferred.
CACHE_DIR = Path.home() / ".cache" / "convexedge"
_NAME = "resnet18_cifar10"
RESNET18_WEIGHTS = (_HERE if (_HERE / f"{_NAME}.json").exists() else CACHE_DIR) / f"{_NAME}.npz"
RESNET18_MANIFEST = RESNET18_WEIGHTS.with_suffix(".json")
_FORMAT = "convexedge.weights"
_VERSION = 1


def resnet18_cifar(num_classes: int = 10) -> nn.Module:
    """An untrained torchvision ResNet-18 with the CIFAR stem (11.2 M parameters).

    Example:
        >>> model = resnet18_cifar()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def save_resnet18(
    model: nn.Module,
    weights: str | Path,
    manifest_path: str | Path,
    *,
    mean: list[float],
    std: list[float],
    extra: dict | None = None,
) -> dict:
    """Write ``model``'s state dict as float16 ``.npz`` plus a JSON manifest; return the manifest.

    ``num_batches_tracked`` counters are dropped (eval mode does not use them).
    """
    arrays = {
        k: v.detach().cpu().numpy().astype(np.float16)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    weights, manifest_path = Path(weights), Path(manifest_path)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(weights)
    manifest = {
        "format": _FORMAT,
        "format_version": _VERSION,
        "architecture": "convexedge.models.resnet18_cifar.resnet18_cifar",
        "num_classes": int(model.fc.out_features),
        "input": {"layout": "NCHW", "range": [0, 1], "mean": list(mean), "std": list(std)},
        "sha256": {
            k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in arrays.items()
        },
        "shapes": {k: list(v.shape) for k, v in arrays.items()},
        "dtypes": {k: str(v.dtype) for k, v in arrays.items()},
        **(extra or {}),
    }
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return manifest


def load_resnet18(
    weights: str | Path = RESNET18_WEIGHTS, manifest_path: str | Path = RESNET18_MANIFEST
) -> nn.Module:
    """The trained CIFAR-stem ResNet-18 in eval mode (float32), every array verified.

    Raises:
        ArtifactError: a file is missing (train it with ``python -m convexedge.models.train_resnet18``),
            truncated, of the wrong format, or an array's SHA-256, shape or dtype differs.
    """
    manifest_path = Path(manifest_path)
    if not manifest_path.exists():
        raise ArtifactError(
            f"ResNet-18 weights manifest {manifest_path} not found; train the weights with "
            "`python -m convexedge.models.train_resnet18` (fixed recipe, about an hour on one CPU core)"
        )
    manifest = _read_manifest(manifest_path)
    arrays = load_verified_arrays(Path(weights), manifest)
    model = resnet18_cifar(int(manifest["num_classes"]))
    state = {k: torch.from_numpy(v.astype(np.float32)) for k, v in arrays.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ArtifactError(f"{weights}: state dict mismatch (missing {missing}, unexpected {unexpected})")
    return model.eval()


def resnet18_normalization(manifest_path: str | Path = RESNET18_MANIFEST) -> tuple[list[float], list[float]]:
    """Per-channel ``(mean, std)`` the trained ResNet-18 expects on RGB inputs in [0, 1]."""
    manifest = _read_manifest(Path(manifest_path))
    return list(manifest["input"]["mean"]), list(manifest["input"]["std"])
