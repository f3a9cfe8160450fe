"""Device refits that re-estimate the input normalisation from the stream (RefitConfig.renormalize),
and refits under a strong anchor (the float32 floor of the KKT residual)."""

import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convexedge.device import (
    BufferConfig,
    ConvergenceWarning,
    ConvexHead,
    GateSpec,
    HeadStore,
    RefitConfig,
    RefitRuntime,
)
from convexedge.device.buffer import StreamBuffer
from convexedge.device.worker import certifiable_tol

D_IN, P, C = 12, 6, 3


def _clean(n, seed):
    return np.random.default_rng(seed).standard_normal((n, D_IN)).astype(np.float32)


def _head():
    """A head whose normalisation matches clean features and whose weights are fixed and non-zero."""
    rng = np.random.default_rng(3)
    V = rng.standard_normal((P, D_IN + 1, C)).astype(np.float32)
    return ConvexHead(V=V, gate_spec=GateSpec(d=D_IN + 1, P=P, seed=1), lam=1e-4)


# the device sees the same features, scaled and offset per feature (a sensor or upstream drift)
SCALE = np.linspace(0.5, 2.0, D_IN).astype(np.float32)
OFFSET = np.linspace(-1.0, 1.5, D_IN).astype(np.float32)


def _shifted(x):
    return x * SCALE + OFFSET


def _rt(head, mode="mean_std", anchor=30.0, executor="thread"):
    return RefitRuntime(
        head, memory_budget_mb=16, buffer=BufferConfig(mode="window", capacity=4096, val_capacity=2048),
        config=RefitConfig(renormalize=mode, anchor=anchor, solver="momentum"), executor=executor,
    )  # fmt: skip


def _stored(rt):
    b = rt.buffer
    return np.concatenate([b._train.Z[: b._train.size], b._val.Z[: b._val.size]])


@pytest.mark.parametrize("executor", ["thread", "process"])
def test_renormalize_undoes_an_affine_feature_shift(executor):
    head = _head()
    x = _clean(6000, 0)
    targets = head.predict(x)  # the teacher saw the clean features
    xs = _shifted(x)
    plain = _rt(head, mode="off")
    plain.observe(xs, targets)
    res_plain = plain.refit(time_budget_s=30)
    with _rt(head, executor=executor) as rt:
        rt.observe(xs, targets)
        res = rt.refit(time_budget_s=30)
    assert res.status == "accepted" and res.renormalized, res.reason
    assert rt.head.info["refit"]["renormalize"] == "mean_std"
    xt = _clean(1000, 1)
    yt = head.predict(xt)
    err = np.mean((rt.predict(_shifted(xt)) - yt) ** 2) / np.mean(yt**2)
    err_plain = np.mean((plain.predict(_shifted(xt)) - yt) ** 2) / np.mean(yt**2)
    assert err < 0.02, err  # the new normalisation maps shifted features back onto the clean ones
    assert err < 0.2 * err_plain, (err, err_plain, res_plain.status)
    np.testing.assert_allclose(rt.head.mean, OFFSET, atol=0.1)
    np.testing.assert_allclose(rt.head.std, SCALE, rtol=0.05)
    # the buffer's rows now use the committed normalisation
    np.testing.assert_allclose(_stored(rt).mean(0), 0.0, atol=0.1)


def test_rejected_renormalized_refit_restores_rows_and_head():
    head = _head()
    x = _clean(1500, 0)
    rt = _rt(head)
    rt.observe(_shifted(x), np.random.default_rng(9).standard_normal((1500, C)).astype(np.float32))  # garbage
    rows = _stored(rt).copy()
    res = rt.refit(time_budget_s=30)
    assert res.status == "rejected", res.reason
    assert rt.head is head
    np.testing.assert_allclose(_stored(rt), rows, rtol=1e-5, atol=1e-5)
    assert rt._norm_head is head


def test_rows_observed_during_a_refit_follow_the_committed_normalisation():
    head = _head()
    x = _clean(1500, 0)
    extra = _shifted(_clean(64, 5))
    rt = _rt(head)
    rt.observe(_shifted(x), head.predict(x))
    fed = []

    def progress(_):
        if not fed:  # staged while the buffer is frozen
            rt.observe(extra, np.zeros((64, C), np.float32))
            fed.append(1)

    res = rt.refit(time_budget_s=30, on_progress=progress)
    assert res.status == "accepted" and fed, res.reason
    everything = np.concatenate([_shifted(x), extra])
    np.testing.assert_allclose(_stored(rt).sum(0), rt.head.normalize(everything).sum(0), rtol=1e-3, atol=1e-2)


def test_rollback_to_another_normalisation_moves_the_rows(tmp_path):
    head = _head()
    store = HeadStore.create(tmp_path / "heads", head)
    rt = _rt(store)
    x = _clean(1500, 0)
    rt.observe(_shifted(x), head.predict(x))
    assert rt.refit(time_budget_s=30).status == "accepted"
    store.rollback()
    assert np.array_equal(rt.head.mean, head.mean)
    res = rt.refit(time_budget_s=30)  # rows move back to the rolled-back head's normalisation
    assert "cleared" not in res.reason and res.n_train > 0
    if res.status != "accepted":
        np.testing.assert_allclose(
            _stored(rt).sum(0), rt.head.normalize(_shifted(x)).sum(0), rtol=1e-3, atol=1e-2
        )


def test_renormalize_needs_rows_and_a_known_mode():
    with pytest.raises(ValueError, match="gram"):
        RefitRuntime(_head(), buffer=BufferConfig(mode="gram"), config=RefitConfig(renormalize="mean"))
    with pytest.raises(ValueError, match="renormalize"):
        RefitConfig(renormalize="batch")  # type: ignore[arg-type]


def test_renormalize_mean_keeps_the_scale():
    head = _head()
    x = _clean(3000, 0)
    rt = _rt(head, mode="mean")
    rt.observe(x + OFFSET, head.predict(x))
    res = rt.refit(time_budget_s=30)
    assert res.status == "accepted", res.reason
    np.testing.assert_array_equal(rt.head.std, head.std)
    np.testing.assert_allclose(rt.head.mean, OFFSET, atol=0.1)


# ----------------------------------------------------------------------------- buffer primitives
def _buffer(n):
    buf = StreamBuffer(D_IN, C, P, BufferConfig(mode="reservoir", capacity=256, val_capacity=64))
    rng = np.random.default_rng(0)
    buf.add(rng.standard_normal((n, D_IN)).astype(np.float32) * 3 + 1, np.zeros((n, C), np.float32))
    return buf


def test_moments_match_numpy():
    buf = _buffer(200)
    Z = buf._train.Z[: buf._train.size]
    mean, var = buf.moments(chunk=7)
    np.testing.assert_allclose(mean, Z.mean(0, dtype=np.float64), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, Z.var(0, dtype=np.float64), rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(0.05, 20.0), min_size=D_IN, max_size=D_IN),
    st.lists(st.floats(-50.0, 50.0), min_size=D_IN, max_size=D_IN),
)
def test_restandardize_then_its_inverse_is_the_identity(scale, shift):
    buf = _buffer(300)
    before = buf._train.Z.copy(), buf._val.Z.copy()
    a, b = np.asarray(scale, np.float32), np.asarray(shift, np.float32)
    buf.restandardize(a, b, "stored")
    np.testing.assert_allclose(buf._train.Z[:10], before[0][:10] * a + b, rtol=1e-5, atol=1e-4)
    buf.restandardize(1.0 / a, -b / a, "stored")
    np.testing.assert_allclose(buf._train.Z, before[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(buf._val.Z, before[1], rtol=1e-4, atol=1e-3)


def test_restandardize_refuses_gram_and_bad_maps():
    gram = StreamBuffer(D_IN, C, P, BufferConfig(mode="gram"))
    with pytest.raises(ValueError, match="gram"):
        gram.restandardize(np.ones(D_IN), np.zeros(D_IN), "stored")
    with pytest.raises(ValueError, match="moments"):
        gram.moments()
    buf = _buffer(10)
    with pytest.raises(ValueError, match="> 0"):
        buf.restandardize(np.zeros(D_IN), np.zeros(D_IN), "stored")
    with pytest.raises(ValueError, match="shape"):
        buf.restandardize(np.ones(3), np.zeros(3), "stored")


# ----------------------------------------------------------------------------- strong anchors
@pytest.mark.parametrize("solver", ["fista", "momentum", "bcd"])
def test_a_strong_anchor_stops_at_the_float32_floor(solver):
    """mu (V - V0) amplifies float32 rounding of V: the solve must stop at that floor, not burn its
    whole budget (these ran 1,000 iterations before the floor was taken into account)."""
    head = _head()
    x = _clean(1500, 0)
    rt = RefitRuntime(
        head, memory_budget_mb=16, buffer=BufferConfig(mode="window", capacity=4096, val_capacity=2048),
        config=RefitConfig(renormalize="mean_std", anchor=1e5, solver=solver),
    )  # fmt: skip
    rt.observe(_shifted(x), head.predict(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        res = rt.refit(time_budget_s=30)
    assert res.converged and res.iterations <= 10, (res.iterations, res.kkt_residual)


def test_certifiable_tol():
    V0 = np.full((2, 3, 4), 0.5, np.float32)  # ||V0|| = sqrt(24) / 2
    assert certifiable_tol(1e-4, 0.0, V0, 1.0) == 1e-4
    assert certifiable_tol(1e-4, 1e6, np.zeros_like(V0), 1.0) == 1e-4
    floor = 2 * np.finfo(np.float32).eps * 1e6 * np.sqrt(24) / 2 / 0.5
    assert certifiable_tol(1e-4, 1e6, V0, 0.5) == pytest.approx(floor)
    assert certifiable_tol(1e-4, 1.0, V0, 0.5) == 1e-4  # a weak anchor leaves tol alone
