"""``filter_dataset``: score every pair, apply the rules, and build the filtered dataset; ``write_filter`` writes it.

Only one split is filtered (``split="train"`` by default): val and test pass through untouched, are never scored,
and nothing about them sets a threshold, so whatever is later evaluated on them is evaluated on data no filter
touched. ``split="all"`` filters every row (for a set whose evaluation data lives elsewhere).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.loop import space_for
from ..normalize import normalize_rows
from ..results import data_provenance
from ..store import EmbeddingSpace, EmbeddingStore
from .duplicates import KeepOne, NearDuplicates, RowReader
from .pairs import PairScores, check_captions, check_dual, objects, score_pairs
from .quality import image_stats
from .rules import (
    RULES,
    FilterConfig,
    Verdict,
    basic_rules,
    caption_rules,
    exact_duplicate_rule,
    near_duplicate_rule,
    priority,
    quota_rule,
    score_rules,
    structural_rules,
)

#: rows of image embeddings read per chunk for the near-duplicate index
READ_CHUNK = 8192


@dataclass
class FilterResult:
    """What the filter decided. ``pairs`` holds every pair in scope with ``score``, ``kept``, ``reason``, ``detail``,
    ``duplicate_of`` and ``group``; ``dataset`` is the input with the scope filtered (what ``kept.jsonl`` holds)."""

    pairs: pd.DataFrame
    dataset: Dataset
    config: FilterConfig
    scope: str
    cuts: dict[str, Any]
    counts: dict[str, int]
    flagged: dict[str, int]
    scores: PairScores
    seconds: dict[str, float]
    exact_groups: int = 0
    near: NearDuplicates | None = None
    near_keep: KeepOne | None = None
    near_keys: list[str] = field(default_factory=list)
    encoder: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)  # ``data_provenance`` of the input and the scope

    @property
    def kept_pairs(self) -> int:
        return int(self.pairs["kept"].sum())

    @property
    def dropped(self) -> pd.DataFrame:
        return self.pairs[~self.pairs["kept"]]

    def summary(self) -> dict[str, Any]:
        """The flat numbers ``results.json`` reports (counts per rule, the cut, sizes)."""
        p = self.pairs
        scored = p["score"].dropna().to_numpy(dtype=np.float64)
        out: dict[str, Any] = {
            "pairs": len(p), "pairs_scored": int(scored.size), "kept_pairs": self.kept_pairs,
            "dropped_pairs": len(p) - self.kept_pairs, "kept_fraction": self.kept_pairs / max(len(p), 1),
            "rows": int(p["row"].nunique()), "kept_rows": int(p.loc[p["kept"], "row"].nunique()),
            "images": int(p["image_key"].nunique()), "exact_duplicate_groups": self.exact_groups,
            "near_duplicate_groups": self.near_keep.groups if self.near_keep is not None else 0,
            "near_duplicate_pairs": len(self.near.pair_i) if self.near is not None else 0,
            **{k: v for k, v in self.cuts.items() if v is not None},
        }
        if scored.size:
            q = np.quantile(scored, [0.1, 0.5, 0.9])
            out.update(score_mean=float(scored.mean()), score_p10=float(q[0]), score_median=float(q[1]),
                       score_p90=float(q[2]))
        out.update({f"dropped_{k}": v for k, v in self.counts.items()})
        return out


def _reader(space: EmbeddingSpace) -> Callable[[list[str]], tuple[RowReader, int]]:
    def reader_for(keys: list[str]) -> tuple[RowReader, int]:
        return (lambda a, b: normalize_rows(space.get(keys[a:b]))), int(space.dim or 0)

    return reader_for


def decide(pairs: pd.DataFrame, cfg: FilterConfig, *, unreadable: dict[str, str], stats: pd.DataFrame | None,
           reader_for: Callable[[list[str]], tuple[RowReader, int]] | None, progress: bool = False
           ) -> tuple[Verdict, dict[str, Any]]:
    """Apply every rule in ``RULES`` order; returns the verdict and what the rules found (cuts, duplicates)."""
    v = Verdict(len(pairs))
    order = priority(pairs)
    found: dict[str, Any] = {"near": None, "near_keep": None, "near_keys": [], "exact_groups": 0, "seconds": {}}
    structural_rules(pairs, v, unreadable)
    basic_rules(pairs, v, cfg, stats)
    if cfg.exact_duplicates:
        found["exact_groups"] = exact_duplicate_rule(pairs, v, order)
    if cfg.near_dup is not None and reader_for is not None and v.open.any():
        t0 = time.perf_counter()
        found["near"], found["near_keep"], found["near_keys"] = near_duplicate_rule(pairs, v, cfg, order, reader_for,
                                                                                    progress)
        found["seconds"]["near_duplicates"] = time.perf_counter() - t0
    caption_rules(pairs, v, cfg, order)
    found["cuts"] = score_rules(pairs, v, cfg, order)
    quota_rule(pairs, v, cfg, order)
    return v, found


def filter_dataset(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, config: FilterConfig | None = None, *,
                   split: str | None = "train", progress: bool = True, batch_size: int | None = None,
                   max_pixels: int | None = None, cache: bool = True, engine: Any = None) -> FilterResult:
    """Score and filter the pairs of ``split`` (None or "all": every row); other splits pass through untouched.

    ``engine``: where embedding and scoring run (None: this process; ``RayEngine``: a Ray cluster).
    """
    cfg = config or FilterConfig()
    cfg.check()
    check_dual(encoder)
    check_captions(dataset)
    if cfg.per_class_quota is not None and not dataset.classes:
        raise EncoderlabError(f"--per-class-quota needs labels, and {dataset.source!r} has none",
                              "drop --per-class-quota, or name the label column in the spec (?label=COLUMN)")
    if split in (None, "all"):
        in_scope = np.ones(len(dataset), bool)
    else:
        dataset.select_split(split)  # an unknown split fails here, with the splits there are
        in_scope = (dataset.table["split"] == split).to_numpy()
    scope = dataset.subset(in_scope)
    check_captions(scope)
    t0 = time.perf_counter()
    scores = score_pairs(encoder, scope, store, progress=progress, batch_size=batch_size, max_pixels=max_pixels,
                         cache=cache, engine=engine)
    pairs = scores.pairs
    stats, t1 = None, time.perf_counter()
    if cfg.needs_header:
        usable = pairs["image_key"].notna().to_numpy()
        stats = image_stats(pairs.loc[usable, "image_key"].tolist(), pairs.loc[usable, "image"].tolist(),
                            decode=cfg.needs_pixels, store=store if cache else None, max_pixels=max_pixels,
                            progress=progress)
    unreadable = {str(s.get("path")): str(s.get("reason")) for s in scores.skipped}
    t2 = time.perf_counter()
    verdict, found = decide(pairs, cfg, unreadable=unreadable, stats=stats,
                            reader_for=_reader(space_for(store, encoder, "image")), progress=progress)
    pairs = pairs.assign(kept=verdict.open, reason=objects(verdict.reason), detail=objects(verdict.detail),
                         duplicate_of=objects(verdict.duplicate_of), group=verdict.group,
                         similarity=verdict.similarity)
    seconds = {"extract": scores.extract_seconds, "score": scores.score_seconds, "image_checks": t2 - t1,
               "rules": time.perf_counter() - t2, **found["seconds"], "total": time.perf_counter() - t0}
    counts = {rule: int((pairs["reason"] == rule).sum()) for rule in RULES}
    name = "all" if split in (None, "all") else str(split)
    provenance = data_provenance(dataset, {name: scope.table["id"].astype(str).tolist()})
    return FilterResult(pairs, kept_dataset(dataset, np.flatnonzero(in_scope), pairs), cfg, name, found["cuts"],
                        counts, verdict.flagged, scores, seconds, found["exact_groups"], found["near"],
                        found["near_keep"], found["near_keys"], encoder.spec, provenance)


def kept_dataset(dataset: Dataset, scope_rows: np.ndarray, pairs: pd.DataFrame) -> Dataset:
    """``dataset`` with each in-scope row keeping only its kept captions (rows left with none are removed);
    out-of-scope rows are unchanged."""
    table = dataset.table.copy()
    kept = pairs[pairs["kept"]]
    captions: dict[int, list[str]] = {}
    for row, text in zip(kept["row"].tolist(), kept["text"].tolist()):
        captions.setdefault(int(scope_rows[row]), []).append(text)
    keep = np.ones(len(table), bool)
    keep[scope_rows] = False
    for full_row in captions:
        keep[full_row] = True
    texts = table["texts"].tolist()
    for full_row, caps in captions.items():
        texts[full_row] = caps
    table["texts"] = pd.Series(texts, index=table.index, dtype=object)
    info = {**dataset.info, "filtered": {"rows_in_scope": len(scope_rows), "rows_kept": len(captions)}}
    return dataset.derive(table[keep], info=info)
