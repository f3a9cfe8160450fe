"""Gated-ReLU students as torch modules, and the patch/target matrices the convex solver sees.

Conv form (one student for a conv block): samples are the ``k x k`` input patches at every output
position, flattened channel-major like a conv weight, with a trailing 1 for the bias:
``Z`` (B*H'*W', C*k*k + 1). Gate ``i`` switches position ``p`` on when ``Z[p] . g_i >= 0``. The
output at ``p`` is ``sum_i 1[Z[p] . g_i >= 0] * Z[p] @ V_i``, ``V_i`` (C*k*k + 1, c_out). The module
computes exactly that with two convolutions (gate projections, then all gates' outputs in one conv),
and gives the solver's matrix-form predictions to float precision (tested).

MLP form: the same on flat vectors, ``Z`` (n, d + 1).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvGeometry",
    "GatedConvStudent",
    "GatedMLPStudent",
    "LowRankGatedConvStudent",
    "StudentChain",
    "image_to_rows",
    "patch_matrix",
    "rows_to_image",
]


@dataclass(frozen=True, kw_only=True)
class ConvGeometry:
    """Patch geometry of a conv student: that of ``Conv2d(in_channels, ., kernel_size, stride, padding)``."""

    in_channels: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1

    def __post_init__(self) -> None:
        if min(self.in_channels, self.kernel_size, self.stride) < 1 or self.padding < 0:
            raise ValueError(f"invalid conv geometry {self}")

    @property
    def d(self) -> int:
        """Patch dimension including the bias column."""
        return self.in_channels * self.kernel_size**2 + 1

    def out_hw(self, h: int, w: int) -> tuple[int, int]:
        k, s, p = self.kernel_size, self.stride, self.padding
        return (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1

    def to_dict(self) -> dict:
        return asdict(self)


def patch_matrix(z: torch.Tensor, geom: ConvGeometry) -> torch.Tensor:
    """``z`` (B, C, H, W) -> patches (B*H'*W', C*k*k + 1), rows ordered (b, h', w'), last column 1."""
    cols = F.unfold(z, geom.kernel_size, padding=geom.padding, stride=geom.stride)  # (B, Ckk, L)
    rows = cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def image_to_rows(y: torch.Tensor) -> torch.Tensor:
    """``y`` (B, c, H, W) -> (B*H*W, c), rows ordered (b, h, w) like :func:`patch_matrix`."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])


def rows_to_image(rows: torch.Tensor, batch: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`image_to_rows`: (B*H*W, c) -> (B, c, H, W)."""
    return rows.reshape(batch, h, w, -1).permute(0, 3, 1, 2)


def _as_tensor(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a).float()


class GatedConvStudent(nn.Module):
    """``sum_i 1[conv(z, g_i) >= 0] * conv(z, V_i)``: a convex-fitted gated-ReLU conv layer.

    Args:
        V: (P, C*k*k + 1, c_out) solution of the convex problem (last row = bias).
        G: (C*k*k + 1, P) fixed gates (last row = gate bias).
        geom: the patch geometry used to build the problem.
        output_relu: apply a ReLU to the output (not part of the convex fit; for students that
            replace a block whose output is post-ReLU).
        drop_inactive: keep only gates whose ``V_i`` is non-zero (the solution's active set).

    Input (B, C, H, W) -> output (B, c_out, H', W').
    """

    def __init__(
        self,
        V: np.ndarray | torch.Tensor,
        G: np.ndarray | torch.Tensor,
        geom: ConvGeometry,
        *,
        output_relu: bool = False,
        drop_inactive: bool = True,
    ) -> None:
        super().__init__()
        V, G = _as_tensor(V), _as_tensor(G)
        if V.ndim != 3 or G.ndim != 2 or V.shape[1] != geom.d or G.shape != (geom.d, V.shape[0]):
            raise ValueError(
                f"expected V (P, {geom.d}, c) and G ({geom.d}, P), got V {tuple(V.shape)}, G {tuple(G.shape)}"
            )
        if drop_inactive:
            keep = V.flatten(1).abs().amax(1) > 0
            if not bool(keep.any()):
                keep[0] = True  # an all-zero student keeps one (zero) gate so shapes stay valid
            V, G = V[keep], G[:, keep]
        self.geom = geom
        self.output_relu = output_relu
        P, d, c = V.shape
        k, cin = geom.kernel_size, geom.in_channels
        self.num_gates, self.out_channels = P, c
        self.register_buffer("gate_weight", G[:-1].T.reshape(P, cin, k, k).contiguous())
        self.register_buffer("gate_bias", G[-1].contiguous())
        # conv weight (P*c, C, k, k): output channel i*c + j is column j of V_i.
        self.weight = nn.Parameter(V[:, :-1, :].permute(0, 2, 1).reshape(P * c, cin, k, k).contiguous())
        self.bias = nn.Parameter(V[:, -1, :].reshape(P * c).contiguous())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.geom
        masks = F.conv2d(z, self.gate_weight, self.gate_bias, g.stride, g.padding) >= 0
        out = F.conv2d(z, self.weight, self.bias, g.stride, g.padding)
        b, _, h, w = out.shape
        out = (out.view(b, self.num_gates, self.out_channels, h, w) * masks.unsqueeze(2)).sum(1)
        return out.clamp_min(0) if self.output_relu else out

    def solution(self) -> torch.Tensor:
        """``V`` (P, d, c) of the active gates (the inverse of the constructor's reshape)."""
        P, c, k, cin = self.num_gates, self.out_channels, self.geom.kernel_size, self.geom.in_channels
        W = self.weight.detach().reshape(P, c, cin * k * k).permute(0, 2, 1)
        return torch.cat([W, self.bias.detach().reshape(P, 1, c)], dim=1)

    def num_parameters(self, *, count_gates: bool = True) -> int:
        n = self.weight.numel() + self.bias.numel()
        return n + (self.gate_weight.numel() + self.gate_bias.numel() if count_gates else 0)

    def macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates per sample for an input of spatial size ``in_hw``."""
        h, w = self.geom.out_hw(*in_hw)
        per_pos = (self.geom.d - 1) * self.num_gates * (self.out_channels + 1)
        return h * w * per_pos


class LowRankGatedConvStudent(nn.Module):
    """A factored convex student: ``sum_j 1[conv(z, g_{gate_of[j]}) >= 0] conv(z, a_j) w_j``.

    The neuron form of :class:`GatedConvStudent` (see :mod:`convexedge.host.lowrank`): ``R``
    neurons, each a ``k x k`` filter ``a_j`` gated by one of the fixed gates, summed by a 1x1 conv.
    It costs ``R (C k^2 + 1 + c)`` parameters instead of ``P (C k^2 + 1) c``.

    Args:
        A: (C*k*k + 1, R) neuron filters (last row = bias), columns in patch order.
        W: (R, c_out) second layer.
        G: (C*k*k + 1, P) fixed gates (only the columns some neuron uses are kept).
        gate_of: (R,) the gate (column of ``G``) of each neuron.
        geom: the patch geometry of the convex problem.
        output_relu: ReLU on the output (as :class:`GatedConvStudent`).

    The gate-to-neuron expansion is a fixed one-hot 1x1 conv, so exports see only ``Conv``, ``Mul``
    and comparison ops.
    """

    def __init__(
        self,
        A: np.ndarray | torch.Tensor,
        W: np.ndarray | torch.Tensor,
        G: np.ndarray | torch.Tensor,
        gate_of: np.ndarray | torch.Tensor,
        geom: ConvGeometry,
        *,
        output_relu: bool = False,
    ) -> None:
        super().__init__()
        A, W, G = _as_tensor(A), _as_tensor(W), _as_tensor(G)
        gate_of = torch.as_tensor(np.asarray(gate_of), dtype=torch.int64)
        R = A.shape[1] if A.ndim == 2 else -1
        if (
            A.ndim != 2
            or A.shape[0] != geom.d
            or W.ndim != 2
            or W.shape[0] != R
            or G.ndim != 2
            or G.shape[0] != geom.d
            or gate_of.shape != (R,)
        ):
            raise ValueError(
                f"expected A ({geom.d}, R), W (R, c), G ({geom.d}, P), gate_of (R,); got A "
                f"{tuple(A.shape)}, W {tuple(W.shape)}, G {tuple(G.shape)}, gate_of {tuple(gate_of.shape)}"
            )
        if R < 1 or int(gate_of.min()) < 0 or int(gate_of.max()) >= G.shape[1]:
            raise ValueError(f"need R >= 1 neurons with gate_of in [0, {G.shape[1]}), got {gate_of.tolist()}")
        used, local = torch.unique(gate_of, return_inverse=True)  # keep only the gates in use
        G = G[:, used]
        P, c = G.shape[1], W.shape[1]
        k, cin = geom.kernel_size, geom.in_channels
        self.geom, self.output_relu = geom, output_relu
        self.num_gates, self.num_neurons, self.out_channels = P, R, c
        self.register_buffer("gate_weight", G[:-1].T.reshape(P, cin, k, k).contiguous())
        self.register_buffer("gate_bias", G[-1].contiguous())
        self.register_buffer("gate_index", used.clone())  # columns of the G passed in
        self.register_buffer("expand", F.one_hot(local, P).float().reshape(R, P, 1, 1).contiguous())
        self.weight = nn.Parameter(A[:-1].T.reshape(R, cin, k, k).contiguous())
        self.bias = nn.Parameter(A[-1].contiguous())
        self.out_weight = nn.Parameter(W.T.reshape(c, R, 1, 1).contiguous())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        g = self.geom
        masks = (F.conv2d(z, self.gate_weight, self.gate_bias, g.stride, g.padding) >= 0).to(z.dtype)
        h = F.conv2d(z, self.weight, self.bias, g.stride, g.padding) * F.conv2d(masks, self.expand)
        out = F.conv2d(h, self.out_weight)
        return out.clamp_min(0) if self.output_relu else out

    def factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, W, G, gate_of)`` with ``G`` the kept gates and ``gate_of`` indexing its columns."""
        R, c, P = self.num_neurons, self.out_channels, self.num_gates
        A = torch.cat([self.weight.detach().reshape(R, -1).T, self.bias.detach().reshape(1, R)], dim=0)
        W = self.out_weight.detach().reshape(c, R).T
        G = torch.cat([self.gate_weight.reshape(P, -1).T, self.gate_bias.reshape(1, P)], dim=0)
        return A, W, G, self.expand.reshape(R, P).argmax(1)

    def num_parameters(self, *, count_gates: bool = True) -> int:
        n = self.weight.numel() + self.bias.numel() + self.out_weight.numel()
        return n + (self.gate_weight.numel() + self.gate_bias.numel() if count_gates else 0)

    def macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates per sample for an input of spatial size ``in_hw``."""
        h, w = self.geom.out_hw(*in_hw)
        per_pos = (self.geom.d - 1) * (self.num_neurons + self.num_gates) + self.num_neurons * (
            self.out_channels + 1
        )
        return h * w * per_pos


class StudentChain(nn.Sequential):
    """Gated conv students applied in sequence: one per block of a multi-block span.

    Each student was fitted on the previous student's outputs to match its teacher block's outputs
    (:func:`convexedge.host.distill.fit_chain`), so the chain maps the span's input to its output.
    """

    def num_parameters(self, *, count_gates: bool = True) -> int:
        return sum(int(m.num_parameters(count_gates=count_gates)) for m in self)

    def macs(self, in_hw: tuple[int, int]) -> int:
        """Multiply-accumulates per sample for an input of spatial size ``in_hw``."""
        total = 0
        for m in self:
            total += m.macs(in_hw)
            in_hw = m.geom.out_hw(*in_hw)
        return total


class GatedMLPStudent(nn.Module):
    """``sum_i 1[[x, 1] . g_i >= 0] * [x, 1] @ V_i`` on flat vectors.

    Args:
        V: (P, d + 1, c) convex solution (last row = bias).
        G: (d + 1, P) fixed gates.
        drop_inactive: keep only the active gates.

    Input (n, d) -> output (n, c).
    """

    def __init__(
        self, V: np.ndarray | torch.Tensor, G: np.ndarray | torch.Tensor, *, drop_inactive: bool = True
    ) -> None:
        super().__init__()
        V, G = _as_tensor(V), _as_tensor(G)
        if V.ndim != 3 or G.ndim != 2 or G.shape != (V.shape[1], V.shape[0]):
            raise ValueError(
                f"expected V (P, d+1, c) and G (d+1, P), got V {tuple(V.shape)}, G {tuple(G.shape)}"
            )
        if drop_inactive:
            keep = V.flatten(1).abs().amax(1) > 0
            if not bool(keep.any()):
                keep[0] = True
            V, G = V[keep], G[:, keep]
        self.register_buffer("gates", G.contiguous())
        self.V = nn.Parameter(V.contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        masks = (z @ self.gates >= 0).to(z.dtype)  # (n, P)
        zv = (z @ self.V.permute(1, 0, 2).reshape(z.shape[1], -1)).view(z.shape[0], *self.V.shape[::2])
        return (zv * masks.unsqueeze(2)).sum(1)

    def num_parameters(self, *, count_gates: bool = True) -> int:
        return self.V.numel() + (self.gates.numel() if count_gates else 0)
