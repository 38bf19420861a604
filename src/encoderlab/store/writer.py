"""ShardWriter: buffers embeddings and commits them to a space as a shard every N rows or every T seconds.

The time limit bounds what a ``kill -9`` can lose: without it a slow encoder (a CPU at ~60 images/s) fills a
4096-row shard in over a minute, and a small dataset is committed only at the very end.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EncoderlabError
from . import shards as _shards
from .key_index import encode_query, widen
from .shards import ShardRecord

if TYPE_CHECKING:
    from .space import EmbeddingSpace

# Buffered rows are committed once the oldest of them is this old (checked when a batch is added): a killed
# extraction loses at most this much work plus one batch. 30 s of rows is a shard of a few hundred to a few
# thousand rows on a CPU; the shard count this adds is kept down by compaction (see ``compact``).
COMMIT_SECONDS = 30.0
COMMIT_SECONDS_ENV = "ENCODERLAB_COMMIT_SECONDS"
# A writer that committed by time compacts the space on close once it holds this many shards under
# ``shard_size`` rows (see ShardWriter.close).
AUTO_COMPACT_SHARDS = 8


def default_commit_seconds() -> float:
    """The commit interval: ``$ENCODERLAB_COMMIT_SECONDS`` when set, else ``COMMIT_SECONDS`` (the one place read)."""
    raw = os.environ.get(COMMIT_SECONDS_ENV, "").strip()
    if not raw:
        return COMMIT_SECONDS
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value > 0:  # also refuses NaN
        raise EncoderlabError(
            f"{COMMIT_SECONDS_ENV}={raw!r} is not a positive number of seconds",
            f"set it to e.g. 30 (or inf to commit only every shard_size rows), or unset it for {COMMIT_SECONDS:g}",
        )
    return value


def check_commit_seconds(value: float | None) -> float:
    """``value`` as a positive float (None: the default); the error names the bad value."""
    if value is None:
        return default_commit_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise EncoderlabError(
            f"commit_seconds must be a positive number of seconds, got {value!r}",
            f"pass e.g. 30 (math.inf commits only every shard_size rows), or None for the default {COMMIT_SECONDS:g}",
        )
    return float(value)


class ShardWriter:
    """Buffers (keys, rows) and commits them as shards; use as a context manager.

    A shard is committed when ``shard_size`` rows are buffered, or when the oldest buffered row has waited
    ``commit_seconds`` (None: ``$ENCODERLAB_COMMIT_SECONDS``, else ``COMMIT_SECONDS``), whichever comes first.
    Keys already in the space, or already added to this writer, are skipped (content keys name the same
    embedding), so a resumed extraction can re-add a batch safely. On exit the remaining rows are committed,
    also when the block raised: what was computed is kept.
    """

    def __init__(
        self,
        space: EmbeddingSpace,
        shard_size: int = 4096,
        dtype: str = "float32",
        commit_seconds: float | None = None,
        check_writable: bool = True,
    ) -> None:
        """``check_writable``: fail now on a read-only store, before the caller computes rows (False: only once
        the first new row must be stored, so re-adding stored keys works on a read-only store)."""
        if not isinstance(shard_size, int) or shard_size < 1:
            raise EncoderlabError(f"shard_size must be a positive integer, got {shard_size!r}")
        if dtype not in _shards.SUPPORTED_DTYPES:
            raise EncoderlabError(f"unsupported embedding dtype {dtype!r}", f"use one of {_shards.SUPPORTED_DTYPES}")
        self.space = space
        self.shard_size = shard_size
        self.commit_seconds = check_commit_seconds(commit_seconds)
        self.timed_commits = 0  # shards committed because rows waited commit_seconds (short shards)
        self.compaction: dict[str, Any] | None = None  # what close() compacted, if anything
        self._first_buffered: float | None = None  # time.monotonic() when the oldest buffered row came in
        self.dtype = np.dtype(dtype)
        self.rows_written = 0
        self.rows_skipped = 0
        self.shards_written: list[str] = []
        self._keys: list[str] = []
        self._rows: list[np.ndarray] = []
        self._enc: list[np.ndarray] = []  # the buffered keys as bytes, for the index
        self._buffered: set[str] = set()
        self._dim: int | None = None
        self._seq = -1
        self._closed = False
        self._cleaned = False
        self._writable = False
        if check_writable:
            self._check_writable()

    def _check_writable(self) -> None:
        if not self._writable:
            self.space.check_writable()
            self._writable = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close(compact=False)  # after an error (or Ctrl-C) only save the rows, do no extra work
        except Exception as e:  # keep the original error; say that the last rows could not be saved
            warnings.warn(f"could not commit the last embeddings after an error: {e}", stacklevel=2)

    @property
    def pending(self) -> int:
        return len(self._keys)

    def add(self, keys: Sequence[str], array: Any) -> int:
        """Buffer rows under their keys, committing full shards as they fill; returns rows accepted."""
        if self._closed:
            raise EncoderlabError("this ShardWriter is closed", "open a new one with space.writer()")
        keys = _shards.check_keys(keys)
        arr = _as_matrix(array)
        if arr.shape[0] != len(keys):
            raise EncoderlabError(f"got {len(keys)} keys but {arr.shape[0]} embedding rows; they must align")
        expected = self._dim if self._dim is not None else self.space.dim
        if expected is not None and arr.shape[1] != expected:
            raise EncoderlabError(
                f"embedding dim {arr.shape[1]} does not match dim {expected} of space {self.space.fingerprint}",
                "a space holds one encoder's embeddings; a different encoder needs its own fingerprint",
            )
        if not np.isfinite(arr).all():
            bad = int(np.flatnonzero(~np.isfinite(arr).all(axis=1))[0])
            raise EncoderlabError(f"embedding for key {keys[bad]!r} contains NaN or inf", "check the encoder output")
        if self.dtype == np.float16 and arr.size and np.abs(arr).max() > np.finfo(np.float16).max:
            raise EncoderlabError(
                f"embedding values up to {np.abs(arr).max():.4g} overflow float16", "write this space as float32"
            )
        self._dim = arr.shape[1]
        if not keys:
            return 0
        enc = encode_query(keys)
        shard, _ = self.space.lookup(enc)
        take = np.flatnonzero(shard < 0)
        if len(take):
            _, first = np.unique(enc[take], return_index=True)  # a key repeated within the batch: first row
            take = take[np.sort(first)]
        if self._buffered and len(take):
            take = take[[keys[i] not in self._buffered for i in take.tolist()]]
        self.rows_skipped += len(keys) - len(take)
        if len(take):
            self._check_writable()
            new_keys = [keys[i] for i in take.tolist()]
            self._buffered.update(new_keys)
            self._keys.extend(new_keys)
            self._enc.append(enc[take])
            self._rows.append(np.array(arr[take], dtype=np.float32))
            if self._first_buffered is None:
                self._first_buffered = time.monotonic()
        while len(self._keys) >= self.shard_size:
            self._commit(self.shard_size)
        if self._keys and self._first_buffered is not None:
            if time.monotonic() - self._first_buffered >= self.commit_seconds:
                self._commit(len(self._keys))
                self.timed_commits += 1
        return len(take)

    def flush(self) -> ShardRecord | None:
        """Commit everything buffered as one shard now."""
        return self._commit(len(self._keys)) if self._keys else None

    def close(self, compact: bool = True) -> None:
        """Commit what is buffered; then, if this writer committed short shards by time and the space now holds
        ``AUTO_COMPACT_SHARDS`` or more shards under ``shard_size`` rows, merge them (``compact=False``: never).

        The compaction only rewrites short shards, is safe for concurrent readers and writers, and a failure is a
        warning: the rows are committed already.
        """
        if self._closed:
            return
        self._closed = True
        self.flush()
        if compact and self.timed_commits:
            self._auto_compact()
        self.space.save_index_cache()

    def _auto_compact(self) -> None:
        try:
            small = sum(1 for s in self.space.shard_records() if s.rows < self.shard_size)
            if small >= AUTO_COMPACT_SHARDS:
                self.compaction = self.space.compact(min_rows=self.shard_size)
        except EncoderlabError as e:  # e.g. a corrupt shard elsewhere in the space: verify/repair reports it
            warnings.warn(f"skipped compacting embedding space {self.space.fingerprint}: {e}", stacklevel=3)

    def _commit(self, n: int) -> ShardRecord:
        rows = np.concatenate(self._rows) if len(self._rows) > 1 else self._rows[0]
        enc = widen(self._enc) if len(self._enc) > 1 else self._enc[0]
        keys, data = self._keys[:n], rows[:n].astype(self.dtype)
        directory = self.space.shards_dir
        target = directory
        try:
            if not self._cleaned:
                self._cleaned = True
                self.space.clean_orphans()
            directory.mkdir(parents=True, exist_ok=True)
            known = self.space.last_shard_seq()
            for _ in range(5):
                self._seq = max(self._seq, known) + 1
                name = _shards.new_shard_name(self._seq)
                target = directory / (name + ".npy")
                try:
                    rec = _shards.write_shard(directory, name, keys, data)
                    break
                except FileExistsError:
                    continue
            else:  # pragma: no cover - five random 32-bit collisions in a row
                raise EncoderlabError(f"could not pick a fresh shard name in {directory}")
        except OSError as e:  # disk full or read-only: the environment, said in the user's words
            err = _shards.write_error(e, target, self.space.path.parent)
            if err is None:
                raise
            raise err from None
        self.space.register_shard(rec, enc[:n])
        self._keys = self._keys[n:]
        self._rows = [rows[n:]] if n < len(rows) else []
        self._enc = [enc[n:]] if n < len(enc) else []
        self._buffered.difference_update(keys)
        # The rows left over (fewer than n) came in after the committed ones; their wait starts now at the latest.
        self._first_buffered = time.monotonic() if self._keys else None
        self.rows_written += n
        self.shards_written.append(rec.name)
        return rec


def _as_matrix(array: Any) -> np.ndarray:
    """A 2-D float array from numpy or torch input (torch is never imported here)."""
    if hasattr(array, "detach") and hasattr(array, "cpu"):
        array = array.detach().cpu().float().numpy()
    arr = np.asarray(array)
    if arr.ndim != 2:
        raise EncoderlabError(f"embeddings must be a 2-D array (rows, dim), got shape {arr.shape}")
    if arr.dtype.kind not in "fiu":
        raise EncoderlabError(f"embeddings must be numeric, got dtype {arr.dtype}")
    return arr
