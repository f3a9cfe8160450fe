"""End to end: `convexedge demo --quick` on a tiny real slice, label-free capture, report contents."""

import json

import numpy as np
import pytest

from convexedge.host.cli import main

REQUIRED = [
    "teacher_top1",
    "student_top1",
    "span_params_teacher",
    "span_params_student",
    "solve_seconds",
    "solver_iterations",
    "kkt_residual",
]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    from convexedge.models import BUNDLED_DATA_DIR

    data = tmp_path_factory.mktemp("data")
    with np.load(BUNDLED_DATA_DIR / "train_0000_1999.npz") as tr:
        # training shard WITHOUT labels: the capture/solve path must never need them
        np.savez(data / "train_00.npz", x=tr["x"][:48])
    with np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz") as te:
        np.savez(data / "test_00.npz", x=te["x"][:80], y=te["y"][:80])
    out = tmp_path_factory.mktemp("out")
    status = main(
        [
            "demo",
            "--quick",
            "--data",
            str(data),
            "--out",
            str(out),
            "--images",
            "48",
            "--no-progress",
            "--seed",
            "1",
        ]
    )
    return status, out, data


def test_demo_succeeds_and_writes_report(demo_run, capsys):
    status, out, _ = demo_run
    assert status == 0
    report = json.loads((out / "report.json").read_text())
    for key in REQUIRED:
        assert key in report, key
    assert 0.5 < report["teacher_top1"] <= 1.0
    assert 0.0 <= report["student_top1"] <= 1.0
    assert report["span_params_student"] < report["span_params_teacher"]
    assert report["solver_iterations"] > 0 and report["solve_seconds"] > 0
    assert report["kkt_residual"] >= 0
    assert report["capture"]["images"] == 48 and report["test_images"] == 80
    assert "label-free" in report["labels_read"]
    device = report["device"]  # the on-device step: head exported, served by the numpy runtime, refit
    assert device["refit_status"] in ("accepted", "rejected", "out_of_budget")
    assert 0.0 <= device["head_top1_shifted_before"] <= 1.0 and device["stream_samples"] == 48
    assert (out / "heads").is_dir()
    for png in ("convergence.png", "accuracy_vs_params.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_student_reproduces_reported_accuracy(demo_run):
    """student.npz is the saved kind the report names (the neuron form when accepted and smaller),
    it loads with its checksums, and it reproduces the reported top-1."""
    from convexedge.host.data import load_images, normalize_images
    from convexedge.host.distill import load_student
    from convexedge.host.evaluate import predict_logits, top1
    from convexedge.host.students import GatedConvStudent, LowRankGatedConvStudent
    from convexedge.host.swap import swapped
    from convexedge.models import load_teacher, teacher_normalization

    _, out, data = demo_run
    report = json.loads((out / "report.json").read_text())
    student, manifest = load_student(str(out))
    saved, nf = report["saved"], report["neuron_form"]
    assert nf is not None and nf["neurons"] >= 1 and nf["val_loss"] >= 0
    if saved["kind"] == "convex_lowrank":
        assert isinstance(student, LowRankGatedConvStudent) and nf["saved"] and nf["accepted"]
        assert nf["span_params"] < report["span_params_student"] and student.num_neurons == nf["neurons"]
    else:
        assert isinstance(student, GatedConvStudent) and not nf["saved"]
        assert len(manifest["active_gate_indices"]) == report["active_gates"]
    model = swapped(load_teacher(), manifest["span"], student)
    mean, std = teacher_normalization()
    test = load_images(data, "test")
    acc = top1(predict_logits(model, test.x, lambda x: normalize_images(x, mean, std)), test.y)
    assert acc == pytest.approx(saved["top1"])
    assert sum(p.numel() for p in student.parameters()) + student.gate_weight.numel() + \
        student.gate_bias.numel() == saved["span_params"]  # fmt: skip


def test_device_head_loads_without_torch(demo_run):
    """The exported head opens and predicts in a process where torch cannot be imported."""
    import subprocess
    import sys

    _, out, _ = demo_run
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from convexedge.device import HeadStore\n"
        f"head = HeadStore.open({str(out / 'heads')!r}).head\n"
        "print(head.predict(np.zeros((2, head.d_in), np.float32)).shape)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(2, 10)"


@pytest.mark.parametrize("extra", [[], ["--renormalize", "mean_std", "--anchor", "10"]])
def test_refit_cli_on_the_demo_heads(demo_run, tmp_path, capsys, extra):
    """`convexedge refit` streams activation files into the numpy runtime and reports one refit."""
    import shutil

    from convexedge.device import HeadStore

    _, out, _ = demo_run
    heads = tmp_path / "heads"
    shutil.copytree(out / "heads", heads)
    head = HeadStore.open(heads).head
    rng = np.random.default_rng(0)
    acts = tmp_path / "acts"
    acts.mkdir()
    for k in range(3):
        x = rng.normal(size=(200, head.d_in)).astype(np.float32)
        np.savez(acts / f"chunk_{k}.npz", x=x, target=head.predict(x) + 0.1 * rng.normal(size=(200, 10)))
    status = main(["refit", str(heads), str(acts), "--time-budget", "2", *extra])
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    assert report["observed"] == 600
    assert report["renormalized"] == bool(extra)
    assert report["status"] in ("accepted", "rejected", "out_of_budget")


def test_refit_cli_bad_folder_is_one_line(demo_run, tmp_path, capsys):
    _, out, _ = demo_run
    status = main(["refit", str(out / "heads"), str(tmp_path)])
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no *.npz activation files" in err[0]
