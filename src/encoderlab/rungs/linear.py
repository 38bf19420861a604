"""Rung ``linear``: the linear probe (multinomial logistic regression), its L2 strength C chosen on validation."""

from __future__ import annotations

from ..heads.linear import LinearProbe
from .base import HeadContext, Rung, register_rung
from .probe import run_head_rung


def make_head(ctx: HeadContext) -> LinearProbe:
    """Validation-free (``selection="fixed"``): the grid's middle value, C=1, on every training item."""
    if ctx.selection == "fixed":
        return LinearProbe(Cs=[1.0], class_weight=ctx.class_weight, seed=ctx.seed, refit=ctx.refit)
    return LinearProbe(class_weight=ctx.class_weight, seed=ctx.seed, refit=ctx.refit)


RUNG = register_rung(Rung("linear", level=2, rank=0, task="classification", needs=("labels",), knobs=("C",),
                          description="linear probe: logistic regression on frozen features, C chosen on val",
                          features="tower", make_head=make_head,
                          run=lambda inputs, options: run_head_rung(RUNG, inputs, options)))
