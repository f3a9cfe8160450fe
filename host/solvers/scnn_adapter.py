"""Adapter that solves a :class:`GatedProblem` with pyscnn's R-FISTA (pip ``pyscnn``, import ``scnn``).

What pyscnn 0.0.10 solves (read from ``scnn.private.models.convex.convex_mlp.ConvexMLP`` and
``scnn.private.models.regularizers.group_l1``, with the public ``NeuronGL1`` regulariser and the
``ConvexGatedReLU`` model): weights ``W: (c, P, d)`` and

    F_scnn(W) = 1/(2 n c) ||sum_i D_i X W[:, i, :]^T - Y||_F^2 + lam_s * sum_{j, i} ||W[j, i, :]||_2,

i.e. the one-vs-all form (a group per gate *and* output column, our ``group="gate_output"``) with
the loss scaled by ``1/(n c)`` instead of our ``1/n``. Hence, with ``V[i, :, j] = W[j, i, :]``,

    F_ours(V; lam) = c * F_scnn(W; lam / c),

so we call pyscnn with ``lam_s = lam / c`` and multiply its objectives by ``c``.

Two things of pyscnn's public ``optimize`` we deliberately bypass, because they change the problem:

* ``unitize_data=True`` (its default) rescales the columns of ``X`` *before* computing the gate
  masks from ``X @ G``, so the masks (and the penalty) are no longer those of the caller's gates;
* it computes masks as ``X g > 0`` (strict) where we use ``>= 0``, which flips every row on a
  gate's hyperplane, e.g. all rows for an all-zero "linear" gate.

So the adapter builds pyscnn's internal ``ConvexMLP`` directly from our masks and runs the same
optimisation procedure ``scnn.optimize`` would (R-FISTA with its default line search, restart and
``GradientNorm(tol)`` stopping rule). ``converged`` is pyscnn's own termination test;
``kkt_residual`` is ours, computed at the returned point.

pyscnn's backend is process-global (``lab.set_backend`` / ``set_dtype``): calling this adapter
switches it, as pyscnn itself does.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers.problem import GatedProblem

__all__ = ["PyscnnConfig"]


@dataclass(frozen=True, kw_only=True)
class PyscnnConfig:
    """Settings of ``solve(..., method="pyscnn")``; the defaults are pyscnn's ``RFISTA`` defaults."""

    max_iter: int = 10000
    # pyscnn's tol on the squared norm of its minimum-norm subgradient (in its 1/(n c) scaling).
    tol: float = 1e-6
    # Record pyscnn's objective (and its solve-only clock) every this many iterations.
    metric_freq: int = 1
    # Cap in seconds (None: none) on pyscnn's own solve clock (the one SolveResult.seconds and the
    # history report: wall time minus its per-iteration metric evaluation), checked by pyscnn
    # before every iteration; hitting it returns converged=False with a ConvergenceWarning.
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_iter, int) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {self.max_iter!r}")
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        if not isinstance(self.metric_freq, int) or self.metric_freq < 1:
            raise ValueError(f"metric_freq must be an int >= 1, got {self.metric_freq!r}")
        if self.max_seconds is not None and not (
            isinstance(self.max_seconds, (int, float))
            and math.isfinite(self.max_seconds)
            and self.max_seconds > 0
        ):
            raise ValueError(f"max_seconds must be None or a finite number > 0, got {self.max_seconds!r}")


class _Deadline:
    """pyscnn termination criterion that also stops once ``max_seconds`` of its own clock passed.

    pyscnn's loop tests its criterion before every iteration and reports ``success`` when it
    returns True; :attr:`timed_out` tells the adapter that the stop was the clock, not convergence.
    The clock is pyscnn's solve clock: wall time minus the time spent in its metric evaluation
    (:meth:`metrics_timer` wraps that function and adds its time to :attr:`excluded`), so a cap
    of ``k`` times another solver's time means ``k`` times on the clock both are reported on.
    """

    def __init__(self, inner, max_seconds: float) -> None:
        self.inner = inner
        self.deadline = time.perf_counter() + max_seconds
        self.excluded = 0.0
        self.timed_out = False

    def metrics_timer(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.excluded += time.perf_counter() - t0

        return timed

    def __call__(self, *args, **kwargs) -> bool:
        if self.inner(*args, **kwargs):
            return True
        if time.perf_counter() - self.excluded >= self.deadline:
            self.timed_out = True
            return True
        return False


def scnn_available() -> bool:
    """Whether ``import scnn`` (pyscnn) works in this environment."""
    try:
        import scnn  # noqa: F401
    except ImportError:
        return False
    return True


def _solve_pyscnn(
    problem: GatedProblem,
    lam: float,
    config: PyscnnConfig,
    V0: torch.Tensor | None,
    progress: Callable[[int, float, float], None] | None,
):
    from convexedge.host.solvers.fista import SolveResult, _dtype_name, _zero_result, kkt_residual

    if problem.group != "gate_output":
        raise ValueError(
            f"pyscnn solves only the one-vs-all form (a group per gate and output column); got "
            f"group={problem.group!r}; build the problem with group='gate_output'"
        )
    try:
        import lab
        from scnn.metrics import Metrics
        from scnn.models import ConvexGatedReLU
        from scnn.private.interface import (
            build_internal_regularizer,
            build_metrics_tuple,
            build_optimizer,
        )
        from scnn.private.models import ConvexMLP
        from scnn.regularizers import NeuronGL1
        from scnn.solvers import RFISTA
    except ImportError as exc:
        raise ImportError(f"method='pyscnn' needs pyscnn 0.0.10 (pip install pyscnn==0.0.10): {exc}") from exc

    start = time.perf_counter()
    if lam >= problem.lam_max():
        return _zero_result(problem, lam, start, "pyscnn")
    d, c, P = problem.d, problem.c, problem.P
    dtype = _dtype_name(problem)
    cuda = problem.Z.device.type == "cuda"
    lab.set_backend("torch" if cuda else "numpy")
    lab.set_device("cuda" if cuda else "cpu")
    lab.set_dtype(dtype)

    def to_lab(t: torch.Tensor):
        return t.detach().to(problem.Z.dtype) if cuda else t.detach().cpu().to(problem.Z.dtype).numpy()

    X, Y, D = to_lab(problem.Z), to_lab(problem.Y), to_lab(problem.masks)
    lam_s = lam / c  # F_ours(V; lam) = c * F_scnn(W; lam / c), see the module docstring
    reg = NeuronGL1(lam_s)
    U = np.zeros((d, P))  # gate vectors: only used by pyscnn outside training; the masks are D
    model = ConvexMLP(d, D, to_lab(torch.zeros((d, P), dtype=problem.Z.dtype)), "einsum",
                      regularizer=build_internal_regularizer(reg), c=c)  # fmt: skip
    if V0 is not None:
        if tuple(V0.shape) != (P, d, c):
            raise ValueError(f"V0 must have shape (P, d, c) = {(P, d, c)}, got {tuple(V0.shape)}")
        model.weights = to_lab(V0.permute(2, 0, 1).contiguous())
    public = ConvexGatedReLU(U, c=c)
    metrics = Metrics(metric_freq=config.metric_freq, objective=True, grad_norm=False, time=True)
    procedure = build_optimizer(RFISTA(public, max_iters=config.max_iter, tol=config.tol), reg, metrics)
    logger = logging.getLogger("scnn")  # pyscnn's get_logger would call logging.basicConfig
    deadline = None
    loop = importlib.import_module("scnn.private.methods.optimization_procedures.iterative")
    original = loop.update_metrics
    if config.max_seconds is not None:
        deadline = _Deadline(procedure.term_criterion, config.max_seconds)
        procedure.term_criterion = deadline
        loop.update_metrics = deadline.metrics_timer(original)  # restored below
    t0 = time.perf_counter()
    try:
        exit_status, model, log = procedure(
            logger, model, lambda m: m, (X, Y), (X, Y), build_metrics_tuple(metrics)
        )
    finally:
        loop.update_metrics = original
    solve_seconds = time.perf_counter() - t0
    W = model.weights
    W = W if isinstance(W, torch.Tensor) else torch.from_numpy(np.asarray(W))
    V = W.to(device=problem.Z.device, dtype=problem.Z.dtype).permute(1, 2, 0).contiguous()
    kkt = kkt_residual(problem, V, lam)
    # pyscnn logs the time of each logged span excluding its metric computation; accumulate it.
    spans = [float(s) for s in log.get("time", [])]
    objs = [c * float(o) for o in log.get("train_objective", log.get("objective", []))]
    history = {
        "iteration": [float(i * config.metric_freq) for i in range(len(objs))],
        "objective": objs,
        "seconds": list(np.cumsum(spans[: len(objs)])) if spans else [],
    }
    iterations = int(max(len(objs) - 1, 0) * config.metric_freq)
    timed_out = deadline is not None and deadline.timed_out
    converged = bool(exit_status.get("success", False)) and not timed_out
    if progress is not None and objs:
        progress(iterations, objs[-1], kkt)
    if not converged:
        warnings.warn(
            f"pyscnn R-FISTA stopped without meeting its tol={config.tol:g} (max_iter="
            f"{config.max_iter}, max_seconds={config.max_seconds}; raise max_iter or max_seconds): "
            f"our relative KKT residual there is {kkt:.3g}",
            ConvergenceWarning,
            stacklevel=3,
        )
    return SolveResult(
        V=V, lam=lam, objective=problem.objective(V, lam), iterations=iterations,
        converged=converged, kkt_residual=kkt, seconds=solve_seconds, history=history,
        restarts=0, group=problem.group, dtype=dtype, device=str(problem.Z.device),
        operator="pyscnn",
    )  # fmt: skip
