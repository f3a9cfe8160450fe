"""convexedge.converters: export compressed models and device heads to deployable files, prove parity.

Contract: importing this package never imports onnx, onnxruntime, tensorflow, litert or ai_edge_*;
each converter imports its library inside the function that needs it (``[export]`` extra: ONNX;
``[tflite]``: TFLite fp32 and full-integer int8). ONNX (fp32, opset 18, dynamic batch), TFLite fp32 and
int8 (every op checked against the TFLite Micro builtins), the device head as C (fp32 and int8
kernels, compiled and checked against numpy) and the head artifact; ``convexedge export`` drives them.
"""

from convexedge.converters.c_head import compile_c_head, export_c_head, run_c_head
from convexedge.converters.onnx import export_onnx, onnx_gate_masks, onnx_ops, run_onnx
from convexedge.converters.parity import ParityResult, compare_outputs

__all__ = [
    "ParityResult",
    "compare_outputs",
    "compile_c_head",
    "export_c_head",
    "export_onnx",
    "onnx_gate_masks",
    "onnx_ops",
    "run_c_head",
    "run_onnx",
]
