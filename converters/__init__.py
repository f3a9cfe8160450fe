"""convexedge.converters: export compressed models and device heads (ONNX, TFLite, C arrays).

Contract: importing this package never imports onnx, onnxruntime or tensorflow; each converter
imports its library inside the function that needs it. The converters themselves arrive with the
export issue; until then this package holds no public names.
"""

__all__: list[str] = []
