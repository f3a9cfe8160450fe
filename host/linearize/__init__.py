"""convexedge.host.linearize: remove ReLUs down to a budget for private inference.

Contract: :func:`linearize_` swaps every ``nn.ReLU`` of a model in place for a
:class:`MaskedReLU` (``y = m * relu(x) + (1 - m) * x``, per pixel or per channel) without changing
its outputs; :func:`count_relus` counts the ReLUs per sample exactly. Two searches set the masks:
:func:`snl_path` (SNL, Cho et al. 2022: L1 on trainable scores, then threshold) and
:func:`bcd_linearize` (block coordinate descent, Rakhlin et al. 2025, warm-started from SNL;
deterministic and resumable). :func:`export_linearized_onnx` writes the result with masks as
constants and :func:`count_onnx_relus` reads the ReLU count back from the graph.
"""

from convexedge.host.linearize.bcd import BcdConfig, BcdResult, bcd_linearize
from convexedge.host.linearize.export import count_onnx_relus, export_linearized_onnx
from convexedge.host.linearize.masks import (
    MaskedReLU,
    count_relus,
    flat_mask,
    linearize_,
    live_relus,
    set_flat_mask_,
)
from convexedge.host.linearize.pipeline import CompareConfig, compare_methods, plot_histories
from convexedge.host.linearize.snl import SnlConfig, snl_path
from convexedge.host.linearize.train import FinetuneConfig, Ledger, Split

__all__ = [
    "BcdConfig",
    "BcdResult",
    "CompareConfig",
    "FinetuneConfig",
    "Ledger",
    "MaskedReLU",
    "SnlConfig",
    "Split",
    "bcd_linearize",
    "compare_methods",
    "count_onnx_relus",
    "count_relus",
    "export_linearized_onnx",
    "flat_mask",
    "linearize_",
    "live_relus",
    "plot_histories",
    "set_flat_mask_",
    "snl_path",
]
