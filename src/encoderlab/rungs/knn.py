"""Rung ``knn``: cosine k-nearest neighbours on frozen features, k chosen on validation."""

from __future__ import annotations

from ..heads.knn import KNNClassifier
from .base import HeadContext, Rung, register_rung
from .probe import run_head_rung

K_GRID = (1, 3, 5, 10, 20, 50)


def make_head(ctx: HeadContext) -> KNNClassifier:
    """Similarity-weighted votes (DINO's kNN), k from :data:`K_GRID`; the bank grows by val only on refit."""
    return KNNClassifier(weights="distance", k_grid=K_GRID, refit=ctx.refit)


RUNG = register_rung(Rung("knn", level=1, rank=1, task="classification", needs=("labels",), knobs=("k",),
                          description="cosine kNN on frozen features, similarity-weighted votes",
                          features="tower", make_head=make_head,
                          run=lambda inputs, options: run_head_rung(RUNG, inputs, options)))
