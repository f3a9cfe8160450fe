"""The benchmarks' shared plumbing: the reproducing command line, atomic JSON writes and the lock
that split runs merging into one results file take."""

from __future__ import annotations

import json
import threading
import time

from benchmarks import _common
from benchmarks._common import command_line, results_lock, write_json


def test_command_line_names_the_module_that_python_dash_m_ran():
    repo = _common.RESULTS.parent.parent
    got = command_line([str(repo / "benchmarks" / "solvers.py"), "--quick", "--lams", "path"])
    assert got == "python -m benchmarks.solvers --quick --lams path"
    assert command_line(["-c", "pass"]) == "python -c pass"
    assert command_line(["/elsewhere/tool.py", "x"]) == "python /elsewhere/tool.py x"


def test_write_json_replaces_the_file_whole_and_leaves_no_temporary(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    write_json("r", {"a": 1})
    path = write_json("r", {"a": 2, "x": 0.5})
    assert json.loads(path.read_text()) == {"a": 2, "x": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_results_lock_serialises_two_writers(tmp_path, monkeypatch):
    monkeypatch.setattr(_common, "RESULTS", tmp_path)
    order, holding = [], threading.Event()

    def first():
        with results_lock("r"):
            order.append("first in")
            holding.set()
            time.sleep(0.3)
            order.append("first out")

    def second():
        holding.wait()
        with results_lock("r"):
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert order == ["first in", "first out", "second in"]
