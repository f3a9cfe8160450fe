"""convexedge.host.linearize: masked ReLUs, the counter, SNL, BCD, ONNX export and resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from convexedge.device.errors import ArtifactError
from convexedge.host.linearize import (
    BcdConfig,
    FinetuneConfig,
    MaskedReLU,
    SnlConfig,
    Split,
    bcd_linearize,
    count_relus,
    flat_mask,
    linearize_,
    live_relus,
    set_flat_mask_,
    snl_path,
)
from convexedge.host.linearize.bcd import evaluate_candidates
from convexedge.host.linearize.snl import apply_snapshot_, binarize_scores
from convexedge.models.resnet_cifar import resnet20


class TinyNet(nn.Module):
    """conv(1->3, 3x3, pad 1) on 6x6 -> ReLU (108) -> conv(3->2, stride 2) -> ReLU (2*3*3 = 18) -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(3, 2, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(18, 4)

    def forward(self, x):
        return self.fc(self.r2(self.bn(self.c2(self.r1(self.c1(x))))).flatten(1))


class FunctionalNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        return F.relu(self.fc(x))


def _data(n: int = 96, seed: int = 0) -> Split:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].sum((1, 2)) > 0).long() + 2 * (x[:, 0, 3:].sum((1, 2)) > 0).long()
    return Split(x, y)


def _tiny(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet().eval()


# --------------------------------------------------------------------------- masks and counting
@pytest.mark.parametrize("granularity", ["pixel", "channel"])
def test_swap_with_all_bits_one_keeps_outputs_identical(granularity):
    model = resnet20().eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        linearize_(model, x[:1], granularity=granularity)
        after = model(x)
    assert sum(isinstance(m, MaskedReLU) for m in model.modules()) == 19
    assert not any(type(m) is nn.ReLU for m in model.modules())
    assert torch.equal(before, after)


def test_counter_matches_hand_count_and_resnet20():
    net = _tiny()
    x = torch.zeros(2, 1, 6, 6)
    assert count_relus(net, x) == 3 * 6 * 6 + 2 * 3 * 3  # 126, by hand
    linearize_(net, x)
    assert count_relus(net, x) == 126 == live_relus(net)
    mask = flat_mask(net)
    mask[[0, 5, 107, 108]] = False  # three in r1, one in r2
    set_flat_mask_(net, mask)
    assert count_relus(net, x) == 122 == live_relus(net)
    # ResNet-20 at 32x32: stem 16*32*32 + 6 ReLUs per stage at 16x32x32, 32x16x16, 64x8x8
    assert count_relus(resnet20(), torch.zeros(1, 3, 32, 32)) == 16384 + 6 * (16384 + 8192 + 4096) == 188416


def test_channel_masks_count_whole_channels():
    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6), granularity="channel")
    assert flat_mask(net).shape == (5,)
    set_flat_mask_(net, np.array([1, 0, 1, 0, 1], bool))
    assert count_relus(net, torch.zeros(1, 1, 6, 6)) == 2 * 36 + 9


def test_functional_relu_is_counted_and_refused_by_swap():
    net = FunctionalNet()
    assert count_relus(net, torch.zeros(3, 5)) == 5
    with pytest.raises(ValueError, match="functionally"):
        linearize_(net, torch.zeros(1, 5))
    with pytest.raises(ValueError, match="batched input"):
        linearize_(_tiny(), torch.zeros(6))
    with pytest.raises(ValueError, match="granularity"):
        MaskedReLU("layer")


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**31 - 1))
def test_masked_relu_is_relu_or_identity_per_bit(seed):
    g = torch.Generator().manual_seed(seed)
    m = MaskedReLU()
    x = torch.randn(3, 2, 4, generator=g)
    m(x[:1])
    bits = torch.rand(2, 4, generator=g) > 0.5
    m.mask = bits.float()
    y = m(x)
    assert torch.equal(y, torch.where(bits, x.clamp_min(0), x))


def test_batched_candidates_equal_one_by_one():
    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    val = _data(40)
    rng = np.random.default_rng(0)
    cands = rng.random((5, 126)) > 0.3
    acc, loss = evaluate_candidates(net, val, cands, eval_batch=64)
    for k in range(5):
        set_flat_mask_(net, cands[k])
        logits = net(val.x).detach()
        assert acc[k] == pytest.approx(float((logits.argmax(1) == val.y).float().mean()))
        assert loss[k] == pytest.approx(float(F.cross_entropy(logits, val.y)), rel=1e-5)


def test_batched_candidates_kd_loss_equals_the_finetuning_objective():
    from convexedge.host.linearize.train import kd_loss

    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    val = _data(40)
    teacher = torch.randn(40, 4, generator=torch.Generator().manual_seed(3))
    cands = np.random.default_rng(1).random((3, 126)) > 0.3
    _, loss = evaluate_candidates(net, val, cands, eval_batch=50, teacher_logits=teacher, temperature=4.0)
    for k in range(3):
        set_flat_mask_(net, cands[k])
        want = float(kd_loss(net(val.x).detach(), teacher, val.y, 4.0))
        assert loss[k] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- SNL
def test_binarize_keeps_top_scores_within_budget():
    scores = np.array([0.9, 0.1, 0.5, 0.7, 0.0])
    assert binarize_scores(scores, np.ones(5, np.int64), 2).tolist() == [True, False, False, True, False]
    assert binarize_scores(scores, np.array([2, 1, 1, 2, 1]), 3).sum() == 1


def test_snl_path_reaches_budgets():
    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    train = _data(64)
    with torch.no_grad():
        t = net(train.x)
    snaps = snl_path(
        net,
        t,
        train,
        [60, 20],
        SnlConfig(lam=2e-2, lam_growth=1.3, alpha_lr=0.1, max_epochs=30, batch_size=32),
    )
    assert set(snaps) == {60, 20} and all(s.converged for s in snaps.values())
    assert snaps[20].live_above_threshold <= 20 and snaps[20].epoch >= snaps[60].epoch
    apply_snapshot_(net, snaps[20])
    assert live_relus(net) == 20
    with pytest.raises(ValueError, match="budgets"):
        snl_path(net, t, train, [], SnlConfig())


# --------------------------------------------------------------------------- BCD
def _bcd_setup(budget=30, **kw):
    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    train, val = _data(64, 1), _data(48, 2)
    with torch.no_grad():
        t = net(train.x)
    cfg = BcdConfig(budget=budget, drc=7, rt=4, finetune=FinetuneConfig(epochs=0.5, batch_size=32), **kw)
    return net, t, train, val, cfg


def test_bcd_reaches_budget_exactly_and_never_removes_twice():
    net, t, train, val, cfg = _bcd_setup(budget=30, adt=0.05)
    start = flat_mask(net).copy()
    res = bcd_linearize(net, t, train, val, cfg)
    assert res.finished and res.live_relus == 30 == count_relus(net, train.x[:1])
    assert len(np.unique(res.removed)) == len(res.removed) == 126 - 30
    assert start[res.removed].all() and not res.mask[res.removed].any()
    assert all(h[0] >= 30 for h in res.history)
    lives = [h[0] for h in res.history]
    assert lives == sorted(lives, reverse=True)


def test_bcd_is_deterministic_and_resumes_exactly(tmp_path):
    net, t, train, val, cfg = _bcd_setup(checkpoint_every=2)
    full = bcd_linearize(net, t, train, val, cfg)
    net2, *_ = _bcd_setup()
    part = bcd_linearize(net2, t, train, val, cfg, checkpoint=tmp_path / "ck", max_steps=5)
    assert not part.finished and part.live_relus > 30
    assert (
        json.loads((tmp_path / "ck" / "bcd_state.json").read_text())["format"] == "convexedge.linearize.bcd"
    )
    net3, *_ = _bcd_setup()  # a fresh process would rebuild the model, then resume
    resumed = bcd_linearize(net3, t, train, val, cfg, checkpoint=tmp_path / "ck")
    assert resumed.finished
    assert np.array_equal(resumed.mask, full.mask) and np.array_equal(resumed.removed, full.removed)
    for a, b in zip(net.state_dict().values(), net3.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = BcdConfig(**{**cfg.__dict__, "seed": 5})
    with pytest.raises(ArtifactError, match="different BcdConfig"):
        bcd_linearize(net3, t, train, val, other, checkpoint=tmp_path / "ck")


def test_bcd_config_validation():
    with pytest.raises(ValueError, match="budget"):
        BcdConfig(budget=-1)
    with pytest.raises(ValueError, match="adt"):
        BcdConfig(budget=3, adt=2.0)
    with pytest.raises(ValueError, match="warm_finetune"):
        BcdConfig(budget=3, warm_finetune=-1.0)


@pytest.mark.parametrize("warm", [0.0, 2.0])
def test_bcd_warm_start_finetune_is_charged_and_logged(warm):
    net, t, train, val, cfg = _bcd_setup(budget=100, adt=1.0, warm_finetune=warm)
    res = bcd_linearize(net, t, train, val, cfg)
    events = [h[2] for h in res.history]
    assert events[0] == "start" and (events[1] == "finetune (warm start)") == (warm > 0)
    assert res.ledger.train == int(round(warm * len(train) / 32)) * 32  # no other fine-tune (adt = 1)
    assert res.finished and res.live_relus == 100


def test_bcd_end_finetune_runs_once_at_the_budget_and_is_charged(tmp_path):
    net, t, train, val, cfg = _bcd_setup(budget=100, adt=1.0, warm_finetune=0.0, end_finetune=1.0)
    res = bcd_linearize(net, t, train, val, cfg, checkpoint=tmp_path / "ck")
    assert res.history[-1][:1] == [100] and res.history[-1][2] == "finetune (end)"
    assert res.finetune_rounds == 1 and res.ledger.train == int(round(len(train) / 32)) * 32
    again = bcd_linearize(net, t, train, val, cfg, checkpoint=tmp_path / "ck")  # finished: no second one
    assert again.finetune_rounds == 1 and again.ledger.train == res.ledger.train
    with pytest.raises(ValueError, match="end_finetune"):
        BcdConfig(budget=3, end_finetune=-1.0)


def test_bcd_on_validation_subsets_is_deterministic_and_charges_the_subsets():
    net, t, train, val, cfg = _bcd_setup(budget=60, eval_samples=16, warm_finetune=0.0, adt=1.0)
    res = bcd_linearize(net, t, train, val, cfg)
    assert res.finished and res.live_relus == 60 and len(np.unique(res.removed)) == 126 - 60
    steps = -(-(126 - 60) // cfg.drc)
    assert res.ledger.forward == len(val) + steps * (cfg.rt + 1) * 16  # start + (rt + current) x 16
    net2, *_ = _bcd_setup()
    again = bcd_linearize(net2, t, train, val, cfg)
    assert np.array_equal(again.removed, res.removed)
    with pytest.raises(ValueError, match="eval_samples"):
        BcdConfig(budget=3, eval_samples=0)


def test_bcd_kd_selection_needs_teacher_logits_and_reaches_budget():
    net, t, train, val, cfg = _bcd_setup(budget=60, select="kd", warm_finetune=0.0, adt=1.0)
    with pytest.raises(ValueError, match="val_teacher_logits"):
        bcd_linearize(net, t, train, val, cfg)
    with torch.no_grad():
        tv = _tiny()(val.x)
    res = bcd_linearize(net, t, train, val, cfg, val_teacher_logits=tv)
    assert res.finished and res.live_relus == 60 and len(np.unique(res.removed)) == 126 - 60
    with pytest.raises(ValueError, match="select"):
        BcdConfig(budget=3, select="kl")


def test_bcd_prior_sampling_prefers_the_least_important_units():
    from convexedge.host.linearize.bcd import _sampling_weights

    pool = np.arange(10)
    assert _sampling_weights(None, pool, 0.1) is None and _sampling_weights(np.ones(10), pool, None) is None
    w = _sampling_weights(np.linspace(1, 0, 10), pool, 0.2)
    assert w.sum() == pytest.approx(1.0) and np.all(np.diff(w) > 0)  # low score: high weight
    net, t, train, val, cfg = _bcd_setup(budget=96, prior_temperature=0.05, warm_finetune=0.0, adt=1.0)
    prior = np.ones(126)
    prior[:40] = 0.0  # units 0..39 are the unimportant ones
    res = bcd_linearize(net, t, train, val, cfg, prior=prior)
    assert res.finished and np.mean(res.removed < 40) > 0.8
    with pytest.raises(ValueError, match="prior"):
        bcd_linearize(net, t, train, val, cfg)
    with pytest.raises(ValueError, match="prior_temperature"):
        BcdConfig(budget=3, prior_temperature=0.0)


def test_compare_methods_matches_compute_and_reuses_the_snl_path(tmp_path):
    pytest.importorskip("onnxscript")
    from convexedge.host.linearize import CompareConfig, compare_methods

    teacher = _tiny()
    train, val, test = _data(64, 1), _data(48, 2), _data(48, 3)
    cfg = CompareConfig(
        budgets=(30,),
        snl=SnlConfig(lam=2e-2, lam_growth=1.3, alpha_lr=0.1, max_epochs=30, batch_size=32),
        bcd=BcdConfig(budget=0, rt=4, warm_finetune=0.5, finetune=FinetuneConfig(epochs=0.5, batch_size=32)),
        final_finetune=FinetuneConfig(epochs=1.0, batch_size=32),
        warm_factor=2.0,
        bcd_steps=4,
    )
    cache: dict = {}
    rows, hist = compare_methods(teacher, train, val, test, cfg, seed=1, path_cache=cache, out_dir=tmp_path)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"snl", "bcd"} and len(cache) == 1
    assert by["snl"]["relus_in_onnx"] == by["bcd"]["relus_in_onnx"] == 30
    assert by["bcd"]["warm_budget"] == 60 and by["bcd"]["bcd_drc"] == 8
    # matched: the cheaper one's extra fine-tuning is rounded to whole batches of 32 train steps (x3)
    assert abs(by["snl"]["compute_units"] - by["bcd"]["compute_units"]) <= 3 * 32
    again, _ = compare_methods(teacher, train, val, test, cfg, seed=1, path_cache=cache, out_dir=tmp_path)
    assert [r["top1"] for r in again] == [r["top1"] for r in rows] and len(cache) == 1


def test_cosine_finetune_anneals_the_weights_lr_to_zero_and_keeps_score_lr(monkeypatch):
    from convexedge.host.linearize import train as train_mod

    seen: list[list[float]] = []
    real_step = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append([g["lr"] for g in self.param_groups])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    net, data = _tiny(), _data(64)
    t = net(data.x).detach()
    score = nn.Parameter(torch.full((3,), 0.5))
    cfg = FinetuneConfig(epochs=2.0, batch_size=16, lr=1e-2, schedule="cosine")
    train_mod.finetune_(
        net, t, data, cfg, generator=torch.Generator().manual_seed(0), extra_params=[score],
        extra_loss=lambda: score.sum() * 0.0,
    )  # fmt: skip
    weights, scores = [s[0] for s in seen], [s[1] for s in seen]
    assert len(weights) == 8 and weights[0] == pytest.approx(1e-2)
    assert all(a > b for a, b in zip(weights, weights[1:], strict=False))
    assert weights[-1] < 1e-2 * 0.05 and scores == [1e-2] * 8
    seen.clear()
    train_mod.finetune_(net, t, data, FinetuneConfig(epochs=1.0, batch_size=16, lr=1e-2),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert [s[0] for s in seen] == [1e-2] * 4
    with pytest.raises(ValueError, match="schedule"):
        FinetuneConfig(schedule="step")


# --------------------------------------------------------------------------- export
def test_exported_onnx_relu_count_equals_budget(tmp_path):
    budget = 40
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from convexedge.converters.onnx import run_onnx
    from convexedge.host.linearize import count_onnx_relus, export_linearized_onnx

    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    mask = np.zeros(126, bool)
    mask[np.random.default_rng(budget).choice(126, budget, replace=False)] = True
    set_flat_mask_(net, mask)
    path = export_linearized_onnx(net, tmp_path / "m.onnx", (1, 6, 6))
    relus, other = count_onnx_relus(path)
    assert relus == budget == count_relus(net, torch.zeros(1, 1, 6, 6))
    assert other == {}
    x = _data(5).x
    np.testing.assert_allclose(run_onnx(path, x.numpy()), net(x).detach().numpy(), atol=1e-5)


def test_export_forms_of_all_on_and_all_off_masks():
    from convexedge.host.linearize.export import exportable

    net = linearize_(_tiny(), torch.zeros(1, 1, 6, 6))
    mask = flat_mask(net)
    mask[:108] = False  # r1 all linear, r2 all ReLU
    set_flat_mask_(net, mask)
    out = exportable(net)
    assert isinstance(out.r1, nn.Identity) and type(out.r2) is nn.ReLU
    x = _data(4).x
    assert torch.equal(out(x), net(x))


# --------------------------------------------------------------------------- CLI
def test_cli_rejects_bad_budget_and_options(capsys):
    from convexedge.host.cli import main
    from convexedge.host.linearize.cli import LinearizeOptions

    with pytest.raises(SystemExit) as exc:
        main(["linearize", "--budget", "0"])
    assert exc.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="warm-factor"):
        LinearizeOptions(budget=10, warm_factor=0.5)
    with pytest.raises(ValueError, match="select"):
        BcdConfig(budget=3, select="random")


@pytest.mark.slow
def test_cli_linearize_mnist1d_end_to_end_and_resume(tmp_path):
    pytest.importorskip("mnist1d")
    pytest.importorskip("onnxscript")
    from convexedge.host.cli import main

    argv = [
        "linearize",
        "--dataset",
        "mnist1d",
        "--budget",
        "1200",
        "--out",
        str(tmp_path),
        "--snl-epochs",
        "40",
    ]
    argv += ["--snl-alpha-lr", "0.05", "--finetune-epochs", "0.5", "--drc", "64", "--no-progress"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["relus_in_onnx"] == report["relus_counted"] == 1200
    assert (tmp_path / "checkpoint" / "bcd_state.npz").exists() and (
        tmp_path / "accuracy_vs_relus.png"
    ).exists()
    assert main(argv) == 0  # rerun: resumes from the finished checkpoint, same mask
    assert json.loads((tmp_path / "report.json").read_text())["relus_in_onnx"] == 1200
