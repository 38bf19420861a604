"""Embedding store: content-keyed, sharded, resumable, memory-mapped (see ``embedding_store``)."""

from .embedding_store import EmbeddingSpace, EmbeddingStore, MissingEmbeddingsError, ShardWriter
from .shards import ShardRecord

__all__ = ["EmbeddingSpace", "EmbeddingStore", "MissingEmbeddingsError", "ShardRecord", "ShardWriter"]
