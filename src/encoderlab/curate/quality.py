"""Cheap per-image and per-caption checks: size and aspect ratio from the header, near-constant images from the pixel
spread of a small thumbnail, and caption text normalized for duplicate checks.

Image checks are keyed by content (the store's image key) and cached beside the store (``<store>/.curate/``), so a
second filter run over the same images decodes nothing. The size comes from the file header (``probe_image``, a few
KB read); only the blank check decodes, into a ``THUMB_PX`` thumbnail (JPEG files decode at reduced size directly).
"""

from __future__ import annotations

import os
import re
import unicodedata
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from ..atomic import atomic_open
from ..data.images import load_image, probe_image
from ..errors import BadImageError
from ..progress import progress_bar
from ..store import EmbeddingStore
from .pairs import CACHE_DIR

#: longer side of the thumbnail whose pixel spread decides "blank"; small enough to decode thousands a second
THUMB_PX = 32
STATS_VERSION = 1
STATS_COLUMNS = ("image_key", "width", "height", "pixel_std")

_PUNCT = re.compile(r"[^\w\s]+", re.UNICODE)
_SPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """A caption reduced to what makes two captions "the same": NFKC, lower case, no punctuation, single spaces."""
    t = unicodedata.normalize("NFKC", text).casefold()
    return _SPACE.sub(" ", _PUNCT.sub(" ", t)).strip()


def word_count(text: str) -> int:
    return len(text.split())


def pixel_std(path: str | os.PathLike, max_pixels: int | None = None) -> float:
    """Largest per-channel standard deviation (0-255 scale) of the image shrunk to ``THUMB_PX``: ~0 for a blank or
    single-colour image, tens for anything with content. Raises ``BadImageError`` for a file that cannot be used."""
    im = load_image(path, max_pixels=max_pixels)
    im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.BOX)
    arr = np.asarray(im, dtype=np.float32).reshape(-1, 3)
    return float(arr.std(axis=0).max())


def _one_image(path: str, decode: bool, max_pixels: int | None) -> tuple[float, float, float]:
    try:
        head = probe_image(path, max_pixels=max_pixels)
        std = pixel_std(path, max_pixels) if decode else np.nan
        return float(head.width), float(head.height), std
    except BadImageError:
        return np.nan, np.nan, np.nan


def empty_stats() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object if c == "image_key" else np.float64) for c in STATS_COLUMNS})


class ImageStatsCache:
    """``width``, ``height`` and ``pixel_std`` (NaN: not computed) of images by content key, in one parquet."""

    def __init__(self, store: EmbeddingStore) -> None:
        self.path = Path(store.root) / CACHE_DIR / f"image-stats-v{STATS_VERSION}-thumb{THUMB_PX}.parquet"

    def read(self) -> pd.DataFrame:
        if self.path.is_file():
            try:
                return pd.read_parquet(self.path, columns=list(STATS_COLUMNS))
            except Exception as e:  # noqa: BLE001 - a damaged cache is dropped, never trusted
                warnings.warn(f"ignoring the unreadable image-stats cache {self.path} ({type(e).__name__}: {e})",
                              stacklevel=2)
        return empty_stats()

    def write(self, frame: pd.DataFrame) -> None:
        try:
            with atomic_open(self.path, "wb") as f:
                frame.to_parquet(f, index=False)
        except OSError as e:
            warnings.warn(f"image checks not cached: cannot write {self.path} ({e.strerror or e})", stacklevel=2)


def image_stats(keys: Sequence[str], paths: Sequence[str], *, decode: bool, store: EmbeddingStore | None = None,
                max_pixels: int | None = None, progress: bool = True, workers: int | None = None) -> pd.DataFrame:
    """``STATS_COLUMNS`` for each distinct key (first path of each key read); ``decode``: also ``pixel_std``.

    With ``store``, what its cache holds is reused and what was computed is added to it.
    """
    first: dict[str, str] = {}
    for k, p in zip(keys, paths):
        first.setdefault(k, p)
    cache = ImageStatsCache(store) if store is not None else None
    known = (cache.read() if cache is not None else empty_stats())
    known = known.drop_duplicates("image_key", keep="last").set_index("image_key")
    have = known.reindex(list(first))
    need = have["width"].isna() | (have["pixel_std"].isna() if decode else False)
    todo = [k for k, missing in zip(have.index, need.to_numpy()) if missing]
    if todo:
        n_workers = workers or max(1, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n_workers) as pool, \
                progress_bar(len(todo), "img", progress, "image checks", leave=False) as bar:
            rows = []
            for r in pool.map(lambda k: _one_image(first[k], decode, max_pixels), todo):
                rows.append(r)
                bar.update(1)
        fresh = pd.DataFrame(rows, index=pd.Index(todo, name="image_key"), columns=["width", "height", "pixel_std"])
        have.loc[todo, ["width", "height", "pixel_std"]] = fresh.to_numpy()
        if cache is not None:
            merged = pd.concat([known[~known.index.isin(todo)], fresh])
            cache.write(merged.rename_axis("image_key").reset_index()[list(STATS_COLUMNS)])
    return have.rename_axis("image_key").reset_index()[list(STATS_COLUMNS)]
