"""Classification metrics as pure numpy functions: labels and scores in, plain floats and arrays out.

Conventions (chosen to match scikit-learn so numbers can be cross-checked):

* labels are integers in ``[0, n_classes)``; scores are ``[n_items, n_classes]`` (logits, similarities or
  probabilities: only their order within a row matters);
* predictions are ``argmax`` of the scores, ties going to the lowest class index (numpy's rule);
* balanced accuracy averages recall over the classes *present in y_true*;
* macro-F1 averages F1 over the classes present in ``y_true`` or ``y_pred``, a class with no true positives
  scoring 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import EncoderlabError


def as_class_indices(y: np.ndarray | Sequence[int], name: str, n_classes: int | None = None) -> np.ndarray:
    """``y`` as a 1-D int64 array, refusing empty input, non-integer values and labels outside ``[0, n_classes)``.

    Floats holding whole numbers are accepted because labels often round-trip through pandas as float64;
    booleans are read as classes 0 and 1.
    """
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise EncoderlabError(f"{name} must be 1-D, got shape {arr.shape}", "pass one integer label per item")
    if arr.size == 0:
        raise EncoderlabError(f"{name} is empty", "evaluate at least one item")
    if arr.dtype.kind not in "biuf":
        raise EncoderlabError(f"{name} must hold integer class indices, got dtype {arr.dtype}",
                              "map class names to indices 0..C-1 first")
    if arr.dtype.kind == "f" and not (np.all(np.isfinite(arr)) and np.all(arr == np.round(arr))):
        raise EncoderlabError(f"{name} holds non-integer values", "pass integer class indices 0..C-1")
    arr = arr.astype(np.int64, copy=False)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0:
        raise EncoderlabError(f"{name} holds a negative label ({lo})", "labels must be class indices 0..C-1")
    if n_classes is not None and hi >= n_classes:
        raise EncoderlabError(f"{name} holds label {hi}, out of range for {n_classes} classes",
                              "pass n_classes covering every label, or fix the label mapping")
    return arr


def as_scores(scores: np.ndarray, n_items: int) -> np.ndarray:
    """``scores`` as a finite 2-D float array with one row per item (NaN would silently rank as 'not greater')."""
    arr = np.asarray(scores)
    if arr.ndim != 2:
        raise EncoderlabError(f"scores must be 2-D [n_items, n_classes], got shape {arr.shape}",
                              "pass one row of class scores per item")
    if arr.shape[0] != n_items:
        raise EncoderlabError(f"scores has {arr.shape[0]} rows but y_true has {n_items} labels",
                              "pass the scores and labels of the same items, in the same order")
    if arr.shape[1] == 0:
        raise EncoderlabError("scores has no class columns", "pass at least one class score per item")
    if arr.dtype.kind not in "iuf":
        raise EncoderlabError(f"scores must be numeric, got dtype {arr.dtype}", "pass float scores")
    if not np.all(np.isfinite(arr)):
        raise EncoderlabError("scores hold NaN or infinite values", "check the model output before scoring")
    return arr


def _pair(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int],
          n_classes: int | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Validated (y_true, y_pred, n_classes); n_classes defaults to the largest label seen + 1."""
    t = as_class_indices(y_true, "y_true", n_classes)
    p = as_class_indices(y_pred, "y_pred", n_classes)
    if t.shape != p.shape:
        raise EncoderlabError(f"y_true has {t.size} labels but y_pred has {p.size}",
                              "pass the true and predicted labels of the same items")
    if n_classes is None:
        n_classes = int(max(t.max(), p.max())) + 1
    elif n_classes < 1:
        raise EncoderlabError(f"n_classes must be >= 1, got {n_classes}", "pass the number of classes")
    return t, p, n_classes


def top_k_rank(y_true: np.ndarray | Sequence[int], scores: np.ndarray) -> np.ndarray:
    """0-based position of the true class when each row is sorted by descending score, stably.

    Ties are broken by class index (lower index first), the order a stable descending sort and ``np.argmax``
    give, so ``rank == 0`` is exactly "argmax is correct" and a constant scorer is not rewarded for ties.
    """
    scores = np.asarray(scores)
    y = as_class_indices(y_true, "y_true", scores.shape[1] if scores.ndim == 2 else None)
    scores = as_scores(scores, y.size)
    true_score = scores[np.arange(y.size), y][:, None]
    before = scores > true_score
    # equal scores at a lower class index also come first under the stable rule
    before |= (scores == true_score) & (np.arange(scores.shape[1])[None, :] < y[:, None])
    return before.sum(axis=1)


def per_item_topk_correct(y_true: np.ndarray | Sequence[int], scores: np.ndarray, k: int) -> np.ndarray:
    """Boolean per item: is the true class among the top ``k`` (stable tie rule of ``top_k_rank``)?

    Kept per item so bootstrap intervals can resample it; its mean is ``top_k_accuracy``.
    """
    if int(k) != k or k < 1:
        raise EncoderlabError(f"k must be a positive integer, got {k!r}", "use k >= 1, e.g. 1 or 5")
    return top_k_rank(y_true, scores) < int(k)  # k > C behaves like k == C: every class is in the top k


def top_k_accuracy(y_true: np.ndarray | Sequence[int], scores: np.ndarray, k: int) -> float:
    """Fraction of items whose true class is among the ``k`` highest scores (k clipped to the class count)."""
    return float(per_item_topk_correct(y_true, scores, k).mean())


def confusion_matrix(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int],
                     n_classes: int | None = None) -> np.ndarray:
    """``[C, C]`` int64 counts, rows = true class, columns = predicted class."""
    t, p, c = _pair(y_true, y_pred, n_classes)
    # one bincount over the flattened (true, pred) cell index instead of a Python loop over items
    return np.bincount(t * c + p, minlength=c * c).reshape(c, c)


def per_class_recall(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int],
                     n_classes: int | None = None) -> np.ndarray:
    """Recall of each class (``[C]`` float); NaN for classes absent from ``y_true``, whose recall is undefined."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def balanced_accuracy(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int],
                      n_classes: int | None = None) -> float:
    """Mean recall over classes present in ``y_true`` (sklearn's convention), robust to class imbalance."""
    recall = per_class_recall(y_true, y_pred, n_classes)
    return float(np.nanmean(recall))  # y_true is non-empty, so at least one class is present


def f1_from_counts(tp: np.ndarray, n_true: np.ndarray, n_pred: np.ndarray) -> np.ndarray:
    """Macro-F1 from per-class counts along the last axis; works on ``[..., C]`` batches (used by bootstrap).

    F1 = 2tp / (2tp + fp + fn) = 2tp / (n_true + n_pred); classes with neither true nor predicted items are
    left out of the mean, as sklearn does with ``labels`` = the labels seen.
    """
    denom = n_true + n_pred
    present = denom > 0
    f1 = np.where(present, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=-1) / np.maximum(present.sum(axis=-1), 1)


def macro_f1(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int],
             n_classes: int | None = None) -> float:
    """Unweighted mean F1 over classes present in ``y_true`` or ``y_pred`` (sklearn ``average="macro"``)."""
    cm = confusion_matrix(y_true, y_pred, n_classes)
    return float(f1_from_counts(np.diag(cm), cm.sum(axis=1), cm.sum(axis=0)))


def classification_metrics(y_true: np.ndarray | Sequence[int], scores: np.ndarray,
                           class_names: Sequence[str]) -> dict[str, float]:
    """Flat summary: ``top1``, ``top5`` (only when there are more than 5 classes), ``balanced_accuracy``,
    ``macro_f1``, ``n_items`` and ``recall/<class name>`` for every class present in ``y_true``.

    Predictions are the argmax of ``scores``; ``top5`` is omitted for C <= 5 because it would trivially be 1.
    """
    if isinstance(class_names, str):
        raise EncoderlabError(f"class_names must be a sequence of names, got the string {class_names!r:.60}",
                              "pass a list with one name per score column")
    names = list(class_names)
    scores = np.asarray(scores)
    if scores.ndim != 2 or scores.shape[1] != len(names):
        raise EncoderlabError(f"scores has shape {scores.shape} but there are {len(names)} class names",
                              "pass one score column per class name, in the same order")
    if len(set(names)) != len(names):
        raise EncoderlabError("class_names holds duplicates", "give every class a distinct name")
    c = len(names)
    y = as_class_indices(y_true, "y_true", c)
    scores = as_scores(scores, y.size)
    rank = top_k_rank(y, scores)
    pred = scores.argmax(axis=1)
    out: dict[str, float] = {"top1": float((rank < 1).mean())}
    if c > 5:
        out["top5"] = float((rank < 5).mean())
    out["balanced_accuracy"] = balanced_accuracy(y, pred, c)
    out["macro_f1"] = macro_f1(y, pred, c)
    out["n_items"] = int(y.size)
    recall = per_class_recall(y, pred, c)
    for i, name in enumerate(names):
        if not np.isnan(recall[i]):
            out[f"recall/{name}"] = float(recall[i])
    return out
