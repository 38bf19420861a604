"""CLI through main([...]): --json contracts, help examples, one-line errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoderlab.cli import build_parser, main, walk_parsers


def run_json(capsys, argv: list[str]) -> dict:
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    for c in ("apple", "pear"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "pear" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return tmp_path / "imgs"


def test_encoders_list_json_and_filter(capsys):
    out = run_json(capsys, ["encoders", "list"])
    names = [e["name"] for e in out["encoders"]]
    assert {"efficientnet-lite0", "minilm-l6", "hf:<id>", "open_clip:<id>"} <= set(names)
    only = run_json(capsys, ["encoders", "list", "minilm"])
    assert [e["name"] for e in only["encoders"]] == ["minilm-l6"]


def test_data_inspect_json(capsys, folder, tmp_path):
    out = run_json(capsys, ["data", "inspect", f"folder:{folder}"])
    assert (out["rows"], out["usable"], out["items"]) == (9, 8, 8) and out["classes"] == ["apple", "pear"]
    assert sum(out["splits"].values()) == 8 and set(out["splits"]) <= {"train", "val", "test"}
    assert out["skipped"] == [{"path": str(folder / "pear" / "broken.png"), "reason": out["skipped"][0]["reason"]}]
    assert out["skipped"][0]["reason"] in {"corrupt", "truncated", "not-an-image"}


def test_embed_json_then_cached(capsys, folder, tmp_path, tiny_clip_dir):
    argv = ["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{folder}", "--store",
            str(tmp_path / "store"), "--out", str(tmp_path / "run"), "--workers", "0", "--device", "cpu"]
    first = run_json(capsys, argv + ["--modality", "image"])
    assert (first["items"], first["encoded"], first["cached"]) == (9, 8, 0)
    assert [s["path"] for s in first["skipped"]] == [str(folder / "pear" / "broken.png")]
    assert first["items_per_s"] > 0
    lines = (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()
    assert [json.loads(x)["path"] for x in lines] == [str(folder / "pear" / "broken.png")]
    second = run_json(capsys, argv + ["--modality", "image"])
    assert (second["encoded"], second["cached"]) == (0, 8)


def test_embed_split_only_encodes_that_split(capsys, folder, tmp_path, tiny_clip_dir):
    insp = run_json(capsys, ["data", "inspect", f"folder:{folder}", "--split", "train"])
    out = run_json(capsys, ["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{folder}", "--split",
                            "train", "--store", str(tmp_path / "s"), "--out", str(tmp_path / "r"), "--workers", "0"])
    assert out["items"] == insp["rows"]
    assert out["encoded"] == insp["usable"] and out["encoded"] + len(out["skipped"]) == insp["rows"]


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["embed", "--encoder", "efficientnet-lite", "--data", "emoji"], "efficientnet-lite0"),
        (["embed", "--encoder", "hff:x", "--data", "emoji"], "hf:"),
        (["data", "inspect", "csvv:x.csv"], "csv:"),
        (["data", "fetch", "emojj"], "emoji"),
    ],
)
def test_errors_are_one_line_with_the_fix(capsys, argv, needle):
    assert main(argv) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("encoderlab: error:") and err.count("\n") == 1
    assert needle in err and "Traceback" not in err


def test_wrong_split_names_the_value_and_choices(capsys, folder):
    assert main(["data", "inspect", f"folder:{folder}", "--split", "tset"]) == 1
    err = capsys.readouterr().err
    assert "tset" in err and "test" in err


def test_debug_shows_the_traceback(folder):
    from encoderlab.errors import EncoderlabError

    with pytest.raises(EncoderlabError):
        main(["data", "inspect", f"folder:{folder}", "--split", "tset", "--debug"])


def test_help_has_an_example(capsys):
    """Every parser in the tree, the top one and the groups included, ends its --help with examples."""
    paths = [path for path, _ in walk_parsers(build_parser())]
    assert {(), ("data",), ("store",), ("encoders",), ("rungs",), ("embed",), ("store", "export")} <= set(paths)
    for path in paths:
        with pytest.raises(SystemExit) as e:
            main([*path, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "\nexample:\n  encoderlab " in out, path


def test_store_verify_finds_and_repairs_a_corrupt_shard(capsys, folder, tmp_path, tiny_clip_dir):
    store = str(tmp_path / "store")
    embed = ["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{folder}", "--store", store,
             "--out", str(tmp_path / "run"), "--workers", "0", "--modality", "image", "--batch-size", "4"]
    run_json(capsys, embed)
    listed = run_json(capsys, ["store", "list", "--store", store])
    assert [s["items"] for s in listed["spaces"]] == [8]
    assert run_json(capsys, ["store", "verify", "--store", store])["problems"] == []
    shard = sorted((tmp_path / "store").rglob("shard-*.npy"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-1] ^= 0xFF
    shard.write_bytes(bytes(raw))
    assert main(["store", "verify", "--store", store, "--json"]) == 1
    out, err = capsys.readouterr()
    assert shard.name in out and "--repair" in err
    fixed = run_json(capsys, ["store", "verify", "--store", store, "--repair"])
    assert fixed["ok"] and fixed["removed"]
    again = run_json(capsys, embed)
    # the one shard held all 8 items: all are recomputed (partial recompute is covered in test_store / test_extract)
    assert (again["encoded"], again["cached"]) == (8, 0)
    assert run_json(capsys, ["store", "verify", "--store", store])["problems"] == []


def test_strict_fails_before_encoding_anything(capsys, folder, tmp_path, tiny_clip_dir):
    (folder / "apple" / "notes.txt").write_text("not an image")  # skipped while listing the folder
    store = tmp_path / "store"
    code = main(["embed", "--encoder", f"hf:{tiny_clip_dir}", "--data", f"folder:{folder}", "--store", str(store),
                 "--out", str(tmp_path / "run"), "--workers", "0", "--strict"])
    err = capsys.readouterr().err
    assert code == 1 and "notes.txt" in err and "--strict" in err
    assert not list(store.rglob("shard-*.npy"))  # nothing was computed and thrown away
