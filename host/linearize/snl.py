"""SNL-style linearization (Cho et al., "Selective Network Linearization", ICML 2022), from its text.

Each masked ReLU gets a trainable score ``alpha`` in [0, 1] (starting at 1) and computes
``alpha * relu(x) + (1 - alpha) * x``. Weights and scores are trained together on

    CE(y, s) + T^2 KL(teacher || student at T)  +  lam * sum_units cost * |alpha|

with Adam (lr 1e-3), ``T = 4``. ``lam`` starts at 1e-5 and grows 1.1x after every epoch until the
number of ReLUs whose score is above the threshold (1e-2) is at most the budget. Then the mask is
binarized and the weights are fine-tuned with the mask fixed.

Departures, deliberate: scores are projected onto [0, 1] after each step (the paper leaves them
free); binarization keeps the ``budget`` highest-scoring ReLUs (all above-threshold ones when they
fit), so every method is compared at exactly the budget; one L1 path serves several budgets (a
snapshot is taken the first epoch the count falls to each), which costs the same as separate runs
stopped at each budget.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from convexedge.device.errors import ConvergenceWarning
from convexedge.host.linearize.masks import masked_relus, set_flat_mask_, unit_costs
from convexedge.host.linearize.train import FinetuneConfig, Ledger, Split, kd_loss

__all__ = ["SnlConfig", "SnlSnapshot", "apply_snapshot_", "binarize_scores", "snl_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class SnlConfig:
    """The L1 path of SNL."""

    lr: float = 1e-3  # Adam, weights
    alpha_lr: float | None = None  # Adam, scores (None: same as lr)
    lam: float = 1e-5  # initial L1 weight
    lam_growth: float = 1.1  # per epoch
    threshold: float = 1e-2  # a ReLU counts as live while its score is above this
    temperature: float = 4.0
    batch_size: int = 128
    max_epochs: int = 200
    epoch_fraction: float = 1.0  # training samples per "epoch" as a fraction of the split (reduced runs)

    def __post_init__(self) -> None:
        if self.lr <= 0 or (self.alpha_lr is not None and self.alpha_lr <= 0) or self.lam <= 0:
            raise ValueError(f"SnlConfig: lr, alpha_lr and lam must be positive, got {self}")
        if self.lam_growth < 1 or not 0 < self.threshold < 1 or self.max_epochs < 1:
            raise ValueError(
                f"SnlConfig: need lam_growth >= 1, 0 < threshold < 1, max_epochs >= 1; got {self}"
            )
        if not 0 < self.epoch_fraction <= 1 or self.batch_size < 1:
            raise ValueError(f"SnlConfig: need 0 < epoch_fraction <= 1 and batch_size >= 1; got {self}")


@dataclass
class SnlSnapshot:
    """The state of the L1 path the first time the live count reached ``budget``.

    ``scores`` (U,) float32 are the flat alphas; ``state`` the model's weights then; ``ledger`` the
    compute spent on the path up to that point (shared path, so this is what a run stopped there costs).
    """

    budget: int
    scores: np.ndarray
    state: dict
    epoch: int
    lam: float
    live_above_threshold: int
    ledger: Ledger
    converged: bool = True


def binarize_scores(scores: np.ndarray, costs: np.ndarray, budget: int) -> np.ndarray:
    """(U,) bool: the highest-scoring units whose total cost fits ``budget`` (greedy by score)."""
    order = np.argsort(-scores, kind="stable")
    cum = np.cumsum(costs[order])
    keep = np.zeros(scores.shape[0], bool)
    keep[order[cum <= budget]] = True
    return keep


def _attach_scores(model: nn.Module) -> list[nn.Parameter]:
    params = []
    for _, m in masked_relus(model):
        m.alpha = nn.Parameter(m.mask.clone())
        params.append(m.alpha)
    return params


def _detach_scores(model: nn.Module) -> None:
    for _, m in masked_relus(model):
        m.alpha = None


def snl_path(
    model: nn.Module,
    teacher_logits: torch.Tensor,
    train: Split,
    budgets: list[int],
    config: SnlConfig = SnlConfig(),  # noqa: B008 - frozen dataclass
    *,
    seed: int = 0,
    ledger: Ledger | None = None,
    progress: bool = False,
) -> dict[int, SnlSnapshot]:
    """Run SNL's growing-``lam`` L1 path on a linearized ``model`` and snapshot each budget.

    Args:
        model: a model after :func:`~convexedge.host.linearize.linearize_` (its masks are the start:
            units already off stay off). Trained in place; its masks are left unchanged.
        teacher_logits: (N, classes) outputs of the original model on ``train.x``.
        train: the training split.
        budgets: ReLU budgets (any order); one snapshot per budget.
        config: the path's hyperparameters.
        seed: data order.
        ledger: compute is added to it (and copied into each snapshot).
        progress: show a tqdm bar.

    Returns:
        ``{budget: SnlSnapshot}``. A budget not reached within ``max_epochs`` gets the last epoch's
        state with ``converged=False`` (and a :class:`ConvergenceWarning`).
    """
    if not budgets or any(int(b) < 0 for b in budgets):
        raise ValueError(f"budgets must be non-negative ReLU counts, got {budgets}")
    costs = unit_costs(model)
    ledger = ledger if ledger is not None else Ledger()
    todo = sorted({int(b) for b in budgets}, reverse=True)
    out: dict[int, SnlSnapshot] = {}
    scores = _attach_scores(model)
    cost_t = [
        torch.full_like(s, float(m.cost)) for s, (_, m) in zip(scores, masked_relus(model), strict=True)
    ]
    lam = [config.lam]
    gen = torch.Generator().manual_seed(seed)
    ft = FinetuneConfig(
        epochs=config.epoch_fraction,
        lr=config.lr,
        batch_size=config.batch_size,
        temperature=config.temperature,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.max_epochs, desc="SNL", unit="epoch")

    def l1() -> torch.Tensor:
        return lam[0] * sum((s.abs() * c).sum() for s, c in zip(scores, cost_t, strict=True))

    def snap(epoch: int, live: int, flat: np.ndarray, converged: bool, budget: int) -> SnlSnapshot:
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith(".alpha")}
        return SnlSnapshot(budget, flat, state, epoch, lam[0], live, copy.deepcopy(ledger), converged)

    ids = {id(s) for s in scores}
    opt = torch.optim.Adam(
        [
            {"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": scores, "lr": config.alpha_lr or config.lr},
        ],
        lr=config.lr,
    )
    start = time.perf_counter()
    try:
        for epoch in range(1, config.max_epochs + 1):
            _snl_epoch(model, opt, teacher_logits, train, ft, gen, ledger, scores, l1)
            flat = np.concatenate([s.detach().cpu().numpy().reshape(-1) for s in scores]).astype(np.float32)
            live = int(((flat > config.threshold) * costs).sum())
            ledger.seconds += time.perf_counter() - start
            start = time.perf_counter()
            while todo and live <= todo[0]:
                out[todo[0]] = snap(epoch, live, flat, True, todo[0])
                log.info(
                    "SNL reached %d ReLUs (budget %d) at epoch %d, lam %.3g", live, todo[0], epoch, lam[0]
                )
                todo.pop(0)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(relus=live, lam=f"{lam[0]:.2e}")
            if not todo:
                break
            lam[0] *= config.lam_growth
        for b in todo:
            warnings.warn(
                f"SNL did not reach budget {b} in {config.max_epochs} epochs ({live} ReLUs above threshold); "
                "raise max_epochs or lam_growth",
                ConvergenceWarning,
                stacklevel=2,
            )
            out[b] = snap(config.max_epochs, live, flat, False, b)
    finally:
        if bar is not None:
            bar.close()
        _detach_scores(model)
    return out


def _snl_epoch(model, opt, teacher_logits, train, ft, gen, ledger, scores, l1) -> None:
    """One (possibly partial) epoch of joint weight + score training, scores projected onto [0, 1]."""
    n = len(train)
    steps = max(1, int(round(ft.epochs * n / ft.batch_size)))
    order = torch.randperm(n, generator=gen)
    model.train()
    for i in range(steps):
        idx = order[(i * ft.batch_size) % n :][: ft.batch_size].to(train.x.device)
        loss = kd_loss(model(train.x[idx]), teacher_logits[idx], train.y[idx], ft.temperature) + l1()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s in scores:
                s.clamp_(0.0, 1.0)
        ledger.train += int(idx.shape[0])
    model.eval()


def apply_snapshot_(model: nn.Module, snapshot: SnlSnapshot, budget: int | None = None) -> np.ndarray:
    """Load ``snapshot``'s weights into ``model`` and binarize its scores to ``budget`` ReLUs.

    Returns the (U,) bool flat mask written into the model.
    """
    budget = snapshot.budget if budget is None else int(budget)
    model.load_state_dict(snapshot.state)
    mask = binarize_scores(snapshot.scores, unit_costs(model), budget)
    set_flat_mask_(model, mask)
    return mask
