"""Zero-shot classification: a classifier whose weights are the text embeddings of prompts, no labels needed.

Prompt ensembling averages the *normalized* embeddings of every template filled with a class name and re-normalizes
the mean (CLIP paper, section 3.1.4): averaging unnormalized embeddings would let long prompts with large norms
dominate. Scores follow the model's training objective: CLIP-style models use a softmax over
``logit_scale * cos``; SigLIP-style models score each class independently with ``sigmoid(logit_scale * cos + bias)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import EncoderlabError
from ..normalize import normalize_rows
from ._base import Head, class_counts

SCORE_KINDS = ("softmax", "sigmoid", "cosine")


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


class ZeroShotClassifier(Head):
    """Nearest class prompt in the joint embedding space.

    Args:
        score_kind: "softmax" (CLIP, ALIGN, our aligned pairs), "sigmoid" (SigLIP) or "cosine" (raw similarity).
        logit_scale: the model's temperature (already exponentiated); only changes probabilities, never the argmax.
        logit_bias: SigLIP's learned bias, used with score_kind="sigmoid".

    ``fit(X, y)`` follows the head contract with ``X`` = the text embeddings of the class prompts, shaped
    ``[n_classes, n_templates, dim]`` (or ``[n_classes, dim]`` for one template), and ``y`` = the class each row
    of ``X`` embeds, in that order. No labelled image is used (``fit_counts_`` is all zeros); validation data, when
    given, is not used either: templates are chosen by the caller (see ``--compare-templates``).
    """

    def __init__(self, score_kind: str = "softmax", logit_scale: float | None = 100.0,
                 logit_bias: float | None = None) -> None:
        self.score_kind = score_kind
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias

    def fit(self, X: Any, y: Sequence[Any], X_val: Any = None, y_val: Any = None) -> ZeroShotClassifier:
        emb = _as_array(X)
        classes = list(y)
        if emb.ndim == 2:
            emb = emb[:, None, :]
        if emb.ndim != 3 or emb.shape[0] != len(classes):
            raise EncoderlabError(
                f"prompt embeddings of shape {tuple(emb.shape)} do not match {len(classes)} classes",
                "pass [n_classes, n_templates, dim] in class order",
            )
        if self.score_kind not in SCORE_KINDS:
            raise EncoderlabError(f"unknown score_kind {self.score_kind!r}", f"use one of {', '.join(SCORE_KINDS)}")
        self.classes_ = np.asarray(classes, dtype=object) if not all(isinstance(c, (int, np.integer))
                                                                    for c in classes) else np.asarray(classes)
        self.n_templates_ = emb.shape[1]
        # CLIP's ensemble: the re-normalized mean of the normalized prompt embeddings
        self.class_embeddings_ = normalize_rows(normalize_rows(emb).mean(axis=1))
        self.fit_counts_ = class_counts(np.zeros(0, dtype=np.int64), len(classes))
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``[n, n_classes]``: scale * cosine (+ bias for sigmoid models)."""
        self._check_fitted()
        x = normalize_rows(_as_array(X))
        if x.ndim != 2 or x.shape[1] != self.class_embeddings_.shape[1]:
            raise EncoderlabError(
                f"features of shape {tuple(x.shape)} do not match class embeddings of dim "
                f"{self.class_embeddings_.shape[1]}",
                "use image embeddings from the same dual encoder as the prompts",
            )
        logits = x @ self.class_embeddings_.T
        if self.score_kind != "cosine":
            logits = logits * float(self.logit_scale if self.logit_scale is not None else 100.0)
        if self.score_kind == "sigmoid" and self.logit_bias is not None:
            logits = logits + float(self.logit_bias)
        return logits

    def predict_proba(self, X: Any) -> np.ndarray:
        """Softmax over classes, or for sigmoid models each class's own match probability (rows need not sum to 1)."""
        logits = self.decision_function(X)
        if self.score_kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-logits))
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z)
        return p / p.sum(axis=1, keepdims=True)
