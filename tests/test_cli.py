"""The console script: bad input gives one line on stderr and exit 2, never a traceback."""

import subprocess
import sys

import pytest

from convexedge.host.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "convexedge.host.cli", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--images", "0"], "expected a positive integer"),
        (["demo", "--device", "tpu"], "invalid choice"),
        (["demo", "--bogus"], "unrecognized arguments"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    proc = run_cli(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr


def test_missing_data_folder_is_one_clear_line(tmp_path, capsys):
    status = main(
        ["demo", "--quick", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]
    )
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]


def test_bad_shard_is_one_clear_line(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "test_00.npz", x=np.zeros((4, 32, 32, 3), np.float32), y=np.zeros(4, np.int64))
    status = main(["demo", "--quick", "--data", str(tmp_path), "--out", str(tmp_path / "o"), "--no-progress"])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "uint8" in err[0]


def test_cuda_requested_without_gpu(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    status = main(["demo", "--quick", "--device", "cuda", "--out", str(tmp_path), "--no-progress"])
    assert status == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_help_lists_demo():
    proc = run_cli("--help")
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_export_of_a_folder_without_student_is_one_line(tmp_path, capsys):
    status = main(["export", str(tmp_path), "--out", str(tmp_path / "o")])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a convexedge student folder" in err[0]
