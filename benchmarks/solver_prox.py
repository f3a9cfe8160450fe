"""The block-metric prox on real calls: safeguarded Newton (ours) vs bisection, side by side.

FISTA with ``metric="block"`` solves one small "secular equation" per group and iteration
(:func:`convexedge.host.solvers.metric.prox_in_metric`). This benchmark records the prox calls
that real solves make (the ``patches`` problem: ResNet-20 layer3 on real CIFAR-10 images, one-vs-all
form, at 0.1, 0.01 and 0.001 lam_max), then replays every recorded call through

* ``newton``: ``prox_in_metric`` (Newton on ``1/||z(sigma)|| - sigma/lam`` from the upper bracket
  end, Moré & Sorensen's form), and
* ``bisection``: bisection of the increasing ``sigma ||z(sigma)|| - lam`` on the same bracket to
  the same stopping rule, the plain safe method a reader would write first.

Reported per lam: ms per call (median of ``--repeats`` replays of all the calls), the ratio
bisection / newton, the largest relative difference between the two answers, and each answer's
optimality residual ``max_g ||w (z - u) + lam z / ||z|| ||  / ||w u||`` over active groups.

Run: ``python -m benchmarks.solver_prox [--images 200] [--gates 16] [--calls 60] [--repeats 5]``;
writes ``benchmarks/results/solver_prox.json``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from benchmarks._common import environment, table, write_json
from benchmarks.solvers import fresh, patches
from convexedge.host.solvers import FistaConfig, fista, solve
from convexedge.host.solvers.metric import prox_in_metric, secular_bracket
from convexedge.host.solvers.problem import _broadcast_groups, group_norms

LAMS = (0.1, 0.01, 0.001)


def prox_bisection(u: torch.Tensor, w: torch.Tensor, thresh: float, group: str) -> torch.Tensor:
    """The same prox as ``prox_in_metric``, by bisection on the same bracket and stopping rule."""
    W, a, active, lo, hi = secular_bracket(u, w, thresh, group)
    a2 = a * a
    axes = (1, 2) if group == "gate" else (1,)
    for _ in range(200):
        sigma = 0.5 * (lo + hi)
        den = W + _broadcast_groups(sigma, group)
        psi = sigma * (a2 / (den * den)).sum(dim=axes).sqrt() - thresh
        done = ~active | (psi.abs() <= 1e-14 * thresh) | (hi - lo <= 1e-15 * hi)
        if bool(done.all()):
            break
        lo = torch.where(psi < 0, sigma, lo)
        hi = torch.where(psi > 0, sigma, hi)
    z = a / (W + _broadcast_groups(sigma, group))
    return torch.where(_broadcast_groups(active, group), z, 0.0).to(u.dtype)


def optimality(z: torch.Tensor, u: torch.Tensor, w: torch.Tensor, thresh: float, group: str) -> float:
    """Largest relative residual of ``w (z - u) + thresh z / ||z||`` over the active groups."""
    z, u = z.to(torch.float64), u.to(torch.float64)
    W = w.to(torch.float64)[:, :, None]
    nz = group_norms(z, group)
    active = nz > 0
    r = W * (z - u) + thresh * z / _broadcast_groups(torch.where(active, nz, 1.0), group)
    rel = group_norms(r, group) / group_norms(W * u, group).clamp_min(1e-300)
    return float(rel[active].max()) if bool(active.any()) else 0.0


def record_calls(arrays, lam: float, calls: int, max_seconds: float) -> list[tuple]:
    """The first ``calls`` prox calls a block-metric FISTA solve at ``lam`` makes."""
    seen: list[tuple] = []
    real = fista.prox_in_metric

    def recording(u, w, thresh, group):
        if len(seen) < calls:
            seen.append((u.clone(), w.clone(), float(thresh), group))
        return real(u, w, thresh, group)

    fista.prox_in_metric = recording
    try:
        cfg = FistaConfig(tol=1e-6, max_iter=calls, max_seconds=max_seconds, metric="block")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            solve(fresh(arrays, "cpu"), lam, cfg)
    finally:
        fista.prox_in_metric = real
    return seen


def replay(fn, calls: list[tuple], repeats: int) -> tuple[float, list[torch.Tensor]]:
    """Median ms per call over ``repeats`` replays, and the answers of the last one."""
    per_call = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(*c) for c in calls]
        per_call.append(1e3 * (time.perf_counter() - t0) / len(calls))
    return statistics.median(per_call), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=200, help="training images of the patches problem")
    ap.add_argument("--gates", type=int, default=16)
    ap.add_argument("--calls", type=int, default=60, help="prox calls recorded per lam")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    arrays = patches(args.images, args.gates)
    lam_max = fresh(arrays, "cpu", "float64").lam_max()
    rows = []
    for ratio in LAMS:
        calls = record_calls(arrays, ratio * lam_max, args.calls, max_seconds=600.0)
        t_newton, z_newton = replay(prox_in_metric, calls, args.repeats)
        t_bisect, z_bisect = replay(prox_bisection, calls, args.repeats)
        diff = max(
            float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))
            for a, b in zip(z_newton, z_bisect, strict=True)
        )
        rows.append({
            "lam": ratio, "calls": len(calls),
            "groups_per_call": group_norms(calls[0][0], calls[0][3]).numel(),
            "newton_ms": t_newton, "bisection_ms": t_bisect, "speedup": t_bisect / t_newton,
            "max_rel_diff": diff,
            "newton_optimality": max(optimality(z, *c) for z, c in zip(z_newton, calls, strict=True)),
            "bisection_optimality": max(optimality(z, *c) for z, c in zip(z_bisect, calls, strict=True)),
        })  # fmt: skip
        print(f"{ratio:g} lam_max: newton {t_newton:.2f} ms, bisection {t_bisect:.2f} ms", flush=True)
    cols = [("lam", "lam/lam_max", "g"), ("calls", "calls", "d"), ("newton_ms", "newton ms", ".2f"),
            ("bisection_ms", "bisection ms", ".2f"), ("speedup", "speedup", ".2f"),
            ("max_rel_diff", "max rel diff", ".1e"), ("newton_optimality", "newton opt", ".1e"),
            ("bisection_optimality", "bisection opt", ".1e")]  # fmt: skip
    print(table(rows, cols))
    meta = environment()
    meta.update(problem=f"patches({args.images} images, P={args.gates})", group="gate_output",
                dtype="float32 problem, float64 prox", repeats=args.repeats)  # fmt: skip
    summary = {
        "speedup_min": min(r["speedup"] for r in rows),
        "max_rel_diff": max(r["max_rel_diff"] for r in rows),
    }
    path = write_json("solver_prox", {"meta": meta, "rows": rows, "summary": summary})
    print("summary:", summary)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
