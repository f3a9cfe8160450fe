"""convexedge.host.solvers: convex solvers for the gated-ReLU student.

Contract: :class:`GatedProblem` holds ``Z: (n, d)``, ``Y: (n, c)``, ``masks: (n, P)`` (validated
once by :meth:`GatedProblem.from_arrays`) and applies the operator ``A(V) = sum_i D_i Z V_i`` and its
adjoint in row chunks; :func:`solve` minimises ``1/(2n) ||A(V) - Y||_F^2 + lam * sum_g ||V_g||_2``
(groups per gate, or per gate and output column) with ``method="fista"`` (ours), ``"adam"``
(proximal Adam, the baseline) or ``"pyscnn"`` (an adapter to pyscnn's R-FISTA), and returns a
:class:`SolveResult` whose
``converged`` flag and ``kkt_residual`` certificate say how good ``V`` is; non-convergence is a
``ConvergenceWarning``, never an exception. :func:`fista_init` / :func:`fista_step` expose the
solver as pure functions over a :class:`FistaState` so a caller can run a few iterations and resume;
:func:`solve_path` solves a decreasing ``lam`` path with warm starts and strong-rule screening;
:func:`newton_polish` drives an answer to a tight KKT residual (active-set Newton, float64).
FISTA's proximal step can use the block-Jacobi metric of the gates' Hessian blocks
(``FistaConfig(metric="block")``, the default with the Gram operator; :mod:`.metric`).
Both take ``checkpoint=SolverCheckpoint(folder)`` to save and resume their state, and run data
parallel on a problem built with a reduction hook (``GatedProblem(..., comm=...)``).
Everything runs in torch on the tensors' device (CPU or CUDA).
"""

from convexedge.host.solvers.adam import AdamConfig
from convexedge.host.solvers.checkpoint import SolverCheckpoint
from convexedge.host.solvers.fista import (
    FistaConfig,
    FistaState,
    SolveResult,
    fista_init,
    fista_step,
    kkt_residual,
    solve,
)
from convexedge.host.solvers.newton import NewtonConfig, newton_polish
from convexedge.host.solvers.path import solve_path
from convexedge.host.solvers.problem import GatedProblem, group_norms, prox_group
from convexedge.host.solvers.scnn_adapter import PyscnnConfig

__all__ = [
    "AdamConfig",
    "FistaConfig",
    "FistaState",
    "GatedProblem",
    "NewtonConfig",
    "PyscnnConfig",
    "SolveResult",
    "SolverCheckpoint",
    "fista_init",
    "fista_step",
    "group_norms",
    "kkt_residual",
    "newton_polish",
    "prox_group",
    "solve",
    "solve_path",
]
