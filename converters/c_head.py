"""A device head as portable C for microcontroller-class targets: one header of weights, one kernel.

:func:`export_c_head` writes ``NAME.h`` (the head's arrays as aligned ``const`` arrays, fp32 and int8)
and ``NAME.c`` (the gated-ReLU kernel, no allocation, no libm). For one sample ``x: (d_in,)`` both
variants compute, over the head's *active* gates only (pruned gates cost nothing),

    z = (x - mean) * inv_std,    m_i = 1[z . g_i + gb_i >= 0],    out_j = sum_i m_i (z . W_ij + b_ij)

- ``NAME_predict_f32``: all in float32, the same arithmetic as :meth:`ConvexHead.predict_normalized`
  (only the summation order differs).
- ``NAME_predict_i8``: ``z`` is quantised to int8 with one symmetric scale ``s_z`` (from calibration
  features); weights and gates are int8 with one symmetric scale per (gate, output) row and per
  gate; products accumulate in int32, biases are int32 at the accumulator's scale, so the masks are
  exact integer compares. Each active (gate, output) is rescaled to float once at the end. The
  rounding is half away from zero in C and in :func:`predict_int8_reference` alike.

The gates are materialised as constants (from the head's gate array, or regenerated from its seed
by :class:`~convexedge.device.ConvexHead`), so the device needs neither numpy nor the seed.
Alignment: C11's ``alignas(16)`` where available, the GCC/Clang or MSVC attribute under C99.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from convexedge.device.errors import ArtifactError, DataError
from convexedge.device.head import ConvexHead, check_features

__all__ = [
    "CHeadFiles",
    "CHeadQuant",
    "compile_c_head",
    "export_c_head",
    "find_c_compiler",
    "predict_int8_reference",
    "quantize_head",
    "run_c_head",
]

_PER_LINE = 6


@dataclass(frozen=True)
class CHeadQuant:
    """Int8 tables of the active gates (``Pa`` of them) of a head.

    Attributes:
        z_scale: symmetric scale of the standardised features, ``z_q = round(z / z_scale)``.
        w: (Pa, c, d_in) int8 weights; ``w_scale``: (Pa, c) float32; ``w_bias``: (Pa, c) int32 at
            scale ``z_scale * w_scale``.
        g: (Pa, d_in) int8 gates; ``g_scale``: (Pa,) float32; ``g_bias``: (Pa,) int32 at
            ``z_scale * g_scale``.
    """

    z_scale: float
    w: np.ndarray
    w_scale: np.ndarray
    w_bias: np.ndarray
    g: np.ndarray
    g_scale: np.ndarray
    g_bias: np.ndarray


@dataclass(frozen=True)
class CHeadFiles:
    """What :func:`export_c_head` wrote: the header, the kernel source, and the symbol prefix."""

    header: Path
    source: Path
    name: str
    quant: CHeadQuant


def _round_away(v: np.ndarray) -> np.ndarray:
    return np.where(v >= 0, np.floor(v + 0.5), np.ceil(v - 0.5))


def _sym_scale(a: np.ndarray, axis: int) -> np.ndarray:
    amax = np.abs(a).max(axis=axis)
    return np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)


def _active_tables(head: ConvexHead) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(W (Pa, c, d_in), b (Pa, c), Gw (Pa, d_in), gb (Pa,))`` float32 of the active gates."""
    active = head._active  # type: ignore[attr-defined]
    V = head.V[active]  # (Pa, d, c)
    G = head.gates[:, active]  # type: ignore[index]
    W = np.ascontiguousarray(V[:, :-1, :].transpose(0, 2, 1))
    return W, np.ascontiguousarray(V[:, -1, :]), np.ascontiguousarray(G[:-1].T), np.ascontiguousarray(G[-1])


def quantize_head(head: ConvexHead, calib_features: np.ndarray | None = None) -> CHeadQuant:
    """Int8 tables for ``head``; ``z_scale`` from the largest standardised calibration feature.

    Args:
        head: the device head.
        calib_features: (n, d_in) raw features (the head's input) to set ``z_scale``; ``None``
            assumes standardised features within +-8.
    """
    if calib_features is None:
        zmax = 8.0
    else:
        z = head.normalize(check_features(calib_features, head.d_in, "calib_features"))
        zmax = float(np.abs(z).max()) or 1.0
    z_scale = np.float32(zmax / 127.0)
    W, b, Gw, gb = _active_tables(head)
    w_scale = _sym_scale(W, axis=2)
    g_scale = _sym_scale(Gw, axis=1)
    wq = np.clip(_round_away(W / w_scale[:, :, None]), -127, 127).astype(np.int8)
    gq = np.clip(_round_away(Gw / g_scale[:, None]), -127, 127).astype(np.int8)
    acc_w = (z_scale * w_scale).astype(np.float64)
    acc_g = (z_scale * g_scale).astype(np.float64)
    w_bias = np.clip(_round_away(b / acc_w), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    g_bias = np.clip(_round_away(gb / acc_g), -(2**31) + 1, 2**31 - 1).astype(np.int32)
    return CHeadQuant(float(z_scale), wq, w_scale, w_bias, gq, g_scale, g_bias)


def predict_int8_reference(
    head: ConvexHead, quant: CHeadQuant, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """What ``NAME_predict_i8`` computes, in numpy: ``(logits (n, c) float32, masks (n, Pa) bool)``."""
    z = head.normalize(check_features(x, head.d_in))
    zq = np.clip(_round_away(z * np.float32(1.0 / quant.z_scale)), -127, 127).astype(np.int64)
    masks = (zq @ quant.g.T.astype(np.int64) + quant.g_bias) >= 0  # (n, Pa)
    acc = np.einsum("nd,pcd->npc", zq, quant.w.astype(np.int64)) + quant.w_bias  # (n, Pa, c)
    scale = (np.float32(quant.z_scale) * quant.w_scale).astype(np.float32)
    out = (acc.astype(np.float32) * scale * masks[:, :, None]).sum(axis=1, dtype=np.float32)
    return out.astype(np.float32), masks


# ----------------------------------------------------------------------------- C text
def _f32(v: float) -> str:
    """A C99 hex-float literal of the float32 value: exact, no decimal rounding."""
    mant, _, exp = float(np.float32(v)).hex().partition("p")
    mant = mant.rstrip("0").rstrip(".") if "." in mant else mant
    return f"{mant}p{exp}f"


def _init(a: np.ndarray, fmt, indent: str) -> str:
    if a.ndim == 1:
        flat = [fmt(v) for v in a]
        lines = [", ".join(flat[i : i + _PER_LINE]) for i in range(0, len(flat), _PER_LINE)]
        return "{" + f",\n{indent} ".join(lines) + "}"
    return "{" + f",\n{indent}".join(_init(sub, fmt, indent + " ") for sub in a) + "}"


def _array(ctype: str, name: str, a: np.ndarray, fmt) -> str:
    a = np.asarray(a)
    dims = "".join(f"[{n}]" for n in a.shape)
    return f"static CE_ALIGN16 const {ctype} {name}{dims} =\n{_init(a, fmt, '')};\n"


def _header(head: ConvexHead, quant: CHeadQuant, name: str) -> str:
    W, b, Gw, gb = _active_tables(head)
    up = name.upper()
    pa, c, d_in = W.shape
    spec = head.gate_spec
    gates_from = f"seed {spec.seed}" if spec.kind == "gaussian" else "the head's gate array"
    parts = [
        f"/* {name}.h: a convexedge gated-ReLU head (generated by convexedge.converters.c_head).\n"
        f" * d_in={d_in} features, c={c} outputs, {pa} active of P={head.P} gates ({gates_from}).\n"
        f" * lam={head.lam!r}, group={head.group}. fp32 arrays and int8 arrays with their scales. */\n",
        f"#ifndef {up}_H\n#define {up}_H\n\n#include <stdint.h>\n\n",
        "#ifndef CE_ALIGN16\n"
        "#if defined(__STDC_VERSION__) && __STDC_VERSION__ >= 201112L\n"
        "#include <stdalign.h>\n#define CE_ALIGN16 alignas(16)\n"
        "#elif defined(__GNUC__) || defined(__clang__)\n#define CE_ALIGN16 __attribute__((aligned(16)))\n"
        "#elif defined(_MSC_VER)\n#define CE_ALIGN16 __declspec(align(16))\n"
        "#else\n#define CE_ALIGN16\n#endif\n#endif\n\n",
        f"#define {up}_D_IN {d_in}\n#define {up}_C {c}\n#define {up}_P_ACTIVE {pa}\n\n",
        f"void {name}_predict_f32(const float *x, float *out, uint8_t *masks);\n",
        f"void {name}_predict_i8(const float *x, float *out, uint8_t *masks);\n\n",
        f"#ifdef {up}_DEFINE_WEIGHTS\n",
        f"/* active gate indices in the head: {head._active.tolist()} */\n",  # type: ignore[attr-defined]
        _array("float", f"{name}_mean", head.mean, _f32),  # type: ignore[arg-type]
        _array("float", f"{name}_inv_std", head._inv_std, _f32),  # type: ignore[attr-defined]
        _array("float", f"{name}_gate_w", Gw, _f32),
        _array("float", f"{name}_gate_b", gb, _f32),
        _array("float", f"{name}_w", W, _f32),
        _array("float", f"{name}_b", b, _f32),
        f"static const float {name}_z_inv_scale = {_f32(1.0 / quant.z_scale)};\n",
        f"static const float {name}_z_scale = {_f32(quant.z_scale)};\n",
        _array("int8_t", f"{name}_gate_q", quant.g, str),
        _array("int32_t", f"{name}_gate_bq", quant.g_bias, str),
        _array("int8_t", f"{name}_w_q", quant.w, str),
        _array("int32_t", f"{name}_b_q", quant.w_bias, str),
        _array("float", f"{name}_w_scale", quant.w_scale, _f32),
        f"#endif /* {up}_DEFINE_WEIGHTS */\n#endif /* {up}_H */\n",
    ]
    return "".join(parts)


_SOURCE = """/* {name}.c: the gated-ReLU head kernel (generated by convexedge.converters.c_head; do not edit).
 * Portable C99 (C11 alignas when available); no allocation, no libm. x: d_in floats, out: c floats,
 * masks: P_ACTIVE bytes (may be NULL). */
#define {up}_DEFINE_WEIGHTS
#include "{name}.h"

#define D {up}_D_IN
#define C {up}_C
#define PA {up}_P_ACTIVE

void {name}_predict_f32(const float *x, float *out, uint8_t *masks) {{
    float z[D];
    int i, j, k;
    for (k = 0; k < D; ++k) z[k] = (x[k] - {name}_mean[k]) * {name}_inv_std[k];
    for (j = 0; j < C; ++j) out[j] = 0.0f;
    for (i = 0; i < PA; ++i) {{
        float g = 0.0f;
        for (k = 0; k < D; ++k) g += z[k] * {name}_gate_w[i][k];
        g += {name}_gate_b[i];
        if (masks) masks[i] = (uint8_t)(g >= 0.0f);
        if (!(g >= 0.0f)) continue;
        for (j = 0; j < C; ++j) {{
            float h = 0.0f;
            for (k = 0; k < D; ++k) h += z[k] * {name}_w[i][j][k];
            out[j] += h + {name}_b[i][j];
        }}
    }}
}}

static int8_t {name}_q8(float v) {{
    float r = v >= 0.0f ? v + 0.5f : v - 0.5f; /* round half away from zero, then truncate */
    if (r >= 127.0f) return 127;
    if (r <= -127.0f) return -127;
    return (int8_t)(int32_t)r;
}}

void {name}_predict_i8(const float *x, float *out, uint8_t *masks) {{
    int8_t zq[D];
    int i, j, k;
    for (k = 0; k < D; ++k)
        zq[k] = {name}_q8((x[k] - {name}_mean[k]) * {name}_inv_std[k] * {name}_z_inv_scale);
    for (j = 0; j < C; ++j) out[j] = 0.0f;
    for (i = 0; i < PA; ++i) {{
        int32_t g = {name}_gate_bq[i];
        for (k = 0; k < D; ++k) g += (int32_t)zq[k] * (int32_t){name}_gate_q[i][k];
        if (masks) masks[i] = (uint8_t)(g >= 0);
        if (g < 0) continue;
        for (j = 0; j < C; ++j) {{
            int32_t acc = {name}_b_q[i][j];
            for (k = 0; k < D; ++k) acc += (int32_t)zq[k] * (int32_t){name}_w_q[i][j][k];
            out[j] += (float)acc * ({name}_z_scale * {name}_w_scale[i][j]);
        }}
    }}
}}
"""


def export_c_head(
    head: ConvexHead, out_dir: str | Path, *, name: str = "ce_head", calib_features: np.ndarray | None = None
) -> CHeadFiles:
    """Write ``out_dir/NAME.h`` and ``out_dir/NAME.c`` for ``head``.

    Args:
        head: a :class:`~convexedge.device.ConvexHead`.
        out_dir: folder to write into (created).
        name: C identifier prefix of every symbol.
        calib_features: (n, d_in) raw features setting the int8 input scale (see :func:`quantize_head`).

    Raises:
        ValueError: ``name`` is not a C identifier.
    """
    if not isinstance(head, ConvexHead):
        raise DataError(f"export_c_head needs a ConvexHead, got {type(head).__name__}")
    if not (name.isidentifier() and name.isascii()):
        raise ValueError(f"name must be a C identifier (letters, digits, _), got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quant = quantize_head(head, calib_features)
    header, source = out / f"{name}.h", out / f"{name}.c"
    header.write_text(_header(head, quant, name))
    source.write_text(_SOURCE.format(name=name, up=name.upper()))
    return CHeadFiles(header, source, name, quant)


def find_c_compiler() -> str | None:
    """Path of the system C compiler (``cc``, ``gcc`` or ``clang``), or ``None``."""
    for cc in ("cc", "gcc", "clang"):
        path = shutil.which(cc)
        if path:
            return path
    return None


def compile_c_head(files: CHeadFiles, *, std: str = "c99", cc: str | None = None) -> Path:
    """Compile the kernel into a shared library next to it (``-std=STD -Wall -Wextra -pedantic -Werror``).

    Raises:
        ArtifactError: no compiler, or the compiler rejected the files (its message is included).
    """
    cc = cc or find_c_compiler()
    if cc is None:
        raise ArtifactError("no C compiler found (cc, gcc or clang); install one to build the C head")
    lib = files.source.with_name(f"lib{files.name}_{std}.so")
    cmd = [cc, f"-std={std}", "-O2", "-Wall", "-Wextra", "-pedantic", "-Werror", "-shared", "-fPIC",
           "-o", str(lib), str(files.source)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise ArtifactError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[:2000]}")
    return lib


def run_c_head(
    lib: str | Path, name: str, x: np.ndarray, c: int, p_active: int, variant: str = "f32"
) -> tuple[np.ndarray, np.ndarray]:
    """Run the compiled head on ``x: (n, d_in)`` float32: ``(logits (n, c), masks (n, p_active) bool)``."""
    if variant not in ("f32", "i8"):
        raise ValueError(f"variant must be 'f32' or 'i8', got {variant!r}")
    fn = getattr(ctypes.CDLL(str(lib)), f"{name}_predict_{variant}")
    fptr = ctypes.POINTER(ctypes.c_float)
    fn.argtypes = [fptr, fptr, ctypes.POINTER(ctypes.c_uint8)]
    fn.restype = None
    x = np.ascontiguousarray(x, np.float32)
    out = np.zeros((x.shape[0], c), np.float32)
    masks = np.zeros((x.shape[0], p_active), np.uint8)
    for i in range(x.shape[0]):
        fn(
            x[i].ctypes.data_as(fptr),
            out[i].ctypes.data_as(fptr),
            masks[i].ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)),
        )
    return out, masks.astype(bool)
