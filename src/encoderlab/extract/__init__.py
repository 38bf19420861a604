"""Extraction: the one loop that fills the embedding store, and the embeddings the later steps read from it.

- ``extract_images`` / ``extract_texts``: encode what the store lacks (``loop``);
- ``embed_dataset``: every modality a dataset and encoder share, with a summary (``embed``);
- ``image_embeddings`` / ``text_embeddings`` / ``caption_pairs``: arrays from the store (``embeddings``);
- ``labelled_embeddings``: one dataset's embeddings with labels and splits, for every classification rung;
- ``export_embeddings``: a dataset's embeddings out of the store, to parquet or .npy + parquet.
"""

from .embed import choose_modalities, embed_dataset
from .embeddings import ImageEmbeddings, caption_pairs, image_embeddings, text_embeddings
from .export import export_embeddings
from .labelled import LabelledEmbeddings, labelled_embeddings
from .loop import (
    ExtractResult,
    default_batch_size,
    default_num_workers,
    encode_with_backoff,
    extract_images,
    extract_texts,
    is_out_of_memory,
    space_for,
)

__all__ = [
    "ExtractResult",
    "ImageEmbeddings",
    "LabelledEmbeddings",
    "caption_pairs",
    "choose_modalities",
    "default_batch_size",
    "default_num_workers",
    "embed_dataset",
    "encode_with_backoff",
    "export_embeddings",
    "extract_images",
    "extract_texts",
    "image_embeddings",
    "is_out_of_memory",
    "labelled_embeddings",
    "space_for",
    "text_embeddings",
]
