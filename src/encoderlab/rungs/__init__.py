"""The rungs of the ladder, one module each, in a registry (``list_rungs``, ``create_rung``, ``register_rung``).

Frozen and shallow rungs today: ``zeroshot``, ``knn``, ``retrieval`` (level 1), ``linear``, ``tip`` (level 2). Each
returns a ``RunResult``; head rungs share one protocol (``rungs.probe``).
"""

from .base import NEEDS, HeadContext, Rung, RungInputs, RungOptions, create_rung, list_rungs, register_rung
from .common import encoder_cost, full_scores
from .probe import run_probe
from .retrieval import run_retrieval
from .zeroshot import run_zeroshot, zeroshot_classifier

__all__ = [
    "NEEDS",
    "HeadContext",
    "Rung",
    "RungInputs",
    "RungOptions",
    "create_rung",
    "encoder_cost",
    "full_scores",
    "list_rungs",
    "register_rung",
    "run_probe",
    "run_retrieval",
    "run_zeroshot",
    "zeroshot_classifier",
]
