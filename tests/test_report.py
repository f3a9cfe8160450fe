"""Tests of convexedge.host.report: table alignment, and that the plots write PNG files without
touching matplotlib's global state (no pyplot, backend setting unchanged)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from convexedge.host.report import format_table, plot_accuracy_vs_params, plot_convergence

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data[:8] == PNG_MAGIC


def test_format_table_alignment():
    header = ("span", "params", "top-1")
    rows = [("teacher layer3", "223,104", "91.5%"), ("student", "7", "88.12345%")]
    text = format_table(rows, header)
    lines = text.split("\n")
    assert len(lines) == 2 + len(rows)
    widths = [len(d) for d in lines[1].split("  ")]
    assert widths == [len("teacher layer3"), len("223,104"), len("88.12345%")]
    assert set(lines[1].replace("  ", "")) == {"-"}
    starts = [0, widths[0] + 2, widths[0] + widths[1] + 4]
    for line, cells in zip(lines[:1] + lines[2:], [header, *rows], strict=True):
        assert len(line) == sum(widths) + 4  # every column padded, two spaces between
        for start, width, cell in zip(starts, widths, cells, strict=True):
            assert line[start : start + width] == cell.ljust(width)  # left-aligned


def test_format_table_header_wider_than_rows():
    text = format_table([("a", "b", "c")], ("long header", "x", "yy"))
    assert text.split("\n") == ["long header  x  yy", "-----------  -  --", "a            b  c "]


def test_format_table_no_rows():
    assert format_table([], ("a", "bb", "c")) == "a  bb  c\n-  --  -"


# A zero KKT residual (the history of a lam >= lam_max solve) must not break the log axis.
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_plot_convergence_writes_png(tmp_path):
    histories = [
        ("lam=0.5", {"objective": [2.0, 1.5, 1.2, 1.2], "kkt": [1.0, 0.1, 1e-4, 1e-9]}),
        ("lam=0.1", {"objective": [1.0, 0.0], "kkt": [0.5, 0.0]}),  # best objective 0, kkt 0
        ("empty", {}),
    ]
    path = tmp_path / "convergence.png"
    plot_convergence(histories, path)
    assert _is_png(path)


@pytest.mark.parametrize("selected", [None, 1])
def test_plot_accuracy_vs_params_writes_png(tmp_path, selected):
    points = [(1200, 0.80, "0.5"), (5400, 0.86, "0.2"), (20000, 0.90, "0.05")]
    path = tmp_path / "accuracy.png"
    plot_accuracy_vs_params(points, (223_104, 0.915), str(path), selected=selected)
    assert _is_png(path)


def test_plots_leave_matplotlib_global_state_alone(tmp_path):
    code = f"""
import sys, matplotlib
backend = matplotlib.rcParams._get("backend")  # raw value; get_backend() would import pyplot
from convexedge.host.report import plot_accuracy_vs_params, plot_convergence
plot_convergence([("a", {{"objective": [2.0, 1.0], "kkt": [1.0, 0.1]}})], {str(tmp_path / "c.png")!r})
plot_accuracy_vs_params([(10, 0.5, "x")], (100, 0.9), {str(tmp_path / "a.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot imported"
assert matplotlib.rcParams._get("backend") == backend, "backend switched"
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert _is_png(tmp_path / "c.png") and _is_png(tmp_path / "a.png")
