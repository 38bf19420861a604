"""Thumbnails for the report: each image decoded once, shrunk, and inlined as a ``data:`` URI.

Decoding goes through ``encoderlab.data.images.load_image``, so the report meets an unreadable file exactly as the
rest of encoderlab does: a stable reason (``missing``, ``truncated``, ``corrupt``, ``too-large``, ...), the pixel
limit checked before decoding. Such an image becomes a labelled placeholder box and is recorded in ``failures``
for the report's list of unreadable images; the page never holds a broken ``<img>``.
"""

from __future__ import annotations

import base64
import html
import io
import os
from dataclasses import dataclass

from PIL import Image

from ..data.images import load_image
from ..errors import BadImageError

THUMB_PX = 96


@dataclass(frozen=True)
class Thumbnail:
    uri: str
    width: int
    height: int


def encode_thumbnail(im: Image.Image, size: int = THUMB_PX) -> Thumbnail:
    """Shrink an RGB image to fit ``size`` x ``size`` and encode it as the smaller of PNG and JPEG.

    Flat-colour art (emoji, clip art) is smaller and crisp as PNG; photographs are smaller as JPEG.
    """
    im = im.copy()
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    png, jpeg = io.BytesIO(), io.BytesIO()
    im.save(png, format="PNG", optimize=True)
    im.save(jpeg, format="JPEG", quality=88)
    mime, data = ("image/png", png.getvalue()) if png.tell() <= jpeg.tell() else ("image/jpeg", jpeg.getvalue())
    return Thumbnail(f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}", im.width, im.height)


class Thumbnails:
    """Renders ``<img>`` tags (or placeholders) for image paths, decoding each path once per report."""

    def __init__(self, size: int = THUMB_PX, max_pixels: int | None = None) -> None:
        self.size = size
        self.max_pixels = max_pixels
        self._done: dict[str, Thumbnail | None] = {}
        self.failures: dict[str, str] = {}  # path -> reason (and detail), in the order first met

    def get(self, path: str | os.PathLike) -> Thumbnail | None:
        """The thumbnail of ``path``, or None (recorded in ``failures``) when it cannot be decoded."""
        key = os.fspath(path)
        if key not in self._done:
            try:
                self._done[key] = encode_thumbnail(load_image(key, max_pixels=self.max_pixels), self.size)
            except BadImageError as e:
                self._done[key] = None
                self.failures[key] = e.reason + (f" ({e.detail})" if e.detail else "")
            except (OSError, ValueError) as e:  # encoding the thumbnail itself failed; still one image's problem
                self._done[key] = None
                self.failures[key] = f"thumbnail failed ({type(e).__name__}: {e})"
        return self._done[key]

    def tag(self, path: str | os.PathLike, alt: str) -> str:
        """An ``<img>`` with the inlined thumbnail, or a placeholder box naming the file and why it is missing."""
        thumb = self.get(path)
        if thumb is None:
            key = os.fspath(path)
            name = html.escape(os.path.basename(key) or key)
            return (f'<div class="ph" style="width:{self.size}px;height:{self.size}px" '
                    f'title="{html.escape(key)}: {html.escape(self.failures[key])}">'
                    f'<b>unreadable image</b><span>{name}</span></div>')
        return (f'<img class="thumb" src="{thumb.uri}" width="{thumb.width}" height="{thumb.height}" '
                f'alt="{html.escape(alt)}">')
