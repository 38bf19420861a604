"""Pair scores done right: the cosine of the L2-normalized image and text embeddings of every (image, caption) pair.

Never the logits: ``logits_per_image`` is ``logit_scale * cos`` (a softmax temperature, CLIP) or a sigmoid of it
(SigLIP), and the cosine of two rows of logits is not the similarity of an image and its caption. Here each pair's
image and text embeddings are read from the store (computed there once, through the one extraction loop, where
missing), each is scaled to unit length, and the score is their dot product, in [-1, 1] and independent of any
embedding's norm. An image with several captions gives several pairs, each scored.

Scores are cached too, beside the store's spaces: one parquet per (image space, text space) fingerprint pair under
``<store>/.curate/``, keyed by the image's and the caption's content keys, so a rerun (or ``filter-compare`` after
``filter``) reads them instead of gathering embeddings again. Scoring streams the pairs in chunks, so memory is
O(chunk x dim) whatever the number of pairs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_open
from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.loop import extract_images, extract_texts, space_for
from ..hashing import text_key
from ..normalize import normalize_rows
from ..progress import progress_bar
from ..store import EmbeddingSpace, EmbeddingStore

#: pairs scored per chunk: two gathers of 32k x d float32 rows (64 MiB each at d = 512)
CHUNK_PAIRS = 32768
#: directory under the store root holding curation caches (hidden: never listed as an embedding space)
CACHE_DIR = ".curate"
SCORE_CACHE_VERSION = 1

#: columns of a pair table, in order (``row`` indexes the dataset's table; ``text_index`` -1: the row has no caption)
PAIR_COLUMNS = ("row", "id", "text_index", "text", "image", "label", "split", "image_key", "text_key")


def check_dual(encoder: Encoder) -> None:
    """Refuse an encoder without both towers, naming it and what to use instead (before anything is embedded)."""
    if "image" not in encoder.modalities or "text" not in encoder.modalities:
        raise EncoderlabError(
            f"pair scores need a dual image-text encoder; {encoder.spec!r} encodes only {'+'.join(encoder.modalities)}",
            "use a CLIP-style model (hf:openai/clip-vit-base-patch32, open_clip:..., an aligned local:DIR) or align "
            "an image and a text tower first with `encoderlab align`",
        )


def check_captions(dataset: Dataset) -> None:
    """Refuse a dataset without captions or without images: there are no pairs to score."""
    if not dataset.has_texts:
        raise EncoderlabError(
            f"data spec {dataset.source!r} has no captions, so there are no image-text pairs to score",
            "name the caption column in the spec, e.g. 'jsonl:pairs.jsonl?text=caption' or "
            "'csv:pairs.csv?image=path&text=caption' (a folder: source has no captions)",
        )
    if not dataset.has_images:
        raise EncoderlabError(f"data spec {dataset.source!r} has no images, so there are no image-text pairs",
                              "name the image column in the spec, e.g. 'csv:pairs.csv?image=path&text=caption'")


def pair_table(dataset: Dataset, image_keys: Sequence[str | None]) -> pd.DataFrame:
    """One row per (dataset row, caption): ``PAIR_COLUMNS``; a row without captions gives one row, text_index -1.

    ``image_keys[i]`` is the content key of dataset row ``i``'s image (None: no image, or it could not be used).
    """
    t = dataset.table
    if len(image_keys) != len(t):
        raise EncoderlabError(f"pair_table got {len(image_keys)} image keys for {len(t)} rows",
                              "pass one key per dataset row (None where the image is unusable)")
    base = pd.DataFrame({"row": np.arange(len(t), dtype=np.int64), "id": t["id"].to_numpy(),
                         "texts": t["texts"].to_numpy(), "image": t["image"].to_numpy(),
                         "label": t["label"].to_numpy(), "split": t["split"].to_numpy(),
                         "image_key": np.asarray(list(image_keys), dtype=object)})
    flat = base.explode("texts", ignore_index=True).rename(columns={"texts": "text"})
    has_text = flat["text"].notna().to_numpy()
    index = flat.groupby("row", sort=False).cumcount().to_numpy()
    flat["text_index"] = np.where(has_text, index, -1).astype(np.int64)
    flat["text"] = flat["text"].where(has_text, None)
    flat["text_key"] = [text_key(s) if ok else None for s, ok in zip(flat["text"].tolist(), has_text)]
    for col in ("id", "text", "image", "label", "split", "image_key", "text_key"):
        flat[col] = objects(flat[col])
    return flat[list(PAIR_COLUMNS)]


def objects(values: pd.Series | np.ndarray) -> pd.Series:
    """A column of Python objects with None for missing (pandas would infer its string dtype, with NaN)."""
    series = values if isinstance(values, pd.Series) else pd.Series(values, dtype=object)
    arr = series.to_numpy(dtype=object)
    return pd.Series(np.where(pd.isna(arr), None, arr), index=series.index, dtype=object)


def cosine_scores(image_space: EmbeddingSpace, text_space: EmbeddingSpace, image_keys: Sequence[str],
                  text_keys: Sequence[str], *, chunk_size: int = CHUNK_PAIRS, progress: bool = False) -> np.ndarray:
    """float32 cosine of each (image key, text key) pair's normalized embeddings, read from the spaces in chunks."""
    n = len(image_keys)
    if n != len(text_keys):
        raise EncoderlabError(f"{n} image keys but {len(text_keys)} text keys", "pass one of each per pair")
    out = np.empty(n, dtype=np.float32)
    with progress_bar(n, "pair", progress and n > chunk_size, "score", leave=False) as bar:
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            a = normalize_rows(image_space.get(image_keys[start:stop]))
            b = normalize_rows(text_space.get(text_keys[start:stop]))
            if a.shape[1] != b.shape[1]:
                raise EncoderlabError(f"image embeddings have {a.shape[1]} dimensions but text embeddings "
                                      f"{b.shape[1]}: they are not one joint space",
                                      "score pairs with a dual encoder whose towers share an embedding space")
            out[start:stop] = np.einsum("ij,ij->i", a, b)
            bar.update(stop - start)
    return out


class ScoreCache:
    """Scores of (image key, text key) pairs of one (image space, text space), in one parquet beside the store.

    ``lookup`` returns NaN where a pair is not cached; ``add`` + ``save`` merge new scores in and rewrite the file
    atomically (a concurrent writer's rows may be lost, never corrupted: the cache is only ever a shortcut).
    """

    def __init__(self, store: EmbeddingStore, image_fingerprint: str, text_fingerprint: str) -> None:
        name = f"scores-v{SCORE_CACHE_VERSION}-{image_fingerprint}-{text_fingerprint}.parquet"
        self.path = Path(store.root) / CACHE_DIR / name
        self._frame: pd.DataFrame | None = None
        self._new: list[pd.DataFrame] = []

    def _load(self) -> pd.DataFrame:
        if self._frame is None:
            frame = pd.DataFrame({"pair_key": pd.Series([], dtype=object), "score": np.array([], np.float32)})
            if self.path.is_file():
                try:
                    frame = pd.read_parquet(self.path, columns=["pair_key", "score"])
                except Exception as e:  # noqa: BLE001 - a damaged cache is dropped, never trusted
                    warnings.warn(f"ignoring the unreadable score cache {self.path} ({type(e).__name__}: {e})",
                                  stacklevel=3)
            self._frame = frame
        return self._frame

    def lookup(self, image_keys: Sequence[str], text_keys: Sequence[str]) -> np.ndarray:
        frame = self._load()
        out = np.full(len(image_keys), np.nan, dtype=np.float32)
        if len(frame) and len(image_keys):
            index = pd.Index(frame["pair_key"].to_numpy())
            if not index.is_unique:
                keep = ~index.duplicated()
                index, scores = index[keep], frame["score"].to_numpy()[keep]
            else:
                scores = frame["score"].to_numpy()
            pos = index.get_indexer(_pair_keys(image_keys, text_keys))
            found = pos >= 0
            out[found] = scores[pos[found]]
        return out

    def add(self, image_keys: Sequence[str], text_keys: Sequence[str], scores: np.ndarray) -> None:
        if len(scores):
            self._new.append(pd.DataFrame({"pair_key": _pair_keys(image_keys, text_keys),
                                           "score": np.asarray(scores, dtype=np.float32)}))

    def save(self) -> bool:
        """Write the merged cache; False (with a warning) when the store is not writable."""
        if not self._new:
            return True
        merged = pd.concat([self._load(), *self._new], ignore_index=True).drop_duplicates("pair_key")
        try:
            with atomic_open(self.path, "wb") as f:
                merged.to_parquet(f, index=False)
        except OSError as e:
            warnings.warn(f"pair scores not cached: cannot write {self.path} ({e.strerror or e})", stacklevel=2)
            return False
        self._frame, self._new = merged, []
        return True


def _pair_keys(image_keys: Sequence[str], text_keys: Sequence[str]) -> list[str]:
    return [f"{a}:{b}" for a, b in zip(image_keys, text_keys)]


@dataclass
class PairScores:
    """Every pair of a dataset with its score (NaN where the pair has no image, caption or usable image).

    ``skipped`` lists the images extraction could not use (``{path, reason}``); ``cached`` / ``computed`` count the
    scores read from the cache and computed now; ``extract_seconds`` is the time spent making sure every
    embedding is in the store (close to zero when they already were).
    """

    pairs: pd.DataFrame
    image_fingerprint: str
    text_fingerprint: str
    skipped: list[dict[str, str]]
    cached: int
    computed: int
    extract_seconds: float
    score_seconds: float


def score_pairs(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, *, chunk_size: int = CHUNK_PAIRS,
                cache: bool = True, progress: bool = True, batch_size: int | None = None,
                max_pixels: int | None = None, engine: Any = None) -> PairScores:
    """Score every (image, caption) pair of ``dataset``: embeddings from the store (extracting what it lacks, once),
    scores from the score cache where present, else the cosine of the normalized embeddings (then cached).

    ``engine``: where the embedding and the scoring run (None: this process; a ``RayEngine``: Ray workers).
    """
    check_dual(encoder)
    check_captions(dataset)
    t0 = time.perf_counter()
    img = extract_images(encoder, dataset, store, batch_size=batch_size, max_pixels=max_pixels, progress=progress,
                         engine=engine)
    extract_texts(encoder, dataset, store, batch_size=batch_size, progress=progress, engine=engine)
    extract_seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    pairs = pair_table(dataset, img.keys)
    img_space, txt_space = space_for(store, encoder, "image"), space_for(store, encoder, "text")
    ok = (pairs["image_key"].notna() & pairs["text_key"].notna()).to_numpy()
    ik = pairs.loc[ok, "image_key"].tolist()
    tk = pairs.loc[ok, "text_key"].tolist()
    memo = ScoreCache(store, img_space.fingerprint, txt_space.fingerprint) if cache else None
    got = memo.lookup(ik, tk) if memo is not None else np.full(len(ik), np.nan, np.float32)
    todo = np.flatnonzero(np.isnan(got))
    if len(todo):
        score = engine.cosine_scores if engine is not None else cosine_scores
        fresh = score(img_space, txt_space, [ik[i] for i in todo], [tk[i] for i in todo],
                      chunk_size=chunk_size, progress=progress)
        got[todo] = fresh
        if memo is not None:
            memo.add([ik[i] for i in todo], [tk[i] for i in todo], fresh)
            memo.save()
    scores = np.full(len(pairs), np.nan, dtype=np.float32)
    scores[ok] = got
    pairs["score"] = scores
    return PairScores(pairs, img_space.fingerprint, txt_space.fingerprint, list(dataset.skipped) + img.skipped,
                      cached=len(ik) - len(todo), computed=len(todo), extract_seconds=extract_seconds,
                      score_seconds=time.perf_counter() - t1)
