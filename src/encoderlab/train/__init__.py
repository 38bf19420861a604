"""Training on frozen features: contrastive alignment of two towers (LiT-style heads)."""

from .align import AlignResult, align_encoders, evaluate_retrieval, lr_at
from .losses import contrastive_targets, symmetric_infonce

__all__ = ["AlignResult", "align_encoders", "contrastive_targets", "evaluate_retrieval", "lr_at", "symmetric_infonce"]
