"""Block coordinate proximal gradient for the gated-ReLU group lasso: the memory-lean device solver.

Solves the same problem as :mod:`convexedge.device.fista`,

    minimize_V  F(V) = 1/(2n) ||sum_i D_i Z1 V_i - Y||_F^2 + lam * sum_g ||V_g||_2
                       + mu/2 ||V - V_ref||_F^2,

``Z1 = [Z, 1]``, ``D_i = diag(masks[:, i])``, one block per gate ``V_i: (d, c)`` (the groups of both
``"gate"`` and ``"gate_output"`` lie inside one block, so the penalty is block separable). One block
step is a proximal gradient step on ``V_i`` with the others fixed,

    V_i <- prox_{lam / L_i}(V_i - g_i / L_i),   g_i = (1/n) Z1^T D_i R + mu (V_i - V_ref,i),

``L_i = lambda_max(Z1^T D_i Z1 / n) + mu`` the Lipschitz constant of the block gradient, and the
residual ``R = sum_i D_i Z1 V_i - Y: (n, c)`` is updated in place (``R += D_i Z1 dV_i``). This is
the block coordinate gradient descent of Tseng & Yun (Math. Program. 117, 2009) with cyclic order
and the exact block quadratic, as used for the group lasso by Qin, Scheinberg & Goldfarb (Math.
Program. Comput. 5, 2013); with a step of ``1/L_i`` every block step decreases ``F`` (the smooth part
is quadratic, so its block upper bound is exact).

Memory: besides ``V`` and ``R`` the solver holds the masks it is given, ``P`` block constants and
temporaries of one block (``(d, c)``) or one row chunk (``(row_chunk, c)``, ``(row_chunk, P)``); it
never forms an ``(n, P*c)`` image or a ``(P*d, P*d)`` Gram. Rows are read in ``row_chunk`` chunks.

``L_i`` comes from a few power iterations (all gates at once, one chunked pass each), which approach
``lambda_max`` from below; departure from a fixed step: each block step checks the exact decrease
condition ``||D_i Z1 dV||^2/n + mu ||dV||^2 <= L_i ||dV||^2`` on the residual update it computes
anyway, and if it fails (an underestimated ``L_i``) undoes that update, doubles ``L_i`` and retries,
so the objective never increases.

Stopping: the relative KKT residual of :func:`convexedge.device.fista.kkt_residual` (per group,
relative to ``||grad f(0)||``). During an epoch each block's residual is evaluated at the point the
block saw (a free estimate); when that estimate is at or below ``tol``, one exact pass computes every
block's gradient at the current point, and the solve stops only if the exact residual is at or below
``tol``. ``max_iter`` counts epochs (passes over every gate); hitting it, the deadline or a cancel
returns ``converged=False``. Cancellation and the deadline are checked between blocks.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from convexedge.device.fista import Group, RowData
from convexedge.device.worker import SolveOutcome, certifiable_tol, check_solve_inputs

__all__ = [
    "BcdConfig",
    "BcdState",
    "bcd_block_step_",
    "bcd_init",
    "bcd_kkt",
    "bcd_objective",
    "bcd_solve",
    "block_grad",
]

_TINY = 2.2250738585072014e-308
_SAFETY = 1.02  # margin on the power-iteration estimate of L_i (it approaches lambda_max from below)


@dataclass(frozen=True, kw_only=True)
class BcdConfig:
    """Settings of the block coordinate solver (JSON-serialisable via ``asdict``)."""

    # Stop when the exact relative KKT residual <= tol (the device FISTA's definition).
    tol: float = 1e-4
    max_iter: int = 1000  # epochs; one epoch updates every gate once
    row_chunk: int = 64  # rows per chunk (bounds the temporaries: row_chunk * max(c, P) floats)
    power_iters: int = 12  # power iterations for the block metrics (all gates at once)
    rank: int = 1  # eigenvectors per gate in the block metric (0: the plain step 1/L_i; memory d*P*rank)
    # Over-relaxation of each block step, V_i += w dV (SOR); a relaxed step is kept only when it lowers
    # F at least as much as the plain one (checked exactly), so F still decreases monotonically.
    relax: float = 1.0

    def __post_init__(self) -> None:
        tol = self.tol
        if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
        for name, lo in (("max_iter", 0), ("row_chunk", 1), ("power_iters", 1), ("rank", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not (isinstance(self.relax, (int, float)) and 1.0 <= self.relax < 2.0):
            raise ValueError(f"relax must lie in [1, 2), got {self.relax!r}")


@dataclass(eq=False)
class BcdState:
    """The solver's mutable state (updated in place by :func:`bcd_block_step_`).

    Attributes:
        data, lam, mu, anchor, chunk: the problem (``anchor: (P, d, c)`` or None) and row chunk.
        V: (P, d, c) float32 iterate.
        R: (n, c) float32 residual ``sum_i D_i Z1 V_i - Y``.
        u: (d, P, k) float32 top-``k`` eigenvectors of each gate's Gram ``H_i = Z1^T D_i Z1 / n``.
        top: (P, k), rest: (P,) float64 curvature bounds of ``H_i`` along ``u_i`` and on the complement
            (the block metric is ``Q_i = u_i diag(top_i) u_i^T + rest_i (I - u_i u_i^T) + mu I``).
        g0: ``||grad f(0)||`` over groups (the KKT normaliser).
        epoch: finished epochs; est: sum of squared block KKT residuals seen in the current epoch.
        undone: block steps retried with a doubled metric.
        relax: over-relaxation factor ``w`` of every block step; declined: relaxed steps replaced by
            the plain one because they decreased ``F`` less.
    """

    data: RowData
    lam: float
    mu: float
    anchor: np.ndarray | None
    chunk: int
    V: np.ndarray
    R: np.ndarray
    u: np.ndarray
    top: np.ndarray
    rest: np.ndarray
    g0: float = 1.0
    epoch: int = 0
    est: float = 0.0
    undone: int = 0
    relax: float = 1.0
    declined: int = 0


# ----------------------------------------------------------------------------- kernels
def _block_grad(s: BcdState, i: int, out: np.ndarray, work: np.ndarray) -> np.ndarray:
    """``g_i = (1/n) Z1^T D_i R (+ mu (V_i - V_ref,i))`` into ``out: (d, c)``; ``work: (chunk, c)``."""
    Z, m = s.data.Z, s.data.masks[:, i]
    n = Z.shape[0]
    gW, gb = out[:-1], out[-1]
    gW[...] = 0
    acc_b = np.zeros(out.shape[1], np.float64)
    for a in range(0, n, s.chunk):
        e = min(a + s.chunk, n)
        T = np.multiply(s.R[a:e], m[a:e, None], out=work[: e - a])
        gW += Z[a:e].T @ T
        acc_b += T.sum(axis=0, dtype=np.float64)
    gb[...] = acc_b
    out *= np.float32(1.0 / n)
    if s.anchor is not None:  # + mu (V_i - V_ref,i), one (d, c) temporary at a time
        out += np.float32(s.mu) * s.V[i]
        out -= np.float32(s.mu) * s.anchor[i]
    return out


def _apply(
    s: BcdState,
    i: int,
    dV: np.ndarray,
    sign: float,
    work: np.ndarray,
    nxt: int | None = None,
    gout: np.ndarray | None = None,
    work2: np.ndarray | None = None,
) -> float:
    """``R += sign * D_i Z1 dV`` in place; returns ``||D_i Z1 dV||^2``.

    With ``nxt``, the same pass also writes the gradient of block ``nxt`` at the updated residual
    into ``gout: (d, c)`` (``work2: (chunk, c)`` scratch), so a block step costs one pass, not two.
    """
    Z, m = s.data.Z, s.data.masks[:, i]
    n = Z.shape[0]
    W, b = dV[:-1], dV[-1]
    sq = 0.0
    if nxt is not None:
        assert gout is not None and work2 is not None
        mn = s.data.masks[:, nxt]
        gout[...] = 0
        acc_b = np.zeros(gout.shape[1], np.float64)
    for a in range(0, n, s.chunk):
        e = min(a + s.chunk, n)
        T = np.matmul(Z[a:e], W, out=work[: e - a])
        T += b
        T *= m[a:e, None]
        sq += float(np.dot(T.ravel(), T.ravel()))
        Ra = s.R[a:e]
        if sign > 0:
            Ra += T
        else:
            Ra -= T
        if nxt is not None:
            T2 = np.multiply(Ra, mn[a:e, None], out=work2[: e - a])
            gout[:-1] += Z[a:e].T @ T2
            acc_b += T2.sum(axis=0, dtype=np.float64)
    if nxt is not None:
        gout[-1] = acc_b
        gout *= np.float32(1.0 / n)
        if s.anchor is not None:
            gout += np.float32(s.mu) * s.V[nxt]
            gout -= np.float32(s.mu) * s.anchor[nxt]
    return sq


def _group_norms_block(B: np.ndarray, group: Group) -> np.ndarray:
    """Norms of the groups of one block ``B: (d, c)``: shape (1,) for ``"gate"``, (c,) per column."""
    if group == "gate":
        return np.sqrt(np.array([np.dot(B.ravel(), B.ravel())], np.float64))
    return np.sqrt(np.einsum("dc,dc->c", B, B, dtype=np.float64))


def _block_kkt_sq(Vi: np.ndarray, g: np.ndarray, lam: float, group: Group) -> float:
    """Squared KKT residual of one block (the definition of :func:`fista.kkt_residual`)."""
    vn = _group_norms_block(Vi, group)
    active = vn > 0
    scale = np.where(active, lam / np.where(active, vn, 1.0), 0.0).astype(np.float32)
    t = Vi * (scale[0] if group == "gate" else scale[None, :])
    t += g
    r = np.where(active, _group_norms_block(t, group), np.maximum(_group_norms_block(g, group) - lam, 0.0))
    return float(np.dot(r, r))


def _prox_root(qa: float, qb: list[float], alpha: float, lams: list[float], lam: float) -> float:
    """Root ``s > 0`` of ``h(s) = qa (s/(alpha+s))^2 + sum_j qb_j (s/(lams_j+s))^2 - lam^2``.

    ``h`` increases from ``-lam^2`` to ``qa + sum qb - lam^2 > 0``; Newton steps kept inside a
    bracket (bisection, or doubling while the bracket is open, when a step leaves it).
    """
    lo, hi = 0.0, math.inf
    tot = qa + sum(qb)
    sv = lam / math.sqrt(tot) * max(alpha, max(lams, default=alpha))  # root of the Euclidean case
    lam2 = lam * lam
    for _ in range(100):
        ra = sv / (alpha + sv)
        h = qa * ra * ra - lam2
        dh = 2.0 * qa * ra * alpha / (alpha + sv) ** 2
        for q, lj in zip(qb, lams, strict=True):
            rb = sv / (lj + sv)
            h += q * rb * rb
            dh += 2.0 * q * rb * lj / (lj + sv) ** 2
        if h < 0:
            lo = sv
        elif h > 0:
            hi = sv
        if abs(h) <= 1e-12 * lam2 or (hi < math.inf and hi - lo <= 1e-12 * hi):
            break
        step = sv - h / dh if dh > 0 else math.inf
        sv = step if lo < step < hi else (2.0 * sv + 1e-300 if hi == math.inf else 0.5 * (lo + hi))
    return sv


def _metric_prox_step(
    Vi: np.ndarray, g: np.ndarray, U: np.ndarray, lams: np.ndarray, alpha: float, lam: float, group: Group
) -> np.ndarray:
    """``argmin_X <g, X - Vi> + 1/2 <X - Vi, Q (X - Vi)> + lam sum_g ||X_g||`` for the metric
    ``Q = U diag(lams) U^T + alpha (I - U U^T)`` acting on the rows of ``Vi: (d, c)`` (``U: (d, k)``
    orthonormal, ``lams: (k,)``).

    With ``W = Vi - Q^{-1} g``, ``p = U^T W`` and ``W_perp = W - U p``, the optimality condition
    ``(Q + s I) X_g = Q W_g`` with ``s = lam / ||X_g||`` gives
    ``X_g(s) = alpha/(alpha+s) W_perp + U diag(lams/(lams+s)) p``; ``X_g = 0`` iff ``||Q W_g|| <= lam``,
    else ``s`` is the root of the increasing scalar function ``s^2 ||X_g(s)||^2 - lam^2`` (safeguarded
    Newton, per group). Returns ``X`` (a new array).
    """
    lams32 = lams.astype(np.float32)
    pg = U.T @ g  # (k, c)
    W = g * np.float32(-1.0 / alpha)
    W -= U @ (pg * (1.0 / lams32 - np.float32(1.0 / alpha))[:, None])
    W += Vi
    p = U.T @ W  # (k, c)
    W -= U @ p  # W_perp, in place
    if group == "gate":
        A = np.array([float(np.dot(W.ravel(), W.ravel()))])
        B = np.einsum("kc,kc->k", p, p, dtype=np.float64)[:, None]  # (k, 1)
    else:
        A = np.einsum("dc,dc->c", W, W, dtype=np.float64)
        B = p.astype(np.float64) ** 2  # (k, c)
    lk = lams.astype(np.float64)[:, None]
    qa, qb = alpha * alpha * A, (lk * lk) * B
    zero = qa + qb.sum(axis=0) <= lam * lam
    sv = np.zeros_like(A)
    if lam > 0:
        for j in range(A.shape[0]):  # one scalar root per group (plain floats: a few Newton steps)
            if not zero[j]:
                sv[j] = _prox_root(float(qa[j]), qb[:, j].tolist(), alpha, lams.tolist(), lam)
    ca = np.where(zero, 0.0, alpha / (alpha + sv)).astype(np.float32)  # (1,) or (c,)
    cb = np.where(zero, 0.0, lk / (lk + sv)).astype(np.float32)  # (k, 1) or (k, c)
    W *= ca[0] if group == "gate" else ca
    W += U @ (p * cb)
    return W


def _apply_gram(
    Z: np.ndarray, M: np.ndarray, v: np.ndarray, w: np.ndarray, T: np.ndarray, chunk: int
) -> None:
    """``w[:, i, :] = Z1^T D_i Z1 v[:, i, :] / n`` for every gate (one chunked pass).

    ``v, w: (d, P, k)``; ``T``: float32 scratch of at least ``chunk * P * k`` elements.
    """
    n = Z.shape[0]
    d, P, k = v.shape
    vf, wf = v.reshape(d, P * k), w.reshape(d, P * k)
    wf[...] = 0
    for a in range(0, n, chunk):
        e = min(a + chunk, n)
        t = np.matmul(Z[a:e], vf[:-1], out=T.reshape(-1)[: (e - a) * P * k].reshape(e - a, P * k))
        t += vf[-1]
        t.reshape(e - a, P, k)[...] *= M[a:e, :, None]
        wf[:-1] += Z[a:e].T @ t
        wf[-1] += t.sum(axis=0)
    wf /= np.float32(n)


def _block_metrics(
    data: RowData, chunk: int, iters: int, rank: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``rank`` eigenpairs of every gate's Gram ``H_i = Z1^T D_i Z1 / n`` (subspace iteration with
    a Rayleigh-Ritz step) and the largest eigenvalue on their complement (deflated power iteration);
    all gates share each chunked pass.

    Returns ``U: (d, P, rank)`` orthonormal per gate, ``top: (P, rank)`` Ritz values and ``rest: (P,)``
    the Rayleigh estimate of ``max_{v perp U_i} v^T H_i v``.
    """
    Z, M = data.Z, data.masks
    n, d_in = Z.shape
    d, P = d_in + 1, M.shape[1]
    rng = np.random.default_rng(0)
    ck = max(1, min(chunk, n, 4096 // max(1, P * rank)))  # keeps the (chunk, P*rank) scratch ~16 KB
    T = np.empty((ck, P * rank), np.float32)
    U = rng.standard_normal((d, P, rank)).astype(np.float32)
    W = np.empty_like(U)
    for _ in range(iters):  # subspace iteration, orthonormalised per gate
        Q = np.linalg.qr(U.transpose(1, 0, 2))[0]  # (P, d, k)
        U[...] = Q.transpose(1, 0, 2)
        _apply_gram(Z, M, U, W, T, ck)
        U[...] = W
    Q = np.linalg.qr(U.transpose(1, 0, 2))[0]
    U[...] = Q.transpose(1, 0, 2)
    _apply_gram(Z, M, U, W, T, ck)
    small = np.einsum("dpk,dpl->pkl", U, W, dtype=np.float64)  # U_i^T H_i U_i
    small = 0.5 * (small + small.transpose(0, 2, 1))
    evals, evecs = np.linalg.eigh(small)  # ascending
    U[...] = np.einsum("dpk,pkl->dpl", U, evecs.astype(np.float32))
    top = np.maximum(evals, 0.0)
    # largest curvature on the complement of span(U_i): power iteration with the projection
    v = rng.standard_normal((d, P, 1)).astype(np.float32)
    w = np.empty_like(v)
    rest = np.zeros(P)
    for _ in range(iters):
        v -= np.einsum("dpk,pk->dp", U, np.einsum("dpk,dp->pk", U, v[:, :, 0]))[:, :, None]
        nv = np.linalg.norm(v[:, :, 0], axis=0)
        nv[nv == 0] = 1.0
        v /= nv[None, :, None]
        _apply_gram(Z, M, v, w, T, ck)
        w -= np.einsum("dpk,pk->dp", U, np.einsum("dpk,dp->pk", U, w[:, :, 0]))[:, :, None]
        rest = np.einsum("dp,dp->p", v[:, :, 0], w[:, :, 0], dtype=np.float64)
        v[...] = w
    rest = np.maximum(rest, 0.0)
    return U, np.maximum(top, rest[:, None]), rest


# ----------------------------------------------------------------------------- init / step
def bcd_init(
    data: RowData,
    V0: np.ndarray | None,
    lam: float,
    config: BcdConfig,
    *,
    anchor: np.ndarray | None = None,
    mu: float = 0.0,
) -> BcdState:
    """Start at ``V0`` (zeros if None): residual, block metrics and the KKT normaliser.

    ``anchor`` (P, d, c) with ``mu > 0`` adds ``mu/2 ||V - anchor||^2`` to the objective.

    Raises:
        ValueError: ``V0`` or ``anchor`` has the wrong shape, ``lam`` or ``mu`` is negative.
    """
    P, d, c = data.shape
    check_solve_inputs((P, d, c), lam, mu, V0=V0, anchor=anchor)
    if anchor is None or mu == 0:
        anchor, mu = None, 0.0
    n = data.Z.shape[0]
    chunk = min(config.row_chunk, n)
    V = np.zeros((P, d, c), np.float32) if V0 is None else np.array(V0, dtype=np.float32, copy=True)
    u, top, rest = _block_metrics(data, chunk, config.power_iters, max(config.rank, 1))
    if config.rank == 0:  # plain block steps: one constant L_i = lambda_max(H_i)
        rest = top[:, -1].copy()
    R = np.empty((n, c), np.float32)
    s = BcdState(data, float(lam), float(mu), anchor, chunk, V, R, u, top * _SAFETY, rest * _SAFETY)
    s.relax = float(config.relax)
    work = np.empty((chunk, c), np.float32)
    g = np.empty((d, c), np.float32)
    # the KKT normaliser ||(1/n) A^T Y|| block by block: _block_grad of a state whose residual is Y
    R[...] = data.Y
    g0sq = 0.0
    plain = BcdState(data, 0.0, 0.0, None, chunk, V, R, u, top, rest)
    for i in range(P):
        g0sq += float(np.sum(_group_norms_block(_block_grad(plain, i, g, work), data.group) ** 2))
    s.g0 = max(math.sqrt(g0sq), _TINY)
    np.negative(R, out=R)  # R = sum_i D_i Z1 V_i - Y, one gate at a time
    for i in range(P):
        if V[i].any():
            _apply(s, i, V[i], 1.0, work)
    return s


def bcd_block_step_(
    s: BcdState,
    i: int,
    g: np.ndarray,
    work: np.ndarray,
    *,
    nxt: int | None = None,
    gnext: np.ndarray | None = None,
    work2: np.ndarray | None = None,
) -> bool:
    """One proximal step on gate ``i`` in the block metric, in place; returns whether ``V_i`` changed.

    ``g: (d, c)`` holds the block gradient at the current point (:func:`block_grad`); ``work: (chunk,
    c)`` is scratch. Adds the block's KKT residual at this point to ``s.est``. With ``nxt`` the
    residual pass also leaves the gradient of block ``nxt`` in ``gnext`` (valid only if this returns
    True; otherwise compute it with :func:`block_grad`).
    """
    group = s.data.group
    Vi = s.V[i]
    s.est += _block_kkt_sq(Vi, g, s.lam, group)
    if not Vi.any() and float(_group_norms_block(g, group).max()) <= s.lam:
        return False  # a zero block stays zero (its prox returns zero)
    Ui = s.u[:, i, :]
    while True:
        lams = s.top[i] + s.mu
        alpha = float(s.rest[i]) + s.mu
        if float(lams.max()) <= 0:
            return False  # the gate is active on no row and unanchored: nothing to do
        alpha = max(alpha, 1e-12 * float(lams.max()))
        lams = np.maximum(lams, alpha)
        dV = _metric_prox_step(Vi, g, Ui, lams, alpha, s.lam, group)
        dV -= Vi
        dd = float(np.dot(dV.ravel(), dV.ravel()))
        if dd == 0.0:
            return False
        pu = Ui.T @ dV  # (k, c)
        budget = alpha * dd + float(np.dot(lams - alpha, np.einsum("kc,kc->k", pu, pu, dtype=np.float64)))
        w = s.relax
        sq = _apply(s, i, dV if w == 1.0 else dV * np.float32(w), 1.0, work, nxt, gnext, work2) / (w * w)
        q = sq / s.data.Z.shape[0] + s.mu * dd  # the smooth part's curvature along dV
        if q <= budget * (1.0 + 1e-4) + 1e-30:  # the metric majorises the block: the w = 1 step decreases F
            if w != 1.0:
                # over-relaxed step (SOR): keep it only if F(V + w dV) <= F(V + dV), both exact
                gd = float(np.dot(g.ravel(), dV.ravel()))
                p0 = float(_group_norms_block(Vi, group).sum())
                f1 = gd + 0.5 * q + s.lam * (float(_group_norms_block(Vi + dV, group).sum()) - p0)
                fw = (
                    w * gd
                    + 0.5 * w * w * q
                    + s.lam * (float(_group_norms_block(Vi + w * dV, group).sum()) - p0)
                )
                if fw > f1:
                    _apply(s, i, dV * np.float32(1.0 - w), 1.0, work)  # back to the plain step
                    Vi += dV
                    s.declined += 1
                    return False  # gnext is stale
                dV *= np.float32(w)
            Vi += dV
            if nxt is not None and s.anchor is not None and nxt == i:
                assert gnext is not None
                gnext += np.float32(s.mu) * dV  # the anchor term of block nxt moved with V_i
            return True
        _apply(s, i, dV * np.float32(w), -1.0, work)  # the metric was too small: undo, double it
        s.top[i] *= 2.0
        s.rest[i] *= 2.0
        s.undone += 1


def block_grad(s: BcdState, i: int, g: np.ndarray, work: np.ndarray) -> np.ndarray:
    """Gradient of the smooth part with respect to ``V_i`` at the current point, into ``g: (d, c)``."""
    return _block_grad(s, i, g, work)


def bcd_objective(s: BcdState) -> float:
    """``F(V)`` at the state's iterate (from the maintained residual)."""
    n = s.data.Z.shape[0]
    f = float(np.dot(s.R.ravel(), s.R.ravel())) / (2.0 * n)
    pen = sum(float(_group_norms_block(s.V[i], s.data.group).sum()) for i in range(s.V.shape[0]))
    f += s.lam * pen
    if s.anchor is not None:
        for i in range(s.V.shape[0]):
            t = s.V[i] - s.anchor[i]
            f += 0.5 * s.mu * float(np.dot(t.ravel(), t.ravel()))
    return f


def bcd_kkt(s: BcdState, g: np.ndarray | None = None, work: np.ndarray | None = None) -> float:
    """Exact relative KKT residual at the current iterate (one gradient pass per gate)."""
    P, d, c = s.V.shape
    g = np.empty((d, c), np.float32) if g is None else g
    work = np.empty((s.chunk, c), np.float32) if work is None else work
    tot = 0.0
    for i in range(P):
        tot += _block_kkt_sq(s.V[i], _block_grad(s, i, g, work), s.lam, s.data.group)
    return math.sqrt(tot) / s.g0


def bcd_solve(
    train: RowData,
    V0: np.ndarray,
    lam: float,
    config: BcdConfig,
    group: str | None = None,
    *,
    anchor_mu: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
    deadline: float = float("inf"),
    on_iter: Callable[[int, float, float], None] | None = None,
) -> SolveOutcome:
    """Cyclic block coordinate descent from ``V0`` until the KKT tolerance, ``max_iter`` epochs,
    ``should_stop()`` or ``deadline`` (both checked between blocks).

    The same contract as :func:`convexedge.device.worker.solve`: ``anchor_mu > 0`` adds
    ``anchor_mu/2 ||V - V0||^2``; ``on_iter(epoch, objective, kkt)`` runs after every epoch (``kkt``
    is the per-block estimate unless the exact test ran); the outcome's ``iterations`` counts epochs
    and its ``step`` is NaN (no global step).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((64, 3)).astype(np.float32)
        >>> masks = np.stack([np.ones(64, bool), Z[:, 0] >= 0], axis=1)  # linear path + one gate
        >>> data = RowData(Z, np.maximum(Z[:, :2], 0), masks)
        >>> out = bcd_solve(data, np.zeros((2, 4, 2), np.float32), 1e-3, BcdConfig(tol=1e-5))
        >>> bool(out.converged)
        True
    """
    ts = time.perf_counter()
    if group is not None and group != train.group:
        train = RowData(train.Z, train.Y, train.masks, group)  # type: ignore[arg-type]
    s = bcd_init(train, V0, lam, config, anchor=V0, mu=anchor_mu)
    P, d, c = s.V.shape
    g, gn = np.empty((d, c), np.float32), np.empty((d, c), np.float32)
    work, work2 = np.empty((s.chunk, c), np.float32), np.empty((s.chunk, c), np.float32)
    tol = certifiable_tol(config.tol, anchor_mu, V0, s.g0)
    kkt = bcd_kkt(s, g, work)
    converged = kkt <= tol
    cancelled = False
    have_g = False  # g holds block i's gradient at the current point (left by the previous pass)
    while not converged and s.epoch < config.max_iter:
        s.est = 0.0
        stopped = False
        for i in range(P):
            if should_stop():
                cancelled = stopped = True
                break
            if time.perf_counter() >= deadline:
                stopped = True
                break
            if not have_g:
                _block_grad(s, i, g, work)
            nxt = (i + 1) % P
            have_g = bcd_block_step_(s, i, g, work, nxt=nxt, gnext=gn, work2=work2)
            if have_g:
                g, gn = gn, g
        if stopped:
            break
        s.epoch += 1
        est = math.sqrt(s.est) / s.g0
        if est <= tol:
            kkt = bcd_kkt(s, gn, work)
            converged = kkt <= tol
        else:
            kkt = est
        if on_iter is not None:
            on_iter(s.epoch, bcd_objective(s), kkt)
    if not converged and not cancelled:
        kkt = bcd_kkt(s, gn, work)  # report the exact residual at the returned point (still not converged)
    return SolveOutcome(s.V, s.epoch, kkt, converged, float("nan"), cancelled, time.perf_counter() - ts)
