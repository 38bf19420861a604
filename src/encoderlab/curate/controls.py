"""The controlled check of a pair filter: swap a known share of captions between images, then count how many of the
deliberately wrong pairs the filter drops at each ``keep_top``.

A filter that drops pairs at random catches ``1 - keep_top`` of them; one whose score reads image-text agreement
catches far more. Swaps are a cyclic shift over a seeded random choice of rows (no row keeps its own captions); a
row whose new captions normalize to its old ones (two images that shared a generic caption) is not counted as
swapped, since its pairs are not wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..store import EmbeddingStore
from .pairs import check_captions, check_dual, score_pairs
from .quality import normalize_caption
from .rules import FilterConfig, Verdict, priority, score_rules

#: the filter of the check: the score cut only, so the numbers say what the score catches
SCORE_ONLY = FilterConfig(blank_std=None, exact_duplicates=False, near_dup=None, caption_duplicates=False)


def swap_captions(dataset: Dataset, fraction: float, *, split: str | None = "train",
                  seed: int = 0) -> tuple[Dataset, pd.DataFrame]:
    """``dataset`` with the captions of ``fraction`` of the captioned image rows of ``split`` moved to other rows.

    Returns the new dataset and one row per moved row: ``id``, ``original``, ``swapped`` (caption lists) and
    ``wrong`` (the new captions differ from the old ones after normalization).
    """
    if not 0 < fraction <= 1:
        raise EncoderlabError(f"fraction must be in (0, 1], got {fraction!r}", "pass e.g. 0.1 to swap 10%")
    t = dataset.table
    eligible = t["image"].notna() & t["texts"].map(len).gt(0)
    if split not in (None, "all"):
        dataset.select_split(split)
        eligible &= t["split"] == split
    rows = np.flatnonzero(eligible.to_numpy())
    m = int(round(fraction * len(rows)))
    if m < 2:
        raise EncoderlabError(f"{fraction:g} of {len(rows)} captioned images is fewer than 2 rows to swap between",
                              "use a larger fraction or more data")
    chosen = np.random.default_rng(seed).choice(rows, size=m, replace=False)
    texts = t["texts"].tolist()
    moved = [texts[r] for r in np.roll(chosen, 1)]  # row chosen[k] gets the captions of chosen[k - 1]
    table = t.copy()
    new_texts = list(texts)
    for r, caps in zip(chosen, moved):
        new_texts[r] = list(caps)
    table["texts"] = pd.Series(new_texts, index=table.index, dtype=object)

    def norm(caps: Sequence[str]) -> set[str]:
        return {normalize_caption(c) for c in caps}

    log = pd.DataFrame({"id": t["id"].to_numpy()[chosen], "original": [texts[r] for r in chosen], "swapped": moved,
                        "wrong": [norm(texts[r]) != norm(c) for r, c in zip(chosen, moved)]})
    return dataset.derive(table, info={**dataset.info, "swapped": {"fraction": fraction, "seed": seed,
                                                                   "rows": m}}), log


def swap_check(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, *, fraction: float = 0.1,
               keep_tops: Sequence[float] = (0.9, 0.8, 0.7), split: str | None = "train", seed: int = 0,
               progress: bool = False) -> dict[str, Any]:
    """Swap ``fraction`` of the captions of ``split``, score every pair, and for each ``keep_top`` count the wrong
    pairs the score cut drops (``recall``), how many of the dropped pairs were wrong (``precision``), and what a
    random drop would catch (``chance_recall = 1 - keep_top``)."""
    check_dual(encoder)
    check_captions(dataset)
    swapped, log = swap_captions(dataset, fraction, split=split, seed=seed)
    scope = swapped if split in (None, "all") else swapped.select_split(split)
    pairs = score_pairs(encoder, scope, store, progress=progress).pairs
    wrong_ids = set(log.loc[log["wrong"], "id"])
    wrong = pairs["id"].isin(wrong_ids).to_numpy() & pairs["score"].notna().to_numpy()
    order = priority(pairs)
    rows = []
    for kt in keep_tops:
        v = Verdict(len(pairs))
        cut = score_rules(pairs, v, FilterConfig.merged(SCORE_ONLY, keep_top=float(kt)), order)
        dropped = ~v.open
        caught = int((dropped & wrong).sum())
        rows.append({"keep_top": float(kt), "cut": cut["keep_top_cut"], "dropped": int(dropped.sum()),
                     "wrong_pairs": int(wrong.sum()), "caught": caught, "recall": caught / max(int(wrong.sum()), 1),
                     "precision": caught / max(int(dropped.sum()), 1), "chance_recall": 1.0 - float(kt)})
    wrong_scores = pairs.loc[wrong, "score"].to_numpy(dtype=np.float64)
    right_scores = pairs.loc[~wrong & pairs["score"].notna().to_numpy(), "score"].to_numpy(dtype=np.float64)
    return {"encoder": encoder.spec, "data": dataset.source, "split": split or "all", "fraction": fraction,
            "seed": seed, "rows_swapped": len(log), "rows_wrong": int(log["wrong"].sum()),
            "pairs": int(pairs["score"].notna().sum()), "wrong_pairs": int(wrong.sum()),
            "score_wrong_mean": float(wrong_scores.mean()) if wrong_scores.size else None,
            "score_right_mean": float(right_scores.mean()) if right_scores.size else None,
            "by_keep_top": rows}
