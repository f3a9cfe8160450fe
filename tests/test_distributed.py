"""Tests of data-parallel solves (convexedge.host.distributed + the GatedProblem reduction hook) and
of solver checkpoints: two gloo ranks in subprocesses (torchrun's environment variables) against
one process, resume == uninterrupted, shard ranges (property), and the errors."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convexedge.device.errors import ArtifactError, ConvergenceWarning
from convexedge.host.distributed import Comm, init_from_env, launch, shard_range
from convexedge.host.solvers import FistaConfig, GatedProblem, SolverCheckpoint, solve, solve_path

LAM_RATIOS = (0.3, 0.1, 0.03)
CFG = FistaConfig(tol=1e-10, max_iter=20_000)


def make_data(n=301, d=7, c=3, P=8, seed=0):
    rng = np.random.default_rng(seed)
    Z = np.hstack([rng.standard_normal((n, d - 1)), np.ones((n, 1))])
    W1 = rng.standard_normal((d, 5))
    Y = np.maximum(Z @ W1, 0) @ rng.standard_normal((5, c)) + 0.1 * rng.standard_normal((n, c))
    return Z, Y, Z @ rng.standard_normal((d, P)) >= 0


def single_results(Z, Y, M) -> dict:
    out = {}
    for op in ("direct", "gram"):
        prob = GatedProblem.from_arrays(Z, Y, M, dtype="float64")
        res = solve(prob, 0.05 * prob.lam_max(), FistaConfig(tol=1e-10, max_iter=20_000, operator=op))
        out[f"{op}_V"], out[f"{op}_obj"] = res.V.numpy(), res.objective
    prob = GatedProblem.from_arrays(Z, Y, M, dtype="float64")
    path = solve_path(prob, [r * prob.lam_max() for r in LAM_RATIOS], CFG)
    out["path_V"] = np.stack([r.V.numpy() for r in path])
    out["path_obj"] = np.array([r.objective for r in path])
    out["lam_max"] = prob.lam_max()
    return out


WORKER = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np, torch
    from convexedge.host.distributed import init_from_env, shard_range
    from convexedge.host.solvers import FistaConfig, GatedProblem, SolverCheckpoint, solve, solve_path
    torch.set_num_threads(1)
    data, out, ratios = sys.argv[1], sys.argv[2], [float(r) for r in sys.argv[3].split(",")]
    with np.load(data) as f:
        Z, Y, M = f["Z"], f["Y"], f["M"]
    comm = init_from_env("gloo")
    rows = shard_range(len(Z), comm.rank, comm.world_size)
    sl = slice(rows.start, rows.stop)

    def local():
        return GatedProblem.from_arrays(Z[sl], Y[sl], M[sl], dtype="float64", comm=comm)

    res = {}
    for op in ("direct", "gram"):
        prob = local()
        r = solve(prob, 0.05 * prob.lam_max(), FistaConfig(tol=1e-10, max_iter=20_000, operator=op))
        res[op + "_V"], res[op + "_obj"] = r.V.numpy(), r.objective
    prob = local()
    path = solve_path(prob, [x * prob.lam_max() for x in ratios], FistaConfig(tol=1e-10, max_iter=20_000))
    res["path_V"] = np.stack([p.V.numpy() for p in path])
    res["path_obj"] = np.array([p.objective for p in path])
    res["lam_max"], res["n"], res["n_local"] = prob.lam_max(), prob.n, prob.n_local
    # checkpoint / resume across the ranks: stop at 15 iterations, then resume to convergence
    lam = 0.05 * prob.lam_max()
    ck = SolverCheckpoint(folder=out + "/ck", every=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        solve(local(), lam, FistaConfig(tol=1e-10, max_iter=15, operator="direct"), checkpoint=ck)
    r = solve(local(), lam, FistaConfig(tol=1e-10, max_iter=20_000, operator="direct"), checkpoint=ck)
    res["resumed_V"], res["resumed_it"] = r.V.numpy(), r.iterations
    r = solve(local(), lam, FistaConfig(tol=1e-10, max_iter=20_000, operator="direct"))
    res["direct_it"] = r.iterations
    np.savez(f"{out}/rank{comm.rank}.npz", **res)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run WORKER on 2 gloo ranks (as torchrun would start them) and load both ranks' results."""
    tmp = tmp_path_factory.mktemp("dist")
    Z, Y, M = make_data()
    np.savez(tmp / "data.npz", Z=Z, Y=Y, M=M)
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, "-c", WORKER, str(tmp / "data.npz"), str(tmp), ",".join(map(str, LAM_RATIOS))]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    ranks = []
    for r in range(2):
        with np.load(tmp / f"rank{r}.npz") as f:
            ranks.append({k: f[k] for k in f.files})
    return (Z, Y, M), ranks


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


# ------------------------------------------------------------------------------ 2 ranks == 1 rank
def test_two_gloo_ranks_match_one_process(two_ranks):
    (Z, Y, M), ranks = two_ranks
    ref = single_results(Z, Y, M)
    assert [int(r["n"]) for r in ranks] == [len(Z)] * 2
    assert [int(r["n_local"]) for r in ranks] == [151, 150]
    for key in ("direct_V", "gram_V", "path_V", "path_obj", "direct_obj", "gram_obj", "lam_max"):
        # every rank holds the same solution, bit for bit (decisions made on reduced numbers)
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])
        assert _rel(ranks[0][key], ref[key]) <= 1e-8, key
    assert float(ranks[0]["lam_max"]) == pytest.approx(ref["lam_max"], rel=1e-12)


def test_two_ranks_resume_equals_uninterrupted(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        np.testing.assert_array_equal(r["resumed_V"], r["direct_V"])
        assert int(r["resumed_it"]) == int(r["direct_it"])


# ------------------------------------------------------------------------------ checkpoints
def _problem(**kw):
    Z, Y, M = make_data(**kw)
    return GatedProblem.from_arrays(Z, Y, M, dtype="float64")


class _Stop(Exception):
    pass


def _stop_at(it_stop: int, after_calls: int = 0):
    calls = {"n": 0}

    def progress(it, _f, _k):
        if it == 0:
            calls["n"] += 1
        if it >= it_stop and calls["n"] > after_calls:
            raise _Stop

    return progress


@pytest.mark.parametrize("operator", ["direct", "gram"])
def test_solve_resumes_exactly(tmp_path, operator):
    prob = _problem()
    lam = 0.05 * prob.lam_max()
    cfg = FistaConfig(tol=1e-10, max_iter=20_000, operator=operator)
    ref = solve(prob, lam, cfg)
    ck = SolverCheckpoint(folder=str(tmp_path), every=10)
    with pytest.raises(_Stop):  # a crash at iteration 25: the last checkpoint is iteration 20
        solve(_problem(), lam, cfg, progress=_stop_at(25), checkpoint=ck)
    assert ck.file(0, 1).exists()
    res = solve(_problem(), lam, cfg, checkpoint=ck)
    assert res.iterations == ref.iterations and res.restarts == ref.restarts
    assert torch.equal(res.V, ref.V) and res.objective == ref.objective
    for key in ("iteration", "objective", "kkt", "step"):
        assert res.history[key] == ref.history[key], key
    # a finished checkpoint resumes to the same result at once
    again = solve(_problem(), lam, cfg, checkpoint=ck)
    assert torch.equal(again.V, ref.V) and again.iterations == ref.iterations


def test_solve_resumes_after_max_iter(tmp_path):
    prob = _problem()
    lam = 0.05 * prob.lam_max()
    ref = solve(prob, lam, CFG)
    ck = SolverCheckpoint(folder=str(tmp_path), every=1000)
    with pytest.warns(ConvergenceWarning):
        solve(_problem(), lam, FistaConfig(tol=1e-10, max_iter=7), checkpoint=ck)
    res = solve(_problem(), lam, CFG, checkpoint=ck)
    assert torch.equal(res.V, ref.V) and res.iterations == ref.iterations


def test_solve_path_resumes_exactly(tmp_path):
    prob = _problem()
    lams = [r * prob.lam_max() for r in LAM_RATIOS]
    ref = solve_path(prob, lams, CFG)
    ck = SolverCheckpoint(folder=str(tmp_path), every=5)
    with pytest.raises(_Stop):  # crash inside the second point's solve
        solve_path(_problem(), lams, CFG, progress=_stop_at(12, after_calls=1), checkpoint=ck)
    assert ck.file(0, 1, "path_000").exists() and not ck.file(0, 1, "path_001").exists()
    res = solve_path(_problem(), lams, CFG, checkpoint=ck)
    for a, b in zip(res, ref, strict=True):
        assert torch.equal(a.V, b.V) and a.objective == b.objective
        assert a.iterations == b.iterations and a.history["screening"] == b.history["screening"]
        assert a.history["objective"] == b.history["objective"]


def test_checkpoint_of_another_solve_is_refused(tmp_path):
    prob = _problem()
    ck = SolverCheckpoint(folder=str(tmp_path), every=5)
    solve(prob, 0.1 * prob.lam_max(), CFG, checkpoint=ck)
    with pytest.raises(ArtifactError, match="belongs to another solve: lam"):
        solve(prob, 0.2 * prob.lam_max(), CFG, checkpoint=ck)
    with pytest.raises(ArtifactError, match="belongs to another solve: shape"):
        solve(_problem(P=5), 0.1 * prob.lam_max(), CFG, checkpoint=ck)
    ck.file(0, 1).write_bytes(b"not an npz")
    with pytest.raises(ArtifactError, match="unreadable solver checkpoint"):
        solve(prob, 0.1 * prob.lam_max(), CFG, checkpoint=ck)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"folder": ""}, "folder must be"),
        ({"folder": "x", "every": 0}, "every must be"),
        ({"folder": "x", "name": "a/b"}, "plain file stem"),
    ],
)
def test_checkpoint_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SolverCheckpoint(**kwargs)


def test_checkpoint_needs_fista(tmp_path):
    prob = _problem()
    ck = SolverCheckpoint(folder=str(tmp_path))
    with pytest.raises(ValueError, match="method='fista'"):
        solve(prob, 0.1 * prob.lam_max(), method="adam", checkpoint=ck)
    with pytest.raises(ValueError, match="method='fista'"):
        solve_path(prob, [0.1 * prob.lam_max()], method="adam", checkpoint=ck)


# ------------------------------------------------------------------------------ ranks and sharding
@given(n=st.integers(1, 500), world=st.integers(1, 16))
def test_shard_range_partitions_in_order(n, world):
    if n < world:
        with pytest.raises(ValueError, match="cannot be split"):
            shard_range(n, 0, world)
        return
    blocks = [shard_range(n, r, world) for r in range(world)]
    assert [i for b in blocks for i in b] == list(range(n))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1


def test_shard_range_errors():
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_range(10, 2, 2)
    with pytest.raises(ValueError, match="0 <= rank < world_size"):
        shard_range(10, 0, 0)


def test_single_comm_is_identity_and_default(monkeypatch):
    for key in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    comm = init_from_env()
    assert comm == Comm.single() and (comm.rank, comm.world_size) == (0, 1)
    t = torch.arange(3.0)
    assert torch.equal(comm.sum_(t.clone()), t) and torch.equal(comm.max_(t.clone()), t)
    # a problem with the world-size-1 hook is the plain problem
    Z, Y, M = make_data()
    a = GatedProblem.from_arrays(Z, Y, M, dtype="float64")
    b = GatedProblem.from_arrays(Z, Y, M, dtype="float64", comm=comm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ra = solve(a, 0.1 * a.lam_max(), FistaConfig(max_iter=50))
        rb = solve(b, 0.1 * b.lam_max(), FistaConfig(max_iter=50))
    assert torch.equal(ra.V, rb.V) and (b.rank, b.world_size, b.n_local) == (0, 1, a.n)


def test_init_from_env_errors(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="start the ranks with torchrun"):
        init_from_env()
    with pytest.raises(ValueError, match="nproc must be"):
        launch(print, 0)


def test_the_group_init_from_env_opens_is_destroyed_at_exit(monkeypatch):
    """A rank that exits with its gloo group alive can abort in interpreter teardown (SIGABRT,
    seen in CI); init_from_env registers an exit hook that destroys the group it opened."""
    import torch.distributed as dist

    from convexedge.host import distributed

    hooks = []
    monkeypatch.setattr(distributed.atexit, "register", hooks.append)
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert not dist.is_initialized()
    try:
        comm = init_from_env("gloo")
        assert (comm.rank, comm.world_size) == (0, 1) and dist.is_initialized()
        assert hooks == [distributed._destroy_group]
        hooks[0]()
        assert not dist.is_initialized()
        hooks[0]()  # a second call (the user already destroyed it) is a no-op
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
