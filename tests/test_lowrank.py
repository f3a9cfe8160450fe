"""Tests of convexedge.host.lowrank and the factored student: the neuron decomposition is exact,
the factored module equals the unfactored one, the refit never fits worse than plain truncation,
the selection respects its tolerance, and the saved artifact round-trips with its checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import ArtifactError, DataError
from convexedge.host.distill import build_conv_problem, load_student, make_gates, save_lowrank_student
from convexedge.host.lowrank import LowRankConfig, _loss, factorize, neurons_of
from convexedge.host.solvers import GatedProblem
from convexedge.host.students import ConvGeometry, GatedConvStudent, LowRankGatedConvStudent

GEOM = ConvGeometry(in_channels=3, kernel_size=3, stride=1, padding=1)


def _problem(seed: int, n_img: int = 24, P: int = 4, c: int = 6, rank: int = 2, noise: float = 0.05):
    """Conv data whose targets come from a gated network of ``rank`` neurons per gate."""
    rng = np.random.default_rng(seed)
    _, G = make_gates(GEOM.d, P, seed)
    A = rng.standard_normal((P, GEOM.d, rank)) / np.sqrt(GEOM.d)
    B = rng.standard_normal((P, rank, c))
    V = np.einsum("pdr,prc->pdc", A, B).astype(np.float32)
    teacher = GatedConvStudent(V, G, GEOM, drop_inactive=False)

    def data(n):
        z = torch.from_numpy(rng.standard_normal((n, 3, 5, 5)).astype(np.float32))
        with torch.no_grad():
            y = teacher(z)
        y = y + noise * torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
        return z.numpy(), y.numpy()

    (zi, zo), (vi, vo) = data(n_img), data(n_img // 2)
    return (
        build_conv_problem(zi, zo, GEOM, G, dtype="float64"),
        build_conv_problem(vi, vo, GEOM, G, dtype="float64"),
        torch.from_numpy(V).double(),
        G,
    )


def test_neurons_reconstruct_every_gate():
    V = torch.randn(5, 7, 3, dtype=torch.float64)
    V[2] = 0  # an inactive gate has no neurons
    A, W, gate_of = neurons_of(V)
    assert A.shape[1] == W.shape[0] == gate_of.shape[0] == 4 * 3
    assert 2 not in gate_of.tolist()
    for i in range(5):
        sel = gate_of == i
        torch.testing.assert_close(A[:, sel] @ W[sel], V[i], atol=1e-12, rtol=0)
    s = A.norm(dim=0)  # |a_j| = s_j: largest first
    assert bool((s[:-1] >= s[1:] - 1e-12).all())


def test_factored_module_equals_unfactored():
    _, G = make_gates(GEOM.d, 4, 0)
    V = torch.randn(4, GEOM.d, 5)
    A, W, gate_of = neurons_of(V)
    full = GatedConvStudent(V, G, GEOM, output_relu=True)
    lr = LowRankGatedConvStudent(A, W, G, gate_of, GEOM, output_relu=True)
    z = torch.randn(3, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(lr(z), full(z), atol=1e-4, rtol=1e-4)
    assert lr.num_neurons == 4 * 5 and lr.num_gates == 4
    assert lr.num_parameters(count_gates=False) == A.numel() + W.numel()
    assert lr.num_parameters() == A.numel() + W.numel() + G.size
    A2, W2, G2, g2 = lr.factors()
    torch.testing.assert_close(A2, A.float()) and torch.testing.assert_close(W2, W.float())
    torch.testing.assert_close(G2, torch.from_numpy(G).float()[:, g2.unique()])


def test_unused_gates_are_dropped():
    _, G = make_gates(GEOM.d, 6, 0)
    A, W = torch.randn(GEOM.d, 3), torch.randn(3, 2)
    lr = LowRankGatedConvStudent(A, W, G, [5, 1, 5], GEOM)
    assert lr.num_gates == 2 and lr.gate_index.tolist() == [1, 5]
    # the same network as a full student whose gate i holds the neurons of gate i
    V = torch.zeros(6, GEOM.d, 2)
    for j, i in enumerate([5, 1, 5]):
        V[i] += torch.outer(A[:, j], W[j])
    z = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(lr(z), GatedConvStudent(V, G, GEOM)(z), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "args",
    [
        dict(A=torch.randn(5, 3), W=torch.randn(3, 2), gate_of=[0, 0, 0]),  # wrong d
        dict(A=torch.randn(GEOM.d, 3), W=torch.randn(4, 2), gate_of=[0, 0, 0]),  # R mismatch
        dict(A=torch.randn(GEOM.d, 3), W=torch.randn(3, 2), gate_of=[0, 9, 0]),  # gate out of range
    ],
)
def test_bad_factors_are_refused(args):
    _, G = make_gates(GEOM.d, 2, 0)
    with pytest.raises(ValueError):
        LowRankGatedConvStudent(args["A"], args["W"], G, args["gate_of"], GEOM)


def test_factorize_finds_the_low_rank_network():
    prob, val, V, _ = _problem(0)
    res = factorize(prob, val, V, LowRankConfig(tolerance=0.02))
    assert res.accepted
    assert res.val_loss <= 1.02 * res.val_loss_full
    assert res.neurons <= 4 * 2 <= 4 * prob.c  # the planted network has 2 neurons per gate
    Rs = [r for r, _ in res.candidates]
    assert Rs == sorted(Rs) and Rs[-1] == res.neurons


def test_factorize_zero_tolerance_never_beats_its_limit():
    prob, val, V, _ = _problem(1, noise=0.5)
    res = factorize(prob, val, V + 0.3 * torch.randn_like(V), LowRankConfig(tolerance=0.0))
    if res.accepted:
        assert res.val_loss <= res.val_loss_full
    else:  # no candidate within the limit: the best one is returned and flagged
        assert res.val_loss == min(loss for _, loss in res.candidates)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), R=st.integers(1, 12))
def test_refit_fits_no_worse_than_truncation(seed, R):
    """The refitted second layer is the least-squares one: its fitting loss is at most that of the
    plain SVD truncation (same first layer)."""
    prob, val, V, _ = _problem(seed % 50, n_img=12, noise=0.3)
    V = V + 0.2 * torch.from_numpy(np.random.default_rng(seed).standard_normal(V.shape))
    A, W, g = neurons_of(V)
    res = factorize(prob, val, V, LowRankConfig(neurons=(R,), tolerance=1e9, ridge=0.0))
    R = res.neurons
    assert _loss(prob, res.A, res.W, res.gate_of) <= _loss(prob, A[:, :R], W[:R], g[:R]) * (1 + 1e-9) + 1e-12


def test_factorize_errors():
    prob, val, V, _ = _problem(2)
    with pytest.raises(DataError, match="all zero"):
        factorize(prob, val, torch.zeros_like(V))
    with pytest.raises(DataError, match=r"\(P, d, c\)"):
        factorize(prob, val, V[:, :-1])
    other = GatedProblem.from_arrays(val.Z, val.Y[:, :2], val.masks, dtype="float64")
    with pytest.raises(DataError, match="held-out"):
        factorize(prob, other, V)
    with pytest.raises(ValueError):
        LowRankConfig(tolerance=-1)
    with pytest.raises(ValueError):
        LowRankConfig(neurons=(0,))


def test_saved_lowrank_student_round_trips(tmp_path):
    prob, val, V, G = _problem(3)
    res = factorize(prob, val, V)
    st_ = LowRankGatedConvStudent(res.A, res.W, G, res.gate_of, GEOM, output_relu=True)
    save_lowrank_student(str(tmp_path), "student", st_, {"span": "layer3"})
    back, manifest = load_student(str(tmp_path))
    assert isinstance(back, LowRankGatedConvStudent) and manifest["kind"] == "gated_conv_lowrank"
    z = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(back(z), st_(z))
    with np.load(tmp_path / "student.npz", allow_pickle=False) as npz:
        assert npz["gate_of"].dtype == np.int32 and npz["A"].dtype == np.float32


def test_tampered_or_unknown_lowrank_artifact_is_refused(tmp_path):
    prob, val, V, G = _problem(4)
    res = factorize(prob, val, V)
    st_ = LowRankGatedConvStudent(res.A, res.W, G, res.gate_of, GEOM)
    save_lowrank_student(str(tmp_path), "student", st_, {})
    with np.load(tmp_path / "student.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["W"] = arrays["W"] + 1
    np.savez(tmp_path / "student.npz", **arrays)
    with pytest.raises(ArtifactError, match="SHA-256 of W"):
        load_student(str(tmp_path))
    manifest = json.loads((tmp_path / "student.json").read_text())
    manifest["kind"] = "mystery"
    (tmp_path / "student.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="unknown student kind"):
        load_student(str(tmp_path))


def test_chain_round_trips_and_counts(tmp_path):
    from convexedge.host.distill import save_chain_student
    from convexedge.host.students import StudentChain

    prob, val, V, G = _problem(5)
    res = factorize(prob, val, V)
    geom2 = ConvGeometry(in_channels=6, kernel_size=3, stride=2, padding=1)
    _, G2 = make_gates(geom2.d, 2, 1)
    first = LowRankGatedConvStudent(res.A, res.W, G, res.gate_of, GEOM, output_relu=True)
    second = GatedConvStudent(torch.randn(2, geom2.d, 4), G2, geom2)
    chain = StudentChain(first, second)
    assert chain.num_parameters() == first.num_parameters() + second.num_parameters()
    assert chain.macs((5, 5)) == first.macs((5, 5)) + second.macs((5, 5))
    save_chain_student(str(tmp_path), "student", chain, {"span": "x"})
    back, manifest = load_student(str(tmp_path))
    assert manifest["kind"] == "gated_conv_chain" and [p["kind"] for p in manifest["students"]] == [
        "gated_conv_lowrank",
        "gated_conv",
    ]
    z = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(back(z), chain(z)) and back(z).shape == (2, 4, 3, 3)
    manifest["students"][1]["kind"] = "gated_conv_lowrank"  # arrays of the wrong kind: a clear error
    (tmp_path / "student.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="needs arrays"):
        load_student(str(tmp_path))


def test_expand_blocks():
    from convexedge.host.distill import expand_blocks
    from convexedge.models import load_teacher

    teacher = load_teacher()
    assert expand_blocks(teacher, ["layer3"]) == ["layer3.0", "layer3.1", "layer3.2"]
    assert expand_blocks(teacher, ["layer2", "layer3"])[-4:] == [
        "layer2.2",
        "layer3.0",
        "layer3.1",
        "layer3.2",
    ]
    assert expand_blocks(teacher, ["layer3.1"]) == ["layer3.1"]
