"""Cosine k-nearest-neighbour classifier on L2-normalized embeddings (the usual kNN eval of frozen features).

Votes are uniform, or weighted by ``exp(similarity / temperature)`` as in DINO's kNN evaluation (Caron et al.
2021, temperature 0.07): a near neighbour counts much more than the k-th one. Queries are processed in chunks of
``chunk_size`` so memory stays at ``chunk_size x n_train`` similarities whatever the number of queries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ..errors import EncoderlabError
from ..normalize import normalize_rows
from ._base import (
    Head,
    as_features,
    as_labels,
    best_on_grid,
    check_scoring,
    check_val_pair,
    class_counts,
    encode_labels,
    number_grid,
    val_arrays,
    val_score,
)


class KNNClassifier(Head):
    """Cosine kNN: the ``k`` most similar training items vote for their class.

    Parameters
    ----------
    k: neighbours per query, clipped to the number of training items (the effective value is ``k_``).
    weights: ``"uniform"`` (one vote each) or ``"distance"`` (vote ``exp(sim / temperature)``).
    temperature: softness of the distance weighting (0.07, DINO's value; smaller = nearest neighbour dominates).
    k_grid: values of ``k`` to choose from: on ``(X_val, y_val)`` when given to ``fit``, else by leave-one-out on
        the training items (each item classified by the others). ``None`` keeps ``k``.
    scoring: metric for choosing ``k``: ``"accuracy"`` or ``"balanced_accuracy"``.
    chunk_size: queries per similarity block.
    device: torch device for the similarities.
    refit: add ``(X_val, y_val)``, when given, to the neighbour bank after choosing ``k`` (the final model then
        uses train+val, like the other heads).

    ``predict_proba`` is the vote mass per class divided by the total; ``predict`` takes the largest, ties going to
    the lowest class index. Attributes: ``classes_``, ``k_``, ``best_k_`` and ``sweep_`` (with ``k_grid``),
    ``n_features_in_``.
    """

    def __init__(self, k: int = 20, weights: str = "uniform", temperature: float = 0.07,
                 k_grid: Sequence[int] | None = None, scoring: str = "accuracy", chunk_size: int = 4096,
                 device: str | torch.device = "cpu", refit: bool = True) -> None:
        self.k = k
        self.weights = weights
        self.temperature = temperature
        self.k_grid = k_grid
        self.scoring = scoring
        self.chunk_size = chunk_size
        self.device = device
        self.refit = refit

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> KNNClassifier:
        """Store the normalized training features (the "fit"); with ``k_grid``, also choose ``k``."""
        X = as_features(X)
        classes, y_idx = encode_labels(as_labels(y, X.shape[0]))
        if self.weights not in ("uniform", "distance"):
            raise EncoderlabError(f"weights={self.weights!r} is not supported", 'use "uniform" or "distance"')
        check_scoring(self.scoring)
        if int(self.chunk_size) < 1 or not float(self.temperature) > 0:
            raise EncoderlabError(f"chunk_size={self.chunk_size!r} and temperature={self.temperature!r} must be > 0")
        has_val = check_val_pair(X_val, y_val)
        self.classes_ = classes
        self.n_features_in_ = X.shape[1]
        dev = torch.device(self.device)
        self._keys = normalize_rows(torch.from_numpy(X).to(dev))
        self._labels = torch.from_numpy(y_idx).to(dev)
        if has_val:
            Xv, yv = val_arrays(X_val, y_val, classes, X.shape[1])
            q_val = normalize_rows(torch.from_numpy(Xv).to(dev))
        self.k_ = self._clip(self.k)

        if self.k_grid is not None:
            grid = sorted({self._clip(k) for k in number_grid(self.k_grid, "k_grid", integer=True, minimum=1,
                                                               example="[1, 5, 10, 20]")})
            if has_val:
                sims, idx = self._neighbours(q_val, max(grid))
                truth = yv
            else:  # leave-one-out: each training item against all the others (exact duplicates still count)
                if len(y_idx) < 2:
                    raise EncoderlabError("choosing k by leave-one-out needs >= 2 training items", "pass X_val, y_val")
                grid = sorted({min(k, len(y_idx) - 1) for k in grid})
                sims, idx = self._neighbours(self._keys, max(grid), exclude_self=True)
                truth = y_idx
            self.sweep_: list[dict[str, Any]] = []
            for k in grid:  # ascending: ties keep the smaller k
                pred = self._votes(sims[:, :k], idx[:, :k]).argmax(dim=1).cpu().numpy()
                acc, score = val_score(pred, truth, self.scoring)
                self.sweep_.append({"k": k, "val_accuracy": acc, "val_score": score})
            self.best_k_ = self.k_ = grid[best_on_grid([s["val_score"] for s in self.sweep_])]
        if has_val and self.refit:
            self._keys = torch.cat([self._keys, q_val])
            self._labels = torch.cat([self._labels, torch.from_numpy(yv).to(dev)])
            if self.k_grid is None:
                self.k_ = self._clip(self.k)  # the bank grew
        self.fit_counts_ = class_counts(self._labels.cpu().numpy(), len(classes))
        return self

    def _clip(self, k: Any) -> int:
        if int(k) < 1:
            raise EncoderlabError(f"k={k!r} must be >= 1", "e.g. k=20")
        return min(int(k), len(self._labels))

    def _chunks(self, Q: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
        step = int(self.chunk_size)
        for start in range(0, Q.shape[0], step):
            yield start, Q[start : start + step]

    def _neighbours(self, Q: torch.Tensor, k: int, exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities and bank indices of the ``k`` most similar bank items per query, most similar first."""
        sims, idx = [], []
        for start, q in self._chunks(Q):
            s = q @ self._keys.T
            if exclude_self:  # query i is bank item i
                rows = torch.arange(q.shape[0], device=s.device)
                s[rows, rows + start] = -torch.inf
            top = torch.topk(s, k, dim=1, largest=True, sorted=True)
            sims.append(top.values)
            idx.append(top.indices)
        return torch.cat(sims), torch.cat(idx)

    def _votes(self, sims: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Vote mass per class [n, n_classes] from the neighbours' similarities and bank indices."""
        if self.weights == "uniform":
            w = torch.ones_like(sims)
        else:
            # shifting by the row maximum leaves the normalized votes unchanged and keeps exp() finite for any T
            w = torch.exp((sims - sims[:, :1]) / float(self.temperature))
        votes = torch.zeros((sims.shape[0], len(self.classes_)), dtype=sims.dtype, device=sims.device)
        return votes.scatter_add_(1, self._labels[idx], w)

    def kneighbors(self, X: Any, k: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and bank indices of the ``k`` (default ``k_``) nearest bank items per row."""
        self._check_fitted()
        Q = normalize_rows(torch.from_numpy(as_features(X, "X", self.n_features_in_)).to(self._keys.device))
        sims, idx = self._neighbours(Q, self._clip(self.k_ if k is None else k))
        return sims.cpu().numpy(), idx.cpu().numpy()

    def predict_proba(self, X: Any) -> np.ndarray:
        """Vote mass per class, normalized to sum to 1 per row."""
        self._check_fitted()
        Q = normalize_rows(torch.from_numpy(as_features(X, "X", self.n_features_in_)).to(self._keys.device))
        out = []
        for _, q in self._chunks(Q):
            votes = self._votes(*self._neighbours(q, self.k_))
            out.append(votes / votes.sum(dim=1, keepdim=True))
        return torch.cat(out).cpu().numpy()
