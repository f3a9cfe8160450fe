"""convexedge.converters: export compressed models to deployable formats and prove parity.

Contract: importing this package never imports onnx, onnxruntime or tensorflow; each converter
imports its library inside the function that needs it (install them with the ``export`` extra).
ONNX (fp32, opset 18, dynamic batch) and TFLite fp32 (``[tflite]`` extra) are here; TFLite int8 and
the C head are open work.
"""

from convexedge.converters.onnx import export_onnx, onnx_ops, run_onnx
from convexedge.converters.parity import ParityResult, compare_outputs

__all__ = ["ParityResult", "compare_outputs", "export_onnx", "onnx_ops", "run_onnx"]
