"""Content hashes used as cache keys: of bytes, of texts, of files, of JSON-able configs."""

from __future__ import annotations

import hashlib
import json
import os
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
