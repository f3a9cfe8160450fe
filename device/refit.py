"""The device runtime: predict, observe a bounded stream, refit the head safely in the background.

    rt = RefitRuntime(HeadStore.open("heads/"), memory_budget_mb=4)
    logits = rt.predict(x)                        # never waits for a refit
    rt.observe(x_batch, teacher_logits_batch)     # targets are produced on the device
    job = rt.refit_async(time_budget_s=1.0)       # or rt.refit(...) to block
    result = job.result()                         # accepted | rejected | cancelled | out_of_budget | failed

A refit snapshots the buffer (in place, no copy), runs the numpy FISTA of
:mod:`convexedge.device.fista` (or, with ``RefitConfig(solver="momentum")``, the two-array proximal
heavy ball of :mod:`convexedge.device.momentum`, or with ``solver="bcd"`` the block coordinate solver
of :mod:`convexedge.device.bcd`) warm-started from the serving head, one iteration (or one gate) at a
time, checking a cancel flag and the deadline in between, then judges the
candidate on the held-out part of the stream (in row chunks, so validation allocates no full
prediction arrays): it is committed only if its validation loss is lower than the serving head's by
``min_improvement`` (relative) *and* it explains the held-out targets with ``R^2 >= min_val_r2``
(garbage or poisoned targets that no head can predict fail this). Committing writes the head through
the :class:`~convexedge.device.store.HeadStore` (atomic) and then swaps one reference, so
``predict`` never takes a lock: it reads whichever immutable head is current.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np

from convexedge.device.bcd import BcdConfig
from convexedge.device.buffer import BufferConfig, StreamBuffer
from convexedge.device.errors import ConvergenceWarning, DataError, RefitBusyError
from convexedge.device.fista import FistaConfig
from convexedge.device.head import ConvexHead, check_features
from convexedge.device.momentum import MomentumConfig
from convexedge.device.store import HeadStore
from convexedge.device.worker import RefitWorker, solve

__all__ = ["RefitConfig", "RefitJob", "RefitProgress", "RefitResult", "RefitRuntime"]

logger = logging.getLogger(__name__)

Status = Literal["accepted", "rejected", "cancelled", "out_of_budget", "failed"]
Solver = Literal["fista", "momentum", "bcd", "auto"]
Renormalize = Literal["off", "mean", "mean_std"]
_MB = 2**20
_VAL_CHUNK = 32  # rows per chunk when validating and computing masks (bounds their temporaries)
# renormalize="mean_std": a feature whose stream spread is below this share of the serving head's
# keeps its scale (a constant or collapsed feature must not be blown up)
_MIN_STD_RATIO = 1e-3


@dataclass(frozen=True, kw_only=True)
class RefitConfig:
    """When and how a refit runs and what it must achieve to be committed (JSON-serialisable)."""

    # Regularisation strength; None: the serving head's own lam.
    lam: float | None = None
    fista: FistaConfig = field(default_factory=FistaConfig)
    # "fista": accelerated, working set ~12 V + 8 (n, c) images (rows or Gram mode); "momentum":
    # proximal heavy ball (convexedge.device.momentum), as fast, working set ~2 V + one row chunk (rows
    # only); "bcd": block coordinate descent over gates (convexedge.device.bcd), ~2 V + one (n, c)
    # residual, more passes; "auto": momentum when the buffer keeps rows and FISTA's workspace
    # estimate exceeds auto_workspace_kb, else fista.
    solver: Solver = "fista"
    momentum: MomentumConfig = field(default_factory=MomentumConfig)
    bcd: BcdConfig = field(default_factory=BcdConfig)
    auto_workspace_kb: float = 256.0
    # Proximal pull toward the serving head: the refit adds anchor/2 ||V - V_serving||^2 to the
    # objective (0: none). It keeps what the head learned where the small stream says little. A
    # strong anchor raises the solvers' tol to the float32 floor it creates (worker.certifiable_tol).
    anchor: float = 0.0
    # Re-estimate the input normalisation from the stream's training rows before solving
    # (covariate-shift adaptation, as prediction-time batch norm does for BN networks): "mean"
    # re-centres every feature, "mean_std" also rescales it, "off" keeps the serving head's. The
    # gates then see the shifted features where they saw the clean ones. Row buffer modes only. The
    # candidate (new normalisation and weights) is judged on the held-out rows like any refit.
    renormalize: Renormalize = "off"
    min_train: int = 32  # fewer training samples: the refit is rejected without solving
    min_val: int = 16  # fewer held-out samples: rejected (nothing to judge the candidate on)
    # Commit only if val_loss_after < val_loss_before * (1 - min_improvement).
    min_improvement: float = 1e-3
    # Commit only if the candidate explains the held-out targets: 1 - SSE / SST >= min_val_r2.
    min_val_r2: float = 0.3

    def __post_init__(self) -> None:
        if self.lam is not None and not (
            isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0
        ):
            raise ValueError(f"lam must be None or a finite number >= 0, got {self.lam!r}")
        if not (isinstance(self.anchor, (int, float)) and math.isfinite(self.anchor) and self.anchor >= 0):
            raise ValueError(f"anchor must be a finite number >= 0, got {self.anchor!r}")
        if not isinstance(self.fista, FistaConfig):
            raise ValueError(f"fista must be a FistaConfig, got {type(self.fista).__name__}")
        if not isinstance(self.bcd, BcdConfig):
            raise ValueError(f"bcd must be a BcdConfig, got {type(self.bcd).__name__}")
        if not isinstance(self.momentum, MomentumConfig):
            raise ValueError(f"momentum must be a MomentumConfig, got {type(self.momentum).__name__}")
        if self.renormalize not in ("off", "mean", "mean_std"):
            raise ValueError(f"renormalize must be 'off', 'mean' or 'mean_std', got {self.renormalize!r}")
        if self.solver not in ("fista", "momentum", "bcd", "auto"):
            raise ValueError(f"solver must be 'fista', 'momentum', 'bcd' or 'auto', got {self.solver!r}")
        if not (
            isinstance(self.auto_workspace_kb, (int, float))
            and math.isfinite(self.auto_workspace_kb)
            and self.auto_workspace_kb > 0
        ):
            raise ValueError(f"auto_workspace_kb must be a finite number > 0, got {self.auto_workspace_kb!r}")
        for name in ("min_train", "min_val"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not (isinstance(self.min_improvement, (int, float)) and 0 <= self.min_improvement < 1):
            raise ValueError(f"min_improvement must lie in [0, 1), got {self.min_improvement!r}")
        if not (isinstance(self.min_val_r2, (int, float)) and self.min_val_r2 <= 1):
            raise ValueError(f"min_val_r2 must be a number <= 1, got {self.min_val_r2!r}")


class RefitProgress(NamedTuple):
    """Passed to ``on_progress`` after every iteration."""

    iteration: int
    objective: float
    kkt: float
    seconds: float


@dataclass
class RefitResult:
    """What a refit did.

    Attributes:
        status: ``"accepted"`` (committed and serving), ``"rejected"`` (not better on the held-out
            stream, or too few samples), ``"cancelled"``, ``"out_of_budget"`` (the time budget ran
            out before one iteration finished), ``"failed"`` (an error; see ``reason``).
        reason: one sentence on why.
        iterations, converged, kkt_residual: of the solve (``converged``: KKT <= tol).
        val_loss_before, val_loss_after: ``1/(2 n_val) ||f(Z_val) - Y_val||^2`` of the serving head
            and of the candidate.
        val_r2_after: ``1 - SSE / SST`` of the candidate on the held-out part.
        n_train, n_val: samples used.
        seconds: wall time of the whole refit (snapshot to commit); solve_seconds: the solver part.
        slot: the store slot written when accepted.
        solver: ``"fista"``, ``"momentum"`` or ``"bcd"`` (``iterations`` counts epochs for bcd).
        renormalized: the candidate carries a normalisation re-estimated from the stream
            (``RefitConfig.renormalize``).
    """

    status: Status
    reason: str
    iterations: int = 0
    converged: bool = False
    kkt_residual: float = float("nan")
    val_loss_before: float = float("nan")
    val_loss_after: float = float("nan")
    val_r2_after: float = float("nan")
    n_train: int = 0
    n_val: int = 0
    seconds: float = 0.0
    solve_seconds: float = 0.0
    slot: str | None = None
    lam: float = float("nan")
    solver: str = ""
    renormalized: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class RefitJob:
    """A refit running in a background thread (returned by :meth:`RefitRuntime.refit_async`)."""

    def __init__(
        self,
        target: Callable[[threading.Event], RefitResult],
        on_cancel: Callable[[], None] | None = None,
    ) -> None:
        self._cancel = threading.Event()
        self._on_cancel = on_cancel
        self._result: RefitResult | None = None
        self._thread = threading.Thread(
            target=self._run, args=(target,), name="convexedge-refit", daemon=True
        )
        self._thread.start()

    def _run(self, target: Callable[[threading.Event], RefitResult]) -> None:
        self._result = target(self._cancel)

    def cancel(self) -> None:
        """Ask the refit to stop after the current iteration (its status becomes ``cancelled``)."""
        self._cancel.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> RefitResult:
        """Wait for the refit and return its result.

        Raises:
            TimeoutError: it is still running after ``timeout`` seconds.
        """
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"refit still running after {timeout} s; call cancel() or wait longer")
        assert self._result is not None
        return self._result


class _MemoryStore:
    """A store that keeps heads in memory only (for simulations and benchmarks)."""

    def __init__(self, head: ConvexHead) -> None:
        self.head, self.generation = head, 1

    def commit(self, head: ConvexHead) -> str:
        self.generation += 1
        self.head = head
        return f"memory:{self.generation}"


def _val_loss(head: ConvexHead, Z: np.ndarray, Y: np.ndarray) -> float:
    """``1/(2n) ||f(Z) - Y||^2`` in row chunks (no (n, P*c) or (n, c) temporaries)."""
    n, tot = Z.shape[0], 0.0
    for s in range(0, n, _VAL_CHUNK):
        r = head.predict_normalized(Z[s : s + _VAL_CHUNK])
        r -= Y[s : s + _VAL_CHUNK]
        tot += float(np.dot(r.ravel(), r.ravel()))
    return tot / (2.0 * n)


def _val_sst(Y: np.ndarray) -> float:
    """``1/(2n) ||Y - mean(Y)||^2`` in row chunks."""
    n = Y.shape[0]
    mean = Y.mean(axis=0, dtype=np.float64).astype(np.float32)
    tot = 0.0
    for s in range(0, n, _VAL_CHUNK):
        r = Y[s : s + _VAL_CHUNK] - mean
        tot += float(np.dot(r.ravel(), r.ravel()))
    return tot / (2.0 * n)


def _chunked_masks(head: ConvexHead) -> Callable[[np.ndarray], np.ndarray]:
    """``head.masks`` computed in row chunks into one (n, P) bool array (no (n, P) float temporaries)."""

    def masks(Z: np.ndarray) -> np.ndarray:
        out = np.empty((Z.shape[0], head.P), bool)
        for s in range(0, Z.shape[0], _VAL_CHUNK):
            out[s : s + _VAL_CHUNK] = head.masks(Z[s : s + _VAL_CHUNK])
        return out

    return masks


class RefitRuntime:
    """Serve, observe and refit one head (see the module docstring).

    Args:
        store: a :class:`HeadStore` (commits are durable) or a :class:`ConvexHead` (in memory only).
        memory_budget_mb: bound on the buffer plus the refit's working memory; the buffer's
            capacity is derived from it when ``buffer.capacity`` is None.
        buffer: stream buffer settings.
        config: refit settings.
        executor: ``"thread"`` solves in the refit's thread (no extra process; the solver holds
            Python's GIL between numpy calls, so predict latency rises during a refit);
            ``"process"`` solves in a persistent worker process (spawned at construction) and
            keeps predict latency flat; the worker's interpreter memory is outside
            ``memory_budget_mb``. Call :meth:`close` (or use ``with``) to stop it. As with any
            ``spawn`` process, the app's main module must be import-safe (the usual
            ``if __name__ == "__main__":`` guard).
        worker_nice: with ``executor="process"``, how much lower the worker's scheduling priority
            is than the app's (POSIX ``nice`` increment, 0..19), so predict calls win a contended
            core; 0 keeps the app's priority.

    Raises:
        ValueError: the buffer and a refit cannot fit in ``memory_budget_mb`` (the message gives
            the size needed).
    """

    def __init__(
        self,
        store: HeadStore | ConvexHead,
        *,
        memory_budget_mb: float = 4.0,
        buffer: BufferConfig | None = None,
        config: RefitConfig | None = None,
        executor: Literal["thread", "process"] = "thread",
        worker_nice: int = 10,
    ) -> None:
        if executor not in ("thread", "process"):
            raise ValueError(f"executor must be 'thread' or 'process', got {executor!r}")
        buffer = BufferConfig() if buffer is None else buffer
        config = RefitConfig() if config is None else config
        if not (
            isinstance(memory_budget_mb, (int, float))
            and math.isfinite(memory_budget_mb)
            and memory_budget_mb > 0
        ):
            raise ValueError(f"memory_budget_mb must be a finite number > 0, got {memory_budget_mb!r}")
        self._store: HeadStore | _MemoryStore = (
            _MemoryStore(store) if isinstance(store, ConvexHead) else store
        )
        self.config = config
        self.memory_budget_bytes = int(memory_budget_mb * _MB)
        head = self._store.head
        self._d_in, self._c, self._P = head.d_in, head.c, head.P
        if config.renormalize != "off" and buffer.mode == "gram":
            raise ValueError(
                f"renormalize={config.renormalize!r} moves the stored rows to a new normalisation, but "
                "buffer mode 'gram' keeps only statistics of the old one; use mode='reservoir' or 'window'"
            )
        if config.solver in ("bcd", "momentum") and buffer.mode == "gram":
            raise ValueError(
                f"solver={config.solver!r} needs the stream's rows, but buffer mode 'gram' keeps only "
                "statistics; use mode='reservoir' or 'window', or solver='fista' / 'auto'"
            )
        if buffer.mode != "gram" and buffer.capacity is None:
            buffer = self._fit_capacity(head, buffer)
        need = StreamBuffer.estimate_bytes(head.d_in, head.c, head.P, buffer, buffer.capacity or 0)
        need += self._workspace_bytes(head, buffer) + 2 * head.nbytes()
        if need > self.memory_budget_bytes:
            raise ValueError(
                f"buffer ({buffer.mode}, capacity {buffer.capacity}) plus a refit need {need / _MB:.2f} MB, "
                f"more than memory_budget_mb={memory_budget_mb}; lower the capacity, use mode='reservoir', "
                f"or raise the budget"
            )
        self.buffer = StreamBuffer(head.d_in, head.c, head.P, buffer)
        self._norm_head = head  # the head whose normalisation and gates the buffer's rows use
        # held while a row is standardised and stored, and while the buffer moves to another
        # normalisation (never by predict)
        self._basis_lock = threading.Lock()
        self._busy = threading.Lock()
        self._last_step: float | None = None
        self.executor = executor
        # the worker process starts now so its interpreter is warm by the first refit
        self._worker: RefitWorker | None = RefitWorker(nice=worker_nice) if executor == "process" else None

    def close(self) -> None:
        """Stop the refit worker process, if any (a later refit would start a new one)."""
        if self._worker is not None:
            self._worker.close()

    def __enter__(self) -> RefitRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ memory
    def _solver_for(self, head: ConvexHead, buffer: BufferConfig, n: int | None = None) -> str:
        """The solver a refit uses: the configured one, or the resolution of ``"auto"``."""
        if self.config.solver != "auto":
            return self.config.solver
        if buffer.mode == "gram":
            return "fista"
        fista_kb = self._workspace_bytes(head, buffer, n, solver="fista") / 1024
        return "momentum" if fista_kb > self.config.auto_workspace_kb else "fista"

    def _workspace_bytes(
        self, head: ConvexHead, buffer: BufferConfig, n: int | None = None, solver: str | None = None
    ) -> int:
        """Upper estimate of a refit's working memory: solver state, images, chunk work, masks."""
        P, d, c = head.P, head.d, head.c
        v = 4 * P * d * c
        if buffer.mode == "gram":
            return 12 * v
        n = buffer.capacity if n is None else n
        n = n or 0
        solver = self._solver_for(head, buffer, n) if solver is None else solver
        val = 3 * 4 * _VAL_CHUNK * P * c  # chunked validation
        if solver == "bcd":
            b = self.config.bcd
            chunk = min(b.row_chunk, max(1, n))
            # the iterate (a copy of V), the residual (n, c), the masks, the block metric, two row
            # chunks, a few (d, c) block temporaries; the candidate head is counted under "heads",
            # its construction copies V once more
            return 3 * v + 4 * n * c + n * P + 4 * d * P * max(b.rank, 1) + 8 * chunk * c + 32 * d * c + val
        if solver == "momentum":
            chunk = min(self.config.momentum.row_chunk, max(1, n))
            # the iterate and the second array (V each), the masks, one (chunk, P c) chunk and its
            # float32 masks, a (chunk, c) residual, the power iteration's (n,) vectors and
            # (256, P) arrays; the result's copy back to (P, d, c) once more
            return 3 * v + n * P + 4 * chunk * (P * c + P + c) + 8 * n + 4 * d * P + 8 * 256 * P + val
        chunk = min(self.config.fista.row_chunk, max(1, n))
        # measured (tracemalloc) on the mcu and phone heads: ~10 V-sized arrays, ~6 (n, c) images,
        # the float32 masks, one chunk workspace; 12 V leaves headroom
        return 12 * v + 8 * 4 * n * c + 5 * n * P + 2 * 4 * chunk * P * c

    def _fit_capacity(self, head: ConvexHead, buffer: BufferConfig) -> BufferConfig:
        lo, hi = 0, 1 << 24
        while lo < hi:  # largest capacity whose buffer and refit fit the budget
            mid = (lo + hi + 1) // 2
            cfg = BufferConfig(**{**asdict(buffer), "capacity": mid})
            need = StreamBuffer.estimate_bytes(head.d_in, head.c, head.P, cfg, mid)
            need += self._workspace_bytes(head, cfg) + 2 * head.nbytes()
            lo, hi = (mid, hi) if need <= self.memory_budget_bytes else (lo, mid - 1)
        if lo < 1:
            raise ValueError(
                f"memory_budget_mb={self.memory_budget_bytes / _MB:g} cannot hold a refit of this head "
                f"(P={head.P}, d={head.d}, c={head.c}); raise the budget"
            )
        return BufferConfig(**{**asdict(buffer), "capacity": lo})

    def memory_bytes(self) -> dict[str, int]:
        """Memory the runtime holds or may use: buffer (allocated), refit workspace (estimate), heads."""
        head = self.head
        buf = self.buffer.nbytes()
        work = self._workspace_bytes(head, self.buffer.config)
        heads = 2 * head.nbytes()  # serving head + a candidate during a refit
        return {"buffer": buf, "refit_workspace": work, "heads": heads, "total": buf + work + heads,
                "budget": self.memory_budget_bytes}  # fmt: skip

    @property
    def refit_solver(self) -> str:
        """The solver a refit would use now: ``"fista"``, ``"momentum"`` or ``"bcd"`` (``"auto"``
        resolved)."""
        return self._solver_for(self.head, self.buffer.config)

    # ------------------------------------------------------------------ serving
    @property
    def head(self) -> ConvexHead:
        """The head being served (an immutable object)."""
        return self._store.head

    def predict(self, x: Any) -> np.ndarray:
        """Logits ``(n, c)`` of the serving head for features ``x: (n, d_in)``; takes no lock.

        Raises:
            DataError: wrong shape or dtype, empty, or NaN/Inf.
        """
        return self._store.head.predict(x)

    def observe(self, x: Any, target: Any) -> None:
        """Add samples of the stream: features ``x: (n, d_in)`` and teacher outputs ``target: (n, c)``.

        Raises:
            DataError: wrong shapes or dtypes, different ``n``, NaN/Inf (nothing is stored then).
        """
        z = check_features(x, self._d_in, "x")
        y = check_features(target, self._c, "target")
        if z.shape[0] != y.shape[0]:
            raise DataError(
                f"x and target must have the same number of samples, got {z.shape[0]} and {y.shape[0]}"
            )
        with self._basis_lock:
            head = self._norm_head
            zn = head.normalize(z)
            masks = head.masks(zn) if self.buffer.config.mode == "gram" else None
            self.buffer.add(zn, y, masks)

    # ------------------------------------------------------------------ refit
    def refit(
        self, time_budget_s: float = 1.0, on_progress: Callable[[RefitProgress], None] | None = None
    ) -> RefitResult:
        """Refit in the calling thread (blocks); see :meth:`refit_async`.

        Emits :class:`ConvergenceWarning` when the solve stopped at ``max_iter`` or the time budget
        before reaching its tolerance (the result still says ``converged=False``).

        Raises:
            RefitBusyError: another refit of this runtime is running.
        """
        self._check_budget(time_budget_s)
        if not self._busy.acquire(blocking=False):
            raise RefitBusyError("a refit is already running; wait for its job.result() or cancel() it")
        try:
            res = self._run(threading.Event(), time_budget_s, on_progress)
        finally:
            self._busy.release()
        if res.status in ("accepted", "rejected") and res.iterations and not res.converged:
            tol = getattr(self.config, res.solver).tol
            warnings.warn(
                f"refit stopped before tol={tol:g} (KKT {res.kkt_residual:.2g} after {res.iterations} "
                f"{'epochs' if res.solver == 'bcd' else 'iterations'}); raise time_budget_s or "
                f"{res.solver}.max_iter",
                ConvergenceWarning,
                stacklevel=2,
            )
        return res

    def refit_async(
        self, time_budget_s: float = 1.0, on_progress: Callable[[RefitProgress], None] | None = None
    ) -> RefitJob:
        """Start a refit in a background thread and return its :class:`RefitJob`.

        Args:
            time_budget_s: wall-clock budget of the solve (validation and commit come after it).
            on_progress: called with a :class:`RefitProgress` after every iteration, in the refit
                thread; an exception there ends the refit with status ``failed``.

        Raises:
            RefitBusyError: another refit of this runtime is running.
        """
        self._check_budget(time_budget_s)
        if not self._busy.acquire(blocking=False):
            raise RefitBusyError("a refit is already running; wait for its job.result() or cancel() it")

        def target(cancel: threading.Event) -> RefitResult:
            try:
                return self._run(cancel, time_budget_s, on_progress)
            finally:
                self._busy.release()

        return RefitJob(target, None if self._worker is None else self._worker.cancel)

    @staticmethod
    def _check_budget(time_budget_s: float) -> None:
        if not (
            isinstance(time_budget_s, (int, float)) and math.isfinite(time_budget_s) and time_budget_s > 0
        ):
            raise ValueError(f"time_budget_s must be a finite number > 0, got {time_budget_s!r}")

    def _run(
        self,
        cancel: threading.Event,
        time_budget_s: float,
        on_progress: Callable[[RefitProgress], None] | None,
    ) -> RefitResult:
        t0 = time.perf_counter()
        try:
            return self._refit(cancel, t0, time_budget_s, on_progress)
        except Exception as exc:  # the serving head is untouched whatever happened
            logger.exception("refit failed")
            return RefitResult("failed", f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - t0)

    def _refit(
        self,
        cancel: threading.Event,
        t0: float,
        time_budget_s: float,
        on_progress: Callable[[RefitProgress], None] | None,
    ) -> RefitResult:
        cfg = self.config
        head = self.head
        if head is not self._norm_head and not self._rebase(head):
            return RefitResult("rejected", "the serving head's gates changed; buffer cleared")
        solver = self._solver_for(head, self.buffer.config)
        self.buffer.freeze()
        moved: _Renorm | None = None  # applied to the stored rows; undone unless the candidate commits
        committed = False
        try:
            n_train, n_val = self.buffer.n_train, self.buffer.n_val
            if n_train < cfg.min_train or n_val < cfg.min_val:
                return RefitResult(
                    "rejected",
                    f"too few samples: {n_train} training (need {cfg.min_train}), {n_val} held-out "
                    f"(need {cfg.min_val}); observe more",
                    n_train=n_train, n_val=n_val, seconds=time.perf_counter() - t0,
                )  # fmt: skip
            held_out = self.buffer.snapshot()
            before = _val_loss(head, held_out.val_Z, held_out.val_Y)  # in the serving normalisation
            del held_out
            if cfg.renormalize != "off":
                moved = self._renormalize(head, cfg.renormalize)
            snap = self.buffer.snapshot(_chunked_masks(head))  # masks depend on the gates only
            assert snap.train is not None  # n_train >= min_train >= 1
            lam = head.lam if cfg.lam is None else float(cfg.lam)
            fcfg: FistaConfig | BcdConfig | MomentumConfig = cfg.fista
            if solver in ("bcd", "momentum"):
                fcfg = getattr(cfg, solver)
            elif cfg.fista.step_init is None and self._last_step is not None:
                fcfg = FistaConfig(**{**asdict(cfg.fista), "step_init": self._last_step})
            deadline = t0 + time_budget_s
            on_iter = None
            if on_progress is not None:

                def on_iter(it: int, fx: float, kkt: float) -> None:
                    on_progress(RefitProgress(it, fx, kkt, time.perf_counter() - t0))

            if self._worker is not None:
                out = self._worker.solve(
                    snap.train, head.V, lam, fcfg, head.group, anchor_mu=cfg.anchor,
                    deadline=deadline, on_iter=on_iter, cancel=cancel,
                )  # fmt: skip
                cancelled = out.cancelled
            else:
                out = solve(
                    snap.train, head.V, lam, fcfg, head.group, anchor_mu=cfg.anchor,
                    should_stop=cancel.is_set, deadline=deadline, on_iter=on_iter,
                )  # fmt: skip
                cancelled = out.cancelled
            kkt, converged = out.kkt, out.converged
            common = {
                "iterations": out.iterations, "converged": converged, "kkt_residual": kkt,
                "n_train": n_train, "n_val": n_val, "solve_seconds": out.seconds, "lam": lam,
                "solver": solver, "renormalized": moved is not None,
            }  # fmt: skip
            if cancelled and not converged:
                return RefitResult(
                    "cancelled", "cancelled by the app", seconds=time.perf_counter() - t0, **common
                )
            if out.iterations == 0 and not converged:
                return RefitResult(
                    "out_of_budget",
                    f"time budget {time_budget_s:g} s ran out before one iteration; raise time_budget_s",
                    seconds=time.perf_counter() - t0, **common,
                )  # fmt: skip
            if solver == "fista":
                self._last_step = out.step
            x = out.x
            del out  # release the solver's memory (residual, images) before the candidate is built
            val_Z, val_Y = snap.val_Z, snap.val_Y
            del snap  # and the training masks
            if not all(np.isfinite(x[i]).all() for i in range(x.shape[0])):
                return RefitResult(
                    "failed", "the solve produced NaN/Inf", seconds=time.perf_counter() - t0, **common
                )
            x = np.ascontiguousarray(x, dtype=np.float32)
            x.flags.writeable = False  # handed over to the candidate head, which then needs no copy
            cand = head.replace_weights(
                x,
                info={**head.info, "refit": {"samples": n_train, "iterations": common["iterations"],
                                             "lam": lam, "kkt": kkt, "time": time.time(),
                                             "renormalize": cfg.renormalize if moved else "off"}},
                mean=None if moved is None else moved.mean,
                std=None if moved is None else moved.std,
            )  # fmt: skip
            after = _val_loss(cand, val_Z, val_Y)
            sst = _val_sst(val_Y)
            r2 = 1.0 - after / sst if sst > 0 else float("-inf")
            common.update(val_loss_before=before, val_loss_after=after, val_r2_after=r2)
            if not after < before * (1.0 - cfg.min_improvement):
                reason = f"validation loss {after:.4g} is not below {before:.4g} by {cfg.min_improvement:g}"
                return RefitResult("rejected", reason, seconds=time.perf_counter() - t0, **common)
            if r2 < cfg.min_val_r2:
                reason = (
                    f"the candidate explains the held-out targets with R^2={r2:.3f} < "
                    f"min_val_r2={cfg.min_val_r2:g}: "
                    f"the stream's targets look unpredictable (garbage or poisoned)"
                )
                return RefitResult("rejected", reason, seconds=time.perf_counter() - t0, **common)
            if self.head is not head:
                return RefitResult(
                    "rejected", "the serving head changed during the refit (rollback?)",
                    seconds=time.perf_counter() - t0, **common,
                )  # fmt: skip
            slot = self._store.commit(cand)  # durable first, then the reference swap inside the store
            with self._basis_lock:  # rows staged during the refit follow the stored ones
                if moved is not None:
                    self.buffer.restandardize(moved.scale, moved.shift, "staged")
                self._norm_head = self._store.head
            committed = True
            return RefitResult(
                "accepted", f"validation loss {before:.4g} -> {after:.4g}", slot=slot,
                seconds=time.perf_counter() - t0, **common,
            )  # fmt: skip
        finally:
            if moved is not None and not committed:  # back to the serving normalisation
                self.buffer.restandardize(1.0 / moved.scale, -moved.shift / moved.scale, "stored")
            self.buffer.thaw()

    def _renormalize(self, head: ConvexHead, mode: str) -> _Renorm:
        """Re-estimate the normalisation from the training rows and move the stored rows to it.

        In the serving head's standardised coordinates the rows have per-feature mean ``mu`` and
        spread ``sd`` (``sd = 1`` for ``mode="mean"``); the new normalisation is
        ``mean' = mean + std * mu``, ``std' = std * sd``, and a row moves by ``z' = (z - mu) / sd``.
        """
        mu, var = self.buffer.moments()
        sd = np.sqrt(var) if mode == "mean_std" else np.ones_like(mu)
        sd = np.where(sd > _MIN_STD_RATIO, sd, 1.0)
        scale, shift = (1.0 / sd).astype(np.float32), (-mu / sd).astype(np.float32)
        mean = (head.mean + head.std * mu).astype(np.float32)  # type: ignore[operator]
        std = (head.std * sd).astype(np.float32)  # type: ignore[operator]
        self.buffer.restandardize(scale, shift, "stored")
        return _Renorm(scale, shift, mean, std)

    def _rebase(self, head: ConvexHead) -> bool:
        """The serving head is not the one the buffer's rows were standardised with (a rollback,
        or a commit by another runtime): move the rows to its normalisation when the gates are the
        same and the buffer keeps rows; otherwise clear the buffer. True if the rows were kept."""
        old = self._norm_head
        same_gates = old.gate_spec == head.gate_spec and np.array_equal(old.gates, head.gates)  # type: ignore[arg-type]
        same_norm = np.array_equal(old.mean, head.mean) and np.array_equal(old.std, head.std)  # type: ignore[arg-type]
        with self._basis_lock:
            kept = same_gates and (same_norm or self.buffer.config.mode != "gram")
            if not kept:
                self.buffer.clear()
            elif not same_norm:  # z' = (z * std_old + mean_old - mean_new) / std_new
                scale = old.std / head.std  # type: ignore[operator]
                shift = (old.mean - head.mean) / head.std  # type: ignore[operator]
                self.buffer.restandardize(scale, shift, "stored")
            self._norm_head = head
        return kept


class _Renorm(NamedTuple):
    """A re-estimated normalisation and the map ``z' = z * scale + shift`` that moved the rows to it."""

    scale: np.ndarray
    shift: np.ndarray
    mean: np.ndarray
    std: np.ndarray
