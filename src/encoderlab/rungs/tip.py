"""Rung ``tip``: Tip-Adapter, the zero-shot classifier plus a training-free cache of labelled features."""

from __future__ import annotations

from ..heads.tip import PAPER_ALPHA, PAPER_BETA, TipAdapter
from .base import HeadContext, Rung, register_rung
from .probe import run_head_rung


def make_head(ctx: HeadContext) -> TipAdapter:
    """Wraps the run's zero-shot classifier (over every class, so a class without a cached item keeps its prompt)."""
    if ctx.selection == "fixed":  # validation-free: the paper's alpha=1, beta=5.5 on every cached item
        return TipAdapter(ctx.zero_shot, alphas=[PAPER_ALPHA], betas=[PAPER_BETA], val_fraction=0.0, seed=ctx.seed,
                          refit=ctx.refit)
    return TipAdapter(ctx.zero_shot, seed=ctx.seed, refit=ctx.refit)


RUNG = register_rung(Rung("tip", level=2, rank=1, task="classification", needs=("dual", "labels"),
                          knobs=("alpha", "beta"), features="joint", make_head=make_head,
                          description="Tip-Adapter: zero-shot logits + a cache of labelled features (dual encoders)",
                          run=lambda inputs, options: run_head_rung(RUNG, inputs, options)))
