"""Export a torch model to TFLite (fp32) with litert-torch, and run it with the LiteRT interpreter.

litert-torch lowers the torch graph (``torch.export``) to TFLite builtins; a
:class:`~convexedge.host.students.GatedConvStudent` becomes ``CONV_2D`` for the gate projections,
a ``GREATER_EQUAL`` against 0 for the fixed masks, a ``CONV_2D`` for all gates' outputs, then
``MUL`` and ``SUM``. The interpreter is ``ai_edge_litert`` (tflite-runtime 2.14 breaks on numpy 2).
Full-integer int8 is open work. Install with ``pip install 'convexedge[tflite]'``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from convexedge.device.errors import ArtifactError

__all__ = ["export_tflite", "run_tflite", "tflite_ops"]


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


def run_tflite(path: str | Path, x: np.ndarray) -> np.ndarray:
    """Outputs of the TFLite model on ``x`` (N, ...) float32, one sample at a time (batch 1 graph)."""
    interp = _interpreter(path)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    outs = []
    for i in range(len(x)):
        interp.set_tensor(inp["index"], np.ascontiguousarray(x[i : i + 1], np.float32))
        interp.invoke()
        outs.append(interp.get_tensor(out["index"]).copy())
    return np.concatenate(outs)


def tflite_ops(path: str | Path) -> list[str]:
    """Sorted distinct builtin op names used by the TFLite model."""
    interp = _interpreter(path, delegates=False)  # with XNNPACK the ops show up as one DELEGATE
    return sorted({d["op_name"] for d in interp._get_ops_details()})
