"""convexedge.models: model architectures, the bundled teacher, and the bundled real CIFAR-10 slice.

Contract: every bundled file is pickle-free (``.npz`` + JSON) and carries its provenance
(``PROVENANCE.md``). :func:`load_teacher` verifies the SHA-256, shape and dtype of every array before
it builds the model, and raises :class:`~convexedge.device.errors.ArtifactError` otherwise.
"""

from convexedge.models.bundled import (
    BUNDLED_DATA_DIR,
    TEACHER_MANIFEST,
    TEACHER_WEIGHTS,
    load_teacher,
    teacher_normalization,
)
from convexedge.models.resnet_cifar import BasicBlock, CifarResNet, resnet20

__all__ = [
    "BUNDLED_DATA_DIR",
    "TEACHER_MANIFEST",
    "TEACHER_WEIGHTS",
    "BasicBlock",
    "CifarResNet",
    "load_teacher",
    "resnet20",
    "teacher_normalization",
]
