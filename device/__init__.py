"""convexedge.device: the on-device runtime, numpy and scipy only.

Contract: importing this package never imports torch, tensorflow or onnxruntime (a test checks it in
a subprocess with those modules blocked). An app opens a :class:`HeadStore` (versioned, checksummed,
optionally ed25519-signed heads with atomic commit, rollback and confirm), serves it through a
:class:`RefitRuntime` (lock-free ``predict``, bounded ``observe`` buffer, background ``refit`` with
the host's FISTA in numpy, a two-array proximal heavy ball or a block coordinate solver, committed
only when it improves a held-out part of the stream). The error types shared by every part of convexedge live
here too (:mod:`convexedge.device.errors`).
"""

from convexedge.device.artifact import FORMAT_VERSION, generate_signing_key, read_head, write_head
from convexedge.device.bcd import BcdConfig
from convexedge.device.buffer import BufferConfig
from convexedge.device.errors import (
    ArtifactError,
    ConvergenceWarning,
    ConvexEdgeError,
    DataError,
    RefitBusyError,
    SignatureError,
)
from convexedge.device.fista import FistaConfig
from convexedge.device.gates import GateSpec, sample_gates
from convexedge.device.head import ConvexHead
from convexedge.device.momentum import MomentumConfig
from convexedge.device.refit import RefitConfig, RefitJob, RefitResult, RefitRuntime
from convexedge.device.store import HeadStore

__all__ = [
    "FORMAT_VERSION",
    "ArtifactError",
    "BcdConfig",
    "BufferConfig",
    "ConvergenceWarning",
    "ConvexEdgeError",
    "ConvexHead",
    "DataError",
    "FistaConfig",
    "GateSpec",
    "HeadStore",
    "MomentumConfig",
    "RefitBusyError",
    "RefitConfig",
    "RefitJob",
    "RefitResult",
    "RefitRuntime",
    "SignatureError",
    "generate_signing_key",
    "read_head",
    "sample_gates",
    "write_head",
]
