"""Tabular sources: ``csv:``, ``jsonl:``, ``parquet:`` files listing images and/or texts.

Columns default to ``id``, ``image``, ``text`` (or ``texts``), ``label``, ``split``; remap them with
``columns={"text": "caption"}`` or in the spec (``csv:pairs.csv?text=caption&image=path``); an empty value
(``?split=``) ignores that column. Image paths are relative to the file's directory (or ``?base=DIR``).
Rows naming the same image (or the same ``id``) are grouped into one item whose ``texts`` collect every caption
in file order; rows that disagree on label or split with their group are skipped as ``conflict``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import EncoderlabError, close_matches
from ..hashing import bytes_digest
from .manifest import CORE_COLUMNS, clean_str, clean_texts
from .sources import SourceResult, register_source

ROLES = ("id", "image", "text", "label", "split")
DEFAULT_COLUMNS: dict[str, tuple[str, ...]] = {
    "id": ("id",),
    "image": ("image",),
    "text": ("text", "texts"),
    "label": ("label",),
    "split": ("split",),
}


def _read_csv(path: Path, options: Mapping[str, str]) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    sep = options.get("sep") or ("\t" if path.suffix.lower() == ".tsv" else ",")
    try:
        frame = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, na_values=[], encoding="utf-8")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise EncoderlabError(
            f"cannot parse CSV {str(path)!r}: {e}", "check the delimiter (?sep=;) and encoding (UTF-8)"
        ) from None
    cols = [str(c) for c in frame.columns]
    records = frame.to_dict("records")
    # Line numbers count the header as line 1 (true for files without quoted newlines).
    return cols, ((f"{path}:{n + 2}", r) for n, r in enumerate(records))


def _read_jsonl(path: Path, skipped: list[dict[str, Any]]) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    rows: list[tuple[str, dict]] = []
    cols: dict[str, None] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                skipped.append({"path": where, "reason": "bad-row", "detail": f"invalid JSON: {e.msg}"})
                continue
            if not isinstance(obj, dict):
                skipped.append({"path": where, "reason": "bad-row", "detail": "line is not a JSON object"})
                continue
            cols.update(dict.fromkeys(obj))
            rows.append((where, obj))
    return list(cols), iter(rows)


def _read_parquet(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise EncoderlabError(f"cannot read parquet file {str(path)!r}: {e}") from None
    return list(table.column_names), ((f"{path}:row {n}", r) for n, r in enumerate(table.to_pylist()))


def resolve_columns(
    available: list[str], columns: Mapping[str, str | None], options: Mapping[str, str], prefix: str, path: Path
) -> dict[str, str | None]:
    """Map each role to a file column (None = absent). Explicitly requested columns must exist."""
    requested: dict[str, str | None] = {}
    for key, value in columns.items():
        if key not in ROLES:
            guess = close_matches(str(key), list(ROLES))
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise EncoderlabError(f"unknown column role {key!r} in columns=", f"{hint}roles: {', '.join(ROLES)}")
        requested[key] = value or None
    for key in ROLES:
        if key in options:
            requested[key] = options[key] or None
    mapping: dict[str, str | None] = {}
    for role in ROLES:
        if role in requested:
            name = requested[role]
            if name is not None and name not in available:
                guess = close_matches(name, available)
                hint = f" (close: {', '.join(guess)})" if guess else ""
                raise EncoderlabError(
                    f"{prefix} file {str(path)!r} has no column {name!r} for {role}{hint}; "
                    f"its columns are {available}",
                    f"set ?{role}=COLUMN in the spec or columns={{{role!r}: COLUMN}}",
                )
            mapping[role] = name
        else:
            mapping[role] = next((c for c in DEFAULT_COLUMNS[role] if c in available), None)
    if mapping["image"] is None and mapping["text"] is None:
        raise EncoderlabError(
            f"{prefix} file {str(path)!r} has no image column and no text column; its columns are {available}",
            "name them with ?image=COLUMN&text=COLUMN in the spec (or columns={'image': ..., 'text': ...})",
        )
    return mapping


def read_table_source(
    prefix: str, target: str, options: Mapping[str, str], columns: Mapping[str, str | None]
) -> SourceResult:
    """Read a csv/jsonl/parquet file into manifest rows (see the module docstring for the rules)."""
    if not target:
        raise EncoderlabError(f"{prefix}: needs a file path", f"e.g. {prefix}:data/pairs.{prefix}")
    path = Path(target).expanduser().absolute()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise EncoderlabError(f"{prefix} file {target!r} {what}", f"give the path of a .{prefix} file")
    base = Path(options["base"]).expanduser().absolute() if options.get("base") else path.parent
    skipped: list[dict[str, Any]] = []
    if prefix == "csv":
        available, rows = _read_csv(path, options)
    elif prefix == "jsonl":
        available, rows = _read_jsonl(path, skipped)
    else:
        available, rows = _read_parquet(path)
    mapping = resolve_columns(available, columns, options, prefix, path)
    used = {c for c in mapping.values() if c is not None}
    meta_cols = [c for c in available if c not in used]
    meta_names = {c: (f"source_{c}" if c in CORE_COLUMNS or c == "text" else c) for c in meta_cols}

    items: dict[str, dict[str, Any]] = {}
    exists: dict[str, str | None] = {}
    for where, row in rows:
        item = _row_item(row, mapping, base, exists, where, skipped)
        if item is None:
            continue
        for c in meta_cols:
            item[meta_names[c]] = row.get(c)
        key = item.pop("_key")
        group = items.get(key)
        if group is None:
            items[key] = item
            continue
        clash = [r for r in ("image", "label", "split") if group[r] != item[r]]
        if clash:
            detail = "; ".join(f"{r} {item[r]!r} vs {group[r]!r}" for r in clash)
            skipped.append({"path": where, "reason": "conflict", "detail": f"item {group['id']!r}: {detail}"})
            continue
        group["texts"].extend(t for t in item["texts"] if t not in group["texts"])

    table = pd.DataFrame(list(items.values()), columns=["id", "image", "texts", "label", "split"]
                         + [meta_names[c] for c in meta_cols])
    info = {"columns": {r: mapping[r] for r in ROLES}, "base": str(base)}
    return SourceResult(table, path.parent, skipped, info)


def _row_item(
    row: Mapping[str, Any],
    mapping: Mapping[str, str | None],
    base: Path,
    exists: dict[str, str | None],
    where: str,
    skipped: list[dict[str, Any]],
) -> dict[str, Any] | None:
    def get(role: str) -> Any:
        col = mapping[role]
        return row.get(col) if col is not None else None

    image_rel = clean_str(get("image"))
    texts = clean_texts(get("text"))
    image = None
    if image_rel is not None:
        image = os.path.normpath(image_rel if os.path.isabs(image_rel) else os.path.join(base, image_rel))
        if image not in exists:
            exists[image] = None if os.path.isfile(image) else ("is-a-directory" if os.path.isdir(image) else "missing")
        problem = exists[image]
        if problem:
            skipped.append({"path": image, "reason": problem, "detail": f"row {where}"})
            return None
    elif not texts:
        skipped.append({"path": where, "reason": "empty-row", "detail": "no image and no text"})
        return None
    raw_id = clean_str(get("id"))
    if raw_id is not None:
        key = item_id = raw_id
    elif image is not None:
        key = image
        rel = os.path.relpath(image, base)
        item_id = Path(rel).as_posix() if not rel.startswith("..") else image
    else:
        key = item_id = "t" + bytes_digest("\n".join(texts).encode("utf-8"))
    label = clean_str(get("label"))
    split = clean_str(get("split"))
    return {
        "_key": key,
        "id": item_id,
        "image": image,
        "texts": list(dict.fromkeys(texts)),
        "label": label.strip() if label else label,
        "split": split.strip() if split else split,
    }


def _make_loader(prefix: str):
    def load(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
        return read_table_source(prefix, target, options, columns)

    load.__name__ = f"load_{prefix}"
    return load


_ROLE_OPTIONS = ("id", "image", "text", "label", "split", "base")
register_source("csv", _make_loader("csv"), "CSV/TSV table of image paths and/or texts",
                options=_ROLE_OPTIONS + ("sep",), example="csv:pairs.csv?text=caption", takes_columns=True)
register_source("jsonl", _make_loader("jsonl"), "JSON-lines table of image paths and/or texts (text may be a list)",
                options=_ROLE_OPTIONS, example="jsonl:pairs.jsonl", takes_columns=True)
register_source("parquet", _make_loader("parquet"), "Parquet table of image paths and/or texts (text may be a list)",
                options=_ROLE_OPTIONS, example="parquet:pairs.parquet", takes_columns=True)
