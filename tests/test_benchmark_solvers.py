"""The solver benchmark's bookkeeping (no solves): time-to-tolerance, the summary's worst ratio and
its lower-bound flag, and the active-neuron comparison with pyscnn."""

from __future__ import annotations

import pytest

from benchmarks.solvers import reach, summarise_all


def row(problem, lam, contender, t4, seconds=None, objective=1.0, active=8):
    return {
        "problem": problem, "lam": lam, "contender": contender, "t_1e-04": t4,
        "seconds": seconds if seconds is not None else (t4 or 0.0),
        "objective": objective, "active_neurons": active,
    }  # fmt: skip


def test_reach_reads_the_first_crossing():
    hist = {
        "objective": [2.0, 1.01, 1.0005, 1.00005],
        "seconds": [0.0, 1.0, 2.0, 3.0],
        "iteration": [0, 1, 2, 3],
    }
    got = reach(hist, 1.0)
    assert got[1e-2] == (2.0, 2) and got[1e-3] == (2.0, 2) and got[1e-4] == (3.0, 3)
    assert reach({**hist, "objective": [2.0] * 4}, 1.0)[1e-4] == (None, None)


def test_summary_takes_the_smallest_ratio_and_flags_lower_bounds():
    rows = [
        row("synthetic", 0.1, "fista", 2.0),
        row("synthetic", 0.1, "pyscnn_tight", 20.0),
        row("synthetic", 0.1, "adam_best", 4.0),
        row("synthetic", 0.1, "adam_lr0.01", 3.0),  # the fastest Adam run of the cell counts
        row("patches", 0.01, "fista", 10.0),
        row("patches", 0.01, "pyscnn_tight", None, seconds=80.0),  # never reached: >= 8x
        row("patches", 0.01, "adam_best", 50.0),
        row("small", 0.1, "fista", 1.0),
        row("small", 0.1, "pyscnn_tight", 1.5),
    ]
    s = summarise_all(rows)
    assert s["speedup_vs_pyscnn_min"] == pytest.approx(8.0) and s["speedup_vs_pyscnn_min_is_lower_bound"]
    assert s["speedup_vs_pyscnn_min_at"] == "patches lam=0.01"
    assert s["speedup_vs_adam_min"] == pytest.approx(1.5) and not s["speedup_vs_adam_min_is_lower_bound"]
    assert s["speedup_vs_pyscnn_min_incl_small"] == pytest.approx(1.5)


def test_active_neurons_compared_only_at_equal_or_worse_pyscnn_objective():
    rows = [
        row("synthetic", 0.1, "fista", 2.0, objective=1.0, active=10),
        row("synthetic", 0.1, "pyscnn", 9.0, objective=1.2, active=12),  # compared: fine
        row("synthetic", 0.1, "pyscnn_tight", 20.0, objective=0.99, active=6),  # lower objective: skipped
        row("patches", 0.1, "fista", 2.0, objective=1.0, active=10),
        row("patches", 0.1, "pyscnn_tight", 30.0, objective=1.0, active=9),  # equal objective, fewer
    ]
    s = summarise_all(rows)
    assert s["active_vs_pyscnn_compared"] == 2
    assert s["more_active_than_pyscnn_at"] == ["patches lam=0.1 vs pyscnn_tight"]


def test_profile_timers_are_exclusive_and_restored():
    import numpy as np

    from benchmarks.solver_profile import profile_one
    from convexedge.host.solvers import fista as fista_mod

    rng = np.random.default_rng(0)
    Z = rng.standard_normal((300, 6)).astype(np.float32)
    arrays = (Z, rng.standard_normal((300, 2)).astype(np.float32), Z @ rng.standard_normal((6, 4)) >= 0)
    before = fista_mod._Direct.image
    for method, lr in (("fista", None), ("adam", 1e-2)):
        r = profile_one(arrays, 0.01, method, 30, lr)
        assert r["iterations"] == 30 and r["calls"]["image"] >= 30 and r["calls"]["check"] >= 30
        parts = sum(v for k, v in r["seconds"].items() if k != "other")
        assert 0 < parts <= r["total_seconds"] and r["seconds"]["other"] >= 0
    assert fista_mod._Direct.image is before


def test_profile_counts_operator_builds_not_cached_lookups():
    import warnings

    import numpy as np

    from benchmarks.solver_profile import Timers, instrumented
    from benchmarks.solvers import fresh
    from convexedge.host.solvers import FistaConfig, solve

    rng = np.random.default_rng(0)
    Z = rng.standard_normal((300, 6)).astype(np.float32)
    arrays = (Z, rng.standard_normal((300, 2)).astype(np.float32), Z @ rng.standard_normal((6, 4)) >= 0)
    prob, timers = fresh(arrays, "cpu"), Timers()
    with instrumented(timers), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solve(prob, 0.01 * prob.lam_max(), FistaConfig(operator="gram", metric="block", max_iter=30))
        prob.gram(), prob.gram(), prob.gate_blocks()  # cached: timed, not counted
    # one Gram build, one block extraction, one eigendecomposition
    assert timers.calls["operator setup"] == 3


def test_each_ratio_uses_our_time_from_its_own_run():
    rows = [
        row("patches", "path", "fista", 100.0),  # the fista row of the run that finished last
        {**row("patches", "path", "pyscnn_tight", None, seconds=660.0), "ours_t_1e-04": 110.0},
        {**row("patches", "path", "adam_best", 480.0), "ours_t_1e-04": 120.0},
    ]
    s = summarise_all(rows)
    assert s["speedup_vs_pyscnn_min"] == pytest.approx(6.0) and s["speedup_vs_pyscnn_min_is_lower_bound"]
    assert s["speedup_vs_adam_min"] == pytest.approx(4.0)


def test_a_partial_run_replaces_only_its_own_contenders_rows():
    from benchmarks.solvers import merge_rows

    old = {
        "meta": {"runs": [], "problems": {}},
        "rows": [
            row("patches", "path", "fista", 100.0),
            row("patches", "path", "pyscnn_tight", None, seconds=600.0),
            row("patches", 0.1, "fista", 5.0),
        ],
    }
    new = [row("patches", "path", "fista", 90.0), row("patches", "path", "adam_best", 300.0)]
    merged, meta = merge_rows(old, new, {"command": "x"}, 1.0, by_contender=True)
    got = {(r["problem"], str(r["lam"]), r["contender"]): r["t_1e-04"] for r in merged}
    assert got == {
        ("patches", "path", "fista"): 90.0,
        ("patches", "path", "pyscnn_tight"): None,
        ("patches", "path", "adam_best"): 300.0,
        ("patches", "0.1", "fista"): 5.0,
    }
    whole, _ = merge_rows(old, new, {"command": "x"}, 1.0)  # a full run replaces the whole cell
    assert {r["contender"] for r in whole if r["lam"] == "path"} == {"fista", "adam_best"}
    assert meta["runs"][-1]["cells"] == ["patches path"]
