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

A Parquet file whose items are one row each is listed with Arrow compute (``list_arrow_table``): ids and image paths
stay Arrow-backed strings, each distinct image path is checked once, and only the captions become Python lists; the
rules above (and so the items, ids, order and skips) are the same. Files that need the per-row rules (grouped rows,
text-only rows without ids, float or boolean role columns, nested metadata) are read a record batch at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import EncoderlabError, close_matches
from ..hashing import bytes_digest
from .manifest import ARROW_STR, CORE_COLUMNS, clean_str, clean_texts, has_invalid_text, safe_text
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


def _read_parquet(path: Path) -> Any:
    """The file as an Arrow table (its string columns stay Arrow buffers, not Python objects)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
        pa.default_memory_pool().release_unused()  # decoding buffers the allocator would otherwise keep
        return table
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a damaged file
        raise EncoderlabError(f"cannot read parquet file {str(path)!r}: {e}",
                              "check that it is a complete Parquet file (re-export it)") from None


def _arrow_rows(path: Path, table: Any) -> Iterator[tuple[str, dict]]:
    """The rows of an Arrow table as dicts, one record batch converted at a time (not the whole file at once)."""
    n = 0
    for batch in table.to_batches(max_chunksize=65_536):
        for r in batch.to_pylist():
            yield f"{path}:row {n}", r
            n += 1


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
        arrow = _read_parquet(path)
        available, rows = list(arrow.column_names), _arrow_rows(path, arrow)
    mapping = resolve_columns(available, columns, options, prefix, path)
    if prefix == "parquet":
        check_parquet_types(arrow.schema, mapping, path)
    used = {c for c in mapping.values() if c is not None}
    meta_cols = [c for c in available if c not in used]
    # safe_text: a JSON key that is not valid UTF-8 must not break the table (its values are checked per row)
    meta_names = {c: safe_text(f"source_{c}" if c in CORE_COLUMNS or c == "text" else c) for c in meta_cols}
    info = {"columns": {r: mapping[r] for r in ROLES}, "base": str(base)}
    if prefix == "parquet":
        listed = list_arrow_table(arrow, mapping, base, str(path), meta_names)
        if listed is not None:
            return SourceResult(listed[0], path.parent, listed[1], info)

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


# ----------------------------------------------------------------------------- parquet: a vectorised listing

#: a path ``os.path.normpath`` would change: "." or ".." parts, doubled or trailing slashes
_UNNORMAL = r"(^|/)\.\.?(/|$)|//|/$"
#: metadata column kinds the vectorised listing carries over as they are (nested values take the per-row path)
_FLAT_KINDS = ("text", "number", "null")
_EXISTS_CHUNK = 65_536


def list_arrow_table(table: Any, mapping: Mapping[str, str | None], base: Path, where: str,
                     meta_names: Mapping[str, str]) -> tuple[pd.DataFrame, list[dict[str, Any]]] | None:
    """Manifest rows and skips of a Parquet table by Arrow compute: no Python object per cell but the captions.

    The result is the per-row listing's (same items, ids, order and skips) for tables whose items are one row each;
    None when the rules need the per-row path: rows grouped by a shared id or image, text-only rows without an id
    (their id is a digest of the captions), a float or boolean role column, or a nested metadata column. The
    ``id`` column, and ``image``/``label``/``split`` when no cell is empty, come back as Arrow-backed strings.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = _role_columns(table, mapping)
    if cols is None or any(_arrow_kind(table.schema.field(c).type) not in _FLAT_KINDS for c in meta_names):
        return None
    n = table.num_rows
    texts = _row_texts(cols["text"])
    has_text = np.fromiter(map(bool, texts), dtype=bool, count=n)
    image, plain = _image_paths(cols["image"], base)
    has_image = _valid(image)
    has_id = _valid(cols["id"])
    if (~has_image & ~has_id & has_text).any():
        return None
    problem = _image_problems(image)
    empty = ~has_image & ~has_text
    keep = (problem == 0) & ~empty
    ids = _item_ids(cols["id"], has_id, image, cols["image"], plain, base)
    rows = (lambda c: c) if keep.all() else (lambda c, m=pa_mask(keep): c.filter(m))  # no copy when all kept
    keys = rows(cols["id"] if has_id.all() else pc.if_else(has_id, cols["id"], image))
    if len(pc.unique(keys)) != len(keys):
        return None  # rows that share an id or an image are grouped (and checked for conflicts) per row
    del keys, cols["text"]
    pa.default_memory_pool().release_unused()  # the allocator keeps freed pages otherwise
    frame = pd.DataFrame({"id": _strings(rows(ids)), "image": _strings(rows(image)),
                          "texts": pd.Series(texts if keep.all() else texts[keep], dtype=object),
                          "label": _strings(rows(cols["label"])), "split": _strings(rows(cols["split"]))})
    if meta_names:
        meta = rows(_undictionary(table.select(list(meta_names)))).to_pandas().rename(columns=dict(meta_names))
        frame = pd.concat([frame, meta], axis=1)
    return frame, _arrow_skips(where, image, problem, empty)


def _undictionary(table: Any) -> Any:
    """Dictionary-encoded columns as plain values (as the per-row path gives them, not pandas categoricals)."""
    import pyarrow as pa

    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def pa_mask(values: Any) -> Any:
    import pyarrow as pa

    return pa.array(values, type=pa.bool_())


def _valid(column: Any) -> Any:
    return column.is_valid().to_numpy(zero_copy_only=False)


def _role_columns(table: Any, mapping: Mapping[str, str | None]) -> dict[str, Any] | None:
    """Each role as an Arrow string column, empty cells null (label and split trimmed); None: per-row path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, Any] = {}
    for role in ROLES:
        col = mapping[role]
        if col is None:
            out[role] = pa.chunked_array([pa.nulls(table.num_rows, pa.large_string())])
            continue
        arr, t = table.column(col), table.schema.field(col).type
        if pa.types.is_null(t) or (pa.types.is_integer(t) and role in ("id", "label", "split")):
            arr = arr.cast(pa.large_string())  # str(int) is what the per-row path makes of a number
        elif role == "text" and _arrow_kind(t) == "list-of-text" and not pa.types.is_dictionary(t.value_type):
            out[role] = arr
            continue
        elif _arrow_kind(t) != "text":
            return None
        elif role == "text":
            out[role] = arr  # only read cell by cell into captions: no copy
            continue
        arr = arr.cast(pa.large_string())
        if role in ("label", "split"):
            arr = pc.utf8_trim_whitespace(arr)
        if pc.any(pc.equal(arr, "")).as_py():
            arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.large_string()), arr)
        out[role] = arr
    return out


def _row_texts(column: Any) -> np.ndarray:
    """Each row's captions as the per-row path makes them (non-blank, each once), a batch at a time."""
    out = np.empty(len(column), dtype=object)
    at = 0
    for chunk in column.chunks:
        for start in range(0, len(chunk), _EXISTS_CHUNK):
            values = chunk.slice(start, _EXISTS_CHUNK).to_pylist()
            if _arrow_kind(chunk.type) in ("text", "null"):
                lists = [[v] if v is not None and v.strip() else [] for v in values]
            else:
                lists = [list(dict.fromkeys(t for t in v if t is not None and t.strip())) if v else []
                         for v in values]
            out[at:at + len(lists)] = np.fromiter(lists, dtype=object, count=len(lists))
            at += len(lists)
    return out


def _image_paths(rel: Any, base: Path) -> tuple[Any, Any]:
    """(normalised absolute image paths, a mask of the relative cells that needed no normalising)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    root = os.path.normpath(str(base))
    is_abs = pc.starts_with(rel, "/")
    odd = pc.fill_null(pc.match_substring_regex(rel, _UNNORMAL), False)
    joined = pc.binary_join_element_wise(pa.scalar(root.rstrip("/") + "/", pa.large_string()), rel,
                                         pa.scalar("", pa.large_string()))
    image = pc.if_else(is_abs, rel, joined)
    plain = ~(pc.fill_null(is_abs, False).to_numpy(zero_copy_only=False) | odd.to_numpy(zero_copy_only=False))
    fix = odd.to_numpy(zero_copy_only=False)
    if fix.any():
        idx = np.flatnonzero(fix)
        new = [os.path.normpath(r if os.path.isabs(r) else os.path.join(base, r)) for r in rel.take(idx).to_pylist()]
        image = pc.replace_with_mask(image.combine_chunks(), pa_mask(fix), pa.array(new, pa.large_string()))
    return pa.chunked_array([image]) if not isinstance(image, pa.ChunkedArray) else image, plain


def _image_problems(image: Any) -> Any:
    """Per row 0 (a file, or no image), 1 missing, 2 a directory: each distinct path is checked once."""
    import pyarrow.compute as pc

    uniq = pc.unique(image.drop_null())
    codes = np.zeros(len(uniq), dtype=np.int8)
    for start in range(0, len(uniq), _EXISTS_CHUNK):
        for i, p in enumerate(uniq.slice(start, _EXISTS_CHUNK).to_pylist(), start):
            if not os.path.isfile(p):
                codes[i] = 2 if os.path.isdir(p) else 1
    at = pc.index_in(image, value_set=uniq).to_numpy(zero_copy_only=False)
    out = np.zeros(len(at), dtype=np.int8)
    ok = ~np.isnan(at) if at.dtype.kind == "f" else np.ones(len(at), dtype=bool)
    out[ok] = codes[at[ok].astype(np.int64)]
    return out


def _item_ids(raw: Any, has_id: Any, image: Any, rel: Any, plain: Any, base: Path) -> Any:
    """The id cell, else the image path relative to ``base`` (the absolute path when it lies outside): the cell
    itself when it was a plain relative path."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if has_id.all():
        return raw
    ids = pc.if_else(pa_mask(has_id), raw, rel).combine_chunks()
    odd = ~has_id & _valid(image) & ~plain
    if odd.any():
        new = []
        for p in image.take(np.flatnonzero(odd)).to_pylist():
            r = os.path.relpath(p, base)
            new.append(Path(r).as_posix() if not r.startswith("..") else p)
        ids = pc.replace_with_mask(ids, pa_mask(odd), pa.array(new, pa.large_string()))
    return pa.chunked_array([ids]) if not isinstance(ids, pa.ChunkedArray) else ids


def _strings(column: Any) -> pd.Series:
    """An Arrow string column as pandas: Arrow-backed when every cell is set, else objects with None."""
    import pyarrow as pa

    if column.null_count == 0:
        return column.to_pandas(types_mapper=lambda t: ARROW_STR if pa.types.is_large_string(t) else None)
    return pd.Series(column.to_numpy(zero_copy_only=False), dtype=object)


def _arrow_skips(where: str, image: Any, problem: Any, empty: Any) -> list[dict[str, Any]]:
    """The skip entries of missing / directory images and empty rows, in row order."""
    out: list[dict[str, Any]] = []
    bad = np.flatnonzero((problem > 0) | empty)
    paths = image.take(bad).to_pylist() if len(bad) else []
    for i, p in zip(bad.tolist(), paths):
        if empty[i]:
            out.append({"path": f"{where}:row {i}", "reason": "empty-row", "detail": "no image and no text"})
        else:
            reason = "missing" if problem[i] == 1 else "is-a-directory"
            out.append({"path": p, "reason": reason, "detail": f"row {where}:row {i}"})
    return out


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
