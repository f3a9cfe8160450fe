"""A bounded buffer of the observed stream: reservoir, sliding window, or Gram statistics.

Every observed sample goes either to the *training* part or, with probability ``val_fraction``, to
the *held-out* part that judges a refit. Both parts are preallocated at construction, so memory is
fixed and known (:meth:`StreamBuffer.nbytes`) however long the stream runs:

* ``"reservoir"``: a uniform sample of everything seen (Vitter's algorithm R);
* ``"window"``: the most recent samples (a ring buffer), for a stream that keeps drifting;
* ``"gram"``: the training part keeps only the least-squares sufficient statistics
  ``G = A^T A: (P d, P d)``, ``B = A^T Y: (P, d, c)``, ``||Y||^2`` and ``n`` (optionally decayed by
  ``gram_decay`` per observed batch so old data fades); memory is ``O((P d)^2)``, not ``O(n)``.

Features are stored *standardised* with the serving head's normalisation, so a refit reads the
buffer in place with no copy; a refit that re-estimates the normalisation from the stream
(``RefitConfig(renormalize=...)``) moves the stored rows to the new one in place
(:meth:`StreamBuffer.restandardize`, row modes only). While a refit reads it (:meth:`freeze`), new samples
are staged in a small pending area and folded in by :meth:`thaw`.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np

from convexedge.device.fista import GramData, RowData

__all__ = ["BufferConfig", "BufferSnapshot", "StreamBuffer"]

Mode = Literal["reservoir", "window", "gram"]


@dataclass(frozen=True, kw_only=True)
class BufferConfig:
    """How the runtime keeps the stream (JSON-serialisable)."""

    mode: Mode = "reservoir"
    # Training rows kept (reservoir/window); None: as many as the runtime's memory budget allows.
    capacity: int | None = None
    # Share of observed samples routed to the held-out part that validates every refit.
    val_fraction: float = 0.2
    # Held-out rows kept; None: capacity * val_fraction / (1 - val_fraction) (256 in gram mode).
    val_capacity: int | None = None
    # Rows observed while a refit runs are staged here (as a share of the training capacity).
    pending_fraction: float = 0.25
    # Gram mode: statistics are multiplied by this before each observed batch is added (1 = keep all).
    gram_decay: float = 1.0
    seed: int = 0  # routing and reservoir draws

    def __post_init__(self) -> None:
        if self.mode not in ("reservoir", "window", "gram"):
            raise ValueError(f"mode must be 'reservoir', 'window' or 'gram', got {self.mode!r}")
        for name in ("capacity", "val_capacity"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"{name} must be None or an int >= 1, got {v!r}")
        if not (isinstance(self.val_fraction, (int, float)) and 0 < self.val_fraction < 1):
            raise ValueError(f"val_fraction must lie in (0, 1), got {self.val_fraction!r}")
        if not (isinstance(self.pending_fraction, (int, float)) and 0 < self.pending_fraction <= 1):
            raise ValueError(f"pending_fraction must lie in (0, 1], got {self.pending_fraction!r}")
        if not (isinstance(self.gram_decay, (int, float)) and 0 < self.gram_decay <= 1):
            raise ValueError(f"gram_decay must lie in (0, 1], got {self.gram_decay!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class BufferSnapshot:
    """What a refit reads: the training data (rows or Gram) and the held-out rows (views)."""

    train: RowData | GramData | None
    val_Z: np.ndarray
    val_Y: np.ndarray
    n_train: int


class _Rows:
    """Preallocated (cap, d_in) / (cap, c) rows filled as a reservoir, a ring, or once ("fill")."""

    def __init__(self, cap: int, d_in: int, c: int, mode: str, rng: np.random.Generator) -> None:
        self.Z = np.zeros((cap, d_in), np.float32)
        self.Y = np.zeros((cap, c), np.float32)
        self.cap, self.mode, self.rng = cap, mode, rng
        self.seen = 0

    @property
    def size(self) -> int:
        return min(self.seen, self.cap)

    def add(self, z: np.ndarray, y: np.ndarray) -> None:
        k = z.shape[0]
        if k == 0:
            return
        ts = self.seen + np.arange(k)
        if self.mode == "window":
            idx = ts % self.cap
            keep = np.ones(k, bool)
        elif self.mode == "fill":  # staging area: rows past the capacity are dropped
            idx = ts
            keep = ts < self.cap
        else:  # algorithm R: sample t replaces a uniform slot with probability cap / (t + 1)
            j = self.rng.integers(0, ts + 1)
            idx = np.where(ts < self.cap, ts, j)
            keep = idx < self.cap
        # later samples win when two land in one slot (sequential semantics)
        idx_k = idx[keep]
        rows = np.flatnonzero(keep)
        _, last = np.unique(idx_k[::-1], return_index=True)
        sel = len(idx_k) - 1 - last
        self.Z[idx_k[sel]] = z[rows[sel]]
        self.Y[idx_k[sel]] = y[rows[sel]]
        self.seen += k

    def clear(self) -> None:
        self.seen = 0

    def nbytes(self) -> int:
        return int(self.Z.nbytes + self.Y.nbytes)


class _Gram:
    """Decayed sufficient statistics of the training rows."""

    def __init__(self, P: int, d: int, c: int, decay: float) -> None:
        self.G = np.zeros((P * d, P * d), np.float32)
        self.B = np.zeros((P * d, c), np.float32)
        self.yy, self.n, self.decay, self.P, self.d = 0.0, 0.0, decay, P, d
        self.seen = 0

    def add(self, z: np.ndarray, y: np.ndarray, masks: np.ndarray, chunk: int = 32) -> None:
        if z.shape[0] == 0:
            return
        if self.decay < 1.0:
            self.G *= np.float32(self.decay)
            self.B *= np.float32(self.decay)
            self.yy *= self.decay
            self.n *= self.decay
        for s in range(0, z.shape[0], chunk):
            zc, yc, mc = z[s : s + chunk], y[s : s + chunk], masks[s : s + chunk]
            m = zc.shape[0]
            z1 = np.concatenate([zc, np.ones((m, 1), np.float32)], axis=1)
            Dz = (mc[:, :, None] * z1[:, None, :]).reshape(m, self.P * self.d).astype(np.float32)
            self.G += Dz.T @ Dz
            self.B += Dz.T @ yc
            self.yy += float(np.sum(yc.astype(np.float64) ** 2))
            self.n += m
        self.seen += z.shape[0]

    def clear(self) -> None:
        self.G[...] = 0
        self.B[...] = 0
        self.yy, self.n, self.seen = 0.0, 0.0, 0

    def nbytes(self) -> int:
        return int(self.G.nbytes + self.B.nbytes)


class StreamBuffer:
    """Bounded storage of the observed stream (see the module docstring).

    Args:
        d_in: features per sample.
        c: outputs per sample.
        P: gates of the head (Gram mode sizes its statistics with it).
        config: the mode and sizes; ``config.capacity`` must be set (the runtime resolves ``None``).

    ``add`` takes already validated, standardised rows; the runtime does that at ``observe``.
    """

    def __init__(self, d_in: int, c: int, P: int, config: BufferConfig) -> None:
        if config.mode != "gram" and config.capacity is None:
            raise ValueError("StreamBuffer needs config.capacity (RefitRuntime derives it from the budget)")
        self.config, self.d_in, self.c, self.P = config, d_in, c, P
        self._rng = np.random.default_rng(config.seed)
        cap = config.capacity or 0
        vcap = config.val_capacity or (
            256
            if config.mode == "gram"
            else max(1, math.ceil(cap * config.val_fraction / (1 - config.val_fraction)))
        )
        sub = "window" if config.mode == "window" else "reservoir"
        self._val = _Rows(vcap, d_in, c, sub, self._rng)
        self._train: _Rows | _Gram
        if config.mode == "gram":
            self._train = _Gram(P, d_in + 1, c, config.gram_decay)
            pend = max(16, math.ceil(vcap * config.pending_fraction / config.val_fraction))
        else:
            self._train = _Rows(cap, d_in, c, sub, self._rng)
            pend = max(16, math.ceil(cap * config.pending_fraction))
        self._pending = _Rows(pend, d_in, c, "fill", self._rng)
        self._pending_masks = np.zeros((pend, P), bool) if config.mode == "gram" else None
        self._lock = threading.Lock()
        self._frozen = False
        self.dropped = 0  # samples observed during refits that did not fit in the pending area

    @staticmethod
    def estimate_bytes(d_in: int, c: int, P: int, config: BufferConfig, capacity: int) -> int:
        """Bytes a buffer with ``capacity`` training rows would preallocate."""
        row = 4 * (d_in + c)
        if config.mode == "gram":
            d = d_in + 1
            vcap = config.val_capacity or 256
            pend = max(16, math.ceil(vcap * config.pending_fraction / config.val_fraction))
            return 4 * ((P * d) ** 2 + P * d * c) + row * (vcap + pend) + pend * P
        vcap = config.val_capacity or max(
            1, math.ceil(capacity * config.val_fraction / (1 - config.val_fraction))
        )
        pend = max(16, math.ceil(capacity * config.pending_fraction))
        return row * (capacity + vcap + pend)

    def nbytes(self) -> int:
        """Bytes the buffer's arrays take (fixed at construction)."""
        extra = 0 if self._pending_masks is None else self._pending_masks.nbytes
        return self._train.nbytes() + self._val.nbytes() + self._pending.nbytes() + extra

    @property
    def seen(self) -> int:
        """Samples observed since the last :meth:`clear` (staged or dropped ones included)."""
        return self._train.seen + self._val.seen + self._pending.seen + self.dropped

    @property
    def n_train(self) -> int:
        t = self._train
        return t.size if isinstance(t, _Rows) else int(round(t.n))

    @property
    def n_val(self) -> int:
        return self._val.size

    def add(self, z: np.ndarray, y: np.ndarray, masks: np.ndarray | None = None) -> None:
        """Route rows ``z: (k, d_in)``, ``y: (k, c)`` (and Gram-mode ``masks: (k, P)``) into the buffer."""
        with self._lock:
            if self._frozen:
                before = self._pending.seen
                self._pending.add(z, y)
                if self._pending_masks is not None and masks is not None:
                    # staged Gram rows keep their masks (the "fill" area stores row t at slot t)
                    k = z.shape[0]
                    ts = before + np.arange(k)
                    fit = ts < self._pending.cap
                    self._pending_masks[ts[fit]] = masks[fit]
                over = max(0, self._pending.seen - self._pending.cap)
                self.dropped += min(over, z.shape[0])
                return
            self._route(z, y, masks)

    def _route(self, z: np.ndarray, y: np.ndarray, masks: np.ndarray | None) -> None:
        to_val = self._rng.random(z.shape[0]) < self.config.val_fraction
        self._val.add(z[to_val], y[to_val])
        tr = ~to_val
        if isinstance(self._train, _Gram):
            assert masks is not None  # the runtime always passes masks in gram mode
            self._train.add(z[tr], y[tr], masks[tr])
        else:
            self._train.add(z[tr], y[tr])

    def moments(self, chunk: int = 32) -> tuple[np.ndarray, np.ndarray]:
        """Per-feature mean and variance ``(d_in,)`` float64 of the stored training rows (row modes).

        Accumulated in float64 over row chunks, so the only temporary is one ``(chunk, d_in)`` block.

        Raises:
            ValueError: Gram mode (no rows) or no training rows.
        """
        t = self._train
        if not isinstance(t, _Rows) or t.size == 0:
            raise ValueError("moments need stored training rows (mode 'reservoir' or 'window', n > 0)")
        n = t.size
        s1 = np.zeros(self.d_in, np.float64)
        s2 = np.zeros(self.d_in, np.float64)
        for s in range(0, n, chunk):
            block = t.Z[s : min(n, s + chunk)]
            s1 += block.sum(axis=0, dtype=np.float64)
            s2 += np.einsum("ij,ij->j", block, block, dtype=np.float64)
        mean = s1 / n
        return mean, np.maximum(s2 / n - mean**2, 0.0)

    def restandardize(self, scale: np.ndarray, shift: np.ndarray, part: Literal["stored", "staged"]) -> None:
        """Map rows to another standardisation of the same raw features: ``z <- z * scale + shift``.

        In place (no temporaries). ``part="stored"``: the training and held-out rows; ``"staged"``:
        the rows staged while a refit runs. The inverse map is ``z <- (z - shift) / scale``.

        Raises:
            ValueError: Gram mode (its statistics hold masks of the old standardisation), or
                ``scale``/``shift`` not finite ``(d_in,)`` with ``scale > 0``.
        """
        if not isinstance(self._train, _Rows):
            raise ValueError("restandardize needs stored rows; mode 'gram' keeps only statistics")
        scale = np.asarray(scale, np.float32)
        shift = np.asarray(shift, np.float32)
        if scale.shape != (self.d_in,) or shift.shape != (self.d_in,):
            raise ValueError(f"scale and shift must have shape ({self.d_in},)")
        if not (np.isfinite(scale).all() and np.isfinite(shift).all() and (scale > 0).all()):
            raise ValueError("scale must be finite and > 0, shift finite")
        parts = (self._train, self._val) if part == "stored" else (self._pending,)
        with self._lock:
            for rows in parts:
                Z = rows.Z[: rows.size]
                Z *= scale
                Z += shift

    def freeze(self, masks_fn=None) -> BufferSnapshot:  # type: ignore[no-untyped-def]
        """Stop writes to the stored data (new rows are staged) and return views for a refit.

        ``masks_fn(Z) -> (n, P) bool`` computes the gate masks of the training rows (row modes).
        """
        with self._lock:
            self._frozen = True
        return self.snapshot(masks_fn)

    def snapshot(self, masks_fn=None) -> BufferSnapshot:  # type: ignore[no-untyped-def]
        """Views of the stored data as :meth:`freeze` returns them (call it while frozen)."""
        vz, vy = self._val.Z[: self._val.size], self._val.Y[: self._val.size]
        t = self._train
        if isinstance(t, _Gram):
            train: RowData | GramData | None = (
                GramData(t.G, t.B.reshape(self.P, self.d_in + 1, self.c), t.yy, t.n) if t.n > 0 else None
            )
            return BufferSnapshot(train, vz, vy, int(round(t.n)))
        n = t.size
        if n == 0 or masks_fn is None:
            return BufferSnapshot(None, vz, vy, n)
        Z, Y = t.Z[:n], t.Y[:n]
        return BufferSnapshot(RowData(Z, Y, masks_fn(Z)), vz, vy, n)

    def thaw(self) -> None:
        """Fold the rows staged during a refit into the buffer and allow direct writes again."""
        with self._lock:
            p = self._pending
            k = p.size
            if k:
                pm = None if self._pending_masks is None else self._pending_masks[:k]
                self._route(p.Z[:k], p.Y[:k], pm)
            p.clear()
            self._frozen = False

    def clear(self) -> None:
        """Forget every observed sample (e.g. after the head's normalisation or gates changed)."""
        with self._lock:
            self._train.clear()
            self._val.clear()
            self._pending.clear()
            self.dropped = 0
