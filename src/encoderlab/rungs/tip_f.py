"""Rung ``tip-f``: Tip-Adapter-F (Zhang et al. 2022), Tip-Adapter whose cache keys are fine-tuned (small adaptation)."""

from __future__ import annotations

from ..heads.tip import PAPER_ALPHA, PAPER_BETA
from ..heads.tip_f import PAPER_EPOCHS, TipAdapterF
from .base import HeadContext, Rung, register_rung
from .probe import run_head_rung


def make_head(ctx: HeadContext) -> TipAdapterF:
    """Wraps the run's zero-shot classifier; validation-free, the paper's 20 epochs, alpha 1 and beta 5.5."""
    if ctx.selection == "fixed":
        return TipAdapterF(ctx.zero_shot, alphas=[PAPER_ALPHA], betas=[PAPER_BETA], epochs=PAPER_EPOCHS,
                           val_fraction=0.0, seed=ctx.seed, refit=ctx.refit)
    return TipAdapterF(ctx.zero_shot, seed=ctx.seed, refit=ctx.refit)


RUNG = register_rung(Rung("tip-f", level=3, rank=0, task="classification", needs=("dual", "labels"),
                          knobs=("epochs", "alpha", "beta"), features="joint", make_head=make_head,
                          description="Tip-Adapter-F: Tip-Adapter with its cache keys fine-tuned (AdamW, 20 epochs)",
                          run=lambda inputs, options: run_head_rung(RUNG, inputs, options)))
