"""Head artifact and store: round trip, bad-file corpus, signatures, commit/rollback/confirm, kill test."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from convexedge.device import (
    ArtifactError,
    ConvexHead,
    GateSpec,
    HeadStore,
    SignatureError,
    read_head,
    write_head,
)


def _head(seed=0, kind="gaussian"):
    rng = np.random.default_rng(seed)
    spec = GateSpec(d=9, P=3, seed=seed, kind=kind)
    gates = rng.standard_normal((9, 3)).astype(np.float32) if kind == "array" else None
    return ConvexHead(
        V=rng.standard_normal((3, 9, 4)).astype(np.float32), gate_spec=spec, gates=gates,
        mean=rng.standard_normal(8).astype(np.float32), std=np.full(8, 2.0, np.float32), lam=0.01,
        info={"teacher": "resnet20", "seed": seed},
    )  # fmt: skip


def _same(a, b):
    return all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("V", "gates", "mean", "std"))


@pytest.mark.parametrize("kind", ["gaussian", "array"])
def test_round_trip(tmp_path, kind):
    head = _head(kind=kind)
    write_head(head, tmp_path / "h")
    back = read_head(tmp_path / "h")
    assert _same(head, back) and back.lam == head.lam and back.info == head.info
    with np.load(tmp_path / "h.npz", allow_pickle=False) as npz:
        assert ("gates" in npz.files) == (kind == "array")  # seeded gates are not stored


# ---------------------------------------------------------------------------- bad files
def _rewrite_manifest(stem, fn):
    m = json.loads(stem.with_suffix(".json").read_text())
    fn(m)
    stem.with_suffix(".json").write_text(json.dumps(m))


def _rewrite_array(stem, key, value, fix_sha=False):
    with np.load(stem.with_suffix(".npz"), allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays[key] = value
    np.savez(stem.with_suffix(".npz"), **arrays)
    if fix_sha:
        import hashlib

        sha = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
        _rewrite_manifest(stem, lambda m: m["arrays"][key].update(sha256=sha))


def _truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


CORRUPTIONS = {
    "missing manifest": (lambda s: s.with_suffix(".json").unlink(), "manifest not found"),
    "missing arrays": (lambda s: s.with_suffix(".npz").unlink(), "arrays file not found"),
    "truncated npz": (lambda s: _truncate(s.with_suffix(".npz")), "unreadable or truncated"),
    "truncated manifest": (lambda s: _truncate(s.with_suffix(".json")), "not valid JSON"),
    "wrong version": (lambda s: _rewrite_manifest(s, lambda m: m.update(format_version=99)), "version 99"),
    "wrong format": (lambda s: _rewrite_manifest(s, lambda m: m.update(format="onnx")), "expected format"),
    "not an object": (lambda s: s.with_suffix(".json").write_text("[1, 2]"), "JSON object"),
    "missing field": (lambda s: _rewrite_manifest(s, lambda m: m.pop("gates")), "malformed field"),
    "tampered array": (
        lambda s: _rewrite_array(s, "V", np.zeros((3, 9, 4), np.float32)),
        "SHA-256 of array 'V'",
    ),
    "wrong shape": (lambda s: _rewrite_array(s, "V", np.zeros((3, 9, 5), np.float32), True), "has shape"),
    "wrong dtype": (lambda s: _rewrite_array(s, "V", np.zeros((3, 9, 4), np.float64), True), "has dtype"),
    "NaN values": (lambda s: _rewrite_array(s, "V", np.full((3, 9, 4), np.nan, np.float32), True), "NaN/Inf"),
    "extra array": (
        lambda s: _rewrite_array(s, "evil", np.zeros(2, np.float32)),
        "missing or extra arrays",
    ),
    "manifest shape lies": (
        lambda s: _rewrite_manifest(s, lambda m: m["arrays"]["V"].update(shape=[3, 9, 5])),
        "has shape",
    ),
    "bad std": (
        lambda s: _rewrite_array(s, "std", np.zeros(8, np.float32), True),
        "do not form a valid head",
    ),
    "pickle inside": (
        lambda s: np.savez(s.with_suffix(".npz"), V=np.array([object()], dtype=object)),
        "unreadable or truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_files_are_refused_with_one_clear_error(tmp_path, case):
    corrupt, match = CORRUPTIONS[case]
    stem = tmp_path / "h"
    write_head(_head(), stem)
    corrupt(stem)
    with pytest.raises(ArtifactError, match=match):
        read_head(stem)


def test_non_json_info_is_refused(tmp_path):
    head = ConvexHead(V=np.zeros((3, 9, 4), np.float32), gate_spec=GateSpec(d=9, P=3), info={"f": object()})
    from convexedge.device import DataError

    with pytest.raises(DataError, match="JSON-serialisable"):
        write_head(head, tmp_path / "h")


# ---------------------------------------------------------------------------- signatures
def test_signed_heads_verify_and_tampering_is_caught(tmp_path):
    pytest.importorskip("nacl.signing")
    from convexedge.device import generate_signing_key

    sk, pk = generate_signing_key()
    stem = tmp_path / "h"
    write_head(_head(), stem, signing_key=sk)
    assert _same(read_head(stem, trust=pk), _head())
    assert _same(read_head(stem, trust=pk.hex()), _head())
    _, other = generate_signing_key()
    with pytest.raises(SignatureError, match="does not verify"):
        read_head(stem, trust=other)
    _rewrite_manifest(stem, lambda m: m.update(lam=0.5))  # a manifest edit breaks the signature
    with pytest.raises(SignatureError, match="does not verify"):
        read_head(stem, trust=pk)
    write_head(_head(), stem)  # unsigned
    with pytest.raises(SignatureError, match="carries no ed25519 signature"):
        read_head(stem, trust=pk)
    with pytest.raises(SignatureError, match="32 raw bytes"):
        read_head(stem, trust=b"short")


def test_signed_store_needs_a_signing_key_to_commit(tmp_path):
    pytest.importorskip("nacl.signing")
    from convexedge.device import generate_signing_key

    sk, pk = generate_signing_key()
    with pytest.raises(ArtifactError, match="pass signing_key"):
        HeadStore.create(tmp_path / "s", _head(), trust=pk)
    HeadStore.create(tmp_path / "s", _head(), trust=pk, signing_key=sk)
    store = HeadStore.open(tmp_path / "s", trust=pk)
    with pytest.raises(ArtifactError, match="pass signing_key"):
        store.commit(_head(1))
    store = HeadStore.open(tmp_path / "s", trust=pk, signing_key=sk)
    store.commit(_head(1))
    assert _same(HeadStore.open(tmp_path / "s", trust=pk).head, _head(1))


def test_signing_without_pynacl_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "nacl", None)
    monkeypatch.setitem(sys.modules, "nacl.signing", None)
    with pytest.raises(SignatureError, match="device-sign"):
        write_head(_head(), tmp_path / "h", signing_key=b"\x01" * 32)


# ---------------------------------------------------------------------------- store
def test_commit_rollback_confirm(tmp_path):
    root = tmp_path / "heads"
    store = HeadStore.create(root, _head(0))
    assert store.confirmed and store.previous is None
    s2 = store.commit(_head(1))
    assert store.current == s2 and not store.confirmed and _same(store.head, _head(1))
    assert _same(HeadStore.open(root).head, _head(1))
    back = store.rollback()
    assert _same(back, _head(0)) and store.previous is None
    assert _same(HeadStore.open(root).head, _head(0))
    with pytest.raises(ArtifactError, match="no previous head"):
        store.rollback()
    store.commit(_head(2))
    store.confirm()
    store.commit(_head(3))  # previous is now the confirmed head 2
    assert _same(store.load(store.previous), _head(2))
    # only the current and previous heads stay on disk
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["STATE.json", f"{store.current}.npz", f"{store.current}.json", f"{store.previous}.npz",
         f"{store.previous}.json"]
    )  # fmt: skip


def test_unconfirmed_commit_keeps_the_last_confirmed_head_as_previous(tmp_path):
    store = HeadStore.create(tmp_path / "s", _head(0))
    store.commit(_head(1))
    store.commit(_head(2))  # head 1 was never confirmed
    assert _same(store.load(store.previous), _head(0))
    reopened = HeadStore.open(tmp_path / "s", on_unconfirmed="rollback")  # boot-slot behaviour
    assert _same(reopened.head, _head(0)) and reopened.confirmed


def test_store_open_errors(tmp_path):
    with pytest.raises(ArtifactError, match="not a head store"):
        HeadStore.open(tmp_path)
    HeadStore.create(tmp_path / "s", _head())
    with pytest.raises(ArtifactError, match="already holds a head store"):
        HeadStore.create(tmp_path / "s", _head())
    (tmp_path / "s" / "STATE.json").write_text("{")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        HeadStore.open(tmp_path / "s")
    (tmp_path / "s" / "STATE.json").write_text(json.dumps({"format": "x"}))
    with pytest.raises(ArtifactError, match="expected convexedge.headstore"):
        HeadStore.open(tmp_path / "s")
    with pytest.raises(ValueError, match="on_unconfirmed must be"):
        HeadStore.open(tmp_path / "s", on_unconfirmed="maybe")


def test_load_refuses_odd_slot_names(tmp_path):
    store = HeadStore.create(tmp_path / "s", _head())
    with pytest.raises(ArtifactError, match="not a head slot name"):
        store.load("../etc/passwd")


def test_open_sweeps_leftovers_of_a_crashed_commit(tmp_path):
    store = HeadStore.create(tmp_path / "s", _head())
    (tmp_path / "s" / "h000009.npz.tmp").write_bytes(b"partial")
    (tmp_path / "s" / "h000009.npz").write_bytes(b"orphan")
    HeadStore.open(tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["STATE.json", "h000001.json", "h000001.npz"]
    assert store.nbytes_on_disk() > 0


# ---------------------------------------------------------------------------- kill test
_WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from convexedge.device import ConvexHead, GateSpec, HeadStore
    store = HeadStore.open(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        V = rng.standard_normal((8, 129, 10)).astype(np.float32)
        store.commit(ConvexHead(V=V, gate_spec=GateSpec(d=129, P=8, seed=0), lam=0.01))
        if rng.random() < 0.3:
            store.confirm()
        if rng.random() < 0.1 and store.previous is not None:
            store.rollback()
    """
)


def _kill_loop(tmp_path, kills):
    root = tmp_path / "heads"
    HeadStore.create(root, ConvexHead(V=np.zeros((8, 129, 10), np.float32), gate_spec=GateSpec(d=129, P=8)))
    rng = np.random.default_rng(0)
    survived, generations = 0, []
    for k in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(root), str(k)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        line = proc.stdout.readline().strip()
        if line != b"ready":
            proc.kill()
            raise AssertionError(
                f"writer {k} did not start (rc {proc.wait()}): {proc.stderr.read().decode()}"
            )
        time.sleep(float(rng.uniform(0.0, 0.15)))  # die at a random point of a commit
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        store = HeadStore.open(root)  # raises if the crash left no loadable head
        assert store.head.V.shape == (8, 129, 10) and np.isfinite(store.head.V).all()
        generations.append(store.generation)
        survived += 1
    return survived, generations


def test_kill_during_commits_always_leaves_a_loadable_head(tmp_path):
    survived, gens = _kill_loop(tmp_path, 50)
    assert survived == 50
    assert gens[-1] > 20  # the writers really committed between kills


@pytest.mark.slow
def test_kill_during_commits_1000_times(tmp_path):
    survived, _ = _kill_loop(tmp_path, 1000)
    print(f"survived {survived} SIGKILLs")
    assert survived == 1000
