"""Shared plumbing for the heads: input checks, label encoding, the stratified validation carve, predict/score.

Every head follows the scikit-learn conventions: hyper-parameters are stored untouched by ``__init__``, ``fit``
returns ``self``, learned attributes end in ``_``, labels may be any sortable hashable values and ``classes_`` is
``np.unique(y)``. Bad input raises :class:`~encoderlab.errors.EncoderlabError` naming the value and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
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


#: validation metrics a head can choose its knobs by
SCORINGS = ("accuracy", "balanced_accuracy")
#: fewer carved validation items than this and a sweep would be noise: heads fall back to fixed defaults
MIN_VAL_ITEMS = 5


def check_scoring(scoring: str) -> str:
    if scoring not in SCORINGS:
        raise EncoderlabError(f"scoring={scoring!r} is not supported", 'use "accuracy" or "balanced_accuracy"')
    return scoring


def check_val_pair(X_val: Any, y_val: Any) -> bool:
    """True when validation data was given; one of the two without the other is an error."""
    if (X_val is None) != (y_val is None):
        raise EncoderlabError("X_val and y_val must be given together", "pass both or neither")
    return X_val is not None


def val_arrays(X_val: Any, y_val: Any, classes: np.ndarray, n_features: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation features and their positions in the fitted ``classes`` (an unseen label is an error)."""
    Xv = as_features(X_val, "X_val", n_features)
    return Xv, index_labels(as_labels(y_val, Xv.shape[0], "y_val"), classes)


def val_score(pred: np.ndarray, truth: np.ndarray, scoring: str) -> tuple[float, float]:
    """``(accuracy, score)`` of predictions on validation data; ``score`` is what a sweep maximizes."""
    from ..metrics.classification import balanced_accuracy

    acc = accuracy(pred, truth)
    return acc, (acc if scoring == "accuracy" else balanced_accuracy(np.asarray(truth), np.asarray(pred)))


def best_on_grid(scores: Sequence[float]) -> int:
    """Index of the best validation score; ties go to the earliest candidate.

    Every head orders its grid from the simplest model (strongest regularization, fewest neighbours, smallest
    cache weight) up, so a tie keeps the simpler model — a strict improvement is needed to move on.
    """
    if len(scores) == 0:
        raise ValueError("best_on_grid needs at least one score")
    return int(np.argmax(np.asarray(scores, dtype=np.float64)))


def number_grid(values: Any, name: str, *, integer: bool = False, minimum: float = 0.0,
                strict: bool = False, example: str = "[0.5, 1, 2]") -> list:
    """``values`` as a sorted list of finite numbers ``>= minimum`` (``> minimum`` when ``strict``)."""
    try:
        arr = np.atleast_1d(np.asarray(values, dtype=np.float64))
    except (TypeError, ValueError):
        raise EncoderlabError(f"{name}={values!r} is not a list of numbers", f"e.g. {name}={example}") from None
    ok = arr.size > 0 and np.all(np.isfinite(arr)) and np.all(arr > minimum if strict else arr >= minimum)
    if integer:
        ok = ok and bool(np.all(arr == np.round(arr)))
    if not ok:
        rule = f"{'>' if strict else '>='} {minimum:g}"
        kind = "integers" if integer else "finite numbers"
        raise EncoderlabError(f"{name}={values!r} must be {kind} {rule}", f"e.g. {name}={example}")
    return sorted({int(v) for v in arr}) if integer else sorted(float(v) for v in arr)


def accuracy(pred: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> float:
    return float((np.asarray(pred) == np.asarray(truth)).mean())


def class_counts(y_index: np.ndarray, n_classes: int) -> np.ndarray:
    """Labelled items per class (aligned with ``classes_``): what ``fit_counts_`` records."""
    return np.bincount(np.asarray(y_index, dtype=np.int64), minlength=n_classes)


class Head:
    """Base of every head: the one contract ``fit(X, y, X_val=None, y_val=None) -> self``, predict, score.

    ``predict`` is the argmax of ``decision_function`` (or of ``predict_proba`` for heads without logits); ties
    go to the lowest class index. After ``fit``, ``fit_counts_[i]`` is how many labelled items of ``classes_[i]``
    the final model holds (its training set, neighbour bank or cache): the few-shot protocol checks it.
    """

    classes_: np.ndarray
    fit_counts_: np.ndarray

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> Head:  # pragma: no cover - overridden
        raise NotImplementedError

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise EncoderlabError(f"this {type(self).__name__} is not fitted yet", "call fit(X, y) first")

    def decision_function(self, X: Any) -> np.ndarray:  # pragma: no cover - optional
        raise NotImplementedError

    def predict_proba(self, X: Any) -> np.ndarray:  # pragma: no cover - overridden
        raise NotImplementedError

    def scores(self, X: Any) -> np.ndarray:
        """Per-class scores [n, n_classes] the prediction is the argmax of: logits when the head has them."""
        self._check_fitted()
        if type(self).decision_function is not Head.decision_function:
            return np.asarray(self.decision_function(X))
        return np.asarray(self.predict_proba(X))

    def predict(self, X: Any) -> np.ndarray:
        """The best-scoring class label per row (lowest class index among exact ties)."""
        best = np.argmax(self.scores(X), axis=1)  # checks fitted first
        return self.classes_[best]

    def score(self, X: Any, y: Any) -> float:
        """Accuracy of ``predict(X)`` against ``y``."""
        pred = self.predict(X)
        return accuracy(pred, as_labels(y, len(pred)))

    @property
    def n_fit_items_(self) -> int:
        """Labelled items in the final model (sum of ``fit_counts_``)."""
        self._check_fitted()
        return int(np.sum(self.fit_counts_))

    @property
    def n_trainable_params(self) -> int:
        """Learned numbers a training step would update (0 for training-free heads); used for cost reports."""
        return 0


def zero_shot_rows(zero_shot: Any, y: np.ndarray, d: int, *, classes: Sequence[Any] | None = None,
                   logit_scale: float | None = None, owner: str = "this head"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(classes_, y index, class embeddings in classes_ order, logit scale)`` for a head built on a zero-shot one.

    ``zero_shot`` is a fitted :class:`~encoderlab.heads.zeroshot.ZeroShotClassifier` (its ``classes_`` name the
    rows, its ``logit_scale`` is used unless one is given) or an array of class embeddings [n_classes, d] whose rows
    follow ``classes`` (default: the sorted unique labels of ``y``). Heads that start from the zero-shot classifier
    (Tip-Adapter, Tip-Adapter-F, CLAP) share it, so they read it the same way and cover the same classes.
    """
    scale = logit_scale
    names: Sequence[Any] | None = classes
    if hasattr(zero_shot, "class_embeddings_"):  # a fitted ZeroShotClassifier
        W = as_features(zero_shot.class_embeddings_, "zero_shot.class_embeddings_", d)
        names = list(zero_shot.classes_)
        if scale is None and getattr(zero_shot, "logit_scale", None) is not None:
            scale = float(zero_shot.logit_scale)
    elif hasattr(zero_shot, "fit") and hasattr(zero_shot, "decision_function"):
        raise EncoderlabError(f"the zero-shot classifier given to {owner} is not fitted",
                              "fit it on the prompt embeddings first")
    else:
        W = as_features(zero_shot, "zero_shot", d)
    if names is None:
        classes_, y_idx = encode_labels(y)
        order = np.arange(len(classes_))
    else:
        labels = as_labels(list(names), len(names), "classes")
        classes_, order = encode_labels(labels, "classes")
        if len(classes_) != len(labels):
            raise EncoderlabError("classes has repeated labels", "name each row of the zero-shot classifier once")
        order = np.argsort(order, kind="stable")  # row of W for each sorted class
        y_idx = index_labels(y, classes_, "y")
    if W.shape[0] != len(classes_):
        raise EncoderlabError(f"the zero-shot classifier has {W.shape[0]} rows for {len(classes_)} classes",
                              "pass one row per class, in the order of the sorted labels (or pass classes=)")
    return classes_, y_idx, W[order], float(100.0 if scale is None else scale)
