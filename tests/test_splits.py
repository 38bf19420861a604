"""Hash splits and k-shot sampling: deterministic, order-independent, stable under additions."""

from __future__ import annotations

import warnings

import pandas as pd
import pytest

from encoderlab.data import Dataset, hash_splits, k_shot_sample
from encoderlab.data.splits import check_ratios, unit_hash
from encoderlab.errors import EncoderlabError

RATIOS = {"train": 0.7, "val": 0.1, "test": 0.2}


def _table(n: int, n_classes: int = 4) -> pd.DataFrame:
    return pd.DataFrame({
        "id": [f"item-{i}" for i in range(n)],
        "image": [f"/data/{i}.png" for i in range(n)],
        "texts": [[f"caption {i}"] for i in range(n)],
        "label": [f"c{i % n_classes}" for i in range(n)],
        "split": [None] * n,
    })


def test_unit_hash_is_in_unit_interval_and_seeded():
    values = [unit_hash(f"x{i}", 0) for i in range(1000)]
    assert all(0.0 <= v < 1.0 for v in values)
    assert unit_hash("a", 0) == unit_hash("a", 0)
    assert unit_hash("a", 0) != unit_hash("a", 1)


def test_hash_splits_deterministic_and_ratios_respected():
    ids = [f"item-{i}" for i in range(20000)]
    a = hash_splits(ids, RATIOS, seed=3)
    assert a == hash_splits(ids, RATIOS, seed=3)
    counts = pd.Series(a).value_counts(normalize=True)
    for name, r in RATIOS.items():
        assert abs(counts[name] - r) < 0.015, (name, counts[name])
    assert a != hash_splits(ids, RATIOS, seed=4)


def test_hash_splits_independent_of_row_order():
    ids = [f"item-{i}" for i in range(500)]
    forward = dict(zip(ids, hash_splits(ids, RATIOS)))
    backward = dict(zip(ids[::-1], hash_splits(ids[::-1], RATIOS)))
    assert forward == backward


def test_existing_items_keep_their_split_when_items_are_added():
    ds = Dataset(_table(300)).with_splits(RATIOS, seed=1)
    bigger = Dataset(_table(900)).with_splits(RATIOS, seed=1)
    before = dict(zip(ds.table["id"], ds.table["split"]))
    after = dict(zip(bigger.table["id"], bigger.table["split"]))
    assert all(after[i] == s for i, s in before.items())


def test_zero_ratio_split_gets_nothing():
    out = hash_splits([str(i) for i in range(2000)], {"train": 0.9, "val": 0.0, "test": 0.1})
    assert "val" not in out and set(out) == {"train", "test"}


@pytest.mark.parametrize("bad", [{}, {"train": 0.5, "test": 0.4}, {"train": -0.1, "test": 1.1}, {"train": "x"}])
def test_bad_ratios_fail_with_the_value(bad):
    with pytest.raises(EncoderlabError):
        check_ratios(bad)


def test_with_splits_records_split_info_and_from_split():
    ds = Dataset(_table(400)).with_splits({"train": 0.8, "test": 0.2}, seed=7)
    assert ds.split_info == {"method": "hash", "ratios": {"train": 0.8, "test": 0.2}, "seed": 7}
    test_ids = set(ds.select_split("test").table["id"])
    carved = ds.with_splits({"train": 0.75, "val": 0.25}, seed=7, from_split="train")
    assert set(carved.select_split("test").table["id"]) == test_ids  # untouched
    assert carved.splits == ["test", "train", "val"]
    assert carved.split_info["from_split"] == "train" and carved.split_info["base"]["method"] == "hash"


def test_k_shot_deterministic_nested_and_order_independent():
    table = _table(200).assign(split="train")
    a = k_shot_sample(table, 4, seed=0)
    b = k_shot_sample(table.sample(frac=1.0, random_state=0), 4, seed=0)
    assert sorted(a.table["id"]) == sorted(b.table["id"])
    assert a.table["label"].value_counts().tolist() == [4, 4, 4, 4]
    eight = k_shot_sample(table, 8, seed=0)
    assert set(a.table["id"]) <= set(eight.table["id"])
    assert set(k_shot_sample(table, 4, seed=1).table["id"]) != set(a.table["id"])
    assert a.short_classes == {} and a.note() == ""


def test_k_shot_short_classes_are_taken_whole_and_reported():
    table = _table(10, n_classes=2).assign(split="train")
    table.loc[table["label"] == "c1", "label"] = ["c1", "rare", "c1", "c1", "c1"]
    result = k_shot_sample(table, 3, seed=0)
    assert result.short_classes == {"rare": 1}
    assert "rare" in result.note()
    assert (result.table["label"] == "rare").sum() == 1

    ds = Dataset(table)
    with pytest.warns(UserWarning, match="rare"):
        small = ds.k_shot(3, seed=0)
    assert small.info["k_shot"]["short_classes"] == {"rare": 1}
    assert len(small) == 3 + 3 + 1


def test_k_shot_split_filter_and_errors():
    table = _table(40).assign(split=["train"] * 30 + ["test"] * 10)
    picked = k_shot_sample(table, 2, split="train").table
    assert set(picked["split"]) == {"train"}
    with pytest.raises(EncoderlabError, match="'val'"):
        k_shot_sample(table, 2, split="val")
    with pytest.raises(EncoderlabError, match="k >= 1"):
        k_shot_sample(table, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(Dataset(table).k_shot(2, split=None)) == 8
