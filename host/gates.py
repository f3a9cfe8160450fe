"""Fixed gate vectors of a gated-ReLU network and the masks they induce.

A gate ``g_i`` (a column of ``G``, shape ``(d, P)``) turns sample ``z`` on when ``z . g_i >= 0``.
Gaussian gates are drawn with numpy's PCG64 from a stored seed, so a device can regenerate them
from the seed alone (then the gates cost no storage). Gate 0 may be the zero vector: its mask is all
ones, which gives the student a plain linear (residual) path.

:class:`GateSpec` and :func:`sample_gates` are the device runtime's own (numpy only), so host and
device draw the very same gates; this module adds the torch mask computation.
"""

from __future__ import annotations

import torch

from convexedge.device.gates import GateSpec, sample_gates

__all__ = ["GateSpec", "gate_masks", "sample_gates"]


def gate_masks(Z: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Masks ``1[Z @ G >= 0]``: ``Z`` (n, d), ``G`` (d, P) -> (n, P) bool."""
    return (Z @ G.to(Z.dtype)) >= 0
