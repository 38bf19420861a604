"""CLAP (Silva-Rodríguez et al. 2024, "A Closer Look at the Few-Shot Adaptation of Large Vision-Language Models"):
a zero-shot-initialised linear probe kept near the zero-shot classifier by a class-adaptive penalty.

The probe is the zero-shot classifier made trainable (ZS-LP): class prototypes ``W`` start at the text embeddings
``T`` of the class prompts, and the logits are the model's own, ``logit_scale * x̂ Ŵᵀ`` (features and prototypes
L2-normalized). It is trained by cross-entropy on the support items plus a penalty that keeps each prototype near
its zero-shot one,

    loss = CE + penalty * mean_c lambda_c ||w_c - t_c||²,

where ``lambda_c`` is the zero-shot classifier's mean softmax probability of class ``c`` on the support items of
``c`` (the paper's class-adaptive initialisation of the augmented-Lagrangian multipliers, kept fixed as in its
final method): a class the zero-shot classifier already gets right is held near its prompt, a class it gets wrong
is free to move. Optimizer as in the authors' code: SGD (lr 0.1, momentum 0.9, no weight decay), cosine schedule,
batch 256, 300 epochs.

Why CLAP rather than LP++ (Huang et al. 2024): CLAP's point is that a validation set larger than the training
shots is unrealistic, and it has no hyper-parameter to tune (``penalty`` is 1 in the paper), so it is the natural
head for the validation-free protocol; LP++'s blend weights and step sizes are derived from the data too, but its
text/visual blend adds a second set of learned parameters. With validation data the only knob is ``penalty``, a
global multiplier of the paper's penalty (strongest first: ties keep the head closest to zero-shot; 0 is ZS-LP).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..normalize import normalize_rows
from ._base import (
    MIN_VAL_ITEMS,
    Head,
    as_features,
    as_labels,
    best_on_grid,
    carve_val,
    check_scoring,
    check_val_pair,
    class_counts,
    number_grid,
    val_arrays,
    val_score,
    zero_shot_rows,
)

#: multipliers of the class-adaptive penalty tried on validation data, strongest (nearest zero-shot) first
DEFAULT_PENALTIES: tuple[float, ...] = (10.0, 3.0, 1.0, 0.3, 0.1, 0.0)
#: the paper's recipe: penalty as initialised (x1), SGD lr 0.1, 300 epochs, batch 256
PAPER_PENALTY, PAPER_EPOCHS, PAPER_LR, PAPER_BATCH_SIZE = 1.0, 300, 0.1, 256


class ClassAdaptiveLinearProbe(Head):
    """CLAP: a linear probe initialised at, and held near, the zero-shot classifier (see the module docstring).

    Parameters
    ----------
    zero_shot, classes, logit_scale: the zero-shot classifier, as for :class:`~encoderlab.heads.tip.TipAdapter`
        (a fitted ZeroShotClassifier, or class embeddings [n_classes, d] whose rows follow ``classes``); its
        ``logit_scale`` (default 100, CLIP's) scales the probe's logits too.
    penalties: global multipliers of the penalty, chosen on validation data (:data:`DEFAULT_PENALTIES`); without
        validation data (none given, none carvable) the first value is used — pass ``[1.0]`` for the paper's CLAP.
    epochs, lr, momentum, batch_size: the SGD recipe (the paper's 300, 0.1, 0.9, 256).
    val_fraction, seed: when ``fit`` gets no ``X_val``, a stratified share of ``X`` is carved off to choose on
        (0: never carve); ``seed`` also orders the mini-batches, so a fit is deterministic.
    scoring: validation metric, ``"accuracy"`` or ``"balanced_accuracy"``.
    device: torch device.
    refit: after choosing, train once more on train+val (else keep the train-only model).

    Attributes: ``classes_``, ``prototypes_`` [n_classes, d] (normalized, rows follow ``classes_``),
    ``zero_shot_prototypes_``, ``multipliers_`` (lambda_c of the final fit), ``best_penalty_``, ``sweep_`` (one
    dict per penalty: ``penalty``, ``val_accuracy``, ``val_score``), ``drift_`` (per-class cosine distance
    ``1 - ŵ_c·t̂_c`` from the zero-shot prototype), ``fit_counts_``, ``n_features_in_``, ``logit_scale_``.
    """

    def __init__(self, zero_shot: Any, *, classes: Sequence[Any] | None = None,
                 penalties: Sequence[float] = DEFAULT_PENALTIES, logit_scale: float | None = None,
                 epochs: int = PAPER_EPOCHS, lr: float = PAPER_LR, momentum: float = 0.9,
                 batch_size: int = PAPER_BATCH_SIZE, val_fraction: float = 0.2, seed: int = 0,
                 scoring: str = "accuracy", device: str | torch.device = "cpu", refit: bool = True) -> None:
        self.zero_shot = zero_shot
        self.classes = classes
        self.penalties = penalties
        self.logit_scale = logit_scale
        self.epochs = epochs
        self.lr = lr
        self.momentum = momentum
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.seed = seed
        self.scoring = scoring
        self.device = device
        self.refit = refit

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> ClassAdaptiveLinearProbe:
        """Train on ``(X, y)``; choose the penalty on ``(X_val, y_val)`` (or a carve of ``X``); refit if asked."""
        X = as_features(X)
        y_arr = as_labels(y, X.shape[0])
        classes_, y_idx, T, scale = zero_shot_rows(self.zero_shot, y_arr, X.shape[1], classes=self.classes,
                                                   logit_scale=self.logit_scale, owner=type(self).__name__)
        check_scoring(self.scoring)
        has_val = check_val_pair(X_val, y_val)
        # strongest first, whatever order they were given in: ties keep the head closest to zero-shot
        penalties = number_grid(self.penalties, "penalties", example="[10, 1, 0.1]")[::-1]
        self._recipe()

        dev = torch.device(self.device)
        self.classes_ = classes_
        self.n_features_in_ = X.shape[1]
        self.logit_scale_ = scale
        self._text = normalize_rows(torch.from_numpy(T).to(dev))
        Z = normalize_rows(torch.from_numpy(X).to(dev))
        if has_val:
            Xv, yv = val_arrays(X_val, y_val, classes_, X.shape[1])
            Zv = normalize_rows(torch.from_numpy(Xv).to(dev))
            Z_tr, y_tr, Z_all, y_all = Z, y_idx, torch.cat([Z, Zv]), np.concatenate([y_idx, yv])
        else:
            tr, va = carve_val(y_idx, float(self.val_fraction), int(self.seed))
            if len(va) < MIN_VAL_ITEMS:
                tr, va = np.arange(len(y_idx)), va[:0]
            Z_tr, y_tr, Zv, yv, Z_all, y_all = Z[tr], y_idx[tr], Z[va], y_idx[va], Z, y_idx

        self.sweep_: list[dict[str, Any]] = []
        if len(yv) == 0 or len(penalties) == 1:
            self.best_penalty_ = penalties[0]
            W = self._train(Z_tr, y_tr, self.best_penalty_)
            if has_val and self.refit:  # one penalty, nothing to choose: the final model still gets train+val
                Z_tr, y_tr = Z_all, y_all
                W = self._train(Z_tr, y_tr, self.best_penalty_)
        else:
            fits = []
            for penalty in penalties:
                W = self._train(Z_tr, y_tr, penalty)
                pred = (Zv @ normalize_rows(W).T).argmax(dim=1).cpu().numpy()
                acc, score = val_score(pred, yv, self.scoring)
                self.sweep_.append({"penalty": penalty, "val_accuracy": acc, "val_score": score})
                fits.append(W)
            best = best_on_grid([s["val_score"] for s in self.sweep_])
            self.best_penalty_, W = penalties[best], fits[best]
            if self.refit:
                Z_tr, y_tr = Z_all, y_all
                W = self._train(Z_tr, y_tr, self.best_penalty_)
        self.multipliers_ = self._multipliers(Z_tr, y_tr).cpu().numpy()
        self._W = normalize_rows(W)
        self.prototypes_ = self._W.cpu().numpy()
        self.zero_shot_prototypes_ = self._text.cpu().numpy()
        self.drift_ = 1.0 - (self._W * self._text).sum(dim=1).cpu().numpy()
        self.fit_counts_ = class_counts(y_tr, len(classes_))
        return self

    def _recipe(self) -> tuple[int, float, float, int]:
        epochs = number_grid([self.epochs], "epochs", integer=True, example="300")[0]
        lr = number_grid([self.lr], "lr", strict=True, example="0.1")[0]
        momentum = number_grid([self.momentum], "momentum", example="0.9")[0]
        batch = number_grid([self.batch_size], "batch_size", integer=True, minimum=1, example="256")[0]
        return epochs, lr, momentum, batch

    def _multipliers(self, Z: torch.Tensor, y: np.ndarray) -> torch.Tensor:
        """lambda_c: the zero-shot softmax probability of class c, averaged over its support items.

        A class without support items gets 1 (the largest value): nothing says its prototype should move.
        """
        p = torch.softmax(self.logit_scale_ * (Z @ self._text.T), dim=1)
        yt = torch.as_tensor(y, device=Z.device)
        n = len(self.classes_)
        mass = torch.zeros(n, dtype=p.dtype, device=Z.device).index_add_(0, yt, p[torch.arange(len(y)), yt])
        count = torch.bincount(yt, minlength=n).to(p.dtype)
        return torch.where(count > 0, mass / count.clamp_min(1), torch.ones_like(mass))

    def _train(self, Z: torch.Tensor, y: np.ndarray, penalty: float) -> torch.Tensor:
        """Prototypes after the SGD recipe from the zero-shot ones, with the penalty multiplied by ``penalty``."""
        epochs, lr, momentum, batch = self._recipe()
        lam = self._multipliers(Z, y)
        W = torch.nn.Parameter(self._text.clone())
        target = torch.as_tensor(y, device=Z.device)
        steps = max(1, -(-len(y) // batch))
        opt = torch.optim.SGD([W], lr=lr, momentum=momentum)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, epochs * steps))
        gen = torch.Generator().manual_seed(int(self.seed))  # CPU generator: the same order on every device
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen).to(Z.device) if steps > 1 else None
            for start in range(0, len(y), batch):
                b = order[start : start + batch] if order is not None else slice(None)
                logits = self.logit_scale_ * (Z[b] @ normalize_rows(W).T)
                loss = torch.nn.functional.cross_entropy(logits, target[b])
                if penalty > 0:
                    loss = loss + penalty * torch.mean(lam * ((W - self._text) ** 2).sum(dim=1))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        return W.detach()

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits [n, n_classes]: ``logit_scale * cos(x, prototype)``."""
        self._check_fitted()
        Q = normalize_rows(torch.from_numpy(as_features(X, "X", self.n_features_in_)).to(self._W.device))
        return (self.logit_scale_ * (Q @ self._W.T)).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits; rows sum to 1."""
        return torch.softmax(torch.from_numpy(self.decision_function(X)), dim=1).numpy()

    @property
    def n_trainable_params(self) -> int:
        """The class prototypes: ``n_classes * d`` (no bias, as in the paper)."""
        self._check_fitted()
        return int(self._W.numel())
