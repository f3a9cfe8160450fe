"""The prox benchmark's reference: bisection gives the same prox as Newton, and the optimality
residual it reports is small at the prox and large away from it."""

from __future__ import annotations

import pytest
import torch

from benchmarks.solver_prox import optimality, prox_bisection
from convexedge.host.solvers.metric import prox_in_metric
from convexedge.host.solvers.problem import group_norms


@pytest.mark.parametrize("group", ["gate", "gate_output"])
def test_bisection_and_newton_agree_and_both_are_optimal(group):
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(6, 5, 3, generator=gen, dtype=torch.float64)
    w = torch.rand(6, 5, generator=gen, dtype=torch.float64) * 10 + 0.01
    thresh = float(group_norms(w[:, :, None] * u, group).median())  # some groups zero, some not
    newton, bisect = prox_in_metric(u, w, thresh, group), prox_bisection(u, w, thresh, group)
    assert torch.allclose(newton, bisect, rtol=1e-12, atol=1e-14)
    assert (newton == 0).any() and (newton != 0).any()
    assert optimality(newton, u, w, thresh, group) < 1e-12
    assert optimality(bisect, u, w, thresh, group) < 1e-12
    assert optimality(1.1 * newton, u, w, thresh, group) > 1e-3
