"""Tip-Adapter (Zhang et al. 2021): training-free few-shot adaptation of a dual encoder with a feature cache.

The zero-shot classifier (one text embedding per class) is combined with a cache model whose keys are the
L2-normalized few-shot image features and whose values are their one-hot labels:

    logits(x) = logit_scale * x̂ Ŵᵀ + alpha * exp(-beta * (1 - x̂ K̂ᵀ)) V

``beta`` sets how sharply the affinity decays with cosine distance, ``alpha`` how much the cache counts against the
zero-shot logits. With ``alpha = 0`` the head is exactly the zero-shot classifier. Nothing is trained: both are
chosen by grid search on validation data, vectorized (one affinity matrix per beta serves every alpha).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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

#: default alpha grid: 0 (pure zero-shot, so tuning can reject an unhelpful cache) to 5 in steps of 0.25
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.0, 5.0, 21))
#: default beta grid: 0.5 to 10 in steps of 0.5 (the paper's default, 5.5, is on it)
DEFAULT_BETAS: tuple[float, ...] = tuple(float(b) for b in np.linspace(0.5, 10.0, 20))
#: the paper's defaults, used when there is no validation data to tune on
PAPER_ALPHA, PAPER_BETA = 1.0, 5.5


@dataclass
class _Setup:
    """What ``TipAdapter._setup`` prepares for a fit (training/validation features and labels, the grids)."""

    y_idx: np.ndarray
    feats: torch.Tensor
    tr: np.ndarray
    q_val: torch.Tensor
    yv: np.ndarray
    f_all: torch.Tensor
    y_all: np.ndarray
    alphas: list[float]
    betas: list[float]


class TipAdapter(Head):
    """Zero-shot logits plus a cache of labelled few-shot features; alpha and beta tuned on validation data.

    A meta-estimator: it wraps the zero-shot classifier it is built with and ``fit(X, y, X_val, y_val)`` only
    builds the cache and tunes.

    Parameters
    ----------
    zero_shot: the zero-shot classifier — a fitted :class:`~encoderlab.heads.zeroshot.ZeroShotClassifier` (its
        ``classes_`` name the rows, its ``logit_scale`` is used unless ``logit_scale`` is given), or an array of
        class embeddings [n_classes, d] whose rows follow ``classes`` (default: the sorted unique labels of ``y``).
    classes: names of the rows of an array ``zero_shot`` (any order; ``classes_`` is their sorted version).
    alphas, betas: grids searched on validation data (:data:`DEFAULT_ALPHAS`, :data:`DEFAULT_BETAS`).
    logit_scale: multiplier of the zero-shot cosine logits (default: the classifier's, else 100, CLIP's).
    val_fraction, seed: when ``fit`` gets no ``X_val``, a stratified share of ``X`` is carved off for tuning
        (the same carve as :class:`~encoderlab.heads.linear.LinearProbe`); with fewer than
        :data:`~encoderlab.heads._base.MIN_VAL_ITEMS` carvable items (e.g. one shot per class) the paper's
        defaults alpha=1, beta=5.5 are used and ``sweep_`` is empty.
    scoring: validation metric, ``"accuracy"`` or ``"balanced_accuracy"``; ties go to the smaller alpha, then the
        smaller beta (the head closest to zero-shot).
    chunk_size, device: queries per affinity block, torch device.
    refit: after tuning, the cache holds train+val (carved or given); else the training part only.

    Attributes: ``classes_``, ``best_alpha_``, ``best_beta_``, ``sweep_`` (one dict per (alpha, beta):
    ``alpha``, ``beta``, ``val_accuracy``, ``val_score``), ``cache_size_``, ``fit_counts_``, ``n_features_in_``.
    """

    def __init__(self, zero_shot: Any, *, classes: Sequence[Any] | None = None,
                 alphas: Sequence[float] = DEFAULT_ALPHAS, betas: Sequence[float] = DEFAULT_BETAS,
                 logit_scale: float | None = None, val_fraction: float = 0.2, seed: int = 0,
                 scoring: str = "accuracy", chunk_size: int = 4096, device: str | torch.device = "cpu",
                 refit: bool = True) -> None:
        self.zero_shot = zero_shot
        self.classes = classes
        self.alphas = alphas
        self.betas = betas
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.seed = seed
        self.scoring = scoring
        self.chunk_size = chunk_size
        self.device = device
        self.refit = refit

    def _classifier(self, y_arr: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        return zero_shot_rows(self.zero_shot, y_arr, d, classes=self.classes, logit_scale=self.logit_scale,
                              owner=type(self).__name__)

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> TipAdapter:
        """Build the cache from ``(X, y)`` and tune alpha, beta on ``(X_val, y_val)`` (or a carve of ``X``)."""
        s = self._setup(X, y, X_val, y_val)
        keys, y_idx, tr, q_val, yv, k_all, y_all = s.feats, s.y_idx, s.tr, s.q_val, s.yv, s.f_all, s.y_all
        alphas, betas = s.alphas, s.betas

        self.sweep_: list[dict[str, Any]] = []
        if len(yv) == 0:
            self.best_alpha_, self.best_beta_ = PAPER_ALPHA, PAPER_BETA
        else:
            self._set_cache(keys[tr], y_idx[tr])
            self.best_alpha_, self.best_beta_ = self._search(q_val, yv, alphas, betas)
        if self.refit:
            self._set_cache(k_all, y_all)
        else:
            self._set_cache(keys[tr], y_idx[tr])
        return self

    def _setup(self, X: Any, y: Any, X_val: Any, y_val: Any) -> _Setup:
        """Checks, the zero-shot rows, normalized features, and the validation part (given, or carved from ``X``).

        Shared by Tip-Adapter and Tip-Adapter-F, so both read the zero-shot classifier, carve and validate alike.
        """
        X = as_features(X)
        y_arr = as_labels(y, X.shape[0])
        classes_, y_idx, W, scale = self._classifier(y_arr, X.shape[1])
        check_scoring(self.scoring)
        has_val = check_val_pair(X_val, y_val)
        alphas, betas = number_grid(self.alphas, "alphas"), number_grid(self.betas, "betas")
        dev = torch.device(self.device)
        self.classes_ = classes_
        self.n_features_in_ = X.shape[1]
        self.logit_scale_ = scale
        self._text = normalize_rows(torch.from_numpy(W).to(dev))
        feats = normalize_rows(torch.from_numpy(X).to(dev))
        if has_val:
            Xv, yv = val_arrays(X_val, y_val, classes_, X.shape[1])
            tr, q_val = np.arange(len(y_idx)), normalize_rows(torch.from_numpy(Xv).to(dev))
            f_all, y_all = torch.cat([feats, q_val]), np.concatenate([y_idx, yv])
        else:  # a stratified carve (nothing when val_fraction is 0 or too few items to choose on)
            tr, va = carve_val(y_idx, float(self.val_fraction), int(self.seed))
            if len(va) < MIN_VAL_ITEMS:
                tr, va = np.arange(len(y_idx)), va[:0]
            q_val, yv = feats[va], y_idx[va]
            f_all, y_all = feats, y_idx
        return _Setup(y_idx, feats, tr, q_val, yv, f_all, y_all, alphas, betas)

    def _set_cache(self, keys: torch.Tensor, y_idx: np.ndarray) -> None:
        self._keys = keys
        self._values = torch.nn.functional.one_hot(torch.as_tensor(y_idx, device=keys.device),
                                                   len(self.classes_)).to(keys.dtype)
        self.cache_size_ = int(keys.shape[0])
        self.fit_counts_ = class_counts(y_idx, len(self.classes_))

    def _search(self, q: torch.Tensor, y: np.ndarray, alphas: list[float], betas: list[float]) -> tuple[float, float]:
        """Grid search; returns (alpha, beta) with the best validation score, ties to smaller alpha then beta."""
        preds = np.empty((len(alphas), len(betas), q.shape[0]), dtype=np.int64)
        step = int(self.chunk_size)
        for start in range(0, q.shape[0], step):  # chunks bound the [queries, cache] affinity memory
            qc = q[start : start + step]
            zero_shot = self.logit_scale_ * (qc @ self._text.T)
            dist = 1.0 - qc @ self._keys.T  # computed once per chunk, reused for every beta
            for j, beta in enumerate(betas):
                cache = torch.exp(-beta * dist) @ self._values  # one affinity matrix per beta serves every alpha
                for i, alpha in enumerate(alphas):
                    preds[i, j, start : start + step] = (zero_shot + alpha * cache).argmax(dim=1).cpu().numpy()
        for i, alpha in enumerate(alphas):  # alpha-major, both ascending: ties keep the head closest to zero-shot
            for j, beta in enumerate(betas):
                acc, score = val_score(preds[i, j], y, self.scoring)
                self.sweep_.append({"alpha": alpha, "beta": beta, "val_accuracy": acc, "val_score": score})
        best = self.sweep_[best_on_grid([s["val_score"] for s in self.sweep_])]
        return best["alpha"], best["beta"]

    def decision_function(self, X: Any, alpha: float | None = None, beta: float | None = None) -> np.ndarray:
        """Logits [n, n_classes] with the tuned (or the given) alpha and beta."""
        self._check_fitted()
        alpha = self.best_alpha_ if alpha is None else float(alpha)
        beta = self.best_beta_ if beta is None else float(beta)
        Q = normalize_rows(torch.from_numpy(as_features(X, "X", self.n_features_in_)).to(self._keys.device))
        out = []
        for start in range(0, Q.shape[0], int(self.chunk_size)):
            q = Q[start : start + int(self.chunk_size)]
            logits = self.logit_scale_ * (q @ self._text.T)
            if alpha != 0.0:
                logits += alpha * (torch.exp(-beta * (1.0 - q @ self._keys.T)) @ self._values)
            out.append(logits)
        return torch.cat(out).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits; rows sum to 1."""
        return torch.softmax(torch.from_numpy(self.decision_function(X)), dim=1).numpy()
