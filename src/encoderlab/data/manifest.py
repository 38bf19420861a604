"""The manifest every later step reads: one row per item (an image, a text, or an image with its captions).

Columns, in this order: ``id`` (unique, stable str), ``image`` (absolute path or None), ``texts`` (list of str,
possibly empty), ``label`` (str or None), ``split`` (str or None), then any metadata columns the source had.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import EncoderlabError, close_matches
from .splits import DEFAULT_RATIOS, carve_validation, check_ratios, hash_splits, k_shot_sample

CORE_COLUMNS = ("id", "image", "texts", "label", "split")
#: the dtype of Arrow-backed manifest text columns: pandas' ``str`` (pyarrow storage, NaN for missing)
ARROW_STR = pd.StringDtype("pyarrow", na_value=float("nan"))
_CHECK_ROWS = 65_536
#: share of each class of train carved into a validation split when a source has none
VAL_FRACTION = 0.1


def is_valid_text(value: str) -> bool:
    """Whether a string is valid Unicode that UTF-8 can encode.

    A file name that is not valid UTF-8 on disk (a Latin-1 ``café.png`` from an old zip) reaches Python as a str
    with "surrogate escapes"; pandas, pyarrow, JSON files and terminals all refuse such strings, so they are caught
    at the source and the file is skipped instead of crashing the whole dataset later.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_invalid_text(value: Any) -> bool:
    """Whether a cell (a str, or a list/tuple/dict nesting strs) holds any string ``is_valid_text`` refuses."""
    if isinstance(value, str):
        return not is_valid_text(value)
    if isinstance(value, (list, tuple)):
        return any(has_invalid_text(v) for v in value)
    if isinstance(value, dict):
        return any(has_invalid_text(k) or has_invalid_text(v) for k, v in value.items())
    return False


def safe_text(value: str) -> str:
    """``value`` with undecodable bytes shown as ``\\xNN`` (and stray surrogates as ``\\udNNN``): safe to print,
    to write as UTF-8 JSON and to put in a table, and still recognisable to the person who owns the file."""
    if is_valid_text(value):
        return value
    try:
        return os.fsencode(value).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that no file-system byte maps to (e.g. "\ud800" from JSON)
        return value.encode("utf-8", "backslashreplace").decode("utf-8")


def _safe_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {k: safe_text(v) if isinstance(v, str) else v for k, v in entry.items()}


def clean_str(value: Any) -> str | None:
    """A cell as a non-empty string, or None (None, NaN, empty string)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value or None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # lists and arrays are not scalars
        pass
    s = str(value)
    return s if s != "" else None


def clean_texts(value: Any) -> list[str]:
    """A cell of captions (one string, a list, an array) as a list of non-blank strings."""
    if value is None:
        return []
    if type(value) is list and all(type(t) is str and t.strip() for t in value):
        return value
    if isinstance(value, str):
        return [value] if value.strip() else []
    try:
        items = list(value)
    except TypeError:
        s = clean_str(value)
        return [s] if s and s.strip() else []
    return [str(t) for t in items if t is not None and not (isinstance(t, float) and pd.isna(t)) and str(t).strip()]


def is_arrow_text(column: pd.Series) -> bool:
    """Whether a column holds Arrow-backed strings (``str`` / ``string[pyarrow]`` / ``ArrowDtype(string)``)."""
    d = column.dtype
    if isinstance(d, pd.StringDtype):
        return d.storage == "pyarrow"
    return isinstance(d, pd.ArrowDtype) and d.kind in "OSU" and pd.api.types.is_string_dtype(d)


def _kept_arrow(column: pd.Series) -> bool:
    """An Arrow-backed text column with every cell set and non-empty stays as it is: no Python object per cell,
    and nothing to check (Arrow holds valid UTF-8 only). Anything else is normalised cell by cell into objects."""
    return is_arrow_text(column) and not column.isna().any() and not column.eq("").any()


def _duplicated_ids(ids: pd.Series) -> list[Any]:
    if is_arrow_text(ids):
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = pa.array(ids)
        if len(pc.unique(arr)) == len(arr):
            return []  # the common case, without a hash table of Python strings
    return ids[ids.duplicated()].unique().tolist()


def _clean_column(column: pd.Series, lists: bool) -> pd.Series | None:
    """The column normalised without a Python call per cell, or None when some cell needs ``clean_str`` /
    ``clean_texts`` (or the UTF-8 check) one at a time.

    Text cells: a column of only strings and None becomes objects with "" as None. Caption cells (``lists``): a
    column of only lists of non-blank strings is already clean. Arrow checks the UTF-8 of all strings at once.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = column.to_numpy(dtype=object, na_value=None) if not lists else column.to_numpy(dtype=object)
    kinds = set(map(type, values))
    if lists:
        if kinds - {list}:
            return None
        arrow_type = pa.large_list(pa.large_string())
    elif kinds - {str, type(None)}:
        return None
    else:
        arrow_type = pa.large_string()
    for start in range(0, len(values), _CHECK_ROWS):  # a slice at a time: Arrow's copy stays small
        try:
            arr = pa.array(values[start:start + _CHECK_ROWS], type=arrow_type)
        except (pa.ArrowException, UnicodeError, TypeError, ValueError):
            return None  # text that is not valid UTF-8, or a cell of another kind: reported cell by cell
        if lists:
            flat = pc.list_flatten(arr)
            if flat.null_count or pc.any(pc.equal(pc.utf8_trim_whitespace(flat), "")).as_py():
                return None
    if lists:
        return column.astype(object)
    values = values.copy()  # to_numpy may be a view of the caller's column
    values[values == ""] = None
    return pd.Series(values, index=column.index, dtype=object)


def normalize_table(table: pd.DataFrame) -> pd.DataFrame:
    """Check and normalize a manifest table: core columns first, typed values, unique non-empty ids.

    Text columns that are Arrow-backed and have no empty cell (a large Parquet listing's ids and paths) are kept
    Arrow-backed; other cells become Python objects (None for missing), as the rest of encoderlab expects.
    """
    missing = [c for c in ("id", "image", "texts", "label", "split") if c not in table.columns]
    if missing:
        raise EncoderlabError(
            f"manifest table lacks column(s) {missing}; it has {list(table.columns)}",
            f"a manifest needs exactly {list(CORE_COLUMNS)} first, then metadata columns",
        )
    t = table.reset_index(drop=True).copy()
    kept = {c for c in ("id", "image", "label", "split") if _kept_arrow(t[c])}
    for col in ("id", "image", "label", "split", "texts"):
        if col in kept:
            continue
        quick = _clean_column(t[col], col == "texts")
        if quick is not None:
            t[col] = quick
            kept.add(col)
            continue
        bad = [v for v in t[col].tolist() if has_invalid_text(v)]
        if bad:
            shown = safe_text(str(bad[0]))
            raise EncoderlabError(
                f"manifest column {col!r} holds {len(bad)} value(s) that are not valid UTF-8 text, e.g. {shown!r}",
                "skip those rows (sources report them as bad-filename / bad-value) or fix the text",
            )
    if "id" not in kept:
        t["id"] = pd.Series([str(i) if clean_str(i) is not None else None for i in t["id"].tolist()], dtype=object)
    if t["id"].isna().any():
        raise EncoderlabError(f"manifest has {int(t['id'].isna().sum())} item(s) with an empty id")
    dupes = _duplicated_ids(t["id"])
    if dupes:
        raise EncoderlabError(f"manifest ids must be unique; repeated: {dupes[:5]}", "give every item its own id")
    for col, clean in (("image", clean_str), ("texts", clean_texts), ("label", clean_str), ("split", clean_str)):
        if col not in kept:
            t[col] = pd.Series([clean(v) for v in t[col].tolist()], index=t.index, dtype=object)
    extra = [c for c in t.columns if c not in CORE_COLUMNS]
    return t[list(CORE_COLUMNS) + extra]


class Dataset:
    """A manifest table plus where it came from and what was left out while reading it.

    ``skipped`` lists ``{"path", "reason"}`` (and sometimes ``"detail"``) for every source entry that did not
    become an item, so nothing is dropped silently. ``split_info`` records how ``split`` was made:
    ``{"method": "source"}``, ``{"method": "hash", "ratios": ..., "seed": ...}`` or ``{"method": "none"}``.
    ``info`` holds source-specific notes (e.g. symlink aliases, class display names, k-shot notes).
    """

    def __init__(
        self,
        table: pd.DataFrame,
        *,
        source: str = "",
        root: str | Path | None = None,
        skipped: Sequence[Mapping[str, Any]] | None = None,
        split_info: Mapping[str, Any] | None = None,
        info: Mapping[str, Any] | None = None,
    ) -> None:
        self.table = normalize_table(table)
        self.source = source
        self.root = Path(root) if root is not None else Path(".")
        # Skip entries are printed and written as JSON: undecodable file names must not break either.
        self.skipped: list[dict[str, Any]] = [_safe_entry(s) for s in (skipped or [])]
        if split_info is None:
            split_info = {"method": "source"} if self.table["split"].notna().any() else {"method": "none"}
        self.split_info: dict[str, Any] = dict(split_info)
        self.info: dict[str, Any] = dict(info or {})

    def derive(self, table: pd.DataFrame, **changes: Any) -> Dataset:
        """A Dataset over rows of this one's (already normalized) table, with ``source``/``skipped``/``split_info``/
        ``info`` changed as given; the rows are not re-validated."""
        new = object.__new__(Dataset)
        new.table = table.reset_index(drop=True)
        new.source = changes.get("source", self.source)
        new.root = self.root
        new.skipped = [_safe_entry(s) for s in changes["skipped"]] if "skipped" in changes else list(self.skipped)
        new.split_info = dict(changes.get("split_info", self.split_info))
        new.info = dict(changes.get("info", self.info))
        return new

    def __len__(self) -> int:
        return len(self.table)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.source!r}, items={len(self)}, classes={len(self.classes)}, "
            f"splits={self.splits}, skipped={len(self.skipped)})"
        )

    @property
    def classes(self) -> list[str]:
        """Sorted unique labels (None excluded)."""
        return sorted(self.table["label"].dropna().unique().tolist())

    @property
    def splits(self) -> list[str]:
        """Sorted unique split names (None excluded)."""
        return sorted(self.table["split"].dropna().unique().tolist())

    @property
    def has_images(self) -> bool:
        return bool(self.table["image"].notna().any())

    @property
    def has_texts(self) -> bool:
        return bool(self.table["texts"].map(len).gt(0).any())

    def select_split(self, name: str) -> Dataset:
        """The items of one split; an unknown name fails with the available splits."""
        available = self.splits
        if name not in available:
            guess = close_matches(str(name), available)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise EncoderlabError(
                f"unknown split {name!r} in {self.source or 'dataset'}",
                f"{hint}available splits: {available or 'none (use with_splits to make some)'}",
            )
        return self.derive(self.table[self.table["split"] == name])

    def subset(self, mask: Any) -> Dataset:
        """The items where a boolean mask (Series or array aligned with ``table``) is true."""
        return self.derive(self.table[mask])

    def with_splits(
        self,
        ratios: Mapping[str, float] | None = None,
        seed: int | str = 0,
        *,
        from_split: str | None = None,
    ) -> Dataset:
        """Deterministic hash splits by item id (see ``splits.hash_splits``).

        With ``from_split`` only that split's items are re-split (e.g. carve ``val`` out of ``train``:
        ``with_splits({"train": 0.9, "val": 0.1}, from_split="train")``); other items keep their split.
        """
        ratios = check_ratios(DEFAULT_RATIOS if ratios is None else ratios)
        table = self.table.copy()
        info: dict[str, Any] = {"method": "hash", "ratios": ratios, "seed": seed}
        if from_split is None:
            table["split"] = hash_splits(table["id"], ratios, seed)
        else:
            self.select_split(from_split)  # validates the name
            rows = table["split"] == from_split
            table.loc[rows, "split"] = hash_splits(table.loc[rows, "id"], ratios, seed)
            info.update(from_split=from_split, base=self.split_info)
        return self.derive(table, split_info=info)

    def ensure_validation(self, fraction: float = VAL_FRACTION, seed: int | str = 0) -> Dataset:
        """This dataset if it has a ``val`` split (or no ``train``); else one with ``val`` carved out of ``train``.

        Most public benchmarks ship train and test only. The carve is stratified by class and deterministic (the
        items of each class with the smallest seeded id hash, see ``splits.carve_validation``); ``test`` is never
        touched. ``split_info`` records it as ``{"method": "carved", "from_split": "train", "fraction", "seed",
        "items", "base": <the previous split_info>}``.
        """
        splits = set(self.splits)
        if "val" in splits or "train" not in splits:
            return self
        table = self.table.copy()
        in_train = table["split"] == "train"
        picked = carve_validation(table.loc[in_train, ["id", "label"]], fraction, seed)
        table.loc[table["id"].isin(picked), "split"] = "val"
        info = {"method": "carved", "from_split": "train", "to_split": "val", "fraction": fraction, "seed": seed,
                "stratified_by": "label", "items": len(picked), "base": self.split_info}
        return self.derive(table, split_info=info)

    def k_shot(self, k: int, seed: int | str = 0, split: str | None = "train") -> Dataset:
        """k items per class from ``split`` (seeded, deterministic). Short classes are taken whole and reported:
        in ``info["k_shot"]["note"]`` and as a ``UserWarning``."""
        result = k_shot_sample(self.table, k, seed, split)
        note = result.note()
        if note:
            warnings.warn(f"k-shot sample of {self.source or 'dataset'}: {note}", UserWarning, stacklevel=2)
        info = dict(self.info)
        info["k_shot"] = {
            "k": result.k,
            "seed": seed,
            "split": split,
            "short_classes": result.short_classes,
            "unlabelled_dropped": result.unlabelled_dropped,
            "note": note,
        }
        return self.derive(result.table, info=info)

    @property
    def unlabelled(self) -> int:
        """Items without a label (an empty label cell, or an image outside any class folder)."""
        return int(self.table["label"].isna().sum())

    def unlabelled_note(self) -> str:
        """``"32 items have no label (left out of classification)"``, or "" when every item, or none, is labelled.

        Classification drops unlabelled items; this sentence says so wherever counts are shown (``data inspect``,
        the rungs), so used-of-total numbers add up. A set with no labels at all gets "": it is not a
        classification set, and the rungs that need labels say so themselves.
        """
        n = self.unlabelled
        if n == 0 or n == len(self.table):
            return ""
        return f"{n} item{'s have' if n != 1 else ' has'} no label (left out of classification)"

    def texts_flat(self) -> pd.DataFrame:
        """One row per (item, caption): columns ``id``, ``text_index``, ``text``, ``label``, ``split``."""
        t = self.table[["id", "texts", "label", "split"]]
        flat = t.explode("texts").dropna(subset=["texts"]).rename(columns={"texts": "text"})
        flat.insert(1, "text_index", flat.groupby("id", sort=False).cumcount())
        return flat.reset_index(drop=True)[["id", "text_index", "text", "label", "split"]]

    def metadata_columns(self) -> list[str]:
        return [c for c in self.table.columns if c not in CORE_COLUMNS]

    def summary(self) -> dict[str, Any]:
        """Counts a person checks first: items, classes, per split, per class, skipped (by reason)."""
        t = self.table
        per_split = {str(k): int(v) for k, v in t["split"].value_counts(dropna=True).sort_index().items()}
        per_class = {str(k): int(v) for k, v in t["label"].value_counts(dropna=True).sort_index().items()}
        reasons = Counter(str(s.get("reason")) for s in self.skipped)
        out: dict[str, Any] = {
            "source": self.source,
            "root": str(self.root),
            "items": len(t),
            "images": int(t["image"].notna().sum()),
            "texts": int(t["texts"].map(len).sum()),
            "classes": len(per_class),
            "per_split": per_split,
            "per_class": per_class,
            "unlabelled": self.unlabelled,
            "skipped": len(self.skipped),
            "skipped_by_reason": dict(sorted(reasons.items())),
            "split_info": self.split_info,
        }
        for key in ("aliases", "k_shot"):
            if key in self.info:
                out[key] = self.info[key]
        return out
