"""Hybrid coordinate descent (line search + gradient step, Jacobi) for two-layer ReLU networks.

Method of Hsiao & Dutta, "Hybrid Coordinate Descent for Efficient Neural Network Learning Using
Line Search and Gradient Descent" (arXiv:2408.01374, 2024): every scalar parameter ``theta_j`` is
updated on its own, from the *same* current point (Jacobi, all coordinates in parallel):

* if ``|dF/dtheta_j| > threshold`` (the paper's ``dw``): a gradient step
  ``theta_j <- theta_j - step * dF/dtheta_j``;
* otherwise: a one-dimensional line search along the coordinate,
  ``theta_j <- theta_j + argmin_{delta in C} F(theta + delta e_j)``.

The objective of the network ``f(x) = W2 relu(W1 x + b1) + b2`` on data ``X: (n, d)``,
``Y: (n, c)`` is

    F(theta) = 1/(2n) ||f(X) - Y||_F^2 + lam/2 (||W1||_F^2 + ||W2||_F^2),

the squared error of the paper (its ``1/(2n) sum_i (f(x_i) - y_i)^2`` summed over the ``c``
outputs) plus weight decay on the weights (biases are not decayed). With ``lam > 0`` and no biases
this is the objective whose global optimum equals that of the convex program of Pilanci & Ergen
(ICML 2020), ``1/(2n) ||sum_i D_i X u_i - Y||^2 + lam sum_i ||u_i||`` over all activation patterns
``D_i``: a neuron ``relu(X w) v^T`` costs ``lam/2 (||w||^2 + ||v||^2) >= lam ||w v^T||_F``, with
equality after rescaling. :func:`network_objective` evaluates ``F``.

Vectorisation. Changing one first-layer coordinate ``W1[r, j]`` by ``delta`` moves only the
pre-activations ``h_ir`` of neuron ``r`` (by ``delta x_ij``), so with residuals ``R = f(X) - Y``,
``s_ir = (R W2)_ir`` and ``q_r = ||W2[:, r]||^2``

    F(theta + delta e_rj) - F(theta) = (1/n) sum_i D_ir s_ir + q_r/(2n) sum_i D_ir^2
                                        + lam (W1[r, j] delta + delta^2 / 2),
    D_ir = relu(h_ir + delta x_ij) - relu(h_ir),

evaluated for all ``(r, j)`` and one ``delta`` as a single ``(n, rows, d)`` tensor op, in chunks of
neurons whose size ``chunk_elements`` bounds (the working memory is ``O(chunk_elements)``). The
bias ``b1[r]`` is the same with ``x_ij = 1``. Along a coordinate of the second layer ``F`` is an
exact quadratic, ``g delta + curv delta^2 / 2``, evaluated in closed form. One iteration costs one
forward/backward pass plus ``2 len(ls_grid)`` (one more with ``safeguard``) passes of ``O(n m d)``
over the neurons that have at least one line-search coordinate.

Departures from the paper (each marked ``Departure`` in the code):

1. Line search. The stored text of the paper we could read says the line search starts from
   ``epsilon = dw`` and adjusts ``epsilon`` to lower the MSE along the coordinate; its exact rule
   (how ``epsilon`` grows/shrinks, how many trials) was not available to us. We evaluate a fixed
   grid ``delta in {0} U {+-ls_scale * g : g in ls_grid}`` (``ls_scale`` defaults to ``threshold``,
   the paper's start) and take the best: every trial is evaluated at once, which is what makes the
   search vectorisable, and including ``0`` makes the search never increase ``F`` along its
   coordinate.
2. ``safeguard`` (default on): a gradient-branch coordinate whose step would increase ``F`` along
   its own coordinate is line-searched instead. The paper takes the gradient step unconditionally
   (``safeguard=False`` reproduces that). With it, *every* coordinate update is non-increasing along
   its coordinate (the Jacobi sum of them is not guaranteed to be: coordinates interact).
3. Layers. The paper trains the first layer of ``f = sum_r a_r relu(w_r^T x)`` (the other layer
   held fixed); ``train_output_layer=False`` does that, the default also updates ``W2``/``b2`` by the
   same rule, so the method is usable as a general baseline optimiser.
4. Weight decay ``lam`` (the paper has none; ``lam=0`` is its loss) so the comparison with the
   convex program is on one regularised objective.
6. ``backtrack`` (default off, as in the paper): each coordinate's update is a descent step
   along that coordinate, but their Jacobi sum is not one for ``F``: thousands of coordinates of
   one neuron move at once, and the measured effect on the paper's setting is a period-2
   oscillation of ``F`` once most coordinates are line-searched. With ``backtrack=True`` the whole
   update is halved until ``F`` decreases (at most 30 times; the loop stops with status
   ``"stalled"`` when no halving helps), one extra forward pass per halving.
7. Deeper networks are not supported: for a hidden layer that is not the last, one coordinate moves
   a whole downstream network, so the 1-D losses have no cheap vectorised form (every trial would be
   a full forward pass per coordinate). :func:`train_hybrid_cd` raises ``ValueError`` for them.

:func:`train_gd` (full-batch gradient descent, fixed step) and :func:`train_adam` (full-batch Adam)
train the same model on the same objective, for comparison. All three run on the model's device
(CPU or CUDA) and dtype, never modify the model passed in, and return a :class:`TrainResult` whose
``model`` is the trained copy.

Example:
    >>> import torch
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> X, Y = torch.randn(64, 5), torch.randn(64, 2)
    >>> net = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> res = train_hybrid_cd(net, X, Y, HybridCDConfig(max_iter=20, tol=0.0))
    >>> res.history["objective"][-1] < res.history["objective"][0]
    True
"""

from __future__ import annotations

import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from convexedge.device.errors import ConvergenceWarning, DataError

__all__ = [
    "AdamTrainConfig",
    "CoordinateUpdate",
    "GDConfig",
    "HybridCDConfig",
    "TrainResult",
    "coordinate_updates",
    "network_objective",
    "train_adam",
    "train_gd",
    "train_hybrid_cd",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------- configs
def _check_pos(name: str, v: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v >= 0 if allow_zero else v > 0)
    if not ok:
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {v!r}")


@dataclass(frozen=True, kw_only=True)
class _TrainCommon:
    # Weight decay: F adds lam/2 (||W1||^2 + ||W2||^2) (biases not decayed).
    lam: float = 0.0
    # Update W2 and b2 too (False: first layer only, as in the paper).
    train_output_layer: bool = True
    max_iter: int = 500
    # Wall-clock cap; hitting it returns converged=False with a ConvergenceWarning.
    max_seconds: float | None = None
    # Stop (converged) as soon as F <= target_loss.
    target_loss: float | None = None
    # Stop (converged) when ||grad F|| <= tol * ||grad F(theta_0)||; 0 disables the test.
    tol: float = 1e-6

    def __post_init__(self) -> None:
        _check_pos("lam", self.lam, allow_zero=True)
        if not isinstance(self.train_output_layer, bool):
            raise ValueError(f"train_output_layer must be a bool, got {self.train_output_layer!r}")
        if not isinstance(self.max_iter, int) or isinstance(self.max_iter, bool) or self.max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {self.max_iter!r}")
        if self.max_seconds is not None:
            _check_pos("max_seconds", self.max_seconds)
        if self.target_loss is not None and not (
            isinstance(self.target_loss, (int, float)) and math.isfinite(self.target_loss)
        ):
            raise ValueError(f"target_loss must be None or a finite number, got {self.target_loss!r}")
        _check_pos("tol", self.tol, allow_zero=True)


@dataclass(frozen=True, kw_only=True)
class HybridCDConfig(_TrainCommon):
    """Settings of :func:`train_hybrid_cd` (JSON-serialisable via ``dataclasses.asdict``)."""

    # The paper's dw: coordinates with |dF/dtheta_j| <= threshold are line-searched.
    threshold: float = 1e-3
    # Gradient step of the other coordinates (the paper's gradient update).
    step: float = 0.1
    # Line-search trials: delta in {0} U {+-ls_scale * g for g in ls_grid} (departure 1).
    ls_grid: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5, 0.25)
    # Unit of the grid; None: threshold (the paper starts its search at epsilon = dw).
    ls_scale: float | None = None
    # Line-search a gradient-branch coordinate whose step would raise F along it (departure 2).
    safeguard: bool = True
    # Halve the whole Jacobi update (up to 30 times) while it raises F (departure 6; the paper
    # applies it as is, which can oscillate: every coordinate moving at once overshoots).
    backtrack: bool = False
    # Max elements of one (n, rows, d) trial tensor: bounds the working memory.
    chunk_elements: int = 2**18

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pos("threshold", self.threshold, allow_zero=True)
        _check_pos("step", self.step)
        if not isinstance(self.ls_grid, tuple) or len(self.ls_grid) == 0:
            raise ValueError(f"ls_grid must be a non-empty tuple of numbers > 0, got {self.ls_grid!r}")
        for g in self.ls_grid:
            _check_pos("every ls_grid entry", g)
        if self.ls_scale is not None:
            _check_pos("ls_scale", self.ls_scale)
        if self.ls_scale is None and self.threshold == 0:
            raise ValueError(
                "threshold=0 needs an explicit ls_scale > 0 (the grid's unit defaults to threshold)"
            )
        if not isinstance(self.safeguard, bool):
            raise ValueError(f"safeguard must be a bool, got {self.safeguard!r}")
        if not isinstance(self.backtrack, bool):
            raise ValueError(f"backtrack must be a bool, got {self.backtrack!r}")
        if not isinstance(self.chunk_elements, int) or self.chunk_elements < 1:
            raise ValueError(f"chunk_elements must be an int >= 1, got {self.chunk_elements!r}")

    def trial_steps(self) -> tuple[float, ...]:
        """The nonzero line-search trials ``+-ls_scale * g`` in evaluation order (ties keep the first)."""
        unit = self.threshold if self.ls_scale is None else self.ls_scale
        out: list[float] = []
        for g in self.ls_grid:
            out += [-unit * g, unit * g]
        return tuple(out)


@dataclass(frozen=True, kw_only=True)
class GDConfig(_TrainCommon):
    """Settings of :func:`train_gd`: full-batch gradient descent with a fixed step."""

    step: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pos("step", self.step)


@dataclass(frozen=True, kw_only=True)
class AdamTrainConfig(_TrainCommon):
    """Settings of :func:`train_adam`: full-batch Adam (Kingma & Ba 2015) on ``F``."""

    lr: float = 1e-2
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_pos("lr", self.lr)
        for name in ("beta1", "beta2"):
            b = getattr(self, name)
            if not (isinstance(b, (int, float)) and 0 <= b < 1):
                raise ValueError(f"{name} must be in [0, 1), got {b!r}")
        _check_pos("eps", self.eps)


# --------------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What the trainers return.

    Attributes:
        model: the trained copy (the input model is not modified).
        objective: final ``F`` (see :func:`network_objective`).
        mse: final ``1/(2n) ||f(X) - Y||_F^2`` (the objective without weight decay).
        iterations: iterations (full passes over the data) run.
        seconds: wall-clock time of the loop (objective evaluations included).
        converged: stopped by ``target_loss`` or ``tol``, not by ``max_iter`` / ``max_seconds``.
        status: ``"target"``, ``"tol"``, ``"max_iter"``, ``"max_seconds"``, ``"diverged"`` or
            (hybrid CD with ``backtrack``) ``"stalled"``.
        history: per iteration ``k = 0..iterations``: ``"objective"``, ``"mse"``, ``"seconds"``
            (elapsed at the start of iteration ``k``, i.e. after ``k`` updates); hybrid CD adds
            ``"ls_fraction"`` (share of coordinates line-searched at iteration ``k``) and
            ``"rejected"`` (gradient steps turned into line searches by the safeguard).
        method: ``"hybrid_cd"``, ``"gd"`` or ``"adam"``.
        config: the config as a dict.
    """

    model: nn.Module
    objective: float
    mse: float
    iterations: int
    seconds: float
    converged: bool
    status: str
    history: dict[str, list[float]] = field(default_factory=dict)
    method: str = ""
    config: dict = field(default_factory=dict)


@dataclass
class CoordinateUpdate:
    """One Jacobi step of hybrid CD at a point (see :func:`coordinate_updates`).

    Attributes:
        deltas: per parameter name of the model (``"0.weight"``, ``"0.bias"``, ``"2.weight"``,
            ``"2.bias"``): the change of every coordinate, same shape as the parameter.
        line_search: per parameter name: bool mask of the coordinates that were line-searched.
        changes: per parameter name: ``F(theta + delta_j e_j) - F(theta)`` predicted for every
            coordinate's own update (<= 0 wherever the update came from the line search; NaN for
            first-layer gradient steps when ``safeguard=False``, which does not evaluate them).
        objective: ``F(theta)``.
        grad_norm: ``||grad F(theta)||`` over the trained parameters.
    """

    deltas: dict[str, torch.Tensor]
    line_search: dict[str, torch.Tensor]
    changes: dict[str, torch.Tensor]
    objective: float
    grad_norm: float


# --------------------------------------------------------------------------------- the network
@dataclass
class _Net:
    """The two linear layers as plain tensors: ``W1a = [W1, b1]`` (m, d + has_b1), ``W2`` (c, m)."""

    W1a: torch.Tensor
    has_b1: bool
    W2: torch.Tensor
    b2: torch.Tensor | None
    names: tuple[str, str | None, str, str | None]


def _layers(model: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    mods = list(model.children()) if isinstance(model, nn.Sequential) else None
    if (
        mods is None
        or len(mods) != 3
        or not isinstance(mods[0], nn.Linear)
        or not isinstance(mods[1], nn.ReLU)
        or not isinstance(mods[2], nn.Linear)
    ):
        got = type(model).__name__ if mods is None else [type(m).__name__ for m in mods]
        raise ValueError(
            "hybrid CD needs nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c)) (a two-layer "
            f"ReLU network), got {got}; deeper networks are not supported (a coordinate of an inner "
            "layer moves the whole downstream network, so its 1-D losses have no vectorised form)"
        )
    return mods[0], mods[2]


def _net_from(model: nn.Module) -> _Net:
    l1, l2 = _layers(model)
    W1 = l1.weight.detach()
    W1a = torch.cat([W1, l1.bias.detach()[:, None]], 1) if l1.bias is not None else W1.clone()
    return _Net(
        W1a=W1a.clone(),
        has_b1=l1.bias is not None,
        W2=l2.weight.detach().clone(),
        b2=None if l2.bias is None else l2.bias.detach().clone(),
        names=("0.weight", "0.bias" if l1.bias is not None else None, "2.weight",
               "2.bias" if l2.bias is not None else None),
    )  # fmt: skip


def _write_back(model: nn.Module, net: _Net) -> None:
    l1, l2 = _layers(model)
    d = l1.weight.shape[1]
    with torch.no_grad():
        l1.weight.copy_(net.W1a[:, :d])
        if net.has_b1:
            l1.bias.copy_(net.W1a[:, d])
        l2.weight.copy_(net.W2)
        if net.b2 is not None:
            l2.bias.copy_(net.b2)


def _validate(model: nn.Module, X: Any, Y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    l1, l2 = _layers(model)
    p = l1.weight
    for name, t in (("X", X), ("Y", Y)):
        if not isinstance(t, torch.Tensor):
            raise DataError(
                f"{name} must be a torch tensor, got {type(t).__name__}; use torch.as_tensor({name})"
            )
        if t.ndim != 2:
            raise DataError(
                f"{name} must be 2-D ({'n, d' if name == 'X' else 'n, c'}), got shape {tuple(t.shape)}"
            )
    if X.shape[0] != Y.shape[0] or X.shape[0] == 0:
        raise DataError(
            f"X and Y must have the same number n >= 1 of rows, got {X.shape[0]} and {Y.shape[0]}"
        )
    if X.shape[1] != l1.in_features or Y.shape[1] != l2.out_features:
        raise DataError(
            f"the model maps {l1.in_features} -> {l2.out_features} features, got X with {X.shape[1]} "
            f"columns and Y with {Y.shape[1]}; reshape a single target to (n, 1)"
        )
    X = X.detach().to(device=p.device, dtype=p.dtype)
    Y = Y.detach().to(device=p.device, dtype=p.dtype)
    for name, t in (("X", X), ("Y", Y)):
        if not bool(torch.isfinite(t).all()):
            raise DataError(f"{name} holds NaN/Inf values; drop or impute those rows")
    return X, Y


def _augment(X: torch.Tensor, has_b1: bool) -> torch.Tensor:
    return torch.cat([X, torch.ones_like(X[:, :1])], 1) if has_b1 else X


def _decay_mask(net: _Net, d: int) -> torch.Tensor:
    """1 on weight columns of ``W1a``, 0 on its bias column."""
    mask = torch.ones(net.W1a.shape[1], dtype=net.W1a.dtype, device=net.W1a.device)
    if net.has_b1:
        mask[d] = 0
    return mask


def _forward(net: _Net, Xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    H = Xa @ net.W1a.T  # (n, m) pre-activations
    Ahid = H.clamp_min(0)
    pred = Ahid @ net.W2.T
    if net.b2 is not None:
        pred = pred + net.b2
    return H, Ahid, pred


def _objective(net: _Net, R: torch.Tensor, lam: float, n: int, wmask: torch.Tensor) -> tuple[float, float]:
    mse = float(0.5 * torch.linalg.vector_norm(R, dtype=torch.float64).square() / n)
    if lam == 0:
        return mse, mse
    w1 = torch.sum((net.W1a * wmask).square(), dtype=torch.float64)
    w2 = torch.sum(net.W2.square(), dtype=torch.float64)
    return mse + 0.5 * lam * float(w1 + w2), mse


def _gradients(net, Xa, H, Ahid, R, lam, wmask, n):
    """Analytic ``grad F``: (G1 (m, D), G2 (c, m), gb2 (c,) or None). relu'(0) = 0, as torch."""
    dH = (R @ net.W2) * (H > 0).to(R.dtype) / n
    G1 = dH.T @ Xa + lam * net.W1a * wmask
    G2 = R.T @ Ahid / n + lam * net.W2
    gb2 = None if net.b2 is None else R.sum(0) / n
    return G1, G2, gb2


def network_objective(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, lam: float = 0.0
) -> tuple[float, float]:
    """``(F, mse)`` of a two-layer ReLU network: ``F = mse + lam/2 (||W1||^2 + ||W2||^2)``.

    Args:
        model: ``nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c))``.
        X: (n, d) inputs.
        Y: (n, c) targets.
        lam: weight decay ``>= 0``.

    Returns:
        ``(F, mse)`` with ``mse = 1/(2n) ||f(X) - Y||_F^2``, sums in float64.
    """
    _check_pos("lam", lam, allow_zero=True)
    X, Y = _validate(model, X, Y)
    net = _net_from(model)
    Xa = _augment(X, net.has_b1)
    _, _, pred = _forward(net, Xa)
    return _objective(net, pred - Y, float(lam), X.shape[0], _decay_mask(net, X.shape[1]))


# --------------------------------------------------------------------------------- the kernel
def _first_layer_changes(
    Xa: torch.Tensor,
    H: torch.Tensor,
    S: torch.Tensor,
    q: torch.Tensor,
    W1a: torch.Tensor,
    reg: torch.Tensor,
    delta: float | torch.Tensor,
    rows: torch.Tensor,
    chunk_elements: int,
) -> torch.Tensor:
    """``F(theta + delta e_rj) - F(theta)`` for every first-layer coordinate of the neurons ``rows``.

    Args:
        Xa: (n, D) inputs (with a ones column for b1).
        H: (n, m) pre-activations.
        S: (n, m) ``R @ W2``.
        q: (m,) ``||W2[:, r]||^2``.
        W1a: (m, D) current first layer.
        reg: (D,) ``lam`` on weight columns, 0 on the bias column.
        delta: a scalar trial, or (m, D) per-coordinate trials.
        rows: (k,) long indices of the neurons to evaluate.
        chunk_elements: max elements of one (n, rows, D) tensor.

    Returns:
        (k, D) changes of ``F`` (the loss part accumulated in the data's dtype).
    """
    n, D = Xa.shape
    out = torch.empty((rows.numel(), D), dtype=Xa.dtype, device=Xa.device)
    per = max(1, chunk_elements // max(1, n * D))
    scalar = not isinstance(delta, torch.Tensor)
    for s in range(0, rows.numel(), per):
        idx = rows[s : s + per]
        Hc = H[:, idx]  # (n, k)
        dc = delta if scalar else delta[idx]  # scalar or (k, D)
        # (n, k, D): h_ir + delta x_ij, one allocation
        if scalar:
            T = torch.add(Hc[:, :, None], Xa[:, None, :], alpha=dc)
        else:
            T = torch.addcmul(Hc[:, :, None], Xa[:, None, :], dc)
        T.clamp_(min=0)
        T -= Hc.clamp_min(0)[:, :, None]  # D_ir = relu(h + delta x) - relu(h)
        # sum_i D_ir (s_ir + q_r D_ir / 2) / n in one pass (a sum over the leading, contiguous axis)
        U = torch.addcmul(S[:, idx, None], T, q[idx, None], value=0.5)
        U.mul_(T)
        w = W1a[idx]
        out[s : s + per] = U.sum(0) / n + reg * (w * dc + 0.5 * dc * dc)
    return out


def _jacobi_step(net: _Net, Xa: torch.Tensor, Y: torch.Tensor, cfg: HybridCDConfig, wmask: torch.Tensor):
    """Deltas of every coordinate at the current point, plus the pieces the caller reports."""
    n = Xa.shape[0]
    lam = float(cfg.lam)
    H, Ahid, pred = _forward(net, Xa)
    R = pred - Y
    obj, mse = _objective(net, R, lam, n, wmask)
    G1, G2, gb2 = _gradients(net, Xa, H, Ahid, R, lam, wmask, n)
    trials = cfg.trial_steps()
    thr = cfg.threshold

    # ---- first layer (the paper's parameters): piecewise-quadratic 1-D losses, trial by trial
    S = R @ net.W2  # (n, m)
    q = net.W2.square().sum(0)  # (m,)
    reg = lam * wmask
    ls1 = G1.abs() <= thr
    d1 = -cfg.step * G1  # gradient branch
    # Without the safeguard the gradient steps' own 1-D changes are not evaluated (NaN).
    ch1 = torch.zeros_like(G1) if cfg.safeguard else torch.full_like(G1, math.nan)
    grad_rows = (~ls1).any(1).nonzero().flatten()
    if cfg.safeguard and grad_rows.numel():
        ch1[grad_rows] = _first_layer_changes(Xa, H, S, q, net.W1a, reg, d1, grad_rows, cfg.chunk_elements)
    rej1 = (~ls1) & (ch1 > 0) if cfg.safeguard else torch.zeros_like(ls1)
    search1 = ls1 | rej1
    rows = search1.any(1).nonzero().flatten()  # neurons with at least one line-searched coordinate
    best = torch.zeros((rows.numel(), G1.shape[1]), dtype=G1.dtype, device=G1.device)
    best_d = torch.zeros_like(best)
    for t in trials:
        ch = _first_layer_changes(Xa, H, S, q, net.W1a, reg, t, rows, cfg.chunk_elements)
        better = ch < best  # strict: 0 and earlier trials win ties
        best = torch.where(better, ch, best)
        best_d = torch.where(better, torch.full_like(best_d, t), best_d)
    s_mask = search1[rows]
    d1[rows] = torch.where(s_mask, best_d, d1[rows])
    ch1[rows] = torch.where(s_mask, best, ch1[rows])
    out_d = {"W1a": d1}
    out_ls = {"W1a": search1}
    out_ch = {"W1a": ch1}
    gsq = G1.square().sum()
    rejected = int(rej1.sum())

    # ---- second layer: the 1-D loss is an exact quadratic g delta + curv delta^2 / 2
    if cfg.train_output_layer:
        curv2 = (Ahid.square().sum(0) / n + lam).expand_as(G2)  # (c, m)
        parts = [("W2", G2, curv2)]
        if gb2 is not None:
            parts.append(("b2", gb2, torch.ones_like(gb2)))
        for key, g, curv in parts:
            ls = g.abs() <= thr
            dg = -cfg.step * g
            chg = g * dg + 0.5 * curv * dg * dg
            rej = (~ls) & (chg > 0) if cfg.safeguard else torch.zeros_like(ls)
            best = torch.zeros_like(g)
            best_d = torch.zeros_like(g)
            for t in trials:
                ch = g * t + 0.5 * curv * t * t
                better = ch < best
                best = torch.where(better, ch, best)
                best_d = torch.where(better, torch.full_like(best_d, t), best_d)
            srch = ls | rej
            out_d[key] = torch.where(srch, best_d, dg)
            out_ls[key] = srch
            out_ch[key] = torch.where(srch, best, chg)
            gsq = gsq + g.square().sum()
            rejected += int(rej.sum())
    return out_d, out_ls, out_ch, obj, mse, float(gsq.sqrt()), rejected


def _split_first(net: _Net, x: torch.Tensor, d: int) -> dict[str, torch.Tensor]:
    out = {net.names[0]: x[:, :d].contiguous()}
    if net.has_b1:
        out[net.names[1]] = x[:, d]
    return out


def coordinate_updates(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, config: HybridCDConfig | None = None
) -> CoordinateUpdate:
    """One Jacobi step of hybrid CD at the model's current parameters, without applying it.

    Every coordinate's update is computed from the same point (see the module docstring); the
    step :func:`train_hybrid_cd` takes is ``theta + deltas``.

    Args:
        model: ``nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c))``.
        X: (n, d) inputs.
        Y: (n, c) targets.
        config: :class:`HybridCDConfig` (None: defaults).

    Returns:
        :class:`CoordinateUpdate` keyed by the model's parameter names.
    """
    config = HybridCDConfig() if config is None else config
    if not isinstance(config, HybridCDConfig):
        raise TypeError(f"config must be a HybridCDConfig, got {type(config).__name__}")
    X, Y = _validate(model, X, Y)
    net = _net_from(model)
    d = X.shape[1]
    Xa = _augment(X, net.has_b1)
    dd, ls, ch, obj, _, gnorm, _ = _jacobi_step(net, Xa, Y, config, _decay_mask(net, d))
    res = CoordinateUpdate({}, {}, {}, obj, gnorm)
    for src, dst in ((dd, res.deltas), (ls, res.line_search), (ch, res.changes)):
        dst.update(_split_first(net, src["W1a"], d))
        if config.train_output_layer:
            dst[net.names[2]] = src["W2"]
            if net.b2 is not None:
                dst[net.names[3]] = src["b2"]
    return res


# --------------------------------------------------------------------------------- trainers
class _Loop:
    """Shared bookkeeping of the three trainers: history, stopping rules, status."""

    def __init__(self, cfg: _TrainCommon) -> None:
        self.cfg = cfg
        self.start = time.perf_counter()
        self.history: dict[str, list[float]] = {"objective": [], "mse": [], "seconds": []}
        self.g0: float | None = None
        self.status = "max_iter"

    def record(self, obj: float, mse: float, gnorm: float) -> bool:
        """Record iteration state; return True when the loop must stop before updating."""
        self.history["objective"].append(obj)
        self.history["mse"].append(mse)
        self.history["seconds"].append(time.perf_counter() - self.start)
        if self.g0 is None:
            self.g0 = gnorm
        cfg = self.cfg
        if not math.isfinite(obj):
            self.status = "diverged"
            return True
        if cfg.target_loss is not None and obj <= cfg.target_loss:
            self.status = "target"
            return True
        if cfg.tol > 0 and gnorm <= cfg.tol * max(self.g0, 1e-300):
            self.status = "tol"
            return True
        if cfg.max_seconds is not None and self.history["seconds"][-1] >= cfg.max_seconds:
            self.status = "max_seconds"
            return True
        return False

    def finish(self, model: nn.Module, method: str, iterations: int) -> TrainResult:
        from dataclasses import asdict

        converged = self.status in ("target", "tol")
        if not converged:
            knob = "max_iter" if self.status == "max_iter" else "max_seconds"
            what = {
                "diverged": "objective became non-finite; lower the step",
                "stalled": "no halving of the Jacobi update lowered F; raise threshold or ls_grid",
            }.get(self.status, f"stopped at {knob} before target_loss/tol; raise {knob}")
            warnings.warn(f"{method}: {what}", ConvergenceWarning, stacklevel=3)
        h = self.history
        return TrainResult(
            model=model, objective=h["objective"][-1], mse=h["mse"][-1], iterations=iterations,
            seconds=time.perf_counter() - self.start, converged=converged, status=self.status,
            history=h, method=method, config=asdict(self.cfg),
        )  # fmt: skip


def _prepare(model: nn.Module, X, Y, config, kind: type, name: str):
    if config is None:
        config = kind()
    if not isinstance(config, kind):
        raise TypeError(
            f"{name} takes a {kind.__name__}, got {type(config).__name__}; pass {kind.__name__}(...)"
        )
    X, Y = _validate(model, X, Y)
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    net = _net_from(model)
    return model, net, X, Y, config


def train_hybrid_cd(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, config: HybridCDConfig | None = None
) -> TrainResult:
    """Train a two-layer ReLU network by hybrid coordinate descent (Hsiao & Dutta 2024).

    Minimises ``F = 1/(2n) ||f(X) - Y||_F^2 + lam/2 (||W1||^2 + ||W2||^2)``: every iteration
    computes each coordinate's update from the same point (gradient step where
    ``|dF/dtheta_j| > threshold``, grid line search otherwise) and applies them all (Jacobi).
    See the module docstring for the vectorised 1-D losses and the departures from the paper.

    Args:
        model: ``nn.Sequential(nn.Linear(d, m), nn.ReLU(), nn.Linear(m, c))`` on any device; not
            modified (a trained copy is returned).
        X: (n, d) inputs; moved to the model's device and dtype.
        Y: (n, c) targets.
        config: :class:`HybridCDConfig` (None: defaults).

    Returns:
        :class:`TrainResult` (``ConvergenceWarning`` when it stops at ``max_iter`` / ``max_seconds``
        or diverges).

    Raises:
        ValueError: a model that is not a two-layer ReLU ``nn.Sequential``.
        DataError: shapes that do not fit the model, or NaN/Inf data.
    """
    model, net, X, Y, cfg = _prepare(model, X, Y, config, HybridCDConfig, "train_hybrid_cd")
    d = X.shape[1]
    Xa = _augment(X, net.has_b1)
    wmask = _decay_mask(net, d)
    loop = _Loop(cfg)
    loop.history["ls_fraction"] = []
    loop.history["rejected"] = []
    it = 0
    while True:
        dd, ls, _, obj, mse, gnorm, rejected = _jacobi_step(net, Xa, Y, cfg, wmask)
        total = sum(v.numel() for v in ls.values())
        loop.history["ls_fraction"].append(sum(int(v.sum()) for v in ls.values()) / total)
        loop.history["rejected"].append(rejected)
        if loop.record(obj, mse, gnorm) or it >= cfg.max_iter:
            break
        keys = ["W1a"] + (["W2"] + (["b2"] if net.b2 is not None else []) if cfg.train_output_layer else [])
        saved = {k: getattr(net, k).clone() for k in keys} if cfg.backtrack else {}
        for k in keys:
            getattr(net, k).add_(dd[k])
        if cfg.backtrack:
            scale, ok = 1.0, False
            for _ in range(30):
                R = _forward(net, Xa)[2] - Y
                if _objective(net, R, float(cfg.lam), X.shape[0], wmask)[0] < obj:
                    ok = True
                    break
                scale *= 0.5
                for k in keys:
                    getattr(net, k).sub_(dd[k], alpha=scale)  # theta + scale * delta
            if not ok:
                for k in keys:
                    getattr(net, k).copy_(saved[k])
                loop.status = "stalled"
                break
        it += 1
    _write_back(model, net)
    return loop.finish(model, "hybrid_cd", it)


def _plain_trainer(model, X, Y, cfg, method: str, update) -> TrainResult:
    d = X.shape[1]
    net = _net_from(model)
    Xa = _augment(X, net.has_b1)
    wmask = _decay_mask(net, d)
    n, lam = X.shape[0], float(cfg.lam)
    loop = _Loop(cfg)
    state: dict = {}
    it = 0
    while True:
        H, Ahid, pred = _forward(net, Xa)
        R = pred - Y
        obj, mse = _objective(net, R, lam, n, wmask)
        G1, G2, gb2 = _gradients(net, Xa, H, Ahid, R, lam, wmask, n)
        grads = {"W1a": G1}
        if cfg.train_output_layer:
            grads["W2"] = G2
            if gb2 is not None:
                grads["b2"] = gb2
        gnorm = float(torch.sqrt(sum(g.square().sum() for g in grads.values())))
        if loop.record(obj, mse, gnorm) or it >= cfg.max_iter:
            break
        it += 1
        for key, g in grads.items():
            getattr(net, key).sub_(update(key, g, it, state))
    _write_back(model, net)
    return loop.finish(model, method, it)


def train_gd(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, config: GDConfig | None = None
) -> TrainResult:
    """Full-batch gradient descent ``theta <- theta - step grad F`` on the same ``F`` as hybrid CD.

    Arguments, return value and errors as :func:`train_hybrid_cd` (with :class:`GDConfig`).
    """
    model, _, X, Y, cfg = _prepare(model, X, Y, config, GDConfig, "train_gd")
    return _plain_trainer(model, X, Y, cfg, "gd", lambda key, g, it, st: cfg.step * g)


def train_adam(
    model: nn.Module, X: torch.Tensor, Y: torch.Tensor, config: AdamTrainConfig | None = None
) -> TrainResult:
    """Full-batch Adam (Kingma & Ba, ICLR 2015, Alg. 1, bias-corrected) on the same ``F``.

    Weight decay is part of ``F`` (its gradient enters the moments, as ``torch.optim.Adam``'s
    ``weight_decay`` does), not decoupled. Arguments, return value and errors as
    :func:`train_hybrid_cd` (with :class:`AdamTrainConfig`).
    """
    model, _, X, Y, cfg = _prepare(model, X, Y, config, AdamTrainConfig, "train_adam")

    def update(key: str, g: torch.Tensor, it: int, st: dict) -> torch.Tensor:
        m, v = st.get(key, (torch.zeros_like(g), torch.zeros_like(g)))
        m.mul_(cfg.beta1).add_(g, alpha=1 - cfg.beta1)
        v.mul_(cfg.beta2).addcmul_(g, g, value=1 - cfg.beta2)
        st[key] = (m, v)
        mhat = m / (1 - cfg.beta1**it)
        vhat = v / (1 - cfg.beta2**it)
        return cfg.lr * mhat / (vhat.sqrt() + cfg.eps)

    return _plain_trainer(model, X, Y, cfg, "adam", update)
