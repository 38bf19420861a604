"""Importing this module registers the builtin rungs (the registry imports it on first use)."""

from . import knn, linear, retrieval, tip, zeroshot  # noqa: F401
