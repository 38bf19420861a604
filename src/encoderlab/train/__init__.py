"""Training: one loop (``loop.fit``, with ``checkpoint``s and data-parallel ``distributed``), lr schedules,
contrastive losses, augmentation, LiT-style alignment."""

from .align import AlignConfig, AlignResult, align_encoders, evaluate_retrieval
from .loop import FitResult, LoopSettings, decay_groups, fit
from .losses import (
    contrastive_targets,
    sigmoid_loss,
    sigmoid_loss_global,
    symmetric_infonce,
    symmetric_infonce_global,
)
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
    "sigmoid_loss_global",
    "symmetric_infonce",
    "symmetric_infonce_global",
]
