"""Deterministic splits and k-shot samples, both driven by a hash of the item id.

Hashing the id (not the row position) makes a split independent of row order and stable when items are added:
an existing item keeps its split because its hash and the ratio boundaries do not change.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..errors import EncoderlabError

DEFAULT_RATIOS: dict[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def unit_hash(key: str, seed: int | str = 0, salt: str = "") -> float:
    """Map ``key`` to [0, 1) by blake2b of ``"{seed}:{salt}{key}"``; uniform and reproducible across runs."""
    digest = hashlib.blake2b(f"{seed}:{salt}{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _plain(value: object) -> str:
    """A value as a user wrote it: numpy scalars as plain numbers (``51``, not ``np.int64(51)``), text quoted."""
    if isinstance(value, np.generic):
        value = value.item()
    return repr(value)


def check_ratios(ratios: Mapping[str, float]) -> dict[str, float]:
    """Validate split ratios: non-empty names, non-negative numbers summing to 1 (within 1e-6)."""
    if not isinstance(ratios, Mapping) or not ratios:
        raise EncoderlabError(
            f"split ratios must be a non-empty mapping, got {ratios!r}", 'e.g. {"train": 0.8, "val": 0.2}'
        )
    out: dict[str, float] = {}
    for name, r in ratios.items():
        if not isinstance(name, str) or not name:
            raise EncoderlabError(f"split name {_plain(name)} is not a non-empty string", 'e.g. {"train": 0.8}')
        try:
            value = float(r)
        except (TypeError, ValueError):
            raise EncoderlabError(f"split ratio {name}={_plain(r)} is not a number", "e.g. train=0.8") from None
        if not math.isfinite(value) or value < 0:
            raise EncoderlabError(f"split ratio {name}={_plain(r)} must be a finite number >= 0", "e.g. train=0.8")
        out[name] = value
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise EncoderlabError(f"split ratios {out} sum to {total:g}, not 1", "make the ratios add up to 1")
    return out


def hash_splits(ids: Iterable[str], ratios: Mapping[str, float] | None = None, seed: int | str = 0) -> list[str]:
    """Assign each id to a split: its unit hash falls in the split's slice of [0, 1) (slices in ratio order)."""
    ratios = check_ratios(DEFAULT_RATIOS if ratios is None else ratios)
    names = list(ratios)
    bounds = list(itertools.accumulate(ratios[n] for n in names))
    bounds[-1] = 1.0  # float rounding must not leave a gap at the top
    last = len(names) - 1
    return [names[min(bisect.bisect_right(bounds, unit_hash(str(i), seed)), last)] for i in ids]


@dataclass
class KShotResult:
    """A k-shot sample and what could not be honoured (classes with fewer than k items)."""

    table: pd.DataFrame
    k: int
    seed: int | str
    split: str | None
    short_classes: dict[str, int] = field(default_factory=dict)  # label -> items available (< k)
    unlabelled_dropped: int = 0

    def note(self) -> str:
        """A one-line note for logs and reports; empty when every class got k items."""
        parts = []
        if self.short_classes:
            listed = ", ".join(f"{c!r} ({n})" for c, n in sorted(self.short_classes.items()))
            parts.append(f"{len(self.short_classes)} class(es) have fewer than k={self.k} items, all taken: {listed}")
        if self.unlabelled_dropped:
            parts.append(f"{self.unlabelled_dropped} unlabelled item(s) left out")
        return "; ".join(parts)


def k_shot_sample(table: pd.DataFrame, k: int, seed: int | str = 0, split: str | None = "train") -> KShotResult:
    """Per class, the k items with the smallest seeded id hash (within ``split``; None = all rows).

    Deterministic and independent of row order; for one seed, the k-shot set is contained in the (k+1)-shot set.
    Classes with fewer than k items are taken whole and reported in ``short_classes``.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise EncoderlabError(f"k-shot needs a whole number k >= 1, got k={_plain(k)}")
    rows = table
    if split is not None:
        rows = rows[rows["split"] == split]
        if rows.empty:
            have = sorted({s for s in table["split"].dropna().unique()})
            raise EncoderlabError(f"k-shot: no items in split {split!r}", f"available splits: {have or 'none'}")
    labelled = rows[rows["label"].notna()]
    dropped = len(rows) - len(labelled)
    if labelled.empty:
        raise EncoderlabError(f"k-shot needs labelled items; split {split!r} has none")
    keys = labelled["id"].map(lambda i: unit_hash(str(i), seed, salt="kshot:"))
    order = labelled.assign(_key=keys).sort_values(["label", "_key", "id"], kind="stable")
    picked = order.groupby("label", sort=True, observed=True).head(int(k)).drop(columns="_key")
    counts = labelled["label"].value_counts()
    short = {str(c): int(n) for c, n in counts.items() if n < k}
    return KShotResult(picked.reset_index(drop=True), int(k), seed, split, short, dropped)


def carve_validation(table: pd.DataFrame, fraction: float, seed: int | str = 0) -> list[str]:
    """Ids of a stratified validation part of ``table`` (columns ``id``, ``label``), chosen by seeded id hash.

    Per label, ``min(n - 1, max(1, round(fraction * n)))`` items with the smallest hash go to validation, so a
    class with two or more items keeps at least one for training and gets at least one for validation; a class
    with one item stays whole. Unlabelled items are never carved. Independent of row order.
    """
    if not 0.0 < float(fraction) < 1.0:
        raise EncoderlabError(f"validation fraction must be in (0, 1), got {_plain(fraction)}", "e.g. 0.1")
    labelled = table[table["label"].notna()]
    keys = labelled["id"].map(lambda i: unit_hash(str(i), seed, salt="val:"))
    order = labelled.assign(_key=keys).sort_values(["label", "_key", "id"], kind="stable")
    picked: list[str] = []
    for _, group in order.groupby("label", sort=True, observed=True):
        n = len(group)
        if n < 2:
            continue
        picked.extend(group["id"].head(min(n - 1, max(1, round(float(fraction) * n)))).astype(str))
    return picked
