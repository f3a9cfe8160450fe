"""Parity of an exported model against torch: output differences and top-1 agreement."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ParityResult", "compare_outputs"]


@dataclass(frozen=True)
class ParityResult:
    """How closely an export reproduces the torch model on the same inputs.

    Attributes:
        max_abs_diff: largest absolute difference of any output.
        top1_agreement: fraction of samples whose arg-max agrees.
        top1_reference / top1_export: accuracy of each against labels (``None`` without labels).
        samples: number of samples compared.
    """

    max_abs_diff: float
    top1_agreement: float
    top1_reference: float | None
    top1_export: float | None
    samples: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare_outputs(
    reference: np.ndarray, exported: np.ndarray, labels: np.ndarray | None = None
) -> ParityResult:
    """Compare (N, classes) outputs of the reference (torch) and of the export."""
    if reference.shape != exported.shape:
        raise ValueError(f"outputs differ in shape: reference {reference.shape}, export {exported.shape}")
    ref_top, exp_top = reference.argmax(1), exported.argmax(1)
    return ParityResult(
        max_abs_diff=float(np.abs(reference - exported).max()),
        top1_agreement=float((ref_top == exp_top).mean()),
        top1_reference=None if labels is None else float((ref_top == labels).mean()),
        top1_export=None if labels is None else float((exp_top == labels).mean()),
        samples=int(reference.shape[0]),
    )
