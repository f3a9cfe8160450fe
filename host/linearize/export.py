"""Export a linearized model to ONNX with its masks as constants, and count the graph's ReLUs.

Each :class:`~convexedge.host.linearize.masks.MaskedReLU` is replaced (in a copy) by an
export form with no multiplications by masks:

* all bits 1: ``Relu`` on the whole feature map; all bits 0: nothing (identity);
* otherwise: flatten the per-sample features, ``Gather`` the kept positions (a constant index
  list), ``Relu`` on them only, ``Gather`` the linear positions, ``Concat`` both and ``Gather``
  with the inverse permutation (a constant) back to the original order.

How a ReLU is counted in the graph (:func:`count_onnx_relus`): the ReLUs of an ONNX model are the
elements, per sample, of the inputs of its ``Relu`` nodes (batch axis excluded; shapes from ONNX
shape inference). Any other op that can compute a ReLU (``Max``, ``Clip``, ``LeakyRelu``, ``PRelu``,
``Where`` against a comparison) is reported so a caller can refuse a graph that hides some.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch import nn

from convexedge.device.errors import ArtifactError
from convexedge.host.linearize.masks import MaskedReLU, masked_relus

__all__ = ["count_onnx_relus", "export_linearized_onnx", "exportable"]

_RELU_LIKE = (
    "Max",
    "Clip",
    "LeakyRelu",
    "PRelu",
    "Where",
    "Softplus",
    "Elu",
    "Selu",
    "Celu",
    "Gelu",
    "HardSigmoid",
)


class _GatherReLU(nn.Module):
    """ReLU on the kept positions of the flattened per-sample features; identity elsewhere."""

    def __init__(self, keep: torch.Tensor, feature_shape: tuple[int, ...]) -> None:
        super().__init__()
        keep = keep.reshape(-1).bool().cpu()
        kept = torch.nonzero(keep).reshape(-1)
        linear = torch.nonzero(~keep).reshape(-1)
        perm = torch.cat([kept, linear])
        self.register_buffer("kept", kept)
        self.register_buffer("linear", linear)
        self.register_buffer("inverse", torch.argsort(perm))
        self.feature_shape = tuple(feature_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(1)
        parts = torch.cat([torch.relu(flat.index_select(1, self.kept)), flat.index_select(1, self.linear)], 1)
        return parts.index_select(1, self.inverse).reshape(-1, *self.feature_shape)


def exportable(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) whose masked ReLUs are replaced by their export forms."""
    out = copy.deepcopy(model).eval()
    for name, m in masked_relus(out):
        if m.alpha is not None:
            raise ValueError(f"{name}: a MaskedReLU still has SNL's continuous alpha; binarize before export")
        keep = m.mask
        if m.granularity == "channel":
            keep = keep.view(-1, *([1] * (len(m.feature_shape) - 1))).expand(m.feature_shape)
        keep = keep > 0.5
        if bool(keep.all()):
            new: nn.Module = nn.ReLU()
        elif not bool(keep.any()):
            new = nn.Identity()
        else:
            new = _GatherReLU(keep, m.feature_shape)
        parent_name, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, attr, new)
    return out


def export_linearized_onnx(model: nn.Module, path: str | Path, input_shape: tuple[int, ...]) -> Path:
    """Write the linearized ``model`` to ``path`` as ONNX (opset 18, dynamic batch, masks constant).

    ``input_shape`` is the per-sample shape, e.g. ``(3, 32, 32)`` or ``(1, 40)``.
    """
    from convexedge.converters.onnx import export_onnx

    if any(isinstance(m, MaskedReLU) and m.mask is None for m in model.modules()):
        raise ValueError("the model has MaskedReLUs without masks: run linearize_(model, example) first")
    return export_onnx(exportable(model).cpu(), path, input_shape=tuple(input_shape))


def count_onnx_relus(path: str | Path) -> tuple[int, dict[str, int]]:
    """ReLUs per sample in the ONNX graph at ``path``, and the count of other ReLU-capable ops.

    Returns:
        ``(relus, other_ops)``: the summed per-sample input sizes of the ``Relu`` nodes, and
        ``{op_type: nodes}`` for ops that could also compute a ReLU (see the module docstring).

    Raises:
        ArtifactError: unreadable file, or a ``Relu`` input whose non-batch shape is not static.
    """
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    except Exception as exc:  # onnx raises its own DecodeError / InferenceError types
        raise ArtifactError(f"{path}: cannot read or shape-infer the ONNX model ({exc})") from None
    shapes = {}
    for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    nodes = list(model.graph.node) + [n for f in model.functions for n in f.node]
    total = 0
    other: dict[str, int] = {}
    for node in nodes:
        if node.op_type == "Relu":
            dims = shapes.get(node.input[0])
            if dims is None or len(dims) < 2 or any(d is None or d == 0 for d in dims[1:]):
                raise ArtifactError(
                    f"{path}: Relu node {node.name!r} input has no static per-sample shape ({dims})"
                )
            total += int(np.prod(dims[1:], dtype=np.int64))
        elif node.op_type in _RELU_LIKE:
            other[node.op_type] = other.get(node.op_type, 0) + 1
    return total, other
