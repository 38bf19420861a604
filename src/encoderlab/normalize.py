"""Unit-length rows, for numpy arrays and torch tensors alike: the one normalization helper.

Cosine similarity is a dot product of unit rows. An all-zero row stays zero instead of becoming NaN, so one
degenerate item cannot poison a whole score matrix; callers that must refuse such rows check for them first.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np

A = TypeVar("A")

EPS = 1e-12


def normalize_rows(x: A, axis: int = -1) -> A:
    """``x`` scaled to unit L2 norm along ``axis``: float32 numpy in, float32 numpy out; a tensor stays a tensor."""
    if hasattr(x, "detach") and hasattr(x, "norm"):  # torch, without importing it here
        t: Any = x
        if not t.is_floating_point():
            t = t.float()
        return t / t.norm(dim=axis, keepdim=True).clamp_min(EPS)  # type: ignore[return-value]
    arr = np.asarray(x, dtype=np.float32)
    return arr / np.maximum(np.linalg.norm(arr, axis=axis, keepdims=True), EPS)  # type: ignore[return-value]
