"""The convex gated-ReLU head a device serves: an immutable set of arrays and a numpy predict.

With input features ``x: (n, d_in)``, the head standardises them, ``z = (x - mean) / std``, appends a
bias column, ``z1 = [z, 1]: (n, d)`` with ``d = d_in + 1``, and predicts

    f(x) = sum_i 1[z1 g_i >= 0] * z1 V_i,        V: (P, d, c),  gates G = [g_1 .. g_P]: (d, P).

The arrays are copied and made read-only when the head is built, so a head can be shared between
threads with no lock: a refit builds a *new* head and the runtime swaps one reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from convexedge.device.errors import DataError
from convexedge.device.gates import GateSpec, sample_gates

__all__ = ["ConvexHead", "check_features"]

Group = Literal["gate", "gate_output"]


def _frozen(a: np.ndarray) -> np.ndarray:
    # A read-only float32 C array that owns its memory cannot change behind the head's back: take
    # it as is (the refit hands its solution over this way; a copy is 41 KB on an mcu head).
    if (
        isinstance(a, np.ndarray) and a.dtype == np.float32 and a.flags.c_contiguous
        and a.flags.owndata and not a.flags.writeable
    ):  # fmt: skip
        return a
    out = np.array(a, dtype=np.float32, order="C", copy=True)
    out.flags.writeable = False
    return out


def check_features(x: Any, d_in: int, name: str = "x") -> np.ndarray:
    """Validate a feature batch once at the boundary and return it as (n, d_in) float32.

    A single sample ``(d_in,)`` becomes ``(1, d_in)``. Integer and float inputs are accepted; bool,
    complex, object and string arrays, other shapes, empty batches and NaN/Inf raise.

    Raises:
        DataError: what was expected, what was got, and how to fix it.
    """
    try:
        arr = np.asarray(x)
    except Exception as exc:  # e.g. ragged nested lists
        raise DataError(
            f"{name} must be a numeric array of shape (n, {d_in}); got {type(x).__name__}"
        ) from exc
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
    ):
        raise DataError(
            f"{name} must hold real numbers (float or int), got dtype {arr.dtype}; "
            f"convert with {name}.astype(np.float32)"
        )
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != d_in:
        raise DataError(
            f"{name} must have shape (n, {d_in}) (or ({d_in},) for one sample), got {np.shape(x)}; "
            f"the head reads {d_in} features per sample"
        )
    if arr.shape[0] == 0:
        raise DataError(f"{name} is empty (shape {arr.shape}); pass at least one sample")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        bad = int((~np.isfinite(out)).sum())
        raise DataError(
            f"{name} must be finite, got {bad} NaN/Inf entries (after conversion to float32); "
            f"drop or impute those samples"
        )
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class ConvexHead:
    """An immutable gated-ReLU head (see the module docstring for the math).

    Attributes:
        V: (P, d, c) float32 weights, row ``d - 1`` of each ``V_i`` is its bias.
        gate_spec: how the gates were made (a seed, or ``kind="array"``).
        gates: (d, P) float32 gates; ``None`` regenerates them from ``gate_spec`` (seeded).
        mean: (d_in,) float32 feature mean subtracted before the gates; ``None`` = zeros.
        std: (d_in,) float32 feature scale (> 0); ``None`` = ones.
        lam: the regularisation strength the head was fitted with (refits reuse it).
        group: ``"gate"`` (one group per gate) or ``"gate_output"`` (per gate and output).
        info: JSON-serialisable provenance (teacher, student, input, fit); stored in the manifest.

    Example:
        >>> spec = GateSpec(d=5, P=3, seed=0)
        >>> head = ConvexHead(V=np.zeros((3, 5, 2), np.float32), gate_spec=spec)
        >>> head.predict(np.ones((4, 4))).shape
        (4, 2)
    """

    V: np.ndarray
    gate_spec: GateSpec
    gates: np.ndarray | None = None
    mean: np.ndarray | None = None
    std: np.ndarray | None = None
    lam: float = 0.0
    group: Group = "gate"
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        spec = self.gate_spec
        if not isinstance(spec, GateSpec):
            raise ValueError(f"gate_spec must be a GateSpec, got {type(spec).__name__}")
        V = np.asarray(self.V)
        if V.ndim != 3 or V.shape[0] != spec.P or V.shape[1] != spec.d or V.shape[2] < 1:
            raise DataError(
                f"V must have shape (P, d, c) = ({spec.P}, {spec.d}, c) to match the gate spec, got {V.shape}"
            )
        # gate by gate, so the check allocates one (d, c) temporary, not a V-sized one (device memory)
        if not np.issubdtype(V.dtype, np.floating) or not all(np.isfinite(Vp).all() for Vp in V):
            raise DataError(f"V must hold finite floats, got dtype {V.dtype} with NaN/Inf or non-floats")
        if self.gates is None:
            if spec.kind != "gaussian":
                raise DataError("gate_spec kind 'array' needs the gates array; pass gates=(d, P)")
            G = sample_gates(spec)
        else:
            G = np.asarray(self.gates)
            if G.shape != (spec.d, spec.P) or not np.issubdtype(G.dtype, np.floating):
                raise DataError(f"gates must be float (d, P) = ({spec.d}, {spec.P}), got {G.dtype}{G.shape}")
            if not np.isfinite(G).all():
                raise DataError("gates hold NaN/Inf values")
        d_in = spec.d - 1
        mean = np.zeros(d_in, np.float32) if self.mean is None else np.asarray(self.mean)
        std = np.ones(d_in, np.float32) if self.std is None else np.asarray(self.std)
        if mean.shape != (d_in,) or std.shape != (d_in,):
            raise DataError(f"mean and std must have shape ({d_in},), got {mean.shape} and {std.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise DataError("mean must be finite and std finite and > 0 in every feature")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam must be a finite number >= 0, got {self.lam!r}")
        if self.group not in ("gate", "gate_output"):
            raise ValueError(f"group must be 'gate' or 'gate_output', got {self.group!r}")
        put = object.__setattr__
        put(self, "V", _frozen(V))
        put(self, "gates", _frozen(G))
        put(self, "mean", _frozen(mean))
        put(self, "std", _frozen(std))
        put(self, "lam", float(self.lam))
        put(self, "info", dict(self.info))
        # Serving kernel: only the gates whose V_i is non-zero (pruned gates cost nothing).
        # No V-sized temporaries (a refit builds heads on a device with ~100 KB to spare): the
        # active test runs gate by gate, and with every gate active V is used as is (no copy).
        active = np.array([p for p in range(spec.P) if self.V[p].any()], dtype=np.intp)
        if active.size == 0:
            active = np.array([0])
        Va = self.V if active.size == spec.P else self.V[active]  # (Pa, d, c)
        put(self, "_active", active)
        put(self, "_W", np.ascontiguousarray(Va[:, :-1, :].transpose(1, 0, 2).reshape(d_in, -1)))
        put(self, "_b", np.ascontiguousarray(Va[:, -1, :].reshape(-1)))
        put(self, "_Gw", np.ascontiguousarray(self.gates[:-1, active]))
        put(self, "_gb", np.ascontiguousarray(self.gates[-1, active]))
        put(self, "_inv_std", (1.0 / self.std).astype(np.float32))

    # ------------------------------------------------------------------ sizes
    @property
    def d_in(self) -> int:
        """Input features per sample."""
        return int(self.gate_spec.d - 1)

    @property
    def d(self) -> int:
        """Features plus the bias column."""
        return int(self.gate_spec.d)

    @property
    def P(self) -> int:
        """Number of gates."""
        return int(self.gate_spec.P)

    @property
    def c(self) -> int:
        """Number of outputs."""
        return int(self.V.shape[2])

    @property
    def active_gates(self) -> int:
        """Gates whose ``V_i`` is non-zero."""
        return int((np.abs(self.V).reshape(self.P, -1).max(axis=1) > 0).sum())

    def num_parameters(self, *, count_gates: bool = False) -> int:
        """Weights of ``V`` (plus the gates' ``d * P`` if they are not regenerated from a seed)."""
        gates = self.d * self.P if (count_gates or self.gate_spec.kind == "array") else 0
        return int(self.V.size + gates)

    def nbytes(self) -> int:
        """Memory the head's arrays take (weights, gates, normalisation, serving copies)."""
        own = self.V.nbytes + self.gates.nbytes + self.mean.nbytes + self.std.nbytes  # type: ignore[union-attr]
        return int(own + self._W.nbytes + self._b.nbytes + self._Gw.nbytes + self._gb.nbytes)  # type: ignore[attr-defined]

    # ------------------------------------------------------------------ kernels
    def normalize(self, x: np.ndarray) -> np.ndarray:
        """``(x - mean) / std`` for a validated ``x: (n, d_in)`` float32 -> (n, d_in) float32."""
        return (x - self.mean) * self._inv_std  # type: ignore[attr-defined]

    def masks(self, z: np.ndarray) -> np.ndarray:
        """Gate masks ``1[[z, 1] g_i >= 0]`` of *standardised* features ``z: (n, d_in)`` -> (n, P) bool."""
        G = self.gates
        return (z @ G[:-1] + G[-1]) >= 0  # type: ignore[index]

    def predict_normalized(self, z: np.ndarray) -> np.ndarray:
        """Head output for standardised features ``z: (n, d_in)`` float32 -> (n, c); no validation."""
        n, c = z.shape[0], self.c
        H = z @ self._W  # type: ignore[attr-defined]
        H += self._b  # type: ignore[attr-defined]
        m = (z @ self._Gw + self._gb) >= 0  # type: ignore[attr-defined]
        H = H.reshape(n, -1, c)
        H *= m[:, :, None]
        return H.sum(axis=1)

    def predict(self, x: Any) -> np.ndarray:
        """Logits of the head.

        Args:
            x: (n, d_in) or (d_in,) real features (the pooled teacher activations).

        Returns:
            (n, c) float32.

        Raises:
            DataError: wrong shape or dtype, empty, or NaN/Inf.
        """
        z = self.normalize(check_features(x, self.d_in))
        return self.predict_normalized(z)

    def replace_weights(
        self,
        V: np.ndarray,
        *,
        info: dict[str, Any] | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
    ) -> ConvexHead:
        """A new head with weights ``V: (P, d, c)`` (and, if given, a new ``mean``/``std``); the gates
        and everything else are kept."""
        return ConvexHead(
            V=V, gate_spec=self.gate_spec, gates=self.gates,
            mean=self.mean if mean is None else mean, std=self.std if std is None else std,
            lam=self.lam, group=self.group, info=self.info if info is None else info,
        )  # fmt: skip
