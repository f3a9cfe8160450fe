"""The exact ReLU convex form (cone constraints), solved by an augmented Lagrangian over our FISTA.

Pilanci & Ergen (2020) show that a two-layer ReLU network ``relu(Z W1) W2`` trained with weight
decay ``lam/2 (||W1||^2 + ||W2||^2)`` has the same optimal value as the convex program (one output
column at a time; for ``c`` outputs we solve the one-vs-all form, a group per gate and output)

    minimize_{U, W}  1/(2n) ||sum_i D_i Z (U_i - W_i) - y||^2 + lam sum_i (||U_i|| + ||W_i||)
    subject to       (2 D_i - I) Z U_i >= 0,  (2 D_i - I) Z W_i >= 0,

when the ``D_i`` run over all activation patterns of ``Z`` (a subset gives an upper bound).

Method (pyscnn's approach: an augmented Lagrangian whose subproblems are group-lasso problems;
this code is ours). Write ``W~_i = -W_i`` so the prediction is ``sum over 2P gates of D_i Z v_i``
and every constraint reads ``s_ik z_k^T v_i >= 0`` with signs ``s = +-(2 m - 1)``. With scaled
multipliers ``g >= 0`` and penalty ``mu`` the augmented Lagrangian is

    L(v) = 1/(2n) [ ||sum_i D_i Z v_i - y||^2 + mu sum_ik (g_ik - s_ik z_k^T v_i)_+^2 ] + lam sum ||v_i||

(the classical form for inequality constraints with multiplier ``mu g / n``), followed by
``g <- (g - s z^T v)_+``. Departure: ``(t)_+^2`` is not a least-squares term, so each subproblem is
solved by majorize-minimize: at the current point ``t0``, ``(t)_+^2 <= t^2`` (tight for ``t0 > 0``)
and ``(t)_+^2 <= (t - t0)^2`` (tight with equal slope for ``t0 <= 0``); both majorizers are
least squares, i.e. extra rows ``sqrt(mu) s_ik z_k`` (gate ``i`` only) with target
``sqrt(mu) (g_ik - min(t0_ik, 0))``, so each MM step is a :class:`GatedProblem` with ``n (2P + 1)``
rows solved by :func:`~convexedge.host.solvers.solve` (warm-started), and ``L`` never increases.
The penalty ``mu`` grows by ``growth`` when the violation did not fall by 4x (Bertsekas 1982).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace

import torch

from convexedge.device.errors import ConvergenceWarning, DataError
from convexedge.host.solvers import FistaConfig, GatedProblem, solve

__all__ = ["ReluALConfig", "ReluSolveResult", "relu_objective", "solve_relu"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ReluALConfig:
    """Settings of :func:`solve_relu`."""

    # Initial penalty mu (a constraint row weighs like mu data rows).
    penalty: float = 10.0
    # Factor mu grows by when the violation did not fall by 4x.
    growth: float = 4.0
    max_penalty: float = 1e8
    max_outer: int = 40
    # Stop when max_ik (-s_ik z_k^T v_i)_+ <= tol * max(max|y|, tiny) and the objective settled.
    tol: float = 1e-7
    # MM steps per subproblem, and their relative-decrease stop.
    mm_steps: int = 20
    mm_tol: float = 1e-12
    # FISTA settings of each MM step.
    inner: FistaConfig = field(default_factory=lambda: FistaConfig(tol=1e-9, max_iter=20000))

    def __post_init__(self) -> None:
        for name in ("penalty", "max_penalty", "tol", "mm_tol"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
        if not (isinstance(self.growth, (int, float)) and self.growth >= 1):
            raise ValueError(f"growth must be >= 1, got {self.growth!r}")
        for name in ("max_outer", "mm_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(self.inner, FistaConfig):
            raise TypeError(f"inner must be a FistaConfig, got {type(self.inner).__name__}")


@dataclass
class ReluSolveResult:
    """What :func:`solve_relu` returns.

    Attributes:
        U: (P, d, c) float64, positive-output neurons (``U[i, :, j]`` serves output ``j``).
        W: (P, d, c) float64, negative-output neurons.
        lam: regularisation strength.
        objective: :func:`relu_objective` at ``(U, W)``.
        max_violation: ``max (-(2 D_i - I) Z u)_+`` over all constraints, relative to ``max|Y|``.
        converged: every output column met ``tol``.
        outer_iterations: multiplier updates, summed over output columns.
        inner_solves: FISTA solves, summed.
        seconds: wall-clock time.
    """

    U: torch.Tensor
    W: torch.Tensor
    lam: float
    objective: float
    max_violation: float
    converged: bool
    outer_iterations: int
    inner_solves: int
    seconds: float


def relu_objective(problem: GatedProblem, U: torch.Tensor, W: torch.Tensor, lam: float) -> float:
    """``1/(2n)||sum_i D_i Z (U_i - W_i) - Y||^2 + lam sum_{i,j} (||U[i,:,j]|| + ||W[i,:,j]||)``."""
    U = torch.as_tensor(U, dtype=torch.float64)
    W = torch.as_tensor(W, dtype=torch.float64)
    Z = problem.Z.to("cpu", torch.float64)
    M = problem.masks.to("cpu", torch.float64)
    pred = torch.einsum("nd,pdc,np->nc", Z, U - W, M)
    loss = 0.5 * (pred - problem.Y.to("cpu", torch.float64)).square().sum() / problem.n
    pen = torch.linalg.vector_norm(U, dim=1).sum() + torch.linalg.vector_norm(W, dim=1).sum()
    return float(loss + lam * pen)


def _violation(Z: torch.Tensor, S: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(s_ik z_k^T v_i)``: (2P, n) for ``v`` (2P, d) and signs ``S`` (2P, n)."""
    return S * (v @ Z.T)


def _solve_column(
    Z: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, lam: float, config: ReluALConfig
) -> tuple[torch.Tensor, float, bool, int, int]:
    n, d = Z.shape
    P = masks.shape[1]
    M2 = torch.cat([masks, masks], dim=1)  # (n, 2P): U gates then W~ gates
    sgn = 2.0 * masks.T.to(torch.float64) - 1.0
    S = torch.cat([sgn, -sgn], dim=0)  # (2P, n)
    # Constraint rows: for gate i and sample k the row s_ik z_k with only gate i on.
    gate_of_row = torch.arange(2 * P).repeat_interleave(n)
    sample_of_row = torch.arange(n).repeat(2 * P)
    Zc = S.reshape(-1, 1) * Z[sample_of_row]
    Mc = torch.zeros((2 * P * n, 2 * P), dtype=torch.bool)
    Mc[torch.arange(2 * P * n), gate_of_row] = True
    yscale = max(float(y.abs().max()), 1e-300)
    g = torch.zeros((2 * P, n), dtype=torch.float64)
    v = torch.zeros((2 * P, d), dtype=torch.float64)
    mu = config.penalty
    prev_viol, prev_obj = math.inf, math.inf
    outer = solves = 0
    converged = False

    def al_value(v: torch.Tensor) -> float:
        pred = ((Z @ v.T) * M2).sum(1)
        t = (g - _violation(Z, S, v)).clamp_min(0)
        return float(0.5 * ((pred - y).square().sum() + mu * t.square().sum()) / n
                     + lam * torch.linalg.vector_norm(v, dim=1).sum())  # fmt: skip

    for outer in range(1, config.max_outer + 1):
        root = math.sqrt(mu)
        # Inexact early subproblems (a standard AL practice): tolerance 1e-3, 1e-4, ... down to
        # config.inner.tol.
        inner = replace(config.inner, tol=max(config.inner.tol, 1e-3 * 10.0 ** (1 - outer)))
        f_prev = al_value(v)
        prev_rows = None
        for _ in range(config.mm_steps):
            # Rows whose term (g - s z^T v)_+ is positive at the current point: on them L is the
            # quadratic below; the others contribute 0 (and their slope is 0).
            rows = ((g - _violation(Z, S, v)) > 0).reshape(-1)
            if prev_rows is not None and bool(torch.equal(rows, prev_rows)):
                break
            prev_rows = rows
            Zbig = torch.cat([Z, root * Zc[rows]])
            Mbig = torch.cat([M2, Mc[rows]])
            Ybig = torch.cat([y, root * g.reshape(-1)[rows]]).reshape(-1, 1)
            N = Zbig.shape[0]
            prob = GatedProblem(Z=Zbig, Y=Ybig, masks=Mbig, group="gate")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = solve(prob, lam * n / N, inner, V0=v.reshape(2 * P, d, 1))
            solves += 1
            v_new = res.V.reshape(2 * P, d).to(torch.float64)
            f = al_value(v_new)
            if f > f_prev + 1e-12 * abs(f_prev):
                # The active-set step went uphill (the row set changed across it): take the best
                # point on the segment by a few bisections of the convex L.
                lo, hi, best = 0.0, 1.0, (f_prev, v)
                for _ in range(30):
                    mid = 0.5 * (lo + hi)
                    vm = v + mid * (v_new - v)
                    fm = al_value(vm)
                    if fm < best[0]:
                        best = (fm, vm)
                    # compare slopes by a small probe
                    if al_value(v + (mid + 1e-6) * (v_new - v)) < fm:
                        lo = mid
                    else:
                        hi = mid
                f, v_new = best
            done = f_prev - f <= config.mm_tol * max(abs(f), 1e-300)
            v, f_prev = v_new, f
            if done:
                break
        cons = _violation(Z, S, v)
        viol = float((-cons).clamp_min(0).max()) / yscale
        g = (g - cons).clamp_min(0.0)
        pred = ((Z @ v.T) * M2).sum(1)
        obj = float(0.5 * (pred - y).square().sum() / n + lam * torch.linalg.vector_norm(v, dim=1).sum())
        settled = abs(prev_obj - obj) <= 1e2 * config.tol * max(abs(obj), 1e-300)
        logger.debug("AL outer %d: mu %.3g viol %.3g obj %.10g", outer, mu, viol, obj)
        if viol <= config.tol and settled:
            converged = True
            break
        if viol > 0.25 * prev_viol:
            mu_new = min(mu * config.growth, config.max_penalty)
            g = g * (mu / mu_new)  # g is scaled by 1/mu: keep the multiplier mu g / n itself
            mu = mu_new
        prev_viol, prev_obj = viol, obj
    return v, viol, converged, outer, solves


def solve_relu(problem: GatedProblem, lam: float, config: ReluALConfig | None = None) -> ReluSolveResult:
    """Solve the cone-constrained (exact ReLU) convex form for the gates of ``problem``.

    See the module docstring for the program and the method. The problem's ``masks`` are the
    activation patterns ``D_i``; to match the best two-layer ReLU network they must include every
    pattern of ``Z`` (feasible for tiny ``n``; otherwise this is the network restricted to the
    given patterns). Output columns are solved one at a time (the one-vs-all form); for
    ``c = 1`` both group choices coincide.

    Args:
        problem: data and patterns; ``group`` must be ``"gate_output"`` or ``c == 1``.
        lam: regularisation strength ``> 0``.
        config: :class:`ReluALConfig` (None: defaults).

    Returns:
        :class:`ReluSolveResult` (a ``ConvergenceWarning`` if a column missed ``tol``).

    Raises:
        ValueError: ``group="gate"`` with ``c > 1``, or ``lam <= 0``.
    """
    if problem.group == "gate" and problem.c > 1:
        raise ValueError(
            "the exact ReLU form is solved one output at a time (one-vs-all): build the problem "
            "with group='gate_output' (or a single output column)"
        )
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    config = config if config is not None else ReluALConfig()
    start = time.perf_counter()
    Z = problem.Z.to("cpu", torch.float64)
    Y = problem.Y.to("cpu", torch.float64)
    masks = problem.masks.to("cpu")
    if not bool(torch.isfinite(Z).all()):
        raise DataError("Z holds NaN/Inf entries")
    P, d, c = problem.P, problem.d, problem.c
    U = torch.zeros((P, d, c), dtype=torch.float64)
    W = torch.zeros((P, d, c), dtype=torch.float64)
    viol_max, ok, outer_sum, solves_sum = 0.0, True, 0, 0
    for j in range(c):
        v, viol, conv, outer, solves = _solve_column(Z, Y[:, j], masks, float(lam), config)
        U[:, :, j] = v[:P]
        W[:, :, j] = -v[P:]
        viol_max, ok = max(viol_max, viol), ok and conv
        outer_sum += outer
        solves_sum += solves
    if not ok:
        warnings.warn(
            f"augmented Lagrangian stopped at max_outer={config.max_outer} with relative violation "
            f"{viol_max:.3g} > tol={config.tol:g}; raise max_outer or penalty",
            ConvergenceWarning,
            stacklevel=2,
        )
    return ReluSolveResult(
        U=U, W=W, lam=float(lam), objective=relu_objective(problem, U, W, float(lam)),
        max_violation=viol_max, converged=ok, outer_iterations=outer_sum, inner_solves=solves_sum,
        seconds=time.perf_counter() - start,
    )  # fmt: skip
