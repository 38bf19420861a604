"""Compaction: merge a space's short shards into larger ones without a moment where a key is lost or changes value.

Time-based commits (``writer.COMMIT_SECONDS``) and resumed extractions leave many short shards; each costs a
sidecar read on open and a file descriptor per memory map. Compaction rewrites them, in three steps:

1. Plan. Every shard under ``min_rows`` rows joins a group (read order, one dtype per group) until the group holds
   ``min_rows`` rows. A group's merged shard holds only the rows readers see today (for a key stored twice, the
   copy in the first shard in read order), so duplicates are dropped and no value can change. It takes the
   sequence number of the group's first shard and a name that sorts first among that number's shards
   (``shards.merged_shard_name``), so it comes before every shard that held a losing copy of its keys. The plan is
   checked against the index the space will have at the end (every key of a group must resolve to its merged
   shard, else the group is left alone). Shards whose every key is read from an earlier shard ("dead" shards,
   e.g. the old shards a killed compaction did not get to remove) are removed too.
2. Write each merged shard through ``shards.write_shard`` (atomic ``.npy``, then the sidecar with its sha256),
   read it back and compare bit for bit, and register it.
3. Remove the old shards, sidecar first, in reverse read order. Whatever is left at any moment is a prefix (in read
   order) of the old shards next to every merged shard, and for each key either its old shard still comes first or
   the merged copy (the same bytes) does: a crash at any point leaves every key readable with its value.

Readers that opened the space before see a shard vanish; ``EmbeddingSpace.get`` then refreshes and retries once.
One compaction runs per space at a time (an ``flock`` on ``compact.lock``, where the platform has it); the holder
deletes what a killed compaction left uncommitted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CorruptStoreError, EncoderlabError
from . import shards as _shards
from .key_index import KeyIndex
from .shards import ShardRecord

if TYPE_CHECKING:
    from .space import EmbeddingSpace

COMPACT_MIN_ROWS = 4096  # the writer's default shard_size: shards shorter than a full one are merged
LOCK_NAME = "compact.lock"


@dataclass(eq=False)  # compared by identity: the fields hold numpy arrays
class _Member:
    """One old shard of a group: its record, every row's key and the rows readers see (its "winning" rows)."""

    rec: ShardRecord
    keys: np.ndarray
    live: np.ndarray  # row numbers, ascending


@dataclass(eq=False)
class _Group:
    members: list[_Member]
    name: str = ""
    written: ShardRecord | None = None
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="S1"))

    @property
    def rows(self) -> int:
        return sum(len(m.live) for m in self.members)


def _members(index: KeyIndex) -> list[_Member]:
    """Every shard in read order with the rows the index resolves keys to."""
    out = []
    for seg in index.segments:
        pos = np.sort(seg.positions)
        local = np.searchsorted(seg.starts, pos, side="right") - 1
        cuts = np.searchsorted(local, np.arange(len(seg.shards) + 1))
        for i, rec in enumerate(seg.shards):
            live = (pos[cuts[i] : cuts[i + 1]] - seg.starts[i]).astype(np.int64)
            out.append(_Member(rec, seg.shard_keys(i), live))
    return out


def plan(index: KeyIndex, min_rows: int) -> tuple[list[_Group], list[ShardRecord]]:
    """(groups of short shards to merge, dead shards to remove); see the module docstring."""
    members = _members(index)
    dead = [m.rec for m in members if len(m.live) == 0]
    groups: list[_Group] = []
    current: list[_Member] = []

    def close() -> None:
        if len(current) > 1:  # merging one shard would only rename it
            groups.append(_Group(list(current)))
        current.clear()

    for m in members:
        if not len(m.live) or m.rec.rows >= min_rows:
            continue
        if current and current[0].rec.dtype != m.rec.dtype:
            close()
        current.append(m)
        if sum(len(c.live) for c in current) >= min_rows:
            close()
    if len(current) == 1 and groups and groups[-1].members[0].rec.dtype == current[0].rec.dtype:
        groups[-1].members.append(current.pop())  # a last lone short shard joins the group before it
    close()
    taken = set(index.names)
    for g in groups:
        g.name = merged_name(_shards.shard_seq(g.members[0].rec.name), taken)
        taken.add(g.name)
        g.keys = np.concatenate([m.keys[m.live] for m in g.members])
    return _checked(index, members, groups, dead), dead


def merged_name(seq: int, taken: set[str]) -> str:
    """The merged shard's name (a seam for tests that need a name sorting elsewhere)."""
    return _shards.merged_shard_name(seq, taken)


def _checked(index: KeyIndex, members: list[_Member], groups: list[_Group], dead: list[ShardRecord]) -> list[_Group]:
    """The groups whose keys all resolve to their merged shard in the index the space ends up with."""
    dead_names = {r.name for r in dead}
    while groups:
        retired = dead_names | {m.rec.name for g in groups for m in g.members}
        kept = [(m.rec, m.keys) for m in members if m.rec.name not in retired]
        merged = [(_placeholder(g), g.keys) for g in groups]
        final = KeyIndex().added([r for r, _ in kept + merged], [k for _, k in kept + merged])
        position = {s.name: i for i, s in enumerate(final.shards)}
        bad = [g for g in groups if (final.lookup(g.keys)[0] != position[g.name]).any()]
        if not bad:
            return groups
        groups = [g for g in groups if g not in bad]
    return groups


def _placeholder(g: _Group) -> ShardRecord:
    first = g.members[0].rec
    return ShardRecord(g.name, g.rows, first.dim, first.dtype, 1, "sha256:planned")


try:
    import fcntl
except ImportError:  # pragma: no cover - no flock (Windows): compactions are not serialized
    fcntl = None  # type: ignore[assignment]


@contextlib.contextmanager
def exclusive(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on ``path`` (yields False when another process holds it)."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def write_merged(space: EmbeddingSpace, group: _Group) -> ShardRecord:
    """Write one group's merged shard, read it back and compare bit for bit; returns its committed record."""
    parts = [np.asarray(space.open_rows(m.rec))[m.live] for m in group.members]  # checksum-verified on open
    data = np.concatenate(parts)
    keys = [k.decode("utf-8") for k in group.keys.tolist()]
    rec = _shards.write_shard(space.shards_dir, group.name, keys, data)
    problem = _shards.check_shard(space.shards_dir, rec, deep=True)
    back = np.load(space.shards_dir / rec.npy_name, mmap_mode="r", allow_pickle=False)
    if problem is not None or back.dtype != data.dtype or not np.array_equal(back, data):
        remove_shard(space.shards_dir, rec.name)
        raise CorruptStoreError(
            f"merged shard {space.shards_dir / rec.npy_name} did not read back as written"
            + (f" ({problem[1]})" if problem else ""),
            "check the disk (`encoderlab store verify`); the original shards were kept",
        )
    return rec


def remove_shard(directory: Path, name: str) -> None:
    """Remove one committed shard: the sidecar first, so the shard stops counting before its data goes."""
    for suffix in (".json", ".npy"):
        with contextlib.suppress(FileNotFoundError):
            (directory / (name + suffix)).unlink()


def compact(space: EmbeddingSpace, min_rows: int = COMPACT_MIN_ROWS) -> dict[str, Any]:
    """Merge the short shards of ``space``; returns what was done (see ``EmbeddingSpace.compact``)."""
    if isinstance(min_rows, bool) or not isinstance(min_rows, int) or min_rows < 2:
        raise EncoderlabError(f"min_rows must be an integer >= 2, got {min_rows!r}",
                              f"pass e.g. {COMPACT_MIN_ROWS} (shards with fewer rows are merged)")
    out: dict[str, Any] = {"fingerprint": space.fingerprint, "min_rows": min_rows, "merged": 0, "into": 0,
                           "removed_dead": 0, "rows": 0, "shards_before": 0, "shards_after": 0, "busy": False}
    if not space.shards_dir.is_dir():
        return out
    with exclusive(space.path / LOCK_NAME) as got:
        if not got:
            out["busy"] = True  # another process is compacting this space right now
            return out
        if fcntl is not None:  # holding the lock: no other compaction can be writing these files
            _shards.remove_merged_orphans(space.shards_dir)
        space.refresh()
        index = space.index()
        out["shards_before"] = out["shards_after"] = len(index.shards)
        groups, dead = plan(index, min_rows)
        if not groups and not dead:
            return out
        for g in groups:
            g.written = write_merged(space, g)
        space.register_shards([g.written for g in groups if g.written], [g.keys for g in groups if g.written])
        retired = {r.name for r in dead} | {m.rec.name for g in groups for m in g.members}
        for rec in reversed(index.shards):  # reverse read order: see the module docstring
            if rec.name in retired:
                remove_shard(space.shards_dir, rec.name)
        space.forget()
        out.update(
            merged=sum(len(g.members) for g in groups),
            into=len(groups),
            removed_dead=len(dead),
            rows=sum(g.rows for g in groups),
            shards_after=len(space.shard_records()),
        )
    return out
