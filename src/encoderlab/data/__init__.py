"""Data: sources -> ``Dataset`` manifests, robust image decoding, deterministic splits, packaged real sets.

    from encoderlab.data import load_dataset, load_image
    ds = load_dataset("csv:pairs.csv?text=caption")     # or folder:DIR, jsonl:, parquet:, openclipart, emoji, ...
    train = ds.select_split("train")
    img = load_image(train.table.image[0])               # RGB PIL image, or BadImageError(reason=...)
"""

from __future__ import annotations

from ..errors import BadImageError
from .audit import cross_split_duplicates, duplicates_note
from .fetch import convert_fashion_mnist, fetch_dataset, fetched_sets
from .images import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, REASONS, ImageHeader, load_image, probe_image, to_rgb
from .manifest import CORE_COLUMNS, Dataset
from .packaged import PACKAGED, is_fetched, packaged_root
from .sources import (
    LISTING_REASONS,
    ParsedSource,
    SourceResult,
    list_folder,
    list_sources,
    load_dataset,
    parse_source_spec,
    register_source,
)
from .splits import DEFAULT_RATIOS, KShotResult, hash_splits, k_shot_sample, unit_hash

__all__ = [
    "CORE_COLUMNS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_RATIOS",
    "IMAGE_EXTENSIONS",
    "LISTING_REASONS",
    "PACKAGED",
    "REASONS",
    "BadImageError",
    "Dataset",
    "ImageHeader",
    "KShotResult",
    "ParsedSource",
    "SourceResult",
    "convert_fashion_mnist",
    "cross_split_duplicates",
    "duplicates_note",
    "fetch_dataset",
    "fetched_sets",
    "hash_splits",
    "is_fetched",
    "k_shot_sample",
    "list_folder",
    "list_sources",
    "load_dataset",
    "load_image",
    "packaged_root",
    "parse_source_spec",
    "probe_image",
    "register_source",
    "to_rgb",
    "unit_hash",
]
