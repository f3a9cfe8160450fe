"""convexedge.device: the on-device runtime, numpy and scipy only.

Contract: importing this package never imports torch, tensorflow or onnxruntime (a test checks it in
a subprocess with those modules blocked). It holds the error types shared by every part of
convexedge and the numpy kernel that evaluates a gated-ReLU head; loading, refitting and atomic
storage of heads arrive with the device-runtime issue.
"""

from convexedge.device.errors import ArtifactError, ConvergenceWarning, ConvexEdgeError, DataError

__all__ = ["ArtifactError", "ConvergenceWarning", "ConvexEdgeError", "DataError"]
