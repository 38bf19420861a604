"""One embedding space: the embeddings of one encoder x modality, keyed by content, in committed shards.

See ``embedding_store`` for the layout and the guarantees (commits, concurrency, duplicates, integrity, commits by
time and compaction); this module holds the space itself: its key index (with the on-disk cache), reads through
memory maps with a per-process checksum check, writers, verification, repair and compaction.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..errors import CorruptStoreError, EncoderlabError
from . import compact as _compact
from . import shards as _shards
from .key_index import (
    CacheProblem,
    KeyIndex,
    Segment,
    cache_token,
    drop_cache,
    encode_query,
    key_list,
    read_cache,
    save_cache,
    widen,
)
from .shards import ShardRecord
from .writer import ShardWriter

# The consolidated index is rewritten once this many rows (and a quarter of the cached rows) are uncached.
PERSIST_MIN_ROWS = 50_000
OPEN_SHARDS = 256  # memory maps kept open per space (each holds a file descriptor)
# ... and at most this many bytes of them: the pages a mapping has touched count in the process's RSS until it is
# closed, so a scan over a store larger than this keeps a flat RSS instead of one that grows with the store
# (re-opening a map is a syscall; its pages come back from the page cache, and the checksum is not redone).
OPEN_BYTES = 512 * 1024 * 1024

# Shards whose checksum this process has verified, keyed by identity and promise, shared by all spaces.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()
_VERIFIED_LOCK = threading.Lock()


def _repair_fix(sidecar: Path) -> str:
    return (
        f"delete it and its sidecar {sidecar} (encoderlab will recompute those items), "
        "or run `encoderlab store verify --repair` / EmbeddingSpace.repair()"
    )


class ShardRemovedError(CorruptStoreError):
    """A shard this space's index lists was removed (by compaction or repair elsewhere): refresh and retry."""


class MissingEmbeddingsError(EncoderlabError, KeyError):
    """Some requested keys have no embedding in this space; ``missing_keys`` lists them in request order."""

    def __init__(self, missing_keys: list[str], requested: int, fingerprint: str) -> None:
        self.missing_keys = missing_keys
        super().__init__(
            f"{len(missing_keys)} of {requested} requested keys are not in embedding space {fingerprint}"
            f" (e.g. {missing_keys[0]!r})",
            "compute them first: EmbeddingSpace.missing(keys) lists them, writer()/put() stores them",
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class EmbeddingSpace:
    """The embeddings of one encoder, keyed by content; see the module docstring for the layout."""

    def __init__(self, path: str | os.PathLike, fingerprint: str | None = None, checksum_on_read: bool = True) -> None:
        self.path = Path(path)
        self.fingerprint = fingerprint or self.path.name
        self.checksum_on_read = checksum_on_read
        self.shards_dir = self.path / "shards"
        self.index_dir = self.path / "index"
        self._lock = threading.RLock()
        self._index: KeyIndex | None = None
        self._bad: dict[str, str] = {}  # sidecar name -> why it could not be read
        self._cached_rows = 0  # rows covered by the on-disk index cache
        self._cache_token: str | None = None  # token of the on-disk cache the index was loaded from
        self._distrusted: set[str] = set()  # cache tokens found to disagree with the sidecars: never loaded again
        self._maps: OrderedDict[str, np.ndarray] = OrderedDict()

    def __repr__(self) -> str:
        return f"EmbeddingSpace({str(self.path)!r})"

    # ------------------------------------------------------------------------------------------ meta

    @property
    def meta(self) -> dict[str, Any] | None:
        """What ``space.json`` records about the encoder (None if it was never written)."""
        try:
            obj = json.loads((self.path / "space.json").read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptStoreError(
                f"{self.path / 'space.json'} is not valid JSON ({e})", "delete it; it only describes the space"
            ) from None
        return obj.get("meta") if isinstance(obj, dict) else None

    def _write_meta(self, meta: dict[str, Any]) -> None:
        path = self.path / "space.json"
        if path.exists():
            with contextlib.suppress(CorruptStoreError):
                if self.meta is not None:
                    return  # written once: the fingerprint already pins what it describes
        doc = {"format": _shards.FORMAT, "fingerprint": self.fingerprint, "meta": meta}
        try:
            with atomic_open(path, "wb") as f:
                f.write((json.dumps(doc, indent=2, sort_keys=True, default=str) + "\n").encode("utf-8"))
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return  # only describes the space: a read-only store still serves reads; writers say so
            raise _shards.write_error(e, path, self.path.parent) or e from None

    # ----------------------------------------------------------------------------------------- index

    def _load(self) -> KeyIndex:
        with self._lock:
            if self._index is None:
                self._read_index(full=True)
            if self._bad:
                name, why = next(iter(self._bad.items()))
                sidecar = self.shards_dir / (name + ".json")
                raise CorruptStoreError(
                    f"{len(self._bad)} shard sidecar(s) of embedding space {self.fingerprint} cannot be read:"
                    f" {sidecar}: {why}",
                    _repair_fix(sidecar).replace("delete it and its sidecar", f"delete {sidecar} and its .npy"),
                )
            assert self._index is not None
            return self._index

    def _read_index(self, full: bool) -> None:
        """Bring the index up to date with the sidecars on disk (from scratch if ``full``)."""
        committed, _, _ = _shards.list_shard_files(self.shards_dir)
        names = set(committed)
        if not full and self._index is not None and not self._index.names <= names:
            full = True  # shards were removed (repair): start over
        if full or self._index is None:
            cached = self._load_cache(names)
            self._index = KeyIndex([cached] if cached is not None else [])
            self._cached_rows = cached.rows if cached is not None else 0
        known = self._index.names
        records, key_arrays, bad = [], [], {}
        for name in committed:
            if name in known:
                continue
            try:
                rec, keys = _shards.read_sidecar(self.shards_dir / (name + ".json"))
            except FileNotFoundError:
                continue  # removed meanwhile
            except (ValueError, OSError) as e:
                bad[name] = str(e)
                continue
            records.append(rec)
            key_arrays.append(keys)
        self._index = self._index.added(records, key_arrays)
        self._bad = bad
        self._maybe_save_cache()

    def _load_cache(self, committed: set[str]) -> Segment | None:
        """The on-disk index cache if it passes its checks; a damaged or stale one is dropped (rebuilt later).

        Trusting a damaged cache is not harmless: keys it cannot find look missing, writers store them again and
        the space counts them twice.
        """
        self._cache_token = None
        try:
            found = read_cache(self.index_dir, committed)
        except CacheProblem as e:
            drop_cache(self.index_dir, raw=e.raw)  # only the cache judged, not one committed since
            return None
        if found is None or found[1] in self._distrusted:
            return None
        self._cache_token = found[1]
        return found[0]

    def _cache_disagrees(self, rec: ShardRecord) -> bool:
        """Whether ``rec`` came from the on-disk cache and differs from its sidecar; if so the cache is dropped
        and the index forgotten, so the next read rebuilds it from the sidecars."""
        token = self._cache_token
        if token is None:
            return False
        try:
            side, _ = _shards.read_sidecar(self.shards_dir / rec.sidecar_name)
        except (ValueError, OSError):
            return False
        if side == rec:
            return False
        with self._lock:
            self._distrusted.add(token)
            drop_cache(self.index_dir, token=token)
            self._index = None
            self._cache_token = None
            self._maps.clear()
        return True

    def _maybe_save_cache(self) -> None:
        idx = self._index
        if idx is None or self._bad:
            return
        uncached = idx.rows - self._cached_rows
        if uncached < max(PERSIST_MIN_ROWS, self._cached_rows // 4):
            return
        if not idx.segments:
            return
        self._index = idx = idx.consolidated()
        seg = idx.segments[0]
        with contextlib.suppress(OSError):  # a read-only store simply stays uncached
            self.index_dir.mkdir(parents=True, exist_ok=True)
            save_cache(self.index_dir, seg)
            self._cached_rows = seg.rows
            self._cache_token = cache_token(self.index_dir)

    def refresh(self) -> None:
        """Pick up shards committed (or removed) by other writers since this space was opened."""
        with self._lock:
            self._read_index(full=self._index is None)
            self._maps.clear()

    def lookup(self, encoded_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard position, row)`` of each bytes key (``encode_query``); shard -1 where the key is absent."""
        return self._load().lookup(encoded_keys)

    def last_shard_seq(self) -> int:
        """Sequence number of the newest committed shard (-1 when empty): new shards are numbered after it."""
        idx = self._load()
        return max((_shards.shard_seq(s.name) for s in idx.shards[-1:]), default=-1)

    def save_index_cache(self) -> None:
        """Persist the consolidated key index when enough rows are not covered by the cache yet."""
        with self._lock:
            if self._index is not None:
                self._maybe_save_cache()

    def register_shard(self, rec: ShardRecord, keys: np.ndarray) -> None:
        """Add a shard this process just committed to the in-memory index (no sidecar re-read)."""
        self.register_shards([rec], [keys])

    def register_shards(self, recs: list[ShardRecord], keys: list[np.ndarray]) -> None:
        """Add shards this process just committed to the in-memory index in one step (compaction adds many)."""
        with self._lock:
            if self._index is None:
                self._read_index(full=True)
            elif recs:
                self._index = self._index.added(list(recs), list(keys))

    def index(self) -> KeyIndex:
        """The key index as last read (``refresh()`` first to see other writers' shards); never mutated."""
        return self._load()

    def shard_records(self) -> list[ShardRecord]:
        """The committed shards in read order, as last read."""
        return list(self._load().shards)

    def forget(self) -> None:
        """Drop the in-memory index and memory maps: the next access re-reads the shards on disk."""
        with self._lock:
            self._index = None
            self._maps.clear()

    # ------------------------------------------------------------------------------------------ reads

    @property
    def dim(self) -> int | None:
        """Embedding size (None until the first shard is committed, unless ``space.json`` meta has ``dim``)."""
        idx = self._load()
        if idx.shards:
            return idx.shards[0].dim
        with contextlib.suppress(CorruptStoreError):
            meta = self.meta or {}
            if isinstance(meta.get("dim"), int):
                return meta["dim"]
        return None

    def __len__(self) -> int:
        return len(self._load())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        shard, _ = self._load().lookup(encode_query([key]))
        return bool(shard[0] >= 0)

    def keys(self) -> list[str]:
        """Every stored key once, in commit order."""
        return self._load().keys_in_order()

    def missing(self, keys: Sequence[str]) -> list[str]:
        """The keys with no stored embedding, first occurrence order, each once: what still needs encoding."""
        keys = key_list(keys)
        q = encode_query(keys)
        shard, _ = self._load().lookup(q)
        out, seen = [], set()
        for i in np.flatnonzero(shard < 0).tolist():
            k = keys[i]
            if k not in seen:
                seen.add(k)
                out.append(k)
        return out

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """float32 array with one row per requested key, in request order (repeats allowed).

        Rows are gathered shard by shard from memory maps, so memory is O(len(keys) * dim).
        """
        keys = key_list(keys)
        try:
            return self._get(keys)
        except ShardRemovedError:
            # Compacted (or repaired) by another process since this space was read: every key is still held,
            # now by other shards, so one re-read of the sidecars is enough.
            self.refresh()
            return self._get(keys)

    def _get(self, keys: list[str]) -> np.ndarray:
        q = encode_query(keys)
        idx = self._load()
        shard, row = idx.lookup(q)
        absent = np.flatnonzero(shard < 0)
        if len(absent):
            missing = list(dict.fromkeys(keys[i] for i in absent.tolist()))
            raise MissingEmbeddingsError(missing, len(q), self.fingerprint)
        dim = idx.shards[0].dim if idx.shards else self.dim
        out = np.empty((len(q), dim or 0), dtype=np.float32)
        if not len(q):
            return out
        order = np.lexsort((row, shard))
        s_sorted = shard[order]
        cuts = np.flatnonzero(np.diff(s_sorted)) + 1
        for part in np.split(order, cuts):
            rec = idx.shards[int(shard[part[0]])]
            if rec.dim != dim:
                raise CorruptStoreError(
                    f"shard {self.shards_dir / rec.npy_name} has dim {rec.dim} but space {self.fingerprint}"
                    f" has dim {dim}",
                    _repair_fix(self.shards_dir / rec.sidecar_name),
                )
            out[part] = self._open_shard(rec)[row[part]]
        return out

    def open_rows(self, rec: ShardRecord) -> np.ndarray:
        """The rows of one committed shard in its stored dtype (read-only memory map, verified on first use)."""
        return self._open_shard(rec)

    def _open_shard(self, rec: ShardRecord) -> np.ndarray:
        """Memory map of a shard, refused with CorruptStoreError unless it matches its sidecar."""
        with self._lock:
            mm = self._maps.get(rec.name)
            if mm is not None:
                self._maps.move_to_end(rec.name)
                return mm
        path = self.shards_dir / rec.npy_name
        sidecar = self.shards_dir / rec.sidecar_name
        problem = self._check_once(rec)
        if problem is not None:
            if not sidecar.exists():  # removed (sidecar first), possibly while it was being checked
                raise self._removed(path)
            if self._cache_disagrees(rec):  # the index, not the shard, was wrong: get() re-reads and retries
                raise self._removed(path)
            raise CorruptStoreError(f"embedding shard {path} is corrupt: {problem[1]}", _repair_fix(sidecar))
        try:
            mm = _map_rows(path, rec)
        except FileNotFoundError:
            raise self._removed(path) from None
        with self._lock:
            self._maps[rec.name] = mm
            mapped = sum(m.nbytes for m in self._maps.values())
            while len(self._maps) > OPEN_SHARDS or (mapped > OPEN_BYTES and len(self._maps) > 1):
                mapped -= self._maps.popitem(last=False)[1].nbytes
        return mm

    def _check_once(self, rec: ShardRecord) -> tuple[str, str] | None:
        """(problem, detail) when a shard does not match ``rec``; a checksum that passed is not recomputed in this
        process while the file (inode, size, mtime) stays the same."""
        path = self.shards_dir / rec.npy_name
        try:
            st = path.stat()
            ident = (str(path), st.st_ino, st.st_size, st.st_mtime_ns, rec.checksum)
        except FileNotFoundError:
            ident = None
        with _VERIFIED_LOCK:
            if ident in _VERIFIED:
                return None
        problem = _shards.check_shard(self.shards_dir, rec, deep=self.checksum_on_read)
        if problem is None and self.checksum_on_read and ident is not None:
            with _VERIFIED_LOCK:
                _VERIFIED.add(ident)
        return problem

    def verify_holding(self, keys: Sequence[str], repair: bool = False) -> list[dict[str, Any]]:
        """Check the shards holding any of ``keys`` (what a caller is about to count as stored) and list problems.

        The check is the one a read does (size, header, and sha256 unless ``checksum_on_read`` is off), done once
        per process per shard. ``repair``: remove the corrupt shards (sidecar first, as ``repair()`` does) so
        their keys become ``missing`` and are recomputed; each problem then lists what it ``removed``.
        """
        problems: list[dict[str, Any]] = []
        for _ in range(2):  # a second pass only after a cache that disagreed with the sidecars was dropped
            idx = self._load()
            shard, _ = idx.lookup(encode_query(keys))
            problems, retry = [], False
            for i in np.unique(shard[shard >= 0]).tolist():
                rec = idx.shards[i]
                found = self._check_once(rec)
                if found is None or not (self.shards_dir / rec.sidecar_name).exists():
                    continue
                if self._cache_disagrees(rec):
                    retry = True
                    break
                problems.append({"kind": "corrupt", "problem": found[0], "shard": rec.name,
                                 "path": str(self.shards_dir / rec.npy_name), "detail": found[1], "rows": rec.rows})
            if not retry:
                break
        if repair and problems:
            for p in problems:
                p["removed"] = self._remove_shard_files(p["shard"])
            self.refresh()
        return problems

    def _remove_shard_files(self, name: str) -> list[str]:
        """Delete a committed shard, sidecar first so it stops counting before its data goes."""
        gone = []
        for path in (self.shards_dir / (name + ".json"), self.shards_dir / (name + ".npy")):
            try:
                path.unlink()
                gone.append(str(path))
            except FileNotFoundError:
                pass
            except OSError as e:
                raise EncoderlabError(
                    f"embedding shard {self.shards_dir / name}.npy is corrupt and cannot be removed"
                    f" ({e.strerror or e})",
                    "run `encoderlab store verify --repair` where the store is writable",
                ) from None
        return gone

    def _removed(self, path: Path) -> ShardRemovedError:
        return ShardRemovedError(
            f"shard {path} was removed since embedding space {self.fingerprint} was read",
            "call refresh() on the space and retry",
        )

    # ----------------------------------------------------------------------------------------- writes

    def writer(
        self, shard_size: int = 4096, dtype: str = "float32", commit_seconds: float | None = None
    ) -> ShardWriter:
        """A context manager that buffers rows and commits a shard every ``shard_size`` rows or ``commit_seconds``
        (None: ``$ENCODERLAB_COMMIT_SECONDS``, else ``writer.COMMIT_SECONDS``), whichever comes first."""
        return ShardWriter(self, shard_size=shard_size, dtype=dtype, commit_seconds=commit_seconds)

    def put(self, keys: Sequence[str], array: Any, dtype: str = "float32") -> int:
        """Store ``array`` rows under ``keys`` (keys already stored are skipped); returns rows written."""
        # check_writable=False: putting keys the space holds already works on a read-only store
        with ShardWriter(self, dtype=dtype, check_writable=False) as w:
            w.add(keys, array)
        return w.rows_written

    def check_writable(self) -> None:
        """Fail with "store X is read-only" unless new shards can be created here (a cheap permission check)."""
        _shards.check_writable(self.shards_dir, self.path.parent)

    # ------------------------------------------------------------------------------------- integrity

    def verify(self, deep: bool = True) -> list[dict[str, Any]]:
        """Check every committed shard against its sidecar (``deep``: full checksum) and list problems.

        Each problem is a dict with ``kind`` ("corrupt": refused on read, "orphan": an uncommitted file that is
        ignored, or "cache": a damaged index cache, ignored by readers), ``problem`` (a stable short reason),
        ``shard``, ``path`` and ``detail``. The index cache is checked too (``deep``: against every sidecar).
        """
        problems: list[dict[str, Any]] = []
        committed, _, _ = _shards.list_shard_files(self.shards_dir)
        sidecars: dict[str, tuple[ShardRecord, np.ndarray]] = {}
        for name in committed:
            sidecar = self.shards_dir / (name + ".json")
            try:
                rec, keys = _shards.read_sidecar(sidecar)
                sidecars[name] = (rec, keys)
            except FileNotFoundError:
                continue
            except (ValueError, OSError) as e:
                problems.append(
                    {
                        "kind": "corrupt",
                        "problem": "invalid-sidecar",
                        "shard": name,
                        "path": str(sidecar),
                        "detail": str(e),
                    }
                )
                continue
            found = _shards.check_shard(self.shards_dir, rec, deep=deep)
            if found is not None:
                problems.append(
                    {
                        "kind": "corrupt",
                        "problem": found[0],
                        "shard": name,
                        "path": str(self.shards_dir / rec.npy_name),
                        "detail": found[1],
                        "rows": rec.rows,
                    }
                )
        for o in _shards.find_orphans(self.shards_dir):
            problems.append({k: v for k, v in o.items() if k != "removable"})
        problems += self._verify_cache(set(committed), sidecars, deep)
        return problems

    def _verify_cache(
        self, committed: set[str], sidecars: dict[str, tuple[ShardRecord, np.ndarray]], deep: bool
    ) -> list[dict[str, Any]]:
        """Problems of the on-disk index cache: what readers check (digests, structure, sample lookups), that it
        lists the shards as their sidecars do and, with ``deep``, that it maps the sidecars' keys to the same rows.

        A cache covering a shard that is gone is not a problem (compaction and repair leave one; readers drop it).
        """
        path = str(self.index_dir / "index.json")

        def problem(code: str, detail: str) -> list[dict[str, Any]]:
            return [{"kind": "cache", "problem": code, "shard": None, "path": path,
                     "detail": detail + "; readers ignore it, --repair deletes it and it is rebuilt from the sidecars"}]

        try:
            found = read_cache(self.index_dir, committed)
        except CacheProblem as e:
            if e.stale:
                return []
            return problem("bad-index-cache", str(e))
        if found is None:
            return []
        seg, _ = found
        for rec in seg.shards:
            side = sidecars.get(rec.name)
            if side is not None and side[0] != rec:
                return problem("index-cache-mismatch", f"{path} describes shard {rec.name} unlike its sidecar")
        if deep and all(rec.name in sidecars for rec in seg.shards):
            arrays = [sidecars[rec.name][1] for rec in seg.shards]
            if not np.array_equal(widen(arrays), seg.keys):
                return problem("index-cache-mismatch", f"{path} lists other keys than the sidecars of its shards")
            rebuilt = Segment.build(seg.shards, arrays, [])
            a = np.lexsort((rebuilt.positions, rebuilt.hashes))
            b = np.lexsort((seg.positions, seg.hashes))
            same = np.array_equal(rebuilt.hashes[a], seg.hashes[b]) and np.array_equal(
                rebuilt.positions[a], seg.positions[b]
            )
            if not same:
                return problem("index-cache-mismatch", f"{path} maps keys to other rows than its shards hold")
        return []

    def repair(self) -> list[dict[str, Any]]:
        """Delete corrupt shards (and their sidecars), orphans of dead writers and a damaged index cache; returns
        what was removed.

        The items of a removed shard become ``missing`` and are recomputed by the next extraction.
        """
        removed = []
        with self._lock:
            problems = self.verify(deep=True)
            for p in problems:
                if p["kind"] != "corrupt":
                    continue
                paths = [self.shards_dir / (p["shard"] + ".json"), self.shards_dir / (p["shard"] + ".npy")]
                gone = []
                for path in paths:  # sidecar first: the shard stops counting before its data goes
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        gone.append(str(path))
                removed.append({**p, "removed": gone})
            for path in _shards.remove_orphans(self.shards_dir):
                removed.append({"kind": "orphan", "path": path, "removed": [path]})
            for p in problems:
                if p["kind"] == "cache":
                    removed.append({**p, "removed": drop_cache(self.index_dir)})
            self._index = None
            self._maps.clear()
        return removed

    def compact(self, min_rows: int = _compact.COMPACT_MIN_ROWS) -> dict[str, Any]:
        """Merge shards of fewer than ``min_rows`` rows into shards of about ``min_rows``; keys and values stay.

        Safe against a crash at any point and against concurrent readers and writers (see ``store.compact``).
        Returns ``merged`` (old shards rewritten), ``into`` (new shards), ``removed_dead`` (shards whose every key
        was read from an earlier shard), ``rows``, ``shards_before``, ``shards_after`` and ``busy`` (another
        process was compacting, nothing done). A corrupt shard stops it with ``CorruptStoreError``: repair first.
        """
        with self._lock:
            try:
                return _compact.compact(self, min_rows)
            except OSError as e:
                raise EncoderlabError(
                    f"cannot compact embedding space {self.path}: {e}",
                    "compaction rewrites shards: run it where the store is writable and has free space",
                ) from None

    def clean_orphans(self) -> list[str]:
        """Delete files left by writers that were killed mid-write (writers call this when they start)."""
        return _shards.remove_orphans(self.shards_dir)

    def summary(self) -> dict[str, Any]:
        """Fingerprint, meta, items, shards, dim and bytes of this space (what ``EmbeddingStore.spaces`` lists)."""
        out: dict[str, Any] = {"fingerprint": self.fingerprint, "path": str(self.path)}
        try:
            out["meta"] = self.meta
        except CorruptStoreError as e:
            out["meta"], out["problem"] = None, str(e)
        committed, _, _ = _shards.list_shard_files(self.shards_dir)
        try:
            with self._lock:
                self.refresh()
                idx = self._load()
            out.update(items=len(idx), shards=len(idx.shards), dim=self.dim, bytes=sum(s.nbytes for s in idx.shards))
        except CorruptStoreError as e:
            out.update(items=None, shards=len(committed), dim=None, bytes=0, problem=str(e))
        return out


def _map_rows(path: Path, rec: ShardRecord) -> np.ndarray:
    """Read-only memory map of a verified shard's rows (the header was checked, so skip re-parsing it)."""
    dtype = np.dtype(rec.dtype)
    header = rec.nbytes - rec.rows * rec.dim * dtype.itemsize
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=rec.rows * rec.dim, offset=header).reshape(rec.rows, rec.dim)
