"""Export a torch model (teacher, or teacher with convex students swapped in) to ONNX.

Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``) at opset 18 with a dynamic batch
axis. A :class:`~convexedge.host.students.GatedConvStudent` exports as plain ONNX ops: ``Conv`` for
the gate projections, ``GreaterOrEqual`` against 0 for the fixed masks, ``Conv`` for all gates'
outputs at once, then ``Mul`` and ``ReduceSum`` over the gate axis (no transposes). The file is
validated with ``onnx.checker`` (full check) before it is returned.
"""

from __future__ import annotations

import logging
from pathlib import Path

from convexedge.device.errors import ArtifactError

__all__ = ["export_onnx", "onnx_gate_masks", "onnx_ops", "run_onnx"]

log = logging.getLogger(__name__)

OPSET = 18


def export_onnx(model, path: str | Path, input_shape: tuple[int, ...] = (3, 32, 32)) -> Path:
    """Write ``model`` (eval mode) to ``path`` as ONNX with input ``(batch, *input_shape)``.

    Args:
        model: a torch ``nn.Module``; it is put in eval mode, not otherwise changed.
        path: the ``.onnx`` file to write (parent folders are created).
        input_shape: per-sample input shape, e.g. ``(3, 32, 32)``.

    Returns:
        The path written.
    """
    import onnx
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = (torch.zeros(2, *input_shape),)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(
        model, example, dynamo=True, dynamic_shapes=({0: batch},), opset_version=OPSET, verbose=False
    )
    program.save(str(path))
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def onnx_ops(path: str | Path) -> list[str]:
    """Sorted distinct op types of the ONNX graph at ``path`` (subgraphs of functions included)."""
    model = _load(path)
    ops = {n.op_type for n in model.graph.node}
    for fn in model.functions:
        ops |= {n.op_type for n in fn.node}
    return sorted(ops)


def _load(path: str | Path):
    import onnx

    try:
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
    except FileNotFoundError:
        raise ArtifactError(f"ONNX file {path} not found") from None
    except Exception as exc:  # onnx raises DecodeError / ValidationError types of its own
        raise ArtifactError(f"{path} is not a valid ONNX model ({type(exc).__name__}: {exc})") from None
    return model


def run_onnx(path: str | Path, x, batch_size: int = 500):
    """Outputs of the ONNX model at ``path`` on ``x`` (N, ...) float32, in onnxruntime on CPU.

    Raises:
        ArtifactError: the file is missing, truncated or not a valid ONNX model.
    """
    import numpy as np
    import onnxruntime as ort

    _load(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outs = [
        session.run(None, {name: np.ascontiguousarray(x[i : i + batch_size], np.float32)})[0]
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(outs)


def onnx_gate_masks(path: str | Path, x, batch_size: int = 500) -> list:
    """The boolean output of every ``GreaterOrEqual`` node (the fixed gate masks) on ``x``, in graph order.

    The mask tensors are added as graph outputs of an in-memory copy; the file is not changed.

    Returns:
        one (N, P, H, W) bool array per mask node.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = _load(path)
    names = [n.output[0] for n in model.graph.node if n.op_type == "GreaterOrEqual"]
    if not names:
        return []
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.BOOL, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0].name
    parts = [
        session.run(names, {inp: np.ascontiguousarray(x[i : i + batch_size], np.float32)})
        for i in range(0, len(x), batch_size)
    ]
    return [np.concatenate([p[k] for p in parts]) for k in range(len(names))]
