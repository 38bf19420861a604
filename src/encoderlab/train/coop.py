"""CoOp (Zhou et al. 2022, "Learning to Prompt for Vision-Language Models"): learn a prompt context on few shots.

The context vectors are the only parameters; the text tower is frozen (``requires_grad`` False while training) and
gradients flow through it to the context. Image features come from the embedding store, so no image tower runs.
Each step encodes every class prompt once and scores the batch's images against them with the model's own scores:
cross-entropy over ``logit_scale * cos`` for softmax models (CLIP, ALIGN, aligned pairs), SigLIP's pairwise
sigmoid loss over ``logit_scale * cos + logit_bias`` for sigmoid models.

Optimizer: the shared loop's AdamW (``train.loop.fit``), lr 2e-3, cosine decay, one epoch of linear warmup (capped
at a tenth of training by the loop), no weight decay. CoOp itself used SGD at lr 2e-3 with a constant 1e-5 warmup
epoch; the loop has AdamW only, and on these short runs AdamW at the same lr reaches CoOp's plateau in fewer epochs.
The number of epochs is chosen by early stopping on the validation items (never on test).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.base import Encoder
from ..encoders.prompted import CLASS_TOKEN_POSITIONS, PromptedTextTower, PromptLayout, prompted_tower
from ..errors import EncoderlabError
from .loop import LoopSettings, decay_groups, fit

#: CoOp's default context length without an init phrase
DEFAULT_N_CTX = 16
#: std of the random context init (CoOp: N(0, 0.02))
CTX_INIT_STD = 0.02


@dataclass(frozen=True)
class CoopConfig:
    """How to learn the context: its shape (``n_ctx``, ``ctx_init``, ``csc``, ``class_token``) and the loop."""

    n_ctx: int | None = None  # None: DEFAULT_N_CTX, or the token count of ctx_init
    ctx_init: str | None = None  # e.g. "a photo of a": n_ctx from its tokens, vectors from their embeddings
    csc: bool = False  # class-specific contexts instead of one shared (unified) context
    class_token: str = "end"
    epochs: int = 50
    lr: float = 2e-3
    batch_size: int = 32
    patience: int = 10
    weight_decay: float = 0.0
    warmup_epochs: int = 1

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "optimizer": "AdamW", "schedule": "cosine", "loss": "model scores (CE or sigmoid)"}


def resolve_n_ctx(config: CoopConfig, tower: PromptedTextTower) -> int:
    """The context length: from the init phrase's tokens when given (it must agree with an explicit n_ctx)."""
    if config.ctx_init is not None:
        if not config.ctx_init.strip():
            raise EncoderlabError("--ctx-init is empty", 'pass a phrase, e.g. --ctx-init "a photo of a"')
        n = len(tower.phrase_ids(config.ctx_init))
        if n == 0:
            raise EncoderlabError(f"--ctx-init {config.ctx_init!r} has no tokens", 'pass e.g. "a photo of a"')
        if config.n_ctx is not None and config.n_ctx != n:
            raise EncoderlabError(f"--n-ctx {config.n_ctx} disagrees with --ctx-init {config.ctx_init!r}, which is "
                                  f"{n} tokens", "drop --n-ctx (it follows from the phrase) or change the phrase")
        return n
    n = DEFAULT_N_CTX if config.n_ctx is None else config.n_ctx
    if int(n) != n or n < 1:
        raise EncoderlabError(f"--n-ctx must be a positive integer, got {n!r}", "use e.g. --n-ctx 16")
    return int(n)


def check_config(config: CoopConfig, encoder: Encoder, names: Sequence[str]) -> tuple[PromptedTextTower, int,
                                                                                        PromptLayout]:
    """Every check that needs no training, before any: the encoder, the shape, and that every prompt fits."""
    if config.class_token not in CLASS_TOKEN_POSITIONS:
        raise EncoderlabError(f"unknown --class-token {config.class_token!r}",
                              f"use one of {', '.join(CLASS_TOKEN_POSITIONS)}")
    LoopSettings(config.epochs, config.batch_size, config.lr, config.patience).check()
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise EncoderlabError(f"--lr must be a number > 0, got {config.lr!r}", "use e.g. --lr 0.002")
    tower = prompted_tower(encoder)
    n_ctx = resolve_n_ctx(config, tower)
    return tower, n_ctx, tower.layout(list(names), n_ctx, config.class_token)


def init_context(tower: PromptedTextTower, config: CoopConfig, n_ctx: int, n_classes: int, seed: int) -> torch.Tensor:
    """[1 or C, n_ctx, width]: the init phrase's token embeddings, else N(0, 0.02) from a seeded generator."""
    rows = n_classes if config.csc else 1
    if config.ctx_init is not None:
        return tower.phrase_embeddings(config.ctx_init)[None].repeat(rows, 1, 1)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(rows, n_ctx, tower.width, generator=gen) * CTX_INIT_STD


class PromptLearner(torch.nn.Module):
    """The learnable context and the prompt layout; ``forward()`` -> normalized class text features [C, dim].

    The tower is a plain attribute, not a submodule: ``state_dict`` (which the loop copies at every better epoch)
    holds only the context.
    """

    def __init__(self, tower: PromptedTextTower, layout: PromptLayout, ctx: torch.Tensor) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(ctx.clone().float())
        self._tower, self._layout = tower, layout

    def forward(self) -> torch.Tensor:
        return F.normalize(self._tower.features(self._layout, self.ctx).float(), dim=-1)


@contextlib.contextmanager
def frozen(module: torch.nn.Module) -> Iterator[None]:
    """Every parameter of ``module`` without gradients while the block runs (restored afterwards)."""
    before = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in before:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in before:
            p.requires_grad_(flag)


def class_logits(image: torch.Tensor, text: torch.Tensor, scale: float, bias: float | None) -> torch.Tensor:
    """``scale * cos (+ bias)`` of normalized image [B, d] and text [C, d] features."""
    logits = scale * image @ text.T
    return logits + bias if bias is not None else logits


def coop_loss(logits: torch.Tensor, y: torch.Tensor, sigmoid: bool) -> torch.Tensor:
    """Cross-entropy over classes, or SigLIP's loss: -log sigmoid(+-logit) over every (image, class) pair."""
    if not sigmoid:
        return F.cross_entropy(logits, y)
    sign = -torch.ones_like(logits)
    sign[torch.arange(len(y)), y] = 1.0
    return -F.logsigmoid(sign * logits).sum(dim=1).mean()


@dataclass
class CoopFit:
    """A learned context and how it was chosen: the epoch history, the best epoch, the val metric."""

    ctx: torch.Tensor
    n_ctx: int
    best_epoch: int
    best_metric: float
    history: list[dict[str, float]]
    fit_seconds: float
    chosen_by: str  # "val" (early stopping) or "fixed" (no validation items: every epoch ran)
    config: dict[str, Any] = field(default_factory=dict)


def fit_coop(encoder: Encoder, names: Sequence[str], X: np.ndarray, y: np.ndarray, X_val: np.ndarray | None,
             y_val: np.ndarray | None, config: CoopConfig, *, seed: int = 0, progress: bool = False) -> CoopFit:
    """Learn a context on image features ``X`` (class indices ``y`` into ``names``), early-stopped on val accuracy.

    Without validation items every epoch runs (the last one is kept) and ``chosen_by`` says "fixed".
    """
    tower, n_ctx, layout = check_config(config, encoder, names)
    if X.shape[0] == 0:
        raise EncoderlabError("coop has no training items", "give k >= 1 labelled images per class")
    sigmoid = encoder.score_kind == "sigmoid"
    scale = float(encoder.logit_scale if encoder.logit_scale is not None else 100.0)
    bias = encoder.logit_bias if sigmoid else None
    device = tower.device
    feats = F.normalize(torch.as_tensor(X, dtype=torch.float32), dim=-1).to(device)
    labels = torch.as_tensor(y, dtype=torch.long, device=device)
    has_val = X_val is not None and y_val is not None and len(y_val) > 0
    if has_val:
        val_feats = F.normalize(torch.as_tensor(X_val, dtype=torch.float32), dim=-1).to(device)
        val_labels = torch.as_tensor(y_val, dtype=torch.long, device=device)
    learner = PromptLearner(tower, layout, init_context(tower, config, n_ctx, len(names), seed)).to(device)

    def step(idx: torch.Tensor) -> torch.Tensor:
        idx = idx.to(device)
        return coop_loss(class_logits(feats[idx], learner(), scale, bias), labels[idx], sigmoid)

    epochs_seen = [0]

    def evaluate() -> tuple[float, dict[str, float]]:
        epochs_seen[0] += 1
        if not has_val:  # nothing to choose on: the latest epoch is the best one
            return float(epochs_seen[0]), {}
        with torch.no_grad():
            logits = class_logits(val_feats, learner(), scale, bias)
            acc = float((logits.argmax(dim=1) == val_labels).float().mean())
            loss = float(coop_loss(logits, val_labels, sigmoid))
        return acc, {"val_top1": acc, "val_loss": loss}

    steps = max(1, math.ceil(len(y) / config.batch_size))
    settings = LoopSettings(epochs=config.epochs, batch_size=config.batch_size, lr=config.lr,
                            patience=config.patience if has_val else config.epochs + 1,
                            warmup_steps=config.warmup_epochs * steps, seed=seed)
    groups = decay_groups(learner.named_parameters(), config.weight_decay)
    t0 = time.perf_counter()
    with frozen(tower.model), frozen(getattr(tower, "head", None) or torch.nn.Module()):
        result = fit(learner, step, len(y), groups, evaluate, settings, progress=progress, desc="coop")
    return CoopFit(learner.ctx.detach().cpu().clone(), n_ctx, result.best_epoch, result.best_metric, result.history,
                   time.perf_counter() - t0, "val" if has_val else "fixed",
                   {**config.describe(), "n_ctx": n_ctx, "seed": seed, "total_steps": result.total_steps,
                    "warmup_steps": result.warmup_steps})


def prompt_features(encoder: Encoder, names: Sequence[str], ctx: torch.Tensor, config: CoopConfig,
                    n_ctx: int) -> torch.Tensor:
    """Normalized class text features [C, dim] of a learned context (no gradients)."""
    tower = prompted_tower(encoder)
    layout = tower.layout(list(names), n_ctx, config.class_token)
    with torch.no_grad():
        return F.normalize(tower.features(layout, ctx).float(), dim=-1).cpu()
