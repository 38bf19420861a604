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
from typing import Any

import numpy as np
import torch

from ..errors import EncoderlabError
from ._base import (
    Head,
    accuracy,
    as_features,
    as_labels,
    balanced_accuracy,
    carve_val,
    encode_labels,
    index_labels,
    l2_normalize,
)

#: default alpha grid: 0 (pure zero-shot, so tuning can reject an unhelpful cache) to 5 in steps of 0.25
DEFAULT_ALPHAS: tuple[float, ...] = tuple(float(a) for a in np.linspace(0.0, 5.0, 21))
#: default beta grid: 0.5 to 10 in steps of 0.5 (the paper's default, 5.5, is on it)
DEFAULT_BETAS: tuple[float, ...] = tuple(float(b) for b in np.linspace(0.5, 10.0, 20))
#: the paper's defaults, used when there is no validation data to tune on
PAPER_ALPHA, PAPER_BETA = 1.0, 5.5
MIN_VAL_ITEMS = 5


class TipAdapter(Head):
    """Zero-shot logits plus a cache of labelled few-shot features; alpha and beta tuned on validation data.

    Parameters
    ----------
    alphas, betas: grids searched on validation data (:data:`DEFAULT_ALPHAS`, :data:`DEFAULT_BETAS`).
    logit_scale: multiplier of the zero-shot cosine logits (100, CLIP's learned temperature).
    val_fraction, seed: when ``fit`` gets no ``X_val``, a stratified share of ``X`` is carved off for tuning
        (the same carve as :class:`~encoderlab.heads.linear.LinearProbe`); with fewer than 5 carvable items
        (e.g. one shot per class) the paper's defaults alpha=1, beta=5.5 are used and ``sweep_`` is empty.
    scoring: validation metric, ``"accuracy"`` or ``"balanced_accuracy"``; ties go to the smaller alpha, then the
        smaller beta (the head closest to zero-shot).
    chunk_size, device: queries per affinity block, torch device.
    refit: after tuning, the cache holds train+val (carved or given); else the training part only.

    Attributes: ``classes_``, ``best_alpha_``, ``best_beta_``, ``sweep_`` (one dict per (alpha, beta):
    ``alpha``, ``beta``, ``val_accuracy``, ``val_score``), ``cache_size_``, ``n_features_in_``.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, betas: Sequence[float] = DEFAULT_BETAS,
                 logit_scale: float = 100.0, val_fraction: float = 0.2, seed: int = 0, scoring: str = "accuracy",
                 chunk_size: int = 4096, device: str | torch.device = "cpu", refit: bool = True) -> None:
        self.alphas = alphas
        self.betas = betas
        self.logit_scale = logit_scale
        self.val_fraction = val_fraction
        self.seed = seed
        self.scoring = scoring
        self.chunk_size = chunk_size
        self.device = device
        self.refit = refit

    def fit(self, X: Any, y: Any, class_embeddings: Any, X_val: Any = None, y_val: Any = None,
            classes: Sequence[Any] | None = None) -> TipAdapter:
        """Build the cache from ``(X, y)`` and tune alpha, beta.

        ``class_embeddings`` is the zero-shot classifier, [n_classes, d]: row i embeds ``classes_[i]``, i.e. the
        rows follow the sorted unique labels of ``y``. When the zero-shot classifier covers classes with no
        cached item, name its rows with ``classes`` (any order; ``classes_`` is their sorted version).
        """
        X = as_features(X)
        W = as_features(class_embeddings, "class_embeddings", X.shape[1])
        y_arr = as_labels(y, X.shape[0])
        if classes is None:
            classes_, y_idx = encode_labels(y_arr)
            order = np.arange(len(classes_))
        else:
            names = as_labels(list(classes), len(classes), "classes")
            classes_, order = encode_labels(names, "classes")
            if len(classes_) != len(names):
                raise EncoderlabError("classes has repeated labels", "name each row of class_embeddings once")
            order = np.argsort(order, kind="stable")  # row of class_embeddings for each sorted class
            y_idx = index_labels(y_arr, classes_, "y")
        if W.shape[0] != len(classes_):
            raise EncoderlabError(f"class_embeddings has {W.shape[0]} rows for {len(classes_)} classes",
                                  "pass one row per class, in the order of the sorted labels (or pass classes=)")
        if self.scoring not in ("accuracy", "balanced_accuracy"):
            raise EncoderlabError(f"scoring={self.scoring!r} is not supported", 'use "accuracy" or "balanced_accuracy"')
        if (X_val is None) != (y_val is None):
            raise EncoderlabError("X_val and y_val must be given together", "pass both or neither")
        alphas, betas = self._grid(self.alphas, "alphas"), self._grid(self.betas, "betas")

        dev = torch.device(self.device)
        self.classes_ = classes_
        self.n_features_in_ = X.shape[1]
        self._text = l2_normalize(torch.from_numpy(W[order]).to(dev))
        keys = l2_normalize(torch.from_numpy(X).to(dev))
        if X_val is not None:
            Xv = as_features(X_val, "X_val", X.shape[1])
            yv = index_labels(as_labels(y_val, Xv.shape[0], "y_val"), classes_)
            tr, q_val = np.arange(len(y_idx)), l2_normalize(torch.from_numpy(Xv).to(dev))
            k_all, y_all = torch.cat([keys, q_val]), np.concatenate([y_idx, yv])
        else:
            tr, va = carve_val(y_idx, float(self.val_fraction), int(self.seed))
            if len(va) < MIN_VAL_ITEMS:
                tr, va = np.arange(len(y_idx)), va[:0]
            q_val, yv = keys[va], y_idx[va]
            k_all, y_all = keys, y_idx

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

    @staticmethod
    def _grid(values: Sequence[float], name: str) -> list[float]:
        try:
            grid = sorted(float(v) for v in np.atleast_1d(np.asarray(values, dtype=np.float64)))
        except (TypeError, ValueError):
            raise EncoderlabError(f"{name}={values!r} is not a list of numbers", f"e.g. {name}=[0.5, 1, 2]") from None
        if not grid or not all(np.isfinite(v) and v >= 0 for v in grid):
            raise EncoderlabError(f"{name}={values!r} must be finite numbers >= 0", f"e.g. {name}=[0.5, 1, 2]")
        return grid

    def _set_cache(self, keys: torch.Tensor, y_idx: np.ndarray) -> None:
        self._keys = keys
        self._values = torch.nn.functional.one_hot(torch.as_tensor(y_idx, device=keys.device),
                                                   len(self.classes_)).to(keys.dtype)
        self.cache_size_ = int(keys.shape[0])

    def _search(self, q: torch.Tensor, y: np.ndarray, alphas: list[float], betas: list[float]) -> tuple[float, float]:
        """Grid search; returns (alpha, beta) with the best validation score, ties to smaller alpha then beta."""
        preds = np.empty((len(betas), len(alphas), q.shape[0]), dtype=np.int64)
        step = int(self.chunk_size)
        for start in range(0, q.shape[0], step):  # chunks bound the [queries, cache] affinity memory
            qc = q[start : start + step]
            zero_shot = float(self.logit_scale) * (qc @ self._text.T)
            dist = 1.0 - qc @ self._keys.T  # computed once per chunk, reused for every beta
            for i, beta in enumerate(betas):
                cache = torch.exp(-beta * dist) @ self._values  # one affinity matrix per beta serves every alpha
                for j, alpha in enumerate(alphas):
                    preds[i, j, start : start + step] = (zero_shot + alpha * cache).argmax(dim=1).cpu().numpy()
        best: tuple[float, float, float] | None = None
        for i, beta in enumerate(betas):
            for j, alpha in enumerate(alphas):
                acc = accuracy(preds[i, j], y)
                score = acc if self.scoring == "accuracy" else balanced_accuracy(preds[i, j], y)
                self.sweep_.append({"alpha": alpha, "beta": beta, "val_accuracy": acc, "val_score": score})
                key = (score, -alpha, -beta)
                if best is None or key > best:
                    best = key
        assert best is not None
        return -best[1], -best[2]

    def decision_function(self, X: Any, alpha: float | None = None, beta: float | None = None) -> np.ndarray:
        """Logits [n, n_classes] with the tuned (or the given) alpha and beta."""
        self._check_fitted()
        alpha = self.best_alpha_ if alpha is None else float(alpha)
        beta = self.best_beta_ if beta is None else float(beta)
        Q = l2_normalize(torch.from_numpy(as_features(X, "X", self.n_features_in_)).to(self._keys.device))
        out = []
        for start in range(0, Q.shape[0], int(self.chunk_size)):
            q = Q[start : start + int(self.chunk_size)]
            logits = float(self.logit_scale) * (q @ self._text.T)
            if alpha != 0.0:
                logits += alpha * (torch.exp(-beta * (1.0 - q @ self._keys.T)) @ self._values)
            out.append(logits)
        return torch.cat(out).cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax of the logits; rows sum to 1."""
        return torch.softmax(torch.from_numpy(self.decision_function(X)), dim=1).numpy()

    def predict(self, X: Any) -> np.ndarray:
        """Argmax of the logits (not of the softmax, which can round two large logits to equal probabilities)."""
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]
