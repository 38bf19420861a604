"""Find the image files of a dataset that cannot be used, and identical images across splits, without embedding
anything (`encoderlab data inspect`; the rungs call ``cross_split_duplicates`` with the keys they already have)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..errors import BadImageError, EncoderlabError
from ..hashing import image_key
from ..progress import progress_bar
from .images import load_image, probe_image
from .manifest import Dataset


def audit_images(
    paths: Sequence[str | os.PathLike],
    *,
    decode: bool = False,
    max_pixels: int | None = None,
    progress: bool = True,
    workers: int = 4,
    keys: bool = False,
) -> tuple[list[dict[str, str]], dict[str, str]]:
    """``(bad, keys)``: ``[{path, reason}]`` for every file that would be skipped (see ``check_images``) and, with
    ``keys=True``, ``{path: hashing.image_key(path)}`` for every file that passed.

    Hashing in the same worker as the check reads each file while it is still in the OS cache, so finding
    duplicates costs about one extra read of the data, not a second pass over the disk.
    """
    check = load_image if decode else probe_image

    def one(p: str) -> tuple[dict[str, str] | None, str | None]:
        try:
            check(p, max_pixels=max_pixels)
        except BadImageError as e:
            return {"path": e.path, "reason": e.reason}, None
        if not keys:
            return None, None
        try:
            return None, image_key(p)
        except OSError as e:  # vanished or became unreadable between the check and the hash
            return {"path": p, "reason": "unreadable", "detail": e.strerror or str(e)}, None

    unique = list(dict.fromkeys(os.fspath(p) for p in paths))
    bad: list[dict[str, str]] = []
    found: dict[str, str] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            progress_bar(len(unique), "img", progress and bool(unique), "decode" if decode else "check",
                         leave=False) as bar:
        for p, (problem, key) in zip(unique, pool.map(one, unique)):
            if problem:
                bad.append(problem)
            elif key is not None:
                found[p] = key
            bar.update(1)
    return bad, found


def check_images(
    paths: Sequence[str | os.PathLike],
    *,
    decode: bool = False,
    max_pixels: int | None = None,
    progress: bool = True,
    workers: int = 4,
) -> list[dict[str, str]]:
    """``[{path, reason}]`` for every file that would be skipped.

    The default check (``probe_image``: format, dimensions, pixel limit, empty/missing/unreadable, and the PNG/JPEG
    end marker, so truncated files are found) reads a file's head and tail only; ``decode=True`` decodes every
    image and so also finds corrupt pixel data behind a valid header and tail. Results keep the order of ``paths``.
    """
    bad, _ = audit_images(paths, decode=decode, max_pixels=max_pixels, progress=progress, workers=workers)
    return bad


def cross_split_duplicates(
    dataset: Dataset,
    keys: Sequence[str | None] | Mapping[str, str | None] | None = None,
) -> list[dict[str, Any]]:
    """Groups of items with identical image contents that sit in more than one split (train/test leakage).

    ``keys``: content keys (``hashing.image_key``) of the items, either a sequence aligned with
    ``dataset.table``'s rows or a mapping ``{item id: key}``; None or a missing key means "not known" and the item
    is left out. When ``keys`` is None the image files are hashed here (unreadable ones are left out). Text-only
    items and items without a split never count.

    Returns one dict per group, largest first: ``{"key", "items", "splits": {split: count}, "ids": [...],
    "paths": [...]}`` (ids and paths in table order). Groups within a single split are not reported: they repeat an
    item, but do not leak between train and test.
    """
    table = dataset.table
    if keys is None:
        keys = [_key_or_none(p) for p in table["image"]]
    if isinstance(keys, Mapping):
        row_keys = [keys.get(i) for i in table["id"]]
    else:
        row_keys = list(keys)
        if len(row_keys) != len(table):
            raise EncoderlabError(
                f"cross_split_duplicates got {len(row_keys)} keys for {len(table)} items",
                "pass one key per table row (None where unknown) or a mapping {item id: key}",
            )
    groups: dict[str, list[int]] = defaultdict(list)
    splits = table["split"].tolist()
    images = table["image"].tolist()
    for n, (key, split, image) in enumerate(zip(row_keys, splits, images)):
        if key is not None and split is not None and image is not None:
            groups[key].append(n)
    ids = table["id"].tolist()
    out = []
    for key, rows in groups.items():
        in_splits: dict[str, int] = {}
        for n in rows:
            in_splits[splits[n]] = in_splits.get(splits[n], 0) + 1
        if len(in_splits) > 1:
            out.append({"key": key, "items": len(rows), "splits": dict(sorted(in_splits.items())),
                        "ids": [ids[n] for n in rows], "paths": [images[n] for n in rows]})
    out.sort(key=lambda g: (-g["items"], g["ids"][0]))
    return out


def _key_or_none(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return image_key(path)
    except OSError:  # a missing or unreadable file has no content to compare
        return None


def duplicates_summary(groups: Sequence[Mapping[str, Any]], examples: int = 5) -> dict[str, Any]:
    """``{"groups", "items", "examples"}`` of ``cross_split_duplicates``' result: counts, then the first
    ``examples`` groups with their splits and paths (the form ``data inspect --json`` reports)."""
    return {
        "groups": len(groups),
        "items": sum(int(g["items"]) for g in groups),
        "examples": [{"splits": dict(g["splits"]), "ids": list(g["ids"]), "paths": list(g["paths"])}
                     for g in groups[:examples]],
    }


def duplicates_note(groups: Sequence[Mapping[str, Any]]) -> str:
    """One sentence for reports, or "" when there are no groups: ``"6 groups of identical images (13 items) span
    more than one split"`` (the same picture in training and evaluation data inflates the scores)."""
    if not groups:
        return ""
    n, items = len(groups), sum(int(g["items"]) for g in groups)
    what = "group of identical images" if n == 1 else "groups of identical images"
    verb = "spans" if n == 1 else "span"
    return f"{n} {what} ({items} items) {verb} more than one split"
