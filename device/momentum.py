"""Proximal heavy-ball: the device solver that is both fast and small (two V-sized arrays).

Solves the problem of :mod:`convexedge.device.fista`,

    minimize_V  F(V) = 1/(2n) ||sum_i D_i Z1 V_i - Y||_F^2 + mu/2 ||V - V_ref||_F^2 + lam sum_g ||V_g||_2,

with the inertial proximal gradient step (Polyak's heavy ball with a proximal map; the iPiano method
of Ochs, Chen, Brox & Pock, SIAM J. Imaging Sci. 7(2), 2014):

    V_{k+1} = prox_{s lam}(V_k - s grad f(V_k) + beta (V_k - V_{k-1})).

Why heavy ball on a device: the gradient is taken at ``V_k`` itself, so one pass over the rows can
add ``-s grad f(V_k)`` straight into the array that held ``V_{k-1}`` after it became
``V_k + beta (V_k - V_{k-1})``. The solver holds ``V_k``, that one other array, the gate masks and one
row chunk; FISTA needs at least four V-sized arrays (``x``, ``y``, a gradient, the previous ``x``)
and block coordinate descent (:mod:`convexedge.device.bcd`) an ``(n, c)`` residual and many more
passes.

Parameters: ``L`` (the largest eigenvalue of the smooth part's Hessian ``A^T A / n + mu I``) from
power iteration on an ``n``-vector (the operator acts the same way on every output column), times
``safety``; ``m = mu`` (the anchor makes the problem ``mu``-strongly convex; with ``mu = 0`` the
estimate ``L / max_condition`` is used). The step and momentum are Polyak's for the condition
number ``kappa = L / m``: ``s = 4 / (sqrt(L) + sqrt(m))^2``, ``beta = ((sqrt(kappa) - 1) /
(sqrt(kappa) + 1))^2`` (the optimal rate ``(sqrt(kappa) - 1) / (sqrt(kappa) + 1)`` on quadratics).

Deliberate departures, each marked in the code:

* Polyak's constants lie outside iPiano's proven range (``s < 2 (1 - beta) / L``). Safeguard: when
  ``F(V_k) > F(V_{k-1})`` the next step is a plain proximal gradient step (``beta = 0``, ``s = 1/L``,
  which cannot increase ``F`` as long as ``L`` bounds the true constant: hence ``safety``); after
  ``max_restarts`` of those the solver switches for good to ``beta = 0.4, s = 1/L``, inside
  iPiano's convergence guarantee.
* Stopping uses the exact relative KKT residual of :func:`convexedge.device.fista.kkt_residual`, but
  only at *check* steps: a heavy-ball step never holds ``grad f(V_k)`` on its own (it is added into
  the momentum array). When the cheap fixed-point residual ``||V_{k+1} - V_k|| / s`` falls to
  ``check_factor * tol`` (relative to ``||grad f(0)||``; it runs a few times above the KKT residual),
  the next step is a check step: the other array is zeroed, the pass
  accumulates the bare gradient, the exact KKT residual at ``V_k`` is computed, and the step is
  completed as a plain proximal gradient step (so a check costs no extra pass, only one step's
  momentum). The solve stops when a check passes.

Memory (float32): ``V_k`` and the second array in ``(d, P, c)`` layout (so one GEMM per row chunk
covers every gate), one ``(row_chunk, P c)`` chunk, ``(row_chunk, c)`` residual, ``O(n + d P)`` for
the power iteration; the gradient's GEMM accumulates in place through BLAS ``sgemm`` (``beta = 1``),
so no V-sized temporary is ever created. The result is handed back in ``(P, d, c)`` layout (one
copy, after the second array is released).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy.linalg import blas

from convexedge.device.fista import Group, RowData
from convexedge.device.worker import SolveOutcome, certifiable_tol, check_solve_inputs

__all__ = ["MomentumConfig", "lipschitz", "momentum_solve"]

_TINY = 2.2250738585072014e-308


@dataclass(frozen=True, kw_only=True)
class MomentumConfig:
    """Settings of the heavy-ball solver (JSON-serialisable via ``asdict``)."""

    tol: float = 1e-4  # exact relative KKT residual at a check step (the device FISTA's definition)
    max_iter: int = 1000
    # rows per chunk: bounds the temporaries to row_chunk * P * c floats (48: an mcu head's whole
    # refit stays under 128 KB; larger chunks are a little faster)
    row_chunk: int = 48
    # power iterations for L (from below, hence `safety`); on the benchmark heads 5 already give
    # lambda_max to 4 digits (the top eigenvector, the features' mean direction, is well separated)
    power_iters: int = 10
    safety: float = 1.05  # L is the power-iteration estimate times this
    max_condition: float = 1e4  # kappa used when there is no anchor (mu = 0)
    max_restarts: int = 20  # objective increases tolerated before the safe parameters take over
    # a check step (exact KKT) follows once ||V_{k+1} - V_k|| / s <= check_factor * tol * ||grad f(0)||
    check_factor: float = 4.0  # measured: the fixed-point residual runs ~4-8x above the KKT residual

    def __post_init__(self) -> None:
        if not (isinstance(self.tol, (int, float)) and math.isfinite(self.tol) and self.tol >= 0):
            raise ValueError(f"tol must be a finite number >= 0, got {self.tol!r}")
        for name, lo in (("max_iter", 0), ("row_chunk", 1), ("power_iters", 1), ("max_restarts", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not (isinstance(self.safety, (int, float)) and 1.0 <= self.safety <= 4.0):
            raise ValueError(f"safety must lie in [1, 4], got {self.safety!r}")
        if not (isinstance(self.check_factor, (int, float)) and 0 < self.check_factor < math.inf):
            raise ValueError(f"check_factor must be a finite number > 0, got {self.check_factor!r}")
        if not (isinstance(self.max_condition, (int, float)) and self.max_condition > 1):
            raise ValueError(f"max_condition must be > 1, got {self.max_condition!r}")


# ----------------------------------------------------------------------------- kernels
def lipschitz(data: RowData, iters: int, chunk: int = 64, seed: int = 0) -> float:
    """``lambda_max(A^T A) / n`` by power iteration on ``u in R^n`` with ``A A^T u = sum_i D_i Z1 Z1^T
    D_i u`` (the same for every output column); approaches the true value from below.

    Temporaries: two ``(n,)`` vectors, ``(d, P)`` and a few ``(chunk, P)`` arrays."""
    Z, M = data.Z, data.masks
    n, d_in = Z.shape
    P = M.shape[1]
    u = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    w = np.empty(n, np.float32)
    W = np.empty((d_in + 1, P), np.float32)
    Mc = np.empty((min(chunk, n), P), np.float32)
    Mu = np.empty_like(Mc)
    lam = 0.0
    for _ in range(iters):
        nu = float(np.linalg.norm(u))
        if nu == 0:
            return 0.0
        u /= np.float32(nu)
        W[...] = 0
        for a in range(0, n, chunk):  # W = Z1^T (M * u)
            e = min(a + chunk, n)
            mc, mu_ = Mc[: e - a], Mu[: e - a]
            np.copyto(mc, M[a:e])
            np.multiply(mc, u[a:e, None], out=mu_)
            W[:-1] += Z[a:e].T @ mu_
            W[-1] += mu_.sum(axis=0)
        for a in range(0, n, chunk):  # w = sum_i m_i * (Z1 W_i)
            e = min(a + chunk, n)
            mc, t = Mc[: e - a], Mu[: e - a]
            np.copyto(mc, M[a:e])
            np.matmul(Z[a:e], W[:-1], out=t)
            t += W[-1]
            np.einsum("rp,rp->r", t, mc, out=w[a:e])
        lam = float(np.dot(u, w))
        u, w = w, u
    return max(lam, 0.0) / n


def _norms(X: np.ndarray, group: Group) -> np.ndarray:
    """Group norms of ``X: (d, P, c)``: (P,) for ``"gate"``, (P, c) for ``"gate_output"``."""
    # float32 products summed by einsum (a float64 dtype here would cast a copy of X)
    if group == "gate":
        return np.sqrt(np.einsum("dpc,dpc->p", X, X).astype(np.float64))
    return np.sqrt(np.einsum("dpc,dpc->pc", X, X).astype(np.float64))


def _bcast(s: np.ndarray, group: Group) -> np.ndarray:
    return (s[None, :, None] if group == "gate" else s[None, :, :]).astype(np.float32)


def _prox_(X: np.ndarray, thresh: float, group: Group) -> np.ndarray:
    """Group soft threshold of ``X`` in place; returns the group norms of the result."""
    nv = _norms(X, group)
    scale = np.maximum(0.0, 1.0 - thresh / np.maximum(nv, _TINY))
    sc = scale.astype(np.float32)
    for p in range(X.shape[1]):  # per gate slice: a broadcast over all of X would allocate buffers
        X[:, p, :] *= sc[p] if group == "gate" else sc[p][None, :]
    return nv * scale


def _kkt(x: np.ndarray, g: np.ndarray, lam: float, group: Group, g0: float, w: np.ndarray) -> float:
    """:func:`convexedge.device.fista.kkt_residual` for ``(d, P, c)`` arrays (``g``: the gradient;
    ``w: (d, c)`` scratch)."""
    vn = _norms(x, group)
    active = vn > 0
    gn = _norms(g, group)
    scale = _bcast(np.where(active, lam / np.where(active, vn, 1.0), 0.0), group)
    P = x.shape[1]
    sq = np.zeros(vn.shape)
    for p in range(P):  # || g_p + lam x_p / ||x_p|| || per gate slice, in the scratch
        np.multiply(x[:, p, :], scale[:, p, :], out=w)
        w += g[:, p, :]
        sq[p] = float(np.dot(w.ravel(), w.ravel())) if group == "gate" else np.einsum("dc,dc->c", w, w)
    r = np.where(active, np.sqrt(sq), np.maximum(gn - lam, 0.0))
    return float(np.linalg.norm(r)) / max(g0, _TINY)


def _accumulate(
    data: RowData, x: np.ndarray | None, out: np.ndarray, alpha: float, T: np.ndarray, Rb: np.ndarray
) -> float:
    """One pass over the rows: ``out += alpha * Z1^T (D (pred(x) - Y))`` (``x=None``: ``pred = 0``),
    returning ``||pred(x) - Y||^2``. ``x, out: (d, P, c)``; ``T: (chunk, P c)``, ``Rb: (chunk, c)``."""
    Z, Y, M = data.Z, data.Y, data.masks
    n = Z.shape[0]
    d, P, c = out.shape
    chunk = T.shape[0]
    o2 = out.reshape(d, P * c)
    oT = o2[:-1].T  # (P c, d - 1), Fortran-contiguous: BLAS accumulates into it in place
    x2 = None if x is None else x.reshape(d, P * c)
    sse = 0.0
    acc_b = np.zeros(P * c, np.float32)
    for a in range(0, n, chunk):
        e = min(a + chunk, n)
        r = e - a
        R = Rb[:r]
        T3 = T[:r].reshape(r, P, c)
        # the chunk's masks as float32; the masked sums and outer products below are batched
        # matmul / einsum, which (unlike broadcasting ufuncs) allocate no iterator buffers
        Mc = M[a:e].astype(np.float32)
        if x2 is None:
            np.negative(Y[a:e], out=R)
        else:
            # T = Z1 x: the bias rows copied in, then sgemm adds Z x2 in place (a broadcasting
            # `T += bias` would allocate ufunc buffers as large as T)
            np.copyto(T[:r], x2[-1])
            blas.sgemm(1.0, x2[:-1].T, Z[a:e].T, beta=1.0, c=T[:r].T, overwrite_c=1)
            np.matmul(Mc[:, None, :], T3, out=R[:, None, :])  # R = sum_i m_i * (Z1 V_i)
            R -= Y[a:e]
        sse += float(np.dot(R.ravel(), R.ravel()))
        np.einsum("rp,rc->rpc", Mc, R, out=T3)  # T3[:, i] = m_i * R
        # oT += alpha * T^T Z  (sgemm with beta = 1 writes into oT: no (d, P c) temporary)
        # (F-contiguous views of the C-contiguous chunks: no copies on the way into BLAS)
        res = blas.sgemm(alpha, T[:r].T, Z[a:e].T, beta=1.0, c=oT, trans_b=1, overwrite_c=1)
        if res is not oT and not np.shares_memory(res, oT):  # pragma: no cover - BLAS copied
            oT[...] = res
        acc_b += T[:r].sum(axis=0)  # float32 (a float64 dtype would cast the chunk)
    acc_b *= np.float32(alpha)
    o2[-1] += acc_b
    return sse


def _diff_sq(x: np.ndarray, ref: np.ndarray | None, w: np.ndarray) -> float:
    """``||x - ref||^2`` gate slice by gate slice in the scratch ``w: (d, c)`` (0 without ``ref``)."""
    if ref is None:
        return 0.0
    tot = 0.0
    for p in range(x.shape[1]):
        np.subtract(x[:, p, :], ref[:, p, :], out=w)
        tot += float(np.dot(w.ravel(), w.ravel()))
    return tot


def _add_anchor_grad_(g: np.ndarray, x: np.ndarray, ref: np.ndarray | None, mu: float, w: np.ndarray) -> None:
    """``g += mu (x - ref)`` gate slice by gate slice (nothing without ``ref``)."""
    if ref is None:
        return
    for p in range(x.shape[1]):
        np.subtract(x[:, p, :], ref[:, p, :], out=w)
        w *= np.float32(mu)
        g[:, p, :] += w


def _objective(
    sse: float, n: int, x: np.ndarray, ref: np.ndarray | None, w: np.ndarray, mu: float, lam: float,
    group: Group,
) -> float:  # fmt: skip
    """``F(x)`` from the pass's sum of squared residuals."""
    return sse / (2 * n) + 0.5 * mu * _diff_sq(x, ref, w) + lam * float(_norms(x, group).sum())


def _exact_kkt(
    data: RowData, x: np.ndarray, b: np.ndarray, T: np.ndarray, Rb: np.ndarray, w: np.ndarray,
    ref: np.ndarray | None, mu: float, lam: float, group: Group, g0: float,
) -> tuple[float, float]:  # fmt: skip
    """Leave the bare gradient at ``x`` in ``b``; return (relative KKT residual, ``F(x)``)."""
    b[...] = 0
    sse = _accumulate(data, x, b, 1.0 / data.n, T, Rb)
    _add_anchor_grad_(b, x, ref, mu, w)
    return _kkt(x, b, lam, group, g0, w), _objective(sse, data.n, x, ref, w, mu, lam, group)


# ----------------------------------------------------------------------------- solve
def momentum_solve(
    train: RowData,
    V0: np.ndarray,
    lam: float,
    config: MomentumConfig,
    group: str | None = None,
    *,
    anchor_mu: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
    deadline: float = float("inf"),
    on_iter: Callable[[int, float, float], None] | None = None,
) -> SolveOutcome:
    """Proximal heavy ball from ``V0`` until an exact KKT check passes, ``max_iter``, ``should_stop()``
    or ``deadline`` (both checked between iterations).

    The contract of :func:`convexedge.device.worker.solve`: ``anchor_mu > 0`` adds
    ``anchor_mu/2 ||V - V0||^2``; ``on_iter(iteration, F(V_k), kkt)`` runs after every iteration
    (``kkt`` is the last exact value, ``nan`` before the first check). A solve that stops without
    a passed check reports the exact residual of the returned point (one extra pass).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((64, 3)).astype(np.float32)
        >>> masks = np.stack([np.ones(64, bool), Z[:, 0] >= 0], axis=1)
        >>> data = RowData(Z, np.maximum(Z[:, :2], 0), masks)
        >>> V0 = np.zeros((2, 4, 2), np.float32)
        >>> out = momentum_solve(data, V0, 1e-3, MomentumConfig(tol=1e-5), anchor_mu=0.1)
        >>> bool(out.converged)
        True
    """
    ts = time.perf_counter()
    grp: Group = group or train.group  # type: ignore[assignment]
    if grp not in ("gate", "gate_output"):
        raise ValueError(f"group must be 'gate' or 'gate_output', got {grp!r}")
    P, d, c = train.shape
    check_solve_inputs((P, d, c), lam, anchor_mu, "anchor_mu", V0=V0)
    n = train.n
    mu = float(anchor_mu)
    ref = V0.transpose(1, 0, 2) if mu > 0 else None  # a view: (d, P, c)
    chunk = max(1, min(config.row_chunk, n))
    # L first, before the solver's arrays exist: its temporaries then never add to theirs, so it can
    # take larger row chunks ((rows, P) arrays: 8 KB each at 256 rows and P = 8)
    L = config.safety * lipschitz(train, config.power_iters, max(chunk, 256)) + mu
    if L <= 0:  # no data signal at all (every mask empty and no anchor)
        L = 1.0
    flat = np.empty(max(chunk * P * c, d * c), np.float32)
    T = flat[: chunk * P * c].reshape(chunk, P * c)  # one row chunk's (rows, P c) image
    w = flat[: d * c].reshape(d, c)  # scratch of one gate slice (T is idle between passes)
    Rb = np.empty((chunk, c), np.float32)
    # V_k in (d, P, c) layout; always a copy (with P = 1 the transposed V0 is already contiguous,
    # and ascontiguousarray would hand back a view of the caller's V0, which is also the anchor)
    x = np.array(V0.transpose(1, 0, 2), dtype=np.float32, order="C", copy=True)
    b = np.zeros_like(x)  # V_{k-1}, then the next iterate under construction
    _accumulate(train, None, b, 1.0 / n, T, Rb)  # b = -(1/n) A^T Y = grad f(0) of the loss
    g0 = float(np.linalg.norm(_norms(b, grp)))
    tol = certifiable_tol(config.tol, mu, V0, g0)
    m = mu if mu > 0 else L / config.max_condition
    sq_kappa = math.sqrt(L / m)
    s_fast = 4.0 / (math.sqrt(L) + math.sqrt(m)) ** 2  # Polyak's constants (outside iPiano's range)
    b_fast = ((sq_kappa - 1.0) / (sq_kappa + 1.0)) ** 2
    s_safe, b_safe = 1.0 / L, 0.4  # iPiano: s < 2 (1 - beta) / L

    it, restarts, kkt, converged, cancelled = 0, 0, float("nan"), False, False
    check, plain_next = False, True  # V_{-1} = V_0: the first step is a plain one
    f_prev = math.inf
    while it < config.max_iter:
        if should_stop():
            cancelled = True
            break
        if time.perf_counter() >= deadline:
            break
        if check:  # exact KKT at V_k, then a plain proximal gradient step from it
            s = s_safe
            kkt, fx = _exact_kkt(train, x, b, T, Rb, w, ref, mu, lam, grp, g0)
            if kkt <= tol:
                converged = True
                break
            b *= np.float32(-s)
            b += x  # b = x - s grad f(x)
        else:
            s, beta = (s_fast, b_fast) if restarts <= config.max_restarts else (s_safe, b_safe)
            if plain_next:
                s, beta = s_safe, 0.0
            # b <- x + beta (x - b) - s mu (x - ref), gate slice by gate slice
            b *= np.float32(-beta)
            for p in range(P):
                np.multiply(x[:, p, :], np.float32(1.0 + beta - s * mu), out=w)
                b[:, p, :] += w
                if ref is not None:
                    np.multiply(ref[:, p, :], np.float32(s * mu), out=w)
                    b[:, p, :] += w
            sse = _accumulate(train, x, b, -s / n, T, Rb)  # b -= s (1/n) A^T (A x - Y)
            fx = _objective(sse, n, x, ref, w, mu, lam, grp)
        _prox_(b, s * lam, grp)
        # fixed-point residual ||V_{k+1} - V_k|| / s, relative like the KKT residual
        est = math.sqrt(_diff_sq(b, x, w)) / s / max(g0, _TINY)
        # departure (safeguard): an objective increase makes the next step a plain one
        restarted = fx > f_prev * (1 + 1e-7) + 1e-30
        restarts += restarted
        x, b = b, x  # x holds V_{k+1}, b holds V_k
        it += 1
        f_prev = fx
        check = est <= config.check_factor * tol and not check
        plain_next = restarted  # (a check step is plain anyway)
        if on_iter is not None:
            on_iter(it, fx, kkt)
    if not converged and not cancelled:  # the exact residual of the returned point
        kkt = _exact_kkt(train, x, b, T, Rb, w, ref, mu, lam, grp, g0)[0]
        converged = kkt <= tol
    del b, T, w, flat, Rb
    out = np.ascontiguousarray(x.transpose(1, 0, 2))
    return SolveOutcome(out, it, kkt, converged, float("nan"), cancelled, time.perf_counter() - ts)
