"""The in-memory key index of a space: which shard and row holds each key, with no Python object per key.

Keys live in numpy bytes arrays in commit order; lookups go through a sorted array of 64-bit key hashes and
``np.searchsorted``, then confirm the full key, so opening a space with a million keys costs a few numpy
passes rather than a million-entry dict. The index is a short list of *segments* (runs of shards in read
order); appending a shard adds a segment and merges equal-sized neighbours, like a binary counter, so a writer
committing shard after shard pays O(N log N) in total. A segment never repeats a key held by an earlier one:
for a key written twice, the first shard in read order wins.

A consolidated index (one segment) is cached under ``index/`` so a large space opens without reading every
sidecar; the cache lists the shards it covers, records sha256 digests of its files and of itself, and is
dropped (then rebuilt from the sidecars) when damaged or when any shard it covers is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..errors import EncoderlabError
from .shards import ShardRecord, is_shard_name, shard_seq

CACHE_FORMAT = 2  # 2: index.json records digests of itself and its data files
HASH_VERSION = "u64-mulxor-sum-splitmix-1"  # bump when key_hash changes: cached hashes would no longer match
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_STALE_CACHE_S = 60.0


def key_list(keys: Sequence[str]) -> list[str]:
    """Request keys as a list (any iterable of strings; a lone string is a mistake, not a list of characters)."""
    if isinstance(keys, (str, bytes)):
        raise EncoderlabError(f"keys must be a sequence of strings, got a single {type(keys).__name__} {keys!r:.60}")
    return keys if isinstance(keys, list) else list(keys)


def encode_query(keys: Sequence[str]) -> np.ndarray:
    """Request keys as a UTF-8 bytes array; a non-string key is a user error, not a TypeError deep in numpy.

    A key containing NUL (which no stored key can) becomes a newline, which matches nothing: bytes arrays
    drop trailing NULs, so "a\\x00" would otherwise find "a".
    """
    keys = key_list(keys)
    if not keys:
        return np.zeros(0, dtype="S1")
    if set(map(type, keys)) == {str} and "\x00" not in "".join(keys):
        with contextlib.suppress(UnicodeEncodeError):
            return np.array(keys, dtype=str).astype(bytes)  # all ASCII: no per-key Python work
    bad = next((k for k in keys if not isinstance(k, str)), None)
    if bad is not None:
        raise EncoderlabError(f"embedding keys must be strings, got {type(bad).__name__} {bad!r:.60}")
    return np.array([b"\n" if "\x00" in k else k.encode("utf-8") for k in keys], dtype=bytes)


def _mix(z: np.ndarray) -> np.ndarray:
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def key_hash(keys: np.ndarray) -> np.ndarray:
    """64-bit hash of each bytes key, independent of the array's padding width (zero words add nothing).

    Each 8-byte word goes through a bijection (odd multiply, xor-shift) specific to its position, the words
    are summed and the sum is finalised with splitmix64: cheap enough for a million keys in ~0.1 s.
    """
    n, width = len(keys), keys.dtype.itemsize
    if n == 0:
        return np.zeros(0, dtype=np.uint64)
    words_per_key = -(-width // 8)
    padded = np.zeros((n, words_per_key * 8), dtype=np.uint8)
    padded[:, :width] = np.ascontiguousarray(keys).view(np.uint8).reshape(n, width)
    words = padded.view("<u8")
    out = np.zeros(n, dtype=np.uint64)
    w = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(words_per_key):
            np.multiply(words[:, j], np.uint64((int(_GOLDEN) * (2 * j + 1)) % (1 << 64) | 1), out=w)
            w ^= w >> np.uint64(29)
            out += w
        return _mix(out)


def widen(arrays: list[np.ndarray]) -> np.ndarray:
    if not arrays:
        return np.zeros(0, dtype="S1")
    width = max(a.dtype.itemsize for a in arrays)
    return np.concatenate([a.astype(f"S{width}", copy=False) for a in arrays])


class Segment:
    """Shards in read order with their keys; ``hashes``/``positions`` list each key once, sorted by hash."""

    def __init__(
        self,
        shards: list[ShardRecord],
        keys: np.ndarray,
        hashes: np.ndarray,
        positions: np.ndarray,
    ) -> None:
        self.shards = shards
        self.starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.rows for s in shards], out=self.starts[1:])
        self.keys = keys  # every row's key, duplicates included, in (shard, row) order
        self.hashes = hashes
        self.positions = positions

    @property
    def rows(self) -> int:
        return int(self.starts[-1])

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def build(cls, shards: list[ShardRecord], key_arrays: list[np.ndarray], earlier: list[Segment]) -> Segment:
        """Index the keys of ``shards``, keeping each key's first row and dropping keys ``earlier`` holds."""
        keys = widen(key_arrays)
        h = key_hash(keys)
        order = np.argsort(h, kind="stable")
        hs = h[order]
        keep = np.ones(len(order), dtype=bool)
        same = hs[1:] == hs[:-1]
        if same.any():
            # Runs of equal hashes are duplicates (or, astronomically rarely, collisions): sort each run by
            # (key, position) and keep the first position of every distinct key.
            in_run = np.zeros(len(order), dtype=bool)
            in_run[1:] |= same
            in_run[:-1] |= same
            j = np.flatnonzero(in_run)
            sub = order[j]
            lex = np.lexsort((sub, keys[sub], hs[j]))
            sk, sh = keys[sub[lex]], hs[j][lex]
            dup = np.zeros(len(j), dtype=bool)
            dup[1:] = (sh[1:] == sh[:-1]) & (sk[1:] == sk[:-1])
            keep[j[lex][dup]] = False
        if earlier and keep.any():
            idx = np.flatnonzero(keep)
            cand = keys[order[idx]]
            seen = np.zeros(len(idx), dtype=bool)
            for seg in earlier:
                seen |= seg.lookup(cand, hs[idx]) >= 0
            keep[idx[seen]] = False
        return cls(shards, keys, hs[keep], order[keep].astype(np.int64))

    def lookup(self, query: np.ndarray, qhash: np.ndarray) -> np.ndarray:
        """Position of each query key in ``keys`` (-1 where absent)."""
        out = np.full(len(query), -1, dtype=np.int64)
        if len(self.hashes) == 0 or len(query) == 0:
            return out
        lo = np.empty(len(query), dtype=np.int64)
        by_hash = np.argsort(qhash)  # sorted probes let searchsorted narrow each search: ~4x faster
        lo[by_hash] = np.searchsorted(self.hashes, qhash[by_hash], side="left")
        offset = 0
        pending = np.arange(len(query))
        n = len(self.hashes)
        while len(pending):
            at = lo[pending] + offset
            inside = at < n
            pending, at = pending[inside], at[inside]
            same_hash = self.hashes[at] == qhash[pending]
            pending, at = pending[same_hash], at[same_hash]
            cand = self.positions[at]
            hit = self.keys[cand] == query[pending]
            out[pending[hit]] = cand[hit]
            pending = pending[~hit]  # a hash collision with another key: try the next entry of the run
            offset += 1
        return out

    def shard_keys(self, i: int) -> np.ndarray:
        return self.keys[self.starts[i] : self.starts[i + 1]]

    @classmethod
    def merge(cls, a: Segment, b: Segment) -> Segment:
        """One segment holding ``a`` then ``b`` (``b`` already excludes ``a``'s keys)."""
        keys = widen([a.keys, b.keys])
        h = np.concatenate([a.hashes, b.hashes])
        pos = np.concatenate([a.positions, b.positions + a.rows])
        order = np.argsort(h, kind="stable")  # two sorted runs: a single merge pass
        return cls(a.shards + b.shards, keys, h[order], pos[order])


class KeyIndex:
    """All committed shards of a space in read order (sequence number, then name)."""

    def __init__(self, segments: list[Segment] | None = None) -> None:
        self.segments: list[Segment] = segments or []
        self._refresh_tables()

    def _refresh_tables(self) -> None:
        self.shards: list[ShardRecord] = [s for seg in self.segments for s in seg.shards]
        self.names = {s.name for s in self.shards}
        self._shard_offsets = np.cumsum([0] + [len(seg.shards) for seg in self.segments])

    def __len__(self) -> int:
        return sum(len(seg) for seg in self.segments)

    @property
    def rows(self) -> int:
        return sum(seg.rows for seg in self.segments)

    def added(self, shards: list[ShardRecord], key_arrays: list[np.ndarray]) -> KeyIndex:
        """A new index that also holds ``shards`` (indexes are never mutated, so readers need no lock).

        A shard that sorts before the last one known (two writers racing) rebuilds the index in memory, so the
        read order, and with it which copy of a duplicated key wins, is the same in every process.
        """
        if not shards:
            return self
        pairs = sorted(zip(shards, key_arrays), key=lambda p: (shard_seq(p[0].name), p[0].name))
        segments = list(self.segments)
        last = self.shards[-1] if self.shards else None
        first = pairs[0][0]
        if last is not None and (shard_seq(first.name), first.name) < (shard_seq(last.name), last.name):
            old = [(s, seg.shard_keys(i)) for seg in segments for i, s in enumerate(seg.shards)]
            pairs = sorted(old + pairs, key=lambda p: (shard_seq(p[0].name), p[0].name))
            segments = []
        segments.append(Segment.build([p[0] for p in pairs], [p[1] for p in pairs], segments))
        while len(segments) > 1 and segments[-2].rows <= segments[-1].rows:
            b = segments.pop()
            a = segments.pop()
            segments.append(Segment.merge(a, b))
        return KeyIndex(segments)

    def consolidated(self) -> KeyIndex:
        """The same index as a single segment (what the on-disk cache stores)."""
        segments = list(self.segments)
        while len(segments) > 1:
            b = segments.pop()
            a = segments.pop()
            segments.append(Segment.merge(a, b))
        return KeyIndex(segments)

    def lookup(self, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(global shard number, row) of each query key; shard -1 where absent."""
        shard = np.full(len(query), -1, dtype=np.int64)
        row = np.full(len(query), -1, dtype=np.int64)
        if not len(query) or not self.segments:
            return shard, row
        qhash = key_hash(query)
        pending = np.arange(len(query))
        for si, seg in enumerate(self.segments):
            if not len(pending):
                break
            pos = seg.lookup(query[pending], qhash[pending])
            hit = pos >= 0
            p, pos = pending[hit], pos[hit]
            local = np.searchsorted(seg.starts, pos, side="right") - 1
            shard[p] = local + self._shard_offsets[si]
            row[p] = pos - seg.starts[local]
            pending = pending[~hit]
        return shard, row

    def keys_in_order(self) -> list[str]:
        """Every key once, in read order (shard, then row)."""
        out: list[str] = []
        for seg in self.segments:
            out.extend(k.decode("utf-8") for k in seg.keys[np.sort(seg.positions)].tolist())
        return out


# ------------------------------------------------------------------------------------- on-disk cache


def _digest(data: bytes | memoryview) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _doc_digest(doc: dict[str, Any]) -> str:
    """Digest of ``index.json`` without its own ``digest`` field: an edited count or shard list is detected."""
    body = {k: v for k, v in doc.items() if k != "digest"}
    return _digest(json.dumps(body, sort_keys=True).encode("utf-8"))


def save_cache(directory: Path, segment: Segment) -> None:
    """Write ``segment`` as the consolidated index: data files first, then ``index.json`` commits them.

    ``index.json`` records the sha256 of each data file and of itself: a damaged cache is not merely "missing
    keys", it makes writers store those keys again (a space then counts them twice), so it must be detected.
    """
    token = secrets.token_hex(4)
    files, digests = {}, {}
    for part, arr in (("keys", segment.keys), ("hashes", segment.hashes), ("positions", segment.positions)):
        fname = f"index-{token}.{part}.npy"
        buf = io.BytesIO()
        np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
        with atomic_open(directory / fname, "wb") as f:
            f.write(buf.getbuffer())
        files[part] = fname
        digests[part] = _digest(buf.getbuffer())
    doc: dict[str, Any] = {
        "format": CACHE_FORMAT,
        "hash": HASH_VERSION,
        "token": token,
        "files": files,
        "digests": digests,
        "rows": segment.rows,
        "items": len(segment),
        "shards": [s.to_json() for s in segment.shards],
    }
    doc["digest"] = _doc_digest(doc)
    with atomic_open(directory / "index.json", "wb") as f:
        f.write(json.dumps(doc).encode("utf-8"))
    _remove_stale_cache_files(directory, keep=token)


def _remove_stale_cache_files(directory: Path, keep: str) -> None:
    # Another process may have just written (and be about to commit) a newer cache: only files older
    # than a minute that index.json does not reference are deleted.
    now = time.time()
    with contextlib.suppress(OSError):
        for e in os.scandir(directory):
            if e.name == "index.json" or keep in e.name:
                continue
            ours = e.name.startswith("index-") or e.name.startswith(".index")
            if ours and now - e.stat().st_mtime > _STALE_CACHE_S:
                with contextlib.suppress(OSError):
                    os.unlink(e.path)


def _token_of(raw: bytes | None) -> str | None:
    try:
        token = json.loads(raw).get("token") if raw is not None else None
    except (ValueError, AttributeError):
        return None
    return token if isinstance(token, str) else None


def cache_token(directory: Path) -> str | None:
    """The token of the cache ``index.json`` commits now (None when absent or unreadable)."""
    try:
        return _token_of((directory / "index.json").read_bytes())
    except OSError:
        return None


def drop_cache(directory: Path, token: str | None = None, raw: bytes | None = None) -> list[str]:
    """Delete the cache, only if ``index.json`` still has ``token`` / still reads ``raw`` (both None: whatever
    is there, with every cache data file); returns the deleted paths.

    The conditions keep a newer cache that another process committed meanwhile. Best effort: on a read-only
    store nothing is deleted and readers keep ignoring the bad cache.
    """
    removed: list[str] = []
    index = directory / "index.json"
    try:
        current = index.read_bytes()
    except OSError:
        current = None
    if (raw is not None and current != raw) or (token is not None and _token_of(current) != token):
        return removed
    with contextlib.suppress(OSError):
        index.unlink()  # index.json first: the cache stops counting before its data goes
        removed.append(str(index))
    everything = token is None and raw is None
    ours = token or _token_of(current)
    if not everything and ours is None:
        return removed  # unreadable index.json: its data files are left to the next save's cleanup
    with contextlib.suppress(OSError):
        for e in os.scandir(directory):
            if e.name.startswith("index-") and (everything or f"index-{ours}." in e.name):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
                    removed.append(e.path)
    return removed


class CacheProblem(ValueError):
    """Why a cached index cannot be used (the message is the detail ``verify`` reports).

    ``stale``: it covers a shard that is gone (compaction or repair leave that; not damage). ``raw``: the
    ``index.json`` bytes judged, so only that cache is dropped.
    """

    def __init__(self, message: str, stale: bool = False) -> None:
        super().__init__(message)
        self.stale = stale
        self.raw: bytes | None = None


def read_cache(directory: Path, committed: set[str]) -> tuple[Segment, str] | None:
    """(segment, token) of the cached consolidated index, None when there is none; ``CacheProblem`` when damaged.

    Checked on every open, for the price of hashing the cache files once (~25 ms per million keys): both
    digests, the structure, every listed shard still committed, and a sample of lookups. What only the
    sidecars can tell (that the cache lists the same shards, keys and positions) is ``verify``'s deep check.
    """
    path = directory / "index.json"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise CacheProblem(f"{path} cannot be read ({e.strerror or e})") from None
    try:
        return _read_cache(directory, committed, raw)
    except CacheProblem as e:
        e.raw = raw
        raise


def _read_cache(directory: Path, committed: set[str], raw: bytes) -> tuple[Segment, str]:
    path = directory / "index.json"
    try:
        obj = json.loads(raw)
        if not isinstance(obj, dict):
            raise CacheProblem(f"{path} is not a JSON object")
        if obj.get("format") != CACHE_FORMAT or obj.get("hash") != HASH_VERSION:
            raise CacheProblem(f"{path} has format {obj.get('format')!r}, not {CACHE_FORMAT} (another version's)")
        if obj.get("digest") != _doc_digest(obj):
            raise CacheProblem(f"{path} was modified after it was written (its digest does not match)")
        shards = [ShardRecord.from_json(s, s["name"]) for s in obj["shards"]]
        if not shards or any(not is_shard_name(s.name) for s in shards):
            raise CacheProblem(f"{path} lists no shards or an invalid shard name")
        gone = [s.name for s in shards if s.name not in committed]
        if gone:
            raise CacheProblem(f"{path} covers {len(gone)} shard(s) that are gone, e.g. {gone[0]}", stale=True)
        arrays = {}
        for part in ("keys", "hashes", "positions"):
            fname = obj["files"][part]
            if Path(fname).name != fname:
                raise CacheProblem(f"{path} names {fname!r} outside its directory")
            data = (directory / fname).read_bytes()
            if _digest(data) != obj["digests"][part]:
                raise CacheProblem(f"{directory / fname} is damaged (its sha256 differs from index.json's)")
            arrays[part] = np.load(io.BytesIO(data), allow_pickle=False)
    except CacheProblem:
        raise
    except FileNotFoundError as e:
        raise CacheProblem(f"{e.filename} is missing") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CacheProblem(f"{path} is malformed ({type(e).__name__}: {e})") from None
    seg = Segment(shards, arrays["keys"], arrays["hashes"], arrays["positions"])
    if (
        seg.rows != obj["rows"]
        or len(seg.keys) != seg.rows
        or arrays["keys"].dtype.kind != "S"
        or len(seg.hashes) != obj["items"]
        or len(seg.positions) != obj["items"]
        or arrays["hashes"].dtype != np.uint64
        or arrays["positions"].dtype != np.int64
    ):
        raise CacheProblem(f"{path}: array shapes or dtypes disagree with its counts")
    pos, h = seg.positions, seg.hashes
    if len(pos) and (pos.min() < 0 or pos.max() >= seg.rows or (h[1:] < h[:-1]).any()):
        raise CacheProblem(f"{path}: positions out of range or hashes unsorted")
    _self_test(seg, path)
    return seg, obj["token"]


def _self_test(seg: Segment, path: Path, n: int = 64) -> None:
    """A cache that cannot find its own keys would make writers store them again: look up a sample."""
    if not seg.rows:
        return
    rng = np.random.default_rng(seg.rows)
    i = rng.integers(0, len(seg.positions), min(n, len(seg.positions)))
    if (key_hash(seg.keys[seg.positions[i]]) != seg.hashes[i]).any():
        raise CacheProblem(f"{path}: cached hashes do not match their keys")
    rows = rng.integers(0, seg.rows, min(n, seg.rows))
    q = np.ascontiguousarray(seg.keys[rows])
    if (seg.lookup(q, key_hash(q)) < 0).any():
        raise CacheProblem(f"{path}: cached keys cannot be found through the cache")


def load_cache(directory: Path, committed: set[str]) -> Segment | None:
    """The cached consolidated index, or None if absent, damaged, or covering a shard that is gone."""
    try:
        found = read_cache(directory, committed)
    except CacheProblem:
        return None
    return found[0] if found else None
