"""Neuron-level compression of a convex gated-ReLU solution: per-gate SVD, then a convex refit.

A convex student ``sum_i D_i Z V_i`` (``V_i``: (d, c)) is a gated-ReLU network whose gate ``i``
carries ``rank(V_i)`` neurons: with the SVD ``V_i = sum_j s_ij u_ij w_ij^T`` the output is
``sum_ij 1[Z g_i >= 0] (Z u_ij s_ij) w_ij^T`` (Sahiner, Ergen, Pauly & Pilanci, "Vector-output ReLU
neural network problems are copositive programs", ICML 2021, Sec. 3: the convex program's solution
decomposes into neurons that share the gate of their block). Such a network costs
``R (d + c)`` parameters for ``R`` neurons instead of ``P d c``.

:func:`factorize` keeps the ``R`` largest singular triplets over all gates (a global threshold on
the singular values, so a gate that matters keeps more neurons), then refits the second layer
``W`` (R, c) on the kept first layer by least squares on the fitting rows,

    minimize_W  1/(2n) ||Phi W - Y||_F^2 + ridge/2 ||W||_F^2,   Phi = [1[Z g_i >= 0] (Z a_j)]_j,

a convex problem solved exactly (an ``R x R`` Cholesky). ``R`` runs over a grid; every candidate is
scored on held-out *unlabeled* rows, and the smallest ``R`` whose held-out loss is within
``tolerance`` (relative) of the unfactored solution's is returned. Labels are never read.

Departure from the cited decomposition (marked): our convex objective penalises ``||V_i||_F``
(group lasso), not the nuclear norm whose solutions that paper factorises, so ``V_i`` is not low
rank at the optimum; truncating it is a compression step that the held-out check accepts or refuses,
not an exact equivalence.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from convexedge.device.errors import DataError
from convexedge.host.solvers import GatedProblem
from convexedge.host.students import ConvGeometry, LowRankGatedConvStudent

__all__ = ["LowRankConfig", "LowRankResult", "factorize", "neuron_student", "neurons_of"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class LowRankConfig:
    """Settings of :func:`factorize`.

    Attributes:
        neurons: candidate total neuron counts ``R`` (``None``: 8, 16, 32, ... up to the total rank,
            and the total rank itself).
        tolerance: accept the smallest ``R`` whose held-out loss is at most ``(1 + tolerance)`` times
            the unfactored solution's.
        ridge: ridge weight of the refit, relative to the mean diagonal of ``Phi^T Phi / n``
            (keeps the Cholesky well posed; ``0`` for plain least squares).
        rtol: singular values below ``rtol * s_max`` count as zero (not neurons).
    """

    neurons: tuple[int, ...] | None = None
    tolerance: float = 0.02
    ridge: float = 1e-6
    rtol: float = 1e-6

    def __post_init__(self) -> None:
        if self.neurons is not None and (not self.neurons or min(self.neurons) < 1):
            raise ValueError(f"neurons must be positive counts, got {self.neurons}")
        if not (self.tolerance >= 0 and self.ridge >= 0 and 0 <= self.rtol < 1):
            raise ValueError(
                f"need tolerance >= 0, ridge >= 0 and 0 <= rtol < 1, got {self.tolerance}, "
                f"{self.ridge}, {self.rtol}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LowRankResult:
    """A factored student: neuron ``j`` is ``1[z . g_{gate_of[j]} >= 0] (z . A[:, j]) W[j]``.

    Attributes:
        A: (d, R) first-layer weights (last row: bias, like the patch rows).
        W: (R, c) refitted second layer.
        gate_of: (R,) index of each neuron's gate (a column of the problem's masks / gates).
        val_loss: held-out ``1/(2n) ||Phi W - Y||^2`` of the returned ``R``.
        val_loss_full: the same for the unfactored ``V``.
        accepted: ``val_loss <= (1 + tolerance) * val_loss_full`` (else the largest candidate is
            returned and the caller should keep ``V``).
        candidates: ``(R, val_loss)`` of every candidate tried, in increasing ``R``.
    """

    A: torch.Tensor
    W: torch.Tensor
    gate_of: torch.Tensor
    val_loss: float
    val_loss_full: float
    accepted: bool
    candidates: list[tuple[int, float]] = field(default_factory=list)

    @property
    def neurons(self) -> int:
        return int(self.A.shape[1])

    def num_parameters(self) -> int:
        """First and second layer (gates not counted)."""
        return int(self.A.numel() + self.W.numel())


def neurons_of(V: torch.Tensor, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All neurons of ``V`` (P, d, c), largest singular value first.

    Returns:
        ``A`` (d, N) (left singular vectors scaled by their singular values), ``W`` (N, c)
        (right singular vectors), ``gate_of`` (N,), with ``sum_j`` over a gate's neurons of
        ``A[:, j] W[j]`` equal to that gate's ``V_i`` (to rounding).
    """
    if V.ndim != 3:
        raise DataError(f"V must be (P, d, c), got {tuple(V.shape)}")
    V64 = V.detach().to(torch.float64).cpu()
    U, S, Vh = torch.linalg.svd(V64, full_matrices=False)  # (P, d, k), (P, k), (P, k, c)
    smax = float(S.max()) if S.numel() else 0.0
    keep = S > rtol * smax if smax > 0 else torch.zeros_like(S, dtype=torch.bool)
    order = torch.argsort(S[keep], descending=True)
    gate_idx = torch.arange(V.shape[0]).unsqueeze(1).expand_as(S)[keep][order]
    A = (U * S.unsqueeze(1)).permute(0, 2, 1)[keep][order].T  # (d, N)
    W = Vh[keep][order]  # (N, c)
    return A.contiguous(), W.contiguous(), gate_idx.contiguous()


def _features(problem: GatedProblem, A: torch.Tensor, gate_of: torch.Tensor, sl: slice) -> torch.Tensor:
    Z = problem.Z[sl].to(torch.float64)
    return (Z @ A) * problem.masks[sl][:, gate_of].to(torch.float64)


def _normal_equations(
    problem: GatedProblem, A: torch.Tensor, gate_of: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    R, c = A.shape[1], problem.c
    H = torch.zeros(R, R, dtype=torch.float64, device=problem.Z.device)
    b = torch.zeros(R, c, dtype=torch.float64, device=problem.Z.device)
    for sl in problem._chunks():
        F = _features(problem, A, gate_of, sl)
        H += F.T @ F
        b += F.T @ problem.Y[sl].to(torch.float64)
    return H, b


def _loss(problem: GatedProblem, A: torch.Tensor, W: torch.Tensor, gate_of: torch.Tensor) -> float:
    total = 0.0
    for sl in problem._chunks():
        r = _features(problem, A, gate_of, sl) @ W - problem.Y[sl].to(torch.float64)
        total += float((r * r).sum())
    return 0.5 * total / problem.n


def _refit(H: torch.Tensor, b: torch.Tensor, n: int, ridge: float) -> torch.Tensor:
    R = H.shape[0]
    reg = ridge * float(H.diagonal().mean()) + 1e-300
    eye = torch.eye(R, dtype=H.dtype, device=H.device)
    try:
        L = torch.linalg.cholesky(H + reg * eye)
        return torch.cholesky_solve(b, L)
    except RuntimeError:  # singular even with the ridge: least squares by eigendecomposition
        return torch.linalg.lstsq(H + reg * eye, b).solution


def _grid(total: int, neurons: Sequence[int] | None) -> list[int]:
    if neurons is not None:
        return sorted({min(int(r), total) for r in neurons})
    grid = [2**k for k in range(3, max(3, int(math.log2(max(total, 1))) + 1)) if 2**k < total]
    return [*grid, total]


def factorize(
    problem: GatedProblem,
    val_problem: GatedProblem,
    V: torch.Tensor,
    config: LowRankConfig = LowRankConfig(),
) -> LowRankResult:
    """The smallest neuron count whose refitted network is within tolerance on held-out rows.

    Args:
        problem: the fitting rows (``Z``, ``Y``, masks) the convex student was solved on.
        val_problem: held-out rows with the same gates.
        V: (P, d, c) convex solution (zero blocks are inactive gates).
        config: candidate neuron counts, tolerance, ridge.

    Returns:
        A :class:`LowRankResult`; check ``accepted`` before using it in place of ``V``.

    Raises:
        DataError: shapes disagree, or ``V`` is all zero.
    """
    if V.ndim != 3 or tuple(V.shape) != (problem.P, problem.d, problem.c):
        raise DataError(f"V must be (P, d, c) = {(problem.P, problem.d, problem.c)}, got {tuple(V.shape)}")
    if (val_problem.P, val_problem.d, val_problem.c) != (problem.P, problem.d, problem.c):
        raise DataError("the held-out problem must have the fitting problem's P, d and c")
    A_all, W_all, gate_all = neurons_of(V, config.rtol)
    total = A_all.shape[1]
    if total == 0:
        raise DataError("V is all zero: there is no network to factorize")
    dev = problem.Z.device
    A_all, W_all, gate_all = A_all.to(dev), W_all.to(dev), gate_all.to(dev)
    full = _loss(val_problem, A_all, W_all, gate_all)  # the unfactored V, exactly (all neurons)
    H_all, b_all = _normal_equations(problem, A_all, gate_all)
    limit = (1.0 + config.tolerance) * full
    candidates, chosen = [], None
    for R in _grid(total, config.neurons):
        # the Gram of the first R neurons is the leading block of the full one
        W = _refit(H_all[:R, :R], b_all[:R], problem.n, config.ridge)
        loss = _loss(val_problem, A_all[:, :R], W, gate_all[:R])
        candidates.append((R, loss))
        log.info("low rank: %d neurons, held-out loss %.4g (unfactored %.4g)", R, loss, full)
        if loss <= limit:
            chosen = (R, W, loss)
            break
    accepted = chosen is not None
    if chosen is None:
        R, loss = min(candidates, key=lambda t: t[1])
        chosen = (R, _refit(H_all[:R, :R], b_all[:R], problem.n, config.ridge), loss)
    R, W, loss = chosen
    return LowRankResult(
        A=A_all[:, :R].contiguous(),
        W=W.contiguous(),
        gate_of=gate_all[:R].contiguous(),
        val_loss=loss,
        val_loss_full=full,
        accepted=accepted,
        candidates=candidates,
    )


def neuron_student(
    problem: GatedProblem,
    val_problem: GatedProblem,
    V: torch.Tensor,
    G: np.ndarray | torch.Tensor,
    geom: ConvGeometry,
    *,
    output_relu: bool,
    config: LowRankConfig = LowRankConfig(),
) -> tuple[LowRankGatedConvStudent, LowRankResult]:
    """:func:`factorize` ``V`` and build its :class:`LowRankGatedConvStudent` (on the CPU, float32).

    The caller keeps it in place of the full student when ``result.accepted`` and it is smaller.
    """
    res = factorize(problem, val_problem, V, config)
    student = LowRankGatedConvStudent(
        res.A.float().cpu(), res.W.float().cpu(), G, res.gate_of.cpu(), geom, output_relu=output_relu
    )
    return student, res
