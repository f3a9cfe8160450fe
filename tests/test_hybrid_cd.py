"""Hybrid coordinate descent: per-coordinate descent, loop oracle, configs, determinism, baselines."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device.errors import ConvergenceWarning, DataError
from convexedge.host.solvers.hybrid_cd import (
    AdamTrainConfig,
    GDConfig,
    HybridCDConfig,
    coordinate_updates,
    network_objective,
    train_adam,
    train_gd,
    train_hybrid_cd,
)


def _problem(seed: int, n: int, d: int, m: int, c: int, bias: bool, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    Y = torch.randn(n, c, generator=g, dtype=dtype)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(d, m, bias=bias), torch.nn.ReLU(), torch.nn.Linear(m, c, bias=bias)
    )
    return net.to(dtype), X, Y


def _objective_loop(net, X, Y, lam):
    """F by the module's own forward (an oracle independent of the vectorised kernel)."""
    pred = net(X)
    w = net[0].weight.square().sum() + net[2].weight.square().sum()
    return float(0.5 * (pred - Y).square().sum() / X.shape[0] + 0.5 * lam * w)


def _loop_update(net, X, Y, cfg: HybridCDConfig) -> dict[str, torch.Tensor]:
    """The hybrid CD step written as a plain loop over every scalar parameter (the reference)."""
    net = copy.deepcopy(net)
    params = dict(net.named_parameters())
    for p in params.values():
        p.requires_grad_(True)
    F = 0.5 * (net(X) - Y).square().sum() / X.shape[0]
    F = F + 0.5 * cfg.lam * (net[0].weight.square().sum() + net[2].weight.square().sum())
    grads = dict(zip(params, torch.autograd.grad(F, list(params.values())), strict=True))
    F0 = float(F.detach())
    out = {}
    with torch.no_grad():
        for name, p in params.items():
            if not cfg.train_output_layer and name.startswith("2."):
                continue
            delta = torch.zeros_like(p)
            flat_p, flat_g, flat_d = p.view(-1), grads[name].view(-1), delta.view(-1)
            for j in range(flat_p.numel()):
                old = float(flat_p[j])

                def along(t, j=j, old=old, flat_p=flat_p):
                    flat_p[j] = old + t
                    val = _objective_loop(net, X, Y, cfg.lam) - F0
                    flat_p[j] = old
                    return val

                g = float(flat_g[j])
                search = abs(g) <= cfg.threshold
                if not search:
                    step = -cfg.step * g
                    if cfg.safeguard and along(step) > 0:
                        search = True
                    else:
                        flat_d[j] = step
                if search:
                    best, best_t = 0.0, 0.0
                    for t in cfg.trial_steps():
                        v = along(t)
                        if v < best:
                            best, best_t = v, t
                    flat_d[j] = best_t
            out[name] = delta
    return out


# --------------------------------------------------------------------------------- properties
@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    n=st.integers(2, 7),
    d=st.integers(1, 4),
    m=st.integers(1, 4),
    c=st.integers(1, 2),
    bias=st.booleans(),
    out_layer=st.booleans(),
    lam=st.sampled_from([0.0, 1e-3, 0.1]),
    threshold=st.sampled_from([0.0, 1e-3, 0.05, 0.5, 10.0]),
    step=st.sampled_from([1e-2, 0.5, 5.0, 100.0]),
)
def test_each_coordinate_update_never_increases_the_loss_along_its_coordinate(
    seed, n, d, m, c, bias, out_layer, lam, threshold, step
):
    net, X, Y = _problem(seed, n, d, m, c, bias)
    cfg = HybridCDConfig(
        threshold=threshold, step=step, lam=lam, train_output_layer=out_layer, ls_scale=0.1, safeguard=True
    )
    upd = coordinate_updates(net, X, Y, cfg)
    F0 = network_objective(net, X, Y, lam)[0]
    assert upd.objective == pytest.approx(F0, rel=1e-12)
    params = dict(net.named_parameters())
    for name, delta in upd.deltas.items():
        flat = delta.view(-1)
        for j in range(flat.numel()):
            probe = copy.deepcopy(net)
            with torch.no_grad():
                dict(probe.named_parameters())[name].view(-1)[j] += flat[j]
            F1 = network_objective(probe, X, Y, lam)[0]
            assert F1 <= F0 + 1e-12 * (1 + abs(F0)), (name, j, F1 - F0)
            # the vectorised kernel predicts the same 1-D change
            assert float(upd.changes[name].view(-1)[j]) == pytest.approx(F1 - F0, rel=1e-6, abs=1e-12)
        assert params[name].shape == delta.shape


@pytest.mark.parametrize("safeguard", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_vectorised_update_equals_a_plain_per_parameter_loop(safeguard, bias):
    net, X, Y = _problem(3, n=9, d=3, m=4, c=2, bias=bias)
    cfg = HybridCDConfig(threshold=0.05, step=0.5, lam=0.01, ls_scale=0.2, safeguard=safeguard)
    upd = coordinate_updates(net, X, Y, cfg)
    ref = _loop_update(net, X, Y, cfg)
    assert set(ref) == set(upd.deltas)
    ls_total = 0
    for name in ref:
        torch.testing.assert_close(upd.deltas[name], ref[name], rtol=1e-12, atol=1e-15)
        ls_total += int(upd.line_search[name].sum())
    assert 0 < ls_total < sum(r.numel() for r in ref.values())  # both branches exercised


def test_first_layer_only_leaves_the_output_layer_alone_and_uses_small_chunks():
    net, X, Y = _problem(5, n=12, d=4, m=6, c=1, bias=True)
    cfg = HybridCDConfig(threshold=0.05, ls_scale=0.1, train_output_layer=False, chunk_elements=1)
    upd = coordinate_updates(net, X, Y, cfg)
    assert set(upd.deltas) == {"0.weight", "0.bias"}
    ref = _loop_update(net, X, Y, cfg)
    for name in ref:
        torch.testing.assert_close(upd.deltas[name], ref[name], rtol=1e-12, atol=1e-15)
    res = _quiet(train_hybrid_cd, net, X, Y, HybridCDConfig(max_iter=3, tol=0.0, train_output_layer=False))
    torch.testing.assert_close(res.model[2].weight, net[2].weight)


# --------------------------------------------------------------------------------- training
def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fn(*args)


def test_training_is_deterministic_on_cpu_and_leaves_the_input_model_alone():
    net, X, Y = _problem(0, n=40, d=5, m=8, c=2, bias=True, dtype=torch.float32)
    before = copy.deepcopy(net.state_dict())
    cfg = HybridCDConfig(threshold=1e-2, step=0.2, max_iter=15, tol=0.0)
    a = _quiet(train_hybrid_cd, net, X, Y, cfg)
    b = _quiet(train_hybrid_cd, net, X, Y, cfg)
    assert a.history["objective"] == b.history["objective"]
    for k, v in a.model.state_dict().items():
        assert torch.equal(v, b.model.state_dict()[k])
        assert torch.equal(net.state_dict()[k], before[k])
    assert a.iterations == 15 and len(a.history["objective"]) == 16
    assert a.history["objective"][-1] < a.history["objective"][0]
    assert a.objective == pytest.approx(network_objective(a.model, X, Y)[0], rel=1e-5)
    assert not a.converged and a.status == "max_iter"


def test_backtracking_makes_the_objective_monotone():
    net, X, Y = _problem(1, n=30, d=20, m=30, c=1, bias=False)
    cfg = HybridCDConfig(threshold=0.05, step=2.0, max_iter=30, tol=0.0, backtrack=True)
    res = _quiet(train_hybrid_cd, net, X, Y, cfg)
    h = res.history["objective"]
    assert all(b < a for a, b in zip(h, h[1:], strict=False))


def test_stopping_rules_and_warning():
    net, X, Y = _problem(2, n=30, d=4, m=16, c=1, bias=True)
    F0 = network_objective(net, X, Y)[0]
    res = train_hybrid_cd(net, X, Y, HybridCDConfig(max_iter=500, target_loss=0.9 * F0, threshold=1e-3))
    assert res.converged and res.status == "target" and res.objective <= 0.9 * F0
    with pytest.warns(ConvergenceWarning, match="raise max_iter"):
        train_gd(net, X, Y, GDConfig(max_iter=2, tol=0.0))
    with pytest.warns(ConvergenceWarning, match="non-finite"):
        res = train_gd(net, X, Y * 1e3, GDConfig(step=1e6, max_iter=50, tol=0.0))
    assert res.status == "diverged"


def test_gd_and_adam_match_torch_optimizers():
    net, X, Y = _problem(4, n=25, d=3, m=5, c=2, bias=True)
    lam = 0.01

    def torch_run(opt_fn, k):
        model = copy.deepcopy(net)
        opt = opt_fn(model.parameters())
        for _ in range(k):
            opt.zero_grad()
            F = 0.5 * (model(X) - Y).square().sum() / X.shape[0]
            F = F + 0.5 * lam * (model[0].weight.square().sum() + model[2].weight.square().sum())
            F.backward()
            opt.step()
        return model

    ref = torch_run(lambda p: torch.optim.SGD(p, lr=0.3), 7)
    got = _quiet(train_gd, net, X, Y, GDConfig(step=0.3, lam=lam, max_iter=7, tol=0.0)).model
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ref = torch_run(lambda p: torch.optim.Adam(p, lr=0.05), 7)
    got = _quiet(train_adam, net, X, Y, AdamTrainConfig(lr=0.05, lam=lam, max_iter=7, tol=0.0)).model
    for a, b in zip(ref.parameters(), got.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


# --------------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threshold": -1.0}, "threshold must be"),
        ({"step": 0.0}, "step must be"),
        ({"ls_grid": ()}, "ls_grid must be"),
        ({"ls_grid": [1.0]}, "ls_grid must be"),
        ({"ls_grid": (1.0, -2.0)}, "every ls_grid entry"),
        ({"ls_scale": 0.0}, "ls_scale must be"),
        ({"threshold": 0.0}, "explicit ls_scale"),
        ({"safeguard": 1}, "safeguard must be a bool"),
        ({"backtrack": "yes"}, "backtrack must be a bool"),
        ({"chunk_elements": 0}, "chunk_elements must be"),
        ({"lam": -0.1}, "lam must be"),
        ({"max_iter": -1}, "max_iter must be"),
        ({"max_seconds": 0}, "max_seconds must be"),
        ({"target_loss": float("nan")}, "target_loss must be"),
        ({"tol": float("inf")}, "tol must be"),
        ({"train_output_layer": "no"}, "train_output_layer must be"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HybridCDConfig(**kwargs)


def test_baseline_config_validation():
    with pytest.raises(ValueError, match="step must be"):
        GDConfig(step=-1.0)
    with pytest.raises(ValueError, match="lr must be"):
        AdamTrainConfig(lr=0.0)
    with pytest.raises(ValueError, match="beta2 must be"):
        AdamTrainConfig(beta2=1.0)
    with pytest.raises(ValueError, match="eps must be"):
        AdamTrainConfig(eps=0.0)


def test_input_validation():
    net, X, Y = _problem(0, n=10, d=3, m=4, c=2, bias=True)
    with pytest.raises(DataError, match="same number"):
        train_hybrid_cd(net, X, Y[:5])
    with pytest.raises(DataError, match="maps 3 -> 2"):
        train_hybrid_cd(net, X[:, :2], Y)
    with pytest.raises(DataError, match="2-D"):
        train_hybrid_cd(net, X, Y[:, 0])
    with pytest.raises(DataError, match="torch tensor"):
        train_hybrid_cd(net, X.numpy(), Y)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(DataError, match="NaN"):
        train_gd(net, bad, Y)
    with pytest.raises(TypeError, match="takes a HybridCDConfig"):
        train_hybrid_cd(net, X, Y, GDConfig())
    with pytest.raises(TypeError, match="must be a HybridCDConfig"):
        coordinate_updates(net, X, Y, GDConfig())
    deep = torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)
    ).double()
    with pytest.raises(ValueError, match="deeper networks are not supported"):
        train_hybrid_cd(deep, X, Y)
    with pytest.raises(ValueError, match="two-layer"):
        train_adam(torch.nn.Linear(3, 2).double(), X, Y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    net, X, Y = _problem(6, n=50, d=6, m=10, c=2, bias=True)
    cfg = HybridCDConfig(threshold=1e-2, step=0.3, max_iter=10, tol=0.0)
    a = _quiet(train_hybrid_cd, net, X, Y, cfg)
    b = _quiet(train_hybrid_cd, net.cuda(), X.cuda(), Y.cuda(), cfg)
    assert b.model[0].weight.device.type == "cuda"
    for x, y in zip(a.history["objective"], b.history["objective"], strict=True):
        assert x == pytest.approx(y, rel=1e-9)
