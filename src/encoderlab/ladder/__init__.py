"""The ladder: rungs compared side by side on the same items (and, next, the climbing runner and the Encoder Note)."""

from .compare import Comparison, comparison_rows, default_rungs, run_comparison

__all__ = ["Comparison", "comparison_rows", "default_rungs", "run_comparison"]
