"""Optimal sets, minimal networks and solution paths of convex (gated) ReLU networks.

Public API of the optimal-set tools (Mishkin & Pilanci, "Optimal Sets and Solution Paths of ReLU
Networks", ICML 2023) for ``F(V) = 1/(2n) ||sum_i D_i Z V_i - Y||_F^2 + lam sum_g ||V_g||``:

* :func:`dual_certificate`: the unique fitted values ``yhat`` and dual ``rho = (Y - yhat)/n``;
* :func:`describe_optimal_set`: the whole optimal set as a polyhedron of scalings ``alpha`` of
  fixed directions ``s_g = (A^T rho)_g / lam`` on the equicorrelation set;
* :func:`check_uniqueness`: whether the optimum is unique and, if not, why;
* :func:`prune_to_minimal` / :func:`magnitude_prune` (from :mod:`convexedge.host.prune`);
* :func:`regularization_path`, :func:`fitted_sensitivity`, :func:`plot_path`: the ``lam`` path,
  its active-set change points, ``d yhat / d lam`` on a fixed active set, and a Pareto PNG;
* :class:`GatedNetwork` / :class:`ReluNetwork` with :func:`to_gated_network`,
  :func:`from_gated_network`, :func:`to_relu_network`, :func:`from_relu_network`: two-layer
  networks from a convex solution and back, predictions unchanged;
* :func:`solve_relu` (from :mod:`convexedge.host.constrained`): the exact ReLU form with its cone
  constraints, by an augmented Lagrangian over our FISTA.

Everything is computed in float64 on CPU (the problems this is for fit in memory).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from convexedge.device.errors import DataError
from convexedge.host.constrained import ReluALConfig, ReluSolveResult, relu_objective, solve_relu
from convexedge.host.prune import (
    DualResult,
    PruneResult,
    _group_norm,
    _unpack,
    as_float64,
    dual_certificate,
    magnitude_prune,
    prune_to_minimal,
)
from convexedge.host.solvers import FistaConfig, GatedProblem, solve_path

__all__ = [
    "DualResult",
    "GatedNetwork",
    "OptimalSet",
    "PathResult",
    "PruneResult",
    "ReluALConfig",
    "ReluNetwork",
    "ReluSolveResult",
    "SensitivityResult",
    "UniquenessResult",
    "check_uniqueness",
    "describe_optimal_set",
    "dual_certificate",
    "fitted_sensitivity",
    "from_gated_network",
    "from_relu_network",
    "magnitude_prune",
    "plot_path",
    "prune_to_minimal",
    "regularization_path",
    "relu_objective",
    "solve_relu",
    "to_gated_network",
    "to_relu_network",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- optimal set
@dataclass
class OptimalSet:
    """The optimal set ``{V : V_g = alpha_g s_g, alpha in Q}`` of one problem and ``lam``.

    ``Q = {alpha >= 0 : A_eq alpha = b_eq}`` over the equicorrelation groups; ``A_eq`` is the
    column matrix ``[a_g]`` (``a_g = A_g s_g`` flattened) reduced to its row space by an SVD, so
    it has ``rank`` rows.

    Attributes:
        lam: regularisation strength.
        groups: equicorrelation groups ``E``: gate indices (``group="gate"``) or ``(gate, output)``
            pairs (``"gate_output"``).
        directions: (|E|, d, c) (``"gate"``) or (|E|, d) (``"gate_output"``) unit directions
            ``s_g = (A^T rho)_g / ||(A^T rho)_g||``.
        alpha: (|E|,) the scalings of the given solution (``||V_g||``, zero off its support).
        A_eq: (rank, |E|) reduced equality constraints.
        b_eq: (rank,) right-hand side (``A_eq @ alpha``).
        rank: rank of the columns ``[a_g]``, an upper bound on the active groups at a vertex.
        fitted: (n, c) the unique fitted values.
        rho: (n, c) the unique dual vector.
        penalty: ``sum_g alpha_g``, the same at every point of the set.
        group: ``"gate"`` or ``"gate_output"``.
        shape: ``(P, d, c)``.
    """

    lam: float
    groups: list
    directions: torch.Tensor
    alpha: np.ndarray
    A_eq: np.ndarray
    b_eq: np.ndarray
    rank: int
    fitted: torch.Tensor
    rho: torch.Tensor
    penalty: float
    group: str
    shape: tuple[int, int, int]

    def point(self, alpha: np.ndarray) -> torch.Tensor:
        """The ``V`` (P, d, c) float64 with scalings ``alpha`` (|E|,) of the directions."""
        alpha = np.asarray(alpha, dtype=np.float64)
        if alpha.shape != (len(self.groups),):
            raise ValueError(f"alpha must have shape ({len(self.groups)},), got {alpha.shape}")
        V = torch.zeros(self.shape, dtype=torch.float64)
        for g, a, s in zip(self.groups, alpha, self.directions, strict=True):
            if self.group == "gate":
                V[g] = float(a) * s
            else:
                V[g[0], :, g[1]] = float(a) * s
        return V

    def contains(self, alpha: np.ndarray, tol: float = 1e-8) -> bool:
        """Whether ``alpha`` is in ``Q`` up to ``tol`` (relative to ``||b_eq||`` and the penalty)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        scale = max(float(np.linalg.norm(self.b_eq)), 1e-300)
        return bool(
            (alpha >= -tol * max(self.penalty, 1e-300)).all()
            and np.linalg.norm(self.A_eq @ alpha - self.b_eq) <= tol * scale
        )


def _directions_and_blocks(p64: GatedProblem, rho: torch.Tensor, groups: list):
    """Unit directions ``s_g`` from ``A^T rho`` and the column matrix ``[A_g s_g]`` in blocks.

    Returns ``(dirs, blocks)`` with ``blocks = [(positions, cols)]``: ``cols[:, k]`` is the column of
    group ``groups[positions[k]]``. ``group="gate"``: one block of ``n c`` rows. ``"gate_output"``:
    group ``(i, j)`` touches only output ``j``'s rows, so the matrix is block diagonal over outputs
    and each block keeps its ``n`` rows (never the ``(n c, |E|)`` matrix, mostly zeros: 33 GB on the
    ``patches`` problem).
    """
    C = p64.adjoint(rho)  # (P, d, c)
    Z = p64.Z
    M = p64.masks.to(torch.float64)
    if not groups:
        shape = (0, p64.d, p64.c) if p64.group == "gate" else (0, p64.d)
        return torch.zeros(shape, dtype=torch.float64), []
    if p64.group == "gate":
        dirs = torch.stack([C[g] / torch.linalg.vector_norm(C[g]) for g in groups])
        cols = torch.stack(
            [((Z @ s) * M[:, g, None]).reshape(-1) for g, s in zip(groups, dirs, strict=True)], dim=1
        )
        return dirs, [(np.arange(len(groups)), cols.numpy())]
    dirs = torch.stack([C[i, :, j] / torch.linalg.vector_norm(C[i, :, j]) for i, j in groups])
    blocks = []
    for j in sorted({g[1] for g in groups}):
        pos = np.array([k for k, g in enumerate(groups) if g[1] == j])
        gates = [groups[k][0] for k in pos]
        blocks.append((pos, ((Z @ dirs[pos].T) * M[:, gates]).numpy()))
    return dirs, blocks


def _reduced_constraints(blocks: list, n_groups: int, rtol: float) -> tuple[np.ndarray, int]:
    """``A_eq`` (rank, n_groups) with ``A_eq^T A_eq = cols^T cols`` from the blocks of the column
    matrix (QR then SVD per block, the rank cutoff ``rtol`` relative to the largest singular value
    over all blocks)."""
    parts = []
    for pos, cols in blocks:
        R = np.linalg.qr(cols, mode="r") if cols.shape[0] > cols.shape[1] else cols
        _, sv, Wt = np.linalg.svd(R, full_matrices=False)
        parts.append((pos, sv, Wt))
    top = max((float(sv[0]) for _, sv, _ in parts if sv.size), default=0.0)
    rows = []
    for pos, sv, Wt in parts:
        r = int((sv > rtol * top).sum()) if top > 0 else 0
        block = np.zeros((r, n_groups))
        block[:, pos] = sv[:r, None] * Wt[:r]
        rows.append(block)
    A_eq = np.vstack(rows) if rows else np.zeros((0, n_groups))
    return A_eq, A_eq.shape[0]


def describe_optimal_set(
    problem: GatedProblem, solution, lam: float | None = None, *, etol: float = 1e-6, rtol: float = 1e-9
) -> OptimalSet:
    """The optimal set of ``problem`` at ``lam`` from one (near-)optimal solution.

    Every optimum has the fitted values ``yhat`` and dual ``rho`` of this solution; its groups are
    ``V_g = alpha_g s_g`` with ``s_g = (A^T rho)_g / lam`` on the equicorrelation set
    ``E = {g : ||(A^T rho)_g|| >= (1 - etol) lam}`` and ``alpha`` in the polyhedron
    ``{alpha >= 0 : sum_g alpha_g A_g s_g = yhat}`` (Mishkin & Pilanci 2023, Sec. 3). Groups that
    are nonzero in ``V`` are always put in ``E``.

    Args:
        problem: the problem.
        solution: :class:`SolveResult` or (P, d, c) ``V``, solved to a tight KKT residual.
        lam: regularisation strength (required with a tensor ``V``).
        etol: relative tolerance on ``||(A^T rho)_g|| = lam`` for membership of ``E``.
        rtol: relative singular-value cutoff for the rank.

    Returns:
        :class:`OptimalSet`.

    Raises:
        ValueError: ``etol`` or ``rtol`` not in (0, 1); see :func:`dual_certificate` for the rest.
    """
    for name, val in (("etol", etol), ("rtol", rtol)):
        if not (isinstance(val, (int, float)) and 0 < val < 1):
            raise ValueError(f"{name} must be in (0, 1), got {val!r}")
    p64 = as_float64(problem)
    V, lam = _unpack(p64, solution, lam)
    dual = dual_certificate(p64, V, lam)
    vn = _group_norm(V, p64.group)
    inE = (dual.correlations >= 1.0 - etol) | (vn > 0)
    if p64.group == "gate":
        groups = torch.nonzero(inE).flatten().tolist()
        alpha = np.array([float(vn[g]) for g in groups])
    else:
        groups = [tuple(x) for x in torch.nonzero(inE).tolist()]
        alpha = np.array([float(vn[g[0], g[1]]) for g in groups])
    dirs, blocks = _directions_and_blocks(p64, dual.rho, groups)
    A_eq, r = _reduced_constraints(blocks, len(groups), rtol)
    return OptimalSet(
        lam=lam, groups=groups, directions=dirs, alpha=alpha, A_eq=A_eq, b_eq=A_eq @ alpha, rank=r,
        fitted=dual.fitted, rho=dual.rho, penalty=float(alpha.sum()), group=p64.group,
        shape=(p64.P, p64.d, p64.c),
    )  # fmt: skip


@dataclass
class UniquenessResult:
    """What :func:`check_uniqueness` returns.

    Attributes:
        unique: whether the optimal set is a single point.
        reason: a sentence saying why.
        support: groups nonzero in the solution.
        equicorrelation: the groups of ``E`` (may be larger than the support).
        null_dim: dimension of the null space of the support's columns (``> 0``: not unique).
        entering: groups of ``E`` outside the support that some optimum uses (``[]`` if none).
        rank: rank of the columns of ``E``.
    """

    unique: bool
    reason: str
    support: list
    equicorrelation: list
    null_dim: int
    entering: list = field(default_factory=list)
    rank: int = 0


def check_uniqueness(
    problem: GatedProblem,
    solution,
    lam: float | None = None,
    *,
    etol: float = 1e-6,
    rtol: float = 1e-9,
    lp_tol: float = 1e-7,
) -> UniquenessResult:
    """Whether the optimum is unique, and if not, why.

    The optimal set is ``Q = {alpha >= 0 : sum_{g in E} alpha_g a_g = yhat}`` (see
    :func:`describe_optimal_set`), and the given solution is ``alpha*`` with support ``S``. ``Q`` is
    the single point ``alpha*`` iff (a) the columns ``a_g``, ``g in S``, are linearly independent
    (otherwise ``alpha*`` moves along their null space and stays ``> 0`` on ``S`` for small steps)
    and (b) no point of ``Q`` puts weight on ``E \\ S``, tested by the linear program
    ``max sum_{g in E \\ S} alpha_g`` over ``Q`` (its value is 0 iff (b)); given (b) every optimum
    lives on ``S`` where (a) makes ``alpha`` unique.

    Args:
        problem: the problem.
        solution: :class:`SolveResult` or (P, d, c) ``V`` solved to a tight KKT residual.
        lam: regularisation strength (required with a tensor ``V``).
        etol: tolerance of equicorrelation (see :func:`describe_optimal_set`).
        rtol: relative singular-value cutoff.
        lp_tol: an LP value above ``lp_tol * sum(alpha*)`` counts as a group that can enter.

    Returns:
        :class:`UniquenessResult`.
    """
    from scipy.optimize import linprog

    opt = describe_optimal_set(problem, solution, lam, etol=etol, rtol=rtol)
    S = np.flatnonzero(opt.alpha > 0)
    support = [opt.groups[k] for k in S]
    if S.size == 0:
        return UniquenessResult(True, "V = 0 is the unique optimum (lam >= lam_max)", [], opt.groups, 0,
                                rank=opt.rank)  # fmt: skip
    A_S = opt.A_eq[:, S]
    sv = np.linalg.svd(A_S, compute_uv=False)
    r_S = int((sv > rtol * max(sv[0], 1e-300)).sum())
    null_dim = S.size - r_S
    if null_dim > 0:
        return UniquenessResult(
            False,
            f"the {S.size} active columns span only {r_S} dimensions: the optimum moves along a "
            f"{null_dim}-dimensional null space (prune_to_minimal walks to a vertex)",
            support, opt.groups, null_dim, rank=opt.rank,
        )  # fmt: skip
    others = np.setdiff1d(np.arange(len(opt.groups)), S)
    if others.size == 0:
        return UniquenessResult(True, "the active columns are linearly independent and no other group is "
                                "equicorrelated", support, opt.groups, 0, rank=opt.rank)  # fmt: skip
    cost = np.zeros(len(opt.groups))
    cost[others] = -1.0
    total = opt.penalty
    res = linprog(cost, A_eq=opt.A_eq, b_eq=opt.b_eq, bounds=[(0, 10 * total)] * len(opt.groups),
                  method="highs")  # fmt: skip
    if res.status != 0:
        raise RuntimeError(f"uniqueness LP failed ({res.message}); loosen rtol or etol")
    entering = [opt.groups[k] for k in others if res.x[k] > lp_tol * total]
    if -res.fun > lp_tol * total and entering:
        return UniquenessResult(
            False,
            f"the active columns are independent, but equicorrelated group(s) {entering} outside "
            f"the support can take weight in another optimum",
            support, opt.groups, 0, entering, rank=opt.rank,
        )  # fmt: skip
    return UniquenessResult(
        True,
        f"the active columns are independent and none of the {others.size} other equicorrelated "
        f"group(s) can enter",
        support, opt.groups, 0, rank=opt.rank,
    )  # fmt: skip


# --------------------------------------------------------------------------------- paths
@dataclass
class PathResult:
    """What :func:`regularization_path` returns.

    Attributes:
        lams: (L,) decreasing regularisation strengths.
        results: the :class:`SolveResult` per ``lam``.
        gate_norms: (L, P) ``||V_i||_F`` per ``lam``.
        active: per ``lam``, the sorted active gates.
        objectives: (L,) ``F(V(lam))``.
        losses: (L,) ``1/(2n) ||yhat - Y||^2``.
        change_points: one dict per consecutive pair whose active sets differ:
            ``{"index", "lam_before", "lam_after", "added", "removed"}`` (the change happens in
            ``(lam_after, lam_before]``).
        pruned_active: (L,) active gates after :func:`prune_to_minimal` (if ``prune=True``).
        seconds: wall-clock time.
    """

    lams: np.ndarray
    results: list
    gate_norms: np.ndarray
    active: list
    objectives: np.ndarray
    losses: np.ndarray
    change_points: list
    pruned_active: np.ndarray | None
    seconds: float


def active_set_changes(active: Sequence[Sequence[int]], lams: Sequence[float]) -> list[dict]:
    """Consecutive path points whose active sets differ: what entered and what left.

    Args:
        active: per ``lam``, the active gates.
        lams: the path's decreasing ``lam``.

    Returns:
        ``[{"index", "lam_before", "lam_after", "added", "removed"}]``.
    """
    out = []
    for k in range(1, len(active)):
        a, b = set(active[k - 1]), set(active[k])
        if a != b:
            out.append({"index": k, "lam_before": float(lams[k - 1]), "lam_after": float(lams[k]),
                        "added": sorted(b - a), "removed": sorted(a - b)})  # fmt: skip
    return out


def regularization_path(
    problem: GatedProblem,
    lams: Sequence[float] | None = None,
    *,
    n_lams: int = 20,
    lam_min_ratio: float = 1e-3,
    lam_max_ratio: float = 0.5,
    config: FistaConfig | None = None,
    prune: bool = False,
) -> PathResult:
    """Solve a decreasing ``lam`` path with warm starts; record norms, active sets, change points.

    Args:
        problem: the problem.
        lams: decreasing strengths; None: ``n_lams`` geometric points from ``lam_max_ratio`` to
            ``lam_min_ratio`` times ``lam_max``.
        n_lams: points of the default path (``>= 2``).
        lam_min_ratio: last point of the default path over ``lam_max``.
        lam_max_ratio: first point of the default path over ``lam_max``.
        config: FISTA settings (default ``FistaConfig(tol=1e-8)``).
        prune: also prune each point to a minimal network (``pruned_active``).

    Returns:
        :class:`PathResult`.

    Raises:
        ValueError: bad ``n_lams`` or ratios.
    """
    start = time.perf_counter()
    if lams is None:
        if not isinstance(n_lams, int) or n_lams < 2:
            raise ValueError(f"n_lams must be an int >= 2, got {n_lams!r}")
        if not (0 < lam_min_ratio < lam_max_ratio):
            raise ValueError(
                f"need 0 < lam_min_ratio < lam_max_ratio, got {lam_min_ratio!r}, {lam_max_ratio!r}"
            )
        lm = problem.lam_max()
        lams = lm * np.geomspace(lam_max_ratio, lam_min_ratio, n_lams)
    lams = np.asarray([float(x) for x in lams])
    config = config if config is not None else FistaConfig(tol=1e-8, max_iter=20000)
    results = solve_path(problem, list(lams), config)
    norms = np.stack([_group_norm(r.V.to(torch.float64), "gate").cpu().numpy() for r in results])
    active = [np.flatnonzero(row > 0).tolist() for row in norms]
    objs = np.array([r.objective for r in results])
    losses = np.array([float(problem.objective(r.V, 0.0)) for r in results])
    pruned = None
    if prune:
        pruned = np.array([prune_to_minimal(problem, r).active_after for r in results])
    return PathResult(
        lams=lams, results=results, gate_norms=norms, active=active, objectives=objs, losses=losses,
        change_points=active_set_changes(active, lams), pruned_active=pruned,
        seconds=time.perf_counter() - start,
    )  # fmt: skip


@dataclass
class SensitivityResult:
    """What :func:`fitted_sensitivity` returns.

    Attributes:
        dfitted: (n, c) ``d yhat / d lam`` on the solution's active set.
        dV: (P, d, c) ``d V / d lam`` (zero off the active set).
        active: the active groups used.
        condition: condition number of the reduced KKT Jacobian (``inf``: singular, solved in the
            least-squares sense; ``dfitted`` is still unique).
    """

    dfitted: torch.Tensor
    dV: torch.Tensor
    active: list
    condition: float


def fitted_sensitivity(
    problem: GatedProblem, solution, lam: float | None = None, *, max_size: int = 6000
) -> SensitivityResult:
    """``d yhat / d lam`` at an optimum, holding its active set fixed.

    On the active groups ``S`` (nonzero ``V_g``) stationarity reads
    ``B_S^T (B_S v - y) / n + lam u(v) = 0`` with ``u_g = v_g / ||v_g||`` and ``B_g`` the linear map
    from group ``g`` to the flattened fitted values. Differentiating in ``lam``:

        (B_S^T B_S / n + lam J(v)) dv/dlam = -u(v),   J = blockdiag((I - u_g u_g^T) / ||v_g||),

    and ``d yhat / d lam = B_S dv/dlam``. The matrix is singular exactly on the optimal set's null
    directions (``B_S w = 0`` with each ``w_g`` parallel to ``v_g``), along which ``yhat`` does
    not move, so a least-squares solve still gives the unique ``d yhat / d lam``; at a minimal
    network (:func:`prune_to_minimal`) it is nonsingular. Valid while the active set does not
    change (between two change points of the path).

    Args:
        problem: the problem.
        solution: :class:`SolveResult` or (P, d, c) ``V``.
        lam: regularisation strength (required with a tensor ``V``).
        max_size: refuse reduced systems larger than this (the matrix is dense).

    Returns:
        :class:`SensitivityResult`.

    Raises:
        ValueError: the reduced system has more than ``max_size`` unknowns.
    """
    p64 = as_float64(problem)
    V, lam = _unpack(p64, solution, lam)
    n, d, c = p64.n, p64.d, p64.c
    Z, M = p64.Z, p64.masks.to(torch.float64)
    vn = _group_norm(V, p64.group)
    if p64.group == "gate":
        groups = torch.nonzero(vn > 0).flatten().tolist()
        size = len(groups) * d * c
    else:
        groups = [tuple(x) for x in torch.nonzero(vn > 0).tolist()]
        size = len(groups) * d
    if size > max_size:
        raise ValueError(
            f"the reduced KKT system has {size} unknowns > max_size={max_size}; prune first "
            f"(prune_to_minimal) or raise max_size"
        )
    eye_c = torch.eye(c, dtype=torch.float64)
    Bs, vs = [], []
    for g in groups:
        if p64.group == "gate":
            DZ = Z * M[:, g, None]
            Bs.append(torch.kron(DZ, eye_c))  # vec row-major: (k, j) <- (a, j)
            vs.append(V[g].reshape(-1))
        else:
            i, j = g
            B = torch.zeros((n, c, d), dtype=torch.float64)
            B[:, j, :] = Z * M[:, i, None]
            Bs.append(B.reshape(n * c, d))
            vs.append(V[i, :, j])
    if not groups:
        z = torch.zeros((n, c), dtype=torch.float64)
        return SensitivityResult(dfitted=z, dV=torch.zeros_like(V), active=[], condition=1.0)
    B = torch.cat(Bs, dim=1)
    H = B.T @ B / n
    rhs, off = [], 0
    for v in vs:
        k = v.numel()
        nv = torch.linalg.vector_norm(v)
        u = v / nv
        H[off : off + k, off : off + k] += lam * (torch.eye(k, dtype=torch.float64) - torch.outer(u, u)) / nv
        rhs.append(-u)
        off += k
    rhs_t = torch.cat(rhs)
    Hn = H.numpy()
    sv = np.linalg.svd(Hn, compute_uv=False)
    cond = float(sv[0] / sv[-1]) if sv[-1] > 1e-14 * sv[0] else math.inf
    dv = torch.from_numpy(np.linalg.lstsq(Hn, rhs_t.numpy(), rcond=1e-13)[0])
    dfit = (B @ dv).reshape(n, c)
    dV = torch.zeros_like(V)
    off = 0
    for g, v in zip(groups, vs, strict=True):
        k = v.numel()
        if p64.group == "gate":
            dV[g] = dv[off : off + k].reshape(d, c)
        else:
            dV[g[0], :, g[1]] = dv[off : off + k]
        off += k
    return SensitivityResult(dfitted=dfit, dV=dV, active=groups, condition=cond)


def plot_path(
    path: PathResult,
    file: str | Path,
    *,
    accuracy: Sequence[float] | None = None,
    accuracy_label: str = "accuracy",
) -> Path:
    """PNG: gate norms against ``lam`` (left) and a Pareto plot of fit against neurons (right).

    The right panel plots ``accuracy`` (one value per path point, e.g. held-out top-1) against
    active neurons, or the training loss when ``accuracy`` is None; with ``path.pruned_active`` it
    also shows the pruned counts (same objective, fewer neurons). Uses matplotlib's object API.

    Args:
        path: from :func:`regularization_path`.
        file: output path (``.png``).
        accuracy: optional (L,) values per path point.
        accuracy_label: y-axis label for ``accuracy``.

    Returns:
        The written path.

    Raises:
        ValueError: ``accuracy`` has the wrong length.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    L = len(path.lams)
    if accuracy is not None and len(accuracy) != L:
        raise ValueError(f"accuracy must have one value per path point ({L}), got {len(accuracy)}")
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax1, ax2 = fig.subplots(1, 2)
    for i in range(path.gate_norms.shape[1]):
        if (path.gate_norms[:, i] > 0).any():
            ax1.plot(path.lams, path.gate_norms[:, i], lw=1)
    for cp in path.change_points:
        ax1.axvline(cp["lam_after"], color="0.85", lw=0.5, zorder=0)
    ax1.set_xscale("log")
    ax1.invert_xaxis()
    ax1.set_xlabel("lam")
    ax1.set_ylabel("||V_i||_F per gate")
    ax1.set_title("regularization path")
    y = np.asarray(accuracy) if accuracy is not None else path.losses
    neurons = np.array([len(a) for a in path.active])
    ax2.plot(neurons, y, "o-", label="solver optimum")
    if path.pruned_active is not None:
        ax2.plot(path.pruned_active, y, "s--", label="after prune_to_minimal")
    ax2.set_xlabel("active neurons")
    ax2.set_ylabel(accuracy_label if accuracy is not None else "training loss 1/(2n)||yhat - Y||^2")
    if accuracy is None:
        ax2.set_yscale("log")
    ax2.legend()
    ax2.set_title("fit vs neurons (pick a model)")
    fig.tight_layout()
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file)
    return file


# --------------------------------------------------------------------------------- networks
@dataclass
class GatedNetwork:
    """A two-layer gated ReLU network ``f(Z) = sum_j 1[Z g_j >= 0] (Z w1_j) w2_j^T``.

    Attributes:
        W1: (d, m) first-layer weights.
        W2: (m, c) second-layer weights.
        gates: (d, m) the gate of each neuron.
        gate_index: (m,) which column of the original gate matrix each neuron uses.
    """

    W1: torch.Tensor
    W2: torch.Tensor
    gates: torch.Tensor
    gate_index: list[int]

    def predict(self, Z: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, c)."""
        Z = torch.as_tensor(Z, dtype=self.W1.dtype)
        return (((Z @ self.gates) >= 0).to(Z.dtype) * (Z @ self.W1)) @ self.W2


def to_gated_network(V: torch.Tensor, G: torch.Tensor, *, rtol: float = 1e-12) -> GatedNetwork:
    """Factor each active ``V_i`` (d, c) by SVD into ``rank(V_i)`` neurons sharing gate ``g_i``.

    ``V_i = sum_k sigma_k p_k q_k^T`` gives neurons ``w1 = sqrt(sigma_k) p_k``,
    ``w2 = sqrt(sigma_k) q_k`` (balanced, so ``||w1||^2 + ||w2||^2 = 2 sigma_k``); singular values
    ``<= rtol * sigma_1`` are dropped. Predictions equal ``sum_i D_i Z V_i`` up to rounding.

    Args:
        V: (P, d, c) convex solution.
        G: (d, P) gates.
        rtol: relative singular-value cutoff.

    Raises:
        DataError: shapes disagree.
    """
    V = torch.as_tensor(V, dtype=torch.float64)
    G = torch.as_tensor(G, dtype=torch.float64)
    if V.ndim != 3 or G.shape != (V.shape[1], V.shape[0]):
        raise DataError(f"expected V (P, d, c) and G (d, P), got V {tuple(V.shape)}, G {tuple(G.shape)}")
    w1, w2, gates, idx = [], [], [], []
    for i in range(V.shape[0]):
        if not bool(V[i].ne(0).any()):
            continue
        U, s, Wt = torch.linalg.svd(V[i], full_matrices=False)
        for k in range(s.numel()):
            if s[k] <= rtol * s[0]:
                break
            r = torch.sqrt(s[k])
            w1.append(r * U[:, k])
            w2.append(r * Wt[k])
            gates.append(G[:, i])
            idx.append(i)
    d, c = V.shape[1], V.shape[2]
    if not w1:
        z64 = {"dtype": torch.float64}
        return GatedNetwork(torch.zeros((d, 0), **z64), torch.zeros((0, c), **z64),
                            torch.zeros((d, 0), dtype=torch.float64), [])  # fmt: skip
    return GatedNetwork(torch.stack(w1, 1), torch.stack(w2, 0), torch.stack(gates, 1), idx)


def from_gated_network(net: GatedNetwork, P: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Convex ``(V, G)`` from a gated network: ``V_i = sum_{j: gate of j is i} w1_j w2_j^T``.

    Neurons are grouped by ``net.gate_index``; ``P`` defaults to ``max(gate_index) + 1`` (gates
    of missing indices are zero columns with ``V_i = 0``).

    Returns:
        ``V`` (P, d, c) and ``G`` (d, P), float64.
    """
    d, c = net.W1.shape[0], net.W2.shape[1]
    P = P if P is not None else (max(net.gate_index) + 1 if net.gate_index else 0)
    if net.gate_index and max(net.gate_index) >= P:
        raise ValueError(f"P={P} is smaller than the largest gate index + 1 ({max(net.gate_index) + 1})")
    V = torch.zeros((P, d, c), dtype=torch.float64)
    G = torch.zeros((d, P), dtype=torch.float64)
    for j, i in enumerate(net.gate_index):
        V[i] += torch.outer(net.W1[:, j].double(), net.W2[j].double())
        G[:, i] = net.gates[:, j]
    return V, G


@dataclass
class ReluNetwork:
    """A two-layer ReLU network ``f(Z) = relu(Z W1) W2``.

    Attributes:
        W1: (d, m).
        W2: (m, c).
    """

    W1: torch.Tensor
    W2: torch.Tensor

    def predict(self, Z: torch.Tensor) -> torch.Tensor:
        """(n, d) -> (n, c)."""
        Z = torch.as_tensor(Z, dtype=self.W1.dtype)
        return torch.relu(Z @ self.W1) @ self.W2

    def objective(self, Z: torch.Tensor, Y: torch.Tensor, lam: float) -> float:
        """Weight-decay objective ``1/(2n)||f(Z) - Y||^2 + lam/2 (||W1||^2 + ||W2||^2)``.

        At the balanced scaling :func:`to_relu_network` produces it equals the convex objective
        (:func:`relu_objective`) of the solution it came from (Pilanci & Ergen 2020).
        """
        Z = torch.as_tensor(Z, dtype=self.W1.dtype)
        Y = torch.as_tensor(Y, dtype=self.W1.dtype)
        r = self.predict(Z) - Y
        return float(
            0.5 * r.square().sum() / Z.shape[0]
            + 0.5 * lam * (self.W1.square().sum() + self.W2.square().sum())
        )


def to_relu_network(U: torch.Tensor, W: torch.Tensor) -> ReluNetwork:
    """ReLU network from a solution ``(U, W)`` of the constrained form (one-vs-all groups).

    Each nonzero column ``u = U[i, :, j]`` becomes a neuron ``w1 = u / sqrt(||u||)`` with output
    weight ``sqrt(||u||) e_j`` and each ``w = W[i, :, j]`` a neuron ``w / sqrt(||w||)`` with weight
    ``-sqrt(||w||) e_j``. Where the cone constraints ``(2 D_i - I) Z u >= 0`` hold,
    ``relu(Z u) = D_i Z u``, so the predictions equal ``sum_i D_i Z (U_i - W_i)``.

    Args:
        U, W: (P, d, c).
    """
    U = torch.as_tensor(U, dtype=torch.float64)
    W = torch.as_tensor(W, dtype=torch.float64)
    if U.shape != W.shape or U.ndim != 3:
        raise DataError(f"U and W must both be (P, d, c), got {tuple(U.shape)} and {tuple(W.shape)}")
    P, d, c = U.shape
    w1, w2 = [], []
    for X, sign in ((U, 1.0), (W, -1.0)):
        for i in range(P):
            for j in range(c):
                nv = float(torch.linalg.vector_norm(X[i, :, j]))
                if nv == 0:
                    continue
                w1.append(X[i, :, j] / math.sqrt(nv))
                e = torch.zeros(c, dtype=torch.float64)
                e[j] = sign * math.sqrt(nv)
                w2.append(e)
    if not w1:
        return ReluNetwork(torch.zeros((d, 0), dtype=torch.float64), torch.zeros((0, c), dtype=torch.float64))
    return ReluNetwork(torch.stack(w1, 1), torch.stack(w2, 0))


def from_relu_network(net: ReluNetwork, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constrained-form ``(U, W, masks)`` of a ReLU network on the data ``Z``.

    Neuron ``j`` has activation pattern ``D_j = diag(1[Z w1_j >= 0])`` (one gate per neuron, so
    ``P = m``); its output weights ``w2_j`` split by sign into ``U_j = w1_j (w2_j)_+^T`` and
    ``W_j = w1_j (w2_j)_-^T``, which satisfy the cone constraints by construction. Then
    ``sum_j D_j Z (U_j - W_j) = relu(Z W1) W2`` exactly (up to rounding).

    Returns:
        ``U`` (m, d, c), ``W`` (m, d, c), ``masks`` (n, m) bool.
    """
    Z = torch.as_tensor(Z, dtype=torch.float64)
    W1, W2 = net.W1.double(), net.W2.double()
    masks = (Z @ W1) >= 0
    U = torch.einsum("dm,mc->mdc", W1, W2.clamp_min(0))
    W = torch.einsum("dm,mc->mdc", W1, (-W2).clamp_min(0))
    return U, W, masks
