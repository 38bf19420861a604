"""Rung ``clap``: CLAP (Silva-Rodríguez et al. 2024), a zero-shot-initialised linear probe held near zero-shot."""

from __future__ import annotations

from ..heads.clap import PAPER_PENALTY, ClassAdaptiveLinearProbe
from .base import HeadContext, Rung, register_rung
from .probe import run_head_rung


def make_head(ctx: HeadContext) -> ClassAdaptiveLinearProbe:
    """Wraps the run's zero-shot classifier; validation-free, the paper's penalty as initialised (x1)."""
    if ctx.selection == "fixed":
        return ClassAdaptiveLinearProbe(ctx.zero_shot, penalties=[PAPER_PENALTY], val_fraction=0.0, seed=ctx.seed,
                                        refit=ctx.refit)
    return ClassAdaptiveLinearProbe(ctx.zero_shot, seed=ctx.seed, refit=ctx.refit)


RUNG = register_rung(Rung("clap", level=2, rank=2, task="classification", needs=("dual", "labels"),
                          knobs=("penalty",), features="joint", make_head=make_head,
                          description="CLAP: zero-shot-initialised linear probe, class-adaptive penalty to zero-shot",
                          run=lambda inputs, options: run_head_rung(RUNG, inputs, options)))
