"""What a new user's data throws at the sources: undecodable file names, empty labels, symlinks back into the
dataset, identical images across splits, table columns of the wrong type, and error messages in the user's terms."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from encoderlab.cli import main
from encoderlab.data import Dataset, load_dataset
from encoderlab.data.audit import cross_split_duplicates, duplicates_note, duplicates_summary
from encoderlab.errors import EncoderlabError
from encoderlab.hashing import image_key

CAFE = os.fsdecode(b"caf\xe9.png")  # a Latin-1 name from an old zip: a str with a surrogate escape
CAFE_SHOWN = "caf\\xe9.png"  # how it is reported


def _png(seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _img(path: Path | str, seed: int = 0) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(_png(seed))
    return os.fspath(path)


def _inspect(capsys, spec: str, *extra: str) -> dict:
    code = main(["data", "inspect", spec, "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _pets(root: Path, n: int = 3) -> Path:
    for c in ("cat", "dog"):
        for i in range(n):
            _img(root / c / f"{i}.png", seed=hash((c, i)) % 1000)
    return root


# ---------------------------------------------------------------------------------------- 1. bad file names


def test_folder_skips_a_file_name_that_is_not_utf8_and_loads_the_rest(tmp_path, capsys):
    root = _pets(tmp_path / "pets")
    _img(os.path.join(root, "cat", CAFE), seed=99)
    os.makedirs(os.path.join(root, "dog", os.fsdecode(b"\xff\xfe")))  # a sub-folder with a bad name
    ds = load_dataset(f"folder:{root}", splits=False)
    assert len(ds) == 6
    bad = sorted(s["path"] for s in ds.skipped if s["reason"] == "bad-filename")
    assert bad == [str(root / "cat" / CAFE_SHOWN), str(root / "dog" / "\\xff\\xfe")]
    json.dumps(ds.summary(), ensure_ascii=False).encode("utf-8")  # nothing in the summary can break a UTF-8 write
    json.dumps(ds.skipped, ensure_ascii=False).encode("utf-8")
    ds.table.to_parquet(tmp_path / "m.parquet")  # the manifest is storable (pyarrow refused it before)

    out = _inspect(capsys, f"folder:{root}")
    assert (out["rows"], out["usable"]) == (8, 6)
    assert {"path": str(root / "cat" / CAFE_SHOWN), "reason": "bad-filename"} in [
        {k: s[k] for k in ("path", "reason")} for s in out["skipped"]]
    assert main(["data", "inspect", f"folder:{root}"]) == 0
    assert f"{root / 'cat' / CAFE_SHOWN}: bad-filename" in capsys.readouterr().err


def test_a_class_folder_with_a_bad_name_is_skipped_whole(tmp_path):
    root = _pets(tmp_path / "pets")
    _img(os.path.join(root, os.fsdecode(b"b\xe9b\xe9"), "1.png"))
    ds = load_dataset(f"folder:{root}", splits=False)
    assert ds.classes == ["cat", "dog"]
    assert [s["reason"] for s in ds.skipped] == ["bad-filename"] and "folder name" in ds.skipped[0]["detail"]


def test_dataset_root_with_a_bad_name_is_one_clear_error(tmp_path):
    root = Path(os.path.join(tmp_path, os.fsdecode(b"d\xe9j\xe0")))
    _pets(root)
    with pytest.raises(EncoderlabError) as info:
        load_dataset(f"folder:{root}")
    msg = str(info.value)
    assert "d\\xe9j\\xe0" in msg and "not valid UTF-8" in msg and "rename" in msg
    msg.encode("utf-8")  # printable


def test_csv_row_naming_a_latin1_file_is_skipped_the_rest_loads(tmp_path, capsys):
    _img(tmp_path / "a.png")
    _img(os.path.join(tmp_path, CAFE), seed=1)
    (tmp_path / "pairs.csv").write_bytes(b"image,text,label\na.png,a cat,cat\ncaf\xe9.png,a caf\xe9,cat\n,words,dog\n")
    ds = load_dataset(f"csv:{tmp_path / 'pairs.csv'}", splits=False)
    assert len(ds) == 2
    assert [(s["path"], s["reason"]) for s in ds.skipped] == [(str(tmp_path / CAFE_SHOWN), "bad-filename")]
    assert "pairs.csv:3" in ds.skipped[0]["detail"]
    out = _inspect(capsys, f"csv:{tmp_path / 'pairs.csv'}")
    assert (out["rows"], out["usable"]) == (3, 2)


def test_jsonl_surrogate_escapes_in_paths_and_texts_are_skipped(tmp_path, capsys):
    _img(tmp_path / "a.png")
    _img(os.path.join(tmp_path, CAFE), seed=1)
    lines = [
        b'{"image": "a.png", "text": "ok"}',
        b'{"image": "caf\\udce9.png", "text": "json escape"}',  # what a tool that wrote str() of the name gives
        b'{"image": "caf\xe9.png", "text": "raw latin-1 bytes"}',
        b'{"text": "bad \\ud800 caption"}',
        b'{"text": "fine", "note": "caf\xe9"}',  # a metadata cell
    ]
    (tmp_path / "p.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = load_dataset(f"jsonl:{tmp_path / 'p.jsonl'}", splits=False)
    assert ds.table["texts"].tolist() == [["ok"]]
    assert [s["reason"] for s in ds.skipped] == ["bad-filename", "bad-filename", "bad-value", "bad-value"]
    assert ds.skipped[0]["path"] == str(tmp_path / CAFE_SHOWN)
    json.dumps(ds.skipped, ensure_ascii=False).encode("utf-8")
    assert _inspect(capsys, f"jsonl:{tmp_path / 'p.jsonl'}")["usable"] == 1


def test_parquet_in_a_folder_with_a_bad_name_is_a_clear_error(tmp_path):
    folder = os.path.join(tmp_path, os.fsdecode(b"caf\xe9"))
    os.makedirs(folder)
    pd.DataFrame({"text": ["a", "b"]}).to_parquet(tmp_path / "t.parquet")  # pyarrow cannot even write there
    os.replace(tmp_path / "t.parquet", os.path.join(folder, "t.parquet"))
    with pytest.raises(EncoderlabError, match=r"caf\\xe9.*not valid UTF-8"):
        load_dataset(f"parquet:{os.path.join(folder, 't.parquet')}")


def test_embed_runs_past_a_bad_file_name(tmp_path, capsys, tiny_clip_dir):
    root = _pets(tmp_path / "pets", n=2)
    _img(os.path.join(root, "cat", CAFE), seed=5)
    argv = ["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{root}", "--store", str(tmp_path / "s"),
            "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu", "--modality", "image", "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["encoded"] == 4


# ---------------------------------------------------------------------------------------- 6. empty labels


def test_unlabelled_items_are_counted_and_said_in_every_table_source(tmp_path, capsys):
    _img(tmp_path / "a.png")
    rows = [("a.png", "x", "cat"), ("", "y", ""), ("", "z", "  "), ("", "w", "dog")]
    pd.DataFrame(rows, columns=["image", "text", "label"]).to_csv(tmp_path / "t.csv", index=False)
    with open(tmp_path / "t.jsonl", "w") as f:
        for image, text, label in rows:
            f.write(json.dumps({"image": image or None, "text": text, "label": label or None}) + "\n")
    pd.DataFrame([(i or None, t, lab or None) for i, t, lab in rows], columns=["image", "text", "label"]).to_parquet(
        tmp_path / "t.parquet")
    for spec in ("csv:t.csv", "jsonl:t.jsonl", "parquet:t.parquet"):
        prefix, name = spec.split(":")
        ds = load_dataset(f"{prefix}:{tmp_path / name}")
        assert ds.summary()["unlabelled"] == 2, spec
        assert ds.unlabelled_note() == "2 items have no label (left out of classification)"
    out = _inspect(capsys, f"csv:{tmp_path / 't.csv'}")
    assert out["unlabelled"] == 2
    assert main(["data", "inspect", f"csv:{tmp_path / 't.csv'}"]) == 0
    assert "2 items have no label (left out of classification)" in capsys.readouterr().out


def test_unlabelled_note_is_empty_when_all_or_none_are_labelled():
    t = pd.DataFrame({"id": ["a", "b"], "image": [None, None], "texts": [["x"], ["y"]], "label": ["c", None],
                      "split": [None, None]})
    assert Dataset(t).unlabelled_note() == "1 item has no label (left out of classification)"
    assert Dataset(t.assign(label=["c", "d"])).unlabelled_note() == ""
    assert Dataset(t.assign(label=[None, None])).unlabelled_note() == ""  # no labels at all: not a class set


def test_unlabelled_images_beside_class_folders_are_not_labelled(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "b.png", 1)
    ds = load_dataset(f"folder:{tmp_path}", splits=False)
    assert ds.summary()["unlabelled"] == 2 and ds.unlabelled_note() == ""


# ---------------------------------------------------------------------------------------- 11a. symlinks


def test_symlink_to_the_parent_does_not_pull_other_classes_in(tmp_path):
    root = _pets(tmp_path / "pets")
    os.symlink("..", root / "cat" / "up")
    ds = load_dataset(f"folder:{root}", splits=False)
    assert ds.table.groupby("label").size().to_dict() == {"cat": 3, "dog": 3}
    assert [(s["path"], s["reason"]) for s in ds.skipped] == [(str(root / "cat" / "up"), "symlink-loop")]


def test_symlink_into_a_sibling_class_is_skipped_not_relabelled(tmp_path):
    root = _pets(tmp_path / "pets")
    os.symlink("../dog", root / "cat" / "more")
    os.symlink("cat", root / "kitty")  # a whole class folder aliasing another one
    ds = load_dataset(f"folder:{root}", splits=False)
    assert ds.table.groupby("label").size().to_dict() == {"cat": 3, "dog": 3}
    assert sorted((os.path.basename(s["path"]), s["reason"]) for s in ds.skipped) == [
        ("kitty", "symlink-other-class"), ("more", "symlink-other-class")]
    assert all("wrong label" in s["detail"] or "again under class" in s["detail"] for s in ds.skipped)


def test_split_folder_symlinked_to_another_split_is_skipped(tmp_path):
    root = tmp_path / "ds"
    for c in ("a", "b"):
        _img(root / "train" / c / "1.png")
        _img(root / "test" / c / "1.png", 1)
    os.symlink("train", root / "val")
    ds = load_dataset(f"folder:{root}")
    assert ds.splits == ["test", "train"] and len(ds) == 4
    assert {s["reason"] for s in ds.skipped} == {"symlink-other-class"}


def test_symlinked_class_folders_outside_the_dataset_are_still_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    _img(outside / "birds" / "1.png")
    _img(outside / "extra" / "2.png", 1)
    root = _pets(tmp_path / "pets")
    os.symlink(outside / "birds", root / "bird")
    os.symlink(outside / "extra", root / "cat" / "extra")
    ds = load_dataset(f"folder:{root}", splits=False)
    assert ds.table.groupby("label").size().to_dict() == {"bird": 1, "cat": 4, "dog": 3} and ds.skipped == []


# ---------------------------------------------------------------------------------------- 11b. duplicates


def _leaky(root: Path) -> Path:
    for split in ("train", "test"):
        for c in ("a", "b"):
            _img(root / split / c / "own.png", seed=hash((split, c)) % 1000)
    _img(root / "train" / "a" / "dup.png", seed=7)
    _img(root / "test" / "a" / "dup.png", seed=7)
    _img(root / "test" / "b" / "dup2.png", seed=7)
    _img(root / "train" / "b" / "twice1.png", seed=8)  # identical, but both in train: no leak
    _img(root / "train" / "b" / "twice2.png", seed=8)
    return root


def test_cross_split_duplicates_finds_groups_spanning_splits(tmp_path):
    root = _leaky(tmp_path / "ds")
    ds = load_dataset(f"folder:{root}")
    groups = cross_split_duplicates(ds)
    assert len(groups) == 1
    g = groups[0]
    assert g["items"] == 3 and g["splits"] == {"test": 2, "train": 1}
    assert sorted(g["ids"]) == ["test/a/dup.png", "test/b/dup2.png", "train/a/dup.png"]
    # the same from keys a caller already has: per row, or by id; unknown keys are left out
    keys = [image_key(p) for p in ds.table["image"]]
    assert cross_split_duplicates(ds, keys) == groups
    assert cross_split_duplicates(ds, dict(zip(ds.table["id"], keys))) == groups
    assert cross_split_duplicates(ds, {}) == []
    with pytest.raises(EncoderlabError, match="2 keys for 9 items"):
        cross_split_duplicates(ds, keys[:2])
    assert duplicates_note(groups) == "1 group of identical images (3 items) spans more than one split"
    assert duplicates_summary(groups)["groups"] == 1


def test_inspect_reports_duplicates_across_splits(tmp_path, capsys):
    root = _leaky(tmp_path / "ds")
    out = _inspect(capsys, f"folder:{root}")
    dup = out["duplicates_across_splits"]
    assert (dup["groups"], dup["items"]) == (1, 3)
    assert sorted(dup["examples"][0]["paths"]) == sorted(
        str(root / p) for p in ("test/a/dup.png", "test/b/dup2.png", "train/a/dup.png"))
    assert main(["data", "inspect", f"folder:{root}"]) == 0
    text = capsys.readouterr().out
    assert "1 group of identical images (3 items) spans more than one split" in text
    assert "test+train: " in text and "train/a/dup.png" in text
    assert _inspect(capsys, f"folder:{root}", "--split", "test")["duplicates_across_splits"] is None


# ---------------------------------------------------------------------------------------- 11e. wrong types


def test_parquet_column_of_the_wrong_type_is_named(tmp_path):
    pd.DataFrame({"image": [1, 2], "text": ["a", "b"]}).to_parquet(tmp_path / "i.parquet")
    with pytest.raises(EncoderlabError) as info:
        load_dataset(f"parquet:{tmp_path / 'i.parquet'}")
    msg = str(info.value)
    assert "column 'image'" in msg and "int64" in msg and "strings (image file paths)" in msg and "?image=" in msg
    pd.DataFrame({"text": [{"en": "a cat", "n": 1}], "label": ["x"]}).to_parquet(tmp_path / "t.parquet")
    with pytest.raises(EncoderlabError, match=r"column 'text'.*struct<.*strings or lists of strings"):
        load_dataset(f"parquet:{tmp_path / 't.parquet'}")
    # a column the user points elsewhere is not checked
    ds = load_dataset(f"parquet:{tmp_path / 'i.parquet'}?image=", splits=False)
    assert len(ds) == 2


def test_jsonl_cells_of_the_wrong_kind_are_skipped_per_row(tmp_path):
    _img(tmp_path / "a.png")
    lines = [{"image": "a.png", "text": "ok", "label": 3}, {"image": 5, "text": "n"}, {"text": {"en": "x"}},
             {"text": "t", "label": ["a", "b"]}, {"text": ["one", "two"], "id": 7}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    ds = load_dataset(f"jsonl:{tmp_path / 'p.jsonl'}", splits=False)
    assert ds.table["texts"].tolist() == [["ok"], ["one", "two"]] and ds.table["label"].tolist() == ["3", None]
    assert [s["reason"] for s in ds.skipped] == ["bad-value"] * 3
    details = [s["detail"] for s in ds.skipped]
    assert "column 'image' (image) holds a number (5), not an image file path" in details[0]
    assert "JSON object" in details[1] and "'label'" in details[2]


# ---------------------------------------------------------------------------------------- 17. messages


def test_inspect_text_does_not_point_at_a_run_directory(tmp_path, capsys):
    _img(tmp_path / "cat" / "ok.png")
    for i in range(12):
        (tmp_path / "cat" / f"{i}.png").write_bytes(b"")
    assert main(["data", "inspect", f"folder:{tmp_path}"]) == 0
    err = capsys.readouterr().err
    assert "skipped.jsonl" not in err and "... and 2 more (rerun with --json for the full list)" in err


def test_messages_name_plain_numbers_and_each_file_once(tmp_path):
    from encoderlab.data.fetch import read_idx
    from encoderlab.data.packaged import read_emoji
    from encoderlab.data.prompts import load_class_names

    table = pd.DataFrame({"id": ["a"], "image": [None], "texts": [["x"]], "label": ["c"], "split": ["train"]})
    with pytest.raises(EncoderlabError) as info:
        Dataset(table).k_shot(np.int64(0))
    assert "k=0" in str(info.value) and "np." not in str(info.value)
    with pytest.raises(EncoderlabError) as info:
        read_emoji(tmp_path)
    assert str(info.value).count(str(tmp_path / "emoji.json")) == 1
    with pytest.raises(EncoderlabError) as info:
        read_idx(tmp_path / "nope-idx")
    assert str(info.value).count("nope-idx") == 1
    (tmp_path / "names.csv").write_bytes(b"cat,Caf\xe9\n")
    with pytest.raises(EncoderlabError, match="not UTF-8"):
        load_class_names(tmp_path / "names.csv")
