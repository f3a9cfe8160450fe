"""Tests of the distillation front end (``convexedge distill --model ... --samples-per-class K``):
span validation and capture for any model, swap of a multi-module span keeps every other weight
bit-identical, model resolution and its errors, and the full pipeline on a data folder whose
training shards hold no labels at all (so any read of a training label fails the run)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from convexedge.device.errors import DataError
from convexedge.host.distill import capture_span, check_span, load_compressed_model, span_module, swap_span_
from convexedge.host.distill_cli import PipelineOptions, resolve_model, run_pipeline
from convexedge.models import BUNDLED_DATA_DIR
from convexedge.models.resnet_cifar import resnet20

FACTORY = "convexedge.models.resnet_cifar:resnet20"


@pytest.fixture(scope="module")
def label_free_dir(tmp_path_factory):
    """``train_00.npz`` with images only (no ``y``: reading a training label raises) and
    ``test_00.npz`` with 40 labelled test images."""
    folder = tmp_path_factory.mktemp("label_free")
    with np.load(BUNDLED_DATA_DIR / "train_0000_1999.npz") as npz:
        np.savez(folder / "train_00.npz", x=npz["x"][:60])
    with np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz") as npz:
        np.savez(folder / "test_00.npz", x=npz["x"][:40], y=npz["y"][:40])
    return folder


# ------------------------------------------------------------------------------------ spans
def test_check_span_single_and_siblings():
    model = resnet20()
    assert check_span(model, ["layer3"]) == ["layer3"]
    assert check_span(model, ["layer1", "layer3"]) == ["layer1", "layer2", "layer3"]
    assert check_span(model, ["layer3.1", "layer3.2"]) == ["layer3.1", "layer3.2"]


@pytest.mark.parametrize(
    "names,match",
    [
        (["layer9"], "'layer9' not found"),
        (["layer2", "layer3.1"], "children of the same module"),
        (["layer3", "layer2"], "registered before"),
        ([], "one module name"),
    ],
)
def test_check_span_errors(names, match):
    with pytest.raises(DataError, match=match):
        check_span(resnet20(), names)


def test_capture_span_matches_manual_forward(teacher, transform):
    x = np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz")["x"][:6]
    z_in, z_out = capture_span(teacher, ["layer2", "layer3"], x, transform=transform, batch_size=4)
    with torch.no_grad():
        h = teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(torch.from_numpy(transform(x))))))
        np.testing.assert_allclose(z_in, h.numpy(), atol=1e-5)
        np.testing.assert_allclose(z_out, teacher.layer3(teacher.layer2(h)).numpy(), atol=1e-5)
    only_in, none = capture_span(teacher, ["layer3"], x, transform=transform, outputs=False)
    assert none is None and only_in.shape == (6, 32, 16, 16)
    with pytest.raises(DataError, match="uint8"):
        capture_span(teacher, ["layer3"], x.astype(np.float32), transform=transform)


def test_swap_multi_module_span_keeps_other_weights_bit_identical(teacher):
    class Student(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(16, 64, 3, stride=4, padding=1)

        def forward(self, z):
            return self.conv(z)

    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = swap_span_(copy.deepcopy(teacher), ["layer2", "layer3"], Student())
    assert isinstance(model.layer3, nn.Identity)
    new = model.state_dict()
    for key, val in teacher.state_dict().items():
        assert torch.equal(val, before[key])  # the teacher is untouched
        if not key.startswith(("layer2.", "layer3.")):
            assert torch.equal(new[key], val), key
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_swapping_the_span_by_itself_is_exact(teacher):
    span = check_span(teacher, ["layer1", "layer3"])
    model = swap_span_(copy.deepcopy(teacher), span, copy.deepcopy(span_module(teacher, span)))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), teacher(x))


class SkipNet(nn.Module):
    """a -> b, but the output adds a's output: (a, b) is not a sequential chain."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.head((h + self.b(h)).mean((2, 3)))


def skipnet() -> nn.Module:
    torch.manual_seed(0)
    return SkipNet()


# --------------------------------------------------------------------------- model resolution
@pytest.mark.parametrize(
    "name,match",
    [
        ("vgg11", "unknown model 'vgg11'"),
        ("no_such_pkg.mod:f", "cannot import module"),
        ("convexedge.models.resnet_cifar:nothing", "no callable 'nothing'"),
        ("convexedge.models.bundled:teacher_normalization", "not a torch nn.Module"),
    ],
)
def test_resolve_model_errors(name, match):
    with pytest.raises(DataError, match=match):
        resolve_model(name)


def test_resolve_model_factory_and_bundled():
    spec = resolve_model(FACTORY)
    assert spec.identity == {"factory": FACTORY, "architecture": "factory"} and len(spec.mean) == 3
    assert resolve_model("resnet20").identity["architecture"] == "resnet20"


# ------------------------------------------------------------------------------ the pipeline
OPTS = dict(samples_per_class=2, gates=2, lam_ratios=(0.1, 0.01), max_iter=30, progress=False)


@pytest.fixture(scope="module")
def pipeline_run(label_free_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    opt = PipelineOptions(model="resnet20", spans=(("layer3",),), data=str(label_free_dir), out=str(out),
                          kd=True, kd_epochs=1, **OPTS)  # fmt: skip
    return out, run_pipeline(opt)


def test_pipeline_is_label_free_and_writes_everything(pipeline_run):
    out, report = pipeline_run
    # the training shard has no labels: the run above would have raised on any read of them
    assert report["data"] == {
        **report["data"],
        "drawn": 20,
        "held_out": 2,
        "test_images": 40,
        "train_pool": 60,
    }
    assert "without reading labels" in report["label_use"]
    kinds = [r["student"] for r in report["rows"]]
    assert kinds[0] == "teacher" and "convex" in kinds and "convex_pruned_polished" in kinds
    assert kinds[-1] == "convex+kd" and "not a label-free" in report["rows"][-1]["note"]
    for name in ("student.npz", "student.json", "report.json", "accuracy_vs_params.png", "kd_model.npz"):
        assert (out / name).exists(), name
    assert json.loads((out / "report.json").read_text())["rows"] == json.loads(json.dumps(report["rows"]))


def test_saved_compressed_model_reproduces_its_row(pipeline_run, transform):
    out, report = pipeline_run
    model = load_compressed_model(str(out))
    saved = json.loads((out / "student.json").read_text())
    row = next(r for r in report["rows"] if r["student"] == saved["student_kind"])
    with np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz") as npz:
        x, y = npz["x"][:40], npz["y"][:40]
    with torch.no_grad():
        pred = model(torch.from_numpy(transform(x))).argmax(1).numpy()
    assert float((pred == y).mean()) == pytest.approx(row["top1"])
    assert sum(p.numel() for p in model.layer3.parameters()) + model.layer3.gate_weight.numel() + \
        model.layer3.gate_bias.numel() == row["span_params"]  # fmt: skip


def test_pipeline_saves_the_neuron_form_when_it_is_accepted(label_free_dir, tmp_path, transform):
    opt = PipelineOptions(model="resnet20", spans=(("layer3",),), data=str(label_free_dir), out=str(tmp_path),
                          polish=False, lowrank_tolerance=1e9, test_images=40, **OPTS)  # fmt: skip
    report = run_pipeline(opt)
    info = report["spans"]["layer3"]["lowrank"]
    assert (
        info["accepted"] and info["smaller"] and report["spans"]["layer3"]["saved_kind"] == "convex_lowrank"
    )
    saved = json.loads((tmp_path / "student.json").read_text())
    assert saved["kind"] == "gated_conv_lowrank" and saved["student_kind"] == "convex_lowrank"
    row = next(r for r in report["rows"] if r["student"] == "convex_lowrank")
    full = next(r for r in report["rows"] if r["student"] == "convex")
    assert row["span_params"] < full["span_params"] and row["neurons"] == info["neurons"]
    model = load_compressed_model(str(tmp_path))
    with np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz") as npz:
        x, y = npz["x"][:40], npz["y"][:40]
    with torch.no_grad():
        pred = model(torch.from_numpy(transform(x))).argmax(1).numpy()
    assert float((pred == y).mean()) == pytest.approx(row["top1"])


def test_pipeline_without_lowrank_saves_the_full_student(label_free_dir, tmp_path):
    opt = PipelineOptions(model="resnet20", spans=(("layer3",),), data=str(label_free_dir), out=str(tmp_path),
                          polish=False, lowrank=False, test_images=10, **OPTS)  # fmt: skip
    report = run_pipeline(opt)
    assert report["spans"]["layer3"]["lowrank"] is None
    assert "convex_lowrank" not in [r["student"] for r in report["rows"]]
    assert json.loads((tmp_path / "student.json").read_text())["kind"] == "gated_conv"


def test_pipeline_factory_model_two_module_span(label_free_dir, tmp_path):
    opt = PipelineOptions(model=FACTORY, spans=(("layer2", "layer3"), ("layer3",)), data=str(label_free_dir),
                          out=str(tmp_path), polish=False, test_images=10, **OPTS)  # fmt: skip
    report = run_pipeline(opt)
    assert set(report["spans"]) == {"layer2..layer3", "layer3"}
    assert report["spans"]["layer2..layer3"]["input_shape"] == [16, 32, 32]
    assert (tmp_path / "layer2__layer3" / "student.json").exists()
    manifest = json.loads((tmp_path / "layer2__layer3" / "student.json").read_text())
    assert manifest["span_modules"] == ["layer2", "layer3"] and manifest["teacher"]["factory"] == FACTORY
    model = load_compressed_model(str(tmp_path / "layer2__layer3"), teacher=resolve_model(FACTORY).model)
    assert isinstance(model.layer3, nn.Identity)


def test_pipeline_refuses_a_non_chain_span(label_free_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "skipnet", skipnet, raising=False)
    opt = PipelineOptions(model=f"{__name__}:skipnet", spans=(("a", "b"),), data=str(label_free_dir),
                          out=str(tmp_path), **OPTS)  # fmt: skip
    with pytest.raises(DataError, match="not a sequential chain"):
        run_pipeline(opt)


def test_pipeline_too_many_samples(label_free_dir, tmp_path):
    opt = PipelineOptions(spans=(("layer3",),), data=str(label_free_dir), out=str(tmp_path),
                          **{**OPTS, "samples_per_class": 7})  # fmt: skip
    with pytest.raises(DataError, match="lower --samples-per-class"):
        run_pipeline(opt)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"samples_per_class": 0}, "samples_per_class"),
        ({"spans": ()}, "span"),
        ({"spans": (("a", "b", "c"),)}, "span"),
        ({"kernel_size": 2}, "kernel_size"),
        ({"lam_ratios": (0.1, 0.1)}, "strictly decreasing"),
        ({"lowrank_tolerance": -0.1}, "lowrank_tolerance"),
    ],
)
def test_pipeline_option_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PipelineOptions(**kwargs)


# ------------------------------------------------------------------------------ CLI, subprocess
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "convexedge.host.cli", "distill", *args],
                          capture_output=True, text=True, timeout=300, env=env)  # fmt: skip


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "nosuchnet"], "unknown model 'nosuchnet'"),
        (["--model", "resnet20", "--span", "layer7"], "'layer7' not found"),
        (["--span-input", "layer2"], "--span-input and --span-output go together"),
        (["--samples-per-class", "5", "--nproc", "2"], "data-parallel solve"),
    ],
)
def test_cli_errors_are_one_line(args, match, label_free_dir, tmp_path):
    res = _cli(*args, "--data", str(label_free_dir), "--out", str(tmp_path), "--no-progress")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("convexedge: error:") and match in lines[0], res.stderr


@pytest.mark.parametrize(
    "extra,saved",
    [
        ([], None),
        (["--per-block", "--lowrank-tolerance", "1e9"], "gated_conv_chain"),
        (["--no-lowrank"], "gated_conv"),
    ],
)
def test_cli_runs_the_pipeline(label_free_dir, tmp_path, extra, saved):
    args = ["--model", FACTORY, "--span-input", "layer3", "--span-output", "layer3"]
    args += ["--samples-per-class", "2", "--gates", "2", "--lam-ratios", "0.1", "--max-iter", "20"]
    args += ["--test-images", "10", "--no-polish", "--data", str(label_free_dir), "--out", str(tmp_path)]
    res = _cli(*args, *extra, "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "without reading labels" in res.stdout
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["options"]["spans"] == [["layer3"]] and report["options"]["model"] == FACTORY
    assert (tmp_path / "student.json").exists() and (tmp_path / "accuracy_vs_params.png").exists()
    assert report["options"]["per_block"] == ("--per-block" in extra)
    if saved:
        assert json.loads((tmp_path / "student.json").read_text())["kind"] == saved


@pytest.mark.slow
def test_pipeline_on_resnet18_weights_outside_models(label_free_dir, tmp_path):
    """``--model resnet18 --weights W.npz``: CIFAR stem, last stage layer4 (256x8x8 -> 512x4x4)."""
    from convexedge.models.resnet18_cifar import resnet18_cifar, save_resnet18

    torch.manual_seed(0)
    w = tmp_path / "r18.npz"
    save_resnet18(resnet18_cifar().eval(), w, w.with_suffix(".json"), mean=[0.5] * 3, std=[0.25] * 3)
    opt = PipelineOptions(model="resnet18", weights=str(w), spans=(("layer4",),), data=str(label_free_dir),
                          out=str(tmp_path / "out"), polish=False, test_images=10, **OPTS)  # fmt: skip
    report = run_pipeline(opt)
    assert report["spans"]["layer4"]["input_shape"] == [256, 8, 8]
    assert report["spans"]["layer4"]["output_shape"] == [512, 4, 4]
    assert report["teacher"]["architecture"] == "resnet18" and report["teacher"]["weights"] == "r18.npz"


def test_pipeline_per_block_saves_a_chain_that_reproduces_its_row(label_free_dir, tmp_path, transform):
    from convexedge.host.students import StudentChain

    opt = PipelineOptions(model="resnet20", spans=(("layer3",),), data=str(label_free_dir), out=str(tmp_path),
                          polish=False, per_block=True, lowrank_tolerance=1e9, test_images=40,
                          **OPTS)  # fmt: skip
    report = run_pipeline(opt)
    info = report["spans"]["layer3"]["per_block"]
    assert [b["block"] for b in info["blocks"]] == ["layer3.0", "layer3.1", "layer3.2"]
    assert all(b["kind"] == "convex_lowrank" for b in info["blocks"])  # tolerance 1e9: always accepted
    assert report["spans"]["layer3"]["saved_kind"] == "convex_blocks"
    saved = json.loads((tmp_path / "student.json").read_text())
    assert saved["kind"] == "gated_conv_chain" and len(saved["students"]) == 3
    row = next(r for r in report["rows"] if r["student"] == "convex_blocks")
    model = load_compressed_model(str(tmp_path))
    assert isinstance(model.layer3, StudentChain) and len(model.layer3) == 3
    assert model.layer3.num_parameters() == row["span_params"]
    with np.load(BUNDLED_DATA_DIR / "test_0000_0999.npz") as npz:
        x, y = npz["x"][:40], npz["y"][:40]
    with torch.no_grad():
        pred = model(torch.from_numpy(transform(x))).argmax(1).numpy()
    assert float((pred == y).mean()) == pytest.approx(row["top1"])
