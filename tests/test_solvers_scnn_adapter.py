"""Tests of convexedge.host.solvers.scnn_adapter: pyscnn's R-FISTA on our problem (our masks, our
lam mapped to its 1/(n c) scaling) lands on our optimum, and its answer maps back to our layout."""

from __future__ import annotations

import numpy as np
import pytest

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.solvers import FistaConfig, GatedProblem, PyscnnConfig, solve
from convexedge.host.solvers.scnn_adapter import scnn_available

needs_scnn = pytest.mark.skipif(
    not scnn_available(), reason="pyscnn is not installed (pip install pyscnn==0.0.10, the bench extra)"
)


def tiny(group="gate_output", linear_gate=True):
    rng = np.random.default_rng(0)
    n, d, c, P = 120, 5, 3, 6
    Z = rng.standard_normal((n, d))
    G = rng.standard_normal((d, P))
    if linear_gate:
        G[:, 0] = 0.0  # an always-on gate: pyscnn's own "X g > 0" would switch it off everywhere
    Y = np.maximum(Z @ rng.standard_normal((d, 2)), 0) @ rng.standard_normal((2, c))
    return GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group=group, dtype="float64")


@needs_scnn
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pyscnn_matches_ours_on_tiny_problem():
    prob = tiny()
    lam = 0.1 * prob.lam_max()
    ours = solve(prob, lam, FistaConfig(tol=1e-10, max_iter=20_000))
    theirs = solve(prob, lam, PyscnnConfig(tol=1e-12), method="pyscnn")
    assert theirs.V.shape == ours.V.shape and theirs.V.dtype == ours.V.dtype
    assert theirs.objective == pytest.approx(ours.objective, rel=1e-6)
    assert theirs.objective >= ours.objective * (1 - 1e-9)
    # pyscnn's own objective, mapped by F_ours = c * F_scnn, is the true objective of the mapped V
    assert theirs.history["objective"][-1] == pytest.approx(theirs.objective, rel=1e-9)
    assert theirs.kkt_residual < 1e-3 and theirs.operator == "pyscnn"
    assert len(theirs.history["seconds"]) == len(theirs.history["objective"])


@needs_scnn
def test_pyscnn_iteration_cap_warns():
    prob = tiny()
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        res = solve(prob, 0.01 * prob.lam_max(), PyscnnConfig(max_iter=2, tol=0.0), method="pyscnn")
    assert not res.converged


@needs_scnn
def test_pyscnn_time_cap_stops_unconverged():
    prob = tiny()
    cfg = PyscnnConfig(max_iter=10**7, tol=0.0, max_seconds=0.3)
    with pytest.warns(ConvergenceWarning, match="max_seconds=0.3"):
        res = solve(prob, 0.01 * prob.lam_max(), cfg, method="pyscnn")
    assert not res.converged and 0 < res.iterations < 10**7
    assert res.seconds < 5.0


@needs_scnn
def test_pyscnn_time_cap_is_on_its_own_solve_clock_and_pyscnn_is_restored():
    import scnn.private.methods.optimization_procedures.iterative as loop

    before = loop.update_metrics
    prob = tiny()
    cfg = PyscnnConfig(max_iter=10**7, tol=0.0, max_seconds=0.4)
    with pytest.warns(ConvergenceWarning, match="max_seconds=0.4"):
        res = solve(prob, 0.01 * prob.lam_max(), cfg, method="pyscnn")
    own = res.history["seconds"][-1]  # pyscnn's solve clock, metric evaluation excluded
    # the cap ran on that clock: it reached (about) the cap, while the wall clock ran longer
    assert 0.2 < own < 0.4 + 1.0
    assert res.seconds > own
    assert loop.update_metrics is before


@needs_scnn
def test_pyscnn_zero_solution_above_lam_max():
    prob = tiny()
    res = solve(prob, 1.5 * prob.lam_max(), method="pyscnn")
    assert res.converged and not res.V.any() and tuple(res.V.shape) == (6, 5, 3)


def test_pyscnn_needs_one_vs_all_groups():
    with pytest.raises(ValueError, match="group='gate_output'"):
        solve(tiny(group="gate"), 0.1, method="pyscnn")


def test_pyscnn_missing_reports_install_hint(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_scnn(name, *args, **kwargs):
        if name == "scnn" or name.startswith("scnn.") or name == "lab":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_scnn)
    assert not scnn_available()
    with pytest.raises(ImportError, match=r"pip install pyscnn==0.0.10"):
        solve(tiny(), 0.1, method="pyscnn")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_iter": -1}, "max_iter must be"),
        ({"tol": -1.0}, "tol must be"),
        ({"metric_freq": 0}, "metric_freq"),
        ({"max_seconds": 0.0}, "max_seconds"),
    ],
)
def test_pyscnn_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PyscnnConfig(**kwargs)


@needs_scnn
def test_pyscnn_rejects_bad_v0():
    import torch

    with pytest.raises(ValueError, match="V0 must have shape"):
        solve(tiny(), 0.1, method="pyscnn", V0=torch.zeros(1, 1, 1))
