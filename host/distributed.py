"""Data parallelism over ``torch.distributed``: ranks, local launch, sharded capture.

Nothing here is a cluster layer of our own: ranks are the processes of a ``torch.distributed``
process group (gloo on CPU, nccl on GPUs), started by ``torchrun`` (which sets ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) or, on one machine, by :func:`launch`.

* :class:`Comm` is a rank's handle on the group; it is the reduction hook of a data-parallel
  :class:`~convexedge.host.solvers.GatedProblem` (``comm=``), so the convex solvers run unchanged
  on every rank. :meth:`Comm.single` is world size 1 (no process group), the default everywhere.
  A group that :func:`init_from_env` opens is destroyed at interpreter exit (gloo can abort the
  process otherwise); :func:`launch` destroys its ranks' groups itself.
* :func:`shard_range` splits ``n`` sample indices into contiguous, disjoint, near-equal blocks
  (like ``DistributedSampler`` without shuffling and without the padding that would count samples
  twice): concatenating the ranks' blocks in rank order gives ``0..n-1``.
* :func:`capture_sharded` streams each rank's block of images through the teacher into its own
  memory-mapped shards (``DIR/rankRRRRR/``) and, after a barrier, rank 0 writes ``DIR/manifest.json``
  listing the shards of every rank (when it can see them: a shared filesystem).

Example (two local gloo ranks)::

    def work(comm, out):
        ...  # build this rank's GatedProblem(..., comm=comm) and solve it
    launch(work, 2, "out/")
"""

from __future__ import annotations

import atexit
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["Comm", "capture_sharded", "init_from_env", "launch", "shard_range"]

log = logging.getLogger(__name__)

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Comm:
    """One rank's view of a process group: its rank, the world size, and all-reduces.

    Attributes:
        rank: this process's rank in ``0..world_size-1``.
        world_size: number of ranks.
        group: the ``torch.distributed`` process group (``None``: the default group; unused when
            ``world_size == 1`` and no group is initialised).
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @classmethod
    def single(cls) -> Comm:
        """World size 1: every reduction is the identity, no process group is needed."""
        return cls(0, 1, None)

    @classmethod
    def from_process_group(cls, group: Any = None) -> Comm:
        """The handle of an initialised ``torch.distributed`` group (default: the world)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "torch.distributed is not initialised; call init_from_env() (under torchrun) or "
                "launch(fn, nproc), or use Comm.single()"
            )
        return cls(dist.get_rank(group), dist.get_world_size(group), group)

    @property
    def _active(self) -> bool:
        return self.world_size > 1  # a group of one: every reduction is the identity

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Replace ``t`` by its elementwise sum over the ranks, in place; returns ``t``."""
        if self._active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def max_(self, t: torch.Tensor) -> torch.Tensor:
        """Replace ``t`` by its elementwise maximum over the ranks, in place; returns ``t``."""
        if self._active:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        if self._active:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of ``range(n)`` that ``rank`` of ``world_size`` holds.

    Blocks are disjoint, cover ``range(n)`` in rank order and differ in size by at most one (the
    first ``n % world_size`` ranks hold one more).

    Raises:
        ValueError: ``world_size < 1``, ``rank`` outside ``0..world_size-1`` or ``n < world_size``
            (a rank would hold no sample).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < world_size:
        raise ValueError(f"{n} samples cannot be split over {world_size} ranks; use at most {n} ranks")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


def init_from_env(backend: str = "auto", device: str = "cpu") -> Comm:
    """Join the process group ``torchrun`` describes in the environment, or world size 1.

    Reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` (``init_method="env://"``).
    Without ``RANK``/``WORLD_SIZE`` this is :meth:`Comm.single`.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``"auto"`` (nccl for a CUDA device, gloo otherwise).
        device: the device the rank computes on (picks the backend for ``"auto"``).
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Comm.single()
    import torch.distributed as dist

    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"RANK/WORLD_SIZE set but {missing} missing; start the ranks with torchrun")
    if backend == "auto":
        backend = "nccl" if str(device).startswith("cuda") else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or 'auto', got {backend!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://")
        # A process that exits with its gloo group alive can abort (SIGABRT, "terminate called
        # without an active exception") when interpreter teardown meets gloo's worker threads;
        # so the group we opened is destroyed at exit, while the interpreter is still whole.
        atexit.register(_destroy_group)
    return Comm.from_process_group()


def _destroy_group() -> None:
    """Destroy the default process group if it is still alive (the exit hook of init_from_env)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _entry(rank: int, fn: Callable, nproc: int, store: str, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=nproc)
    try:
        fn(Comm.from_process_group(), *args)
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run ``fn(comm, *args)`` on ``nproc`` local gloo ranks (spawned processes; 1: in this one).

    ``fn`` must be importable by name (a module-level function) and ``args`` picklable, as for
    ``torch.multiprocessing.spawn``; results travel through files. The ranks meet through a file
    store in a temporary folder (no port is opened). An exception on any rank is raised here.
    """
    if not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an int >= 1, got {nproc!r}")
    if nproc == 1:
        fn(Comm.single(), *args)
        return
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="convexedge-dist-") as tmp:
        mp.spawn(_entry, args=(fn, nproc, str(Path(tmp) / "store"), args), nprocs=nproc, join=True)


def capture_sharded(
    model: torch.nn.Module,
    module: str,
    images: np.ndarray,
    out_dir: str | Path,
    comm: Comm,
    *,
    transform: Callable[[np.ndarray], np.ndarray],
    config: Any = None,
    progress: bool = False,
):
    """Capture ``model.<module>`` on this rank's block of ``images`` (see :func:`shard_range`).

    Each rank writes ``out_dir/rankRRRRR/`` (memory-mapped shards and its own manifest); after a
    barrier rank 0 writes ``out_dir/manifest.json`` listing every rank's shards in rank order
    (skipped, with a log line, when it cannot see the other ranks' folders), then all ranks meet
    again. ``ActivationShards.open(out_dir)`` then reads the whole capture.

    Returns:
        This rank's :class:`~convexedge.host.capture.ActivationShards`.
    """
    from convexedge.host.capture import CaptureConfig, capture_block, merge_captures

    block = shard_range(int(images.shape[0]), comm.rank, comm.world_size)
    out = Path(out_dir)
    mine = capture_block(
        model,
        module,
        images[block.start : block.stop],
        out / f"rank{comm.rank:05d}",
        transform=transform,
        config=config if config is not None else CaptureConfig(),
        progress=progress and comm.rank == 0,
    )
    comm.barrier()
    if comm.rank == 0:
        parts = [f"rank{r:05d}" for r in range(comm.world_size)]
        if all((out / p / "manifest.json").exists() for p in parts):
            merge_captures(out, parts)
        else:
            log.info("%s: not every rank's capture is visible here; no merged manifest", out)
    comm.barrier()
    return mine
