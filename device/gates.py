"""Fixed gates of a device head, regenerated from a seed exactly as the host draws them.

A Gaussian gate matrix is ``standard_normal((d, P))`` from numpy's PCG64 seeded with the spec's seed,
cast to float32, with column 0 zeroed when ``linear_gate`` (an always-on, linear path): the same
draw as :func:`convexedge.host.gates.sample_gates`, so a head can ship the seed instead of the
``d * P`` gate values (a test compares the two bit for bit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np

__all__ = ["GateSpec", "sample_gates"]


@dataclass(frozen=True, kw_only=True)
class GateSpec:
    """How the gates were made; the same fields as the host's ``GateSpec`` (JSON-compatible).

    Attributes:
        kind: ``"gaussian"`` (regenerable from ``seed``) or ``"array"`` (stored in the artifact).
        d: gate dimension, bias column included (input features + 1).
        P: number of gates.
        seed: seed of the Gaussian draw (ignored for ``"array"``).
        linear_gate: gate 0 is the zero vector, whose mask is all ones.
    """

    kind: Literal["gaussian", "array"] = "gaussian"
    d: int
    P: int
    seed: int = 0
    linear_gate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("gaussian", "array"):
            raise ValueError(f"gate kind must be 'gaussian' or 'array', got {self.kind!r}")
        for name in ("d", "P", "seed"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool):
                raise ValueError(f"gate spec {name} must be an int, got {val!r}")
        if self.d < 2 or self.P < 1:
            raise ValueError(f"gates need d >= 2 (features + bias) and P >= 1, got d={self.d}, P={self.P}")
        if self.seed < 0:
            raise ValueError(f"gate seed must be >= 0, got {self.seed}")
        if not isinstance(self.linear_gate, bool):
            raise ValueError(f"linear_gate must be a bool, got {self.linear_gate!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_gates(spec: GateSpec) -> np.ndarray:
    """The ``(d, P)`` float32 gate matrix of a Gaussian spec, reproducible from its seed.

    Example:
        >>> G = sample_gates(GateSpec(d=129, P=8, seed=0))
        >>> G.shape, bool((G[:, 0] == 0).all())
        ((129, 8), True)
    """
    if spec.kind != "gaussian":
        raise ValueError(f"only Gaussian gates can be sampled from a spec, got kind {spec.kind!r}")
    rng = np.random.Generator(np.random.PCG64(spec.seed))
    G = rng.standard_normal((spec.d, spec.P)).astype(np.float32)
    if spec.linear_gate:
        G[:, 0] = 0.0
    return G
