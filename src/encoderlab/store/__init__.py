"""Embedding store: content-keyed, sharded, resumable, memory-mapped (see ``embedding_store``)."""

from .compact import COMPACT_MIN_ROWS
from .embedding_store import EmbeddingSpace, EmbeddingStore, MissingEmbeddingsError, ShardRemovedError, ShardWriter
from .shards import ShardRecord
from .writer import COMMIT_SECONDS, COMMIT_SECONDS_ENV

__all__ = [
    "COMMIT_SECONDS",
    "COMMIT_SECONDS_ENV",
    "COMPACT_MIN_ROWS",
    "EmbeddingSpace",
    "EmbeddingStore",
    "MissingEmbeddingsError",
    "ShardRecord",
    "ShardRemovedError",
    "ShardWriter",
]
