"""The built wheel holds every module of every mapped folder, and the bundled data files."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "host": "convexedge/host",
    "device": "convexedge/device",
    "converters": "convexedge/converters",
    "models": "convexedge/models",
}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    build_dir = tmp_path_factory.mktemp("buildsrc")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=build_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("convexedge-*.whl"))
    assert len(wheels) == 1, wheels
    return zipfile.ZipFile(wheels[0])


def test_wheel_contains_every_module(wheel):
    names = set(wheel.namelist())
    expected = []
    for folder, prefix in FOLDERS.items():
        for src in (ROOT / folder).rglob("*.py"):
            expected.append(f"{prefix}/{src.relative_to(ROOT / folder).as_posix()}")
    assert expected, "no source modules found"
    missing = sorted(e for e in expected if e not in names)
    assert not missing, f"modules missing from the wheel: {missing}"


def test_wheel_contains_bundled_data(wheel):
    names = set(wheel.namelist())
    for rel in [
        "resnet20_cifar10.npz",
        "resnet20_cifar10.json",
        "PROVENANCE.md",
        "cifar10/train_0000_1999.npz",
        "cifar10/test_0000_0999.npz",
        "cifar10/classes.json",
    ]:
        assert f"convexedge/models/{rel}" in names, rel
    total = sum(i.file_size for i in wheel.infolist() if i.filename.startswith("convexedge/models/"))
    assert total < 12e6, f"bundled files take {total / 1e6:.1f} MB"


def test_wheel_declares_light_base_and_extras(wheel):
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    text = wheel.read(meta).decode()
    base = [ln for ln in text.splitlines() if ln.startswith("Requires-Dist:") and "extra ==" not in ln]
    assert base and all(("numpy" in ln or "scipy" in ln) for ln in base), base
    for extra in ("host", "export", "bench", "dev", "all"):
        assert f"Provides-Extra: {extra}" in text
    assert (
        "convexedge = convexedge.host.cli:main"
        in wheel.read(next(n for n in wheel.namelist() if n.endswith("entry_points.txt"))).decode()
    )
