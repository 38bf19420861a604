"""Exact-match filters on the label and metadata columns of an index's item table (``?label=cat&split=test``).

A filter value is cast to its column's Arrow type (``?year=2020`` on an integer column), a repeated parameter
means "any of these" (``?label=cat&label=dog``), and different columns must all match. The columns that locate
content (``id``, ``key``, ``image``, ``text``, ``captions``, ``modality``) are not filters: ids have their own
routes, and a path is never something a request can ask about.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..retrieval.items import ItemTable
from .errors import RequestError

#: item columns that are never filters
NOT_FILTERS = ("id", "key", "modality", "image", "text", "captions")
#: distinct values listed per column by ``GET /info``
MAX_LISTED_VALUES = 200


def filter_columns(items: ItemTable) -> list[str]:
    """Columns one can filter on: ``label``, ``split`` and the dataset's scalar metadata columns."""
    import pyarrow as pa

    out = []
    for field in items.table.schema:
        if field.name in NOT_FILTERS or pa.types.is_nested(field.type):
            continue
        if pa.types.is_string(field.type) or pa.types.is_large_string(field.type) or pa.types.is_integer(
                field.type) or pa.types.is_floating(field.type) or pa.types.is_boolean(field.type):
            out.append(field.name)
    return out


def filter_values(items: ItemTable, columns: Iterable[str]) -> dict[str, dict[str, Any]]:
    """For ``GET /info``: each filter column's most common values (at most ``MAX_LISTED_VALUES``) and counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, dict[str, Any]] = {}
    for name in columns:
        counts = pc.value_counts(items.table.column(name).drop_null())
        table = pa.table({"values": counts.field("values"), "counts": counts.field("counts")})
        top = table.sort_by([("counts", "descending"), ("values", "ascending")]).slice(0, MAX_LISTED_VALUES)
        out[name] = {"distinct": len(table), "values": top.column("values").to_pylist(),
                     "counts": top.column("counts").to_pylist()}
    return out


def parse_filters(items: ItemTable, params: list[tuple[str, str]], known: list[str]) -> dict[str, list[Any]]:
    """``[(column, value), ...]`` from the query string -> ``{column: [typed values]}``; unknown columns -> 400."""
    import pyarrow as pa
    import pyarrow.compute as pc

    wanted: dict[str, list[str]] = {}
    for name, value in params:
        wanted.setdefault(name, []).append(value)
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise RequestError(400, f"unknown filter column{'s' if len(unknown) > 1 else ''} "
                                f"{', '.join(map(repr, unknown))}; this index can filter on: "
                                f"{', '.join(known) or 'nothing (its items have no label or metadata)'}",
                           "filter with ?COLUMN=VALUE on one of those columns (GET /info lists their values)",
                           known=known)
    typed: dict[str, list[Any]] = {}
    for name, values in wanted.items():
        kind = items.table.schema.field(name).type
        try:
            typed[name] = pc.cast(pa.array(values, type=pa.string()), kind).to_pylist()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise RequestError(422, f"filter {name}={values!r}: the column holds {kind} values",
                               f"pass {kind} values for {name}") from None
    return typed


def allowed_rows(items: ItemTable, filters: dict[str, list[Any]]) -> np.ndarray | None:
    """Index rows matching every filter (None: no filter, everything allowed)."""
    if not filters:
        return None
    import pyarrow as pa
    import pyarrow.compute as pc

    mask = None
    for name, values in filters.items():
        column = items.table.column(name)
        hit = pc.fill_null(pc.is_in(column, value_set=pa.array(values, type=column.type)), False)
        mask = hit if mask is None else pc.and_(mask, hit)
    return np.asarray(pc.indices_nonzero(mask), dtype=np.int64)
