"""Data-parallel scaling of the convex solve (issue 11): the ``patches`` problem grown by images.

The ``patches`` problem of ../shared/BENCHMARKS.md section 1 (3x3 input patches of the bundled
ResNet-20's last stage -> its output channels, 64 rows per image, d = 289, c = 64), captured once
for the largest size; each size takes the first ``N`` images. For every size and world size
(1 and 2 gloo ranks on the CPU, one thread per rank; ``--device cuda``: 1 rank) each rank opens the
memory-mapped capture, builds the rows of its block of images (``shard_range``) into a
``GatedProblem(..., comm=...)`` and runs FISTA (direct operator, float64, tol 0) for a fixed number
of iterations, so every run takes the same steps and the objectives can be compared: with exact
arithmetic the 1-rank and 2-rank runs are the same sequence of iterates.

Reported per run: seconds per iteration (wall, from the solver's own history, init excluded) and
process CPU seconds per iteration per rank (all threads; on a shared machine the wall ratio is
only meaningful when the cores are idle), total seconds (init included), the objective after the
last iteration, then the Gram route: the data-parallel Gram build (each rank its rows, then
all-reduced) and seconds per gram-mode iteration (replicated, no communication), peak resident
memory per rank, and bytes per image of every array a rank holds, to size a 1M-image run.

Run: ``python -m benchmarks.scale [--quick] [--images 500,2000] [--iters 10] [--data DIR]``;
writes ``benchmarks/results/scale.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import environment, table, write_json
from convexedge.host.distributed import Comm, launch, shard_range


def _worker(comm: Comm, cap_dir: str, images: int, P: int, iters: int, device: str, out: str) -> None:
    """One rank: build its rows of the first ``images`` images, run ``iters`` FISTA iterations."""
    from convexedge.host.capture import ActivationShards
    from convexedge.host.distill import infer_geometry, make_gates
    from convexedge.host.gates import gate_masks
    from convexedge.host.solvers import FistaConfig, GatedProblem, solve
    from convexedge.host.students import image_to_rows, patch_matrix

    torch.set_num_threads(1)
    block = shard_range(images, comm.rank, comm.world_size)
    sh = ActivationShards.open(cap_dir)
    zin = np.concatenate(sh.arrays("inputs"))[block.start : block.stop]  # memory maps: reads the block
    zout = np.concatenate(sh.arrays("outputs"))[block.start : block.stop]
    geom = infer_geometry(sh.input_shape, sh.output_shape, 3)
    _, G = make_gates(geom.d, P, 0)
    t0 = time.perf_counter()
    Z = patch_matrix(torch.as_tensor(zin, dtype=torch.float64), geom)
    Y = image_to_rows(torch.as_tensor(zout, dtype=torch.float64))
    M = gate_masks(Z, torch.as_tensor(G, dtype=torch.float64))
    del zin, zout
    prob = GatedProblem(Z=Z.to(device), Y=Y.to(device), masks=M.to(device), comm=comm)
    build_s = time.perf_counter() - t0
    lam = 0.01 * prob.lam_max()
    cpu: list[float] = []  # process CPU seconds (all threads, gloo's included) at each iteration

    def tick(_it: int, _f: float, _k: float) -> None:
        cpu.append(time.process_time())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tol=0: it stops at max_iter by design
        res = solve(prob, lam, FistaConfig(tol=0.0, max_iter=iters, operator="direct"), progress=tick)
        t0 = time.perf_counter()
        prob.gram()  # data parallel: each rank its rows, one all-reduce per gate block row
        gram_build = time.perf_counter() - t0
        rg = solve(prob, lam, FistaConfig(tol=0.0, max_iter=iters, operator="gram"))
    secs = res.history["seconds"]
    report = {
        "rank": comm.rank,
        "n": prob.n,
        "n_local": prob.n_local,
        "objective": res.objective,
        "objectives": res.history["objective"],
        "iterations": res.iterations,
        "seconds_total": res.seconds,
        "seconds_per_iteration": (secs[-1] - secs[0]) / max(1, res.iterations),
        "cpu_seconds_per_iteration": (cpu[-1] - cpu[0]) / max(1, res.iterations),
        "seconds_build": build_s,
        "gram_build_seconds": gram_build,
        "gram_seconds_per_iteration": (rg.history["seconds"][-1] - rg.history["seconds"][0])
        / max(1, rg.iterations),
        "gram_objective": rg.objective,
        "peak_rss_mb": _peak_rss_mb(),
        "active_gates": int(res.V.flatten(1).ne(0).any(1).sum()),
    }
    Path(out, f"rank{comm.rank}.json").write_text(json.dumps(report))


def _peak_rss_mb() -> float:
    """High-water resident memory of this process (VmHWM; ru_maxrss survives exec into spawned ranks)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _capture(images: int, data: str | None, tmp: str) -> dict:
    from convexedge.host.capture import capture_block
    from convexedge.host.data import load_images, normalize_images
    from convexedge.models import BUNDLED_DATA_DIR, load_teacher, teacher_normalization

    teacher = load_teacher()
    mean, std = teacher_normalization()
    train = load_images(data or BUNDLED_DATA_DIR, "train", labels=False, limit=images)
    if len(train) < images:
        raise SystemExit(f"{data or BUNDLED_DATA_DIR} holds {len(train)} training images, asked for {images}")
    t0 = time.perf_counter()
    transform = partial(normalize_images, mean=mean, std=std)
    sh = capture_block(teacher, "layer3", train.x, tmp, transform=transform, progress=False)
    return {"seconds": time.perf_counter() - t0, "images": images, "shards": sh}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="100 and 400 images, 5 iterations")
    ap.add_argument("--images", default=None, help="comma-separated image counts (default 500,2000)")
    ap.add_argument("--gates", type=int, default=8, help="P (BENCHMARKS.md uses 32; 8 fits 2 cores)")
    ap.add_argument("--iters", type=int, default=None, help="FISTA iterations per run (default 10, quick 5)")
    ap.add_argument("--ranks", default="1,2", help="world sizes to run on the CPU (gloo)")
    ap.add_argument("--device", default="cpu", help="cpu (gloo ranks) or cuda (1 rank)")
    ap.add_argument("--data", default=None, help="train_*.npz folder (the bundled slice holds 2,000 images)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sizes = [int(x) for x in (args.images or ("100,400" if args.quick else "500,2000")).split(",")]
    iters = args.iters or (5 if args.quick else 10)
    worlds = [1] if args.device != "cpu" else [int(x) for x in args.ranks.split(",")]
    meta = environment()
    meta.update(device=args.device, dtype="float64", operator="direct", gates=args.gates, iterations=iters,
                threads_per_rank=1, backend="gloo" if args.device == "cpu" else "none (1 rank)",
                lam="0.01 lam_max", quick=args.quick)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        cap = _capture(max(sizes), args.data, str(Path(tmp) / "cap"))
        sh = cap["shards"]
        meta["capture"] = {"images": cap["images"], "seconds": cap["seconds"], "dtype": sh.dtype}
        d, c, rows_per_image = 32 * 9 + 1, sh.output_shape[0], sh.output_shape[1] * sh.output_shape[2]
        item = 8  # float64
        per_image = {
            "activations_on_disk": int((np.prod(sh.input_shape) + np.prod(sh.output_shape)) * 4),
            "Z": rows_per_image * d * item,
            "Y": rows_per_image * c * item,
            "masks": rows_per_image * args.gates,
            "fista_state_rows": 2 * rows_per_image * c * item,  # A(x), A(y) (n_local, c) in direct mode
            "operator_temporaries": 3 * rows_per_image * c * item,  # A(z), residual, forward output
        }
        for n_img in sizes:
            for world in worlds:
                out = Path(tmp) / f"run{n_img}_{world}"
                out.mkdir()
                t0 = time.perf_counter()
                launch(
                    _worker, world, str(Path(tmp) / "cap"), n_img, args.gates, iters, args.device, str(out)
                )
                wall = time.perf_counter() - t0
                ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
                r0 = ranks[0]
                rows.append({
                    "images": n_img, "ranks": world, "n": r0["n"],
                    "n_per_rank": max(r["n_local"] for r in ranks),
                    "sec_per_it": max(r["seconds_per_iteration"] for r in ranks),
                    "cpu_sec_per_it_per_rank": max(r["cpu_seconds_per_iteration"] for r in ranks),
                    "gram_build_seconds": max(r["gram_build_seconds"] for r in ranks),
                    "gram_sec_per_it": max(r["gram_seconds_per_iteration"] for r in ranks),
                    "gram_objective": r0["gram_objective"],
                    "seconds_total": max(r["seconds_total"] for r in ranks), "wall_with_startup": wall,
                    "build_seconds": max(r["seconds_build"] for r in ranks),
                    "objective": r0["objective"], "objectives": r0["objectives"],
                    "ranks_agree": all(r["objective"] == r0["objective"] for r in ranks),
                    "peak_rss_mb_per_rank": max(r["peak_rss_mb"] for r in ranks),
                    "active_gates": r0["active_gates"],
                })  # fmt: skip
                print(f"images={n_img} ranks={world}: {rows[-1]['sec_per_it']:.3f} s/it", flush=True)
    by = {(r["images"], r["ranks"]): r for r in rows}
    diffs, ratios, cpu_ratios, gram_ratios = [], {}, {}, {}
    for n_img in sizes:
        one, two = by.get((n_img, 1)), by.get((n_img, 2))
        if one and two:
            diffs.append(
                max(abs(a - b) / abs(a) for a, b in zip(one["objectives"], two["objectives"], strict=True))
            )
            ratios[n_img] = two["sec_per_it"] / one["sec_per_it"]
            cpu_ratios[n_img] = two["cpu_sec_per_it_per_rank"] / one["cpu_sec_per_it_per_rank"]
            gram_ratios[n_img] = two["gram_build_seconds"] / one["gram_build_seconds"]
            diffs.append(abs(one["gram_objective"] - two["gram_objective"]) / abs(one["gram_objective"]))
            two["rel_objective_diff_vs_1"] = diffs[-1]
    largest = max(ratios) if ratios else None
    summary = {
        "rank2_matches_rank1": max(diffs) if diffs else None,
        "iteration_seconds_ratio_2_vs_1": ratios.get(largest) if largest else None,
        "iteration_seconds_ratio_2_vs_1_by_images": ratios,
        "cpu_seconds_per_rank_ratio_2_vs_1_by_images": cpu_ratios,
        "gram_build_seconds_ratio_2_vs_1_by_images": gram_ratios,
        "load_average_1min_at_end": os.getloadavg()[0],
        "ranks_bit_identical": all(r["ranks_agree"] for r in rows),
        "bytes_per_image": per_image,
        "rows_per_image": rows_per_image,
    }
    cols = [("images", "images", "d"), ("ranks", "ranks", "d"), ("n", "n", "d"),
            ("sec_per_it", "s/iter", ".3f"), ("cpu_sec_per_it_per_rank", "cpu s/iter/rank", ".3f"),
            ("seconds_total", "total s", ".2f"), ("gram_build_seconds", "gram build s", ".2f"),
            ("gram_sec_per_it", "gram s/iter", ".3f"),
            ("peak_rss_mb_per_rank", "peak MB/rank", ".0f"),
            ("objective", "objective", ".12g")]  # fmt: skip
    print(table(rows, cols))
    print(
        f"rank2_matches_rank1 (max rel objective diff over all iterations): {summary['rank2_matches_rank1']}"
    )
    print(f"iteration_seconds_ratio_2_vs_1: {summary['iteration_seconds_ratio_2_vs_1']}")
    for r in rows:
        r.pop("objectives")
    print("wrote", write_json("scale", {"meta": meta, "rows": rows, "summary": summary}))


if __name__ == "__main__":
    main()
