"""Tabular sources: ``csv:``, ``jsonl:``, ``parquet:`` files listing images and/or texts.

Columns default to ``id``, ``image``, ``text`` (or ``texts``), ``label``, ``split``; remap them with
``columns={"text": "caption"}`` or in the spec (``csv:pairs.csv?text=caption&image=path``); an empty value
(``?split=``) ignores that column. Image paths are relative to the file's directory (or ``?base=DIR``).
Rows naming the same image (or the same ``id``) are grouped into one item whose ``texts`` collect every caption
in file order; rows that disagree on label or split with their group are skipped as ``conflict``.

Cells of the wrong kind are skipped per row as ``bad-value`` in JSON lines (a dict as a caption, a number as an
image path), where every row has its own types; in Parquet a column has one type, so a wrong one (``image`` as
int64, ``text`` as a struct) is an error naming the column, its type and what it should be. Image paths that are not
valid UTF-8 (a Latin-1 file name; the files are read with ``surrogateescape`` so such a name still matches the file
on disk) are skipped as ``bad-filename``; other text that is not valid UTF-8 is skipped as ``bad-value``.
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
from .manifest import CORE_COLUMNS, clean_str, clean_texts, has_invalid_text, safe_text
from .sources import SourceResult, bad_filename, check_path_name, register_source

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
        # surrogateescape: a Latin-1 file name in the CSV keeps its bytes, so that one row is skipped (bad-filename)
        # instead of the whole file failing to decode; dtype=object because arrow-backed strings refuse those bytes.
        frame = pd.read_csv(path, sep=sep, dtype=object, keep_default_na=False, na_values=[], encoding="utf-8",
                            encoding_errors="surrogateescape")
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
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # see _read_csv
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


def _read_parquet(path: Path) -> tuple[list[str], Iterator[tuple[str, dict]], Any]:
    """Column names, rows and the arrow schema (checked against the roles once they are known)."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise EncoderlabError(f"cannot read parquet file {str(path)!r}: {e}",
                              "check that it is a complete Parquet file (re-export it)") from None
    rows = ((f"{path}:row {n}", r) for n, r in enumerate(table.to_pylist()))
    return list(table.column_names), rows, table.schema


def _arrow_kind(t: Any) -> str:
    """``"text"``, ``"number"``, ``"null"``, ``"list-of-text"`` or ``"other"`` for an arrow type."""
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        return _arrow_kind(t.value_type)
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "text"
    if pa.types.is_null(t):
        return "null"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return "list-of-text" if _arrow_kind(t.value_type) in ("text", "null") else "other"
    return "other"


# role -> (accepted kinds, what to tell the user)
_PARQUET_KINDS: dict[str, tuple[frozenset[str], str]] = {
    "image": (frozenset({"text", "null"}), "strings (image file paths)"),
    "text": (frozenset({"text", "null", "list-of-text"}), "strings or lists of strings (captions)"),
    "id": (frozenset({"text", "null", "number"}), "strings or numbers"),
    "label": (frozenset({"text", "null", "number"}), "strings or numbers (class labels)"),
    "split": (frozenset({"text", "null"}), "strings (split names such as train/val/test)"),
}


def check_parquet_types(schema: Any, mapping: Mapping[str, str | None], path: Path) -> None:
    """Fail on a role column of the wrong type, naming the column, its type and what it must hold.

    An error rather than per-row skips: the type belongs to the whole column, so every row would be skipped for
    the same reason, and the usual cause is a column mapped to the wrong role, which the user fixes in the spec.
    """
    for role, col in mapping.items():
        if col is None:
            continue
        t = schema.field(col).type
        accepted, expected = _PARQUET_KINDS[role]
        if _arrow_kind(t) in accepted:
            continue
        hint = ""
        if role == "image" and (str(t).startswith("struct") or "binary" in str(t)):
            hint = "; images stored inside the file are not supported: save them as files and list their paths"
        raise EncoderlabError(
            f"parquet file '{path}': column {col!r} (used as {role}) has type {t}, but {role} must hold {expected}"
            f"{hint}",
            f"map {role} to another column with ?{role}=COLUMN (or ignore it with ?{role}=), or rewrite the column",
        )


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
    check_path_name(path, f"{prefix} file")
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise EncoderlabError(f"{prefix} file {target!r} {what}", f"give the path of a .{prefix} file")
    base = Path(options["base"]).expanduser().absolute() if options.get("base") else path.parent
    check_path_name(base, "image base folder")
    skipped: list[dict[str, Any]] = []
    if prefix == "csv":
        available, rows = _read_csv(path, options)
    elif prefix == "jsonl":
        available, rows = _read_jsonl(path, skipped)
    else:
        available, rows, schema = _read_parquet(path)
    mapping = resolve_columns(available, columns, options, prefix, path)
    if prefix == "parquet":
        check_parquet_types(schema, mapping, path)
    used = {c for c in mapping.values() if c is not None}
    meta_cols = [c for c in available if c not in used]
    # safe_text: a JSON key that is not valid UTF-8 must not break the table (its values are checked per row)
    meta_names = {c: safe_text(f"source_{c}" if c in CORE_COLUMNS or c == "text" else c) for c in meta_cols}

    items: dict[str, dict[str, Any]] = {}
    exists: dict[str, str | None] = {}
    for where, row in rows:
        item = _row_item(row, mapping, base, exists, where, skipped)
        if item is None:
            continue
        bad_meta = next((c for c in meta_cols if has_invalid_text(row.get(c))), None)
        if bad_meta is not None:
            skipped.append(_bad_text(where, bad_meta))
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

    for role in ROLES:
        problem = _wrong_kind(role, get(role))
        if problem:
            skipped.append({"path": where, "reason": "bad-value", "detail": f"column {mapping[role]!r} ({role}) "
                            f"holds {problem}"})
            return None
    image_rel = clean_str(get("image"))
    texts = clean_texts(get("text"))
    image = None
    if image_rel is not None:
        image = os.path.normpath(image_rel if os.path.isabs(image_rel) else os.path.join(base, image_rel))
        if has_invalid_text(image):
            entry = bad_filename(image)
            entry["detail"] = f"row {where}: {entry['detail']}"
            skipped.append(entry)
            return None
        if image not in exists:
            exists[image] = None if os.path.isfile(image) else ("is-a-directory" if os.path.isdir(image) else "missing")
        problem = exists[image]
        if problem:
            skipped.append({"path": image, "reason": problem, "detail": f"row {where}"})
            return None
    elif not texts:
        skipped.append({"path": where, "reason": "empty-row", "detail": "no image and no text"})
        return None
    bad_role = next((r for r in ROLES if r != "image" and has_invalid_text(get(r))), None)
    if bad_role is not None:
        skipped.append(_bad_text(where, str(mapping[bad_role])))
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


def _wrong_kind(role: str, value: Any) -> str:
    """What is wrong with a cell's kind for ``role`` ("" when fine): an image path must be a string; captions
    strings (or lists of them); id, label and split single values, not lists or objects."""
    if value is None or isinstance(value, str):
        return ""
    if role == "image":
        return f"a {_kind_name(value)} ({_short(value)}), not an image file path"
    if role == "text":
        items = value if isinstance(value, (list, tuple)) else [value]
        odd = next((t for t in items if isinstance(t, (dict, list, tuple))), None)
        if isinstance(value, dict) or odd is not None:
            return f"a {_kind_name(value)} ({_short(value)}), not a caption or a list of captions"
        return ""
    if isinstance(value, (dict, list, tuple)):
        return f"a {_kind_name(value)} ({_short(value)}), not a single value"
    return ""


def _kind_name(value: Any) -> str:
    names = {dict: "JSON object", list: "list", tuple: "list", bool: "true/false value", int: "number",
             float: "number"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any, n: int = 40) -> str:
    text = safe_text(json.dumps(value, default=str, ensure_ascii=False) if not isinstance(value, str) else value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _bad_text(where: str, column: str) -> dict[str, Any]:
    return {"path": where, "reason": "bad-value",
            "detail": f"column {safe_text(column)!r} holds text that is not valid UTF-8; save the file as UTF-8"}


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
