"""What every classification rung shares: class scores in dataset order, evaluation with intervals, prediction rows,
the encoder's per-item cost, and the record of which knobs a head chose and how."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..metrics.bootstrap import classification_intervals
from ..metrics.classification import classification_metrics
from .costs import encoder_ms_per_item

#: the score of a class a head never saw: below any real score, but finite, so metrics and intervals stay defined
UNSEEN_CLASS_SCORE = -1e30


def full_scores(head: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Class scores [n, n_classes] in the dataset's class order; classes the head never saw score lowest.

    Their items therefore count as errors (top-1) and rank their class last (top-k), as for any wrong prediction.
    """
    raw = np.asarray(head.scores(X), dtype=np.float64)
    if raw.ndim == 1:  # a binary head returning one column
        raw = np.stack([-raw, raw], axis=1)
    classes = np.asarray(head.classes_).astype(np.int64)
    if len(classes) == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return raw
    out = np.full((X.shape[0], n_classes), UNSEEN_CLASS_SCORE)
    out[:, classes] = raw
    return out


def evaluate(y: np.ndarray, scores: np.ndarray, classes: list[str], n_boot: int, seed: int) -> dict[str, float]:
    metrics = classification_metrics(y, scores, classes)
    metrics.update(classification_intervals(y, scores, len(classes), n_boot=n_boot, seed=seed))
    return metrics


def prediction_rows(emb: LabelledEmbeddings, idx: np.ndarray, scores: np.ndarray, setting: str,
                    k: int = 5) -> pd.DataFrame:
    """One row per evaluated item: id, label, prediction, and the top-k class names with their scores."""
    kk = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    cls = np.asarray(emb.classes, dtype=object)
    return pd.DataFrame({
        "setting": setting,
        "id": emb.ids[idx],
        "label": cls[emb.y[idx]],
        "prediction": cls[top[:, 0]],
        "correct": emb.y[idx] == top[:, 0],
        "topk_labels": [list(cls[r]) for r in top],
        "topk_scores": [list(np.round(scores[i, r].astype(float), 5)) for i, r in enumerate(top)],
    })


def eval_split(emb: LabelledEmbeddings, split: str) -> np.ndarray:
    """Positions of the labelled items to report on: one split, or ``"all"`` of them (for rungs that learn nothing
    from labels, like zero-shot, every labelled item is a fair test item)."""
    idx = np.flatnonzero(emb.y >= 0) if split == "all" else emb.index(split)
    if idx.size == 0:
        have = sorted({str(x) for x, y in zip(emb.split, emb.y) if y >= 0 and x is not None})
        raise EncoderlabError(f"split {split!r} of {emb.dataset.source!r} has no labelled items",
                              f"report on a split that has some ({', '.join(have) or 'none has any'}), or re-split "
                              "with --split-ratios train=0.8,val=0.1,test=0.1")
    return idx


def encoder_cost(encoder: Encoder, emb: LabelledEmbeddings, split: str, given: float | None) -> float:
    """Measured decode + preprocess + forward per item of ``split`` (or ``given``, measured once by a caller)."""
    if given is not None:
        return given
    mask = np.zeros(len(emb.dataset), dtype=bool)
    mask[emb.rows if split == "all" else emb.rows[emb.index(split, labelled=False)]] = True
    return encoder_ms_per_item(encoder, emb.dataset.subset(mask), emb.modality)


#: learned attributes holding a head's chosen knobs, by knob name
KNOB_ATTRIBUTES = {"C": "best_C_", "k": "best_k_", "alpha": "best_alpha_", "beta": "best_beta_"}


def chosen_knobs(head: Any, knobs: tuple[str, ...], on: str) -> dict[str, Any]:
    """The knobs a head chose and how: ``{"knobs": {name: value}, "chosen_by": on | "fixed"}``.

    ``on`` is what validation the head was given ("val" for the full-data protocol, "k-shot-val" for few-shot);
    a head that swept nothing (``sweep_`` empty, e.g. too few validation items) used fixed defaults.
    """
    values = {}
    for name in knobs:
        v = getattr(head, KNOB_ATTRIBUTES.get(name, f"best_{name}_"), None)
        if v is not None:
            if isinstance(v, (float, np.floating)):
                v = float(v)
            elif isinstance(v, (int, np.integer)):
                v = int(v)
            values[name] = v
    swept = bool(getattr(head, "sweep_", []))
    return {"knobs": values, "chosen_by": on if swept else "fixed"}


def seen_in_training(encoder: Encoder, keys: Sequence[str | None], modality: str, what: str,
                     warn: bool = True) -> dict[str, Any]:
    """How many evaluated items ``encoder`` was itself trained or selected on, and a warning when any.

    ``keys`` are the content keys of the evaluated items (``what`` names them in the message: "test images").
    Returns ``{"items", "of", "modality", "warning"}``; ``items`` is 0 and ``warning`` "" for an encoder encoderlab
    did not train (``Encoder.training_items()`` is None) or one that never saw these items. ``warn=False`` counts
    without warning (a generic caption such as "a photo" seen in training says little about the test pairs).
    """
    trained = encoder.training_items()
    if trained is None:
        return {"items": 0, "of": len(keys), "modality": modality, "warning": ""}
    seen = trained.seen(modality)
    n = sum(1 for k in keys if k is not None and k in seen)
    warning = ""
    if n and warn:
        warning = (f"warning: {n} of {len(keys)} {what} were used to train or select {encoder.spec} "
                   f"(on {trained.source or 'its training data'}): its numbers on them are optimistic; evaluate on "
                   "items it has not seen (the split it was trained with, same --seed and --split-ratios)")
    return {"items": n, "of": len(keys), "modality": modality, "warning": warning}
