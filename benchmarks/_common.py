"""Shared plumbing of the benchmarks: environment record, JSON output, plain tables."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def environment() -> dict:
    """Git commit, command line, library versions, CPU/GPU and thread count of this run."""
    import numpy as np

    env = {
        "command": command_line(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], capture_output=True, text=True, cwd=RESULTS.parent, timeout=10
        ).stdout.strip()
        env["git_dirty"] = bool(dirty)
    except (OSError, subprocess.SubprocessError):
        env["git_commit"] = None
    try:
        import torch

        env["torch"] = torch.__version__
        env["threads"] = torch.get_num_threads()
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return env


def command_line(argv: list[str] | None = None) -> str:
    """The command that reproduces this run, e.g. ``python -m benchmarks.solvers --quick``.

    Under ``python -m`` Python puts the module's file path in ``argv[0]``; a file inside this
    repository is written back as its dotted module name (run from the repository root).
    """
    argv = list(sys.argv if argv is None else argv) or ["?"]
    try:
        rel = Path(argv[0]).resolve().relative_to(RESULTS.parent.parent)
    except (OSError, ValueError):
        rel = None
    if rel is None or rel.suffix != ".py":
        return " ".join(["python", *argv])
    return " ".join(["python", "-m", ".".join(rel.with_suffix("").parts), *argv[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(name: str, payload: dict) -> Path:
    """Write ``RESULTS/NAME.json`` atomically (a reader never sees a half-written file)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=float))
    os.replace(tmp, path)
    return path


@contextmanager
def results_lock(name: str) -> Iterator[None]:
    """Hold an exclusive lock on ``RESULTS/NAME.json`` (split runs merging into one file take it
    around their read-merge-write, so two ending at once cannot drop each other's rows)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / f".{name}.json.lock", "w") as handle:
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (split runs there must not end together)
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, format spec); returns aligned text."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    lines = ["  ".join(c[i].rjust(widths[i]) for i in range(len(columns))) for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
