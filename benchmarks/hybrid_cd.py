"""Hybrid coordinate descent (Hsiao & Dutta 2024) vs gradient descent, Adam and the convex solve.

Question: does hybrid CD (line search on coordinates with a small gradient, gradient step on the
others, all coordinates at once) reach a given training loss in fewer iterations than gradient
descent, as the paper claims, and at what wall-clock and memory cost?

Problems (float32, one thread by default):

* ``sphere`` -- the paper's setting: a two-layer ReLU network ``f(x) = sum_r a_r relu(w_r^T x)``
  with ``a_r = +-1/sqrt(m)`` fixed, only the first layer trained, squared error without weight
  decay, few samples on the unit sphere of a high dimension (``n`` = 24, ``d`` = 128, ``m`` = 256;
  ``--quick``: 16, 64, 128). Targets: a random two-layer ReLU teacher (32 units), standardised. The
  paper's own sizes were not in the text we could retrieve (only its abstract and summaries); these
  are the sizes 2 CPU cores allow for the sweep below.
* ``sphere_wd`` -- the same data, both layers trained from PyTorch's default init, weight decay
  ``lam`` = 1e-3.
* ``synthetic`` -- BENCHMARKS.md section 1 (``Z ~ N(0, I)``, d = 256, c = 16, targets from a
  64-unit ReLU teacher + 1% noise) with n = 1000 instead of 4000 (``--quick``: 500), a 64-unit
  student (PyTorch's default init), both layers, ``lam`` = 1e-3.

Contenders, on the same objective ``F = 1/(2n) ||f(X) - Y||^2 + lam/2 (||W1||^2 + ||W2||^2)``, all
from the same initialisation, a fixed iteration budget each:

* ``gd``: full-batch gradient descent, step tuned over a sweep (best final ``F`` kept);
* ``hybrid_cd``: the paper's rule at GD's best step, threshold ``dw`` tuned over a sweep;
* ``hybrid_cd_bt``: the same with backtracking on the Jacobi update (our departure 6);
* ``adam``: full-batch Adam, lr tuned over a sweep;
* ``convex``: (``lam > 0`` only) the convex gated-ReLU program
  ``1/(2n) ||sum_i D_i X V_i - Y||^2 + lam sum_i ||V_i||_F`` solved by our FISTA (float64) with the
  ``D_i`` = the activation patterns of every trained network's hidden units. Each neuron
  ``relu(X w) v^T`` is a feasible ``V_i = w v^T`` with ``lam ||w v^T||_F <= lam/2 (||w||^2 + ||v||^2)``
  (Pilanci & Ergen 2020), so this optimum is a *lower bound* on ``F`` of every trained network
  and the global optimum of the gated-ReLU network with those gates; it is not a bound on the
  global optimum of the ReLU network, which may use other patterns. With ``lam = 0`` (``sphere``) and
  ``n <= d`` the network can interpolate and the global optimum is 0.

Measured per row: final ``F``, iterations, seconds (median of ``--repeats`` runs of the selected
configuration, contenders interleaved; a configuration slower than ``--max-repeat-seconds`` is
timed once), iterations and seconds to a common level (the worse of
the best GD's and the best hybrid CD's final ``F``: a level both reach), and peak memory: the
growth of the resident set of a fresh process over its value before training, sampled every
0.5 ms during 5 iterations (on CUDA ``torch.cuda.max_memory_allocated``), a coarse measure:
allocator caching and page granularity make small working sets read as 0.

Run: ``OMP_NUM_THREADS=1 python -m benchmarks.hybrid_cd [--quick] [--device cpu|cuda]``; writes
``benchmarks/results/hybrid_cd.json`` and ``benchmarks/results/hybrid_cd.png``.
"""

from __future__ import annotations

import os
import sys

if "numpy" not in sys.modules:  # one BLAS thread, as the protocol asks (before numpy loads)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import multiprocessing as mp  # noqa: E402
import statistics  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks._common import RESULTS, environment, table, write_json  # noqa: E402
from convexedge.device.errors import ConvergenceWarning  # noqa: E402
from convexedge.host.solvers import FistaConfig, GatedProblem, solve  # noqa: E402
from convexedge.host.solvers.hybrid_cd import (  # noqa: E402
    AdamTrainConfig,
    GDConfig,
    HybridCDConfig,
    train_adam,
    train_gd,
    train_hybrid_cd,
)

_TRAIN = {"gd": (train_gd, GDConfig), "adam": (train_adam, AdamTrainConfig)}
_TRAIN |= {"hybrid_cd": (train_hybrid_cd, HybridCDConfig), "hybrid_cd_bt": (train_hybrid_cd, HybridCDConfig)}


# --------------------------------------------------------------------------------- problems
def make_problem(name: str, quick: bool, device: str):
    """Data, initial network and sweep settings of one problem (deterministic)."""
    g = torch.Generator().manual_seed(0)
    if name in ("sphere", "sphere_wd"):
        n, d, m = (16, 64, 128) if quick else (24, 128, 256)
        X = torch.randn(n, d, generator=g)
        X /= X.norm(dim=1, keepdim=True)
        Wt = torch.randn(d, 32, generator=g) / d**0.5
        Y = torch.relu(X @ Wt) @ torch.randn(32, 1, generator=g)
        Y = (Y - Y.mean()) / Y.std()
        net = torch.nn.Sequential(
            torch.nn.Linear(d, m, bias=False), torch.nn.ReLU(), torch.nn.Linear(m, 1, bias=False)
        )
        paper = name == "sphere"
        W1 = torch.randn(m, d, generator=g)  # w_r ~ N(0, I), as in Du et al. (2019)
        a = (torch.randint(0, 2, (1, m), generator=g) * 2 - 1).float() / m**0.5
        if paper:
            with torch.no_grad():
                net[0].weight.copy_(W1)
                net[2].weight.copy_(a)
        else:  # both layers trained with weight decay: PyTorch's default init (seeded)
            torch.manual_seed(0)
            net = torch.nn.Sequential(
                torch.nn.Linear(d, m, bias=False), torch.nn.ReLU(), torch.nn.Linear(m, 1, bias=False)
            )
        spec = {
            "n": n, "d": d, "m": m, "c": 1, "lam": 0.0 if paper else 1e-3, "train_output_layer": not paper,
            "iters": 60 if quick else 100, "gd_steps": [1.0, 4.0, 16.0] if paper else [0.3, 1.0, 4.0, 16.0],
            "thresholds": [1e-4, 1e-3, 1e-2], "adam_lrs": [1e-3, 1e-2, 1e-1],
        }  # fmt: skip
    elif name == "synthetic":
        # BENCHMARKS.md says n = 4000; one hybrid CD iteration at n = 4000 takes ~10 s on the
        # shared 2-core machine, so the full run uses n = 1000 and the quick one n = 500.
        n, d, c, m = (500 if quick else 1000), 256, 16, 64
        rng = np.random.default_rng(0)  # the BENCHMARKS.md generator (as benchmarks.optimal_sets)
        Zn = rng.standard_normal((n, d))
        W1 = rng.standard_normal((d, 64)) / np.sqrt(d)
        W2 = rng.standard_normal((64, c)) / np.sqrt(64)
        Yn = np.maximum(Zn @ W1, 0) @ W2
        Yn += 0.01 * Yn.std() * rng.standard_normal(Yn.shape)
        X, Y = torch.tensor(Zn, dtype=torch.float32), torch.tensor(Yn, dtype=torch.float32)
        torch.manual_seed(0)
        net = torch.nn.Sequential(
            torch.nn.Linear(d, m, bias=False), torch.nn.ReLU(), torch.nn.Linear(m, c, bias=False)
        )
        spec = {
            "n": n, "d": d, "m": m, "c": c, "lam": 1e-3, "train_output_layer": True,
            "iters": 20 if quick else 30, "gd_steps": [0.1, 0.3, 0.6],
            "thresholds": [1e-4, 1e-3] if quick else [1e-3], "adam_lrs": [1e-3, 1e-2, 3e-2],
        }  # fmt: skip
    else:
        raise ValueError(f"unknown problem {name!r}")
    return X.to(device), Y.to(device), net.to(device), spec


def _config(method: str, spec: dict, knob: float, step: float | None = None):
    common = {"lam": spec["lam"], "train_output_layer": spec["train_output_layer"], "max_iter": spec["iters"]}
    common["tol"] = 0.0
    if method == "gd":
        return GDConfig(step=knob, **common)
    if method == "adam":
        return AdamTrainConfig(lr=knob, **common)
    return HybridCDConfig(step=step, threshold=knob, backtrack=method == "hybrid_cd_bt", **common)


def _run(method: str, X, Y, net, cfg):
    fn = _TRAIN[method][0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if X.is_cuda:
            torch.cuda.synchronize()
        return fn(net, X, Y, cfg)


def _score(res) -> float:
    f = res.objective
    return f if np.isfinite(f) else float("inf")


# --------------------------------------------------------------------------------- memory
def _memory_child(problem: str, quick: bool, device: str, method: str, cfg_dict: dict, q) -> None:
    torch.set_num_threads(1)
    X, Y, net, _ = make_problem(problem, quick, device)
    cfg = _TRAIN[method][1](**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg_dict.items()})
    cfg = dataclasses.replace(cfg, max_iter=min(cfg.max_iter, 5))
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        _run(method, X, Y, net, cfg)
        q.put((torch.cuda.max_memory_allocated() - base) / 2**20)
        return
    # The process's max RSS is set by the imports, so sample the current RSS instead (every 0.5 ms,
    # torch releases the GIL inside its kernels) and report the peak growth over the start.
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    peak, stop = [0], threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(5e-4)

    base = rss()
    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    _run(method, X, Y, net, cfg)
    stop.set()
    th.join()
    q.put(max(peak[0], rss()) / 2**20 - base / 2**20)


def peak_memory_mb(problem: str, quick: bool, device: str, method: str, cfg) -> float | None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_memory_child, args=(problem, quick, device, method, dataclasses.asdict(cfg), q))
    p.start()
    p.join(600)
    return q.get() if p.exitcode == 0 and not q.empty() else None


# --------------------------------------------------------------------------------- convex
def convex_lower_bound(X, Y, nets, lam: float, args_max_seconds: float = 90.0) -> dict:
    """Gated-ReLU convex optimum over the activation patterns of ``nets`` (see module docstring)."""
    Xd = X.detach().to("cpu", torch.float64)
    masks = torch.cat([(Xd @ nt[0].weight.detach().to("cpu", torch.float64).T) > 0 for nt in nets], 1)
    masks = torch.unique(masks, dim=1)
    masks = masks[:, masks.any(0)]
    prob = GatedProblem.from_arrays(Xd, Y.detach().to("cpu", torch.float64), masks, dtype="float64")
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        res = solve(prob, lam, FistaConfig(tol=1e-7, max_iter=20000, max_seconds=args_max_seconds))
    active = int((res.V.reshape(res.V.shape[0], -1).norm(dim=1) > 0).sum())
    # Certified lower bound on the convex optimum by duality: with theta = s (Y - A V) / n scaled so
    # that max_g ||A_g^T theta|| <= lam, D(theta) = <theta, Y> - n/2 ||theta||^2 <= F*.
    n = prob.n
    resid = (prob.Y - prob.forward(res.V)) / n
    gmax = float(prob.adjoint(resid).reshape(prob.P, -1).norm(dim=1).max())
    theta = resid * min(1.0, lam / max(gmax, 1e-300))
    dual = float((theta * prob.Y).sum() - 0.5 * n * theta.square().sum())
    return {
        "dual_bound": dual,
        "objective": res.objective, "iterations": res.iterations, "seconds": time.perf_counter() - start,
        "kkt_residual": res.kkt_residual, "converged": res.converged, "patterns": int(masks.shape[1]),
        "active_gates": active, "history": res.history,
    }  # fmt: skip


# --------------------------------------------------------------------------------- main
def _first_reach(hist: dict, level: float) -> tuple[int | None, float | None]:
    for k, f in enumerate(hist["objective"]):
        if f <= level:
            return k, hist["seconds"][k]
    return None, None


def run_problem(name: str, args) -> tuple[list[dict], dict]:
    X, Y, net, spec = make_problem(name, args.quick, args.device)
    print(f"\n== {name}: n={spec['n']} d={spec['d']} m={spec['m']} c={spec['c']} lam={spec['lam']} "
          f"iters={spec['iters']}", flush=True)  # fmt: skip
    sweeps: dict[str, list[dict]] = {}
    best: dict[str, tuple] = {}

    def sweep(method: str, knobs, step=None):
        rows = []
        for k in knobs:
            cfg = _config(method, spec, k, step)
            res = _run(method, X, Y, net, cfg)
            rows.append({"knob": k, "objective": res.objective, "status": res.status, "seconds": res.seconds,
                         "iterations": res.iterations})  # fmt: skip
            print(
                f"  {method:13s} knob={k:<8g} F={res.objective:.6g} {res.status} {res.seconds:.2f}s",
                flush=True,
            )
            if method not in best or _score(res) < _score(best[method][1]):
                best[method] = (cfg, res)
        sweeps[method] = rows

    sweep("gd", spec["gd_steps"])
    step = best["gd"][0].step
    sweep("hybrid_cd", spec["thresholds"], step)
    h = best["hybrid_cd"][1].history["objective"]
    if any(b > a for a, b in zip(h, h[1:], strict=False)):  # backtracking changes nothing otherwise
        sweep("hybrid_cd_bt", [best["hybrid_cd"][0].threshold], step)
    sweep("adam", spec["adam_lrs"])

    # Timing: repeats of the selected configurations, interleaved.
    # A configuration whose sweep run took longer than --max-repeat-seconds is timed once (that
    # sweep run; the JSON lists the raw repeats).
    times: dict[str, list[float]] = {m: [r.seconds] for m, (_, r) in best.items()}
    for _ in range(args.repeats - 1):
        for m, (cfg, r) in best.items():
            if r.seconds <= args.max_repeat_seconds:
                times[m].append(_run(m, X, Y, net, cfg).seconds)
    level = max(best["gd"][1].objective, best["hybrid_cd"][1].objective)
    rows, curves = [], {}
    for m, (cfg, res) in best.items():
        k, s = _first_reach(res.history, level)
        mem = peak_memory_mb(name, args.quick, args.device, m, cfg) if not args.no_memory else None
        knob = {"gd": "step", "adam": "lr"}.get(m, "threshold")
        rows.append({
            "method": m, "problem": name, "final_loss": res.objective, "final_mse": res.mse,
            "seconds": statistics.median(times[m]), "seconds_repeats": times[m], "iterations": res.iterations,
            "peak_mem_mb": mem, "common_level": level, "iters_to_common": k, "seconds_to_common": s,
            "status": res.status, "config": dataclasses.asdict(cfg), "tuned": f"{knob}={getattr(cfg, knob)}",
            "seconds_per_iter": statistics.median(times[m]) / max(res.iterations, 1),
            "ls_fraction_last": res.history.get("ls_fraction", [None])[-1],
        })  # fmt: skip
        curves[m] = {"objective": res.history["objective"], "seconds": res.history["seconds"]}
    if spec["lam"] > 0:
        cb = convex_lower_bound(X, Y, [r.model for _, r in best.values()], spec["lam"])
        msg = f"{cb['iterations']} it, {cb['seconds']:.1f}s, KKT {cb['kkt_residual']:.1e}"
        msg += f", dual bound {cb['dual_bound']:.6g}"
        print(
            f"  convex lower bound F={cb['objective']:.6g} over {cb['patterns']} patterns, {msg}", flush=True
        )
        rows.append({
            "method": "convex", "problem": name, "final_loss": cb["objective"], "final_mse": None,
            "seconds": cb["seconds"], "seconds_repeats": [cb["seconds"]], "iterations": cb["iterations"],
            "peak_mem_mb": None, "common_level": level, "iters_to_common": None, "seconds_to_common": None,
            "status": "converged" if cb["converged"] else "max_iter/max_seconds",
            "config": {"tol": 1e-7, "dtype": "float64", "patterns": cb["patterns"]},
            "tuned": f"patterns={cb['patterns']}", "kkt_residual": cb["kkt_residual"],
            "active_gates": cb["active_gates"], "dual_bound": cb["dual_bound"],
            "seconds_per_iter": cb["seconds"] / max(cb["iterations"], 1),
            "ls_fraction_last": None,
        })  # fmt: skip
        curves["convex"] = {"level": cb["dual_bound"]}
    else:
        rows.append({
            "method": "convex", "problem": name, "final_loss": 0.0, "final_mse": 0.0, "seconds": None,
            "seconds_repeats": [], "iterations": None, "peak_mem_mb": None, "common_level": level,
            "iters_to_common": None, "seconds_to_common": None, "status": "not solved: lam = 0, n <= d",
            "config": {}, "tuned": "-", "seconds_per_iter": None, "ls_fraction_last": None,
        })  # fmt: skip
    return rows, {"spec": spec, "sweeps": sweeps, "curves": curves}


_COLORS = {"gd": "tab:blue", "hybrid_cd": "tab:orange", "hybrid_cd_bt": "tab:green", "adam": "tab:red"}


def plot(details: dict, path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    probs = list(details)
    fig = Figure(figsize=(11, 3.2 * len(probs)))
    FigureCanvasAgg(fig)
    for i, p in enumerate(probs):
        for j, xkey in enumerate(("iteration", "seconds")):
            ax = fig.add_subplot(len(probs), 2, 2 * i + j + 1)
            for m, cur in details[p]["curves"].items():
                if "level" in cur:
                    ax.axhline(cur["level"], color="k", ls="--", lw=1, label="convex (dual) lower bound")
                    continue
                y = np.maximum(np.asarray(cur["objective"]), 1e-12)
                x = np.arange(len(y)) if xkey == "iteration" else np.maximum(np.asarray(cur["seconds"]), 1e-4)
                ax.plot(x, y, label=m, lw=1.2, color=_COLORS.get(m))
            ax.set_yscale("log")
            if xkey == "seconds":
                ax.set_xscale("log")  # the contenders' wall-clock times differ by two orders
            ax.set_xlabel(xkey if xkey == "iteration" else "seconds (log)")
            ax.set_ylabel("training objective F")
            ax.set_title(f"{p}: F vs {xkey}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--problems", default="sphere,sphere_wd,synthetic")
    ap.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory runs")
    ap.add_argument("--max-repeat-seconds", type=float, default=20.0)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    args = ap.parse_args(argv)
    if args.replot:
        import json

        plot(json.loads((RESULTS / "hybrid_cd.json").read_text())["details"], RESULTS / "hybrid_cd.png")
        return
    torch.set_num_threads(args.threads)
    rows, details = [], {}
    for p in args.problems.split(","):
        r, det = run_problem(p, args)
        rows += r
        details[p] = det
    cols = [
        ("problem", "problem", "s"), ("method", "method", "s"), ("tuned", "tuned", "s"),
        ("final_loss", "final F", ".4g"), ("iterations", "iters", "d"), ("seconds", "s (median)", ".2f"),
        ("seconds_per_iter", "s/iter", ".4f"), ("iters_to_common", "iters to level", "d"),
        ("seconds_to_common", "s to level", ".2f"), ("peak_mem_mb", "peak MB", ".1f"),
        ("dual_bound", "convex LB", ".4g"),
        ("status", "status", "s"),
    ]  # fmt: skip
    print()
    print(table(rows, cols))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / "hybrid_cd.png"
    plot(details, png)
    env = environment()
    env.update({"dtype": "float32 (convex: float64)", "seeds": {"data_and_init": 0}, "device": args.device,
                "repeats": args.repeats, "quick": args.quick})  # fmt: skip
    path = write_json("hybrid_cd", {"environment": env, "rows": rows, "details": details})
    print(f"\nwrote {path} and {png}")


if __name__ == "__main__":
    main()
