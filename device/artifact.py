"""The versioned, checksummed head artifact: one ``.npz`` of arrays plus one JSON manifest.

Layout of a head saved under the stem ``heads/h000003``::

    h000003.npz    arrays, written with numpy (never pickled, read with allow_pickle=False):
                   V (P, d, c) float32, mean (d_in,) float32, std (d_in,) float32,
                   gates (d, P) float32 only when the gate spec is kind "array"
    h000003.json   manifest: format, format_version, created, shapes, dtypes, sha256 of every
                   array's C-order bytes, gate spec, normalisation, lam, group, info (provenance),
                   and optionally an ed25519 signature of the manifest itself

The manifest is written last, so a head whose manifest exists is complete. The signature covers the
canonical JSON of the manifest without its ``signature`` field; the manifest holds the SHA-256 of
every array, so the signature covers the arrays too. Compatibility: a reader accepts exactly
``format_version == FORMAT_VERSION``; any change to the arrays or manifest keys bumps it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from convexedge.device.errors import ArtifactError, DataError, SignatureError
from convexedge.device.gates import GateSpec
from convexedge.device.head import ConvexHead

__all__ = ["FORMAT", "FORMAT_VERSION", "generate_signing_key", "read_head", "write_head"]

FORMAT = "convexedge.head"
FORMAT_VERSION = 1
_FLOAT = "float32"


def _sha256(arr: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()


def _canonical(manifest: dict[str, Any]) -> bytes:
    body = {k: v for k, v in manifest.items() if k != "signature"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _key_bytes(key: bytes | str, what: str) -> bytes:
    raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    if len(raw) != 32:
        raise SignatureError(f"{what} must be 32 raw bytes (or 64 hex characters), got {len(raw)} bytes")
    return raw


def generate_signing_key() -> tuple[bytes, bytes]:
    """A fresh ed25519 ``(signing_key, public_key)`` pair, 32 raw bytes each (needs PyNaCl).

    Raises:
        SignatureError: PyNaCl is not installed (``pip install convexedge[device-sign]``).
    """
    nacl = _nacl()
    sk = nacl.SigningKey.generate()
    return bytes(sk), bytes(sk.verify_key)


def _nacl() -> Any:
    try:
        import nacl.signing
    except ImportError:
        raise SignatureError(
            "signed heads need PyNaCl (ed25519); install it with pip install 'convexedge[device-sign]'"
        ) from None
    return nacl.signing


def _sign(manifest: dict[str, Any], signing_key: bytes | str) -> dict[str, Any]:
    nacl = _nacl()
    sk = nacl.SigningKey(_key_bytes(signing_key, "signing_key"))
    sig = sk.sign(_canonical(manifest)).signature
    return {"alg": "ed25519", "public_key": bytes(sk.verify_key).hex(), "value": sig.hex()}


def _verify(manifest: dict[str, Any], trust: bytes | str, where: str) -> None:
    key = _key_bytes(trust, "trust")
    sig = manifest.get("signature")
    if not isinstance(sig, dict) or sig.get("alg") != "ed25519" or not isinstance(sig.get("value"), str):
        raise SignatureError(
            f"{where}: the store trusts a public key, but the head carries no ed25519 signature"
        )
    nacl = _nacl()
    from nacl.exceptions import BadSignatureError

    try:
        nacl.VerifyKey(key).verify(_canonical(manifest), bytes.fromhex(sig["value"]))
    except (BadSignatureError, ValueError):
        raise SignatureError(f"{where}: ed25519 signature does not verify against the trusted key") from None


def _fsync_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary file, fsync, rename, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """fsync a directory so a rename inside it is durable (a no-op where the OS refuses)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _arrays(head: ConvexHead) -> dict[str, np.ndarray]:
    arrays = {"V": head.V, "mean": head.mean, "std": head.std}
    if head.gate_spec.kind == "array":
        arrays["gates"] = head.gates
    return arrays  # type: ignore[return-value]


def write_head(head: ConvexHead, stem: str | Path, *, signing_key: bytes | str | None = None) -> Path:
    """Save ``head`` as ``<stem>.npz`` + ``<stem>.json`` (each atomically; the manifest last).

    Args:
        head: the head.
        stem: path without suffix, e.g. ``heads/h000003``.
        signing_key: optional 32-byte ed25519 seed; signs the manifest (needs PyNaCl).

    Returns:
        The manifest path.
    """
    stem = Path(stem)
    arrays = _arrays(head)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "arrays": {
            k: {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": _sha256(a)}
            for k, a in arrays.items()
        },
        "gates": head.gate_spec.to_dict(),
        "normalization": {"kind": "standardize", "mean": "array:mean", "std": "array:std"},
        "lam": head.lam,
        "group": head.group,
        "outputs": head.c,
        "info": head.info,
    }
    try:
        json.dumps(manifest)
    except TypeError as exc:
        raise DataError(f"head.info must be JSON-serialisable ({exc})") from None
    if signing_key is not None:
        manifest["signature"] = _sign(manifest, signing_key)
    _fsync_write(stem.with_suffix(".npz"), buf.getvalue())
    json_path = stem.with_suffix(".json")
    _fsync_write(json_path, json.dumps(manifest, indent=1).encode())
    return json_path


def _expect(cond: bool, where: str, msg: str) -> None:
    if not cond:
        raise ArtifactError(f"{where}: {msg}")


def read_head(stem: str | Path, *, trust: bytes | str | None = None) -> ConvexHead:
    """Load and verify the head saved under ``stem`` (see the module docstring).

    Checks, in order: manifest present and valid JSON, format and version, signature (when
    ``trust`` is a public key), the npz readable and not truncated, the set of arrays, every
    array's shape, dtype and SHA-256, finite values, and shapes consistent with the gate spec.

    Args:
        stem: path without suffix.
        trust: a 32-byte ed25519 public key (raw or hex); ``None`` checks checksums only.

    Raises:
        ArtifactError: anything is off (one message naming the file and the problem).
        SignatureError: ``trust`` is given and the signature is missing or wrong.
    """
    stem = Path(stem)
    jpath, npath = stem.with_suffix(".json"), stem.with_suffix(".npz")
    where = str(jpath)
    try:
        manifest = json.loads(jpath.read_bytes())
    except FileNotFoundError:
        raise ArtifactError(f"{where}: manifest not found (an unfinished or deleted head)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(
            f"{where}: manifest is not valid JSON ({exc}); the file is truncated or corrupt"
        ) from None
    _expect(isinstance(manifest, dict), where, "manifest must be a JSON object")
    _expect(
        manifest.get("format") == FORMAT and manifest.get("format_version") == FORMAT_VERSION,
        where,
        f"expected format {FORMAT!r} version {FORMAT_VERSION}, got {manifest.get('format')!r} version "
        f"{manifest.get('format_version')!r}; re-export the head with this convexedge version",
    )
    if trust is not None:
        _verify(manifest, trust, where)
    try:
        spec = GateSpec(**manifest["gates"])
        specs = manifest["arrays"]
        lam, group, info = manifest["lam"], manifest["group"], manifest.get("info", {})
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: manifest is missing or has a malformed field ({exc})") from None
    try:
        with np.load(npath, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise ArtifactError(f"{npath}: arrays file not found") from None
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise ArtifactError(f"{npath}: unreadable or truncated npz ({exc})") from None
    want = {"V", "mean", "std"} | ({"gates"} if spec.kind == "array" else set())
    _expect(set(specs) == want, where, f"manifest lists arrays {sorted(specs)}, expected {sorted(want)}")
    _expect(
        set(arrays) == want,
        str(npath),
        f"holds arrays {sorted(arrays)}, expected {sorted(want)} (missing or extra arrays)",
    )
    d_in, c = spec.d - 1, manifest.get("outputs")
    shapes = {"V": [spec.P, spec.d, c], "mean": [d_in], "std": [d_in], "gates": [spec.d, spec.P]}
    for key, arr in arrays.items():
        meta = specs[key]
        _expect(
            list(arr.shape) == meta.get("shape") == shapes[key],
            str(npath),
            f"array {key!r} has shape {list(arr.shape)}, manifest says {meta.get('shape')}, gate spec "
            f"and outputs imply {shapes[key]}",
        )
        _expect(
            str(arr.dtype) == meta.get("dtype") == _FLOAT,
            str(npath),
            f"array {key!r} has dtype {arr.dtype}, manifest says {meta.get('dtype')}, expected {_FLOAT}",
        )
        _expect(
            _sha256(arr) == meta.get("sha256"),
            str(npath),
            f"SHA-256 of array {key!r} does not match the manifest (tampered or corrupt file)",
        )
        _expect(bool(np.isfinite(arr).all()), str(npath), f"array {key!r} holds NaN/Inf values")
    try:
        return ConvexHead(
            V=arrays["V"], gate_spec=spec, gates=arrays.get("gates"), mean=arrays["mean"],
            std=arrays["std"], lam=lam, group=group, info=info,
        )  # fmt: skip
    except (DataError, ValueError) as exc:
        raise ArtifactError(f"{where}: the arrays do not form a valid head ({exc})") from None
