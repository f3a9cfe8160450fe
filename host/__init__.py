"""convexedge.host: the workstation side: capture, convex solve, student modules, swap, evaluate.

Contract: data flows one way, capture -> solve -> student -> swap -> evaluate. Capture and solve
never read labels. torch runs on CPU or CUDA (the tensors' device decides). Errors are the types of
:mod:`convexedge.device.errors`; a solver that stops at its cap returns ``converged=False`` and
warns with :class:`~convexedge.device.errors.ConvergenceWarning`.
"""

from convexedge.host.capture import ActivationShards, CaptureConfig, capture_block
from convexedge.host.data import ImageSet, load_images
from convexedge.host.gates import GateSpec, gate_masks, sample_gates
from convexedge.host.solvers import FistaConfig, GatedProblem, SolveResult, solve
from convexedge.host.students import (
    ConvGeometry,
    GatedConvStudent,
    GatedMLPStudent,
    LowRankGatedConvStudent,
    StudentChain,
)
from convexedge.host.swap import swap_, swapped

__all__ = [
    "ActivationShards",
    "CaptureConfig",
    "ConvGeometry",
    "FistaConfig",
    "GateSpec",
    "GatedConvStudent",
    "LowRankGatedConvStudent",
    "StudentChain",
    "GatedMLPStudent",
    "GatedProblem",
    "ImageSet",
    "SolveResult",
    "capture_block",
    "gate_masks",
    "load_images",
    "sample_gates",
    "solve",
    "swap_",
    "swapped",
]
