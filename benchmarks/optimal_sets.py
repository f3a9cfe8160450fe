"""Optimal sets and minimal networks: how many neurons does optimal-set pruning remove, at what cost?

For each problem (``synthetic`` and ``patches`` of BENCHMARKS.md section 1, plus a ``wide`` one with
more gates than samples) and group form, in float64:

1. solve to a relative KKT residual of 1e-10 (``--quick``: 1e-9, with a time cap; the achieved
   residual is recorded): our FISTA, and where it stalls (a quarter of the cap) the active-set Newton
   polish (:func:`convexedge.host.solvers.newton_polish`) from its answer; FISTA alone cannot do
   ``patches`` (it stood at 9e-5 after 900 s in float64 with the Gram operator);
2. ``prune_to_minimal``: active neurons before and after, the relative objective change, seconds
   (median of 3 repeats, raw repeats kept), whether the optimum was unique;
3. magnitude pruning to the same neuron count, with and without a re-solve on the kept gates:
   objective increase and training R^2;
4. pyscnn 0.0.10 (one-vs-all form only, its default R-FISTA stop) in a subprocess of a separate
   venv (``--scnn-python``): its active neurons and objective;
5. the exact ReLU (cone-constrained) form on a tiny problem: our augmented Lagrangian vs pyscnn's
   AL solver, objective, violation, seconds.

Also writes the ``lam`` path PNG (neuron norms vs ``lam``; loss vs neurons, before/after pruning).

Run: ``python -m benchmarks.optimal_sets [--quick] [--scnn-python /tmp/scnn6-venv/bin/python]``;
writes ``benchmarks/results/optimal_sets.json`` and ``benchmarks/results/optimal_sets_path.png``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import RESULTS, environment, table, write_json
from convexedge.device.errors import ConvergenceWarning
from convexedge.host.optimal_set import (
    check_uniqueness,
    magnitude_prune,
    plot_path,
    prune_to_minimal,
    regularization_path,
    solve_relu,
)
from convexedge.host.solvers import FistaConfig, GatedProblem, NewtonConfig, newton_polish, solve


# --------------------------------------------------------------------------------- problems
def synthetic(n: int, d: int, c: int, P: int, hidden: int = 64, seed: int = 0):
    """Z ~ N(0, I); Y from a random two-layer ReLU net with ``hidden`` units + 1% noise; Gaussian gates."""
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    W1 = rng.standard_normal((d, hidden)) / np.sqrt(d)
    W2 = rng.standard_normal((hidden, c)) / np.sqrt(hidden)
    Y = np.maximum(Z @ W1, 0) @ W2
    Y += 0.01 * Y.std() * rng.standard_normal(Y.shape)
    G = np.random.default_rng(0).standard_normal((d, P))
    return Z, Y, G


def patches(images: int, P: int, seed: int = 0):
    """Last stage of the bundled ResNet-20: 3x3 input patches (288 + bias) -> stage output channels."""
    from convexedge.host.capture import capture_block
    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import infer_geometry, make_gates
    from convexedge.host.students import image_to_rows, patch_matrix
    from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

    teacher = load_teacher()
    mean, std = teacher_normalization()
    train = load_images(BUNDLED_DATA_DIR, "train", labels=False, limit=images)
    with tempfile.TemporaryDirectory() as tmp:
        sh = capture_block(teacher, "layer3", train.x, f"{tmp}/layer3",
                           transform=lambda x: normalize_images(x, mean, std), progress=False)  # fmt: skip
        z_in, z_out = np.array(sh.load("inputs")), np.array(sh.load("outputs"))
    geom = infer_geometry(z_in.shape[1:], z_out.shape[1:], 3)
    _, G = make_gates(geom.d, P, seed, linear_gate=False)  # no zero gate: pyscnn's X g > 0 agrees
    Z = patch_matrix(torch.as_tensor(z_in, dtype=torch.float64), geom).numpy()
    Y = image_to_rows(torch.as_tensor(z_out, dtype=torch.float64)).numpy()
    return Z, Y, G.astype(np.float64)


# --------------------------------------------------------------------------------- pyscnn
_SCNN_GATED = textwrap.dedent(
    """
    import json, sys, numpy as np, torch
    from convexedge.host.solvers import GatedProblem, PyscnnConfig, solve
    d = np.load(sys.argv[1])
    prob = GatedProblem.from_arrays(d["Z"], d["Y"], d["M"], group="gate_output", dtype="float64")
    res = solve(prob, float(d["lam"]), PyscnnConfig(), method="pyscnn")
    V = res.V.double()
    gates = int((V.reshape(V.shape[0], -1).abs().amax(1) > 0).sum())
    groups = int((torch.linalg.vector_norm(V, dim=1) > 0).sum())
    print(json.dumps({"objective": prob.objective(V, float(d["lam"])), "active": gates, "groups": groups,
                      "seconds": res.seconds, "iterations": res.iterations, "kkt": res.kkt_residual,
                      "converged": bool(res.converged)}))
    """
)

_SCNN_RELU = textwrap.dedent(
    """
    import json, sys, time, numpy as np
    import lab
    from scnn.models import ConvexReLU
    from scnn.solvers import AL
    from scnn.regularizers import NeuronGL1
    from scnn.metrics import Metrics
    from scnn.optimize import optimize_model
    d = np.load(sys.argv[1])
    Z, Y, G, lam = d["Z"], d["Y"], d["G"], float(d["lam"])
    model = ConvexReLU(G, c=Y.shape[1])
    t0 = time.perf_counter()
    model, _ = optimize_model(model, AL(model), Metrics(), Z, Y, regularizer=NeuronGL1(lam / Y.shape[1]),
                              unitize_data=False, dtype="float64", return_convex=True)
    sec = time.perf_counter() - t0
    G2 = np.asarray(model.G)  # pyscnn drops gates with duplicate or empty patterns
    c, P = Y.shape[1], G2.shape[1]
    U, W = (np.asarray(a).reshape(c, P, -1) for a in model.parameters)  # each (c, P, d)
    print(json.dumps({"seconds": sec, "U": U.tolist(), "W": W.tolist(), "G": G2.tolist()}))
    """
)


def _run_scnn(py: str | None, script: str, arrays: dict, timeout: float) -> dict:
    if not py or not Path(py).exists():
        return {"error": f"pyscnn python not found ({py}); create a venv with pyscnn==0.0.10"}
    with tempfile.TemporaryDirectory() as tmp:
        np.savez(f"{tmp}/data.npz", **arrays)
        Path(f"{tmp}/run.py").write_text(script)
        try:
            out = subprocess.run([py, f"{tmp}/run.py", f"{tmp}/data.npz"], capture_output=True, text=True,
                                 timeout=timeout)  # fmt: skip
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
    if out.returncode != 0:
        return {
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc={out.returncode}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------- one row
GRAM_MAX_BYTES = 2 * 2**30
SUPPORT_TOL = 1e-4  # FISTA's tolerance in the Newton polish's support phase
FISTA_SHARE = 0.25  # of a row's solve budget for FISTA alone before the Newton polish


def _r2(prob: GatedProblem, V: torch.Tensor) -> float:
    pred = prob.forward(V)
    return float(1 - (pred - prob.Y).square().sum() / (prob.Y - prob.Y.mean(0)).square().sum())


def run_problem(
    name, Z, Y, G, group, lam_ratio, tol, max_seconds, scnn_py, repeats=3, scnn_timeout=600
) -> dict:
    M = Z @ G >= 0
    prob = GatedProblem.from_arrays(Z, Y, M, group=group, dtype="float64")
    lam = lam_ratio * prob.lam_max()
    row = {"problem": name, "group": group, "n": prob.n, "d": prob.d, "c": prob.c, "P": prob.P,
           "lam_ratio": lam_ratio, "lam": lam}  # fmt: skip
    # The Gram operator (A^T A built once, float64) whenever n > P d: on patches (n=32,000, P d=9,248)
    # it takes 684 MB and makes an iteration ~7x cheaper than two passes over the rows.
    # FISTA first (capped at FISTA_SHARE of the budget); where it stalls above ``tol`` the
    # active-set Newton polish takes over from its answer with the rest of the budget.
    fista = FistaConfig(max_iter=10**6, max_seconds=max_seconds, gram_max_bytes=GRAM_MAX_BYTES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported in the row (kkt, converged)
        first = solve(prob, lam, replace(fista, tol=tol, max_seconds=FISTA_SHARE * max_seconds))
        res = first
        if not first.converged:
            cfg = NewtonConfig(tol=tol, support_tol=SUPPORT_TOL, max_seconds=max_seconds, fista=fista)
            res = newton_polish(prob, lam, first.V, config=cfg)
            res.seconds += first.seconds
            res.iterations += first.iterations
    row["polished"] = not first.converged
    row["fista_kkt"] = first.kkt_residual
    row.update(solve_seconds=res.seconds, solve_iterations=res.iterations, kkt=res.kkt_residual,
               converged=res.converged, objective=res.objective, operator=res.operator,
               prune_repeats=repeats)  # fmt: skip
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = prune_to_minimal(prob, res)
        times.append(time.perf_counter() - t0)
    row.update(
        active_before=out.active_before, active_after=out.active_after, groups_before=out.groups_before,
        groups_after=out.groups_after, rank=out.rank, bound=out.bound, independent_after=out.independent,
        prune_steps=out.steps, rel_objective_change=out.rel_objective_change,
        fitted_change=out.fitted_change, prune_seconds=statistics.median(times), prune_seconds_raw=times,
        reduction=out.active_before / max(out.active_after, 1),
        dependent_before=out.steps > 0, r2_optimum=_r2(prob, res.V.double()), r2_pruned=_r2(prob, out.V),
    )  # fmt: skip
    try:
        u = check_uniqueness(prob, res)
        row.update(unique=u.unique, uniqueness_reason=u.reason)
    except Exception as exc:  # noqa: BLE001 - reported, not dropped
        row.update(unique=None, uniqueness_reason=f"error: {exc}")
    k = out.active_after
    for refit in (False, True):
        mp = magnitude_prune(prob, res, k, refit=refit, config=FistaConfig(
            tol=1e-8, max_iter=20000, max_seconds=FISTA_SHARE * max_seconds,
            gram_max_bytes=GRAM_MAX_BYTES))  # fmt: skip
        key = "magnitude_refit" if refit else "magnitude"
        row[f"{key}_rel_objective_change"] = mp.rel_objective_change
        row[f"{key}_r2"] = _r2(prob, mp.V)
    if group == "gate_output":
        sc = _run_scnn(scnn_py, _SCNN_GATED, {"Z": Z, "Y": Y, "M": M, "lam": lam}, timeout=scnn_timeout)
        row["pyscnn"] = sc
        row["pyscnn_active"] = sc.get("active")
        if "objective" in sc:
            row["pyscnn_rel_objective_gap"] = (sc["objective"] - res.objective) / abs(res.objective)
    return row


def run_relu(Z, Y, G, lam_ratio, scnn_py) -> dict:
    prob = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, group="gate_output", dtype="float64")
    lam = lam_ratio * prob.lam_max()
    from convexedge.host.constrained import relu_objective

    res = solve_relu(prob, lam)
    row = {"problem": "relu-tiny", "n": prob.n, "d": prob.d, "c": prob.c, "P": prob.P, "lam": lam,
           "ours_objective": res.objective, "ours_violation": res.max_violation, "ours_seconds": res.seconds,
           "ours_converged": res.converged}  # fmt: skip
    sc = _run_scnn(scnn_py, _SCNN_RELU, {"Z": Z, "Y": Y, "G": G, "lam": lam}, timeout=600)
    if "U" in sc:
        G2 = np.asarray(sc["G"])
        prob = GatedProblem.from_arrays(Z, Y, Z @ G2 >= 0, group="gate_output", dtype="float64")
        row["pyscnn_gates_kept"] = G2.shape[1]
        U = torch.tensor(sc["U"], dtype=torch.float64).permute(1, 2, 0)  # (c, P, d) -> (P, d, c)
        W = torch.tensor(sc["W"], dtype=torch.float64).permute(1, 2, 0)
        Zt = prob.Z
        K = (2 * prob.masks.double() - 1).T[:, :, None] * Zt[None]
        viol = float(torch.cat([torch.einsum("pnd,pdc->pnc", K, U), torch.einsum("pnd,pdc->pnc", K, W)]).neg()
                     .clamp_min(0).max()) / float(prob.Y.abs().max())  # fmt: skip
        row.update(pyscnn_objective=relu_objective(prob, U, W, lam), pyscnn_violation=viol,
                   pyscnn_seconds=sc["seconds"])  # fmt: skip
        row["objective_ratio"] = row["ours_objective"] / row["pyscnn_objective"]
        row["seconds_ratio_pyscnn_over_ours"] = row["pyscnn_seconds"] / row["ours_seconds"]
    else:
        row["pyscnn_error"] = sc.get("error")
    return row


PARTS = ("synthetic", "wide", "patches", "relu", "path")


def _summary(rows: list[dict], relu_row: dict, path_info: dict) -> dict:
    ok = [r for r in rows if "error" not in r]
    eligible = [r for r in ok if r["active_before"] > r["n"] or r["dependent_before"]]
    return {
        "neuron_reduction_min": min((r["reduction"] for r in eligible), default=None),
        "neuron_reduction_problems": [f"{r['problem']} [{r['group']}]" for r in eligible],
        "max_rel_objective_change": max((abs(r["rel_objective_change"]) for r in ok), default=None),
        "all_vertices_independent": all(r["independent_after"] for r in ok),
        "all_solves_converged": all(r["converged"] for r in ok),
        "relu_objective_ratio_ours_over_pyscnn": relu_row.get("objective_ratio"),
        "relu_seconds_ratio_pyscnn_over_ours": relu_row.get("seconds_ratio_pyscnn_over_ours"),
        "path_png": path_info.get("png"),
        "path_change_points": len(path_info.get("change_points", [])) if path_info else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scnn-python", default="/tmp/scnn6-venv/bin/python",
                        help="python of a venv with pyscnn==0.0.10 and convexedge installed")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)} (to split a long run)"
    )
    parser.add_argument(
        "--merge", action="store_true", help="keep the other parts' rows from the JSON (same --quick)"
    )
    parser.add_argument(
        "--scnn-timeout", type=float, default=None, help="seconds per pyscnn run (30 quick, 1800 full)"
    )
    parser.add_argument(
        "--max-seconds", type=float, default=None, help="solve cap per row (10 quick, 600 full)"
    )
    parser.add_argument(
        "--groups",
        default="gate,gate_output",
        help="group forms to run (gate_output on patches needs >24 GB)",
    )
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    bad = sorted(set(parts) - set(PARTS))
    if bad:
        parser.error(f"unknown parts {bad}; choose from {list(PARTS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    q = args.quick
    tol = 1e-9 if q else 1e-10
    cap = args.max_seconds if args.max_seconds is not None else (10.0 if q else 600.0)
    scnn_timeout = args.scnn_timeout if args.scnn_timeout is not None else (30 if q else 1800)
    old: dict = {}
    out_path = RESULTS / "optimal_sets.json"
    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("settings", {}).get("quick") != q:
            parser.error("--merge needs an existing JSON from a run with the same --quick")
    problems = []
    if "synthetic" in parts or "path" in parts:
        if q:
            problems.append(("synthetic", "synthetic (n=400, d=20, c=4, P=32)", *synthetic(400, 20, 4, 32)))
        else:
            problems.append(("synthetic", "synthetic", *synthetic(4000, 256, 16, 64)))
    if "wide" in parts:
        # Many random gates on low-dimensional data (2 features + bias): gates repeat activation
        # patterns, FISTA moves gates with equal masks identically, and the optimum it returns is
        # not a vertex. The regime where optima are not unique.
        Zw, Yw, _ = synthetic(20, 2, 1, 1, hidden=16)
        Zw = np.hstack([Zw, np.ones((20, 1))])
        Gw = np.random.default_rng(0).standard_normal((3, 256))
        problems.append(("wide", "wide (n=20, d=2+1, c=1, P=256)", Zw, Yw, Gw))
    images = 4 if q else 500
    P_patch = 4 if q else 32
    patch_error = None
    if "patches" in parts:
        t0 = time.perf_counter()
        try:
            Zp, Yp, Gp = patches(images, P_patch)
            problems.append(("patches", f"patches ({images} images, P={P_patch})", Zp, Yp, Gp))
        except Exception as exc:  # noqa: BLE001
            patch_error = f"{type(exc).__name__}: {exc}"
        print(f"data ready ({time.perf_counter() - t0:.0f} s)", flush=True)
    lam_ratio = 0.01
    rows = []
    for part, name, Z, Y, G in problems:
        if part not in parts:
            continue
        for group in groups:
            t1 = time.perf_counter()
            wide = part == "wide"
            ratio = 1e-3 if wide else lam_ratio
            try:
                cap_p = 3 * cap if wide else cap
                # one prune repeat on patches: each takes minutes (rank of a 32,000 x ~9,000 matrix)
                row = run_problem(name, Z, Y, G, group, ratio, tol, cap_p, args.scnn_python,
                                  repeats=1 if part == "patches" and not q else 3,
                                  scnn_timeout=scnn_timeout)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - a crashing row is reported with its error
                row = {"problem": name, "group": group, "error": f"{type(exc).__name__}: {exc}"}
            row["part"] = part
            row["row_seconds"] = time.perf_counter() - t1
            rows.append(row)
            print(f"  {name} [{group}]: {row['row_seconds']:.0f} s", flush=True)
    if patch_error:
        rows.append({"problem": "patches", "part": "patches", "group": "-", "error": patch_error})
    relu_row = {}
    if "relu" in parts:  # exact ReLU form on a tiny problem
        Zr, Yr, Gr = synthetic(20, 3, 1, 16, hidden=8, seed=1)
        try:
            relu_row = run_relu(Zr, Yr, Gr, 0.05, args.scnn_python)
        except Exception as exc:  # noqa: BLE001
            relu_row = {"problem": "relu-tiny", "error": f"{type(exc).__name__}: {exc}"}
    path_info = {}
    if "path" in parts:  # path PNG on the synthetic problem
        _, name, Z, Y, G = problems[0]
        pprob = GatedProblem.from_arrays(Z, Y, Z @ G >= 0, dtype="float64")
        t1 = time.perf_counter()
        path = regularization_path(pprob, n_lams=8 if q else 20, lam_min_ratio=1e-3,
                                   config=FistaConfig(tol=1e-8, max_iter=10**5, max_seconds=cap),
                                   prune=True)  # fmt: skip
        png = plot_path(path, RESULTS / "optimal_sets_path.png")
        path_info = {
            "problem": name,
            "lams": path.lams.tolist(),
            "active": [len(a) for a in path.active],
            "pruned_active": path.pruned_active.tolist(),
            "losses": path.losses.tolist(),
            "change_points": path.change_points,
            "png": str(png),
            "seconds": time.perf_counter() - t1,
        }  # fmt: skip
    if args.merge and out_path.exists():  # re-read now: another part may have finished meanwhile
        old = json.loads(out_path.read_text())
    rows = [
        r for r in old.get("rows", []) if r.get("part") not in parts or r.get("group") not in groups
    ] + rows
    relu_row = relu_row if "relu" in parts else old.get("relu", {})
    path_info = path_info if "path" in parts else old.get("path", {})
    summary = _summary(rows, relu_row, path_info)
    print(
        table(
            [r for r in rows if "error" not in r],
            [
                ("problem", "problem", "s"),
                ("group", "group", "s"),
                ("kkt", "KKT", ".1e"),
                ("active_before", "neurons", "d"),
                ("active_after", "pruned", "d"),
                ("pyscnn_active", "pyscnn", "d"),
                ("rank", "rank", "d"),
                ("rel_objective_change", "dF/F prune", ".1e"),
                ("magnitude_rel_objective_change", "dF/F mag", ".1e"),
                ("magnitude_refit_rel_objective_change", "dF/F mag+refit", ".1e"),
                ("r2_pruned", "R2", ".4f"),
                ("magnitude_r2", "R2 mag", ".4f"),
                ("prune_seconds", "prune s", ".3f"),
                ("solve_seconds", "solve s", ".1f"),
            ],
        )  # fmt: skip
    )
    for r in rows:
        if "error" in r:
            print(f"  ERROR {r['problem']} [{r.get('group')}]: {r['error']}")
    print("relu-tiny:", {k: v for k, v in relu_row.items() if not isinstance(v, dict)})
    print("summary:", json.dumps(summary, indent=1))
    runs = [r for r in old.get("runs", []) if set(r.get("parts", [])) - set(parts)]
    runs.append(
        {"parts": parts, "max_seconds": cap, "scnn_timeout": scnn_timeout, "environment": environment()}
    )
    payload = {
        "benchmark": "optimal_sets",
        "environment": environment(),
        "runs": runs,
        "settings": {
            "quick": q,
            "tol": tol,
            "max_seconds": cap,
            "lam_ratio": lam_ratio,
            "dtype": "float64",
            "operator": "auto (Gram A^T A when n > P d; forced for patches)",
            "seeds": {"data": 0, "gates": 0},
            "prune_repeats": 3,
            "scnn_python": args.scnn_python,
            "scnn_timeout": scnn_timeout,
        },  # fmt: skip
        "rows": rows,
        "relu": relu_row,
        "path": path_info,
        "summary": summary,
    }
    out = write_json("optimal_sets", payload)
    print(f"wrote {out}")
    return payload


if __name__ == "__main__":
    sys.exit(main() and 0)
