"""C head: compiled with the system compiler, checked against the numpy ConvexHead (fp32 and int8)."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.converters.c_head import (
    _f32,
    compile_c_head,
    export_c_head,
    find_c_compiler,
    predict_int8_reference,
    run_c_head,
)
from convexedge.device import ConvexHead, GateSpec, HeadStore
from convexedge.device.errors import ArtifactError

needs_cc = pytest.mark.skipif(find_c_compiler() is None, reason="no C compiler (cc, gcc, clang) on PATH")


def _head(d_in=24, P=6, c=5, kind="gaussian", seed=0, info=None):
    rng = np.random.default_rng(seed)
    spec = GateSpec(kind=kind, d=d_in + 1, P=P, seed=seed)
    V = rng.standard_normal((P, d_in + 1, c)).astype(np.float32) * 0.3
    V[2] = 0.0  # a pruned gate: the C head must leave it out
    gates = rng.standard_normal((d_in + 1, P)).astype(np.float32) if kind == "array" else None
    mean = rng.standard_normal(d_in).astype(np.float32)
    std = (0.5 + rng.random(d_in)).astype(np.float32)
    return ConvexHead(V=V, gate_spec=spec, gates=gates, mean=mean, std=std, info=info or {})


def _features(head, n=400, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, head.d_in)) * head.std + head.mean).astype(np.float32)


@needs_cc
@pytest.mark.parametrize("kind", ["gaussian", "array"])
@pytest.mark.parametrize("std", ["c99", "c11"])
def test_fp32_matches_numpy(tmp_path, kind, std):
    head = _head(kind=kind)
    x = _features(head)
    files = export_c_head(head, tmp_path, name="h", calib_features=x)
    lib = compile_c_head(files, std=std)
    out, masks = run_c_head(lib, "h", x, head.c, len(head._active))
    np.testing.assert_allclose(out, head.predict(x), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(masks, head.masks(head.normalize(x))[:, head._active])
    assert len(head._active) == head.P - 1  # the zero gate is not emitted


@needs_cc
def test_int8_is_the_reference_kernel_and_close_to_fp32(tmp_path):
    head = _head(d_in=64, P=8, c=10, seed=3)
    x = _features(head, n=500, seed=4)
    files = export_c_head(head, tmp_path, calib_features=x)
    lib = compile_c_head(files)
    out, masks = run_c_head(lib, files.name, x, head.c, len(head._active), "i8")
    ref_out, ref_masks = predict_int8_reference(head, files.quant, x)
    np.testing.assert_array_equal(masks, ref_masks)  # integer compares: bit for bit
    np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-5)  # only float summation order differs
    fp = head.predict(x)
    agree = (out.argmax(1) == fp.argmax(1)).mean()
    gates = (masks == head.masks(head.normalize(x))[:, head._active]).mean()
    rel = np.abs(out - fp).mean() / np.abs(fp).mean()  # the max is one flipped gate's whole term
    print(f"int8 C head vs fp32: top-1 agreement {agree:.3f}, gates {gates:.4f}, mean rel err {rel:.3f}")
    assert agree >= 0.95 and gates >= 0.98 and rel < 0.05


@needs_cc
def test_header_is_aligned_and_exact(tmp_path):
    head = _head()
    files = export_c_head(head, tmp_path, name="h")
    text = files.header.read_text()
    assert "CE_ALIGN16 alignas(16)" in text and "static CE_ALIGN16 const float h_w[" in text
    assert "static CE_ALIGN16 const int8_t h_w_q[" in text


@settings(max_examples=200, deadline=None)
@given(st.floats(width=32, allow_nan=False, allow_infinity=False))
def test_hex_literals_round_trip(v):
    lit = _f32(v)
    assert lit.endswith("f") and np.float32(float.fromhex(lit[:-1])) == np.float32(v)


def test_bad_inputs(tmp_path):
    head = _head()
    with pytest.raises(ValueError, match="C identifier"):
        export_c_head(head, tmp_path, name="1bad-name")
    files = export_c_head(head, tmp_path, name="h")
    with pytest.raises(ArtifactError, match="failed"):
        files.source.write_text("this is not C")
        compile_c_head(files, cc=find_c_compiler() or "/bin/false")
    with pytest.raises(ValueError, match="variant"):
        run_c_head(tmp_path / "x.so", "h", np.zeros((1, head.d_in)), head.c, 1, "fp16")


@needs_cc
def test_export_cli_c_and_head_formats(tmp_path):
    """`convexedge export HEADSTORE --format c|head` on a head that reads layer2 pooled to 2x2."""
    from convexedge.converters.export import ExportOptions, run_export

    head = _head(d_in=128, P=4, c=10, seed=5, info={"input": {"span": "layer2", "pool": [2, 2]}})
    HeadStore.create(tmp_path / "store", head)
    for fmt in ("c", "head"):
        out = tmp_path / fmt
        report = run_export(
            ExportOptions(
                model=str(tmp_path / "store"), format=fmt, out=str(out), test_images=100, calib_images=50
            )
        )
        first = report["rows"][0]
        assert (
            first["max_abs_diff"] <= 1e-5
            and first["top1_agreement"] == 1.0
            and first["gate_agreement"] == 1.0
        )
        assert json.loads((out / "parity.json").read_text())["rows"] == report["rows"]
    assert [r["format"] for r in report["rows"]] == ["head"]
