"""Every exception and warning type convexedge raises, in one place.

Broken input or a broken file raises an exception from here; a solver that did not converge returns
``converged=False`` and emits :class:`ConvergenceWarning` instead (a status, not an error).
"""

from __future__ import annotations

__all__ = [
    "ConvexEdgeError",
    "DataError",
    "ArtifactError",
    "ConvergenceWarning",
    "SignatureError",
    "RefitBusyError",
]


class ConvexEdgeError(Exception):
    """Base class of every convexedge error."""


class DataError(ConvexEdgeError, ValueError):
    """Input data has the wrong shape, dtype, range, labels, or holds NaN/Inf."""


class ArtifactError(ConvexEdgeError):
    """A weights file or head artifact is missing, truncated, tampered with, or of the wrong version."""


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped at its iteration or time cap before reaching its tolerance."""


class SignatureError(ArtifactError):
    """A head artifact's ed25519 signature is missing, malformed, or does not verify."""


class RefitBusyError(ConvexEdgeError, RuntimeError):
    """A refit was requested while another refit of the same runtime is still running."""
