"""Fixed gate vectors of a gated-ReLU network and the masks they induce.

A gate ``g_i`` (a column of ``G``, shape ``(d, P)``) turns sample ``z`` on when ``z . g_i >= 0``.
Gaussian gates are drawn with numpy's PCG64 from a stored seed, so a device can regenerate them
from the seed alone (then the gates cost no storage). Gate 0 may be the zero vector: its mask is all
ones, which gives the student a plain linear (residual) path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch

__all__ = ["GateSpec", "gate_masks", "sample_gates"]


@dataclass(frozen=True, kw_only=True)
class GateSpec:
    """How the gates were made; JSON-serialisable, written into every artifact.

    Attributes:
        kind: ``"gaussian"`` (regenerable from ``seed``) or ``"array"`` (stored explicitly).
        d: gate dimension (features, bias column included).
        P: number of gates.
        seed: seed of the Gaussian draw.
        linear_gate: gate 0 is the zero vector (an always-on, linear path).
    """

    kind: Literal["gaussian", "array"] = "gaussian"
    d: int
    P: int
    seed: int = 0
    linear_gate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "array"):
            raise ValueError(f"gate kind must be 'gaussian' or 'array', got {self.kind!r}")
        if self.d < 1 or self.P < 1:
            raise ValueError(f"gates need d >= 1 and P >= 1, got d={self.d}, P={self.P}")

    def to_dict(self) -> dict:
        return asdict(self)


def sample_gates(spec: GateSpec) -> np.ndarray:
    """The ``(d, P)`` float32 gate matrix of a Gaussian :class:`GateSpec`, reproducible from its seed.

    Example:
        >>> G = sample_gates(GateSpec(d=289, P=8, seed=0))
        >>> G.shape, bool((G[:, 0] == 0).all())
        ((289, 8), True)
    """
    if spec.kind != "gaussian":
        raise ValueError(f"only Gaussian gates can be sampled from a spec, got kind {spec.kind!r}")
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    G = rng.standard_normal((spec.d, spec.P)).astype(np.float32)
    if spec.linear_gate:
        G[:, 0] = 0.0
    return G


def gate_masks(Z: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Masks ``1[Z @ G >= 0]``: ``Z`` (n, d), ``G`` (d, P) -> (n, P) bool."""
    return (Z @ G.to(Z.dtype)) >= 0
