"""Checkpoints of a solve: the FISTA state and finished path points as ``.npz`` files (no pickle).

A checkpoint folder holds, per rank of a (data-parallel) solve, ``NAME.rankRRRRR-of-WWWWW.npz``:
the iterate, previous iterate, momentum point, their operator images and gradients, the scalars
``t``, ``step``, ``F(x)``, the iteration and restart counts, the elapsed seconds and the history,
plus a JSON header naming the problem it belongs to (``lam``, shapes, dtype, group, operator, rank
and world size). Images of the direct operator are this rank's rows, so a checkpoint resumes only
on the same number of ranks. Everything is stored at full precision, so a resumed solve takes
exactly the steps an uninterrupted one takes. Files are written to a temporary name, synced, and
renamed (atomic); a header that does not match the problem raises :class:`ArtifactError`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from convexedge.device.errors import ArtifactError

__all__ = ["SolverCheckpoint", "load_arrays", "save_arrays"]

_FORMAT = "convexedge.solver_checkpoint"
_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class SolverCheckpoint:
    """Where and how often :func:`~convexedge.host.solvers.solve` saves its state.

    Attributes:
        folder: checkpoint folder (created on the first save). A later solve given the same
            folder resumes from what it finds there.
        every: save every this many iterations (at checked iterations, see
            ``FistaConfig.check_every``), and always at the end of the solve.
        name: file stem; :func:`~convexedge.host.solvers.solve_path` derives one per path point
            and screening round.
    """

    folder: str
    every: int = 100
    name: str = "fista"

    def __post_init__(self) -> None:
        if not isinstance(self.folder, (str, os.PathLike)) or not str(self.folder):
            raise ValueError(f"folder must be a non-empty path, got {self.folder!r}")
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 1:
            raise ValueError(f"every must be an int >= 1, got {self.every!r}")
        if not isinstance(self.name, str) or not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"name must be a plain file stem, got {self.name!r}")

    def file(self, rank: int, world_size: int, name: str | None = None) -> Path:
        """The file of ``rank`` (of ``world_size``) for stem ``name`` (default ``self.name``)."""
        return Path(self.folder) / f"{name or self.name}.rank{rank:05d}-of-{world_size:05d}.npz"


def save_arrays(path: Path, header: dict[str, Any], arrays: dict[str, torch.Tensor | np.ndarray]) -> None:
    """Write ``arrays`` and the JSON ``header`` to ``path`` atomically (temp file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
        for k, v in arrays.items()
    }
    head = {"format": _FORMAT, "format_version": _VERSION, **header}
    data["__header__"] = np.array(json.dumps(head, allow_nan=True))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, **data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def load_arrays(path: Path, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, np.ndarray]] | None:
    """Read a file of :func:`save_arrays`; ``None`` if there is none.

    Args:
        path: the file.
        expect: header entries that must match (e.g. ``lam``, shapes); floats compare exactly.

    Raises:
        ArtifactError: unreadable, another format, or a header entry differs from ``expect``.
    """
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        header = json.loads(str(arrays.pop("__header__")))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise ArtifactError(f"{path}: unreadable solver checkpoint ({exc}); delete it to restart") from None
    if header.get("format") != _FORMAT or header.get("format_version") != _VERSION:
        raise ArtifactError(
            f"{path}: expected {_FORMAT} v{_VERSION}, got {header.get('format')!r} "
            f"v{header.get('format_version')!r}"
        )
    for key, want in expect.items():
        got = header.get(key)
        same = got == want or (
            isinstance(got, float) and isinstance(want, float) and math.isnan(got) and math.isnan(want)
        )
        if not same:
            raise ArtifactError(
                f"{path} belongs to another solve: {key} is {got!r} there, {want!r} here; delete the "
                f"checkpoint folder or give this solve another one"
            )
    return header, arrays
