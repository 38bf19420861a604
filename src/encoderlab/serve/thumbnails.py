"""Item thumbnails: the indexed image of an item id, decoded robustly, shrunk, and kept in a bounded LRU cache.

The file read is the one the index's item table names for that id; nothing from the request reaches a file
name. Decoding goes through ``encoderlab.data.images.load_image`` with the service's pixel limit, at most
``decoders`` at a time (one 64 Mpx image is about 200 MB decoded), and a file that cannot be decoded is
remembered as such, so a broken image costs one decode, not one per request.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass

from ..data.images import load_image
from ..errors import BadImageError

THUMB_PX = 192
CACHE_ITEMS = 4096
CACHE_BYTES = 64 << 20


@dataclass(frozen=True)
class Thumbnail:
    """Encoded image bytes and their media type, or the reason the image could not be used."""

    data: bytes = b""
    media_type: str = "image/png"
    reason: str | None = None

    @property
    def size(self) -> int:
        return len(self.data) + 64


def render_thumbnail(path: str, size: int = THUMB_PX, max_pixels: int | None = None) -> Thumbnail:
    """Decode ``path``, shrink it to fit ``size`` px, encode as the smaller of PNG and JPEG (flat art vs photos)."""
    try:
        im = load_image(path, max_pixels=max_pixels)
    except BadImageError as e:
        return Thumbnail(reason=e.reason)
    im.thumbnail((size, size))
    png, jpeg = io.BytesIO(), io.BytesIO()
    im.save(png, format="PNG", optimize=True)
    im.save(jpeg, format="JPEG", quality=85)
    if png.tell() <= jpeg.tell():
        return Thumbnail(png.getvalue(), "image/png")
    return Thumbnail(jpeg.getvalue(), "image/jpeg")


class ThumbnailCache:
    """Thumbnails by item id, least recently used evicted past ``max_items`` entries or ``max_bytes``."""

    def __init__(self, size: int = THUMB_PX, max_pixels: int | None = None, *, max_items: int = CACHE_ITEMS,
                 max_bytes: int = CACHE_BYTES, decoders: int = 2) -> None:
        self.size, self.max_pixels = size, max_pixels
        self.max_items, self.max_bytes = max_items, max_bytes
        self._entries: OrderedDict[str, Thumbnail] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._decoding = threading.BoundedSemaphore(decoders)
        self.hits = self.misses = 0

    def cached(self, key: str) -> Thumbnail | None:
        """The thumbnail of item ``key`` if it is in the cache (no lookup in the item table needed then)."""
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return found

    def render(self, key: str, path: str) -> Thumbnail:
        """Decode and shrink ``path`` (the item's image, from the item table), keep it under ``key``."""
        with self._lock:
            self.misses += 1
        with self._decoding:
            thumb = render_thumbnail(path, self.size, self.max_pixels)
        self._put(key, thumb)
        return thumb

    def _put(self, key: str, thumb: Thumbnail) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.size
            self._entries[key] = thumb
            self._bytes += thumb.size
            while self._entries and (len(self._entries) > self.max_items or self._bytes > self.max_bytes):
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= dropped.size

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"items": len(self._entries), "bytes": self._bytes, "hits": self.hits, "misses": self.misses}
