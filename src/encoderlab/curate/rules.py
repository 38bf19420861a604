"""The filter's rules and the one decision per pair: kept, or dropped with the first rule (in ``RULES`` order) that
drops it.

Rules come in four groups, applied in this order so each pair's reason is the most basic one that applies:

1. structure: a row without an image or without a caption has no pair; an image extraction could not decode has
   no embedding;
2. basic quality (DataComp's "basic filtering" knobs, all off by default except blank images): caption word and
   character counts, the image's shorter side and aspect ratio, near-constant images;
3. duplicates, each keeping one (the best-scored; ties by row order, then content key): identical image files (the
   store's content keys), near-duplicate images by embedding (``duplicates``), the same normalized caption twice on
   one image, and optionally one caption on more than ``max_per_caption`` images;
4. the score: ``min_score`` (an absolute cosine) and ``keep_top`` (a fraction of the pool, DataComp's form: it reads
   the same across models, a raw cosine threshold does not), then the optional per-class quota.

``keep_top`` is a fraction of every scored pair in scope, whatever else drops them: the cut is the score of the
``round(keep_top * n)``-th best pair, ties broken by row and caption order, so exactly that many pairs pass it and the
cut does not move when another rule is switched on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..errors import EncoderlabError, close_matches
from .duplicates import INDEX_KINDS, KeepOne, NearDuplicates, RowReader, keep_one, near_duplicates
from .quality import normalize_caption

#: every reason a pair can be dropped for, in the order the rules are applied, with what it means
RULES: dict[str, str] = {
    "no-image": "a row with captions but no image",
    "no-caption": "an image without any caption (no pair to score)",
    "unreadable": "the image could not be decoded, so it has no embedding",
    "caption-words": "caption word count outside --min-words / --max-words",
    "caption-chars": "caption length outside --min-chars / --max-chars",
    "image-size": "shorter image side below --min-size pixels",
    "aspect-ratio": "longer / shorter image side above --max-aspect",
    "blank-image": "near-constant image: largest channel std of a 32 px thumbnail below --blank-std (0-255 scale)",
    "exact-duplicate": "the same image file content as a kept row (content hash)",
    "near-duplicate": "image embedding at or above --near-dup cosine of a kept image",
    "caption-duplicate": "the same normalized caption as a kept caption of the same image",
    "caption-repeated": "a normalized caption already on --max-per-caption kept images",
    "min-score": "pair score below --min-score",
    "keep-top": "pair score outside the top --keep-top fraction of all scored pairs",
    "class-quota": "beyond the --per-class-quota best-scored pairs of its class",
}
BASIC_RULES = ("caption-words", "caption-chars", "image-size", "aspect-ratio", "blank-image")


@dataclass(frozen=True)
class FilterConfig:
    """What the filter does; ``None`` switches a rule off. ``check()`` refuses values no rule can use."""

    min_score: float | None = None
    keep_top: float | None = None
    per_class_quota: int | None = None
    min_words: int | None = None
    max_words: int | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    min_size: int | None = None
    max_aspect: float | None = None
    blank_std: float | None = 1.0
    exact_duplicates: bool = True
    near_dup: float | None = 0.95
    near_dup_index: str = "auto"
    nprobe: int | None = None
    caption_duplicates: bool = True
    max_per_caption: int | None = None
    seed: int = 0

    @classmethod
    def merged(cls, base: FilterConfig | None = None, **overrides: Any) -> FilterConfig:
        names = [f.name for f in dataclasses.fields(cls)]
        for key in overrides:
            if key not in names:
                guess = close_matches(key, names)
                hint = f"did you mean {', '.join(guess)}? " if guess else ""
                raise EncoderlabError(f"unknown filter setting {key!r}", f"{hint}settings: {', '.join(names)}")
        cfg = dataclasses.replace(base or cls(), **overrides)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Fail before any work on a value no rule can use, naming it and the fix."""
        if self.keep_top is not None and not 0 < self.keep_top <= 1:
            raise EncoderlabError(f"keep_top must be a fraction in (0, 1], got {self.keep_top!r}",
                                  "pass e.g. --keep-top 0.8 to keep the best-scored 80% of pairs (1 keeps all)")
        if self.min_score is not None and not -1 <= self.min_score <= 1:
            raise EncoderlabError(f"min_score must be a cosine similarity in [-1, 1], got {self.min_score!r}",
                                  "pass e.g. --min-score 0.2 (scores are cosines of normalized embeddings)")
        if self.near_dup is not None and not 0 < self.near_dup <= 1:
            raise EncoderlabError(f"near_dup must be a cosine similarity in (0, 1], got {self.near_dup!r}",
                                  "pass e.g. --near-dup 0.95, or --near-dup none to switch it off")
        if self.near_dup_index not in INDEX_KINDS:
            raise EncoderlabError(f"unknown near-duplicate index {self.near_dup_index!r}",
                                  f"use one of {', '.join(INDEX_KINDS)}")
        for name in ("per_class_quota", "max_per_caption", "nprobe"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 1):
                raise EncoderlabError(f"{name} must be a whole number >= 1, got {v!r}", f"pass {name}=1 or more")
        for name in ("min_words", "max_words", "min_chars", "max_chars", "min_size"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or int(v) != v or v < 0):
                raise EncoderlabError(f"{name} must be a whole number >= 0, got {v!r}", f"pass {name}=0 or more")
        for lo, hi in (("min_words", "max_words"), ("min_chars", "max_chars")):
            a, b = getattr(self, lo), getattr(self, hi)
            if a is not None and b is not None and a > b:
                raise EncoderlabError(f"{lo}={a} is above {hi}={b}: no caption could pass",
                                      f"make {lo} <= {hi}")
        if self.max_aspect is not None and not self.max_aspect >= 1:
            raise EncoderlabError(f"max_aspect must be >= 1 (longer side / shorter side), got {self.max_aspect!r}",
                                  "pass e.g. --max-aspect 3 (DataComp's basic filter)")
        if self.blank_std is not None and not self.blank_std >= 0:
            raise EncoderlabError(f"blank_std must be >= 0, got {self.blank_std!r}", "pass e.g. 2, or 0 for off")

    @property
    def needs_pixels(self) -> bool:
        return bool(self.blank_std)

    @property
    def needs_header(self) -> bool:
        return self.min_size is not None or self.max_aspect is not None or self.needs_pixels


@dataclass
class Verdict:
    """The decision so far: ``reason[i]`` is None while pair i is still kept."""

    n: int
    reason: np.ndarray = field(init=False)
    detail: np.ndarray = field(init=False)
    duplicate_of: np.ndarray = field(init=False)
    group: np.ndarray = field(init=False)
    flagged: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.reason = np.full(self.n, None, dtype=object)
        self.detail = np.full(self.n, None, dtype=object)
        self.duplicate_of = np.full(self.n, None, dtype=object)
        self.group = np.full(self.n, -1, dtype=np.int64)
        self.similarity = np.full(self.n, np.nan, dtype=np.float32)  # cosine to the kept near-duplicate
        self._open = np.ones(self.n, dtype=bool)

    @property
    def open(self) -> np.ndarray:
        """Which pairs are still kept (a copy)."""
        return self._open.copy()

    def drop(self, mask: np.ndarray, rule: str, detail: Callable[[np.ndarray], list[str]] | None = None,
             duplicate_of: np.ndarray | None = None, flag: bool = True) -> None:
        """Drop the still-kept pairs of ``mask`` for ``rule``; ``detail(positions)`` says why for each of them."""
        if rule not in RULES:
            raise ValueError(f"unknown rule {rule!r}")
        if flag:
            self.flagged[rule] = self.flagged.get(rule, 0) + int(mask.sum())
        sel = np.flatnonzero(mask & self._open)
        self._open[sel] = False
        self.reason[sel] = rule
        if detail is not None and len(sel):
            self.detail[sel] = detail(sel)
        if duplicate_of is not None:
            self.duplicate_of[sel] = duplicate_of[sel]


def priority(pairs: pd.DataFrame) -> np.ndarray:
    """Positions of the pairs best first: higher score, then earlier row, then earlier caption (NaN scores last)."""
    score = pairs["score"].to_numpy(dtype=np.float64)
    key = np.where(np.isnan(score), np.inf, -score)
    return np.lexsort((pairs["text_index"].to_numpy(), pairs["row"].to_numpy(), key))


def structural_rules(pairs: pd.DataFrame, v: Verdict, unreadable: dict[str, str]) -> None:
    """no-image, no-caption, unreadable (``unreadable`` maps an image path to the reason extraction gave)."""
    no_image = pairs["image"].isna().to_numpy()
    no_caption = (pairs["text_index"] < 0).to_numpy()
    bad = (pairs["image_key"].isna().to_numpy() & ~no_image)
    paths = pairs["image"].to_numpy()
    v.drop(no_image, "no-image")
    v.drop(no_caption, "no-caption")
    v.drop(bad, "unreadable", lambda sel: [unreadable.get(str(paths[i]), "not decoded") for i in sel])


def basic_rules(pairs: pd.DataFrame, v: Verdict, cfg: FilterConfig, stats: pd.DataFrame | None) -> None:
    """Caption counts on every pair; image size, aspect and blank checks from ``stats`` (``quality.image_stats``)."""
    text = pairs["text"].fillna("").astype(str)
    if cfg.min_words is not None or cfg.max_words is not None:
        words = text.str.split().str.len().to_numpy()
        _bounds(v, words, cfg.min_words, cfg.max_words, "caption-words", "words")
    if cfg.min_chars is not None or cfg.max_chars is not None:
        chars = text.str.len().to_numpy()
        _bounds(v, chars, cfg.min_chars, cfg.max_chars, "caption-chars", "characters")
    if stats is None or not cfg.needs_header:
        return
    s = stats.set_index("image_key").reindex(pairs["image_key"].to_numpy())
    w, h, std = (s[c].to_numpy(dtype=np.float64) for c in ("width", "height", "pixel_std"))
    short, long = np.fmin(w, h), np.fmax(w, h)
    if cfg.min_size is not None:
        v.drop(short < cfg.min_size, "image-size", lambda sel: [f"{w[i]:.0f}x{h[i]:.0f} px" for i in sel])
    if cfg.max_aspect is not None:
        with np.errstate(divide="ignore", invalid="ignore"):
            aspect = long / short
        v.drop(aspect > cfg.max_aspect, "aspect-ratio", lambda sel: [f"aspect {aspect[i]:.2f}" for i in sel])
    if cfg.blank_std:
        v.drop(std < cfg.blank_std, "blank-image", lambda sel: [f"pixel std {std[i]:.2f}" for i in sel])


def _bounds(v: Verdict, values: np.ndarray, lo: int | None, hi: int | None, rule: str, unit: str) -> None:
    mask = np.zeros(len(values), bool)
    if lo is not None:
        mask |= values < lo
    if hi is not None:
        mask |= values > hi
    v.drop(mask, rule, lambda sel: [f"{int(values[i])} {unit}" for i in sel])


def exact_duplicate_rule(pairs: pd.DataFrame, v: Verdict, order: np.ndarray) -> int:
    """Rows sharing an image key: the row holding the best still-kept pair stays; returns the groups found."""
    open_ = v.open
    keys, rows, ids = (pairs[c].to_numpy() for c in ("image_key", "row", "id"))
    best_row: dict[str, int] = {}
    best_id: dict[str, str] = {}
    for i in order:  # best first: the first still-kept pair of a key names the row that keeps it
        if open_[i] and keys[i] not in best_row:
            best_row[keys[i]], best_id[keys[i]] = rows[i], ids[i]
    dup = np.array([bool(o) and best_row.get(k, r) != r for o, k, r in zip(open_, keys, rows)], dtype=bool)
    target = np.array([best_id.get(k) for k in keys], dtype=object)
    v.drop(dup, "exact-duplicate", lambda sel: [f"same file content as {target[i]}" for i in sel], target)
    return len({keys[i] for i in np.flatnonzero(dup)})


def near_duplicate_rule(pairs: pd.DataFrame, v: Verdict, cfg: FilterConfig, order: np.ndarray,
                        reader_for: Callable[[list[str]], tuple[RowReader, int]],
                        progress: bool) -> tuple[NearDuplicates, KeepOne, list[str]]:
    """Near-duplicate images among the still-kept pairs' image keys, keeping the best-scored of each group.

    ``reader_for(keys)`` returns ``(read, dim)``: a reader of those keys' unit image embeddings, in that order.
    """
    open_ = v.open
    keys_col, ids = pairs["image_key"].to_numpy(), pairs["id"].to_numpy()
    keys: list[str] = []
    first: dict[str, int] = {}
    key_id: dict[str, str] = {}  # the row that holds each key's still-kept pairs
    for i in order:  # keys in priority order: position = rank (0 = the best-scored image)
        if open_[i] and keys_col[i] not in first:
            first[keys_col[i]] = len(keys)
            key_id[keys_col[i]] = ids[i]
            keys.append(keys_col[i])
    read, dim = reader_for(keys)
    near = near_duplicates(read, len(keys), dim, float(cfg.near_dup), kind=cfg.near_dup_index, nprobe=cfg.nprobe,
                           progress=progress, seed=cfg.seed)
    rank = np.arange(len(keys))
    kept = keep_one(len(keys), near.pair_i, near.pair_j, near.pair_sim, rank)
    pos = np.array([first.get(k, -1) for k in keys_col], dtype=np.int64)
    has = pos >= 0
    dropped = np.zeros(len(pairs), bool)
    dropped[has] = ~kept.kept[pos[has]]
    target = np.full(len(pairs), None, dtype=object)
    for i in np.flatnonzero(dropped):
        target[i] = key_id[keys[kept.duplicate_of[pos[i]]]]
    sims = kept.similarity
    v.drop(dropped, "near-duplicate",
           lambda sel: [f"cosine {sims[pos[i]]:.3f} to {target[i]}" for i in sel], target)
    newly = dropped & (open_ & ~v.open)
    v.similarity[newly] = sims[pos[newly]]
    v.group[has] = kept.group[pos[has]]
    return near, kept, keys


def caption_rules(pairs: pd.DataFrame, v: Verdict, cfg: FilterConfig, order: np.ndarray) -> None:
    """The same normalized caption twice on one image; one caption on more than ``max_per_caption`` images."""
    if not (cfg.caption_duplicates or cfg.max_per_caption):
        return
    norm = np.array([normalize_caption(t) if isinstance(t, str) else "" for t in pairs["text"].tolist()], object)
    rows = pairs["row"].to_numpy()
    for rule, on in (("caption-duplicate", cfg.caption_duplicates), ("caption-repeated", cfg.max_per_caption)):
        if not on:
            continue
        open_ = v.open
        seen: dict[Any, int] = {}
        limit = 1 if rule == "caption-duplicate" else int(cfg.max_per_caption or 1)
        mask = np.zeros(len(pairs), bool)
        for i in order:
            if open_[i]:
                key = (rows[i], norm[i]) if rule == "caption-duplicate" else norm[i]
                seen[key] = seen.get(key, 0) + 1
                mask[i] = seen[key] > limit
        shown = np.array([t[:60] for t in norm], dtype=object)
        v.drop(mask, rule, lambda sel: [f"caption {shown[i]!r} is kept elsewhere" for i in sel])


def score_rules(pairs: pd.DataFrame, v: Verdict, cfg: FilterConfig, order: np.ndarray) -> dict[str, float | None]:
    """``min_score`` and ``keep_top``; returns ``{"keep_top_cut", "min_score", "cut"}`` (cut: the stricter)."""
    score = pairs["score"].to_numpy(dtype=np.float64)
    out: dict[str, float | None] = {"keep_top_cut": None, "min_score": cfg.min_score, "cut": cfg.min_score,
                                    "keep_top_n": None}
    if cfg.min_score is not None:
        v.drop(score < cfg.min_score, "min-score", lambda sel: [f"score {score[i]:.3f} < {cfg.min_score:g}"
                                                                for i in sel])
    if cfg.keep_top is not None:
        scored = order[~np.isnan(score[order])]
        k = max(1, int(math.floor(cfg.keep_top * len(scored) + 0.5))) if len(scored) else 0
        outside = np.zeros(len(pairs), bool)
        outside[scored[k:]] = True
        cut = float(score[scored[k - 1]]) if k else None
        out.update(keep_top_cut=cut, keep_top_n=k)
        out["cut"] = cut if out["cut"] is None or cut is None else max(out["cut"], cut)
        v.drop(outside, "keep-top",
               lambda sel: [f"score {score[i]:.3f}, below the top {cfg.keep_top:g} (cut {cut:.3f})" for i in sel])
    return out


def quota_rule(pairs: pd.DataFrame, v: Verdict, cfg: FilterConfig, order: np.ndarray) -> None:
    if cfg.per_class_quota is None:
        return
    labels = pairs["label"].to_numpy()
    open_ = v.open
    count: dict[str, int] = {}
    mask = np.zeros(len(pairs), bool)
    for i in order:
        if open_[i] and labels[i] is not None:
            count[labels[i]] = count.get(labels[i], 0) + 1
            mask[i] = count[labels[i]] > cfg.per_class_quota
    v.drop(mask, "class-quota", lambda sel: [f"class {labels[i]!r} has its {cfg.per_class_quota} best" for i in sel])
