"""FISTA for the gated-ReLU group lasso in numpy: the device twin of ``host/solvers/fista.py``.

Solves

    minimize_V  F(V) = 1/(2n) ||sum_i D_i Z1 V_i - Y||_F^2 + lam * sum_g ||V_g||_2,

``Z1 = [Z, 1]`` (the bias column is implicit: ``Z`` holds ``d_in`` standardised features and row
``d - 1`` of every ``V_i`` is its bias), by the same algorithm as the host solver: FISTA (Beck &
Teboulle, SIAM J. Imaging Sci. 2009) with a backtracking line search that first tries a longer step
(Scheinberg, Goldfarb & Bai, Found. Comput. Math. 2014), gradient-based adaptive restart
(O'Donoghue & Candès, Found. Comput. Math. 2015), the group soft threshold as prox, and the relative
KKT residual as the stopping test. The line-search test is the host's cancellation-free form
``||A(z - y)||^2 / (2n) <= ||z - y||^2 / (2 step)``; the image and the gradient at the momentum
point are extrapolated, not recomputed, because both are affine in ``V``.

Two data forms, like the host's two operators:

* :class:`RowData` (``Z (n, d_in)``, ``Y (n, c)``, ``masks (n, P)``): an iteration is one forward
  and one adjoint pass over the rows, in ``row_chunk`` row chunks (working memory
  ``O(row_chunk * P * c)`` besides the ``(n, c)`` images).
* :class:`GramData` (``G = A^T A: (P d, P d)``, ``B = A^T Y: (P, d, c)``, ``||Y||^2``, ``n``): the
  sufficient statistics of the least-squares part, accumulated by a Gram-mode stream buffer; an
  iteration is one ``(P d)^2 c`` product and touches no rows.

The solver is a pair of pure functions over a named state (:func:`fista_init`, :func:`fista_step`)
so the runtime can run it in slices, check a cancel flag and a deadline between iterations, and
stop anywhere with a valid iterate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "FistaConfig",
    "FistaState",
    "GramData",
    "RowData",
    "fista_init",
    "fista_step",
    "group_norms",
    "kkt_normaliser",
    "kkt_residual",
    "prox_group",
]

Group = Literal["gate", "gate_output"]
_MAX_TRIALS = 50  # line-search trials before the last step is accepted anyway (as on the host)
_POWER_ITERS = 3
_TINY = 2.2250738585072014e-308


@dataclass(frozen=True, kw_only=True)
class FistaConfig:
    """Solver settings of a device refit (JSON-serialisable via ``asdict``)."""

    # Stop when kkt_residual <= tol (relative to ||grad f(0)||, as on the host).
    tol: float = 1e-4
    max_iter: int = 1000
    # Initial step; None: 1/L from a few power iterations (a warm refit passes the last step).
    step_init: float | None = None
    backtrack: float = 0.5  # step shrink factor in the line search, in (0, 1)
    grow: float = 1.1  # step growth tried at the start of every iteration (>= 1)
    restart: Literal["gradient", "function", "none"] = "gradient"
    row_chunk: int = 256  # rows per chunk in the row operator (bounds the working memory)

    def __post_init__(self) -> None:
        check_fista_settings(self)
        if not isinstance(self.row_chunk, int) or isinstance(self.row_chunk, bool) or self.row_chunk < 1:
            raise ValueError(f"row_chunk must be an int >= 1, got {self.row_chunk!r}")


def check_fista_settings(config) -> None:
    """Validate the settings the host and device FISTA configs share (one check for both).

    ``tol``, ``max_iter``, ``step_init``, ``backtrack``, ``grow`` and ``restart``; raises
    ``ValueError`` naming the field. The host's ``FistaConfig`` calls this too.
    """
    tol, max_iter, step_init = config.tol, config.max_iter, config.step_init
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 0:
        raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
    if step_init is not None and not (
        isinstance(step_init, (int, float)) and math.isfinite(step_init) and step_init > 0
    ):
        raise ValueError(f"step_init must be None or a finite number > 0, got {step_init!r}")
    if not (isinstance(config.backtrack, (int, float)) and 0 < config.backtrack < 1):
        raise ValueError(f"backtrack must be in (0, 1), got {config.backtrack!r}")
    if not (isinstance(config.grow, (int, float)) and math.isfinite(config.grow) and config.grow >= 1):
        raise ValueError(f"grow must be a finite number >= 1, got {config.grow!r}")
    if config.restart not in ("gradient", "function", "none"):
        raise ValueError(f"restart must be 'function', 'gradient' or 'none', got {config.restart!r}")


# ----------------------------------------------------------------------------- prox
def group_norms(V: np.ndarray, group: Group) -> np.ndarray:
    """Norms of the groups of ``V: (P, d, c)``: (P,) for ``"gate"``, (P, c) for ``"gate_output"``."""
    if group == "gate":
        return np.sqrt(np.einsum("pdc,pdc->p", V, V, dtype=np.float64))
    return np.sqrt(np.einsum("pdc,pdc->pc", V, V, dtype=np.float64))


def _bcast(x: np.ndarray, group: Group) -> np.ndarray:
    return x[:, None, None] if group == "gate" else x[:, None, :]


def _prox_scale(V: np.ndarray, thresh: float, group: Group) -> np.ndarray:
    norms = group_norms(V, group)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(norms > thresh, 1.0 - thresh / np.maximum(norms, _TINY), 0.0)


def prox_group(V: np.ndarray, thresh: float, group: Group) -> np.ndarray:
    """Group soft threshold ``max(0, 1 - thresh / ||V_g||) V_g`` (the prox of ``thresh * sum ||V_g||``).

    Groups with ``||V_g|| <= thresh`` come back exactly zero. ``V: (P, d, c)``; returns a new array.
    """
    return V * _bcast(_prox_scale(V, thresh, group), group).astype(V.dtype)


# ----------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class RowData:
    """Rows of the problem; arrays are used as given (the runtime validated them at observe time).

    Attributes:
        Z: (n, d_in) float32 standardised features (no bias column: it is implicit).
        Y: (n, c) float32 targets.
        masks: (n, P) bool gate masks of ``[Z, 1]``.
        group: ``"gate"`` or ``"gate_output"``.
    """

    Z: np.ndarray
    Y: np.ndarray
    masks: np.ndarray
    group: Group = "gate"

    @property
    def n(self) -> int:
        return int(self.Z.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(P, d, c)`` of the variable."""
        return int(self.masks.shape[1]), int(self.Z.shape[1] + 1), int(self.Y.shape[1])


@dataclass(frozen=True, eq=False)
class GramData:
    """Sufficient statistics of the least-squares part (built by a Gram-mode buffer).

    Attributes:
        G: (P*d, P*d) float32 ``A^T A``; block ``(i, j)`` is ``Z1^T D_i D_j Z1``.
        B: (P, d, c) float32 ``A^T Y``.
        yy: ``||Y||_F^2``.
        n: (effective) number of rows summed in.
        group: ``"gate"`` or ``"gate_output"``.
    """

    G: np.ndarray
    B: np.ndarray
    yy: float
    n: float
    group: Group = "gate"

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.B.shape)  # type: ignore[return-value]


class _Anchor:
    """The optional proximal term ``mu/2 ||V - V_ref||^2`` that pulls a refit toward a reference head.

    It is added to the smooth part (gradient ``mu (V - V_ref)``, curvature ``mu``), so FISTA solves a
    strongly convex problem whose solution stays near ``V_ref`` where the stream says little.
    """

    mu: float = 0.0
    anchor: np.ndarray | None = None

    def set_anchor(self, anchor: np.ndarray | None, mu: float) -> None:
        if mu < 0 or not math.isfinite(mu):
            raise ValueError(f"mu must be a finite number >= 0, got {mu!r}")
        if anchor is not None and tuple(anchor.shape) != tuple(self.shape):  # type: ignore[attr-defined]
            raise ValueError(f"anchor must have shape (P, d, c) = {self.shape}, got {anchor.shape}")  # type: ignore[attr-defined]
        self.anchor, self.mu = (anchor, float(mu)) if anchor is not None and mu > 0 else (None, 0.0)

    def full_grad(self, V: np.ndarray, img: np.ndarray) -> np.ndarray:
        g = self.grad(img)  # type: ignore[attr-defined]
        if self.anchor is not None:
            t = np.subtract(V, self.anchor)
            t *= np.float32(self.mu)
            g += t
        return g

    def full_smooth(self, V: np.ndarray, img: np.ndarray) -> float:
        f = self.smooth(V, img)  # type: ignore[attr-defined]
        if self.anchor is not None:
            t = np.subtract(V, self.anchor)
            f += 0.5 * self.mu * float(np.dot(t.ravel(), t.ravel()))
        return f


class _RowOp(_Anchor):
    """Image = predictions ``A(V)`` (n, c); each product is one chunked pass over the rows."""

    def __init__(self, data: RowData, row_chunk: int) -> None:
        self.data, self.chunk = data, row_chunk
        self.n = data.n
        self.shape = data.shape
        self.image_shape = (data.n, data.shape[2])
        self.maskf = data.masks.astype(np.float32)
        self._aty: np.ndarray | None = None
        self._buf: np.ndarray | None = None

    def _work(self, m: int, cols: int) -> np.ndarray:
        """An (m, cols) view of one reused chunk buffer (allocation per call costs page faults)."""
        size = min(self.chunk, self.n) * self.shape[0] * self.shape[2]
        if self._buf is None:
            self._buf = np.empty(size, np.float32)
        return self._buf[: m * cols].reshape(m, cols)

    def image(self, V: np.ndarray) -> np.ndarray:
        P, d, c = V.shape
        Z, M = self.data.Z, self.maskf
        active = np.flatnonzero(V.reshape(P, -1).any(axis=1))
        out = np.zeros((self.n, c), np.float32)
        if active.size == 0:
            return out
        if active.size < P:  # gates zeroed by the prox cost nothing
            V, M = V[active], M[:, active]
        Pa = V.shape[0]
        W = np.ascontiguousarray(V[:, :-1, :].transpose(1, 0, 2).reshape(d - 1, Pa * c))
        b = V[:, -1, :].reshape(Pa * c)
        for s in range(0, self.n, self.chunk):
            e = min(s + self.chunk, self.n)
            H = np.matmul(Z[s:e], W, out=self._work(e - s, Pa * c))
            H += b
            # sum_i mask_i * H_i per row: einsum is ~4x faster than a broadcast multiply and sum
            np.einsum("np,npc->nc", M[s:e], H.reshape(e - s, Pa, c), out=out[s:e])
        return out

    def adjoint(self, R: np.ndarray) -> np.ndarray:
        P, d, c = self.shape
        Z, M = self.data.Z, self.maskf
        accW = np.zeros((d - 1, P * c), np.float32)
        accb = np.zeros(P * c, np.float64)
        for s in range(0, self.n, self.chunk):
            e = min(s + self.chunk, self.n)
            T = self._work(e - s, P * c)
            np.multiply(M[s:e, :, None], R[s:e, None, :], out=T.reshape(e - s, P, c))
            accW += Z[s:e].T @ T
            accb += T.sum(axis=0, dtype=np.float64)
        out = np.empty((P, d, c), np.float32)
        out[:, :-1, :] = accW.reshape(d - 1, P, c).transpose(1, 0, 2)
        out[:, -1, :] = accb.reshape(P, c)
        return out

    def aty(self) -> np.ndarray:
        if self._aty is None:
            self._aty = self.adjoint(self.data.Y)
        return self._aty

    def grad(self, img: np.ndarray) -> np.ndarray:
        g = self.adjoint(img - self.data.Y)
        g /= np.float32(self.n)
        return g

    def smooth(self, V: np.ndarray, img: np.ndarray) -> float:
        r = (img - self.data.Y).ravel().astype(np.float64)
        return float(r @ r) / (2.0 * self.n)

    def quad(self, dV: np.ndarray, dimg: np.ndarray) -> float:
        r = dimg.ravel().astype(np.float64)
        return float(r @ r)

    def normal(self, V: np.ndarray) -> np.ndarray:
        return self.adjoint(self.image(V))


class _GramOp(_Anchor):
    """Image = ``G V`` (P, d, c); no pass over rows."""

    def __init__(self, data: GramData) -> None:
        self.data = data
        self.n = float(data.n)
        self.shape = data.shape
        self.image_shape = data.shape

    def image(self, V: np.ndarray) -> np.ndarray:
        P, d, c = V.shape
        return (self.data.G @ V.reshape(P * d, c)).reshape(P, d, c)

    def aty(self) -> np.ndarray:
        return self.data.B

    def grad(self, img: np.ndarray) -> np.ndarray:
        return (img - self.data.B) / np.float32(self.n)

    def smooth(self, V: np.ndarray, img: np.ndarray) -> float:
        vgv = float(np.dot(V.ravel().astype(np.float64), img.ravel().astype(np.float64)))
        bv = float(np.dot(V.ravel().astype(np.float64), self.data.B.ravel().astype(np.float64)))
        return max(0.0, (vgv - 2.0 * bv + self.data.yy) / (2.0 * self.n))

    def quad(self, dV: np.ndarray, dimg: np.ndarray) -> float:
        return float(np.dot(dV.ravel().astype(np.float64), dimg.ravel().astype(np.float64)))

    def normal(self, V: np.ndarray) -> np.ndarray:
        return self.image(V)


def make_operator(
    data: RowData | GramData, config: FistaConfig, *, anchor: np.ndarray | None = None, mu: float = 0.0
) -> _RowOp | _GramOp:
    """The operator of ``data`` (row passes or Gram products).

    With ``anchor`` (P, d, c) and ``mu > 0`` the smooth part gains ``mu/2 ||V - anchor||^2``.
    """
    op = _RowOp(data, config.row_chunk) if isinstance(data, RowData) else _GramOp(data)
    op.set_anchor(anchor, mu)
    return op


# ----------------------------------------------------------------------------- certificate
def kkt_normaliser(op: _RowOp | _GramOp, group: Group) -> float:
    """``||grad f(0)||`` over groups, ``grad f(0) = -(1/n) A^T Y``: what the KKT residual is relative to."""
    return float(np.linalg.norm(group_norms(op.aty(), group))) / op.n


def kkt_residual(
    op: _RowOp | _GramOp, V: np.ndarray, lam: float, grad: np.ndarray, group: Group, g0: float | None = None
) -> float:
    """Relative residual of ``0 in grad f(V) + lam d R(V)`` (the host's definition).

    Per group ``r_g = ||grad_g + lam V_g / ||V_g||||`` if ``V_g != 0`` else ``max(0, ||grad_g|| - lam)``;
    returns ``sqrt(sum r_g^2) / g0`` with ``g0`` = :func:`kkt_normaliser` (computed when not given).
    """
    vn = group_norms(V, group)
    active = vn > 0
    scale = (lam / np.where(active, vn, 1.0)).astype(np.float32)
    t = V * _bcast(scale, group)  # lam V_g / ||V_g|| (zero where V_g = 0)
    t += grad
    r = np.where(active, group_norms(t, group), np.maximum(group_norms(grad, group) - lam, 0.0))
    g0 = kkt_normaliser(op, group) if g0 is None else g0
    return float(np.linalg.norm(r)) / max(g0, _TINY)


def lam_max(op: _RowOp | _GramOp, group: Group) -> float:
    """Smallest ``lam`` for which ``V = 0`` is optimal."""
    return float(group_norms(op.aty(), group).max()) / op.n


# ----------------------------------------------------------------------------- init / step
class FistaState(NamedTuple):
    """The state FISTA carries between iterations (the host's fields, numpy arrays).

    ``x, y, grad_x, grad_y: (P, d, c)``; ``img_x, img_y``: (n, c) predictions (rows) or (P, d, c)
    products ``G V`` (Gram). ``t`` momentum, ``step`` last accepted step, ``fx = F(x)``.
    """

    x: np.ndarray
    y: np.ndarray
    t: float
    step: float
    img_x: np.ndarray
    img_y: np.ndarray
    fx: float
    it: int
    restarts: int
    grad_x: np.ndarray
    grad_y: np.ndarray


def _penalty(V: np.ndarray, group: Group) -> float:
    return float(group_norms(V, group).sum())


def _estimate_step(op: _RowOp | _GramOp) -> float:
    """``1 / L``, ``L = ||A||^2 / n`` by power iteration (underestimates L: the search corrects it)."""
    v = np.random.default_rng(0).standard_normal(op.shape).astype(np.float32)
    v /= np.linalg.norm(v)
    L = 0.0
    for _ in range(_POWER_ITERS):
        w = op.normal(v) / np.float32(op.n)
        if op.mu:
            w += np.float32(op.mu) * v
        L = float(np.linalg.norm(w))
        if L == 0.0:
            return 1.0
        v = w / np.float32(L)
    return 1.0 / L


def fista_init(
    op: _RowOp | _GramOp, lam: float, config: FistaConfig, V0: np.ndarray | None, group: Group
) -> FistaState:
    """Start at ``V0`` (zeros if None) with ``y = x``, ``t = 1``; one operator image."""
    if V0 is None:
        x = np.zeros(op.shape, np.float32)
    else:
        if tuple(V0.shape) != tuple(op.shape):
            raise ValueError(f"V0 must have shape (P, d, c) = {op.shape}, got {V0.shape}")
        x = np.array(V0, dtype=np.float32, copy=True)
    img = op.image(x)
    grad = op.full_grad(x, img)
    fx = op.full_smooth(x, img) + lam * _penalty(x, group)
    step = config.step_init if config.step_init is not None else _estimate_step(op)
    return FistaState(x, x, 1.0, float(step), img, img, fx, 0, 0, grad, grad)


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    """``<a, b>`` without a float64 copy (BLAS dot; its float32 rounding is far below any tol)."""
    return float(np.dot(a.ravel(), b.ravel()))


def fista_step(
    op: _RowOp | _GramOp, lam: float, config: FistaConfig, s: FistaState, group: Group
) -> FistaState:
    """One accepted iteration: line search (grow first), prox, restart test, momentum.

    Written with in-place updates so that, besides the state (``x, y, grad_x, grad_y``), an
    iteration allocates about five arrays of the size of ``V`` (the device's memory bound).
    """
    y, grad_y, img_y = s.y, s.grad_y, s.img_y
    n = op.n
    # Departure from Beck & Teboulle (shrink-only backtracking): try a longer step first, as in
    # Scheinberg, Goldfarb & Bai 2014 (the host does the same).
    step = s.step * config.grow
    for trial in range(_MAX_TRIALS):
        z = np.multiply(grad_y, np.float32(-step))
        z += y
        z *= _bcast(_prox_scale(z, step * lam, group), group).astype(np.float32)
        img_z = op.image(z)
        diff = z - y
        dz = _dot(diff, diff)
        if dz == 0.0:
            step = s.step
            break
        dimg = img_z - img_y
        quad = _dot(dimg, dimg) if isinstance(op, _RowOp) else _dot(diff, dimg)
        del dimg
        # Cancellation-free sufficient-decrease test for a quadratic f (host's departure, same form).
        if quad / n + op.mu * dz <= dz / step:
            break
        if trial < _MAX_TRIALS - 1:
            step *= config.backtrack
    grad_z = op.full_grad(z, img_z)
    fz = op.full_smooth(z, img_z) + lam * _penalty(z, group)
    w = np.subtract(z, s.x)  # x_{k+1} - x_k, reused for the momentum step
    if config.restart == "gradient":  # O'Donoghue & Candès 2015: (y_k - x_{k+1})^T (x_{k+1} - x_k) > 0
        restart = -_dot(diff, w) > 0
    elif config.restart == "function":
        restart = fz > s.fx
    else:
        restart = False
    del diff
    t_next = (1.0 + math.sqrt(1.0 + 4.0 * s.t * s.t)) / 2.0  # Beck & Teboulle 2009, eq. (4.2)
    b = 0.0 if restart else (s.t - 1.0) / t_next
    if restart:
        t_next = 1.0
    if b != 0.0:
        fb = np.float32(b)
        w *= fb
        w += z  # y_{k+1} = x_{k+1} + b (x_{k+1} - x_k)
        y_next = w
        img_y_next = img_z + fb * (img_z - s.img_x)
        grad_y_next = np.subtract(grad_z, s.grad_x)
        grad_y_next *= fb
        grad_y_next += grad_z
    else:
        del w
        y_next, img_y_next, grad_y_next = z, img_z, grad_z
    return FistaState(
        z,
        y_next,
        t_next,
        step,
        img_z,
        img_y_next,
        fz,
        s.it + 1,
        s.restarts + int(restart),
        grad_z,
        grad_y_next,
    )
