"""Tip-Adapter-F (Zhang et al. 2022, "Tip-Adapter: Training-free Adaption of CLIP for Few-shot Classification"):
Tip-Adapter whose cache keys are fine-tuned.

The cache of :class:`~encoderlab.heads.tip.TipAdapter` is a good initialisation of a small learnable layer: the
"-F" variant makes the keys ``K`` trainable (the values stay the one-hot labels) and minimizes the cross-entropy
of the Tip-Adapter logits of the training items,

    logits(x) = logit_scale * x̂ Ŵᵀ + alpha * exp(-beta * (1 - x̂ Kᵀ)) V,

with the paper's recipe: AdamW (lr 1e-3, eps 1e-4, torch's weight decay 0.01), a cosine schedule, batch 256,
20 epochs, alpha and beta fixed while training. The keys start L2-normalized and are not re-normalized while
training (as in the authors' code), so a key may also learn how much it counts. Afterwards alpha and beta are
searched on validation data as for Tip-Adapter.

Differences from the paper, and why: the features are cached, so there is no image augmentation (each epoch sees
the same items); and with validation data the number of epochs is a knob too — the keys after each epoch
``0 .. epochs`` are scored on validation with their best (alpha, beta), and the earliest best epoch is kept (epoch
0 is Tip-Adapter itself, so tuning can reject a fine-tuning that only overfits the few shots). Without validation
data (the validation-free protocol) the paper's values are used as they are: 20 epochs, alpha 1, beta 5.5.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ._base import (
    number_grid,
)
from .tip import DEFAULT_ALPHAS, DEFAULT_BETAS, PAPER_ALPHA, PAPER_BETA, TipAdapter

#: the paper's fine-tuning recipe (section 3.2 and the authors' code)
PAPER_EPOCHS, PAPER_LR, PAPER_BATCH_SIZE = 20, 1e-3, 256


class TipAdapterF(TipAdapter):
    """Tip-Adapter with fine-tuned cache keys; epochs, alpha and beta chosen on validation data when there is some.

    Parameters (besides :class:`~encoderlab.heads.tip.TipAdapter`'s: ``zero_shot``, ``classes``, ``alphas``,
    ``betas``, ``logit_scale``, ``val_fraction``, ``seed``, ``scoring``, ``chunk_size``, ``device``, ``refit``)
    ----------
    epochs: fine-tuning epochs (the paper's 20); with validation data, the most that can be chosen.
    lr, batch_size, weight_decay: AdamW's learning rate, mini-batch size and decoupled weight decay.
    train_alpha, train_beta: alpha and beta of the logits while fine-tuning (the paper's defaults 1 and 5.5).
    seed: also seeds the mini-batch order, so a fit is deterministic.

    With ``refit`` the cache is rebuilt from train+val after tuning and fine-tuned again for ``best_epochs_``.
    Attributes: those of TipAdapter, plus ``best_epochs_``, ``epoch_sweep_`` (one dict per epoch: ``epochs``,
    ``alpha``, ``beta``, ``val_accuracy``, ``val_score`` of its best (alpha, beta)), ``loss_curve_`` (mean
    training loss per epoch of the final fine-tuning).
    """

    def __init__(self, zero_shot: Any, *, classes: Sequence[Any] | None = None,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, betas: Sequence[float] = DEFAULT_BETAS,
                 logit_scale: float | None = None, val_fraction: float = 0.2, seed: int = 0,
                 scoring: str = "accuracy", chunk_size: int = 4096, device: str | torch.device = "cpu",
                 refit: bool = True, epochs: int = PAPER_EPOCHS, lr: float = PAPER_LR,
                 batch_size: int = PAPER_BATCH_SIZE, weight_decay: float = 0.01, train_alpha: float = PAPER_ALPHA,
                 train_beta: float = PAPER_BETA, leave_one_out: bool = True) -> None:
        super().__init__(zero_shot, classes=classes, alphas=alphas, betas=betas, logit_scale=logit_scale,
                         val_fraction=val_fraction, seed=seed, scoring=scoring, chunk_size=chunk_size, device=device,
                         refit=refit)
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_decay = weight_decay
        self.train_alpha = train_alpha
        self.train_beta = train_beta
        self.leave_one_out = leave_one_out

    def _check_recipe(self) -> tuple[int, float, int, float, float, float]:
        epochs = number_grid([self.epochs], "epochs", integer=True, example="20")[0]
        lr = number_grid([self.lr], "lr", strict=True, example="0.001")[0]
        batch = number_grid([self.batch_size], "batch_size", integer=True, minimum=1, example="256")[0]
        wd = number_grid([self.weight_decay], "weight_decay", example="0.01")[0]
        alpha = number_grid([self.train_alpha], "train_alpha", example="1.0")[0]
        beta = number_grid([self.train_beta], "train_beta", strict=True, example="5.5")[0]
        return epochs, lr, batch, wd, alpha, beta

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> TipAdapterF:
        """Build the cache from ``(X, y)``, fine-tune its keys, choose epochs, alpha, beta on ``(X_val, y_val)``."""
        epochs, *_ = self._check_recipe()
        s = self._setup(X, y, X_val, y_val)  # the same checks, zero-shot rows and carve as TipAdapter
        feats, y_idx, tr, q_val, yv, f_all, y_all = s.feats, s.y_idx, s.tr, s.q_val, s.yv, s.f_all, s.y_all
        alphas, betas = s.alphas, s.betas

        self.sweep_: list[dict[str, Any]] = []
        self.epoch_sweep_: list[dict[str, Any]] = []
        if len(yv) == 0:
            keys = self._fine_tune(feats[tr], y_idx[tr], epochs)
            self.best_epochs_, self.best_alpha_, self.best_beta_ = epochs, PAPER_ALPHA, PAPER_BETA
            self._set_cache(keys, y_idx[tr])
        else:
            self._choose(feats[tr], y_idx[tr], q_val, yv, alphas, betas, epochs)
        if self.refit and len(y_all) > len(tr):
            self._set_cache(self._fine_tune(f_all, y_all, self.best_epochs_), y_all)
        return self

    def _choose(self, f: torch.Tensor, y: np.ndarray, q_val: torch.Tensor, yv: np.ndarray, alphas: list[float],
                betas: list[float], epochs: int) -> None:
        """Fine-tune on ``(f, y)``, scoring the keys after every epoch on validation; keep the earliest best."""
        best: tuple[float, int, torch.Tensor, list[dict[str, Any]]] | None = None

        def score_epoch(epoch: int, keys: torch.Tensor) -> None:
            nonlocal best
            self._set_cache(keys.detach().clone(), y)
            self.sweep_ = []
            alpha, beta = self._search(q_val, yv, alphas, betas)
            top = next(s for s in self.sweep_ if s["alpha"] == alpha and s["beta"] == beta)
            self.epoch_sweep_.append({"epochs": epoch, **top})
            if best is None or top["val_score"] > best[0]:  # strict: ties keep fewer epochs
                best = (top["val_score"], epoch, self._keys, self.sweep_)

        self._fine_tune(f, y, epochs, on_epoch=score_epoch)
        assert best is not None
        _, self.best_epochs_, keys, self.sweep_ = best
        chosen = self.epoch_sweep_[self.best_epochs_]
        self.best_alpha_, self.best_beta_ = chosen["alpha"], chosen["beta"]
        self._set_cache(keys, y)

    def _fine_tune(self, f: torch.Tensor, y: np.ndarray, epochs: int, on_epoch: Any = None) -> torch.Tensor:
        """Keys initialized from the normalized features ``f``, trained ``epochs`` epochs; returns them.

        ``on_epoch(epoch, keys)`` is called before the first epoch (epoch 0) and after each one.
        """
        _, lr, batch, wd, alpha, beta = self._check_recipe()
        dev = f.device
        keys = torch.nn.Parameter(f.detach().clone())
        values = torch.nn.functional.one_hot(torch.as_tensor(y, device=dev), len(self.classes_)).to(f.dtype)
        target = torch.as_tensor(y, device=dev)
        zero_shot = self.logit_scale_ * (f @ self._text.T)  # constant while training: computed once
        steps = max(1, -(-len(y) // batch))
        opt = torch.optim.AdamW([keys], lr=lr, eps=1e-4, weight_decay=wd)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
        gen = torch.Generator().manual_seed(int(self.seed))  # CPU generator: the same order on every device
        self.loss_curve_: list[float] = []
        if on_epoch is not None:
            with torch.no_grad():
                on_epoch(0, keys)
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(y), generator=gen).to(dev)
            total = 0.0
            for start in range(0, len(y), batch):
                b = order[start : start + batch]
                affinity = torch.exp(-beta * (1.0 - f[b] @ keys.T))
                if self.leave_one_out:  # an item is never scored against its own key (see the class docstring)
                    own = torch.ones_like(affinity)
                    own[torch.arange(len(b), device=dev), b] = 0.0
                    affinity = affinity * own
                cache = affinity @ values
                loss = torch.nn.functional.cross_entropy(zero_shot[b] + alpha * cache, target[b])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(b)
            self.loss_curve_.append(total / len(y))
            if on_epoch is not None:
                with torch.no_grad():
                    on_epoch(epoch, keys)
        return keys.detach()

    @property
    def n_trainable_params(self) -> int:
        """The fine-tuned cache keys: ``cache_size * d``."""
        self._check_fitted()
        return int(self._keys.numel())
