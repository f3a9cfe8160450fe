"""Block coordinate descent on the binary ReLU mask (Rakhlin, Jevnisek, Avidan 2025), from its text.

Start from a binary mask (in practice SNL's, at a larger budget), fine-tune the weights once for
``warm_finetune`` epochs (the thresholded warm start needs it: binarizing SNL's soft scores costs
most of the accuracy), then remove ReLUs directly:

1. sample ``rt`` random blocks, each of ``drc`` live units (never a unit already removed);
2. evaluate the validation accuracy of the model with each block removed, all ``rt`` candidates in
   one batched forward per validation chunk (each candidate sees its own stacked copy of the chunk);
   with ``eval_samples`` set, on a fresh random subset of the validation split per step, the current
   mask scored on the same subset so that the drop is measured like for like;
3. keep the best block when its accuracy drop from the current accuracy is at most ``adt``;
   otherwise fine-tune the weights and sample again, and after a fine-tune that still finds no
   block within ``adt``, keep the best one anyway (so it terminates);
4. fine-tune the weights (KD, masks fixed) whenever the accumulated drop since the last fine-tune
   exceeds ``finetune_drop``;

until the live ReLU count reaches the budget (the last block is shrunk so it lands on it exactly;
with channel units the count ends at or below it). Block sampling (and the subsets) use a numpy
Generator seeded from ``seed`` and each fine-tune round's data order a torch Generator seeded from
``(seed, round)``, so a run is deterministic and a resumed run repeats an uninterrupted one exactly.
The checkpoint is ``bcd_state.npz`` (mask, weights) plus ``bcd_state.json`` (config, counters,
history, RNG state). Every forward and training step is charged to a :class:`~.train.Ledger`.

"Best" is the lowest validation cross-entropy (``select="loss"``, the default) or the highest
accuracy, ties broken by the loss (``select="accuracy"``). Deliberate departure: the paper ranks by
accuracy; on a few hundred validation samples a small block moves the accuracy by 0-2 samples, so
most candidates tie and the loss is the better-resolved signal. The ``adt`` test stays on accuracy.
``select="kd"`` ranks by the fine-tuning objective instead (CE plus ``T^2`` KL to the teacher's
validation logits, which the caller passes and pays for): it also rewards a removal that keeps the
teacher's soft outputs, a smoother signal than the labels alone. Departure too.

Block sampling is uniform over the live units (the paper) unless ``prior_temperature`` is set and a
``prior`` (SNL's scores of the warm start) is given: then unit ``u`` is drawn with weight
``exp(-rank_u / prior_temperature)``, ``rank_u`` in [0, 1] from the lowest score. Departure: the
validation evaluation still picks among the ``rt`` blocks, but the blocks are mostly made of units
SNL already found unimportant (a small temperature tends to SNL's own removal order).
History accuracies are exact on the full split and, with ``eval_samples``, the full-split value at
the last fine-tune less the accumulated subset drops since.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from convexedge.device.errors import ArtifactError
from convexedge.host.linearize.masks import flat_mask, masked_relus, set_flat_mask_, unit_costs
from convexedge.host.linearize.train import FinetuneConfig, Ledger, Split, finetune_, rng_from_state

__all__ = ["BcdConfig", "BcdResult", "bcd_linearize", "evaluate_candidates"]

log = logging.getLogger(__name__)

_STATE_FORMAT = "convexedge.linearize.bcd"
_STATE_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class BcdConfig:
    """Hyperparameters of the block coordinate descent."""

    budget: int  # target live ReLUs
    drc: int = 16  # units per block (ReLUs removed per accepted step, pixel units)
    rt: int = 8  # random blocks tried per step
    adt: float = 0.01  # largest accepted drop in validation accuracy for one block
    finetune_drop: float = 0.02  # fine-tune when accuracy fell this much since the last fine-tune
    finetune: FinetuneConfig = field(default_factory=lambda: FinetuneConfig(epochs=1.0))
    warm_finetune: float = 1.0  # epochs of fine-tuning of the warm start before the first removal (0: none)
    end_finetune: float = 0.0  # epochs of fine-tuning once the budget is reached (0: none)
    select: Literal["loss", "accuracy", "kd"] = "loss"  # how the best of the rt blocks is chosen
    prior_temperature: float | None = None  # with prior scores: sampling weight exp(-rank / this)
    eval_batch: int = 4096  # samples per batched forward (candidates x validation chunk)
    eval_samples: int | None = None  # score each step on this many random validation samples (None: all)
    seed: int = 0
    checkpoint_every: int = 20  # accepted steps between checkpoints (when a path is given)

    def __post_init__(self) -> None:
        if self.budget < 0 or self.drc < 1 or self.rt < 1 or self.eval_batch < self.rt:
            raise ValueError(f"BcdConfig: need budget >= 0, drc >= 1, rt >= 1, eval_batch >= rt; got {self}")
        if self.select not in ("loss", "accuracy", "kd"):
            raise ValueError(f"BcdConfig: select must be 'loss', 'accuracy' or 'kd', got {self.select!r}")
        if self.prior_temperature is not None and self.prior_temperature <= 0:
            raise ValueError(f"BcdConfig: prior_temperature must be > 0 or None; got {self}")
        if not 0 <= self.adt <= 1 or not 0 <= self.finetune_drop <= 1 or self.checkpoint_every < 1:
            raise ValueError(f"BcdConfig: adt and finetune_drop must lie in [0, 1]; got {self}")
        if self.eval_samples is not None and self.eval_samples < 1:
            raise ValueError(f"BcdConfig: eval_samples must be >= 1 or None, got {self.eval_samples}")
        if self.warm_finetune < 0 or self.end_finetune < 0:
            raise ValueError(f"BcdConfig: warm_finetune and end_finetune must be >= 0 epochs; got {self}")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class BcdResult:
    """Outcome of :func:`bcd_linearize`.

    Attributes:
        mask: (U,) bool final flat mask.
        live_relus: ReLUs left (at most the budget).
        val_accuracy: validation accuracy at the end (before any final fine-tune by the caller).
        history: one ``(live_relus, val_accuracy, event)`` per accepted block or fine-tune.
        removed: (R,) int64 units in removal order (each once).
        finetune_rounds, forced: fine-tunes done; blocks accepted beyond ``adt``.
        ledger: compute spent by this call (and before, when resumed).
        finished: False when stopped early by ``max_steps``.
    """

    mask: np.ndarray
    live_relus: int
    val_accuracy: float
    history: list
    removed: np.ndarray
    finetune_rounds: int
    forced: int
    ledger: Ledger
    finished: bool


@torch.no_grad()
def evaluate_candidates(
    model: nn.Module,
    val: Split,
    candidates: np.ndarray,
    eval_batch: int = 4096,
    ledger: Ledger | None = None,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 4.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Validation accuracy and mean loss of the model under each of K flat masks.

    Args:
        candidates: (K, U) bool flat masks.
        teacher_logits: (len(val), classes) teacher outputs on ``val.x``; when given the loss is the
            fine-tuning objective ``CE + T^2 KL(teacher || student at T)``, else the cross-entropy.

    Returns:
        ``(accuracy, loss)``, both (K,) float64.
    """
    mods = [m for _, m in masked_relus(model)]
    cand = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
    k = cand.shape[0]
    start = 0
    for m in mods:
        n = m.mask.numel()
        m.candidates = cand[:, start : start + n].reshape(k, *m.mask.shape).to(m.mask.device)
        start += n
    correct = torch.zeros(k, dtype=torch.float64)
    loss = torch.zeros(k, dtype=torch.float64)
    chunk = max(1, eval_batch // k)
    was = model.training
    model.eval()
    try:
        for i in range(0, len(val), chunk):
            x, y = val.x[i : i + chunk], val.y[i : i + chunk]
            c = x.shape[0]
            logits = model(x.repeat(k, *([1] * (x.dim() - 1)))).view(k, c, -1)
            correct += (logits.argmax(2) == y).sum(1).double().cpu()
            flat = logits.reshape(k * c, -1)
            ce = F.cross_entropy(flat, y.repeat(k), reduction="none").view(k, c)
            if teacher_logits is not None:
                t = temperature
                target = F.log_softmax(teacher_logits[i : i + chunk] / t, 1).repeat(k, 1)
                kl = F.kl_div(F.log_softmax(flat / t, 1), target, log_target=True, reduction="none")
                ce = ce + t * t * kl.sum(1).view(k, c)
            loss += ce.sum(1).double().cpu()
            if ledger is not None:
                ledger.forward += k * c
    finally:
        for m in mods:
            m.candidates = None
        model.train(was)
    return (correct / len(val)).numpy(), (loss / len(val)).numpy()


def _sampling_weights(prior: np.ndarray | None, pool: np.ndarray, temperature: float | None):
    """Probabilities over ``pool`` for block sampling: uniform (None), or ``exp(-rank / temperature)``
    with rank in [0, 1] by ascending ``prior`` (the least important unit is the likeliest)."""
    if temperature is None or prior is None or pool.size < 2:
        return None
    rank = np.empty(pool.size)
    rank[np.argsort(prior[pool], kind="stable")] = np.arange(pool.size) / (pool.size - 1)
    w = np.exp(-rank / temperature)
    return w / w.sum()


def _save(path: Path, model: nn.Module, config: BcdConfig, state: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    arrays = {f"w/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    arrays["mask"] = flat_mask(model)
    arrays["removed"] = np.asarray(state["removed"], np.int64)
    tmp = path / "bcd_state.tmp.npz"
    np.savez(tmp, **arrays)
    meta = {
        "format": _STATE_FORMAT,
        "format_version": _STATE_VERSION,
        "config": config.to_json(),
        **{k: v for k, v in state.items() if k != "removed"},
    }
    tmp_json = path / "bcd_state.tmp.json"
    tmp_json.write_text(json.dumps(meta))
    os.replace(tmp, path / "bcd_state.npz")
    os.replace(tmp_json, path / "bcd_state.json")


def _load(path: Path, model: nn.Module, config: BcdConfig) -> dict | None:
    if not (path / "bcd_state.json").exists():
        return None
    try:
        meta = json.loads((path / "bcd_state.json").read_text())
        with np.load(path / "bcd_state.npz", allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise ArtifactError(
            f"BCD checkpoint in {path} is unreadable ({exc}); delete it to start over"
        ) from None
    if meta.get("format") != _STATE_FORMAT or meta.get("format_version") != _STATE_VERSION:
        raise ArtifactError(f"{path}: not a BCD checkpoint of format version {_STATE_VERSION}")
    if meta["config"] != json.loads(json.dumps(config.to_json())):
        raise ArtifactError(
            f"{path}: checkpoint was written with a different BcdConfig ({meta['config']}); "
            "use the same settings or another checkpoint folder"
        )
    state = {k[2:]: torch.from_numpy(v) for k, v in arrays.items() if k.startswith("w/")}
    model.load_state_dict(state)
    set_flat_mask_(model, arrays["mask"])
    meta["removed"] = arrays["removed"].tolist()
    return meta


def _finetune_round(
    model, teacher_logits, train, val, config, state, ledger, live, event, epochs=None
) -> None:
    gen = torch.Generator().manual_seed(config.seed * 1_000_003 + state["rounds"] + 1)
    ft = config.finetune if epochs is None else dataclasses.replace(config.finetune, epochs=epochs)
    finetune_(model, teacher_logits, train, ft, generator=gen, ledger=ledger)
    state["rounds"] += 1
    a = float(evaluate_candidates(model, val, flat_mask(model)[None], config.eval_batch, ledger)[0][0])
    state["acc"] = state["acc_ref"] = a
    state["history"].append([live, a, event])


def bcd_linearize(
    model: nn.Module,
    teacher_logits: torch.Tensor,
    train: Split,
    val: Split,
    config: BcdConfig,
    *,
    checkpoint: str | Path | None = None,
    max_steps: int | None = None,
    ledger: Ledger | None = None,
    progress: bool = False,
    val_teacher_logits: torch.Tensor | None = None,
    prior: np.ndarray | None = None,
) -> BcdResult:
    """Remove ReLUs from a linearized ``model`` (in place) by block coordinate descent to the budget.

    Args:
        model: after :func:`~convexedge.host.linearize.linearize_`, its mask the warm start.
        teacher_logits: (N, classes) original model outputs on ``train.x`` (for fine-tuning).
        train: fine-tuning split; ``val``: the split the block removals are judged on.
        config: see :class:`BcdConfig`.
        checkpoint: folder to save to every ``checkpoint_every`` accepted blocks and at the end;
            when it already holds a state of the same config, the run resumes from it.
        max_steps: stop after this many loop steps (accepted, forced or fine-tune) in this call.
        ledger: compute is added to it.
        progress: tqdm bar with the live ReLU count and validation accuracy.
        val_teacher_logits: (len(val), classes) teacher outputs on ``val.x``; needed by
            ``select="kd"`` (the caller charges their forward pass).
        prior: (U,) float importance of each unit (SNL's scores of the warm start); with
            ``config.prior_temperature`` set, blocks are sampled with weights
            ``exp(-rank / prior_temperature)``, rank in [0, 1] from the least important live unit.

    Raises:
        ArtifactError: a checkpoint that cannot be read or was written with another config.
    """
    costs = unit_costs(model)
    if config.select == "kd" and (val_teacher_logits is None or len(val_teacher_logits) != len(val)):
        raise ValueError("BCD select='kd' needs val_teacher_logits, one row per validation sample")
    if config.prior_temperature is not None and (prior is None or len(prior) != len(costs)):
        raise ValueError("BCD prior_temperature needs prior, one score per mask unit")
    ledger = ledger if ledger is not None else Ledger()
    ckpt = None if checkpoint is None else Path(checkpoint)
    state = _load(ckpt, model, config) if ckpt is not None else None
    if state is None:
        rng = np.random.default_rng(config.seed)
        acc = float(evaluate_candidates(model, val, flat_mask(model)[None], config.eval_batch, ledger)[0][0])
        live0 = int((flat_mask(model) * costs).sum())
        state = {
            "rng": rng.bit_generator.state,
            "acc": acc,
            "acc_ref": acc,
            "rounds": 0,
            "forced": 0,
            "just_finetuned": False,
            "since_checkpoint": 0,
            "history": [[live0, acc, "start"]],
            "removed": [],
            "ledger": ledger.to_json(),
        }
    else:
        rng = rng_from_state(state["rng"])
        led = state["ledger"]
        ledger.forward, ledger.train, ledger.seconds = led["forward"], led["train"], led["seconds"]
        log.info("BCD resumed from %s at %d ReLUs", ckpt, state["history"][-1][0])
    mask = flat_mask(model)
    live = int((mask * costs).sum())

    def do_finetune(event: str, epochs: float | None = None) -> None:  # at the current ``live``
        _finetune_round(model, teacher_logits, train, val, config, state, ledger, live, event, epochs)

    if config.warm_finetune > 0 and state["rounds"] == 0 and len(state["history"]) == 1:
        t_start = time.perf_counter()
        do_finetune("finetune (warm start)", config.warm_finetune)
        ledger.seconds += time.perf_counter() - t_start
    removed_set = set(state["removed"])
    teacher_val = val_teacher_logits if config.select == "kd" else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max(0, live - config.budget), desc=f"BCD -> {config.budget}", unit="relu")
        bar.set_postfix(relus=live, val=f"{state['acc']:.4f}")
    t0 = time.perf_counter()
    steps = 0

    def checkpoint_now() -> None:
        ledger.seconds += time.perf_counter() - t0_box[0]
        t0_box[0] = time.perf_counter()
        state["rng"] = rng.bit_generator.state
        state["ledger"] = ledger.to_json()
        if ckpt is not None:
            _save(ckpt, model, config, state)
        state["since_checkpoint"] = 0

    t0_box = [t0]
    try:
        while live > config.budget and (max_steps is None or steps < max_steps):
            steps += 1
            remaining = live - config.budget
            live_idx = np.flatnonzero(mask)
            fits = live_idx[costs[live_idx] <= remaining]
            pool = fits if fits.size else live_idx[np.argsort(costs[live_idx], kind="stable")[:1]]
            size = int(min(config.drc, pool.size, remaining if costs[pool].max() == 1 else config.drc))
            weights = _sampling_weights(prior, pool, config.prior_temperature)
            blocks = np.stack([rng.choice(pool, size, replace=False, p=weights) for _ in range(config.rt)])
            if costs[pool].max() > 1:  # channel units: trim each block to the remaining count
                blocks = [b[np.cumsum(costs[b]) <= max(remaining, int(costs[b[0]]))] for b in blocks]
                size = min(len(b) for b in blocks)
                blocks = np.stack([b[:size] for b in blocks])
            cands = np.repeat(mask[None], config.rt, 0)
            for k, b in enumerate(blocks):
                cands[k, b] = False
            if config.eval_samples is not None and config.eval_samples < len(val):
                # a fresh random subset per step, the current mask scored on it too (candidate 0)
                pick = torch.from_numpy(np.sort(rng.choice(len(val), config.eval_samples, replace=False)))
                sub = Split(val.x[pick.to(val.x.device)], val.y[pick.to(val.y.device)])
                acc, loss = evaluate_candidates(
                    model,
                    sub,
                    np.concatenate([mask[None], cands]),
                    config.eval_batch,
                    ledger,
                    None if teacher_val is None else teacher_val[pick.to(teacher_val.device)],
                    config.finetune.temperature,
                )
                current, acc, loss = float(acc[0]), acc[1:], loss[1:]
            else:
                acc, loss = evaluate_candidates(
                    model, val, cands, config.eval_batch, ledger, teacher_val, config.finetune.temperature
                )
                current = state["acc"]
            best = int(
                np.lexsort((loss, -acc))[0] if config.select == "accuracy" else np.lexsort((-acc, loss))[0]
            )
            drop = current - float(acc[best])
            if drop > config.adt and not state["just_finetuned"]:
                do_finetune("finetune (no block within adt)")
                state["just_finetuned"] = True
                continue
            block = blocks[best]
            if removed_set.intersection(block.tolist()) or not mask[block].all():
                raise RuntimeError("BCD internal error: a block holds a unit already removed")
            forced = drop > config.adt
            state["forced"] += int(forced)
            state["just_finetuned"] = False
            mask[block] = False
            set_flat_mask_(model, mask)
            removed_set.update(block.tolist())
            state["removed"].extend(int(u) for u in block)
            live -= int(costs[block].sum())
            state["acc"] -= drop  # exact on the full split; an estimate (accumulated drops) on subsets
            state["history"].append([live, state["acc"], "forced" if forced else "block"])
            if state["acc_ref"] - state["acc"] > config.finetune_drop and live > config.budget:
                do_finetune("finetune (accumulated drop)")
            state["since_checkpoint"] += 1
            if state["since_checkpoint"] >= config.checkpoint_every:
                checkpoint_now()
            if bar is not None:
                bar.update(int(costs[block].sum()))
                bar.set_postfix(relus=live, val=f"{state['acc']:.4f}")
        if live <= config.budget and config.end_finetune > 0 and not state.get("end_done", False):
            do_finetune("finetune (end)", config.end_finetune)
            state["end_done"] = True
    finally:
        if bar is not None:
            bar.close()
    checkpoint_now()
    return BcdResult(
        mask=mask.copy(),
        live_relus=live,
        val_accuracy=state["acc"],
        history=[list(h) for h in state["history"]],
        removed=np.asarray(state["removed"], np.int64),
        finetune_rounds=state["rounds"],
        forced=state["forced"],
        ledger=ledger,
        finished=live <= config.budget,
    )
