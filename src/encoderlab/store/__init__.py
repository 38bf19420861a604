"""Embedding store: content-keyed, sharded, resumable, memory-mapped (layout in ``embedding_store``)."""

from .compact import COMPACT_MIN_ROWS
from .embedding_store import EmbeddingStore
from .shards import ShardRecord
from .space import EmbeddingSpace, MissingEmbeddingsError, ShardRemovedError
from .writer import COMMIT_SECONDS, COMMIT_SECONDS_ENV, ShardWriter

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
