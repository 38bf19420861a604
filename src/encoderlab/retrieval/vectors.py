"""Where an index's vectors come from: the embedding store (by content key) or an array, read in chunks.

Building never holds more than the index and one chunk: ``iter_chunks`` reads ``chunk`` rows at a time from the
store's memory maps, and the training / query samples are gathered by row. Rows come back L2-normalised, float32.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np

from ..normalize import normalize_rows
from ..progress import progress_bar

DEFAULT_CHUNK = 65_536


class VectorSource(Protocol):
    """``len(source)`` rows of ``dim`` floats, readable by range and by row number."""

    dim: int

    def __len__(self) -> int: ...

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, normalised float32."""
        ...

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order), normalised float32."""
        ...


class ArrayVectors:
    """Vectors of an in-memory or memory-mapped ``[n, d]`` array (``np.load(..., mmap_mode="r")`` streams too)."""

    def __init__(self, X: Any) -> None:
        if getattr(X, "ndim", None) != 2:
            X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"vectors must be a 2-D array, got shape {X.shape}")
        self.X = X
        self.dim = int(X.shape[1])

    def __len__(self) -> int:
        return int(self.X.shape[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        return normalize_rows(np.asarray(self.X[start:stop], dtype=np.float32))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return normalize_rows(np.asarray(self.X[np.asarray(rows, dtype=np.int64)], dtype=np.float32))


class StoreVectors:
    """The embeddings of ``keys`` (in that order) in one store space: the index's row i is ``keys[i]``."""

    def __init__(self, space: Any, keys: Sequence[str]) -> None:
        self.space = space
        self.keys = np.asarray(keys, dtype=object)
        dim = space.dim
        if dim is None:
            raise ValueError(f"embedding space {space.fingerprint} holds no vectors")
        self.dim = int(dim)

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, start: int, stop: int) -> np.ndarray:
        return normalize_rows(self.space.get(self.keys[start:stop].tolist()))

    def take(self, rows: np.ndarray) -> np.ndarray:
        return normalize_rows(self.space.get(self.keys[np.asarray(rows, dtype=np.int64)].tolist()))


def iter_chunks(source: VectorSource, chunk: int = DEFAULT_CHUNK, *, progress: bool = False,
                desc: str | None = None, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """``(first row, rows)`` of ``source`` from ``start`` on, ``chunk`` rows at a time, with a progress bar."""
    n = len(source)
    with progress_bar(n - start, "vec", progress, desc) as bar:
        for a in range(start, n, chunk):
            X = source.read(a, min(n, a + chunk))
            yield a, X
            bar.update(len(X))
