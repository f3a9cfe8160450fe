"""FISTA with backtracking line search and adaptive restart for the gated-ReLU group lasso.

Solves, for a :class:`~convexedge.host.solvers.problem.GatedProblem`,

    minimize_V  F(V) = f(V) + lam * R(V),   f(V) = 1/(2n) ||A(V) - Y||_F^2,   R(V) = sum_g ||V_g||_2,

by accelerated proximal gradient (FISTA, Beck & Teboulle, "A fast iterative shrinkage-thresholding
algorithm for linear inverse problems", SIAM J. Imaging Sci. 2009) with

* backtracking on the step (Beck & Teboulle 2009, Sec. 4) that may also *grow* the step at the start
  of each iteration (Scheinberg, Goldfarb & Bai, "Fast first-order methods for composite convex
  optimization with backtracking", Found. Comput. Math. 2014);
* adaptive restart of the momentum (O'Donoghue & Candès, "Adaptive restart for accelerated gradient
  schemes", Found. Comput. Math. 2015);
* the momentum sequence ``t_k = (k + a - 1) / a`` of Chambolle & Dossal, "On the convergence of the
  iterates of FISTA", JOTA 2015, with ``a = 1`` by default (a marked departure, see
  ``FistaConfig.momentum_a``; ``momentum_a=None`` gives Beck & Teboulle's sequence);
* optionally the monotone variant MFISTA (Beck & Teboulle, "Fast gradient-based algorithms for
  constrained total variation image denoising and deblurring problems", IEEE TIP 2009);
* a fixed block-Jacobi metric for the proximal step (``FistaConfig.metric``; a marked departure
  from the Euclidean step, the default with the Gram operator; the prox stays exact, see
  :mod:`~convexedge.host.solvers.metric`).

The solver is a pair of pure functions over a small named state, :func:`fista_init` and
:func:`fista_step`, so a caller can run a few iterations, stop and resume; :func:`solve` is the
public dispatcher that loops them with stopping rules.

Two ways to apply the operator (``FistaConfig.operator``):

* ``"direct"``: the "image" of an iterate is the prediction ``A(V)`` (n, c); an iteration costs one
  forward ``A(.)`` per line-search trial (usually one) and one adjoint, both passes over all ``n``
  rows (``~4 n P d c`` flops).
* ``"gram"``: the image is ``(A^T A) V`` (P, d, c) with the Gram matrix ``G = A^T A`` built once per
  problem (:meth:`GatedProblem.gram`, cached on the problem, so a ``lam`` path reuses it); an
  iteration costs one ``(P d)^2 c`` GEMM per trial and no pass over the rows. ``grad f(V) =
  (G V - B) / n`` with ``B = A^T Y``, and the line search's ``||A(z - y)||^2`` is the quadratic form
  ``<z - y, G z - G y>``.
* ``"auto"`` (default): gram when ``G`` fits in ``gram_max_bytes`` and ``n > P d`` (or the problem
  already holds a Gram), direct otherwise.

Either way ``A`` and ``grad f`` are affine, so the image and the gradient at the momentum point are
extrapolated from those at the iterates instead of recomputed, and the KKT residual at the iterate
is available every iteration at ``O(P d c)`` cost. The reported final objective is always the true
one (one float64 forward pass over the rows).

Data parallel: on a problem with a reduction hook (``GatedProblem.comm``) each rank holds its rows;
the gradient (an adjoint), the smooth value and the line search's ``||A(z - y)||^2`` are
all-reduced by the problem, so the iterate, the step, every line-search and restart decision and
the KKT residual are computed from identical numbers on every rank; in gram mode the Gram is
reduced once and the iterations need no communication. A wall-clock stop (``max_seconds``) is
agreed by an all-reduce. A single process is the same code with world size 1.

Checkpoints (``solve(..., checkpoint=SolverCheckpoint(folder))``): the state is written to
``.npz`` files every ``every`` checked iterations and at the end, and a later call with the same
folder resumes from it; the resumed run takes exactly the steps of an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol

import numpy as np
import torch

from convexedge.device.errors import ArtifactError, ConvergenceWarning
from convexedge.device.fista import check_fista_settings
from convexedge.host.solvers.adam import AdamConfig, _solve_adam
from convexedge.host.solvers.checkpoint import SolverCheckpoint, load_arrays, save_arrays
from convexedge.host.solvers.metric import BlockMetric, prox_in_metric
from convexedge.host.solvers.problem import (
    GatedProblem,
    GramData,
    Group,
    _broadcast_groups,
    group_norms,
    prox_group,
)
from convexedge.host.solvers.scnn_adapter import PyscnnConfig, _solve_pyscnn

__all__ = [
    "FistaConfig",
    "FistaState",
    "SolveResult",
    "fista_init",
    "fista_step",
    "kkt_residual",
    "solve",
]

logger = logging.getLogger(__name__)

_METHODS = ("fista", "adam", "pyscnn")
_MAX_TRIALS = 50  # line-search trials per iteration before the last step is accepted anyway
_POWER_ITERS = 3  # power iterations for the initial 1/L estimate


@dataclass(frozen=True, kw_only=True)
class FistaConfig:
    """Settings of :func:`solve` with ``method="fista"`` (JSON-serialisable via ``asdict``)."""

    max_iter: int = 2000
    # Stop when kkt_residual(V) <= tol; the residual is relative to ||grad f(0)|| (see kkt_residual).
    tol: float = 1e-6
    # Initial step; None: 1/L with L estimated by a few power iterations on A^T A / n.
    step_init: float | None = None
    # Step shrink factor in the backtracking line search, in (0, 1).
    backtrack: float = 0.5
    # Step growth tried at the start of every iteration (>= 1; 1 disables growing).
    grow: float = 1.1
    # Momentum restart: "gradient" or "function" (O'Donoghue & Candès 2015), or "none".
    restart: Literal["function", "gradient", "none"] = "gradient"
    # MFISTA: keep the better of the prox point and the previous iterate, so F never increases.
    monotone: bool = False
    # Momentum sequence: None for Beck & Teboulle's t_{k+1} = (1 + sqrt(1 + 4 t_k^2)) / 2, or a > 0
    # for t_{k+1} = t_k + 1 / a, i.e. t_k = (k + a - 1) / a (Chambolle & Dossal, "On the
    # convergence of the iterates of FISTA", JOTA 2015; a = 2 is Beck & Teboulle's sequence
    # asymptotically, smaller a extrapolates more aggressively). Departure (marked): the default
    # a = 1 is below Chambolle & Dossal's a > 2, where the worst-case rate drops from O(1/k^2) to
    # O(1/k^(4/3)) (Attouch, Chbani & Riahi, "Rate of convergence of the Nesterov accelerated
    # gradient method in the subcritical case alpha <= 3", ESAIM COCV 2019); with the adaptive
    # restart it needed 0.66x the iterations to 1e-4 suboptimality on the benchmark's synthetic
    # problem at 0.001 lam_max (405 vs 614) and 0.91x on patches at 0.01 lam_max (234 vs 256).
    momentum_a: float | None = 1.0
    # Evaluate the stopping test (and record history / call progress) every this many iterations.
    check_every: int = 1
    # Wall-clock cap in seconds; hitting it returns converged=False with a ConvergenceWarning.
    max_seconds: float | None = None
    # How to apply A^T A: "direct" (forward + adjoint over the n rows every iteration), "gram"
    # (build G = A^T A once per problem, cached on it; then O((P d)^2 c) per iteration), or
    # "auto": gram when (P d)^2 * itemsize <= gram_max_bytes and n > P d, or the problem already
    # holds a Gram. An explicit "gram" ignores the cap.
    operator: Literal["auto", "direct", "gram"] = "auto"
    gram_max_bytes: int = 512 * 2**20
    # Metric of the proximal step (a marked departure from Beck & Teboulle's Euclidean step; see
    # convexedge.host.solvers.metric): "identity" is the Euclidean step; "block" the block-Jacobi
    # metric M = blockdiag_i(Z^T D_i Z / n), whose prox is still exact (a secular equation per
    # group) and which removes the within-gate ill-conditioning of real activations (compared
    # with the Euclidean step by `python -m benchmarks.solver_metric`); "auto": block in
    # gram mode (its blocks are the Gram's diagonal, free), identity in direct mode (where they
    # would cost a pass over the rows and, on isotropic features, gain little).
    metric: Literal["auto", "identity", "block"] = "auto"
    # Block metric: eigenvalues floored at this fraction of the largest (keeps M invertible).
    metric_floor: float = 1e-6

    def __post_init__(self) -> None:
        check_fista_settings(self)  # the checks shared with the device FISTA
        if self.metric not in ("auto", "identity", "block"):
            raise ValueError(f"metric must be 'auto', 'identity' or 'block', got {self.metric!r}")
        if not (
            isinstance(self.metric_floor, (int, float))
            and not isinstance(self.metric_floor, bool)
            and 0 < self.metric_floor < 1
        ):
            raise ValueError(f"metric_floor must be a number in (0, 1), got {self.metric_floor!r}")
        if self.momentum_a is not None and not (
            isinstance(self.momentum_a, (int, float))
            and math.isfinite(self.momentum_a)
            and self.momentum_a > 0
        ):
            raise ValueError(f"momentum_a must be None or a finite number > 0, got {self.momentum_a!r}")
        if not isinstance(self.monotone, bool):
            raise ValueError(f"monotone must be a bool, got {self.monotone!r}")  # noqa: TRY004
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {self.check_every!r}")
        if self.max_seconds is not None and not (
            isinstance(self.max_seconds, (int, float)) and self.max_seconds > 0
        ):
            raise ValueError(f"max_seconds must be None or > 0, got {self.max_seconds!r}")
        if self.operator not in ("auto", "direct", "gram"):
            raise ValueError(f"operator must be 'auto', 'direct' or 'gram', got {self.operator!r}")
        if (
            not isinstance(self.gram_max_bytes, int)
            or isinstance(self.gram_max_bytes, bool)
            or self.gram_max_bytes < 0
        ):
            raise ValueError(f"gram_max_bytes must be an int >= 0, got {self.gram_max_bytes!r}")


class FistaState(NamedTuple):
    """Everything FISTA carries from one iteration to the next.

    Shapes: ``x, x_prev, y, grad_x, grad_y: (P, d, c)``; ``pred_x, pred_y``: the operator's image,
    ``(n, c)`` predictions ``A(.)`` with ``operator="direct"``, ``(P, d, c)`` products
    ``(A^T A)(.)`` with ``operator="gram"``. A state only continues under the operator it was
    started with.

    Attributes:
        x: current iterate ``x_k``.
        x_prev: previous iterate ``x_{k-1}``.
        y: momentum point the next proximal-gradient step starts from.
        t: momentum parameter ``t_k`` (1 right after init or a restart).
        step: last accepted step (the next iteration first tries ``step * grow``).
        pred_x: image of ``x`` (``A(x)``, or ``G x`` in gram mode).
        pred_y: image of ``y`` (extrapolated, the operator is linear).
        fx: ``F(x)`` (float64 sums of quantities in the problem's dtype; in gram mode from
            ``<x, G x> - 2 <B, x> + ||Y||^2``).
        it: iterations done.
        restarts: momentum restarts so far.
        grad_x: ``grad f(x)``.
        grad_y: ``grad f(y)`` (extrapolated, ``grad f`` is affine).
    """

    x: torch.Tensor
    x_prev: torch.Tensor
    y: torch.Tensor
    t: float
    step: float
    pred_x: torch.Tensor
    pred_y: torch.Tensor
    fx: float
    it: int
    restarts: int
    grad_x: torch.Tensor
    grad_y: torch.Tensor


@dataclass
class SolveResult:
    """What :func:`solve` returns.

    Attributes:
        V: (P, d, c) solution in the problem's dtype and device.
        lam: the regularisation strength solved for.
        objective: true ``F(V)``, computed in float64.
        iterations: iterations run.
        converged: whether ``kkt_residual <= tol`` was reached.
        kkt_residual: relative KKT residual at ``V`` (see :func:`kkt_residual`).
        seconds: wall-clock time of the solve.
        history: per checked iteration (including iteration 0): ``"iteration"``, ``"objective"``,
            ``"kkt"``, ``"step"``, ``"seconds"``.
        restarts: momentum restarts.
        group: ``"gate"`` or ``"gate_output"``.
        dtype: ``"float32"`` or ``"float64"``.
        device: e.g. ``"cpu"``, ``"cuda:0"``.
        operator: ``"direct"`` or ``"gram"``, the one used (``"auto"`` resolved).
    """

    V: torch.Tensor
    lam: float
    objective: float
    iterations: int
    converged: bool
    kkt_residual: float
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)
    restarts: int = 0
    group: str = "gate"
    dtype: str = "float32"
    device: str = "cpu"
    operator: str = "direct"


# --------------------------------------------------------------------------------- certificate
def kkt_residual(
    problem: GatedProblem, V: torch.Tensor, lam: float, grad: torch.Tensor | None = None
) -> float:
    """Relative residual of the optimality condition ``0 in grad f(V) + lam dR(V)``.

    Per group ``g`` the distance from ``0`` to ``grad_g + lam d||V_g||`` is

        r_g = ||grad_g + lam V_g / ||V_g|| ||      if V_g != 0,
        r_g = max(0, ||grad_g|| - lam)             if V_g == 0 (exactly),

    and the returned value is ``sqrt(sum_g r_g^2) / max(||grad f(0)||, tiny)``, where
    ``||grad f(0)|| = ||(1/n) A^T Y||_F`` is the gradient norm at zero over all groups (so the
    residual is scale-free in ``Y``), ``tiny`` the smallest normal float64. Computed in float64.

    Args:
        problem: the problem.
        V: (P, d, c) point.
        lam: regularisation strength.
        grad: (P, d, c) ``grad f(V)`` if already known; computed otherwise (one forward, one adjoint).
    """
    if grad is None:
        grad = problem.adjoint(problem.forward(V) - problem.Y) / problem.n
    g = grad.to(torch.float64)
    v = V.to(torch.float64)
    vn = group_norms(v, problem.group)
    active = vn > 0
    unit = v / _broadcast_groups(torch.where(active, vn, torch.ones_like(vn)), problem.group)
    r_active = group_norms(g + lam * unit, problem.group)
    r_zero = (group_norms(g, problem.group) - lam).clamp_min(0.0)
    r = torch.where(active, r_active, r_zero)
    denom = max(float(torch.linalg.vector_norm(problem._grad0_group_norms())), 2.2250738585072014e-308)
    return float(torch.linalg.vector_norm(r)) / denom


# --------------------------------------------------------------------------------- operators
class _Operator(Protocol):
    kind: str
    image_shape: tuple[int, ...]

    def image(self, V: torch.Tensor) -> torch.Tensor: ...
    def grad(self, img: torch.Tensor) -> torch.Tensor: ...
    def smooth(self, V: torch.Tensor, img: torch.Tensor) -> float: ...
    def quad(self, dV: torch.Tensor, dimg: torch.Tensor) -> torch.Tensor: ...
    def normal(self, V: torch.Tensor) -> torch.Tensor: ...


class _Direct:
    """Image = prediction ``A(V)`` (n, c); every product is a pass over the rows."""

    kind = "direct"

    def __init__(self, problem: GatedProblem) -> None:
        self.p = problem
        self.image_shape = (problem.n_local, problem.c)

    def image(self, V: torch.Tensor) -> torch.Tensor:
        return self.p.forward(V)

    def grad(self, img: torch.Tensor) -> torch.Tensor:
        return self.p.adjoint(img - self.p.Y) / self.p.n

    def smooth(self, V: torch.Tensor, img: torch.Tensor) -> float:
        return self.p._smooth_from_pred(img)

    def quad(self, dV: torch.Tensor, dimg: torch.Tensor) -> torch.Tensor:
        """``||A dV||^2`` given ``dimg = A dV`` (this rank's rows; summed over the ranks)."""
        return self.p._sum_(torch.linalg.vector_norm(dimg, dtype=torch.float64).square().reshape(1))[0]

    def normal(self, V: torch.Tensor) -> torch.Tensor:
        return self.p.adjoint(self.p.forward(V))


class _Gram:
    """Image = ``G V`` (P, d, c) with the cached Gram ``G = A^T A``; no pass over the rows."""

    kind = "gram"

    def __init__(self, problem: GatedProblem) -> None:
        self.n = problem.n
        self.g: GramData = problem.gram()
        self.image_shape = (problem.P, problem.d, problem.c)

    def image(self, V: torch.Tensor) -> torch.Tensor:
        P, d, c = V.shape
        active = V.reshape(P, -1).ne(0).any(dim=1)  # NaN counts as active: never hide it
        n_active = int(active.sum())
        if n_active == P:
            return self.g.apply(V)
        # Gates pruned by the prox cost nothing. G is symmetric, so its column block j is the
        # transpose of the (contiguous) row block j: G V = sum_j G[j-rows, :]^T V_j, no copy of G.
        out = torch.zeros((P * d, c), dtype=V.dtype, device=V.device)
        G = self.g.G
        for j in torch.nonzero(active).flatten().tolist():
            out.addmm_(G[j * d : (j + 1) * d, :].T, V[j])
        return out.view(P, d, c)

    def grad(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.g.B) / self.n

    def smooth(self, V: torch.Tensor, img: torch.Tensor) -> float:
        return self.g.smooth(V, img, self.n)

    def quad(self, dV: torch.Tensor, dimg: torch.Tensor) -> torch.Tensor:
        """``||A dV||^2 = <dV, G dV>`` given ``dimg = G dV``."""
        return torch.sum(dV * dimg, dtype=torch.float64)

    def normal(self, V: torch.Tensor) -> torch.Tensor:
        return self.image(V)


def _use_gram(problem: GatedProblem, config: FistaConfig) -> bool:
    if config.operator != "auto":
        return config.operator == "gram"
    if problem.has_gram:
        return True
    return problem.gram_bytes() <= config.gram_max_bytes and problem.n > problem.P * problem.d


def _operator(problem: GatedProblem, config: FistaConfig) -> _Operator:
    """The operator ``config.operator`` resolves to (building the Gram on first use)."""
    return _Gram(problem) if _use_gram(problem, config) else _Direct(problem)


def _use_block_metric(problem: GatedProblem, config: FistaConfig) -> bool:
    if config.metric == "auto":
        return _use_gram(problem, config)
    return config.metric == "block"


def _metric(problem: GatedProblem, config: FistaConfig) -> BlockMetric | None:
    """The block metric ``config.metric`` resolves to (None: Euclidean), cached on the problem."""
    if not _use_block_metric(problem, config):
        return None
    key = float(config.metric_floor)
    if key not in problem._metrics:
        H = problem.gate_blocks() / problem.n
        problem._metrics[key] = BlockMetric.from_blocks(H, key, problem.Z.dtype)
    return problem._metrics[key]


# --------------------------------------------------------------------------------- init / step
def _start_point(
    problem: GatedProblem, config: FistaConfig, V0: torch.Tensor | None
) -> tuple[_Operator, torch.Tensor, torch.Tensor]:
    """The operator, the start ``x`` (a copy of ``V0``, zeros if None) and its image ``A x``.

    Shared by the FISTA and proximal-Adam inits; ``V0`` of the wrong shape raises ``ValueError``.
    """
    shape = (problem.P, problem.d, problem.c)
    like = {"dtype": problem.Z.dtype, "device": problem.Z.device}
    if V0 is not None and tuple(V0.shape) != shape:
        raise ValueError(f"V0 must have shape (P, d, c) = {shape}, got {tuple(V0.shape)}")
    op = _operator(problem, config)
    if V0 is None:
        return op, torch.zeros(shape, **like), torch.zeros(op.image_shape, **like)
    x = V0.detach().to(**like).clone()
    return op, x, op.image(x)


def _estimate_step(
    problem: GatedProblem, op: _Operator | None = None, metric: BlockMetric | None = None
) -> float:
    """``1 / L`` with ``L = ||A||^2 / n`` from a few power iterations on ``A^T A / n`` (on
    ``M^-1 A^T A / n`` with a block ``metric``: ``L`` measured in ``M``).

    Power iteration underestimates ``L``, so the step may be slightly too long; the line search
    shrinks it on the first iteration if so.
    """
    op = op if op is not None else _Direct(problem)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn((problem.P, problem.d, problem.c), generator=gen, dtype=torch.float64)
    v = (v / torch.linalg.vector_norm(v)).to(dtype=problem.Z.dtype, device=problem.Z.device)
    L = 0.0
    for _ in range(_POWER_ITERS):
        w = op.normal(v) / problem.n
        if metric is not None:
            w = metric.solve(w)
        L = float(torch.linalg.vector_norm(w, dtype=torch.float64))
        if L == 0.0:
            return 1.0
        v = w / L
    return 1.0 / L


def fista_init(
    problem: GatedProblem, lam: float, config: FistaConfig, V0: torch.Tensor | None = None
) -> FistaState:
    """Start FISTA at ``V0`` (zeros if None): ``y_1 = x_0``, ``t_1 = 1`` (Beck & Teboulle 2009).

    Costs one operator image (skipped for ``V0=None``) and the step estimate if
    ``config.step_init`` is None; in gram mode the first call on a problem also builds its Gram.

    Args:
        problem: the problem.
        lam: regularisation strength ``>= 0``.
        config: solver settings.
        V0: (P, d, c) warm start (copied to the problem's dtype/device), or None.
    """
    op, x, pred = _start_point(problem, config, V0)
    grad = op.grad(pred)
    fx = op.smooth(x, pred) + lam * float(problem.penalty(x))
    if config.step_init is not None:
        step = config.step_init
    else:
        step = _estimate_step(problem, op, _metric(problem, config))
    return FistaState(
        x=x, x_prev=x, y=x, t=1.0, step=float(step), pred_x=pred, pred_y=pred, fx=fx,
        it=0, restarts=0, grad_x=grad, grad_y=grad,
    )  # fmt: skip


def _metric_prox_step(
    metric: BlockMetric,
    y: torch.Tensor,
    y_rot: torch.Tensor,
    g_rot: torch.Tensor,
    step: float,
    lam: float,
    group: Group,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The prox point ``z`` of a block-metric step from ``y``, and ``d_rot = Q^T (z - y)``.

    ``y_rot = Q^T y`` and ``g_rot = diag(w)^-1 Q^T grad f(y)``, both float64 (converted once per
    iteration by the caller, not once per line-search trial).

    ``z`` is formed as ``y + Q d_rot`` (``d_rot`` taken in float64), not as ``Q z_rot``: the
    rotations' float32 rounding is then relative to the step, not to ``||y||``. Rebuilding
    ``z = Q z_rot`` added an error of about ``eps ||y||`` to every step, independent of its
    length, which stalled the KKT residual near 1e-6 on real activations. Groups the prox zeroes
    stay exactly zero.
    """
    z_rot = prox_in_metric(y_rot - step * g_rot, metric.w / step, lam, group)
    d_rot = (z_rot - y_rot).to(y.dtype)
    z = y + metric.unrotate(d_rot)
    zero = _broadcast_groups(group_norms(z_rot, group) == 0, group)
    return torch.where(zero, 0.0, z), d_rot


def fista_step(problem: GatedProblem, lam: float, config: FistaConfig, state: FistaState) -> FistaState:
    """One accepted FISTA iteration: line search, prox step, restart test, momentum.

    Args:
        problem: the problem.
        lam: regularisation strength.
        config: solver settings.
        state: from :func:`fista_init` or a previous :func:`fista_step`.

    Returns:
        The next state (the input is not modified).
    """
    x, y, pred_y, grad_y = state.x, state.y, state.pred_y, state.grad_y
    n = problem.n
    op = _operator(problem, config)
    if tuple(pred_y.shape) != op.image_shape:
        raise ValueError(
            f"state was started with the other operator (image shape {tuple(pred_y.shape)}, "
            f"operator {op.kind!r} needs {op.image_shape}); continue with the config that made it"
        )

    # With a block metric (FistaConfig.metric) the step is taken in rotated coordinates, where M
    # is diagonal: ||.||_M below is the metric norm and the restart's inner product is <., .>_M.
    metric = _metric(problem, config)
    if metric is not None:
        w = metric.weights(y.dtype)
        y_rot = metric.rotate(y).to(torch.float64)
        g_rot = (metric.rotate(grad_y) / w).to(torch.float64)

    # Departure from Beck & Teboulle (whose backtracking only shrinks): first try a longer step,
    # as in Scheinberg, Goldfarb & Bai 2014, so the step follows the local curvature both ways.
    step = state.step * config.grow
    for trial in range(_MAX_TRIALS):
        if metric is None:
            z = prox_group(y - step * grad_y, step * lam, problem.group)
            dz = torch.linalg.vector_norm(z - y, dtype=torch.float64).square()
        else:
            z, d_rot = _metric_prox_step(metric, y, y_rot, g_rot, step, lam, problem.group)
            dz = torch.sum(w * d_rot.square(), dtype=torch.float64)
        pred_z = op.image(z)
        # Beck & Teboulle's test f(z) <= f(y) + <grad f(y), z - y> + ||z - y||^2 / (2 step) is, for
        # our quadratic f, exactly ||A(z - y)||^2 / (2n) <= ||z - y||^2 / (2 step). Departure: we
        # test this form, which has no cancellation between two nearly equal objective values, so
        # the search does not fail spuriously in float32 near the optimum. ||A(z - y)||^2 is
        # ||pred_z - pred_y||^2 (direct) or <z - y, G z - G y> (gram).
        if dz == 0:
            step = state.step  # nothing moved: do not let the step grow without bound
            break
        dpred = op.quad(z - y, pred_z - pred_y)
        if bool(dpred / n <= dz / step):
            break
        if trial < _MAX_TRIALS - 1:
            step *= config.backtrack
        # else: accept the last trial (the caller's tol may be below float precision).
    else:  # pragma: no cover - only when 50 halvings (a 1e-15 step) still fail
        logger.debug("line search hit %d trials; accepting step %.3g", _MAX_TRIALS, step)

    grad_z = op.grad(pred_z)
    fz = op.smooth(z, pred_z) + lam * float(problem.penalty(z))

    # Adaptive restart (O'Donoghue & Candès 2015, Sec. 3.2), tested on the prox point z.
    if config.restart == "gradient":
        # Their gradient scheme: restart when (y_{k-1} - x_k)^T (x_k - x_{k-1}) > 0.
        if metric is None:
            restart = bool(torch.sum((y - z) * (z - x), dtype=torch.float64) > 0)
        else:
            # z_rot - Q^T x = d_rot + Q^T (y - x), in differences for the same reason as the step.
            inner = torch.sum(-w * d_rot * (d_rot + metric.rotate(y - x)), dtype=torch.float64)
            restart = bool(inner > 0)
    elif config.restart == "function":
        restart = fz > state.fx
    else:
        restart = False

    t = state.t
    # Beck & Teboulle 2009, eq. (4.2), or Chambolle & Dossal's t_k = (k + a - 1) / a (the default,
    # a = 1; see FistaConfig.momentum_a). Departure: Scheinberg, Goldfarb & Bai also rescale t_k by
    # the ratio of consecutive steps when the step grows; we keep the plain update and rely on
    # the adaptive restart to reset momentum that overshoots.
    if config.momentum_a is None:
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
    else:  # Chambolle & Dossal 2015: t_k = (k + a - 1) / a
        t_next = t + 1.0 / config.momentum_a
    if config.monotone and fz > state.fx:
        # MFISTA: keep x_k, but the momentum still points at z:
        # y = x_k + (t_k / t_{k+1}) (z - x_k)  (Beck & Teboulle 2009, TIP, MFISTA step 5).
        x_new, pred_new, grad_new, f_new = x, state.pred_x, state.grad_x, state.fx
        a, b = t / t_next, 0.0
    else:
        x_new, pred_new, grad_new, f_new = z, pred_z, grad_z, fz
        # FISTA: y = x_k + ((t_k - 1) / t_{k+1}) (x_k - x_{k-1}) (a = 0 below). MFISTA with z
        # accepted reduces to the same formula.
        a, b = 0.0, (t - 1.0) / t_next
    if restart:
        # O'Donoghue & Candès: reset the momentum, i.e. start FISTA afresh from x_new
        # (t = 1, y = x_new). The step is kept.
        t_next, a, b = 1.0, 0.0, 0.0

    # y_{k+1} = x_new + a (z - x_new) + b (x_new - x_k); the image and grad f are affine in V, so
    # the same combination gives them at y with no extra operator application.
    def extrapolate(new: torch.Tensor, at_z: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        out = new
        if a != 0.0:
            out = out + a * (at_z - new)
        if b != 0.0:
            out = out + b * (new - old)
        return out

    y_next = extrapolate(x_new, z, x)
    pred_y_next = extrapolate(pred_new, pred_z, state.pred_x)
    grad_y_next = extrapolate(grad_new, grad_z, state.grad_x)
    return FistaState(
        x=x_new, x_prev=x, y=y_next, t=t_next, step=step, pred_x=pred_new, pred_y=pred_y_next,
        fx=f_new, it=state.it + 1, restarts=state.restarts + int(restart),
        grad_x=grad_new, grad_y=grad_y_next,
    )  # fmt: skip


# --------------------------------------------------------------------------------- solve
def _zero_result(problem: GatedProblem, lam: float, start: float, operator: str) -> SolveResult:
    V = torch.zeros((problem.P, problem.d, problem.c), dtype=problem.Z.dtype, device=problem.Z.device)
    obj = problem.objective(V, lam)
    return SolveResult(
        V=V, lam=lam, objective=obj, iterations=0, converged=True, kkt_residual=0.0,
        seconds=time.perf_counter() - start,
        history={"iteration": [0], "objective": [obj], "kkt": [0.0], "step": [0.0], "seconds": [0.0]},
        restarts=0, group=problem.group, dtype=_dtype_name(problem), device=str(problem.Z.device),
        operator=operator,
    )  # fmt: skip


def _dtype_name(problem: GatedProblem) -> str:
    return str(problem.Z.dtype).removeprefix("torch.")


def _run_until_converged(state, step, check, config, start: float, agree=bool, progress=None):
    """Drive ``state = step(state)`` until the relative KKT residual is ``<= config.tol`` or a cap
    is hit.

    Shared by the FISTA and proximal-Adam drivers. ``check(state) -> (kkt, objective)`` is
    evaluated every ``config.check_every`` iterations, at ``max_iter`` and when ``max_seconds``
    runs out; after each check ``progress(iteration, objective, kkt)`` (optional) is called, and
    returning True ends the solve there. ``agree`` makes the wall-clock and stop decisions
    identical on every rank of a data-parallel solve (``GatedProblem._agree``); it is only called
    when ``max_seconds`` or ``progress`` is set.

    Returns:
        ``(state, kkt, converged, knob)``: ``knob`` names the cap that stopped an unconverged run
        and how to lift it (for the ``ConvergenceWarning``), or ``None`` when converged.
    """

    def evaluate(s) -> tuple[float, bool]:
        kkt, fx = check(s)
        return kkt, progress is not None and agree(progress(s.it, fx, kkt) is True)

    kkt, asked = evaluate(state)
    converged = kkt <= config.tol
    timed_out = False
    while not converged and not asked and state.it < config.max_iter:
        state = step(state)
        elapsed = time.perf_counter() - start
        timed_out = config.max_seconds is not None and agree(elapsed >= config.max_seconds)
        if state.it % config.check_every == 0 or state.it == config.max_iter or timed_out:
            kkt, asked = evaluate(state)
            converged = kkt <= config.tol
        if timed_out and not converged:
            break
    if converged:
        return state, kkt, True, None
    if asked:
        return state, kkt, False, "the progress callback's request to stop"
    if timed_out:
        return state, kkt, False, f"max_seconds={config.max_seconds}; raise max_seconds"
    return state, kkt, False, f"max_iter={config.max_iter}; raise max_iter"


# --------------------------------------------------------------------------------- checkpoints
_STATE_TENSORS = ("x", "x_prev", "y", "pred_x", "pred_y", "grad_x", "grad_y")
_STATE_SCALARS = ("t", "step", "fx", "it", "restarts")
_HISTORY = ("iteration", "objective", "kkt", "step", "seconds")


def _state_header(problem: GatedProblem, lam: float, config: FistaConfig) -> dict:
    """What a FISTA checkpoint must agree on with the solve that resumes it."""
    return {
        "kind": "fista_state", "lam": lam, "shape": [problem.P, problem.d, problem.c],
        "n": problem.n, "n_local": problem.n_local, "dtype": _dtype_name(problem),
        "group": problem.group, "operator": "gram" if _use_gram(problem, config) else "direct",
        "restart": config.restart, "monotone": config.monotone,
        "metric": f"block:{config.metric_floor:g}" if _use_block_metric(problem, config) else "identity",
        "rank": problem.rank, "world_size": problem.world_size,
    }  # fmt: skip


def _save_state(
    path, problem: GatedProblem, header: dict, state: FistaState, history: dict, elapsed: float
) -> None:
    arrays = {k: getattr(state, k) for k in _STATE_TENSORS}
    arrays.update({f"history_{k}": np.asarray(history[k], dtype=np.float64) for k in _HISTORY})
    scalars = {k: getattr(state, k) for k in _STATE_SCALARS}
    save_arrays(path, {**header, **scalars, "elapsed": elapsed}, arrays)
    problem._same_everywhere(state.it)  # a barrier: every rank has written before anyone goes on


def _load_state(path, problem: GatedProblem, header: dict):
    """``(state, history, elapsed)`` from ``path``, or None; the same decision on every rank."""
    got = load_arrays(path, header)
    it = -1 if got is None else int(got[0]["it"])
    if not problem._same_everywhere(it):
        raise ArtifactError(
            f"{path}: the ranks' checkpoints are at different iterations (this rank: {it}); a "
            f"run died while saving: delete the checkpoint folder to start afresh"
        )
    if got is None:
        return None
    head, arrays = got
    like = {"dtype": problem.Z.dtype, "device": problem.Z.device}
    tensors = {k: torch.from_numpy(arrays[k]).to(**like) for k in _STATE_TENSORS}
    state = FistaState(
        **tensors, t=float(head["t"]), step=float(head["step"]), fx=float(head["fx"]),
        it=int(head["it"]), restarts=int(head["restarts"]),
    )  # fmt: skip
    history = {k: arrays[f"history_{k}"].tolist() for k in _HISTORY}
    return state, history, float(head["elapsed"])


def _solve_fista(
    problem: GatedProblem,
    lam: float,
    config: FistaConfig,
    V0: torch.Tensor | None,
    progress: Callable[[int, float, float], bool | None] | None,
    checkpoint: SolverCheckpoint | None = None,
) -> SolveResult:
    start = time.perf_counter()
    if lam >= problem.lam_max():
        return _zero_result(problem, lam, start, "gram" if _use_gram(problem, config) else "direct")
    history: dict[str, list[float]] = {k: [] for k in _HISTORY}
    resumed = None
    if checkpoint is not None:
        ck_path = checkpoint.file(problem.rank, problem.world_size)
        header = _state_header(problem, lam, config)
        resumed = _load_state(ck_path, problem, header)
    if resumed is not None:
        # The first check below records the saved last entry again: drop it from the history.
        state, saved, elapsed = resumed
        history = {k: v[:-1] for k, v in saved.items()}
        start -= elapsed
        logger.info("resuming FISTA from %s at iteration %d", ck_path, state.it)
    else:
        state = fista_init(problem, lam, config, V0)
    saved_it = state.it

    def check(s: FistaState) -> tuple[float, float]:
        nonlocal saved_it
        kkt = kkt_residual(problem, s.x, lam, grad=s.grad_x)
        elapsed = time.perf_counter() - start
        for key, val in zip(history, (s.it, s.fx, kkt, s.step, elapsed), strict=True):
            history[key].append(float(val))
        if checkpoint is not None and s.it >= saved_it + checkpoint.every:
            _save_state(ck_path, problem, header, s, history, elapsed)
            saved_it = s.it
        return kkt, s.fx

    state, kkt, converged, knob = _run_until_converged(
        state, lambda s: fista_step(problem, lam, config, s), check, config, start,
        agree=problem._agree, progress=progress,
    )  # fmt: skip
    if checkpoint is not None and saved_it != state.it:
        _save_state(ck_path, problem, header, state, history, time.perf_counter() - start)
    if not converged:
        warnings.warn(
            f"FISTA stopped at {knob} (or loosen tol): relative KKT residual {kkt:.3g} > "
            f"tol={config.tol:g} after {state.it} iterations",
            ConvergenceWarning,
            stacklevel=3,
        )
    return SolveResult(
        V=state.x, lam=lam, objective=problem.objective(state.x, lam), iterations=state.it,
        converged=converged, kkt_residual=kkt, seconds=time.perf_counter() - start,
        history=history, restarts=state.restarts, group=problem.group,
        dtype=_dtype_name(problem), device=str(problem.Z.device),
        operator="gram" if _use_gram(problem, config) else "direct",
    )  # fmt: skip


def solve(
    problem: GatedProblem,
    lam: float,
    config: FistaConfig | AdamConfig | PyscnnConfig | None = None,
    V0: torch.Tensor | None = None,
    method: Literal["fista", "adam", "pyscnn"] = "fista",
    progress: Callable[[int, float, float], bool | None] | None = None,
    *,
    checkpoint: SolverCheckpoint | None = None,
) -> SolveResult:
    """Solve ``min_V 1/(2n) ||sum_i D_i Z V_i - Y||_F^2 + lam * sum_g ||V_g||_2``.

    For ``lam >= problem.lam_max()`` the zero solution is optimal and returned at once
    (``iterations=0``, ``converged=True``). Otherwise the method runs until the relative KKT
    residual (:func:`kkt_residual`, from the iterate's gradient: ``A^T(A V - Y) / n`` in direct
    mode, ``(G V - B) / n`` in gram mode) is ``<= config.tol``; stopping at ``max_iter`` or
    ``max_seconds`` first returns ``converged=False`` and emits a :class:`ConvergenceWarning`.

    Args:
        problem: data and operator (:meth:`GatedProblem.from_arrays`).
        lam: regularisation strength ``>= 0``.
        config: the method's config (None: its defaults): :class:`FistaConfig` for ``"fista"``,
            :class:`~convexedge.host.solvers.adam.AdamConfig` for ``"adam"``,
            :class:`~convexedge.host.solvers.scnn_adapter.PyscnnConfig` for ``"pyscnn"``.
            ``config.operator`` (fista, adam) picks direct or Gram products (the Gram is built on
            the first gram-mode solve and cached on ``problem``, so the solves of a ``lam`` path
            share it; that first solve's ``seconds`` include the build).
        V0: (P, d, c) warm start (e.g. the solution at the previous ``lam`` of a path).
        method: ``"fista"`` (ours), ``"adam"`` (proximal Adam on the same objective, the
            baseline) or ``"pyscnn"`` (pyscnn's R-FISTA through an adapter; needs
            ``group="gate_output"`` and ``pip install pyscnn==0.0.10``; its ``seconds`` count
            pyscnn's optimisation only, not the data conversion).
        progress: optional ``callable(it, objective, kkt)`` called at every checked iteration
            (fista, adam: returning ``True`` ends the solve there, with ``converged=False`` unless
            the tolerance is met; e.g. a benchmark that stops once a target objective is reached).
        checkpoint: (fista only) save the solver state to ``checkpoint.folder`` every
            ``checkpoint.every`` iterations and at the end, and resume from a state found there
            (``V0`` is then ignored); see :mod:`~convexedge.host.solvers.checkpoint`.

    Returns:
        :class:`SolveResult`.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((200, 6)); G = rng.standard_normal((6, 4))
        >>> prob = GatedProblem.from_arrays(Z, rng.standard_normal((200, 2)), Z @ G >= 0)
        >>> res = solve(prob, 0.1 * prob.lam_max(), FistaConfig(tol=1e-6))
        >>> res.converged
        True
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    kind = {"fista": FistaConfig, "adam": AdamConfig, "pyscnn": PyscnnConfig}[method]
    if config is None:
        config = kind()
    if not isinstance(config, kind):
        raise TypeError(
            f"method={method!r} takes a {kind.__name__}, got {type(config).__name__}; pass "
            f"{kind.__name__}(...) or config=None for its defaults"
        )
    if checkpoint is not None and (method != "fista" or not isinstance(checkpoint, SolverCheckpoint)):
        raise ValueError(
            f"checkpoint takes a SolverCheckpoint and method='fista', got {type(checkpoint).__name__} "
            f"with method={method!r}"
        )
    if method == "adam":
        return _solve_adam(problem, float(lam), config, V0, progress)
    if method == "pyscnn":
        return _solve_pyscnn(problem, float(lam), config, V0, progress)
    return _solve_fista(problem, float(lam), config, V0, progress, checkpoint)
