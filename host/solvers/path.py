"""Regularisation path with warm starts, the sequential strong rule, and a KKT check.

For decreasing ``lam_1 > lam_2 > ...`` each solve starts from the previous solution. Before each
solve, the sequential strong rule for the group lasso (Tibshirani, Bien, Friedman, Hastie, Simon,
Taylor & Tibshirani, "Strong rules for discarding predictors in lasso-type problems", JRSS-B
2012, Sec. 4, eq. (23) with unit group weights) discards group ``g`` at ``lam_k`` when

    ||grad_g f(V(lam_{k-1}))||_2 < 2 lam_k - lam_{k-1},

with ``V(lam_0) = 0`` at ``lam_0 = lam_max``. The rule is not safe, so after solving the reduced
problem we check the KKT condition of every discarded group on the full problem,
``||grad_g f(V)|| <= lam``, re-add the gates of the violators and solve again (warm), as the
paper prescribes; no active gate is lost.

Departure (marked): the solver works on gates, so a gate is kept when any of its groups survives
(for ``group="gate"`` a gate is one group; for ``"gate_output"`` a gate holds ``c`` groups and is
discarded only when all ``c`` are). The reduced problem is the full one restricted to the kept
gates; when the full problem holds a Gram matrix, the reduced one takes a slice of it instead of
rebuilding it.

Data parallel: a problem with a reduction hook (``GatedProblem.comm``) keeps it in the reduced
problems; screening and the KKT check use all-reduced gradients, so every rank keeps the same
gates. Checkpoints: with ``checkpoint=SolverCheckpoint(folder)`` every finished path point is
saved (``path_KKK``) and the running solve checkpoints as :func:`solve` does (``lamKKK_roundR``);
a later call with the same folder and ``lams`` skips the finished points and resumes the running
one, returning exactly what an uninterrupted run returns (``seconds`` aside).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch

from convexedge.device.errors import ArtifactError
from convexedge.host.solvers.checkpoint import SolverCheckpoint, load_arrays, save_arrays
from convexedge.host.solvers.fista import (
    FistaConfig,
    SolveResult,
    _operator,
    _use_gram,
    kkt_residual,
    solve,
)
from convexedge.host.solvers.problem import GatedProblem, GramData, group_norms

__all__ = ["solve_path"]

Screen = Literal["strong", "none"]


def _restrict(problem: GatedProblem, keep: torch.Tensor) -> GatedProblem:
    """The problem on the gates ``keep`` (sorted int64 indices); shares ``Z`` and ``Y``."""
    sub = GatedProblem(Z=problem.Z, Y=problem.Y, masks=problem.masks[:, keep], group=problem.group,
                       row_chunk=problem.row_chunk, comm=problem.comm)  # fmt: skip
    if problem._aty is not None:
        sub._aty = problem._aty[keep]
    if problem.has_gram:
        g = problem.gram()
        d = problem.d
        idx = (keep[:, None] * d + torch.arange(d, device=keep.device)).reshape(-1)
        G = g.G.index_select(0, idx).index_select(1, idx)
        sub._gram = GramData(G=G, B=g.B[keep], yy=g.yy, seconds=0.0)
    return sub


def _embed(problem: GatedProblem, keep: torch.Tensor, V_sub: torch.Tensor) -> torch.Tensor:
    V = torch.zeros((problem.P, problem.d, problem.c), dtype=V_sub.dtype, device=V_sub.device)
    V[keep] = V_sub
    return V


def _full_grad(problem: GatedProblem, V: torch.Tensor, config) -> torch.Tensor:
    op = _operator(problem, config)
    return op.grad(op.image(V))


def _gate_scores(problem: GatedProblem, grad: torch.Tensor) -> torch.Tensor:
    """Per gate, the largest gradient group norm: (P,) float64."""
    gn = group_norms(grad.to(torch.float64), problem.group)
    return gn if gn.ndim == 1 else gn.amax(dim=1)


def _solve_screened(
    problem: GatedProblem,
    lam: float,
    keep: torch.Tensor,
    config,
    V0: torch.Tensor | None,
    method: str,
    progress: Callable[[int, float, float], bool | None] | None,
    checkpoint: SolverCheckpoint | None = None,
) -> tuple[SolveResult, dict, torch.Tensor]:
    """Solve on the gates ``keep``, then add KKT violators among the others until there are none.

    Returns the result on the full problem, ``{kept_gates, readded_gates, rounds}`` and the full
    gradient at the solution.
    """
    start = time.perf_counter()
    keep = torch.unique(keep.to(torch.int64))
    rounds, readded, iterations = 0, 0, 0
    while True:
        rounds += 1
        sub = _restrict(problem, keep)
        V0_sub = None if V0 is None else V0[keep]
        ck = (
            None
            if checkpoint is None
            else dataclasses.replace(checkpoint, name=f"{checkpoint.name}_round{rounds}")
        )
        res = solve(sub, lam, config, V0=V0_sub, method=method, progress=progress, checkpoint=ck)
        iterations += res.iterations
        V = _embed(problem, keep, res.V)
        grad = _full_grad(problem, V, config)
        out = torch.ones(problem.P, dtype=torch.bool, device=keep.device)
        out[keep] = False
        # KKT for a zero group g: ||grad_g|| <= lam; a discarded gate violating it is re-added.
        violators = torch.nonzero(out & (_gate_scores(problem, grad) > lam)).flatten()
        if violators.numel() == 0:
            break
        readded += int(violators.numel())
        keep = torch.unique(torch.cat([keep, violators]))
        V0 = V
    kkt = kkt_residual(problem, V, lam, grad=grad)
    result = SolveResult(
        V=V, lam=lam, objective=problem.objective(V, lam), iterations=iterations,
        converged=res.converged, kkt_residual=kkt, seconds=time.perf_counter() - start,
        history=res.history, restarts=res.restarts, group=problem.group, dtype=res.dtype,
        device=res.device, operator=res.operator,
    )  # fmt: skip
    info = {"kept_gates": int(keep.numel()), "readded_gates": readded, "rounds": rounds}
    return result, info, grad


def solve_path(
    problem: GatedProblem,
    lams: Sequence[float],
    config=None,
    *,
    method: Literal["fista", "adam"] = "fista",
    screen: Screen = "strong",
    V0: torch.Tensor | None = None,
    progress: Callable[[int, float, float], bool | None] | None = None,
    checkpoint: SolverCheckpoint | None = None,
) -> list[SolveResult]:
    """Solve ``min_V 1/(2n) ||A(V) - Y||^2 + lam sum_g ||V_g||`` for each ``lam`` of a decreasing path.

    Each solve is warm-started from the previous one and, with ``screen="strong"``, runs on the
    gates the sequential strong rule keeps, followed by the KKT check that re-adds violators (see
    the module docstring), so every result is a solution of the *full* problem at its ``lam``:
    ``kkt_residual`` is measured on the full problem.

    Args:
        problem: the problem (its Gram, if built or selected by ``config.operator``, is shared by
            all solves and sliced for the reduced problems).
        lams: strictly decreasing regularisation strengths ``>= 0``.
        config: the method's config (None: defaults), as in :func:`solve`.
        method: ``"fista"`` or ``"adam"``.
        screen: ``"strong"`` or ``"none"``.
        V0: (P, d, c) warm start for the first ``lam`` (screening then starts from its gradient).
        progress: passed to every solve.
        checkpoint: (fista only) save finished points and the running solve's state to
            ``checkpoint.folder``, and resume from them (see the module docstring).

    Returns:
        One :class:`SolveResult` per ``lam``, in order; ``result.history["screening"]`` holds
        ``[kept_gates, readded_gates, rounds]``.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((200, 6)); G = rng.standard_normal((6, 4))
        >>> prob = GatedProblem.from_arrays(Z, rng.standard_normal((200, 2)), Z @ G >= 0)
        >>> lm = prob.lam_max()
        >>> [r.converged for r in solve_path(prob, [0.5 * lm, 0.1 * lm])]
        [True, True]
    """
    lams = [float(x) for x in lams]
    if not lams:
        raise ValueError("lams must hold at least one value, got an empty sequence")
    if any(not math.isfinite(x) or x < 0 for x in lams):
        raise ValueError(f"lams must be finite numbers >= 0, got {lams}")
    if any(b >= a for a, b in zip(lams, lams[1:], strict=False)):
        raise ValueError(f"lams must be strictly decreasing (solve from large to small), got {lams}")
    if method not in ("fista", "adam"):
        raise ValueError(f"method must be 'fista' or 'adam' for a path, got {method!r}")
    if screen not in ("strong", "none"):
        raise ValueError(f"screen must be 'strong' or 'none', got {screen!r}")
    if checkpoint is not None and (method != "fista" or not isinstance(checkpoint, SolverCheckpoint)):
        raise ValueError(
            f"checkpoint takes a SolverCheckpoint and method='fista', got {type(checkpoint).__name__} "
            f"with method={method!r}"
        )
    if config is None:
        from convexedge.host.solvers.adam import AdamConfig

        config = FistaConfig() if method == "fista" else AdamConfig()
    lam_max = problem.lam_max()
    if _use_gram(problem, config):
        problem.gram()  # build once here, so the reduced problems slice it
    all_gates = torch.arange(problem.P, device=problem.Z.device)
    if V0 is None:
        V, lam_prev = None, lam_max
        scores = problem._grad0_group_norms()
        scores = scores if scores.ndim == 1 else scores.amax(dim=1)
    else:
        V, lam_prev = V0, max(lam_max, lams[0])
        scores = _gate_scores(problem, _full_grad(problem, V0.to(problem.Z.dtype), config))
    results = []
    for k, lam in enumerate(lams):
        done = None if checkpoint is None else _load_point(problem, checkpoint, k, lam, lams)
        if done is not None:  # finished before: its gradient (for the screening) is recomputed
            results.append(done)
            V, lam_prev = done.V, lam
            scores = _gate_scores(problem, _full_grad(problem, V, config))
            continue
        if screen == "strong" and lam < lam_max:
            keep = torch.nonzero(scores >= 2.0 * lam - lam_prev).flatten()
            if V is not None:  # gates active in the warm start always stay
                active = torch.nonzero(V.reshape(problem.P, -1).ne(0).any(dim=1)).flatten()
                keep = torch.cat([keep, active])
            if keep.numel() == 0:
                keep = all_gates[:1]
        else:
            keep = all_gates
        ck = None if checkpoint is None else dataclasses.replace(checkpoint, name=f"lam{k:03d}")
        res, info, grad = _solve_screened(problem, lam, keep, config, V, method, progress, ck)
        res.history["screening"] = [info["kept_gates"], info["readded_gates"], info["rounds"]]
        if checkpoint is not None:
            _save_point(problem, checkpoint, k, lams, res)
        results.append(res)
        V, lam_prev = res.V, lam
        scores = _gate_scores(problem, grad)
    return results


# --------------------------------------------------------------------------------- checkpoints
_RESULT_FIELDS = ("lam", "objective", "iterations", "converged", "kkt_residual", "seconds", "restarts",
                  "group", "dtype", "device", "operator")  # fmt: skip


def _point_header(problem: GatedProblem, lams: list[float]) -> dict:
    return {
        "kind": "path_point", "lams": lams, "shape": [problem.P, problem.d, problem.c], "n": problem.n,
        "dtype": str(problem.Z.dtype).removeprefix("torch."), "group": problem.group,
        "rank": problem.rank, "world_size": problem.world_size,
    }  # fmt: skip


def _save_point(
    problem: GatedProblem, ck: SolverCheckpoint, k: int, lams: list[float], res: SolveResult
) -> None:
    fields = {f: getattr(res, f) for f in _RESULT_FIELDS}
    header = {
        **_point_header(problem, lams),
        "index": k,
        "result": fields,
        "history": json.dumps(res.history),
    }
    save_arrays(ck.file(problem.rank, problem.world_size, f"path_{k:03d}"), header, {"V": res.V})
    problem._same_everywhere(k)  # every rank has written before any goes on


def _load_point(
    problem: GatedProblem, ck: SolverCheckpoint, k: int, lam: float, lams: list[float]
) -> SolveResult | None:
    """The saved result of point ``k``, or None; the same decision on every rank."""
    path = ck.file(problem.rank, problem.world_size, f"path_{k:03d}")
    got = load_arrays(path, {**_point_header(problem, lams), "index": k})
    if not problem._same_everywhere(int(got is not None)):
        raise ArtifactError(
            f"{path}: path point {k} was saved by some ranks only; delete the checkpoint folder to restart"
        )
    if got is None:
        return None
    header, arrays = got
    V = torch.from_numpy(np.ascontiguousarray(arrays["V"])).to(dtype=problem.Z.dtype, device=problem.Z.device)
    fields = header["result"]
    if fields["lam"] != lam:  # pragma: no cover - lams are part of the header
        raise ArtifactError(f"{path}: saved for lam={fields['lam']}, not {lam}")
    return SolveResult(V=V, history=json.loads(header["history"]), **fields)
