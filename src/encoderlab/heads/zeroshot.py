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


def _as_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class ZeroShotClassifier:
    """Nearest class prompt in the joint embedding space.

    Args:
        score_kind: "softmax" (CLIP, ALIGN, our aligned pairs), "sigmoid" (SigLIP) or "cosine" (raw similarity).
        logit_scale: the model's temperature (already exponentiated); only changes probabilities, never the argmax.
        logit_bias: SigLIP's learned bias, used with score_kind="sigmoid".

    ``fit(prompt_embeddings, classes)`` takes the text embeddings of the class prompts, shaped
    ``[n_classes, n_templates, dim]`` (or ``[n_classes, dim]`` for one template), in the order of ``classes``.
    """

    def __init__(self, score_kind: str = "softmax", logit_scale: float | None = 100.0,
                 logit_bias: float | None = None) -> None:
        self.score_kind = score_kind
        self.logit_scale = logit_scale
        self.logit_bias = logit_bias

    def fit(self, prompt_embeddings: Any, classes: Sequence[Any]) -> ZeroShotClassifier:
        emb = _as_array(prompt_embeddings)
        if emb.ndim == 2:
            emb = emb[:, None, :]
        if emb.ndim != 3 or emb.shape[0] != len(classes):
            raise EncoderlabError(
                f"prompt embeddings of shape {tuple(emb.shape)} do not match {len(classes)} classes",
                "pass [n_classes, n_templates, dim] in class order",
            )
        if self.score_kind not in ("softmax", "sigmoid", "cosine"):
            raise EncoderlabError(f"unknown score_kind {self.score_kind!r}", "use softmax, sigmoid or cosine")
        self.classes_ = np.asarray(list(classes), dtype=object)
        self.n_templates_ = emb.shape[1]
        self.class_embeddings_ = _normalize(_normalize(emb).mean(axis=1))
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        """Logits ``[n, n_classes]``: scale * cosine (+ bias for sigmoid models)."""
        x = _normalize(_as_array(X))
        if x.ndim != 2 or x.shape[1] != self.class_embeddings_.shape[1]:
            raise EncoderlabError(
                f"features of shape {tuple(x.shape)} do not match class embeddings of dim {self.class_embeddings_.shape[1]}",
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

    def predict(self, X: Any) -> np.ndarray:
        return self.classes_[np.argmax(self.decision_function(X), axis=1)]

    def score(self, X: Any, y: Sequence[Any]) -> float:
        return float(np.mean(self.predict(X) == np.asarray(y, dtype=object)))

    @property
    def n_trainable_params(self) -> int:
        return 0
