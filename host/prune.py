"""Optimal-set pruning of a convex gated-ReLU solution to a minimal network (Mishkin & Pilanci 2023).

The problem (``GatedProblem``, groups ``g``: one per gate, or one per gate and output column) is

    minimize_V  F(V) = 1/(2n) ||sum_i D_i Z V_i - Y||_F^2 + lam * sum_g ||V_g||_2.

Facts used here (Mishkin & Pilanci, "Optimal Sets and Solution Paths of ReLU Networks", ICML 2023,
Sec. 3, specialised to our squared loss):

* the loss is strictly convex in the fitted values, so ``yhat = A(V)`` is the same for every
  optimal ``V``, and so is the dual vector ``rho = (Y - yhat) / n`` (the negative gradient of the
  loss in ``yhat``);
* stationarity gives, for every group, ``(A^T rho)_g = lam V_g / ||V_g||`` if ``V_g != 0`` and
  ``||(A^T rho)_g|| <= lam`` otherwise. So an optimal ``V_g`` is ``alpha_g s_g`` with
  ``alpha_g = ||V_g|| >= 0`` and the *fixed* unit direction ``s_g = (A^T rho)_g / lam``, and
  ``alpha_g > 0`` only on the equicorrelation set ``E = {g : ||(A^T rho)_g|| = lam}``;
* with columns ``a_g = A_g s_g`` (the fitted values of group ``g`` at unit scale, ``(n, c)``
  flattened), the optimal set is the polyhedron ``{alpha >= 0 on E, 0 off E : sum_g alpha_g a_g =
  yhat}``. The penalty is constant on it: ``sum_g ||V_g|| = sum_g alpha_g`` and

      sum_g alpha_g = sum_g alpha_g <s_g, (A^T rho)_g> / lam = <sum_g alpha_g a_g, rho> / lam
                    = <yhat, rho> / lam,

  so every null-space direction ``delta`` of the columns (``sum_g delta_g a_g = 0``) has
  ``sum_g delta_g = <0, rho> / lam = 0``: moving ``alpha`` along it changes neither the fit nor
  the penalty.

:func:`prune_to_minimal` walks ``alpha`` along such directions until a coefficient hits zero, and
repeats until the active columns are linearly independent: a vertex of the optimal set. Its
active count is at most the rank of the columns, hence at most ``n c`` (shared second layer,
``group="gate"``) or ``n`` per output column (``group="gate_output"``, where the columns of
different outputs are orthogonal and the walk runs per output). Departure from the exact-arithmetic
argument (marked): the directions ``s_g`` are taken from ``V`` (equal to ``(A^T rho)_g / lam`` only
up to the solver's KKT residual), so we impose ``sum_g delta_g = 0`` explicitly as an extra row of
the null-space problem. In exact arithmetic the row is redundant (shown above); numerically it makes
the penalty constant to rounding, whatever the residual.

:func:`magnitude_prune` is the baseline: keep the ``k`` largest gates by ``||V_i||``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from convexedge.device.errors import DataError
from convexedge.host.solvers import FistaConfig, GatedProblem, SolveResult, solve

__all__ = [
    "DualResult",
    "PruneResult",
    "dual_certificate",
    "magnitude_prune",
    "prune_to_minimal",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- helpers
def as_float64(problem: GatedProblem) -> GatedProblem:
    """The same problem in float64 on CPU (returned as is if it already is)."""
    if problem.Z.dtype == torch.float64 and problem.Z.device.type == "cpu":
        return problem
    return GatedProblem(
        Z=problem.Z.detach().to("cpu", torch.float64),
        Y=problem.Y.detach().to("cpu", torch.float64),
        masks=problem.masks.detach().to("cpu"),
        group=problem.group,
        row_chunk=problem.row_chunk,
    )


def _unpack(problem: GatedProblem, solution, lam: float | None) -> tuple[torch.Tensor, float]:
    """``(V, lam)`` from a :class:`SolveResult` or a ``(P, d, c)`` tensor plus ``lam``."""
    if isinstance(solution, SolveResult):
        V, lam_s = solution.V, solution.lam
        if lam is not None and not np.isclose(lam, lam_s, rtol=1e-12, atol=0.0):
            raise ValueError(
                f"lam={lam} differs from the solution's lam={lam_s}; pass lam=None to use the solution's"
            )
        lam = lam_s
    else:
        V = torch.as_tensor(solution)
        if lam is None:
            raise ValueError("lam is required when solution is a tensor; pass lam=... or a SolveResult")
    shape = (problem.P, problem.d, problem.c)
    if tuple(V.shape) != shape:
        raise DataError(f"V must have shape (P, d, c) = {shape}, got {tuple(V.shape)}")
    if not (np.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    V = V.detach().to("cpu", torch.float64)
    if not bool(torch.isfinite(V).all()):
        raise DataError("V holds NaN/Inf entries; solve again (or check the solver's converged flag)")
    return V, float(lam)


def _gate_outputs(problem: GatedProblem, V: torch.Tensor, gates) -> torch.Tensor:
    """``D_i Z V_i`` for each listed gate: (len(gates), n, c), float64."""
    Z = problem.Z.to(torch.float64)
    out = torch.einsum("nd,kdc->knc", Z, V[gates])
    return out * problem.masks[:, gates].T.to(torch.float64)[:, :, None]


# --------------------------------------------------------------------------------- dual
@dataclass
class DualResult:
    """Fitted values, dual vector and correlations of a (near-)optimal point.

    Attributes:
        fitted: (n, c) ``yhat = sum_i D_i Z V_i`` (unique over the optimal set).
        rho: (n, c) dual vector ``(Y - yhat) / n``.
        correlations: per group ``||(A^T rho)_g|| / lam``: (P,) for ``group="gate"``, (P, c) for
            ``"gate_output"``; ``1`` on the equicorrelation set, ``<= 1`` elsewhere at an optimum.
        lam: the regularisation strength.
        max_violation: ``max_g (correlation_g - 1)_+``, a dual-feasibility certificate (0 at an
            exact optimum).
    """

    fitted: torch.Tensor
    rho: torch.Tensor
    correlations: torch.Tensor
    lam: float
    max_violation: float


def dual_certificate(problem: GatedProblem, solution, lam: float | None = None) -> DualResult:
    """Fitted values ``yhat = A(V)``, the dual ``rho = (Y - yhat)/n`` and ``||(A^T rho)_g|| / lam``.

    Computed in float64 whatever the problem's dtype.

    Args:
        problem: the problem the solution belongs to.
        solution: a :class:`SolveResult` or a (P, d, c) ``V``.
        lam: regularisation strength (required when ``solution`` is a tensor).

    Returns:
        :class:`DualResult`.

    Raises:
        DataError: ``V`` has the wrong shape or non-finite entries.
        ValueError: ``lam`` missing, not positive, or different from the solution's.
    """
    p64 = as_float64(problem)
    V, lam = _unpack(p64, solution, lam)
    fitted = p64.forward(V)
    rho = (p64.Y - fitted) / p64.n
    corr = _group_norm(p64.adjoint(rho), p64.group) / lam
    viol = float((corr - 1.0).clamp_min(0.0).max())
    return DualResult(fitted=fitted, rho=rho, correlations=corr, lam=lam, max_violation=viol)


def _group_norm(X: torch.Tensor, group: str) -> torch.Tensor:
    if group == "gate":
        return torch.linalg.vector_norm(X.reshape(X.shape[0], -1), dim=1)
    return torch.linalg.vector_norm(X, dim=1)


# --------------------------------------------------------------------------------- columns
def _blocks(problem: GatedProblem, V: torch.Tensor) -> list[tuple[list, np.ndarray, np.ndarray]]:
    """Independent pruning blocks: ``[(groups, columns (m, k), alpha (k,))]``.

    ``group="gate"``: one block, groups are gate indices ``i``, column ``k`` is
    ``vec(D_i Z V_i / ||V_i||)`` of length ``n c``. ``"gate_output"``: one block per output ``j``,
    groups ``(i, j)``, columns ``D_i Z V[i, :, j] / ||V[i, :, j]||`` of length ``n`` (different
    outputs never share a column entry, so they prune independently).
    """
    if problem.group == "gate":
        norms = _group_norm(V, "gate")
        act = torch.nonzero(norms > 0).flatten().tolist()
        if not act:
            return [([], np.zeros((problem.n * problem.c, 0)), np.zeros(0))]
        out = _gate_outputs(problem, V, act) / norms[act][:, None, None]
        cols = out.reshape(len(act), -1).T.numpy()
        return [(act, cols, norms[act].numpy())]
    blocks = []
    norms = _group_norm(V, "gate_output")  # (P, c)
    Z = problem.Z.to(torch.float64)
    M = problem.masks.to(torch.float64)
    for j in range(problem.c):
        act = torch.nonzero(norms[:, j] > 0).flatten().tolist()
        if not act:
            blocks.append(([], np.zeros((problem.n, 0)), np.zeros(0)))
            continue
        S = V[act, :, j] / norms[act, j][:, None]  # (k, d)
        cols = ((Z @ S.T) * M[:, act]).numpy()
        blocks.append(([(i, j) for i in act], cols, norms[act, j].numpy()))
    return blocks


def _null_direction(cols: np.ndarray, rtol: float) -> np.ndarray | None:
    """A unit ``delta`` with ``cols @ delta ~ 0`` and ``sum(delta) = 0``, or None if independent.

    The augmented matrix ``[cols; w 1^T]`` (``w`` = the largest singular value of ``cols`` over
    ``sqrt(k)``, so the row weighs like a column) is decomposed by SVD; a singular value
    ``<= rtol * s_max`` marks a null direction.
    """
    k = cols.shape[1]
    if k <= 1:
        return None
    s_max = np.linalg.norm(cols, 2)
    if s_max == 0:
        return np.eye(k)[0] - np.eye(k)[1]
    aug = np.vstack([cols, np.full((1, k), s_max / np.sqrt(k))])
    if aug.shape[0] > 4 * k:
        # Thin QR first: the SVD of the small R factor has the same singular values.
        aug = np.linalg.qr(aug, mode="r")
    _, sv, Wt = np.linalg.svd(aug, full_matrices=True)
    sv_full = np.zeros(k)
    sv_full[: sv.size] = sv
    if sv_full[-1] > rtol * s_max:
        return None
    return Wt[-1]


def _singular_values(cols: np.ndarray) -> np.ndarray:
    """Singular values of a tall matrix (through its thin QR factor when it is much taller)."""
    if cols.shape[0] > 4 * cols.shape[1]:
        cols = np.linalg.qr(cols, mode="r")
    return np.linalg.svd(cols, compute_uv=False)


def _walk(cols: np.ndarray, alpha: np.ndarray, rtol: float) -> tuple[np.ndarray, int]:
    """Move ``alpha`` along null directions until the support's columns are independent."""
    alpha = alpha.copy()
    support = np.flatnonzero(alpha > 0)
    steps = 0
    while support.size > 1:
        delta = _null_direction(cols[:, support], rtol)
        if delta is None:
            break
        neg = delta < 0
        if not neg.any():  # sum(delta) = 0 and delta != 0 means both signs exist; guard anyway
            delta = -delta
            neg = delta < 0
        ratios = alpha[support][neg] / -delta[neg]
        t = float(ratios.min())
        hit = support[np.flatnonzero(neg)[int(np.argmin(ratios))]]
        alpha[support] = alpha[support] + t * delta
        alpha[hit] = 0.0
        alpha[alpha < 0] = 0.0  # rounding below zero on other ties
        support = np.flatnonzero(alpha > 0)
        steps += 1
    return alpha, steps


@dataclass
class PruneResult:
    """What :func:`prune_to_minimal` and :func:`magnitude_prune` return.

    Attributes:
        V: (P, d, c) float64 pruned solution.
        lam: regularisation strength.
        objective_before: ``F(V)`` of the input (float64).
        objective_after: ``F`` of the pruned ``V``.
        rel_objective_change: ``(after - before) / |before|``.
        active_before: active gates (neurons) of the input.
        active_after: active gates after pruning.
        groups_before: nonzero groups of the input (equals gates for ``group="gate"``).
        groups_after: nonzero groups after pruning.
        rank: rank of the final active columns (equals ``groups_after`` at a vertex).
        bound: the bound on the active count at a vertex: ``n c`` (``"gate"``) or ``n`` per output
            (``"gate_output"``, reported as ``n c`` groups).
        independent: whether the final active columns are linearly independent (a vertex).
        steps: null-space moves made.
        seconds: wall-clock time.
        method: ``"optimal_set"``, ``"magnitude"`` or ``"magnitude_refit"``.
        fitted_change: ``||yhat_after - yhat_before||_F / ||yhat_before||_F``.
        kept: indices of the gates kept.
    """

    V: torch.Tensor
    lam: float
    objective_before: float
    objective_after: float
    rel_objective_change: float
    active_before: int
    active_after: int
    groups_before: int
    groups_after: int
    rank: int
    bound: int
    independent: bool
    steps: int
    seconds: float
    method: str
    fitted_change: float
    kept: list[int] = field(default_factory=list)


def _rel_change(new: torch.Tensor, old: torch.Tensor) -> float:
    """``||new - old|| / ||old||`` (``||old||`` floored at 1e-300)."""
    return float(torch.linalg.vector_norm(new - old) / torch.linalg.vector_norm(old).clamp_min(1e-300))


def _active_gates(V: torch.Tensor) -> list[int]:
    return torch.nonzero(V.reshape(V.shape[0], -1).ne(0).any(dim=1)).flatten().tolist()


def _n_groups(V: torch.Tensor, group: str) -> int:
    return int((_group_norm(V, group) > 0).sum())


def _rank_and_independent(problem: GatedProblem, V: torch.Tensor, rtol: float) -> tuple[int, bool]:
    rank, indep = 0, True
    for _, cols, _alpha in _blocks(problem, V):
        if cols.shape[1] == 0:
            continue
        sv = _singular_values(cols)
        r = int((sv > rtol * sv[0]).sum()) if sv.size else 0
        rank += r
        indep &= r == cols.shape[1] and _null_direction(cols, rtol) is None
    return rank, indep


def prune_to_minimal(
    problem: GatedProblem,
    solution,
    lam: float | None = None,
    *,
    rtol: float = 1e-9,
    polish: bool = True,
) -> PruneResult:
    """Prune an optimal ``V`` to a vertex of the optimal set: a minimal network, same objective.

    With ``a_g`` the fitted values of group ``g`` at unit scale and ``alpha_g = ||V_g||`` (see the
    module docstring), repeat: find ``delta`` with ``sum_g delta_g a_g = 0`` and ``sum_g delta_g
    = 0`` over the support; move ``alpha <- alpha + t delta`` with the largest ``t`` keeping
    ``alpha >= 0``, which zeros at least one group. Stop when the support's columns are
    independent. Fitted values and penalty, hence ``F``, do not change. The input should be solved
    to a tight KKT residual (e.g. ``FistaConfig(tol=1e-10)`` in float64): pruning keeps ``F(V)``
    of whatever point it is given, and only an optimal point gives a vertex of the *optimal* set.

    With ``polish=True`` the final ``alpha`` on the support is re-fitted by least squares to the
    input's fitted values (the support's columns are independent, so this has one solution) and
    kept if it stays ``>= 0`` and does not raise ``F``; this removes the rounding the moves
    accumulate.

    Args:
        problem: the problem (any dtype; pruning runs in float64 on CPU).
        solution: :class:`SolveResult` or (P, d, c) ``V``.
        lam: regularisation strength (required with a tensor ``V``).
        rtol: a singular value ``<= rtol * s_max`` of the active columns counts as zero.
        polish: least-squares re-fit of ``alpha`` on the final support.

    Returns:
        :class:`PruneResult` (``V`` in float64 on CPU).

    Raises:
        DataError: ``V`` has the wrong shape or non-finite entries.
        ValueError: ``lam`` missing or not positive, ``rtol`` not in (0, 1).

    Example:
        >>> import numpy as np, torch
        >>> from convexedge.host.solvers import FistaConfig, GatedProblem, solve
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((8, 3)); G = rng.standard_normal((3, 20))
        >>> prob = GatedProblem.from_arrays(Z, rng.standard_normal((8, 1)), Z @ G >= 0, dtype="float64")
        >>> res = solve(prob, 0.01 * prob.lam_max(), FistaConfig(tol=1e-10, max_iter=100000))
        >>> out = prune_to_minimal(prob, res)
        >>> out.independent, out.active_after <= 8, abs(out.rel_objective_change) < 1e-8
        (True, True, True)
    """
    if not (isinstance(rtol, (int, float)) and 0 < rtol < 1):
        raise ValueError(f"rtol must be in (0, 1), got {rtol!r}")
    start = time.perf_counter()
    p64 = as_float64(problem)
    V, lam = _unpack(p64, solution, lam)
    obj0 = p64.objective(V, lam)
    fit0 = p64.forward(V)
    Vn = torch.zeros_like(V)
    steps = 0
    for groups, cols, alpha in _blocks(p64, V):
        if not groups:
            continue
        new, k = _walk(cols, alpha, rtol)
        steps += k
        if polish:
            new = _polish(cols, alpha, new)
        for (g, a_old), a_new in zip(zip(groups, alpha, strict=True), new, strict=True):
            if a_new <= 0:
                continue
            if p64.group == "gate":
                Vn[g] = V[g] * (a_new / a_old)
            else:
                i, j = g
                Vn[i, :, j] = V[i, :, j] * (a_new / a_old)
    obj1 = p64.objective(Vn, lam)
    fit1 = p64.forward(Vn)
    rank, indep = _rank_and_independent(p64, Vn, rtol)
    bound = p64.n * p64.c
    res = PruneResult(
        V=Vn, lam=lam, objective_before=obj0, objective_after=obj1,
        rel_objective_change=(obj1 - obj0) / max(abs(obj0), 1e-300),
        active_before=len(_active_gates(V)), active_after=len(_active_gates(Vn)),
        groups_before=_n_groups(V, p64.group), groups_after=_n_groups(Vn, p64.group),
        rank=rank, bound=bound, independent=indep, steps=steps,
        seconds=time.perf_counter() - start, method="optimal_set",
        fitted_change=_rel_change(fit1, fit0),
        kept=_active_gates(Vn),
    )  # fmt: skip
    logger.debug(
        "prune_to_minimal: %d -> %d gates in %d steps, rel dF %.2e",
        res.active_before, res.active_after, steps, res.rel_objective_change,
    )  # fmt: skip
    return res


def _polish(cols: np.ndarray, alpha0: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Least-squares re-fit of ``alpha`` on its support to the original fit ``cols @ alpha0``."""
    S = np.flatnonzero(alpha > 0)
    if S.size == 0:
        return alpha
    target = cols @ alpha0
    sol, *_ = np.linalg.lstsq(cols[:, S], target, rcond=None)
    if (sol <= 0).any():
        return alpha
    # Keep the re-fit only if it is at least as close to the target with no larger penalty
    # drift: the loss is the same function of the fit, so compare fit residuals and sum(alpha).
    r_old = np.linalg.norm(cols[:, S] @ alpha[S] - target)
    r_new = np.linalg.norm(cols[:, S] @ sol - target)
    if (
        r_new <= r_old
        and abs(sol.sum() - alpha0.sum()) <= abs(alpha[S].sum() - alpha0.sum()) + 1e-12 * alpha0.sum()
    ):
        out = np.zeros_like(alpha)
        out[S] = sol
        return out
    return alpha


def magnitude_prune(
    problem: GatedProblem,
    solution,
    k: int,
    lam: float | None = None,
    *,
    refit: bool = False,
    config: FistaConfig | None = None,
) -> PruneResult:
    """Baseline: keep the ``k`` gates with the largest ``||V_i||_F``, zero the rest.

    With ``refit=True`` the kept gates are re-solved (same ``lam``, warm-started from the kept
    ``V``) on the problem restricted to them, which is what a practitioner would do after
    magnitude pruning; the objective is still measured on the full problem.

    Args:
        problem: the problem.
        solution: :class:`SolveResult` or (P, d, c) ``V``.
        k: gates to keep, ``>= 0``.
        lam: regularisation strength (required with a tensor ``V``).
        refit: re-solve on the kept gates.
        config: solver settings for the refit (default ``FistaConfig(tol=1e-8)``).

    Returns:
        :class:`PruneResult` with ``method`` ``"magnitude"`` or ``"magnitude_refit"``.

    Raises:
        ValueError: ``k`` negative or not an int.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}")
    start = time.perf_counter()
    p64 = as_float64(problem)
    V, lam = _unpack(p64, solution, lam)
    obj0 = p64.objective(V, lam)
    fit0 = p64.forward(V)
    norms = _group_norm(V, "gate")
    order = torch.argsort(norms, descending=True, stable=True)
    keep = sorted(int(i) for i in order[:k] if norms[i] > 0)
    Vn = torch.zeros_like(V)
    Vn[keep] = V[keep]
    if refit and keep:
        sub = GatedProblem(Z=p64.Z, Y=p64.Y, masks=p64.masks[:, keep], group=p64.group)
        cfg = config if config is not None else FistaConfig(tol=1e-8, max_iter=20000)
        res = solve(sub, lam, cfg, V0=V[keep])
        Vn = torch.zeros_like(V)
        Vn[keep] = res.V.to(torch.float64)
    obj1 = p64.objective(Vn, lam)
    fit1 = p64.forward(Vn)
    rank, indep = _rank_and_independent(p64, Vn, 1e-9)
    return PruneResult(
        V=Vn, lam=lam, objective_before=obj0, objective_after=obj1,
        rel_objective_change=(obj1 - obj0) / max(abs(obj0), 1e-300),
        active_before=len(_active_gates(V)), active_after=len(_active_gates(Vn)),
        groups_before=_n_groups(V, p64.group), groups_after=_n_groups(Vn, p64.group),
        rank=rank, bound=p64.n * p64.c, independent=indep, steps=0,
        seconds=time.perf_counter() - start, method="magnitude_refit" if refit else "magnitude",
        fitted_change=_rel_change(fit1, fit0),
        kept=_active_gates(Vn),
    )  # fmt: skip
