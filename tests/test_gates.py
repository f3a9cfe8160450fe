"""Tests of convexedge.host.gates: seeded reproducibility, the linear gate, masks against numpy
(hypothesis), and GateSpec validation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.host.gates import GateSpec, gate_masks, sample_gates


def test_sample_gates_reproducible_from_seed():
    spec = GateSpec(d=17, P=6, seed=3)
    G1, G2 = sample_gates(spec), sample_gates(GateSpec(d=17, P=6, seed=3))
    assert G1.shape == (17, 6) and G1.dtype == np.float32
    np.testing.assert_array_equal(G1, G2)
    # The documented recipe: PCG64 standard normals, gate 0 zeroed. A device regenerates from it.
    ref = np.random.Generator(np.random.PCG64(3)).standard_normal((17, 6)).astype(np.float32)
    np.testing.assert_array_equal(G1[:, 1:], ref[:, 1:])


def test_sample_gates_differs_across_seeds():
    G0 = sample_gates(GateSpec(d=10, P=5, seed=0))
    G1 = sample_gates(GateSpec(d=10, P=5, seed=1))
    assert not np.array_equal(G0[:, 1:], G1[:, 1:])


def test_linear_gate_is_zero_and_always_on():
    G = sample_gates(GateSpec(d=9, P=4, seed=0, linear_gate=True))
    assert np.all(G[:, 0] == 0)
    assert np.all(np.abs(G[:, 1:]).sum(0) > 0)
    Z = torch.randn(50, 9, generator=torch.Generator().manual_seed(0))
    masks = gate_masks(Z, torch.from_numpy(G))
    assert bool(masks[:, 0].all())


def test_without_linear_gate_gate0_is_random():
    spec = GateSpec(d=9, P=4, seed=0, linear_gate=False)
    G = sample_gates(spec)
    assert np.abs(G[:, 0]).sum() > 0
    ref = np.random.Generator(np.random.PCG64(0)).standard_normal((9, 4)).astype(np.float32)
    np.testing.assert_array_equal(G, ref)


def test_gate_masks_dtype_promotion():
    Z = torch.randn(20, 4, dtype=torch.float64)
    G = torch.randn(4, 3, dtype=torch.float32)
    masks = gate_masks(Z, G)
    assert masks.dtype == torch.bool and masks.shape == (20, 3)
    np.testing.assert_array_equal(masks.numpy(), Z.numpy() @ G.double().numpy() >= 0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), d=st.integers(1, 12), P=st.integers(1, 8), seed=st.integers(0, 2**31))
def test_gate_masks_equal_numpy(n, d, P, seed):
    rng = np.random.default_rng(seed)
    Z = rng.standard_normal((n, d))
    G = rng.standard_normal((d, P))
    masks = gate_masks(torch.from_numpy(Z), torch.from_numpy(G))
    assert masks.dtype == torch.bool and tuple(masks.shape) == (n, P)
    np.testing.assert_array_equal(masks.numpy(), Z @ G >= 0)


def test_spec_to_dict_is_json_round_trippable():
    spec = GateSpec(kind="gaussian", d=5, P=2, seed=7, linear_gate=False)
    d = json.loads(json.dumps(spec.to_dict()))
    assert d == {"kind": "gaussian", "d": 5, "P": 2, "seed": 7, "linear_gate": False}
    assert GateSpec(**d) == spec


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"kind": "uniform", "d": 3, "P": 2}, "gate kind must be 'gaussian' or 'array'"),
        ({"d": 1, "P": 2}, r"gates need d >= 2 \(features \+ bias\) and P >= 1, got d=1, P=2"),
        ({"d": 3, "P": 0}, r"gates need d >= 2 \(features \+ bias\) and P >= 1, got d=3, P=0"),
        ({"d": 3, "P": 2, "seed": -1}, "gate seed must be >= 0"),
    ],
)
def test_spec_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GateSpec(**kwargs)


def test_spec_requires_keywords():
    with pytest.raises(TypeError):
        GateSpec("gaussian", 3, 2)  # kw_only


def test_array_spec_cannot_be_sampled():
    with pytest.raises(ValueError, match="only Gaussian gates can be sampled"):
        sample_gates(GateSpec(kind="array", d=3, P=2))
