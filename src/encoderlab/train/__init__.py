"""Training: one loop (``loop.fit``, with ``checkpoint``s), lr schedules, contrastive losses, LiT-style alignment."""

from .align import AlignConfig, AlignResult, align_encoders, evaluate_retrieval
from .loop import FitResult, LoopSettings, decay_groups, fit
from .losses import contrastive_targets, sigmoid_loss, symmetric_infonce
from .schedule import lr_at

__all__ = [
    "AlignConfig",
    "AlignResult",
    "FitResult",
    "LoopSettings",
    "align_encoders",
    "contrastive_targets",
    "decay_groups",
    "evaluate_retrieval",
    "fit",
    "lr_at",
    "sigmoid_loss",
    "symmetric_infonce",
]
