"""The refit solve, run in the calling thread or in a separate worker process.

:func:`solve` is the FISTA loop of a refit: warm start, one iteration at a time, a stop test
(cancel) and a deadline between iterations, an optional per-iteration callback. The runtime calls it
directly (``executor="thread"``) or through a :class:`RefitWorker` (``executor="process"``): a
persistent child process started with the ``spawn`` method that receives the training data over a
pipe, solves, and sends back the iterate. Predict then never competes with the solver for Python's
GIL (a thread solver holds it between numpy calls, which shows up as predict latency spikes);
validation and the atomic commit stay in the parent, so the semantics of a refit do not change.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from convexedge.device.fista import (
    FistaConfig,
    GramData,
    RowData,
    fista_init,
    fista_step,
    kkt_normaliser,
    kkt_residual,
    make_operator,
)

__all__ = ["RefitWorker", "SolveOutcome", "certifiable_tol", "check_solve_inputs", "solve"]

# With the anchor mu/2 ||V - V0||^2, the anchor's gradient mu (V - V0) is formed from float32
# iterates whose rounding, |V| eps32, mu amplifies: no solver can certify a relative KKT residual
# much below eps32 mu ||V0|| / ||grad f(0)||. The stalls measured sit at 0.2-1.2x that figure.
_FLOOR_FACTOR = 2.0
_EPS32 = float(np.finfo(np.float32).eps)


class SolveOutcome(NamedTuple):
    """What a solve returns: the last iterate and how it stopped."""

    x: np.ndarray
    iterations: int
    kkt: float
    converged: bool
    step: float
    cancelled: bool
    seconds: float


def check_solve_inputs(
    shape: tuple[int, int, int], lam: float, mu: float, mu_name: str = "mu", **arrays: np.ndarray | None
) -> None:
    """The checks every row solver makes on entry: ``lam`` and the anchor weight ``mu`` (reported as
    ``mu_name``) finite and ``>= 0``, and each named array (None: absent) of shape ``(P, d, c)``.

    Raises:
        ValueError: naming the first argument that fails.
    """
    for name, a in arrays.items():
        if a is not None and tuple(a.shape) != shape:
            raise ValueError(f"{name} must have shape (P, d, c) = {shape}, got {a.shape}")
    for name, v in (("lam", lam), (mu_name, mu)):
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")


def certifiable_tol(tol: float, mu: float, V0: np.ndarray, g0: float) -> float:
    """The tolerance a float32 solve with anchor weight ``mu`` toward ``V0: (P, d, c)`` stops at:
    ``tol``, raised to ``2 eps32 mu ||V0|| / g0`` (``g0 = ||grad f(0)||``, the KKT normaliser) when
    a strong anchor puts that float32 floor above it, so the solve ends there instead of spending
    its whole budget. ``mu = 0``: ``tol``."""
    if mu <= 0:
        return tol
    v0 = math.sqrt(sum(float(np.vdot(Vp, Vp)) for Vp in V0))  # gate by gate: no V-sized temporary
    return max(tol, _FLOOR_FACTOR * _EPS32 * mu * v0 / max(g0, 1e-300))


def solve(
    train: RowData | GramData,
    V0: np.ndarray,
    lam: float,
    config: FistaConfig,
    group: str,
    *,
    anchor_mu: float = 0.0,
    should_stop: Callable[[], bool] = lambda: False,
    deadline: float = float("inf"),
    on_iter: Callable[[int, float, float], None] | None = None,
) -> SolveOutcome:
    """FISTA from ``V0`` until the KKT tolerance, ``max_iter``, ``should_stop()`` or ``deadline``.

    ``anchor_mu > 0`` adds ``anchor_mu/2 ||V - V0||^2`` (a pull toward the warm start). ``deadline``
    is a :func:`time.perf_counter` value; ``on_iter(iteration, objective, kkt)`` runs after every
    iteration (an exception there ends the solve and propagates).
    """
    if not isinstance(config, FistaConfig):  # the row-only solvers, by their config's type
        from convexedge.device.bcd import bcd_solve
        from convexedge.device.momentum import MomentumConfig, momentum_solve

        if isinstance(config, MomentumConfig):
            return momentum_solve(
                train, V0, lam, config, group, anchor_mu=anchor_mu,  # type: ignore[arg-type]
                should_stop=should_stop, deadline=deadline, on_iter=on_iter,
            )  # fmt: skip

        return bcd_solve(
            train, V0, lam, config, group, anchor_mu=anchor_mu,  # type: ignore[arg-type]
            should_stop=should_stop, deadline=deadline, on_iter=on_iter,
        )  # fmt: skip
    ts = time.perf_counter()
    op = make_operator(train, config, anchor=V0, mu=anchor_mu)
    state = fista_init(op, lam, config, V0, group)  # type: ignore[arg-type]
    g0 = kkt_normaliser(op, group)  # type: ignore[arg-type]
    tol = certifiable_tol(config.tol, anchor_mu, V0, g0)
    kkt = kkt_residual(op, state.x, lam, state.grad_x, group, g0)  # type: ignore[arg-type]
    converged = kkt <= tol
    cancelled = False
    while not converged and state.it < config.max_iter:
        if should_stop():
            cancelled = True
            break
        if time.perf_counter() >= deadline:
            break
        state = fista_step(op, lam, config, state, group)  # type: ignore[arg-type]
        kkt = kkt_residual(op, state.x, lam, state.grad_x, group, g0)  # type: ignore[arg-type]
        converged = kkt <= tol
        if on_iter is not None:
            on_iter(state.it, state.fx, kkt)
    return SolveOutcome(state.x, state.it, kkt, converged, state.step, cancelled, time.perf_counter() - ts)


# ----------------------------------------------------------------------------- worker process
def _serve(conn: Any, cancel: Any, nice: int = 0) -> None:  # pragma: no cover - runs in the child
    """Child loop: receive a request dict, solve, send ("done", outcome) or ("error", text).

    ``nice``: first lower this process's scheduling priority by that much (POSIX ``nice``), so a
    core shared with the app's predict calls goes to them first.
    """
    if nice > 0 and hasattr(os, "nice"):
        try:
            os.nice(nice)
        except OSError:  # not permitted here: run at the app's priority
            pass
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            return
        if req is None:
            return
        try:
            send_progress = req["progress"]

            def on_iter(it: int, fx: float, kkt: float) -> None:
                conn.send(("progress", it, fx, kkt))

            out = solve(
                req["train"], req["V0"], req["lam"], req["config"], req["group"],
                anchor_mu=req["anchor_mu"], should_stop=cancel.is_set,
                deadline=time.perf_counter() + req["budget_s"],
                on_iter=on_iter if send_progress else None,
            )  # fmt: skip
            conn.send(("done", out))
        except Exception as exc:
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _shutdown(conn: Any, proc: Any) -> None:
    try:
        conn.send(None)
    except Exception:
        pass
    proc.join(timeout=2)
    if proc.is_alive():
        proc.terminate()
        proc.join(timeout=2)
    conn.close()


class RefitWorker:
    """A persistent solver process (``spawn`` start method; numpy only in the child).

    The process starts at construction (its interpreter and numpy load in the background) and
    serves one solve at a time; :meth:`close` (or garbage collection, or interpreter exit) stops it.
    If it dies, the running solve raises and the next one starts a fresh process.

    Args:
        nice: how much lower than the app's the worker's scheduling priority is (POSIX ``nice``
            increment, 0..19; ignored where the OS has no ``nice``). Background work at a lower
            priority, as phones run it, leaves a contended core to the app's predict calls.
    """

    def __init__(self, nice: int = 10) -> None:
        if not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19:
            raise ValueError(f"nice must be an int in 0..19, got {nice!r}")
        self.nice = nice
        self._ctx = mp.get_context("spawn")
        self._lock = threading.Lock()
        self._start()

    def _start(self) -> None:
        self.cancel_event = self._ctx.Event()
        parent, child = self._ctx.Pipe(duplex=True)
        self._proc = self._ctx.Process(
            target=_serve,
            args=(child, self.cancel_event, self.nice),
            name="convexedge-refit-worker",
            daemon=True,
        )
        self._proc.start()
        child.close()
        self._conn = parent
        self._finalizer = weakref.finalize(self, _shutdown, parent, self._proc)

    @property
    def alive(self) -> bool:
        return self._proc.is_alive()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def close(self) -> None:
        """Stop the worker process (idempotent)."""
        self._finalizer()

    def cancel(self) -> None:
        """Ask the running solve to stop after its current iteration."""
        self.cancel_event.set()

    def solve(
        self,
        train: RowData | GramData,
        V0: np.ndarray,
        lam: float,
        config: FistaConfig,
        group: str,
        *,
        anchor_mu: float = 0.0,
        deadline: float = float("inf"),
        on_iter: Callable[[int, float, float], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> SolveOutcome:
        """Run :func:`solve` in the worker; blocks (without the GIL) until it answers.

        ``cancel``: a flag set before this call (a cancel that came before the solve started).

        Raises:
            RuntimeError: the worker died or the solve raised there (the message says which).
        """
        with self._lock:
            if not self._finalizer.alive or not self._proc.is_alive():
                self._finalizer()
                self._start()
            self.cancel_event.clear()
            if cancel is not None and cancel.is_set():
                self.cancel_event.set()
            budget = deadline - time.perf_counter()
            req = {
                "train": train, "V0": np.asarray(V0, np.float32), "lam": float(lam), "config": config,
                "group": group, "anchor_mu": float(anchor_mu), "budget_s": max(budget, 0.0) if budget < 1e300
                else 1e300, "progress": on_iter is not None,
            }  # fmt: skip
            failure: BaseException | None = None
            try:
                self._conn.send(req)
                while True:
                    msg = self._conn.recv()
                    if msg[0] == "progress":
                        if on_iter is not None and failure is None:
                            try:
                                on_iter(msg[1], msg[2], msg[3])
                            except BaseException as exc:  # stop the solve, report after it answers
                                failure = exc
                                self.cancel_event.set()
                        continue
                    if msg[0] == "error":
                        raise RuntimeError(f"refit worker: {msg[1]}")
                    break
            except (EOFError, OSError, BrokenPipeError) as exc:
                self._finalizer()
                raise RuntimeError(f"refit worker process died ({type(exc).__name__})") from exc
            if failure is not None:
                raise failure
            return msg[1]
