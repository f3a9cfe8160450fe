"""Device head: gates from the seed match the host, predict matches the math, input validation."""

import numpy as np
import pytest

from convexedge.device import ConvexHead, DataError, GateSpec, sample_gates


def _head(seed=0, d_in=6, P=4, c=3, kind="gaussian"):
    rng = np.random.default_rng(seed)
    spec = GateSpec(d=d_in + 1, P=P, seed=seed, kind=kind)
    gates = rng.standard_normal((d_in + 1, P)).astype(np.float32) if kind == "array" else None
    V = rng.standard_normal((P, d_in + 1, c)).astype(np.float32)
    mean = rng.standard_normal(d_in).astype(np.float32)
    std = (rng.random(d_in) + 0.5).astype(np.float32)
    return ConvexHead(V=V, gate_spec=spec, gates=gates, mean=mean, std=std, lam=0.1)


def test_gates_from_seed_match_the_host_bit_for_bit():
    host_gates = pytest.importorskip("convexedge.host.gates")
    for seed, d, P, lin in [(0, 129, 8, True), (3, 513, 16, True), (7, 5, 2, False)]:
        host = host_gates.sample_gates(host_gates.GateSpec(d=d, P=P, seed=seed, linear_gate=lin))
        dev = sample_gates(GateSpec(d=d, P=P, seed=seed, linear_gate=lin))
        assert dev.dtype == np.float32 and np.array_equal(host, dev)


def test_predict_matches_the_gated_relu_formula():
    head = _head()
    x = np.random.default_rng(1).standard_normal((20, 6))
    z = (x - head.mean) / head.std
    z1 = np.concatenate([z, np.ones((20, 1))], axis=1)
    want = sum(((z1 @ head.gates[:, i]) >= 0)[:, None] * (z1 @ head.V[i]) for i in range(head.P))
    np.testing.assert_allclose(head.predict(x), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(head.predict(x[0]), want[:1], rtol=1e-4, atol=1e-4)


def test_predict_matches_the_torch_student():
    torch = pytest.importorskip("torch")
    from convexedge.host.students import GatedMLPStudent

    head = _head(seed=2)  # identity normalisation below: feed standardised features to both
    x = np.random.default_rng(3).standard_normal((16, 6)).astype(np.float32)
    z = ((x - head.mean) / head.std).astype(np.float32)
    student = GatedMLPStudent(head.V.copy(), head.gates.copy(), drop_inactive=False)
    with torch.no_grad():
        want = student(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(head.predict(x), want, rtol=1e-4, atol=1e-4)


def test_pruned_gates_cost_nothing_and_predict_is_unchanged():
    head = _head()
    V = head.V.copy()
    V[2] = 0
    pruned = head.replace_weights(V)
    x = np.random.default_rng(4).standard_normal((5, 6))
    assert pruned.active_gates == head.P - 1
    z1 = np.concatenate([(x - head.mean) / head.std, np.ones((5, 1))], axis=1)
    want = sum(((z1 @ head.gates[:, i]) >= 0)[:, None] * (z1 @ V[i]) for i in range(head.P))
    np.testing.assert_allclose(pruned.predict(x), want, rtol=1e-4, atol=1e-4)


def test_head_arrays_are_read_only():
    head = _head()
    with pytest.raises(ValueError, match="read-only"):
        head.V[0, 0, 0] = 1.0


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((3, 5)), r"shape \(n, 6\)"),
        (np.zeros((2, 3, 6)), r"shape \(n, 6\)"),
        (np.zeros((0, 6)), "empty"),
        (np.full((2, 6), np.nan), "NaN/Inf"),
        (np.array([[np.inf] * 6]), "NaN/Inf"),
        (np.full((2, 6), 1e39), "NaN/Inf"),  # overflows float32
        (np.zeros((2, 6), bool), "real numbers"),
        (np.zeros((2, 6), complex), "real numbers"),
        (np.array([["a"] * 6]), "real numbers"),
    ],
)
def test_predict_refuses_bad_input(x, match):
    with pytest.raises(DataError, match=match):
        _head().predict(x)


def test_predict_accepts_ints_and_float64():
    head = _head()
    a = head.predict(np.ones((2, 6), np.int64))
    b = head.predict(np.ones((2, 6), np.float64))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"V": np.zeros((4, 6, 3), np.float32)}, DataError, r"V must have shape \(P, d, c\)"),
        ({"V": np.full((4, 7, 3), np.nan, np.float32)}, DataError, "finite floats"),
        ({"gates": np.zeros((7, 3), np.float32)}, DataError, "gates must be float"),
        ({"gates": np.full((7, 4), np.inf, np.float32)}, DataError, "gates hold NaN"),
        ({"std": np.zeros(6, np.float32)}, DataError, "std finite and > 0"),
        ({"mean": np.zeros(5, np.float32)}, DataError, r"shape \(6,\)"),
        ({"lam": -1.0}, ValueError, "lam must be"),
        ({"group": "neuron"}, ValueError, "group must be"),
        ({"gate_spec": "seed 0"}, ValueError, "gate_spec must be a GateSpec"),
    ],
)
def test_head_construction_errors(kwargs, err, match):
    base = {"V": np.zeros((4, 7, 3), np.float32), "gate_spec": GateSpec(d=7, P=4)}
    with pytest.raises(err, match=match):
        ConvexHead(**{**base, **kwargs})


def test_array_gates_must_be_given():
    with pytest.raises(DataError, match="needs the gates array"):
        ConvexHead(V=np.zeros((4, 7, 3), np.float32), gate_spec=GateSpec(d=7, P=4, kind="array"))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "uniform"}, "gate kind"),
        ({"d": 1}, "d >= 2"),
        ({"P": 0}, "P >= 1"),
        ({"seed": -1}, "seed must be >= 0"),
        ({"seed": 1.5}, "must be an int"),
        ({"linear_gate": 1}, "linear_gate must be a bool"),
    ],
)
def test_gate_spec_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateSpec(**{"d": 5, "P": 2, **kwargs})


def test_sample_gates_refuses_array_specs():
    with pytest.raises(ValueError, match="only Gaussian gates"):
        sample_gates(GateSpec(d=5, P=2, kind="array"))


def test_replace_weights_adopts_a_read_only_array_and_copies_a_writable_one():
    head = _head()
    V = np.ascontiguousarray(np.asarray(head.V) * 2, dtype=np.float32)
    writable = head.replace_weights(V)
    assert writable.V is not V and not np.shares_memory(writable.V, V)
    V[...] = 0  # the caller's later writes never reach the head
    assert np.asarray(writable.V).any()
    handed = np.ascontiguousarray(np.asarray(head.V) * 3, dtype=np.float32)
    handed.flags.writeable = False
    adopted = head.replace_weights(handed)
    assert adopted.V is handed  # no 41 KB copy on a device
    x = np.ones((2, head.d_in), np.float32)
    np.testing.assert_allclose(adopted.predict(x), 3 * head.predict(x), rtol=1e-5, atol=1e-6)
