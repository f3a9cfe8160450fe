"""The block-Jacobi metric of FISTA's proximal step (``FistaConfig(metric="block")``).

A proximal-gradient step in a fixed metric ``M`` (positive definite) is

    x+ = argmin_x  <grad f(y), x - y> + ||x - y||_M^2 / (2 s) + lam R(x),

the "variable metric" forward-backward step (e.g. Combettes & Vu, "Variable metric forward-backward
splitting with applications to monotone inclusions in duality", Optimization 2014; with a fixed
``M`` FISTA's analysis carries over unchanged in the inner product ``<u, v>_M``, so its O(1/k^2)
rate holds with the Lipschitz constant of ``grad f`` measured in ``M``, i.e. ``lambda_max(M^-1 H)``).

Here ``M = blockdiag_i(H_i)`` with ``H_i = Z^T D_i Z / n``, the diagonal (gate) blocks of the
Hessian ``H = A^T A / n``. Real activations have strongly correlated features, so ``H_i`` is badly
conditioned and the Euclidean step (``M = L I``) crawls along its small eigen-directions; the block
metric removes the within-gate conditioning and leaves only the coupling between gates
(``lambda_max(M^-1 H) <= P``, usually a few). ``python -m benchmarks.solver_metric`` compares
the two metrics on the solver benchmark's problems.

The prox stays exact because every group norm is invariant under a rotation of its gate's
``d`` coordinates: with ``H_i = Q_i diag(w_i) Q_i^T`` and ``u~ = Q_i^T u``, each group's problem is

    min_z  1/2 sum_k (w_k / s) (z_k - u~_k)^2 + lam ||z||,

whose solution is ``z = 0`` if ``||a|| <= lam`` (``a_k = w_k u~_k / s``) and otherwise
``z_k = a_k / (w_k / s + sigma)`` where ``sigma = lam / ||z||`` is the one root of the increasing
scalar function ``sigma ||z(sigma)|| - lam`` (a "secular equation", as in trust-region subproblems),
solved in float64 by safeguarded Newton on the equivalent
``phi(sigma) = 1 / ||z(sigma)|| - sigma / lam``.
As in Moré & Sorensen ("Computing a trust region step", SIAM J. Sci. Stat. Comput. 1983), the
reciprocal norm is concave and close to linear in ``sigma`` (exactly linear when all ``w_k`` are
equal), so Newton started from the upper bracket end converges from the right, in about 5
iterations on real activations where Newton on ``sigma ||z|| - lam`` took about 9
(``python -m benchmarks.solver_prox`` times it against bisection on recorded real calls).
For the ``gate`` form (one group per ``V_i``, ``d x c``) the same holds with ``u~_k`` a row of ``c`` values.

Eigenvalues are floored at ``floor * max_k w_k`` (a gate that sees few rows, or collinear features,
would otherwise give a singular metric); the floor changes the metric, never the objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from convexedge.host.solvers.problem import Group, _broadcast_groups, group_norms

__all__ = ["BlockMetric", "prox_in_metric", "secular_bracket"]

_NEWTON_ITERS = 60  # safeguarded Newton-bisection iterations of the secular equation (at most)


@dataclass(frozen=True)
class BlockMetric:
    """``M = blockdiag_i(Q_i diag(w_i) Q_i^T)`` from the gate blocks of ``A^T A / n``.

    Attributes:
        Q: (P, d, d) eigenvectors, in the problem's dtype.
        w: (P, d) floored eigenvalues, float64.
        floor: the relative floor used.
    """

    Q: torch.Tensor
    w: torch.Tensor
    floor: float

    @classmethod
    def from_blocks(cls, H: torch.Tensor, floor: float, dtype: torch.dtype) -> BlockMetric:
        """From the (P, d, d) blocks ``H_i`` (any float dtype; symmetrised, decomposed in float64)."""
        H = H.to(torch.float64)
        w, Q = torch.linalg.eigh(0.5 * (H + H.transpose(1, 2)))
        top = float(w.max()) if w.numel() else 0.0
        w = w.clamp_min(max(floor * top, torch.finfo(torch.float64).tiny))
        return cls(Q=Q.to(dtype), w=w, floor=floor)

    def rotate(self, V: torch.Tensor) -> torch.Tensor:
        """``Q_i^T V_i`` for every gate: (P, d, c) -> (P, d, c)."""
        return torch.bmm(self.Q.transpose(1, 2), V)

    def unrotate(self, V: torch.Tensor) -> torch.Tensor:
        """``Q_i V_i`` for every gate (the inverse of :meth:`rotate`)."""
        return torch.bmm(self.Q, V)

    def weights(self, dtype: torch.dtype) -> torch.Tensor:
        """The eigenvalues as (P, d, 1) in ``dtype`` (to scale rotated (P, d, c) arrays)."""
        return self.w.to(dtype)[:, :, None]

    def solve(self, V: torch.Tensor) -> torch.Tensor:
        """``M^-1 V``."""
        return self.unrotate(self.rotate(V) / self.weights(V.dtype))


def secular_bracket(u: torch.Tensor, w: torch.Tensor, thresh: float, group: Group):
    """The float64 pieces of the prox's secular equation (see :func:`prox_in_metric`).

    ``psi(sigma) = sigma ||z(sigma)|| - thresh`` is increasing; between its roots for ``w == wmin``
    and ``w == wmax`` (bounds on ``||z||``) lies the true one.

    Returns:
        ``(W, a, active, lo, hi)``: ``W`` the weights as (P, d, 1), ``a = W u``, the groups that
        are not thresholded to zero, and the bracket of ``sigma`` per group (any finite one for an
        inactive group).
    """
    W = w.to(torch.float64)[:, :, None]
    a = W * u.to(torch.float64)
    na = group_norms(a, group)
    active = na > thresh
    wmin, wmax = w.min(dim=1).values, w.max(dim=1).values
    if group == "gate_output":
        wmin, wmax = wmin[:, None], wmax[:, None]
    gap = torch.where(active, na - thresh, 1.0)
    return W, a, active, thresh * wmin / gap, thresh * wmax / gap


def prox_in_metric(u: torch.Tensor, w: torch.Tensor, thresh: float, group: Group) -> torch.Tensor:
    """``argmin_z sum_k w_k/2 (z_k - u_k)^2 + thresh sum_g ||z_g||`` (rotated coordinates).

    With ``w`` constant this is the group soft threshold :func:`~convexedge.host.solvers.problem.prox_group`
    with threshold ``thresh / w``. Groups with ``||w u||_g <= thresh`` come back exactly zero.

    Args:
        u: (P, d, c) point (any float dtype; the result has the same dtype).
        w: (P, d) positive weights (float64).
        thresh: ``>= 0``.
        group: ``"gate"`` or ``"gate_output"``.

    Returns:
        (P, d, c).
    """
    W, a, active, lo, hi = secular_bracket(u, w, thresh, group)
    # Newton runs on the concave phi = 1/||z|| - sigma/thresh (same root, same sign as -psi) from
    # the upper end, where it decreases monotonically to the root; the bracket only guards against
    # rounding.
    sigma = hi.clone()
    a2 = a * a

    def group_sum(x: torch.Tensor) -> torch.Tensor:
        return x.sum(dim=(1, 2)) if group == "gate" else x.sum(dim=1)

    finished = ~active
    for _ in range(_NEWTON_ITERS):
        den = W + _broadcast_groups(sigma, group)
        q = a2 / (den * den)
        r2 = group_sum(q)
        r = r2.sqrt()
        psi = sigma * r - thresh
        finished = finished | (psi.abs() <= 1e-14 * thresh) | (hi - lo <= 1e-15 * hi)
        if bool(finished.all()):
            break
        lo = torch.where(psi < 0, sigma, lo)
        hi = torch.where(psi > 0, sigma, hi)
        # phi' = sum_k(a_k^2 / den_k^3) / ||z||^3 - 1 / thresh
        dphi = group_sum(q / den) / (r2 * r) - 1.0 / thresh
        step = sigma - (1.0 / r - sigma / thresh) / dphi
        inside = (step > lo) & (step < hi) & torch.isfinite(step)
        new = torch.where(inside, step, 0.5 * (lo + hi))
        finished = finished | (new == sigma)
        sigma = torch.where(finished, sigma, new)
    z = a / (W + _broadcast_groups(sigma, group))
    return torch.where(_broadcast_groups(active, group), z, 0.0).to(u.dtype)
