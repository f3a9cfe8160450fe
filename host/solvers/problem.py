"""The gated-ReLU least-squares problem as a linear operator, and the group prox.

With features ``Z: (n, d)``, targets ``Y: (n, c)`` and gate masks ``masks: (n, P)`` bool
(``masks[:, i] = 1[Z g_i >= 0]``, computed by the caller), the variable ``V: (P, d, c)`` maps to the
prediction

    A(V) = sum_i D_i Z V_i,            D_i = diag(masks[:, i]),

and the convex problem is

    minimize_V  F(V) = 1/(2n) ||A(V) - Y||_F^2 + lam * sum_g ||V_g||_2,

with groups ``g`` either one per gate (``group="gate"``: ``V[i]`` whole, Frobenius norm, a shared
second layer) or one per gate and output column (``group="gate_output"``: ``V[i, :, j]``, the
one-vs-all form pyscnn solves).

:class:`GatedProblem` holds the data and applies ``A`` and its adjoint ``A^T`` in row chunks, so the
working memory is ``O(row_chunk * P * c)`` and never ``O(n * P * c)``. Each chunk is one GEMM against
all gates at once (``Z_chunk @ V`` laid out as ``(d, P * c)``); there is no Python loop over gates.
Treat a problem as immutable once built (``lam_max``, ``A^T Y`` and the Gram are cached) and use it
from one thread at a time (the operator reuses one chunk-sized workspace buffer).

:meth:`GatedProblem.gram` builds (once, cached on the problem) the normal-equation data
:class:`GramData`: ``G = A^T A`` as a ``(P d, P d)`` matrix with blocks ``G_ij = Z^T D_i D_j Z``,
``B = A^T Y`` and ``||Y||^2``. With it ``grad f(V) = (G V - B) / n`` costs one ``(P d)^2 c`` GEMM
instead of two passes over the ``n`` rows, which pays off when ``n >> P d`` and several solves (a
``lam`` path) share one problem.

Data parallel (a reduction hook): with ``comm`` set (a :class:`Reducer`, e.g.
:class:`convexedge.host.distributed.Comm` over a ``torch.distributed`` process group), ``Z``, ``Y``
and ``masks`` hold only *this rank's* rows and the problem stands for the stacked rows of all ranks.
Every sum over rows is then all-reduced: :meth:`adjoint` (hence ``grad f``, ``A^T Y``,
``lam_max``), the smooth value, :meth:`objective`, the Gram and ``||Y||^2``; ``n`` is the global
sample count. Quantities indexed by rows (:meth:`forward`, the predictions) stay local. Every rank
must call these methods in the same order (they are collectives). Without ``comm`` (the default)
the problem is the single-process one: world size 1, the same code.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from convexedge.device.errors import DataError

__all__ = ["GatedProblem", "GramData", "Reducer", "group_norms", "prox_group"]

logger = logging.getLogger(__name__)

Group = Literal["gate", "gate_output"]
_GROUPS = ("gate", "gate_output")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


class Reducer(Protocol):
    """The reduction hook of a data-parallel :class:`GatedProblem` (one object per rank).

    ``sum_(t)`` and ``max_(t)`` replace ``t`` in place by its elementwise sum / max over all ranks
    (an all-reduce) and return it; every rank gets bit-identical results.
    """

    rank: int
    world_size: int

    def sum_(self, t: torch.Tensor) -> torch.Tensor: ...
    def max_(self, t: torch.Tensor) -> torch.Tensor: ...


def _check_group(group: str) -> None:
    if group not in _GROUPS:
        raise ValueError(f"group must be one of {_GROUPS}, got {group!r}")


def group_norms(V: torch.Tensor, group: Group) -> torch.Tensor:
    """Euclidean norm of every group of ``V``.

    Args:
        V: (P, d, c) variable.
        group: ``"gate"`` (one group per ``V[i]``) or ``"gate_output"`` (one per ``V[i, :, j]``).

    Returns:
        (P,) for ``"gate"``, (P, c) for ``"gate_output"``; same dtype as ``V``.
    """
    if group == "gate":
        return torch.linalg.vector_norm(V.reshape(V.shape[0], -1), dim=1)
    if group == "gate_output":
        return torch.linalg.vector_norm(V, dim=1)
    _check_group(group)
    raise AssertionError("unreachable")


def _broadcast_groups(x: torch.Tensor, group: Group) -> torch.Tensor:
    """Reshape a per-group quantity ((P,) or (P, c)) so it broadcasts against (P, d, c)."""
    return x[:, None, None] if group == "gate" else x[:, None, :]


def prox_group(V: torch.Tensor, thresh: float, group: Group) -> torch.Tensor:
    """Group soft threshold, the prox of ``thresh * sum_g ||V_g||``.

    Returns ``argmin_U 1/2 ||U - V||^2 + thresh * sum_g ||U_g||``, which is
    ``max(0, 1 - thresh / ||V_g||) V_g`` per group; a group with ``||V_g|| <= thresh`` (including an
    all-zero group) comes back exactly zero.

    Args:
        V: (P, d, c).
        thresh: threshold ``>= 0`` (the step times ``lam`` in a proximal-gradient step).
        group: ``"gate"`` or ``"gate_output"``.

    Returns:
        (P, d, c), same dtype and device as ``V``.
    """
    norms = group_norms(V, group)
    tiny = torch.finfo(norms.dtype).tiny
    # The explicit comparison makes groups with ||V_g|| <= thresh exactly zero (torch evaluates
    # scalar / tensor via a reciprocal, so 1 - thresh / ||V_g|| can be 1e-16 at equality).
    scale = torch.where(norms > thresh, 1.0 - thresh / norms.clamp_min(tiny), 0.0)
    return V * _broadcast_groups(scale, group)


def _to_tensor(x: Any, name: str, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """Copy an array-like (numpy, np.memmap, tensor) into a tensor of ``dtype`` on ``device``."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        return t.to(device=device, dtype=dtype if dtype is not None else t.dtype)
    try:
        arr = np.asarray(x)
    except Exception as exc:
        raise DataError(
            f"{name} must be a numpy array or torch tensor, got {type(x).__name__}; pass np.asarray({name})"
        ) from exc
    if dtype is not None:
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise DataError(
                f"{name} must hold numbers, got dtype {arr.dtype}; convert it with {name}.astype(np.float32)"
            )
        np_dtype = np.float32 if dtype == torch.float32 else np.float64
        # One copy into RAM (this also reads a read-only np.memmap into writable memory). Values
        # that overflow the dtype become Inf and are reported by _check_finite.
        with np.errstate(over="ignore", invalid="ignore"):
            arr = np.array(arr, dtype=np_dtype, order="C", copy=True)
    else:
        arr = np.array(arr, order="C", copy=True)
    return torch.from_numpy(arr).to(device)


def _check_finite(t: torch.Tensor, name: str, dtype_name: str) -> None:
    if not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise DataError(
            f"{name} must hold finite values, got {bad} NaN/Inf entries (after conversion to "
            f"{dtype_name}); drop or impute those rows, or rescale values that overflow {dtype_name}"
        )


@dataclass(frozen=True, eq=False)
class GramData:
    """Normal-equation data of a problem (built by :meth:`GatedProblem.gram`).

    Attributes:
        G: (P*d, P*d) ``A^T A`` in the problem's dtype; block ``(i, j)`` (rows ``i*d:(i+1)*d``,
            columns ``j*d:(j+1)*d``) is ``Z^T diag(m_i & m_j) Z``. Symmetric, and so is every block.
        B: (P, d, c) ``A^T Y`` in the problem's dtype.
        yy: ``||Y||_F^2`` accumulated in float64.
        seconds: wall-clock time the build took.
    """

    G: torch.Tensor
    B: torch.Tensor
    yy: float
    seconds: float

    def apply(self, V: torch.Tensor) -> torch.Tensor:
        """``(A^T A) V`` for ``V: (P, d, c)``, returned as (P, d, c)."""
        P, d, c = V.shape
        return torch.mm(self.G, V.reshape(P * d, c)).view(P, d, c)

    def smooth(self, V: torch.Tensor, GV: torch.Tensor, n: int) -> float:
        """``1/(2n) ||A(V) - Y||^2 = (<V, G V> - 2 <B, V> + ||Y||^2) / (2n)``, sums in float64.

        ``GV`` is :meth:`apply` of ``V``. The three terms nearly cancel when the fit is good, so
        this value carries an absolute error of order ``eps * ||Y||^2 / n`` (``eps`` of the
        problem's dtype); it is used for progress and restart tests, never for the reported
        objective.
        """
        vgv = torch.sum(V * GV, dtype=torch.float64)
        bv = torch.sum(V * self.B, dtype=torch.float64)
        return float((vgv - 2.0 * bv + self.yy) / (2.0 * n))


@dataclass(eq=False)
class GatedProblem:
    """Data and operator of the gated-ReLU convex problem (see the module docstring).

    Build it with :meth:`from_arrays`, which validates the data once; the constructor only checks
    shapes, dtypes and devices (cheap) and trusts the values.

    Attributes:
        Z: (n, d) float32/float64 features (append a ones column yourself for a bias).
        Y: (n, c) targets, same dtype and device as ``Z``.
        masks: (n, P) bool gate masks, same device.
        group: ``"gate"`` (default, shared second layer) or ``"gate_output"`` (one-vs-all).
        row_chunk: rows per chunk in :meth:`forward` / :meth:`adjoint`; memory is
            ``O(row_chunk * P * c)``.
        comm: reduction hook (see the module docstring); ``None``: this process holds all rows.
            Building a problem with ``comm`` all-reduces the row count, a collective.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> Z = rng.standard_normal((100, 5)); G = rng.standard_normal((5, 4))
        >>> prob = GatedProblem.from_arrays(Z, rng.standard_normal((100, 2)), Z @ G >= 0)
        >>> (prob.n, prob.d, prob.c, prob.P)
        (100, 5, 2, 4)
    """

    Z: torch.Tensor
    Y: torch.Tensor
    masks: torch.Tensor
    group: Group = "gate"
    row_chunk: int = 16384
    comm: Reducer | None = None
    _n: int = field(default=0, init=False, repr=False)
    _grad0_norms: torch.Tensor | None = field(default=None, init=False, repr=False)
    _aty: torch.Tensor | None = field(default=None, init=False, repr=False)
    _gram: GramData | None = field(default=None, init=False, repr=False)
    _blocks: torch.Tensor | None = field(default=None, init=False, repr=False)
    _metrics: dict = field(default_factory=dict, init=False, repr=False)  # FISTA's, by floor
    _buf: torch.Tensor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        _check_group(self.group)
        if not isinstance(self.row_chunk, int) or self.row_chunk < 1:
            raise ValueError(f"row_chunk must be a positive int, got {self.row_chunk!r}")
        Z, Y, M = self.Z, self.Y, self.masks
        if Z.ndim != 2 or Y.ndim != 2 or M.ndim != 2:
            raise DataError(
                f"Z, Y, masks must be 2-D (n, d), (n, c), (n, P); got shapes {tuple(Z.shape)}, "
                f"{tuple(Y.shape)}, {tuple(M.shape)}; use GatedProblem.from_arrays to validate"
            )
        if not (Z.shape[0] == Y.shape[0] == M.shape[0]):
            raise DataError(
                f"Z, Y, masks must have the same number of rows n; got {Z.shape[0]}, "
                f"{Y.shape[0]}, {M.shape[0]}"
            )
        if Z.dtype not in (torch.float32, torch.float64) or Y.dtype != Z.dtype:
            raise DataError(
                f"Z and Y must share a float32/float64 dtype, got {Z.dtype} and {Y.dtype}; "
                f"use GatedProblem.from_arrays(..., dtype=...)"
            )
        if M.dtype != torch.bool:
            raise DataError(f"masks must be bool, got {M.dtype}; pass masks.bool()")
        if not (Z.device == Y.device == M.device):
            raise DataError(f"Z, Y, masks must be on one device, got {Z.device}, {Y.device}, {M.device}")
        self._n = int(Z.shape[0])
        if self.comm is not None:
            self._n = int(self.comm.sum_(torch.tensor([self._n], dtype=torch.int64, device=Z.device)))

    @classmethod
    def from_arrays(
        cls,
        Z: Any,
        Y: Any,
        masks: Any,
        *,
        group: Group = "gate",
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        row_chunk: int = 16384,
        comm: Reducer | None = None,
    ) -> GatedProblem:
        """Validate numpy arrays / tensors (np.memmap included) once and build the problem.

        Args:
            Z: (n, d) features.
            Y: (n, c) targets (reshape a single target to (n, 1)).
            masks: (n, P) bool, ``masks[:, i] = Z @ g_i >= 0``.
            group: ``"gate"`` or ``"gate_output"``.
            dtype: ``"float32"`` (default) or ``"float64"`` (or the torch dtype).
            device: where the operator runs (``"cpu"``, ``"cuda"``, ...).
            row_chunk: rows per chunk in the operator.
            comm: reduction hook when the arrays are this rank's rows of a data-parallel problem.

        Raises:
            DataError: not 2-D, different n, masks not bool, empty, or NaN/Inf values.
        """
        _check_group(group)
        if isinstance(dtype, str):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {dtype!r}")
            tdtype = _DTYPES[dtype]
        elif dtype in (torch.float32, torch.float64):
            tdtype = dtype
        else:
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        dtype_name = str(tdtype).removeprefix("torch.")
        dev = torch.device(device)
        shapes = {}
        for name, x, hint in (
            ("Z", Z, "(n, d); reshape a single feature with Z.reshape(-1, 1)"),
            ("Y", Y, "(n, c); reshape a single target with Y.reshape(-1, 1)"),
            ("masks", masks, "(n, P); reshape a single gate with masks.reshape(-1, 1)"),
        ):
            shape = tuple(getattr(x, "shape", np.shape(x)))
            if len(shape) != 2:
                raise DataError(f"{name} must be 2-D {hint}; got shape {shape}")
            if 0 in shape:
                raise DataError(f"{name} must be non-empty {hint}; got shape {shape}")
            shapes[name] = shape
        ns = {k: s[0] for k, s in shapes.items()}
        if len(set(ns.values())) != 1:
            raise DataError(
                f"Z, Y, masks must have the same number of rows n, got {ns}; pass the same "
                f"samples (in the same order) to all three"
            )
        mask_dtype = masks.dtype if hasattr(masks, "dtype") else np.asarray(masks).dtype
        if mask_dtype not in (np.bool_, torch.bool):
            raise DataError(
                f"masks must be bool (n, P), got dtype {mask_dtype}; build them as "
                f"(Z @ G >= 0) or convert with masks.astype(bool)"
            )
        Zt = _to_tensor(Z, "Z", tdtype, dev)
        Yt = _to_tensor(Y, "Y", tdtype, dev)
        Mt = _to_tensor(masks, "masks", None, dev)
        _check_finite(Zt, "Z", dtype_name)
        _check_finite(Yt, "Y", dtype_name)
        return cls(Z=Zt, Y=Yt, masks=Mt, group=group, row_chunk=row_chunk, comm=comm)

    # ----------------------------------------------------------------------------- sizes
    @property
    def n(self) -> int:
        """Number of samples (of all ranks; the ``1/n`` of the loss)."""
        return self._n

    @property
    def n_local(self) -> int:
        """Rows held by this process (``n`` unless the problem is data-parallel)."""
        return int(self.Z.shape[0])

    def _sum_(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce ``t`` in place over the ranks (nothing without ``comm``)."""
        return t if self.comm is None else self.comm.sum_(t)

    @property
    def rank(self) -> int:
        """This process's rank (0 without ``comm``)."""
        return 0 if self.comm is None else int(self.comm.rank)

    @property
    def world_size(self) -> int:
        """Number of ranks sharing the rows (1 without ``comm``)."""
        return 1 if self.comm is None else int(self.comm.world_size)

    def _same_everywhere(self, value: int) -> bool:
        """Whether the int ``value`` is equal on every rank (one all-reduce; True without ``comm``)."""
        if self.comm is None:
            return True
        t = self.comm.max_(torch.tensor([value, -value], dtype=torch.int64, device=self.Z.device))
        return int(t[0]) == -int(t[1])

    def _agree(self, flag: bool) -> bool:
        """``flag`` made identical on every rank (true if any rank's is); for wall-clock stops."""
        if self.comm is None:
            return flag
        return bool(self.comm.max_(torch.tensor([int(flag)], dtype=torch.int64, device=self.Z.device)))

    @property
    def d(self) -> int:
        """Number of features (columns of ``Z``)."""
        return int(self.Z.shape[1])

    @property
    def c(self) -> int:
        """Number of outputs (columns of ``Y``)."""
        return int(self.Y.shape[1])

    @property
    def P(self) -> int:
        """Number of gates (columns of ``masks``)."""
        return int(self.masks.shape[1])

    # ----------------------------------------------------------------------------- operator
    def _chunks(self):
        n = self.n_local
        for start in range(0, n, self.row_chunk):
            yield slice(start, min(start + self.row_chunk, n))

    def _workspace(self, m: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        """An (m, cols) view of one reused flat buffer of row_chunk * P * c elements.

        Allocating a fresh chunk-sized buffer per call costs page faults on CPU comparable to the
        GEMM it feeds. The reuse makes the operator non-reentrant (one thread per problem).
        """
        size = min(self.row_chunk, self.n_local) * self.P * self.c
        buf = self._buf
        if buf is None or buf.dtype != dtype or buf.device != self.Z.device:
            buf = torch.empty(size, dtype=dtype, device=self.Z.device)
            self._buf = buf
        return buf[: m * cols].view(m, cols)

    def _forward(self, V: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        P, d, c = V.shape
        V = V.to(dtype)
        masks = self.masks
        # Gates whose whole V_i is zero (pruned by the prox) cost nothing: drop them.
        active = V.reshape(P, -1).ne(0).any(dim=1)  # NaN counts as active: never hide it
        n_active = int(active.sum())
        out = torch.zeros((self.n_local, c), dtype=dtype, device=self.Z.device)
        if n_active == 0:
            return out
        if n_active < P:
            V, masks, P = V[active], masks[:, active], n_active
        W = V.permute(1, 0, 2).reshape(d, P * c)
        reuse = dtype == self.Z.dtype
        for sl in self._chunks():
            m = sl.stop - sl.start
            Zc = self.Z[sl].to(dtype)
            H = torch.mm(Zc, W, out=self._workspace(m, P * c, dtype)) if reuse else Zc @ W
            # sum_i mask[:, i] * H[:, i, :] as a batch of (1, P) @ (P, c) products
            Mc = masks[sl].to(dtype).unsqueeze(1)
            out[sl] = torch.bmm(Mc, H.view(m, P, c)).squeeze(1)
        return out

    def forward(self, V: torch.Tensor) -> torch.Tensor:
        """Prediction ``A(V) = sum_i D_i Z V_i`` (of this rank's rows).

        Args:
            V: (P, d, c) in the problem's dtype.

        Returns:
            (n_local, c).
        """
        return self._forward(V, self.Z.dtype)

    def adjoint(self, R: torch.Tensor) -> torch.Tensor:
        """Adjoint ``A^T(R)``: ``(D_i Z)^T R`` for every gate (no ``1/n``), summed over all ranks.

        Args:
            R: (n_local, c) in the problem's dtype (this rank's rows).

        Returns:
            (P, d, c), identical on every rank.
        """
        P, c, d = self.P, R.shape[1], self.d
        R = R.to(self.Z.dtype)
        acc = torch.zeros((d, P * c), dtype=self.Z.dtype, device=self.Z.device)
        for sl in self._chunks():
            m = sl.stop - sl.start
            M = self._workspace(m, P * c, self.Z.dtype)
            torch.mul(R[sl, None, :], self.masks[sl, :, None].to(R.dtype), out=M.view(m, P, c))
            acc.addmm_(self.Z[sl].T, M)
        self._sum_(acc)
        return acc.view(d, P, c).permute(1, 0, 2).contiguous()

    # ----------------------------------------------------------------------------- objective
    def _smooth_from_pred(self, pred: torch.Tensor) -> float:
        """``1/(2n) ||pred - Y||^2`` accumulated in float64 (over all ranks)."""
        r2 = torch.linalg.vector_norm(pred - self.Y, dtype=torch.float64).square()
        return float(0.5 * self._sum_(r2.reshape(1)) / self.n)

    def smooth(self, V: torch.Tensor) -> tuple[float, torch.Tensor]:
        """Smooth part ``1/(2n) ||A(V) - Y||_F^2`` (float64 accumulation) and the prediction.

        Returns:
            ``(value, pred)`` with ``pred: (n_local, c)`` in the problem's dtype.
        """
        pred = self.forward(V)
        return self._smooth_from_pred(pred), pred

    def penalty(self, V: torch.Tensor) -> torch.Tensor:
        """``sum_g ||V_g||`` (without ``lam``), a float64 scalar tensor."""
        return group_norms(V.to(torch.float64), self.group).sum()

    def objective(self, V: torch.Tensor, lam: float) -> float:
        """True objective ``F(V)``: the prediction and every sum in float64.

        Args:
            V: (P, d, c).
            lam: regularisation strength.
        """
        pred = self._forward(V, torch.float64)
        r2 = (pred - self.Y.to(torch.float64)).square().sum()
        return float(0.5 * self._sum_(r2.reshape(1)) / self.n + lam * self.penalty(V))

    def _adjoint_y(self) -> torch.Tensor:
        """``A^T Y`` (P, d, c) in the problem's dtype (cached; shared by lam_max and the Gram)."""
        if self._aty is None:
            self._aty = self.adjoint(self.Y)
        return self._aty

    def _grad0_group_norms(self) -> torch.Tensor:
        """Group norms of ``grad f(0) = -(1/n) A^T Y`` in float64 (cached)."""
        if self._grad0_norms is None:
            g0 = self._adjoint_y().to(torch.float64) / self.n
            self._grad0_norms = group_norms(g0, self.group)
        return self._grad0_norms

    # ----------------------------------------------------------------------------- Gram
    def gram_bytes(self) -> int:
        """Memory the Gram matrix ``G`` of :meth:`gram` takes: ``(P d)^2`` times the item size."""
        return (self.P * self.d) ** 2 * self.Z.element_size()

    @property
    def has_gram(self) -> bool:
        """Whether :meth:`gram` has already been built (and is cached)."""
        return self._gram is not None

    def gate_blocks(self) -> torch.Tensor:
        """The diagonal (gate) blocks ``Z^T D_i Z`` of ``A^T A``, (P, d, d) float64 (cached).

        Taken from the Gram when it is built; otherwise one pass over the rows (``2 n_i d^2`` flops
        per gate, ``n_i`` its rows on), summed over the ranks. Used by FISTA's block metric.
        """
        if self._blocks is not None:
            return self._blocks
        P, d = self.P, self.d
        if self._gram is not None:
            G = self._gram.G
            H = torch.stack([G[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(P)]).to(torch.float64)
        else:
            H = torch.zeros((P, d, d), dtype=torch.float64, device=self.Z.device)
            for sl in self._chunks():
                Zc, Mc = self.Z[sl], self.masks[sl]
                for i in range(P):
                    Zi = Zc[Mc[:, i]]
                    if Zi.shape[0]:
                        H[i] += torch.mm(Zi.T, Zi).to(torch.float64)
            self._sum_(H)
        self._blocks = H
        return H

    def gram(self) -> GramData:
        """``G = A^T A``, ``B = A^T Y`` and ``||Y||^2`` (built on the first call, then cached).

        Built blockwise: for ``i <= j`` only, block ``G_ij = Z^T diag(m_i & m_j) Z`` sums the rows
        where both gates are on (gathered, so a block costs ``2 |m_i & m_j| d^2`` flops, not
        ``2 n d^2``), and the symmetric ``G_ji = G_ij^T = G_ij`` is copied. Rows are processed in
        ``row_chunk`` chunks, so the extra memory besides ``G`` is ``O(row_chunk * d + P d^2)``.

        Accuracy: each block is accumulated across chunks in float64 and rounded to the problem's
        dtype once at the end, so for float32 the only float32 sums are inside one chunk's GEMM
        (at most ``row_chunk`` rows). Plain float32 accumulation over all rows would also be
        accurate enough: on captured conv activations (n = 57,600, d = 289, P = 8) it measured a
        relative Frobenius error of 2.5e-7 (worst entry 8e-7 of its block's largest), against
        6e-8 (2e-7) with the float64 accumulator, both far below a KKT tolerance like 1e-4. The
        accumulator costs ``P d^2`` doubles and keeps the error at the rounding level for any ``n``.
        """
        if self._gram is not None:
            return self._gram
        start = time.perf_counter()
        P, d, dt, dev = self.P, self.d, self.Z.dtype, self.Z.device
        G = torch.empty((P * d, P * d), dtype=dt, device=dev)
        acc = torch.zeros((P, d, d), dtype=torch.float64, device=dev)
        for i in range(P):
            acc[i:].zero_()
            for sl in self._chunks():
                on_i = self.masks[sl, i]
                Zi = self.Z[sl][on_i]  # rows where gate i is on
                if Zi.shape[0] == 0:
                    continue
                Mi = self.masks[sl][on_i]
                for j in range(i, P):
                    Zs = Zi if j == i else Zi[Mi[:, j]]
                    if Zs.shape[0] == 0:
                        continue
                    if dt == torch.float64:
                        acc[j].addmm_(Zs.T, Zs)
                    else:
                        acc[j] += torch.mm(Zs.T, Zs)
            self._sum_(acc[i:])  # data parallel: the float64 blocks summed over ranks, then rounded
            for j in range(i, P):
                # A GEMM of Zs^T Zs is symmetric only up to summation order: symmetrise exactly.
                blk = (0.5 * (acc[j] + acc[j].T)).to(dt)
                G[i * d : (i + 1) * d, j * d : (j + 1) * d] = blk
                if j != i:
                    # Z^T D Z is symmetric, so G_ji = G_ij^T = G_ij.
                    G[j * d : (j + 1) * d, i * d : (i + 1) * d] = blk
        yy = float(self._sum_(torch.linalg.vector_norm(self.Y, dtype=torch.float64).square().reshape(1)))
        self._gram = GramData(G=G, B=self._adjoint_y(), yy=yy, seconds=time.perf_counter() - start)
        logger.debug(
            "built Gram (P d = %d, %.1f MB) in %.2f s",
            P * d,
            self.gram_bytes() / 2**20,
            self._gram.seconds,
        )
        return self._gram

    def lam_max(self) -> float:
        """Smallest ``lam`` for which ``V = 0`` is optimal: ``max_g ||(1/n) [A^T Y]_g||``."""
        return float(self._grad0_group_norms().max())
