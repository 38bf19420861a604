"""One training loop for every trainer (align, CoOp, fine-tuning): AdamW over decay groups, scheduled lr, gradient
accumulation and clipping, mixed precision on CUDA, early stopping on a val metric, checkpoints with exact resume.

The loop knows nothing about the model: the client passes a step function (the loss of a batch of item indices),
the parameter groups, and an evaluation callback (a validation metric, higher is better, plus record fields). It
shuffles indices with its own seeded generator, so a fit is deterministic for a seed and leaves the global RNG alone
(a resume restores it to where the interrupted run had it). The trainable state of the best epoch is kept and
loaded back at the end. Checkpoints are ``checkpoint``'s business; the loop only says when and what.

Under torchrun (an initialised process group, see ``distributed``) the same fit runs data-parallel: every rank
draws the same permutation, trains on its shard of every batch, and the gradients are averaged over ranks before
each optimizer step, so the ranks stay identical and the run follows the single-process one on the same global
batches. All ranks evaluate; rank 0's metric is broadcast, so early stopping agrees everywhere. Only rank 0 writes
checkpoints (with every rank's RNG states); every rank resumes from the same file.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import EncoderlabError
from ..progress import progress_bar
from . import checkpoint
from . import distributed as dp
from .schedule import capped_warmup, check_schedule, lr_at, steps_per_epoch

#: name fragments of parameters that get no weight decay (besides every parameter with fewer than 2 dims); CoOp's
#: learned prompt context is a 2-D matrix of token embeddings, and decaying it pulls the prompt towards nothing
NO_DECAY: tuple[str, ...] = ("bias", "norm", "logit_scale", "logit_bias", "temperature", "prompt", "ctx")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")

StepFn = Callable[[torch.Tensor], torch.Tensor]  # item indices of one batch -> scalar loss (with a graph)
EvalFn = Callable[[], tuple[float, dict[str, float]]]  # -> (val metric, higher is better; extra record fields)


@dataclass(frozen=True)
class LoopSettings:
    """How long and how fast to train; ``warmup_steps`` is capped at a tenth of all (optimizer) steps."""

    epochs: int
    batch_size: int
    lr: float
    patience: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    seed: int = 0
    max_norm: float | None = None  # gradient clipping (total L2 norm over all parameters); None: no clipping
    accumulate: int = 1  # batches per optimizer step (their losses averaged); the schedule counts optimizer steps
    precision: str = "auto"  # CUDA: auto = bf16 where supported, else fp16 (with a GradScaler); CPU: always fp32

    def check(self) -> None:
        """Fail on values the loop cannot run with, naming the bad one."""
        for name in ("epochs", "batch_size", "patience", "accumulate"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise EncoderlabError(f"{name} must be a positive integer, got {value!r}", f"pass {name}=1 or more")
        check_schedule(self.schedule)
        if self.max_norm is not None and not self.max_norm > 0:
            raise EncoderlabError(f"max_norm must be positive or None, got {self.max_norm!r}", "pass e.g. 1.0")
        if self.precision not in PRECISIONS:
            raise EncoderlabError(f"unknown precision {self.precision!r}", f"use one of {', '.join(PRECISIONS)}")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision a fit runs in: fp32 on CPU (bf16 autocast is slower than fp32 on common CPUs), else as asked."""
    if device.type != "cuda":
        if precision in ("bf16", "fp16"):
            warnings.warn(f"precision {precision} is for CUDA; training on {device.type} runs in fp32", stacklevel=4)
        return "fp32"
    if precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return precision


def run_settings(settings: LoopSettings, precision: str) -> dict[str, Any]:
    """The loop's part of a checkpoint's settings: every field, with the ``precision`` it actually runs in."""
    return {**dataclasses.asdict(settings), "precision": precision}


@dataclass
class FitResult:
    """What ``fit`` did: one record per epoch, the selected epoch and its model state."""

    history: list[dict[str, float]]
    best_epoch: int
    best_metric: float
    best_state: dict[str, Any]
    total_steps: int
    warmup_steps: int
    precision: str = "fp32"
    resumed_at: int = 0  # optimizer steps restored from a checkpoint (0: started fresh)
    world: int = 1  # processes that trained together (data-parallel when > 1)


def decay_groups(
    named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, no_decay: Sequence[str] = NO_DECAY
) -> list[dict[str, Any]]:
    """AdamW parameter groups: decay on weight matrices; none on biases, norm weights, temperatures, prompt contexts.

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
    """AdamW whose lr follows ``lr_at`` of the step count, with clipping and (CUDA) autocast plus a GradScaler."""

    def __init__(self, param_groups: list[dict[str, Any]], settings: LoopSettings, total_steps: int) -> None:
        self.opt = torch.optim.AdamW(param_groups, lr=settings.lr)
        self.params = [p for g in self.opt.param_groups for p in g["params"]]
        self.settings, self.total_steps = settings, total_steps
        self.warmup = capped_warmup(settings.warmup_steps, total_steps)
        self.steps = 0
        self.device = self.params[0].device
        self.precision = resolve_precision(settings.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def lr(self, at: int) -> float:
        """The learning rate of step ``at``."""
        return lr_at(at, self.total_steps, self.settings.lr, self.warmup, self.settings.schedule)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The context of a step function's forward: autocast in bf16/fp16 on CUDA, nothing in fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def zero_grad(self) -> None:
        """Start a new accumulation group (``set_to_none``: the first backward writes instead of adding)."""
        self.opt.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of ``loss`` (scaled for fp16; the scale is undone before clipping)."""
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """Clip the accumulated gradient, take one optimizer step at the scheduled lr, clear the gradient next time."""
        self.scaler.unscale_(self.opt)  # clipping and the lr act on true gradients
        if self.settings.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.settings.max_norm)
        for group in self.opt.param_groups:
            group["lr"] = self.lr(self.steps)
        self.scaler.step(self.opt)  # skips the step when an fp16 gradient overflowed; the schedule moves on
        self.scaler.update()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        return {"opt": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["opt"])
        if state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = state["steps"]


@dataclass
class RunState:
    """Where a fit is, besides model, optimizer and RNG states: what a checkpoint needs to continue exactly."""

    epoch: int = 1  # the epoch in progress
    position: int = 0  # its batches done (a whole number of optimizer steps)
    order: torch.Tensor | None = None  # its permutation of the items, drawn when it starts
    loss_sum: float = 0.0  # item-weighted loss over its batches done
    seconds: float = 0.0  # its time before this process took over
    history: list[dict[str, float]] = field(default_factory=list)
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None  # (metric, epoch, trainable state)
    complete: bool = False


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
    checkpoint_dir: Path | None = None,
    checkpoint_every: int | None = None,
    resume: bool = True,
    run_config: dict[str, Any] | None = None,
    distributed: bool | None = None,
) -> FitResult:
    """Train ``model`` for up to ``settings.epochs`` epochs over ``n_items`` items; keep the best val epoch.

    Each epoch visits a seeded permutation of the items in near-equal batches (a small remainder batch would have
    few negatives for a contrastive loss); the optimizer steps every ``settings.accumulate`` batches (and at the
    epoch's end), on the mean of their losses. ``after_step`` runs after every optimizer step (e.g. clamping a
    temperature). Training stops after ``settings.patience`` epochs without a better metric; the best state is
    loaded back into ``model`` and returned.

    With ``checkpoint_dir`` a checkpoint is written there after every epoch and every ``checkpoint_every``
    optimizer steps; ``resume`` continues from it (failing first when ``settings``, the data size, the trainable
    parameters or the client's ``run_config``, a JSON-able record of what else changes the result, differ), or
    starts over. The finished run's checkpoint is marked complete: fitting again returns the same result at once.

    ``distributed``: None trains data-parallel when a process group of several processes is initialised (torchrun
    and ``distributed.init_from_env``), True requires one, False trains this process alone even inside one. Then
    ``settings.batch_size`` is the global batch: each rank's ``step`` gets its equal share of every batch (a
    contrastive step gathers the others' with ``losses.symmetric_infonce_global``), ``n_items % world`` items of
    each epoch's permutation are left out (``distributed.shard_indices``), and ``evaluate`` runs on every rank.
    """
    settings.check()
    if n_items < 1:
        raise EncoderlabError("nothing to train on (0 items)", "pass a non-empty training set")
    if checkpoint_every is not None and (int(checkpoint_every) != checkpoint_every or checkpoint_every < 1):
        raise EncoderlabError(f"checkpoint_every must be a positive integer, got {checkpoint_every!r}",
                              "pass e.g. checkpoint_every=100 optimizer steps, or None for epoch ends only")
    world, rank = _parallel(distributed)
    if n_items < world:
        raise EncoderlabError(f"{n_items} items cannot be shared by {world} processes",
                              f"train on at least {world} items or start fewer processes")
    if world > 1 and settings.batch_size < world:
        raise EncoderlabError(f"batch_size {settings.batch_size} is smaller than the {world} processes sharing it",
                              f"pass batch_size={world} or more (it is the global batch, split across processes)")
    loop = _Loop(model, step, n_items, param_groups, evaluate, settings, after_step, world, rank,
                 Path(checkpoint_dir) if checkpoint_dir is not None else None, checkpoint_every, run_config)
    resumed_at = loop.start(resume)
    remaining = 0 if loop.run.complete else (settings.epochs - loop.run.epoch + 1) * loop.n_batches - loop.run.position
    loop.bar = progress_bar(remaining, "batch", progress and rank == 0, desc=desc)  # batches: an ETA that moves
    try:
        while not loop.run.complete:
            loop.epoch()
    finally:
        loop.bar.close()
    run, optim = loop.run, loop.optim
    assert run.best is not None  # epochs >= 1
    metric, best_epoch, state = run.best
    checkpoint.load_trainable_state(model, state)
    return FitResult(run.history, best_epoch, metric, copy.deepcopy(model.state_dict()), optim.total_steps,
                     optim.warmup, optim.precision, resumed_at, world)


class _Loop:
    """The state of one ``fit`` and its three moves: start (or resume), one epoch, save a checkpoint."""

    def __init__(self, model: torch.nn.Module, step: StepFn, n_items: int, param_groups: list[dict[str, Any]],
                 evaluate: EvalFn, settings: LoopSettings, after_step: Callable[[], None] | None, world: int,
                 rank: int, checkpoint_dir: Path | None, checkpoint_every: int | None,
                 run_config: dict[str, Any] | None) -> None:
        self.model, self.step_fn, self.n_items, self.evaluate = model, step, n_items, evaluate
        self.settings, self.after_step, self.world, self.rank = settings, after_step, world, rank
        self.checkpoint_dir, self.checkpoint_every = checkpoint_dir, checkpoint_every
        self.n_used = n_items - n_items % world  # what the ranks' equal shards cover
        self.n_batches = steps_per_epoch(self.n_used, settings.batch_size)
        self.optim = ScheduledAdamW(param_groups, settings,
                                    settings.epochs * math.ceil(self.n_batches / settings.accumulate))
        self.gen = torch.Generator().manual_seed(settings.seed)  # its own stream: the global RNG is left alone
        self.run = RunState()
        self.bar: Any = None
        # everything that changes the result: a checkpoint written under other values is refused, not resumed
        self.expected: dict[str, Any] = {
            "loop": run_settings(settings, self.optim.precision), "items": n_items, "client": run_config or {},
            "trainable": {k: list(v.shape) for k, v in checkpoint.trainable_state(model).items()}}
        if world > 1:  # other shards, other batches: a checkpoint of another world size does not continue this run
            self.expected["world"] = world

    def start(self, resume: bool) -> int:
        """Restore a checkpoint when there is one (and ``resume``); returns the optimizer step it resumed at."""
        resumed_at = 0
        if self.checkpoint_dir is not None:
            resumed_at = _restore(self.checkpoint_dir, self.expected, resume, self.model, self.optim, self.gen,
                                  self.run, self.world, self.rank)
        if self.world > 1:  # what DDP does at construction: every rank starts from rank 0's weights
            dp.broadcast_tensors(list(checkpoint.trainable_state(self.model).values()))
        return resumed_at

    def save(self) -> None:
        if self.checkpoint_dir is None:
            return
        run, world = self.run, self.world
        payload: dict[str, Any] = {"rng": checkpoint.rng_states(self.gen)}
        if world > 1:
            _sync_buffers(self.model)  # rank 0's buffers are saved: make them everyone's, so a resume changes nothing
            # each rank's own RNGs and running loss; the rest of the state is the same on every rank
            payload["ranks"] = dp.gather_objects({"rng": payload["rng"], "loss_sum": run.loss_sum})
        if self.rank == 0:
            payload.update(settings=checkpoint.plain(self.expected), run=dict(vars(run)),
                           model=checkpoint.trainable_state(self.model), optimizer=self.optim.state_dict())
            checkpoint.save(self.checkpoint_dir, payload)
        if world > 1:  # no rank runs ahead of a checkpoint that may not exist yet
            dp.barrier()

    def epoch(self) -> None:
        """Train the rest of the current epoch (from ``run.position`` on a resume), evaluate, save."""
        run, optim, settings, world = self.run, self.optim, self.settings, self.world
        epoch, started = run.epoch, time.perf_counter() - run.seconds
        if run.order is None:
            run.order = torch.randperm(self.n_items, generator=self.gen)
        # this rank's shard in as many batches as every rank: batch b of the run is the union of the ranks' b
        batches = torch.tensor_split(dp.shard_indices(run.order, self.rank, world), self.n_batches)
        seen = sum(len(b) for b in batches[: run.position])
        acc, n_batches = settings.accumulate, self.n_batches
        self.model.train()
        for b in range(run.position, n_batches):
            first = b - b % acc
            size = min(acc, n_batches - first)  # the epoch's last group may be short: still a mean
            if b == first:
                optim.zero_grad()
            with optim.autocast():
                loss = self.step_fn(batches[b])
            optim.backward(loss / size)
            run.loss_sum += loss.item() * len(batches[b])
            seen += len(batches[b])
            self.bar.update(1)
            if b + 1 < first + size:
                continue
            if world > 1:
                dp.average_gradients(optim.params)  # before clipping: the ranks clip the same total norm
            optim.step()
            if self.after_step is not None:
                self.after_step()
            run.position = b + 1
            self.bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{run.loss_sum / seen:.3f}",
                                 val=f"{run.history[-1]['val_metric']:.3f}" if run.history else "-", refresh=False)
            if self.checkpoint_every and optim.steps % self.checkpoint_every == 0 and run.position < n_batches:
                run.seconds = time.perf_counter() - started
                self.save()
        self.end_epoch(epoch, started)

    def end_epoch(self, epoch: int, started: float) -> None:
        """Evaluate, record, keep the best state, decide whether to stop, checkpoint."""
        run, optim, settings, world = self.run, self.optim, self.settings, self.world
        self.model.eval()
        loss_sum = run.loss_sum
        if world > 1:
            _sync_buffers(self.model)
            loss_sum = dp.sum_float(loss_sum, optim.device)  # the local losses are means over equal shards
        metric, fields = self.evaluate()
        if world > 1:  # rank 0's numbers everywhere: the same history, best epoch and stopping decision
            metric, fields = dp.broadcast_object((metric, fields))
        record = {"epoch": epoch, "train_loss": loss_sum / self.n_used, **fields}
        record.setdefault("val_metric", metric)
        record.update(lr=optim.lr(optim.steps - 1), seconds=time.perf_counter() - started)
        run.history.append({k: v.item() if hasattr(v, "item") else v for k, v in record.items()})  # no numpy
        if run.best is None or metric > run.best[0]:
            run.best = (metric, epoch, checkpoint.trainable_state(self.model, clone=True))
        self.bar.set_postfix(epoch=f"{epoch}/{settings.epochs}", loss=f"{record['train_loss']:.3f}",
                             val=f"{metric:.3f}", best=run.best[1])
        run.complete = epoch == settings.epochs or epoch - run.best[1] >= settings.patience
        run.epoch, run.position, run.order, run.loss_sum, run.seconds = epoch + 1, 0, None, 0.0, 0.0
        self.save()


def _parallel(distributed: bool | None) -> tuple[int, int]:
    """(world, rank) of this fit: the process group's when it trains data-parallel, else (1, 0)."""
    if distributed is None:
        distributed = dp.active()
    if not distributed:
        return 1, 0
    if not dp.active():
        raise EncoderlabError("fit(distributed=True) needs an initialised process group of 2 or more processes",
                              "launch with torchrun --nproc_per_node N and call train.distributed.init_from_env()")
    return dp.world(), dp.rank()


def _sync_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (norm statistics) on every rank, as DDP's ``broadcast_buffers`` keeps them."""
    dp.broadcast_tensors(list(model.buffers()))


def _restore(directory: Path, expected: dict[str, Any], resume: bool, model: torch.nn.Module,
             optim: ScheduledAdamW, gen: torch.Generator, run: RunState, world: int = 1, rank: int = 0) -> int:
    """Continue from the checkpoint in ``directory`` (its settings checked first); returns the steps restored.

    Data-parallel, rank 0 alone tidies the directory; then every rank reads the same file (one node, or storage
    all nodes share) and takes the shared state from it and its own RNG states and running loss.
    """
    if rank == 0:
        checkpoint.remove_stale_temps(directory)
        if not resume:
            checkpoint.remove(directory)
    if world > 1:  # nobody reads what rank 0 is still removing
        dp.barrier()
    if not resume:
        return 0
    ckpt = checkpoint.load(directory)
    if ckpt is None:
        return 0
    saved_world = ckpt["settings"].get("world", 1)
    if saved_world != world:
        raise EncoderlabError(f"checkpoint in {str(directory)!r} was written by {saved_world} process(es), this run "
                              f"has {world}", f"resume with the same number of processes, or {checkpoint.FIX}")
    checkpoint.check_settings(ckpt, expected, directory)
    checkpoint.load_trainable_state(model, ckpt["model"])
    optim.load_state_dict(ckpt["optimizer"])
    for name, value in ckpt["run"].items():
        setattr(run, name, value)
    own = ckpt["ranks"][rank] if world > 1 else {"rng": ckpt["rng"], "loss_sum": run.loss_sum}
    checkpoint.set_rng_states(own["rng"], gen)
    run.loss_sum = own["loss_sum"]
    return optim.steps
