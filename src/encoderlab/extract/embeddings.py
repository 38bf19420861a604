"""Embeddings for the heads, trainers and evaluations: read from the store, computing only what it lacks.

Every rung of the ladder goes through here, so each one sees the same backbone, preprocessing and split, and nothing
that is cached is recomputed. Arrays come back as float32 numpy, unnormalized (normalizing is the caller's choice).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..hashing import text_key
from ..store import EmbeddingStore
from .loop import ExtractResult, extract_images, extract_texts, space_for


@dataclass
class ImageEmbeddings:
    """Image embeddings of the rows of a dataset that could be used.

    ``X[i]`` belongs to dataset row ``rows[i]``; rows whose image was skipped (bad file) are absent, and the reasons
    are in ``result.skipped``.
    """

    X: np.ndarray
    rows: np.ndarray
    result: ExtractResult


def image_embeddings(
    encoder: Encoder, dataset: Dataset, store: EmbeddingStore, *, progress: bool = True, **extract_options: object
) -> ImageEmbeddings:
    """Image embeddings of every usable row of ``dataset``, computed into the store where missing."""
    result = extract_images(encoder, dataset, store, progress=progress, **extract_options)  # type: ignore[arg-type]
    rows = np.array([i for i, k in enumerate(result.keys) if k is not None], dtype=np.int64)
    if rows.size == 0:
        raise EncoderlabError(
            f"no usable image in {dataset.source!r} ({len(result.skipped)} skipped)",
            "check the files with `encoderlab data inspect --decode`",
        )
    space = space_for(store, encoder, "image")
    X = space.get([result.keys[i] for i in rows])  # type: ignore[misc]
    return ImageEmbeddings(np.asarray(X, dtype=np.float32), rows, result)


def text_embeddings(
    encoder: Encoder, texts: Sequence[str], store: EmbeddingStore, *, progress: bool = True
) -> np.ndarray:
    """Embeddings of ``texts`` in the given order (prompts, captions, class names), cached in the store."""
    texts = list(texts)
    if not texts:
        return np.zeros((0, encoder.embed_dim), dtype=np.float32)
    extract_texts(encoder, list(dict.fromkeys(texts)), store, progress=progress and len(texts) > 256)
    space = space_for(store, encoder, "text")
    return np.asarray(space.get([text_key(t) for t in texts]), dtype=np.float32)


def caption_pairs(dataset: Dataset, rows: Sequence[int] | None = None) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Distinct caption strings of ``rows`` and the (image position, text index) pairs that link them.

    A caption shared by several images appears once in the list and is a positive of each of them, so retrieval and
    contrastive training never treat an identical caption as a negative. Image positions index into ``rows``.
    """
    from ..metrics.retrieval import pairs_from_captions

    texts_col = dataset.table["texts"].tolist()
    idx = range(len(texts_col)) if rows is None else rows
    return pairs_from_captions([texts_col[int(r)] or [] for r in idx])
