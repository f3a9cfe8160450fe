"""Plots and tables of a distillation run (matplotlib's object API: no pyplot, no global backend)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["format_table", "plot_accuracy_vs_params", "plot_convergence"]


def format_table(rows: Sequence[tuple[str, str, str]], header: tuple[str, str, str]) -> str:
    """A plain-text table with three left-aligned columns."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), line, *(fmt.format(*r) for r in rows)])


def plot_convergence(histories: Sequence[tuple[str, dict]], path: str | Path) -> None:
    """Objective suboptimality and relative KKT residual against iteration, one line per solve.

    Each history is a solver ``history`` dict with ``"objective"`` and ``"kkt"`` lists. The
    suboptimality is measured against the best objective that solve reached (its last point,
    where that gap is 0, is not drawn).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for label, hist in histories:
        obj = hist.get("objective", [])
        if obj:
            best = min(obj)
            scale = abs(best) if best != 0 else 1.0  # absolute gap when the optimum is 0
            # the gap to the solve's own best point is 0 there by construction: leave that point out
            gap = [max((o - best) / scale, 1e-16) for o in obj[:-1]]
            ax1.semilogy(range(1, len(gap) + 1), gap, label=label)
        kkt = hist.get("kkt", [])
        if kkt:
            ax2.semilogy(range(1, len(kkt) + 1), [max(k, 1e-16) for k in kkt], label=label)
    ax1.set(xlabel="iteration", ylabel="(F - F_final) / F_final", title="objective")
    ax2.set(xlabel="iteration", ylabel="relative KKT residual", title="optimality")
    for ax in (ax1, ax2):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110)


def plot_accuracy_vs_params(
    points: Sequence[tuple[int, float, str]],
    teacher: tuple[int, float],
    path: str | Path,
    *,
    selected: int | None = None,
) -> None:
    """Top-1 against parameters of the replaced span; ``points`` are ``(params, top1, label)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    xs, ys = [p[0] for p in points], [100 * p[1] for p in points]
    ax.plot(xs, ys, "o-", label="convex GReLU student (lam path)")
    for x, y, (_, _, label) in zip(xs, ys, points, strict=True):
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if selected is not None:
        ax.plot([xs[selected]], [ys[selected]], "s", ms=10, mfc="none", label="selected (val. loss)")
    ax.plot([teacher[0]], [100 * teacher[1]], "*", ms=14, label="teacher span")
    ax.set(
        xscale="log",
        xlabel="parameters of the replaced span (gates counted)",
        ylabel="top-1 (%)",
        title="accuracy vs parameters",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
