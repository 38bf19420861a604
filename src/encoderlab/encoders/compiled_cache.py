"""The compiled-network cache, ``$ENCODERLAB_HOME/compiled/``: exported ONNX graphs kept under a size budget.

Every set of weights gets its own export (a fine-tuned checkpoint, each trial of a sweep, every random test model),
and a ViT-B/32 CLIP's two towers take ~600 MB, so the folder would grow without end. After each export the least
recently used graphs are deleted until the folder fits ``$ENCODERLAB_COMPILED_MAX`` (default 10G; ``0`` = no limit).
A graph is "used" when a session loads it (its mtime is touched then). Graphs this process has loaded are never
deleted by it, and a graph deleted under another process costs that process a re-export, never a wrong result:
loading is checked (``hf_onnx`` compares with PyTorch on probes) and writes are atomic.

Only exported graphs (``*.onnx``) are managed; other entries (the unzipped packaged text model, temporary files of
writers still running) are left alone. ``encoderlab cache list`` shows the folder, ``encoderlab cache prune`` trims it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_open
from ..errors import EncoderlabError
from ..paths import compiled_dir

MAX_ENV = "ENCODERLAB_COMPILED_MAX"
DEFAULT_MAX_BYTES = 10 << 30

#: graphs this process has loaded or written: never pruned by it
_IN_USE: set[Path] = set()


@dataclass(frozen=True)
class CachedGraph:
    path: Path
    bytes: int
    last_used: float  # mtime: written or last loaded

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.path.name, "path": str(self.path), "bytes": self.bytes,
                "last_used": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.last_used))}


def max_bytes(value: str | None = None) -> int | None:
    """The budget: ``value`` or ``$ENCODERLAB_COMPILED_MAX`` (e.g. ``10G``, ``500M``), None for ``0`` (no limit)."""
    from ..retrieval.kinds import parse_memory

    source = "--max-size" if value is not None else MAX_ENV
    text = value if value is not None else os.environ.get(MAX_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    if re.fullmatch(r"\s*0+(\.0*)?\s*[kmgt]?(i?b)?\s*", text, re.IGNORECASE):  # 0, 0B, 0G: no limit
        return None
    try:
        return parse_memory(text)
    except EncoderlabError:
        raise EncoderlabError(f"cannot read {source}={text!r} as a size",
                              "write e.g. 10G or 500M; 0 keeps every graph") from None


def mark_used(path: Path) -> None:
    """Record that ``path`` was just loaded: it moves to the back of the pruning order, and this process keeps it."""
    _IN_USE.add(Path(path).resolve())
    try:
        os.utime(path)
    except OSError:  # a read-only or shared cache: the order just stays the write order
        pass


def graphs(root: Path | None = None) -> list[CachedGraph]:
    """The exported graphs in the cache, least recently used first."""
    root = compiled_dir() if root is None else root
    found = []
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.name.endswith(".onnx") or not entry.is_file(follow_symlinks=False):  # writers' temps: *.tmp
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:  # pruned by another process meanwhile
            continue
        found.append(CachedGraph(Path(entry.path), st.st_size, st.st_mtime))
    return sorted(found, key=lambda g: (g.last_used, g.path.name))


def prune(limit: int | None, root: Path | None = None, dry_run: bool = False) -> dict[str, Any]:
    """Delete the least recently used graphs until the cache holds at most ``limit`` bytes (None: nothing goes).

    Graphs loaded by this process are kept even when that leaves the cache over the limit."""
    present = graphs(root)
    total = sum(g.bytes for g in present)
    removed: list[CachedGraph] = []
    if limit is not None:
        for g in present:
            if total <= limit:
                break
            if g.path.resolve() in _IN_USE:
                continue
            if not dry_run:
                try:
                    g.path.unlink()
                except FileNotFoundError:  # another process pruned it first: it is gone either way
                    pass
                except OSError:  # not ours to delete (permissions): keep counting it
                    continue
            removed.append(g)
            total -= g.bytes
    return {"removed": [g.as_dict() for g in removed], "freed_bytes": sum(g.bytes for g in removed),
            "bytes": total, "graphs": len(present) - len(removed), "limit": limit, "dry_run": dry_run}


def write_graph(path: Path, data: bytes) -> None:
    """Write an exported graph atomically, keep it for this process, then bring the cache back under its budget.

    The budget is read first: a bad ``$ENCODERLAB_COMPILED_MAX`` is the user's error (callers that fall back to
    PyTorch when an export fails let ``EncoderlabError`` through)."""
    limit = max_bytes()
    with atomic_open(path, "wb") as f:
        f.write(data)
    mark_used(path)
    prune(limit, root=path.parent)
