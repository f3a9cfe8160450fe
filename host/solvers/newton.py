"""Active-set Newton polish: drive a FISTA answer to a tight KKT residual (e.g. 1e-10) fast.

First-order methods identify the active gates quickly but converge slowly on the ill-conditioned
problems real activations make (patches of a ResNet stage: 32,000 rows, 9,248 columns). On a fixed
active set the objective is smooth, so Newton's method converges quadratically there. This module
alternates the two, the standard active-set / "two-phase" scheme of group-lasso solvers:

1. the support phase: FISTA (:func:`convexedge.host.solvers.solve`), warm-started, to a moderate
   tolerance, picks the active groups;
2. the Newton phase on that support: with ``r_g = ||V_g||`` and ``u_g = V_g / r_g``, the reduced
   objective ``f(V) + lam sum_g r_g`` has gradient ``grad f + lam u_g`` and Hessian

       H = G_AA / n  (x) I_c  +  blockdiag_g( lam / r_g (I - u_g u_g^T) ),

   with ``G_AA = A_A^T A_A`` the Gram of the active gates' columns. ``H = M - W C W^T`` where
   ``M = (G_AA / n + diag(lam / r_g)) (x) I_c`` is one symmetric positive-definite matrix shared by
   all output columns (for the per-gate groups) and ``W C W^T`` a rank-``k`` correction (``k``
   active groups), so the Newton system is solved exactly by one Cholesky factorisation of a
   ``(k d) x (k d)`` matrix and the Sherman-Morrison-Woodbury identity (``k + 1`` triangular solves).
   For the one-group-per-gate-and-column form the problem separates over output columns, and each
   column is solved the same way with its own active gates.
   The step is damped (a backtracking search on the norm of the reduced gradient, which has no
   cancellation near the optimum, unlike the objective) and never lets a group's norm cross zero:
   a group that would vanish is set to zero and the support phase runs again.
3. The certificate is always the exact relative KKT residual of the *full* problem
   (:func:`convexedge.host.solvers.kkt_residual`), so a group that should enter sends the solve back
   to the support phase.

When the optimum is not unique (active columns linearly dependent), ``H`` is singular along the
directions in which the objective is constant; a relative Tikhonov damping ``damping * tr(M)/dim``
keeps the system solvable, and the residual test, not the step, decides convergence.
Float64 is required: a 1e-10 residual is below float32 precision.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import torch

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers.fista import FistaConfig, SolveResult, kkt_residual, solve
from convexedge.host.solvers.problem import GatedProblem, group_norms


@dataclass(frozen=True)
class NewtonConfig:
    """Settings of :func:`newton_polish`.

    Attributes:
        tol: target relative KKT residual of the full problem.
        support_tol: FISTA's tolerance in the support phase.
        max_rounds: support + Newton rounds before giving up.
        max_newton: Newton steps per round.
        damping: relative Tikhonov damping of the Newton system (see the module docstring).
        max_seconds: wall-clock cap over the whole polish (None = no cap).
        max_dim: largest Newton system ``k d`` (active gates times features) to factorise; above it
            (a float64 Cholesky of ``max_dim^2`` entries, 1.1 GB at 12,000) the polish runs FISTA
            alone to ``tol`` instead.
        fista: settings of the support phase (``tol`` is replaced by ``support_tol``).
    """

    tol: float = 1e-10
    support_tol: float = 1e-6
    max_rounds: int = 8
    max_newton: int = 30
    damping: float = 1e-12
    max_seconds: float | None = None
    max_dim: int = 12_000
    fista: FistaConfig = field(default_factory=lambda: FistaConfig(max_iter=100_000))

    def __post_init__(self) -> None:
        for name in ("tol", "support_tol", "damping"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        for name in ("max_rounds", "max_newton", "max_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be > 0 or None, got {self.max_seconds!r}")


def _active_gram(problem: GatedProblem, gates: list[int]) -> torch.Tensor:
    """``G_AA = A_A^T A_A`` (k d, k d) for the listed gates, from the cached Gram when there is one."""
    d = problem.d
    if problem.has_gram:
        G = problem.gram().G
        idx = torch.cat([torch.arange(g * d, (g + 1) * d, device=G.device) for g in gates])
        return G[idx][:, idx]
    sub = GatedProblem(Z=problem.Z, Y=problem.Y, masks=problem.masks[:, gates].contiguous(), group="gate")
    return sub.gram().G


def _newton_direction(
    K0: torch.Tensor, X: torch.Tensor, g: torch.Tensor, lam: float, d: int, damping: float
) -> torch.Tensor:
    """Solve ``H D = -g`` for one block system (see the module docstring).

    Args:
        K0: (k d, k d) ``G_AA / n``.
        X: (k d, c) current point (every group ``X[i d:(i+1) d]`` non-zero).
        g: (k d, c) reduced gradient.
        lam: regularisation strength.
        d: rows per group.
        damping: relative Tikhonov damping.
    """
    kd, c = X.shape
    k = kd // d
    Xg = X.view(k, d, c)
    r = torch.linalg.vector_norm(Xg.reshape(k, -1), dim=1)  # (k,)
    w = lam / r
    K = K0.clone()
    K.diagonal().add_(w.repeat_interleave(d))
    K.diagonal().add_(damping * float(K.diagonal().mean()))
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        raise torch.linalg.LinAlgError("Newton system is not positive definite")
    # W: k columns, column i = u_i placed in block i (as a (kd, c) matrix).
    U = torch.zeros((k, kd, c), dtype=X.dtype, device=X.device)
    for i in range(k):
        U[i, i * d : (i + 1) * d] = Xg[i] / r[i]
    rhs = torch.cat([(-g)[None], U], dim=0)  # (k + 1, kd, c)
    sol = torch.cholesky_solve(rhs.permute(1, 0, 2).reshape(kd, -1), L)
    sol = sol.reshape(kd, k + 1, c).permute(1, 0, 2)
    Mg, MU = sol[0], sol[1:]  # M^{-1}(-g), M^{-1} W
    S = torch.diag(1.0 / w) - torch.einsum("iac,jac->ij", U, MU)  # C^{-1} - W^T M^{-1} W
    t = torch.einsum("iac,ac->i", U, Mg)
    coef = torch.linalg.lstsq(S, t[:, None]).solution[:, 0]  # lstsq: S may be singular
    return Mg + torch.einsum("i,iac->ac", coef, MU)


def _reduced_grad(K0, B, X, lam, d):
    k = X.shape[0] // d
    Xg = X.view(k, d, -1)
    r = torch.linalg.vector_norm(Xg.reshape(k, -1), dim=1)
    return K0 @ X - B + lam * (Xg / r[:, None, None]).reshape(X.shape)


def _newton_block(K0, B, X, lam, d, damping, steps, gtol, deadline=None) -> torch.Tensor:
    """Up to ``steps`` damped Newton steps on one block system, stopping once the reduced gradient's
    norm is ``<= gtol`` or at ``deadline`` (a ``time.perf_counter()`` value). When no step along the
    Newton direction lowers the reduced gradient, the group heading fastest to zero is set to zero
    and the block returns, so the support phase decides about it."""
    k = X.shape[0] // d
    g = _reduced_grad(K0, B, X, lam, d)
    for _ in range(steps):
        if deadline is not None and time.perf_counter() >= deadline:
            break
        gn = float(torch.linalg.vector_norm(g))
        if gn <= gtol:
            break
        D = _newton_direction(K0, X, g, lam, d, damping)
        r = torch.linalg.vector_norm(X.view(k, -1), dim=1)
        t, accepted = 1.0, False
        for _ in range(30):
            Xn = X + t * D
            t *= 0.5
            if bool((torch.linalg.vector_norm(Xn.view(k, -1), dim=1) <= 1e-3 * r).any()):
                continue  # a group would collapse: leave that to the support phase
            gn_new = _reduced_grad(K0, B, Xn, lam, d)
            if float(torch.linalg.vector_norm(gn_new)) <= (1 - 2e-4 * t) * gn:
                accepted = True
                break
        if not accepted:
            shrink = torch.linalg.vector_norm((X + D).view(k, -1), dim=1) / r
            X = X.clone()
            X.view(k, -1)[int(torch.argmin(shrink))] = 0
            return X
        X, g = Xn, gn_new
    return X


def _newton_dim(V: torch.Tensor, group: str) -> int:
    """Size ``k d`` of the largest Newton system on the support of ``V``."""
    norms = group_norms(V, group)
    k = int((norms > 0).sum()) if group == "gate" else int((norms > 0).sum(dim=0).max())
    return k * V.shape[1]


def _record(history: dict, iterations: int, objective: float, kkt: float, start: float) -> None:
    row = {"iteration": float(iterations), "objective": objective, "kkt": kkt, "step": 1.0,
           "seconds": time.perf_counter() - start}  # fmt: skip
    for key, value in row.items():
        history[key].append(value)


def _kkt_parts(problem: GatedProblem, V: torch.Tensor, lam: float) -> tuple[float, bool]:
    """The relative KKT residual and whether some zero group violates ``||grad_g|| <= lam``."""
    grad = problem.adjoint(problem.forward(V) - problem.Y) / problem.n
    zero = group_norms(V, problem.group) == 0
    entering = bool((zero & (group_norms(grad, problem.group) > lam)).any())
    return kkt_residual(problem, V, lam, grad=grad), entering


def newton_polish(
    problem: GatedProblem, lam: float, V0: torch.Tensor | None = None, config: NewtonConfig | None = None
) -> SolveResult:
    """Solve to ``config.tol`` (relative KKT) by alternating FISTA and active-set Newton steps.

    Args:
        problem: a float64 :class:`GatedProblem` (either group form).
        lam: regularisation strength ``> 0``.
        V0: (P, d, c) warm start (e.g. a FISTA answer), or None to start from FISTA at zero.
        config: settings; defaults to :class:`NewtonConfig`.

    Returns:
        A :class:`SolveResult`; ``iterations`` counts FISTA iterations plus Newton steps, and
        ``history`` holds the KKT residual after each round. Hitting ``max_rounds`` or
        ``max_seconds`` returns ``converged=False`` with a :class:`ConvergenceWarning`.
    """
    cfg = config or NewtonConfig()
    if problem.Z.dtype != torch.float64:
        raise ValueError(f"newton_polish needs a float64 problem, got {problem.Z.dtype}")
    if not (math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
    start = time.perf_counter()
    d, c, n = problem.d, problem.c, problem.n
    V = None if V0 is None else V0.detach().to(torch.float64).clone()
    if V is not None and tuple(V.shape) != (problem.P, d, c):
        raise ValueError(f"V0 must have shape {(problem.P, d, c)}, got {tuple(V.shape)}")
    history: dict[str, list[float]] = {k: [] for k in ("iteration", "objective", "kkt", "step", "seconds")}
    iterations = 0
    B_all = problem._adjoint_y() / n
    deadline = None if cfg.max_seconds is None else start + cfg.max_seconds
    # the Newton blocks stop at a tenth of the target residual (same scale as kkt_residual's)
    gtol = 0.1 * cfg.tol * float(torch.linalg.vector_norm(problem._grad0_group_norms()))
    # ``kkt`` is always the exact relative KKT residual of the current ``V`` (``inf`` before one exists).
    kkt, entering = (float("inf"), False) if V is None else _kkt_parts(problem, V, lam)
    newton_failed = False
    for _ in range(cfg.max_rounds):
        if kkt <= cfg.tol:
            break
        # FISTA runs to find a support (no V yet), to fix a wrong one (a zero group violates its
        # condition) or when Newton stalled far out, with a tolerance below the current residual
        # so that it moves; after Newton failed on a support (e.g. many duplicate gates) or the
        # support is too large to factorise, FISTA alone goes on to the target.
        if V is None:
            fista_tol = max(cfg.support_tol, cfg.tol)
        elif newton_failed:
            fista_tol = cfg.tol
        elif entering or kkt > cfg.support_tol:
            fista_tol = max(cfg.tol, min(cfg.support_tol, 1e-2 * kkt))
        else:
            fista_tol = None
        if fista_tol is not None:
            fcfg = FistaConfig(**{**cfg.fista.__dict__, "tol": fista_tol})
            if deadline is not None:
                left = max(deadline - time.perf_counter(), 1e-3)
                fcfg = FistaConfig(**{**fcfg.__dict__, "max_seconds": min(fcfg.max_seconds or left, left)})
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                res = solve(problem, lam, fcfg, V0=V)
            V, kkt, iterations = res.V.to(torch.float64), res.kkt_residual, iterations + res.iterations
            if newton_failed:
                _record(history, iterations, problem.objective(V, lam), kkt, start)
                break
        if _newton_dim(V, problem.group) > cfg.max_dim:  # too large to factorise: FISTA alone
            newton_failed = True
            continue
        before_V, before_kkt = V, kkt
        V = V.clone()
        if problem.group == "gate":
            gates = torch.nonzero(group_norms(V, "gate") > 0).flatten().tolist()
            if gates:
                K0 = _active_gram(problem, gates) / n
                X = V[gates].reshape(len(gates) * d, c)
                Bg = B_all[gates].reshape(-1, c)
                V[gates] = _newton_block(K0, Bg, X, lam, d, cfg.damping, cfg.max_newton, gtol, deadline).view(
                    len(gates), d, c
                )
        else:  # separable over output columns: one block system per column, gates from the union
            norms = group_norms(V, "gate_output")  # (P, c)
            union = torch.nonzero((norms > 0).any(dim=1)).flatten().tolist()
            K_union = _active_gram(problem, union) / n if union else None
            for j in range(c):
                pos = [a for a, g in enumerate(union) if float(norms[g, j]) > 0]
                if not pos:
                    continue
                gates = [union[a] for a in pos]
                idx = torch.cat([torch.arange(a * d, (a + 1) * d) for a in pos]).to(V.device)
                X = V[gates, :, j].reshape(-1, 1)
                Bj = B_all[gates, :, j].reshape(-1, 1)
                X = _newton_block(
                    K_union[idx][:, idx], Bj, X, lam, d, cfg.damping, cfg.max_newton, gtol, deadline
                )
                V[gates, :, j] = X.view(len(gates), d)
        iterations += 1
        kkt, entering = _kkt_parts(problem, V, lam)
        if kkt > before_kkt:  # the Newton phase did not help on this support: undo it
            V, kkt, newton_failed = before_V, before_kkt, True
        _record(history, iterations, problem.objective(V, lam), kkt, start)
        if deadline is not None and time.perf_counter() >= deadline:
            break
    converged = kkt <= cfg.tol
    if not converged:
        warnings.warn(
            f"newton_polish stopped at relative KKT residual {kkt:.3g} > tol={cfg.tol:g}; raise "
            f"max_rounds/max_newton/max_seconds or loosen tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    return SolveResult(
        V=V, lam=lam, objective=problem.objective(V, lam), iterations=iterations, converged=converged,
        kkt_residual=kkt, seconds=time.perf_counter() - start, history=history, group=problem.group,
        dtype="float64", device=str(V.device), operator="newton",
    )  # fmt: skip
