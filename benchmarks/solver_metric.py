"""FISTA's proximal-step metric: Euclidean vs block-Jacobi, side by side on the solver problems.

For each problem and lam (one-vs-all form, float32, one thread by default) FISTA runs once with
``metric="identity"`` and once with ``metric="block"`` under the same operator (the one ``"auto"``
picks: Gram on ``patches``, direct on ``synthetic``), each to a relative KKT residual of 1e-6 (or
its cap). ``F*`` is the lower of a float64 solve warm-started from the better answer (to KKT 1e-9)
and both final objectives. Reported: iterations and seconds to 1e-2 / 1e-3 / 1e-4 relative
suboptimality (the clock starts on entry to ``solve``, so the metric's eigendecompositions and the
Gram build are included), and the ratio identity / block.

Run: ``python -m benchmarks.solver_metric [--problems patches,synthetic] [--lams 0.1,0.01]``;
writes ``benchmarks/results/solver_metric.json``.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from benchmarks._common import environment, table, write_json
from benchmarks.solvers import TOLS, fresh, problems, reach
from convexedge.host.solvers import FistaConfig, solve

METRICS = ("identity", "block")


def run(arrays, lam: float, metric: str, max_seconds: float) -> dict:
    prob = fresh(arrays, "cpu")
    cfg = FistaConfig(tol=1e-6, max_iter=10**6, max_seconds=max_seconds, metric=metric)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = solve(prob, lam, cfg)
    return {"res": res, "operator": res.operator}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="patches,synthetic")
    ap.add_argument("--lams", default="0.1,0.01")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=900.0, help="cap of each solve")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ratios = [float(x) for x in args.lams.split(",")]
    rows, started = [], time.perf_counter()
    for pname, arrays in problems(False, args.problems.split(",")):
        ref_prob = fresh(arrays, "cpu", "float64")
        lam_max = ref_prob.lam_max()
        for ratio in ratios:
            lam = ratio * lam_max
            runs = {m: run(arrays, lam, m, args.max_seconds) for m in METRICS}
            best = min(runs.values(), key=lambda r: r["res"].objective)["res"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cfg = FistaConfig(tol=1e-9, max_iter=10**7, max_seconds=900.0)
                ref = solve(ref_prob, lam, cfg, V0=best.V)
            f_star = min([ref.objective] + [r["res"].objective for r in runs.values()])
            for metric, r in runs.items():
                res = r["res"]
                hit = reach(res.history, f_star)
                row = {
                    "problem": pname, "lam": ratio, "metric": metric, "operator": r["operator"],
                    "iterations": res.iterations, "seconds": res.seconds, "kkt": res.kkt_residual,
                    "converged": res.converged, "objective": res.objective, "f_star": f_star,
                }  # fmt: skip
                for tol in TOLS:
                    row[f"t_{tol:.0e}"], row[f"it_{tol:.0e}"] = hit[tol]
                rows.append(row)
            a, b = rows[-2], rows[-1]
            for key in ("t_1e-04", "it_1e-04"):
                if a[key] is not None and b[key] is not None:
                    b[f"ratio_{key}"] = a[key] / b[key]
            print(
                f"[{time.perf_counter() - started:.0f}s] {pname} {ratio:g} lam_max: identity "
                f"{a['t_1e-04']} s ({a['it_1e-04']} it), block {b['t_1e-04']} s ({b['it_1e-04']} it)",
                flush=True,
            )
    cols = [("problem", "problem", "s"), ("lam", "lam/lam_max", "g"), ("metric", "metric", "s"),
            ("operator", "operator", "s"), ("it_1e-04", "it to 1e-4", "d"), ("t_1e-04", "s to 1e-4", ".2f"),
            ("ratio_t_1e-04", "speedup", ".2f"), ("iterations", "it (KKT 1e-6)", "d"),
            ("kkt", "final KKT", ".1e")]  # fmt: skip
    print(table(rows, cols))
    meta = environment()
    meta.update(threads=torch.get_num_threads(), dtype="float32", group="gate_output")
    wall = time.perf_counter() - started
    path = write_json("solver_metric", {"meta": meta, "rows": rows, "wall_seconds": wall})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
