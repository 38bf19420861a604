"""Sources -> Dataset: folder trees, csv/jsonl/parquet tables, the spec parser, and the Dataset API."""

from __future__ import annotations

import json
import os

import pandas as pd
import pytest
from PIL import Image

from encoderlab.data import CORE_COLUMNS, Dataset, list_sources, load_dataset, parse_source_spec
from encoderlab.errors import EncoderlabError, UnknownNameError


def _img(path, color=(200, 10, 10)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), color).save(path)
    return str(path)


# ---------------------------------------------------------------------------------------------------- spec


def test_parse_spec_prefixes_options_and_bare_paths(tmp_path):
    p = parse_source_spec("csv:data/pairs.csv?image=img_path&text=caption")
    assert (p.prefix, p.target, p.options) == ("csv", "data/pairs.csv", {"image": "img_path", "text": "caption"})
    assert parse_source_spec("emoji:subcategory").target == "subcategory"
    assert parse_source_spec("openclipart").prefix == "openclipart"
    assert parse_source_spec(str(tmp_path)).prefix == "folder"
    (tmp_path / "t.jsonl").write_text("{}\n")
    assert parse_source_spec(str(tmp_path / "t.jsonl")).prefix == "jsonl"
    assert {"folder", "csv", "jsonl", "parquet", "openclipart", "emoji", "fashion-mnist"} <= set(list_sources())


def test_unknown_prefix_suggests_close_match():
    with pytest.raises(UnknownNameError) as info:
        parse_source_spec("fodler:/data/x")
    assert "'fodler:'" in str(info.value) and "folder:" in str(info.value)
    with pytest.raises(UnknownNameError, match="emoji"):
        parse_source_spec("emojis")


def test_unknown_option_suggests_close_match():
    with pytest.raises(EncoderlabError, match="did you mean 'text'"):
        parse_source_spec("csv:x.csv?txt=caption")


# ---------------------------------------------------------------------------------------------------- folder


def test_folder_without_splits_gets_hash_splits(tmp_path):
    for c in ("cat", "dog"):
        for i in range(10):
            _img(tmp_path / c / f"{i}.png")
    _img(tmp_path / "dog" / "puppies" / "p1.jpg")  # nested images belong to the class folder
    (tmp_path / "cat" / "README.txt").write_text("not an image")
    (tmp_path / "cat" / ".DS_Store").write_bytes(b"\0")
    ds = load_dataset(f"folder:{tmp_path}", seed=0)
    assert list(ds.table.columns[:5]) == list(CORE_COLUMNS)
    assert len(ds) == 21 and ds.classes == ["cat", "dog"]
    assert ds.split_info["method"] == "hash" and set(ds.splits) <= {"train", "val", "test"}
    nested = ds.table.set_index("id").loc["dog/puppies/p1.jpg"]
    assert nested["label"] == "dog" and nested["subfolder"] == "puppies"
    assert all(os.path.isabs(p) for p in ds.table["image"])
    assert [s["reason"] for s in ds.skipped] == ["not-an-image"]  # .DS_Store (hidden) is ignored
    summary = ds.summary()
    assert summary["items"] == 21 and summary["per_class"] == {"cat": 10, "dog": 11}
    assert summary["skipped_by_reason"] == {"not-an-image": 1}
    assert sum(summary["per_split"].values()) == 21


def test_folder_with_split_folders(tmp_path):
    for split, n in (("train", 4), ("validation", 2), ("test", 3)):
        for c in ("a", "b"):
            for i in range(n):
                _img(tmp_path / split / c / f"{i}.png")
    _img(tmp_path / "stray.png")
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.splits == ["test", "train", "val"]
    assert ds.split_info["method"] == "source"
    assert len(ds.select_split("val")) == 4 and len(ds.select_split("train")) == 8
    assert ds.table.set_index("id").loc["validation/a/0.png", "split"] == "val"
    assert {s["reason"] for s in ds.skipped} == {"not-in-a-class-folder"}
    with pytest.raises(EncoderlabError) as info:
        ds.select_split("tets")
    assert "'tets'" in str(info.value) and "test" in str(info.value) and "train" in str(info.value)
    resplit = load_dataset(f"folder:{tmp_path}", splits={"train": 0.5, "test": 0.5})
    assert resplit.split_info["method"] == "hash" and set(resplit.splits) <= {"train", "test"}
    assert load_dataset(str(tmp_path), splits=False).splits == []


def test_empty_class_folder_fails_naming_it(tmp_path):
    _img(tmp_path / "cat" / "1.png")
    (tmp_path / "dog").mkdir()
    (tmp_path / "dog" / "notes.txt").write_text("x")
    with pytest.raises(EncoderlabError) as info:
        load_dataset(f"folder:{tmp_path}")
    assert "'dog'" in str(info.value) and "no usable images" in str(info.value)


def test_empty_and_missing_folder(tmp_path):
    with pytest.raises(EncoderlabError, match="no usable items"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(EncoderlabError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")


def test_unlabelled_image_folder_and_dangling_symlink(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.jpg")
    os.symlink(tmp_path / "gone.png", tmp_path / "c.png")
    ds = load_dataset(f"folder:{tmp_path}", splits=False)
    assert len(ds) == 2 and ds.classes == [] and ds.table["label"].isna().all()
    assert ds.skipped[0]["reason"] == "missing"


def test_folder_follows_symlinked_dirs_without_looping(tmp_path):
    _img(tmp_path / "cat" / "1.png")
    os.symlink(tmp_path / "cat", tmp_path / "cat" / "loop")
    ds = load_dataset(f"folder:{tmp_path}", splits=False)
    assert len(ds) == 1 and ds.skipped[0]["reason"] == "symlink-loop"


def test_unreadable_subfolder_is_reported_not_dropped(tmp_path, monkeypatch):
    _img(tmp_path / "cat" / "1.png")
    _img(tmp_path / "cat" / "locked" / "2.png")
    real_scandir = os.scandir

    def scandir(path):  # tests run as root, where chmod 000 does not block listing
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    ds = load_dataset(f"folder:{tmp_path}", splits=False)
    assert len(ds) == 1
    locked = str(tmp_path / "cat" / "locked")
    assert ds.skipped == [{"path": locked, "reason": "unreadable", "detail": "Permission denied"}]


# ---------------------------------------------------------------------------------------------------- tables


def _pairs_tree(tmp_path):
    _img(tmp_path / "imgs" / "a.png")
    _img(tmp_path / "imgs" / "b.png")
    _img(tmp_path / "imgs" / "c.png")
    return tmp_path


def test_csv_with_column_mapping_grouping_and_missing_files(tmp_path):
    _pairs_tree(tmp_path)
    pd.DataFrame({
        "img_path": ["imgs/a.png", "imgs/b.png", "imgs/a.png", "imgs/missing.png", "imgs/c.png", "imgs/c.png"],
        "caption": ["a red square", "another one", "a small red tile", "lost", "c", "c"],
        "category": ["red", "red", "red", "red", "blue", "green"],
        "photographer": ["ann", "bob", "ann", "cy", "dee", "dee"],
    }).to_csv(tmp_path / "pairs.csv", index=False)
    ds = load_dataset(f"csv:{tmp_path / 'pairs.csv'}?image=img_path&text=caption&label=category", splits=False)
    t = ds.table.set_index("id")
    assert list(t.index) == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    assert t.loc["imgs/a.png", "texts"] == ["a red square", "a small red tile"]
    assert t.loc["imgs/a.png", "image"] == str(tmp_path / "imgs" / "a.png")
    assert t.loc["imgs/a.png", "photographer"] == "ann"
    reasons = {s["reason"] for s in ds.skipped}
    assert reasons == {"missing", "conflict"}  # missing file; c.png labelled blue and green
    missing = next(s for s in ds.skipped if s["reason"] == "missing")
    assert missing["path"].endswith("missing.png") and "pairs.csv:5" in missing["detail"]
    flat = ds.texts_flat()
    assert len(flat) == 4 and flat.loc[flat["id"] == "imgs/a.png", "text_index"].tolist() == [0, 1]


def test_columns_argument_same_as_query(tmp_path):
    _pairs_tree(tmp_path)
    pd.DataFrame({"path": ["imgs/a.png"], "caption": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    a = load_dataset(f"csv:{tmp_path / 'p.csv'}", columns={"image": "path", "text": "caption"}, splits=False)
    b = load_dataset(f"csv:{tmp_path / 'p.csv'}?image=path&text=caption", splits=False)
    pd.testing.assert_frame_equal(a.table, b.table)


def test_missing_column_error_names_column_available_and_option(tmp_path):
    _pairs_tree(tmp_path)
    pd.DataFrame({"img_path": ["imgs/a.png"], "caption": ["x"]}).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(EncoderlabError) as info:
        load_dataset(f"csv:{tmp_path / 'p.csv'}?image=img_path&text=captions")
    msg = str(info.value)
    assert "'captions'" in msg and "'img_path'" in msg and "'caption'" in msg and "?text=" in msg
    with pytest.raises(EncoderlabError) as info:
        load_dataset(f"csv:{tmp_path / 'p.csv'}")  # defaults: neither 'image' nor 'text' present
    assert "?image=" in str(info.value) and "img_path" in str(info.value)


def test_jsonl_lists_of_captions_text_only_and_bad_rows(tmp_path):
    rows = [
        {"text": "great movie", "label": "pos"},
        {"text": "awful", "label": "neg", "split": "test"},
    ]
    lines = [json.dumps(r) for r in rows] + ["{not json", "[1, 2]", json.dumps({"text": "", "label": "pos"})]
    (tmp_path / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EncoderlabError, match="have no split"):
        load_dataset(f"jsonl:{tmp_path / 'reviews.jsonl'}")
    ds = load_dataset(f"jsonl:{tmp_path / 'reviews.jsonl'}", splits={"train": 0.5, "test": 0.5})
    assert len(ds) == 2 and ds.table["image"].isna().all() and ds.classes == ["neg", "pos"]
    assert all(i.startswith("t") for i in ds.table["id"])
    assert sorted(s["reason"] for s in ds.skipped) == ["bad-row", "bad-row", "empty-row"]
    again = load_dataset(f"jsonl:{tmp_path / 'reviews.jsonl'}", splits=False)
    twice = load_dataset(f"jsonl:{tmp_path / 'reviews.jsonl'}", splits=False)
    assert list(again.table["id"]) == list(twice.table["id"])

    _pairs_tree(tmp_path)
    (tmp_path / "pairs.jsonl").write_text(
        json.dumps({"id": "A", "image": "imgs/a.png", "text": ["one", "two"]}) + "\n"
        + json.dumps({"id": "A", "image": "imgs/a.png", "text": "three"}) + "\n"
        + json.dumps({"id": "B", "image": str(tmp_path / "imgs" / "b.png")}) + "\n"
    )
    pairs = load_dataset(f"jsonl:{tmp_path / 'pairs.jsonl'}", splits=False)
    t = pairs.table.set_index("id")
    assert t.loc["A", "texts"] == ["one", "two", "three"] and t.loc["B", "texts"] == []


def test_parquet_source_with_relative_paths_and_numeric_labels(tmp_path):
    _pairs_tree(tmp_path)
    sub = tmp_path / "meta"
    sub.mkdir()
    pd.DataFrame({
        "image": ["../imgs/a.png", "../imgs/b.png"],
        "text": [["x", "y"], ["z"]],
        "label": [1, 2],
        "split": ["train", "test"],
        "width": [4, 4],
    }).to_parquet(sub / "m.parquet")
    ds = load_dataset(f"parquet:{sub / 'm.parquet'}")
    assert ds.split_info["method"] == "source" and ds.splits == ["test", "train"]
    assert ds.classes == ["1", "2"]
    assert ds.table["image"].tolist() == [str(tmp_path / "imgs" / "a.png"), str(tmp_path / "imgs" / "b.png")]
    assert ds.table["texts"].tolist() == [["x", "y"], ["z"]]
    assert "width" in ds.metadata_columns()


def test_csv_image_only_and_base_option(tmp_path):
    _pairs_tree(tmp_path)
    (tmp_path / "lists").mkdir()
    pd.DataFrame({"image": ["a.png", "b.png"], "label": ["x", "y"]}).to_csv(tmp_path / "lists" / "l.csv", index=False)
    ds = load_dataset(f"csv:{tmp_path / 'lists' / 'l.csv'}?base={tmp_path / 'imgs'}", splits=False)
    assert len(ds) == 2 and not ds.has_texts and ds.has_images


def test_tsv_and_sep_option(tmp_path):
    _pairs_tree(tmp_path)
    (tmp_path / "a.tsv").write_text("image\ttext\nimgs/a.png\thello, world\n")
    assert load_dataset(f"csv:{tmp_path / 'a.tsv'}", splits=False).table["texts"][0] == ["hello, world"]
    (tmp_path / "b.csv").write_text("image;text\nimgs/a.png;hi\n")
    assert load_dataset(f"csv:{tmp_path / 'b.csv'}?sep=;", splits=False).table["texts"][0] == ["hi"]


def test_metadata_column_named_like_a_core_column_is_kept_renamed(tmp_path):
    _pairs_tree(tmp_path)
    pd.DataFrame({"image": ["imgs/a.png"], "label": ["raw"], "cls": ["mapped"]}).to_csv(tmp_path / "x.csv", index=False)
    ds = load_dataset(f"csv:{tmp_path / 'x.csv'}?label=cls", splits=False)
    assert ds.table["label"][0] == "mapped" and ds.table["source_label"][0] == "raw"


def test_columns_rejected_for_non_tabular_sources(tmp_path):
    _img(tmp_path / "a" / "1.png")
    with pytest.raises(EncoderlabError, match="columns="):
        load_dataset(f"folder:{tmp_path}", columns={"text": "x"})


# ---------------------------------------------------------------------------------------------------- Dataset


def test_dataset_validates_ids_and_columns():
    base = {"image": [None, None], "texts": [["a"], ["b"]], "label": ["x", "y"], "split": [None, None]}
    with pytest.raises(EncoderlabError, match="unique"):
        Dataset(pd.DataFrame({"id": ["1", "1"], **base}))
    with pytest.raises(EncoderlabError, match="lacks column"):
        Dataset(pd.DataFrame({"id": ["1", "2"], "texts": [[], []]}))
    ds = Dataset(pd.DataFrame({"id": [1, 2], **base}))
    assert ds.table["id"].tolist() == ["1", "2"] and ds.split_info == {"method": "none"}
    assert "items=2" in repr(ds)
