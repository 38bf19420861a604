"""Content hashes used as cache keys: of bytes, of texts, of files (memoized by path, size and mtime)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def bytes_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def text_key(text: str) -> str:
    """Key of a text: hash of its UTF-8 bytes (the exact string, no normalization)."""
    return "t" + bytes_digest(text.encode("utf-8"))


def file_digest(path: str | os.PathLike) -> str:
    """Hash of a file's bytes, read in chunks so huge files do not fill memory."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def image_key(path: str | os.PathLike) -> str:
    """Key of an image: hash of its file bytes, so a renamed file keeps its key and a changed file does not."""
    return "i" + file_digest(path)


def json_digest(obj: Any) -> str:
    """Stable hash of a JSON-able object (sorted keys)."""
    return bytes_digest(json.dumps(obj, sort_keys=True, default=str).encode("utf-8"))


class FileDigestCache:
    """Memoizes ``file_digest`` by (absolute path, size, mtime_ns) in a JSON file; safe to lose at any time."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        self._dirty = False
        if self.path and self.path.exists():
            try:
                self._entries = json.loads(self.path.read_text())
            except (OSError, ValueError):
                self._entries = {}  # a damaged memo only costs re-hashing

    def digest(self, file: str | os.PathLike) -> str:
        p = os.path.abspath(file)
        st = os.stat(p)
        with self._lock:
            hit = self._entries.get(p)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        d = file_digest(p)
        with self._lock:
            self._entries[p] = [st.st_size, st.st_mtime_ns, d]
            self._dirty = True
        return d

    def save(self) -> None:
        if self.path and self._dirty:
            from .atomic import atomic_write_json

            with self._lock:
                atomic_write_json(self.path, self._entries, indent=None)
                self._dirty = False
