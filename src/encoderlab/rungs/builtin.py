"""Importing this module registers the builtin rungs (the registry imports it on first use)."""

from . import clap, coop, finetune, knn, linear, retrieval, tip, tip_f, zeroshot  # noqa: F401
