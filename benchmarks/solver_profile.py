"""Where the solver time goes: our FISTA vs proximal Adam, component by component.

The solver benchmark's headline ratio vs proximal Adam is ``iterations ratio x per-iteration cost
ratio``. This profile replays, for chosen cells of ``benchmarks/results/solvers.json``, our FISTA
and the fastest Adam run of that cell (its lr) for exactly the iterations each needed to reach
1e-4 there, with every solver component wrapped by a timer:

* ``operator setup``: the Gram build (``GatedProblem.gram``) and the block metric (blocks and
  eigendecompositions), once per solve (its calls count builds, not cached lookups);
* ``image`` / ``grad`` / ``smooth`` / ``quad``: the operator's products (``image`` is the GEMM pair
  ``A^T A V`` in direct mode, ``G V`` in Gram mode) and the cheap reductions on their result;
* ``prox``: the group soft-threshold (Euclidean) or the exact prox in the block metric;
* ``rotate``: the block metric's change of basis;
* ``check``: the stopping test (KKT residual from the stored gradient) and history;
* ``other``: everything else (momentum, Adam's moments, Python).

Timers are exclusive: a timed call inside another timed call counts only once, in the outer one.
The wrappers cost about a microsecond per call, far below the components.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.solver_profile [--cells synthetic:0.01,patches:0.1]``;
writes ``benchmarks/results/solver_profile.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import time
import warnings

import torch

from benchmarks._common import RESULTS, environment, table, write_json
from benchmarks.solvers import fresh, problems
from convexedge.host.solvers import AdamConfig, FistaConfig, solve
from convexedge.host.solvers import fista as fista_mod
from convexedge.host.solvers import metric as metric_mod
from convexedge.host.solvers import problem as problem_mod

COMPONENTS = ("operator setup", "image", "grad", "smooth", "quad", "prox", "rotate", "check")


class Timers:
    """Exclusive per-component wall time and call counts."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(COMPONENTS, 0.0)
        self.calls = dict.fromkeys(COMPONENTS, 0)
        self._depth = 0

    def wrap(self, name: str, fn, counts=None):
        """``fn`` timed under ``name``; ``counts(*args)`` (optional, asked before the call) says
        whether the call is counted (a cached lookup of a built operator is timed, not counted)."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self._depth:
                return fn(*args, **kwargs)
            counted = counts is None or counts(*args)
            self._depth += 1
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += counted
                self._depth -= 1

        return timed


@contextlib.contextmanager
def instrumented(timers: Timers):
    """Wrap the solver's components (module functions and operator methods) for one solve."""
    builds = {  # operator-setup calls that build rather than return the cached result
        "gram": lambda prob, *_: not prob.has_gram,
        "gate_blocks": lambda prob, *_: prob._blocks is None,
    }
    targets = [
        (problem_mod.GatedProblem, "gram", "operator setup"),
        (problem_mod.GatedProblem, "gate_blocks", "operator setup"),
        (metric_mod.BlockMetric, "from_blocks", "operator setup"),
        (fista_mod, "prox_group", "prox"),
        (fista_mod, "prox_in_metric", "prox"),
        (fista_mod, "kkt_residual", "check"),
        (metric_mod.BlockMetric, "rotate", "rotate"),
        (metric_mod.BlockMetric, "unrotate", "rotate"),
    ]
    for op in (fista_mod._Direct, fista_mod._Gram):
        targets += [
            (op, m, "image" if m == "normal" else m) for m in ("image", "grad", "smooth", "quad", "normal")
        ]
    saved = [(owner, attr, owner.__dict__[attr]) for owner, attr, _ in targets]
    try:
        for owner, attr, name in targets:
            raw = owner.__dict__[attr]
            if isinstance(raw, classmethod):
                setattr(owner, attr, classmethod(timers.wrap(name, raw.__func__)))
            else:
                setattr(owner, attr, timers.wrap(name, raw, builds.get(attr)))
        yield timers
    finally:
        for owner, attr, raw in saved:
            setattr(owner, attr, raw)


def profile_one(arrays, lam: float, method: str, iterations: int, lr: float | None) -> dict:
    prob = fresh(arrays, "cpu")
    cfg = (
        FistaConfig(tol=0.0, max_iter=iterations)
        if method == "fista"
        else AdamConfig(lr=lr, tol=0.0, max_iter=iterations)
    )
    timers = Timers()
    with instrumented(timers), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = solve(prob, lam, cfg, method=method)
        total = time.perf_counter() - t0
    other = total - sum(timers.seconds.values())
    return {
        "iterations": res.iterations,
        "total_seconds": total,
        "seconds": {**timers.seconds, "other": other},
        "calls": timers.calls,
        "operator": res.operator,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", default="synthetic:0.01,patches:0.1", help="problem:lam_ratio,...")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    source = json.loads((RESULTS / "solvers.json").read_text())
    cells = [(c.split(":")[0], float(c.split(":")[1])) for c in args.cells.split(",")]
    rows, out = [], []
    for pname, arrays in problems(False, sorted({p for p, _ in cells})):
        lam_max = fresh(arrays, "cpu", "float64").lam_max()
        for ratio in (r for p, r in cells if p == pname):
            cell = [r for r in source["rows"] if r["problem"] == pname and r["lam"] == ratio]
            ours = next(r for r in cell if r["contender"] == "fista")
            adams = [r for r in cell if r["contender"].startswith("adam") and r.get("iters_1e-04")]
            adam = min(adams, key=lambda r: r["t_1e-04"])
            runs = {
                "fista": profile_one(arrays, ratio * lam_max, "fista", ours["iters_1e-04"], None),
                "adam": profile_one(arrays, ratio * lam_max, "adam", adam["iters_1e-04"], adam["lr"]),
            }
            out.append({"problem": pname, "lam": ratio, "adam_contender": adam["contender"], "runs": runs})
            for who, r in runs.items():
                its = max(r["iterations"], 1)
                parts = [*r["seconds"].items(), ("TOTAL", r["total_seconds"])]
                for comp, secs in parts:
                    calls = r["calls"].get(comp, its if comp == "TOTAL" else None)
                    rows.append(
                        {"problem": pname, "lam": ratio, "solver": who, "component": comp, "calls": calls,
                         "seconds": secs, "ms_per_iter": 1e3 * secs / its, "share": secs / r["total_seconds"]}
                    )  # fmt: skip
            f, a = runs["fista"], runs["adam"]
            per_iter = lambda r: r["total_seconds"] / max(r["iterations"], 1)  # noqa: E731
            print(
                f"{pname} {ratio}: iterations adam/ours {a['iterations'] / f['iterations']:.2f}, "
                f"per-iteration adam/ours {per_iter(a) / per_iter(f):.2f}, "
                f"time adam/ours {a['total_seconds'] / f['total_seconds']:.2f}",
                flush=True,
            )
    cols = [("problem", "problem", ""), ("lam", "lam", "g"), ("solver", "solver", ""),
            ("component", "component", ""), ("calls", "calls", "d"), ("seconds", "seconds", ".3f"),
            ("ms_per_iter", "ms/iter", ".2f"), ("share", "share", ".1%")]  # fmt: skip
    print(table(rows, cols))
    meta = {**environment(), "threads": args.threads, "source": "benchmarks/results/solvers.json"}
    path = write_json("solver_profile", {"meta": meta, "rows": rows, "cells": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
