"""Curation of image-text pairs: pair scores done right, quality rules, duplicates, and the filter experiment.

    from encoderlab.curate import FilterConfig, filter_dataset, write_filter
    result = filter_dataset(encoder, dataset, store, FilterConfig(keep_top=0.8))   # train split only
    write_filter(result, "runs/filtered", store)                                # kept.jsonl, dropped.parquet, ...

- ``pairs``: the pair table and its scores, the cosine of the L2-normalized embeddings (never logits), cached;
- ``quality``: image size / aspect / blank checks (cached by content), caption normalization;
- ``duplicates``: near-duplicates by FAISS range search (exact or IVF by size) and the keep-one policy;
- ``rules``: ``FilterConfig`` and the rules, one reason per dropped pair;
- ``run`` / ``output``: ``filter_dataset`` and ``write_filter`` (what ``encoderlab filter`` runs);
- ``compare``: ``filter_compare``, the same rung trained on all / filtered / a random subset of the same size;
- ``controls``: the swapped-caption check (how many deliberately wrong pairs a filter catches).
"""

from .compare import CompareResult, filter_compare
from .controls import swap_captions, swap_check
from .duplicates import KeepOne, NearDuplicates, keep_one, near_duplicates
from .output import write_filter, write_manifest
from .pairs import PairScores, ScoreCache, check_captions, check_dual, cosine_scores, pair_table, score_pairs
from .quality import image_stats, normalize_caption, pixel_std
from .rules import RULES, FilterConfig
from .run import FilterResult, filter_dataset, kept_dataset

__all__ = [
    "RULES",
    "CompareResult",
    "FilterConfig",
    "FilterResult",
    "KeepOne",
    "NearDuplicates",
    "PairScores",
    "ScoreCache",
    "check_captions",
    "check_dual",
    "cosine_scores",
    "filter_compare",
    "filter_dataset",
    "image_stats",
    "keep_one",
    "kept_dataset",
    "near_duplicates",
    "normalize_caption",
    "pair_table",
    "pixel_std",
    "score_pairs",
    "swap_captions",
    "swap_check",
    "write_filter",
    "write_manifest",
]
