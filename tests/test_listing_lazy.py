"""A large Parquet listing stays compact: ids and image paths Arrow-backed, not one Python object per cell.

Issue 12 §2: listing a 10M-row parquet must not load every image path into Python objects at once. The memory test
lists 200k rows under tracemalloc (which sees Python objects and numpy buffers, not Arrow's own allocations):
the per-row listing that made every cell a Python object traced ~175 MB here, the vectorised one ~55 MB.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import encoderlab.data.tabular as tabular
from encoderlab.data import load_dataset
from encoderlab.data.manifest import is_arrow_text

ROWS = 200_000
FILES = 50
BOUND_MB = 100  # the object-per-cell listing traced ~175 MB for these rows


def _big_parquet(tmp_path, n: int = ROWS):
    for i in range(FILES):
        (tmp_path / f"{i:03d}.png").write_bytes(b"\x89PNG")
    idx = pa.array(np.arange(n, dtype=np.int64))
    num = pc.cast(idx, pa.string())
    pq.write_table(pa.table({
        "id": pc.binary_join_element_wise("item-", num, ""),
        "image": pc.binary_join_element_wise(pc.utf8_lpad(pc.cast(pc.remainder(idx, FILES), pa.string()), 3, "0"),
                                             ".png", ""),
        "caption": pc.binary_join_element_wise("a photo of thing number ", num, ""),
        "label": pc.binary_join_element_wise("class-", pc.cast(pc.remainder(idx, 7), pa.string()), ""),
    }), tmp_path / "big.parquet")
    return tmp_path / "big.parquet"


def test_listed_ids_and_paths_are_arrow_backed(tmp_path):
    path = _big_parquet(tmp_path, 1000)
    ds = load_dataset(f"parquet:{path}?text=caption")
    t = ds.table
    for col in ("id", "image", "label"):
        assert is_arrow_text(t[col]), (col, t[col].dtype)
    assert t["image"].dtype != object
    assert t["image"].iloc[3] == str(tmp_path / "003.png") and isinstance(t["image"].iloc[3], str)
    assert t["texts"].iloc[3] == ["a photo of thing number 3"]
    assert t["id"].tolist()[:2] == ["item-0", "item-1"]
    assert ds.splits == ["test", "train", "val"]  # hash splits by id, as before


def test_200k_rows_list_within_a_memory_bound(tmp_path):
    path = _big_parquet(tmp_path)
    tracemalloc.start()
    try:
        ds = load_dataset(f"parquet:{path}?text=caption", splits=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(ds) == ROWS and is_arrow_text(ds.table["image"])
    assert peak < BOUND_MB * 2**20, f"listing {ROWS} rows traced {peak / 2**20:.0f} MB of Python/numpy memory"


def _both_paths(monkeypatch, spec):
    fast = load_dataset(spec, splits=False)
    monkeypatch.setattr(tabular, "list_arrow_table", lambda *a, **k: None)
    slow = load_dataset(spec, splits=False)
    monkeypatch.undo()
    return fast, slow


def _plain(table: pd.DataFrame) -> dict:
    return table.astype(object).where(table.notna(), None).to_dict("list")


@pytest.mark.parametrize("base", [False, True])
def test_vectorised_listing_matches_the_per_row_rules(tmp_path, monkeypatch, base):
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png", "d.png"):
        (tmp_path / "imgs" / name).write_bytes(b"x")
    pd.DataFrame({
        "image": ["imgs/a.png", "./imgs/b.png", "imgs//c.png", str(tmp_path / "imgs" / "d.png"), "imgs/gone.png",
                  "imgs/sub", None, "", "imgs/../imgs/a.png"],
        "text": ["x", "  ", None, "y", "z", "w", "only text", None, "dup"],
        "id": ["i1", "i2", "i3", None, "i5", "i6", "i7", "i8", "i9"],
        "label": [" cat", "dog ", "  ", None, "x", "y", "z", "q", "r"],
        "w": range(9),
    }).to_parquet(tmp_path / "m.parquet")
    spec = f"parquet:{tmp_path / 'm.parquet'}" + (f"?base={tmp_path}" if base else "")
    fast, slow = _both_paths(monkeypatch, spec)
    assert _plain(fast.table) == _plain(slow.table)
    assert fast.skipped == slow.skipped
    assert [s["reason"] for s in fast.skipped] == ["missing", "is-a-directory", "empty-row"]
    assert is_arrow_text(fast.table["id"])


def test_lists_of_captions_and_image_ids_match_the_per_row_rules(tmp_path, monkeypatch):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    pd.DataFrame({
        "image": ["a.png", "b.png", str(tmp_path / "c.png"), "/elsewhere/x.png"],
        "text": [["a", "a", " "], [], None, ["q"]],
        "label": [1, 2, 3, 4],
        "split": ["train", "test", " val ", "train"],
    }).to_parquet(tmp_path / "m.parquet")
    fast, slow = _both_paths(monkeypatch, f"parquet:{tmp_path / 'm.parquet'}")
    assert _plain(fast.table) == _plain(slow.table)
    assert fast.table["texts"].tolist() == [["a"], [], []]
    assert fast.table["id"].tolist() == ["a.png", "b.png", "c.png"]
    assert fast.skipped == slow.skipped and fast.skipped[0]["reason"] == "missing"


def test_grouped_rows_still_take_the_per_row_path(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    pd.DataFrame({"image": ["a.png", "a.png", "a.png"], "text": ["one", "two", "three"],
                  "label": ["x", "x", "y"]}).to_parquet(tmp_path / "m.parquet")
    ds = load_dataset(f"parquet:{tmp_path / 'm.parquet'}", splits=False)
    assert ds.table["texts"].tolist() == [["one", "two"]]
    assert [s["reason"] for s in ds.skipped] == ["conflict"]
