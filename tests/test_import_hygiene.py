"""`import convexedge.device` never imports torch; `convexedge.converters` never imports onnx/TF."""

import subprocess
import sys
import textwrap

import pytest

BLOCK = textwrap.dedent(
    """
    import importlib, pkgutil, sys
    for banned in {banned!r}:
        sys.modules[banned] = None  # any import of it now raises ImportError
    import {package} as pkg
    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in {banned!r} and sys.modules[m] is not None)
    assert not leaked, leaked
    print("ok")
    """
)


@pytest.mark.parametrize(
    ("package", "banned"),
    [
        ("convexedge.device", ("torch", "torchvision", "tensorflow", "onnx", "onnxruntime")),
        ("convexedge.converters", ("onnx", "onnxruntime", "tensorflow", "ai_edge_litert")),
    ],
)
def test_package_imports_without_heavy_dependencies(package, banned):
    code = BLOCK.format(package=package, banned=banned)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_device_errors_are_shared_by_host():
    from convexedge.device.errors import ConvexEdgeError, DataError
    from convexedge.host import data

    assert issubclass(DataError, ConvexEdgeError)
    with pytest.raises(DataError, match="does not exist"):
        data.load_images("/nonexistent/folder", "test")
