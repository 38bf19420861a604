"""One training loop for every trainer: AdamW over decay groups, scheduled lr, early stopping on a val metric.

The loop knows nothing about the model: the client passes a step function (the loss of a batch of item indices),
the parameter groups, and an evaluation callback (a validation metric, higher is better, plus record fields). It
shuffles indices with its own seeded generator, so a fit is deterministic for a seed and leaves the global RNG alone.
The state of the best epoch is kept (a deep copy of ``model.state_dict()``) and loaded back at the end.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EncoderlabError
from ..progress import progress_bar
from .schedule import capped_warmup, check_schedule, lr_at, steps_per_epoch

#: name fragments of parameters that get no weight decay (besides every parameter with fewer than 2 dims)
NO_DECAY: tuple[str, ...] = ("bias", "norm", "logit_scale", "logit_bias", "temperature")

StepFn = Callable[[torch.Tensor], torch.Tensor]  # item indices of one batch -> scalar loss (with a graph)
EvalFn = Callable[[], tuple[float, dict[str, float]]]  # -> (val metric, higher is better; extra record fields)


@dataclass(frozen=True)
class LoopSettings:
    """How long and how fast to train; ``warmup_steps`` is capped at a tenth of all steps (``capped_warmup``)."""

    epochs: int
    batch_size: int
    lr: float
    patience: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    seed: int = 0
    max_norm: float | None = None  # gradient clipping (total L2 norm over all parameters); None: no clipping

    def check(self) -> None:
        """Fail on values the loop cannot run with, naming the bad one."""
        for name in ("epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise EncoderlabError(f"{name} must be a positive integer, got {value!r}", f"pass {name}=1 or more")
        check_schedule(self.schedule)
        if self.max_norm is not None and not self.max_norm > 0:
            raise EncoderlabError(f"max_norm must be positive or None, got {self.max_norm!r}", "pass e.g. 1.0")


@dataclass
class FitResult:
    """What ``fit`` did: one record per epoch, the selected epoch and its model state."""

    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    best_state: dict[str, Any]
    total_steps: int
    warmup_steps: int


def decay_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, no_decay: Sequence[str] = NO_DECAY
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices; none on biases, norm weights and temperatures.

    A parameter is exempt when it has fewer than 2 dims (biases, norm scales, scalar temperatures) or its name
    contains one of ``no_decay``; frozen parameters (``requires_grad=False``) are left out. Empty groups are dropped.
    Each group carries the parameter ``names`` (ignored by the optimizer) so tests and logs can see the split.
    """
    decay: dict[str, list[Any]] = {"params": [], "names": []}
    exempt: dict[str, list[Any]] = {"params": [], "names": []}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        group = exempt if param.ndim < 2 or any(token in name for token in no_decay) else decay
        group["params"].append(param)
        group["names"].append(name)
    groups = [{**decay, "weight_decay": weight_decay}, {**exempt, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class ScheduledAdamW:
    """AdamW whose lr follows ``lr_at`` as a function of the step count, with optional gradient clipping."""

    def __init__(self, param_groups: list[dict[str, Any]], settings: LoopSettings, total_steps: int) -> None:
        self.opt = torch.optim.AdamW(param_groups, lr=settings.lr)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.settings, self.total_steps = settings, total_steps
        self.warmup = capped_warmup(settings.warmup_steps, total_steps)
        self.steps = 0

    def lr(self, at: int) -> float:
        """The learning rate of step ``at``."""
        return lr_at(at, self.total_steps, self.settings.lr, self.warmup, self.settings.schedule)

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, clip, and take one optimizer step at the scheduled lr."""
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.settings.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_norm)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.steps)
        self.opt.step()
        self.steps += 1


def fit(
    model: torch.nn.Module,
    step: StepFn,
    n_items: int,
    param_groups: list[dict[str, Any]],
    evaluate: EvalFn,
    settings: LoopSettings,
    *,
    after_step: Callable[[], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` for up to ``settings.epochs`` epochs over ``n_items`` items; keep the best val epoch.

    Each epoch visits a seeded permutation of the items in near-equal batches (a small remainder batch would have
    few negatives for a contrastive loss). ``after_step`` runs after every optimizer step (e.g. clamping a
    temperature). Training stops after ``settings.patience`` epochs without a better metric; the best state is
    loaded back into ``model`` and returned.
    """
    settings.check()
    if n_items < 1:
        raise EncoderlabError("nothing to train on (0 items)", "pass a non-empty training set")
    n_batches = steps_per_epoch(n_items, settings.batch_size)
    optim = ScheduledAdamW(param_groups, settings, settings.epochs * n_batches)
    gen = torch.Generator().manual_seed(settings.seed)  # its own stream: the global RNG is left alone
    history: list[dict[str, float]] = []
    best: tuple[float, int, dict[str, Any]] | None = None
    bar = progress_bar(settings.epochs, "epoch", progress, desc=desc)
    try:
        for epoch in range(1, settings.epochs + 1):
            started = time.perf_counter()
            model.train()
            loss_sum = 0.0
            for idx in torch.tensor_split(torch.randperm(n_items, generator=gen), n_batches):
                loss = step(idx)
                optim.step(loss)
                if after_step is not None:
                    after_step()
                loss_sum += loss.item() * len(idx)
            model.eval()
            metric, fields = evaluate()
            record = {"epoch": epoch, "train_loss": loss_sum / n_items, **fields}
            record.setdefault("val_metric", metric)
            record.update(lr=optim.lr(optim.steps - 1), seconds=time.perf_counter() - started)
            history.append(record)
            if best is None or metric > best[0]:
                best = (metric, epoch, copy.deepcopy(model.state_dict()))
            bar.update(1)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val=f"{metric:.3f}", best=best[1])
            if epoch - best[1] >= settings.patience:
                break
    finally:
        bar.close()
    assert best is not None  # epochs >= 1
    metric, best_epoch, state = best
    model.load_state_dict(state)
    return FitResult(history, best_epoch, metric, state, optim.total_steps, optim.warmup)
