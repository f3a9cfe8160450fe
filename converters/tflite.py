"""Export a torch model to TFLite (fp32) with litert-torch, and run it with the LiteRT interpreter.

litert-torch lowers the torch graph (``torch.export``) to TFLite builtins; a
:class:`~convexedge.host.students.GatedConvStudent` becomes ``CONV_2D`` for the gate projections,
a ``GREATER_EQUAL`` against 0 for the fixed masks, a ``CONV_2D`` for all gates' outputs, then
``MUL`` and ``SUM``. The interpreter is ``ai_edge_litert`` (tflite-runtime 2.14 breaks on numpy 2).
Install with ``pip install 'convexedge[tflite]'``.

Full-integer int8 (:func:`quantize_tflite_int8`): ai-edge-quantizer's static ``w8a8`` recipe on the fp32
file (int8 weights per channel, int8 activations per tensor, int8 model input and output), with the
activation ranges the min / max over all the real calibration images. The quantizer's own default, a
moving average of per-image extremes, clips rare large activations: on the distilled model it cost 4.0
top-1 points, min / max none (60.5% vs fp32 59.9%); ``ranges="ema"`` keeps it for comparison.
Measured against litert-torch's PT2E path: on the teacher both work (PT2E: 91.1% vs fp32 91.5%; this
path: 91.5%, agreement 99.3%), but PT2E fails on the gated student (its histogram
observer is attached to the boolean mask and ``torch.histc`` rejects bool) and re-traces the model,
while this path reuses the fp32 file and needs no torch. Caveat, measured and reported
(:func:`tflite_float_ops`): the quantizer has no int8 kernel for ``GREATER_EQUAL``, so on a gated
student the mask is a float island: ``DEQUANTIZE`` (int8 gate projection -> float32) ->
``GREATER_EQUAL`` (float32) -> ``CAST`` (bool -> float32) -> ``QUANTIZE``; everything else is int8.
:func:`tflite_ops` reads op names straight from the flatbuffer; :data:`TFLM_BUILTINS` is the TFLite
Micro builtin set they are checked against; :func:`tflite_gate_masks` returns the masks the file computes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convexedge.device.errors import ArtifactError

__all__ = [
    "CALIBRATIONS",
    "TFLM_BUILTINS",
    "export_tflite",
    "ops_outside_tflm",
    "quantize_tflite_int8",
    "run_tflite",
    "tflite_float_ops",
    "tflite_gate_masks",
    "tflite_ops",
]

# Builtin operators registered by TensorFlow Lite Micro's MicroMutableOpResolver (Add<Op>() methods),
# written out from its op resolver; custom ops (e.g. ETHOSU) are not builtins and are left out. Being
# in this set means TFLM has a kernel for the op, not that every tensor type of it is supported.
TFLM_BUILTINS: frozenset[str] = frozenset(
    """ABS ADD ADD_N ARG_MAX ARG_MIN ASSIGN_VARIABLE AVERAGE_POOL_2D BATCH_MATMUL BATCH_TO_SPACE_ND
    BROADCAST_ARGS BROADCAST_TO CALL_ONCE CAST CEIL CONCATENATION CONV_2D COS CUMSUM DEPTH_TO_SPACE
    DEPTHWISE_CONV_2D DEQUANTIZE DIV ELU EMBEDDING_LOOKUP EQUAL EXP EXPAND_DIMS FILL FLOOR FLOOR_DIV
    FLOOR_MOD FULLY_CONNECTED GATHER GATHER_ND GREATER GREATER_EQUAL HARD_SWISH IF L2_NORMALIZATION
    L2_POOL_2D LEAKY_RELU LESS LESS_EQUAL LOG LOGICAL_AND LOGICAL_NOT LOGICAL_OR LOGISTIC LOG_SOFTMAX
    MAXIMUM MAX_POOL_2D MEAN MINIMUM MIRROR_PAD MUL NEG NOT_EQUAL PACK PAD PADV2 PRELU QUANTIZE
    READ_VARIABLE REDUCE_MAX RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR RESIZE_NEAREST_NEIGHBOR
    REVERSE_V2 ROUND RSQRT SELECT_V2 SHAPE SIN SLICE SOFTMAX SPACE_TO_BATCH_ND SPACE_TO_DEPTH SPLIT
    SPLIT_V SQRT SQUARE SQUARED_DIFFERENCE SQUEEZE STRIDED_SLICE SUB SUM SVDF TANH TRANSPOSE
    TRANSPOSE_CONV UNIDIRECTIONAL_SEQUENCE_LSTM UNPACK VAR_HANDLE WHILE ZEROS_LIKE""".split()
)


def export_tflite(model, path: str | Path, input_shape: tuple[int, ...] = (3, 32, 32)) -> Path:
    """Write ``model`` (eval mode) to ``path`` as an fp32 ``.tflite`` with input ``(1, *input_shape)``."""
    import litert_torch
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    edge = litert_torch.convert(model.eval(), (torch.zeros(1, *input_shape),))
    edge.export(str(path))
    return path


def _interpreter(path: str | Path, *, delegates: bool = True):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    if not Path(path).is_file():
        raise ArtifactError(f"TFLite file {path} not found")
    resolver = OpResolverType.AUTO if delegates else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        interp = Interpreter(model_path=str(path), experimental_op_resolver_type=resolver)
        interp.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{path} is not a valid TFLite model ({exc})") from None
    return interp


def _to_input(detail: dict, x: np.ndarray) -> np.ndarray:
    if detail["dtype"] == np.int8:  # full-integer file: quantise with the input's scale / zero point
        scale, zero = detail["quantization"]
        return np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8)
    return np.ascontiguousarray(x, np.float32)


def _from_output(detail: dict, y: np.ndarray) -> np.ndarray:
    if detail["dtype"] == np.int8:
        scale, zero = detail["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
    return y.copy()


def run_tflite(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Outputs of the TFLite model on ``x`` (N, ...) float32, one sample at a time (batch 1 graph).

    An int8 input / output (full-integer file) is quantised / dequantised with the file's own scale
    and zero point, so fp32 and int8 files are called the same way.
    """
    interp = _interpreter(path)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], _to_input(inp, x[i : i + 1]))
        interp.invoke()
        outs.append(_from_output(out, interp.get_tensor(out["index"])))
    return np.concatenate(outs)


def tflite_gate_masks(path: str | Path, x: np.ndarray) -> list[np.ndarray]:
    """The boolean output of every ``GREATER_EQUAL`` op (the fixed gate masks) on ``x``, in graph order.

    Returns:
        one (N, ...) bool array per mask op, in the file's own layout (NHWC or NCHW).
    """
    from ai_edge_litert.interpreter import Interpreter

    _interpreter(path, delegates=False)  # existence and validity, with a clear error
    interp = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    interp.allocate_tensors()
    ge = [op["outputs"][0] for op in interp._get_ops_details() if op["op_name"] == "GREATER_EQUAL"]
    inp = interp.get_input_details()[0]
    masks: list[list[np.ndarray]] = [[] for _ in ge]
    for i in range(len(x)):
        interp.set_tensor(inp["index"], _to_input(inp, x[i : i + 1]))
        interp.invoke()
        for k, idx in enumerate(ge):
            masks[k].append(interp.get_tensor(idx).astype(bool))
    return [np.concatenate(m) for m in masks]


def tflite_ops(path: str | Path) -> list[str]:
    """Sorted distinct builtin op names of every subgraph, read from the flatbuffer itself.

    Raises:
        ArtifactError: the file is missing or is not a TFLite flatbuffer.
    """
    from ai_edge_litert import schema_py_generated as schema

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"TFLite file {path} not found")
    buf = path.read_bytes()
    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    try:
        if len(buf) < 8 or buf[4:8] != b"TFL3":
            raise ValueError("no TFL3 file identifier")
        model = schema.Model.GetRootAs(buf, 0)
        codes = [model.OperatorCodes(i) for i in range(model.OperatorCodesLength())]
        used = {
            model.Subgraphs(s).Operators(j).OpcodeIndex()
            for s in range(model.SubgraphsLength())
            for j in range(model.Subgraphs(s).OperatorsLength())
        }
        ops = set()
        for i in used:
            code = max(codes[i].BuiltinCode(), codes[i].DeprecatedBuiltinCode())
            ops.add(names.get(code, f"BUILTIN_{code}") if code != schema.BuiltinOperator.CUSTOM else
                    f"CUSTOM:{codes[i].CustomCode().decode()}")  # fmt: skip
    except Exception as exc:  # flatbuffers raises IndexError / struct.error on a truncated buffer
        raise ArtifactError(f"{path} is not a valid TFLite model ({type(exc).__name__}: {exc})") from None
    return sorted(ops)


def tflite_float_ops(path: str | Path) -> list[str]:
    """Ops of the file that read or write a float tensor (``"OP(in dtypes->out dtypes)"``), sorted.

    For an int8 file this is the float island the quantizer left, e.g. the mask compare.
    """
    interp = _interpreter(path, delegates=False)
    dtype = {t["index"]: np.dtype(t["dtype"]).name for t in interp.get_tensor_details()}
    found = set()
    for op in interp._get_ops_details():
        ins = [dtype[i] for i in op["inputs"] if i >= 0 and i in dtype]
        outs = [dtype[i] for i in op["outputs"] if i in dtype]
        if any(t.startswith("float") for t in ins + outs):
            found.add(f"{op['op_name']}({','.join(ins)}->{','.join(outs)})")
    return sorted(found)


def ops_outside_tflm(ops: list[str]) -> list[str]:
    """The ops of ``ops`` that TensorFlow Lite Micro has no builtin kernel for."""
    return sorted(set(ops) - TFLM_BUILTINS)


CALIBRATIONS = ("minmax", "ema")


def _global_min_max(qsv: dict, new: dict) -> dict:
    """Calibration update: the running elementwise min / max over every sample seen."""
    return {**qsv, "min": np.minimum(qsv["min"], new["min"]), "max": np.maximum(qsv["max"], new["max"])}


def quantize_tflite_int8(
    fp32_path: str | Path, path: str | Path, calibration: np.ndarray, *, ranges: str = "minmax"
) -> Path:
    """Full-integer int8 copy of the fp32 file at ``fp32_path``, calibrated on real inputs.

    Args:
        fp32_path: an fp32 ``.tflite`` written by :func:`export_tflite` (batch-1 input).
        path: the int8 ``.tflite`` to write.
        calibration: (n, *input_shape) float32 model inputs (normalised images), n >= 1, run one at a time.
        ranges: how each activation's range is taken from the per-sample min / max: ``"minmax"`` (the
            min / max over all samples; the default) or ``"ema"`` (the quantizer's own default: an
            exponential moving average with weight 0.95 on the old value, so in effect the mean of the
            last ~20 samples' extremes; it clips the rarer large activations). Measured on the
            distilled model of ``convexedge demo`` (1k test images, 500 calibration images): ``ema``
            drops top-1 from 59.9% to 55.9%, ``minmax`` gives 60.5%; see BENCHMARKS.md section 4.

    Returns:
        The path written. Its input and output are int8 (use :func:`run_tflite` to call it with
        float inputs).
    """
    from ai_edge_litert.interpreter import Interpreter
    from ai_edge_quantizer import calibrator, quantizer, recipe, recipe_manager

    if ranges not in CALIBRATIONS:
        raise ValueError(f"ranges must be one of {', '.join(CALIBRATIONS)}, got {ranges!r}")
    calibration = np.asarray(calibration, np.float32)
    if calibration.ndim < 2 or calibration.shape[0] < 1 or not np.isfinite(calibration).all():
        raise ValueError(f"calibration must be (n, ...) finite float32 with n >= 1, got {calibration.shape}")
    _interpreter(fp32_path, delegates=False)  # existence and validity, with a clear error
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    signatures = Interpreter(model_path=str(fp32_path)).get_signature_list()
    key = next(iter(signatures))
    name = signatures[key]["inputs"][0]
    rcp = recipe.static_wi8_ai8()
    manager = recipe_manager.RecipeManager()
    manager.load_quantization_recipe(rcp)
    update = {"qsv_update_func": _global_min_max} if ranges == "minmax" else {}
    calib = calibrator.Calibrator(str(fp32_path), num_threads=1, **update)
    samples = [{name: calibration[i : i + 1]} for i in range(calibration.shape[0])]
    calib.calibrate({key: samples}, manager)
    q = quantizer.Quantizer(str(fp32_path), rcp)
    q.quantize(calib.get_model_qsvs(), enable_progress_report=False).export_model(str(path), overwrite=True)
    return path
