"""Shared plumbing for the heads: input checks, label encoding, the stratified validation carve, predict/score.

Every head follows the scikit-learn conventions: hyper-parameters are stored untouched by ``__init__``, ``fit``
returns ``self``, learned attributes end in ``_``, labels may be any sortable hashable values and ``classes_`` is
``np.unique(y)``. Bad input raises :class:`~encoderlab.errors.EncoderlabError` naming the value and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import EncoderlabError


def as_features(X: Any, name: str = "X", n_features: int | None = None) -> np.ndarray:
    """``X`` (numpy array, torch tensor or nested lists) as a C-contiguous float32 [n, d] array with finite values."""
    if isinstance(X, torch.Tensor):
        X = X.detach().to("cpu", torch.float32).numpy()
    try:
        arr = np.ascontiguousarray(X, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise EncoderlabError(f"{name} is not a numeric array ({e})", "pass a float array of shape [n, d]") from None
    if not arr.flags.writeable:  # e.g. memory-mapped: torch.from_numpy would warn on every use
        arr = arr.copy()
    if arr.ndim != 2:
        raise EncoderlabError(f"{name} has shape {arr.shape}, expected [n_items, n_features]",
                              "reshape it to 2-D (one row per item)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise EncoderlabError(f"{name} is empty (shape {arr.shape})", "pass at least one item with features")
    if n_features is not None and arr.shape[1] != n_features:
        raise EncoderlabError(f"{name} has {arr.shape[1]} features, the head was fit with {n_features}",
                              "use embeddings from the same encoder")
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(axis=1).sum())
        raise EncoderlabError(f"{name} has NaN or infinite values in {bad} of {arr.shape[0]} rows",
                              "drop or re-embed those items")
    return arr


def as_labels(y: Any, n: int, name: str = "y") -> np.ndarray:
    """``y`` as a 1-D array of ``n`` labels (numpy, torch or a list of any hashable values, tuples included)."""
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    try:
        arr = np.asarray(y)
    except ValueError:  # ragged values
        arr = None
    if arr is None or arr.ndim != 1:
        # a list of tuples (or ragged values) must stay one label per item, not become a 2-D array
        items = list(y)
        arr = np.empty(len(items), dtype=object)
        arr[:] = items
    if arr.shape[0] != n:
        raise EncoderlabError(f"{name} has {arr.shape[0]} labels but there are {n} items",
                              "pass one label per row of the features")
    return arr


def encode_labels(y: np.ndarray, name: str = "y", min_classes: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(classes, index)``: sorted unique labels and each label's position in them."""
    try:
        classes, index = np.unique(y, return_inverse=True)
    except TypeError:
        raise EncoderlabError(f"{name} mixes label types that cannot be sorted",
                              "use labels of one type (all str or all int)") from None
    if len(classes) < min_classes:
        raise EncoderlabError(f"{name} has {len(classes)} class(es) ({list(classes)[:3]}); a classifier needs "
                              f">= {min_classes}", "add items of at least one other class")
    return classes, index.reshape(-1).astype(np.int64)


def index_labels(y: np.ndarray, classes: np.ndarray, name: str = "y_val") -> np.ndarray:
    """Positions of ``y`` in the fitted ``classes``; a label the head never saw is an error."""
    try:
        pos = np.clip(np.searchsorted(classes, y), 0, len(classes) - 1)
        unknown = np.asarray(classes[pos] != y, dtype=bool)
    except TypeError:
        raise EncoderlabError(f"{name} labels are of another type than the training labels {classes[:3]!r}",
                              "use the same label type for train and validation") from None
    if unknown.any():
        raise EncoderlabError(f"{name} has {int(unknown.sum())} label(s) not in the training labels, "
                              f"e.g. {y[unknown][0]!r}", "validate only on classes present in training")
    return pos.astype(np.int64)


def carve_val(y_index: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_idx, val_idx)`` positions: about ``fraction`` of each class goes to validation.

    A class with n >= 2 items gives ``min(n - 1, max(1, round(fraction * n)))`` items, so every class keeps at
    least one training item; a class with one item stays in train. ``val_idx`` is empty when nothing can be
    carved (e.g. one item per class). Deterministic given ``seed``; both outputs are sorted.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    if fraction > 0:
        for c in range(int(y_index.max()) + 1):
            members = np.flatnonzero(y_index == c)
            n = len(members)
            if n < 2:
                continue
            take = min(n - 1, max(1, round(fraction * n)))
            val.append(rng.permutation(members)[:take])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, dtype=np.int64)
    mask = np.ones(len(y_index), dtype=bool)
    mask[val_idx] = False
    return np.flatnonzero(mask), val_idx


def l2_normalize(X: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length (an all-zero row stays zero instead of becoming NaN)."""
    return X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)


def accuracy(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    return float((np.asarray(pred) == np.asarray(truth)).mean())


def balanced_accuracy(pred: np.ndarray, truth: np.ndarray) -> float:
    """Mean per-class recall over the classes present in ``truth`` (``metrics.balanced_accuracy``, head arg order)."""
    from ..metrics.classification import balanced_accuracy as metric

    return metric(np.asarray(truth), np.asarray(pred))


class Head:
    """Mixin: ``predict`` from ``predict_proba`` (argmax; ties go to the lowest class index) and ``score``."""

    classes_: np.ndarray

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise EncoderlabError(f"this {type(self).__name__} is not fitted yet", "call fit(X, y) first")

    def predict_proba(self, X: Any) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def predict(self, X: Any) -> np.ndarray:
        """The most probable class label per row (lowest class index among exact ties)."""
        self._check_fitted()
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict(X)`` against ``y``."""
        pred = self.predict(X)
        return accuracy(pred, as_labels(y, len(pred)))

    @property
    def n_trainable_params(self) -> int:
        """Learned numbers a training step would update (0 for training-free heads); used for cost reports."""
        return 0
