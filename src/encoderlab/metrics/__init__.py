"""Pure-function evaluation metrics: classification, image<->text retrieval and bootstrap intervals.

Everything here takes numpy arrays and returns floats, arrays or flat ``dict[str, float]`` summaries, with no I/O
and no model code, so the numbers can be recomputed and cross-checked anywhere.
"""

from __future__ import annotations

from .bootstrap import bootstrap_ci, classification_intervals, paired_bootstrap, resample_blocks, with_intervals
from .classification import (
    balanced_accuracy,
    classification_metrics,
    confusion_matrix,
    macro_f1,
    per_class_recall,
    per_item_topk_correct,
    top_k_accuracy,
    top_k_rank,
)
from .retrieval import (
    mean_reciprocal_rank,
    metrics_from_ranks,
    pairs_from_captions,
    per_query_hits,
    recall_at_k,
    reciprocal_ranks,
    retrieval_metrics,
    retrieval_ranks,
)

__all__ = [
    "balanced_accuracy",
    "bootstrap_ci",
    "classification_intervals",
    "classification_metrics",
    "confusion_matrix",
    "macro_f1",
    "mean_reciprocal_rank",
    "metrics_from_ranks",
    "paired_bootstrap",
    "pairs_from_captions",
    "per_class_recall",
    "per_item_topk_correct",
    "per_query_hits",
    "recall_at_k",
    "reciprocal_ranks",
    "resample_blocks",
    "retrieval_metrics",
    "retrieval_ranks",
    "top_k_accuracy",
    "top_k_rank",
    "with_intervals",
]
