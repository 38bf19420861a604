"""``items.parquet``: what each FAISS row is — dataset item id, store key, image path, caption(s), label, split.

Row i of the table is row i of the index. The table is read into Arrow once and stays there: a search result
gathers its rows with one Arrow ``take``, and filters are Arrow comparisons, so neither does Python work per item
and neither converts the whole table; ``column`` turns one column into numpy when a caller wants all of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

ITEMS_NAME = "items.parquet"
#: the columns every index has, in this order; dataset metadata columns follow
ITEM_COLUMNS = ("id", "key", "modality", "image", "text", "captions", "label", "split")


def item_frame(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with the item columns in order (missing ones as None) and the rest after them."""
    t = table.reset_index(drop=True)
    for col in ITEM_COLUMNS:
        if col not in t.columns:
            t[col] = None
    if t["id"].isna().any() or t["key"].isna().any():
        raise ValueError("every index item needs an id and a store key")
    t["id"] = t["id"].astype(str)
    t["key"] = t["key"].astype(str)
    extra = [c for c in t.columns if c not in ITEM_COLUMNS]
    return t[list(ITEM_COLUMNS) + extra]


class ItemTable:
    """The items of an index, one per FAISS row, with vectorised lookups by row, id and key."""

    def __init__(self, table: Any) -> None:
        import pyarrow as pa

        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(_arrow_safe(item_frame(table)), preserve_index=False)
        self.table = table
        self._columns: dict[str, np.ndarray | list] = {}
        self._key_index: pd.Index | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> ItemTable:
        import pyarrow.parquet as pq

        return cls(pq.read_table(str(path), memory_map=True))

    def write(self, path: str | os.PathLike) -> None:
        import pyarrow.parquet as pq

        pq.write_table(self.table, str(path))

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def names(self) -> list[str]:
        return list(self.table.column_names)

    def column(self, name: str) -> np.ndarray | list:
        """One column for the whole index: numpy (object for strings), Python lists for list columns."""
        col = self._columns.get(name)
        if col is None:
            import pyarrow as pa

            arrow = self.table.column(name)
            if pa.types.is_list(arrow.type) or pa.types.is_large_list(arrow.type):
                col = np.empty(len(arrow), dtype=object)
                col[:] = arrow.to_pylist()
            else:
                col = arrow.to_numpy(zero_copy_only=False)
            self._columns[name] = col
        return col

    def take(self, rows: np.ndarray, columns: Sequence[str] | None = None) -> dict[str, list]:
        """``{column: values of rows}`` as Python lists (JSON-ready), gathered by Arrow in one call per table:
        the cost follows ``len(rows)``, not the size of the index."""
        import pyarrow as pa

        picked = self.table.select(list(columns or self.names)).take(pa.array(np.asarray(rows, dtype=np.int64)))
        return {c: picked.column(c).to_pylist() for c in picked.column_names}

    def rows_of_id(self, item_id: str) -> np.ndarray:
        """Rows of the index that belong to dataset item ``item_id`` (several for a text index: one per caption)."""
        return self.rows_where(id=str(item_id))

    def rows_where(self, **equals: Any) -> np.ndarray:
        """Rows whose columns equal the given values (``label="cat", split="test"``): a filter for searches."""
        import pyarrow.compute as pc

        mask = None
        for name, value in equals.items():
            hit = pc.fill_null(pc.equal(self.table.column(name), value), False)
            mask = hit if mask is None else pc.and_(mask, hit)
        if mask is None:
            return np.arange(len(self), dtype=np.int64)
        return np.asarray(pc.indices_nonzero(mask), dtype=np.int64)

    def find_keys(self, keys: Sequence[str]) -> np.ndarray:
        """Row of each key in the index, -1 where absent."""
        if self._key_index is None:
            self._key_index = pd.Index(self.column("key"))
        return np.asarray(self._key_index.get_indexer(pd.Index(list(keys), dtype=object)), dtype=np.int64)

    def appended(self, frame: pd.DataFrame) -> ItemTable:
        """This table with ``frame``'s items after its rows (new columns are filled with nulls)."""
        old = self.table.to_pandas()
        return ItemTable(pd.concat([old, item_frame(frame)], ignore_index=True, sort=False))

    def to_frame(self) -> pd.DataFrame:
        return self.table.to_pandas()


def _arrow_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object metadata columns arrow cannot type (mixed ints and strings) become strings; list columns stay."""
    import pyarrow as pa

    out = frame.copy()
    for col in out.columns:
        if out[col].dtype != object or col == "captions":
            continue
        try:
            pa.array(out[col])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            out[col] = [None if v is None else str(v) for v in out[col]]
    out["captions"] = [list(v) if v is not None else [] for v in out["captions"]]
    return out
