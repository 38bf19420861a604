"""`encoderlab data inspect`: rows listed, rows usable and every skipped file, the same in --json and in text."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoderlab.cli import main


def _encoded(fmt: str, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny, complete PNG whose header claims ``width`` x ``height``."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# name -> expected reason; every one of these is a row of the listing except the dangling symlink.
BAD = {
    "cat/empty.png": "zero-byte",
    "cat/half.png": "truncated",
    "cat/half.jpg": "truncated",
    "dog/notes.png": "not-an-image",
    "dog/noise.jpg": "not-an-image",
    "dog/bomb.png": "too-large",
    "dog/zero-size.png": "corrupt",
    "bird/cut.png": "truncated",
    "dog/gone.png": "missing",
}


@pytest.fixture
def messy(tmp_path: Path) -> Path:
    """6 good images (cat 4, dog 2) and the 9 bad files of ``BAD``; class ``bird`` has no usable image at all."""
    root = tmp_path / "messy"
    for c in ("cat", "dog", "bird"):
        (root / c).mkdir(parents=True)
    good = ["cat/a.png", "cat/b.jpg", "cat/c.png", "cat/d.jpg", "dog/a.png", "dog/b.jpg"]
    for i, name in enumerate(good):
        (root / name).write_bytes(_encoded("PNG" if name.endswith(".png") else "JPEG", i))
    png, jpg = _encoded("PNG", 9), _encoded("JPEG", 9)
    (root / "cat/empty.png").write_bytes(b"")
    (root / "cat/half.png").write_bytes(png[: len(png) // 2])
    (root / "cat/half.jpg").write_bytes(jpg[: len(jpg) // 2])
    (root / "dog/notes.png").write_text("not a picture\n")
    (root / "dog/noise.jpg").write_bytes(np.random.default_rng(1).integers(1, 255, 500, dtype=np.uint8).tobytes())
    (root / "dog/bomb.png").write_bytes(_png_claiming(20000, 20000))
    (root / "dog/zero-size.png").write_bytes(_png_claiming(0, 7))
    (root / "bird/cut.png").write_bytes(png[:40])
    os.symlink(root / "nowhere.png", root / "dog/gone.png")
    return root


def test_inspect_json_counts_rows_usable_and_skipped(capsys, messy):
    assert main(["data", "inspect", f"folder:{messy}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # 15 rows (the dangling symlink is dropped while listing, and counted as a skipped row), 6 usable, 9 skipped.
    assert (out["rows"], out["usable"], len(out["skipped"])) == (15, 6, 9)
    assert out["items"] == out["usable"]
    assert {os.path.relpath(s["path"], messy): s["reason"] for s in out["skipped"]} == BAD
    assert out["classes"] == ["bird", "cat", "dog"]
    assert out["class_counts"] == {"bird": 0, "cat": 4, "dog": 2}  # an emptied class still shows
    assert sum(out["splits"].values()) == 6 and set(out["splits"]) <= {"train", "val", "test"}
    assert out["data"] == f"folder:{messy}" and out["split_info"]["method"] == "hash"
    assert out["check"] == "header"


def test_inspect_text_says_the_same_numbers(capsys, messy):
    assert main(["data", "inspect", f"folder:{messy}", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert main(["data", "inspect", f"folder:{messy}"]) == 0
    out, err = capsys.readouterr()
    first = out.splitlines()[0]
    splits = ", ".join(f"{k}={v}" for k, v in js["splits"].items())
    assert first == f"folder:{messy}: 15 rows, 6 usable, 9 skipped (1 while listing), 3 classes, splits {splits}"
    table = {line.split()[0]: line.split()[-1] for line in out.splitlines()[3:]}
    assert table == {"cat": "4", "dog": "2", "bird": "0"}
    assert "skipped 9 file(s):" in err
    for name, reason in BAD.items():
        assert f"{messy / name}: {reason}" in err


def test_inspect_decode_finds_corrupt_data_the_header_check_passes(capsys, tmp_path):
    root = tmp_path / "d"
    (root / "a").mkdir(parents=True)
    png = bytearray(_encoded("PNG"))
    png[100:300] = b"\x00" * 200  # inside IDAT: header and IEND intact
    (root / "a" / "corrupt.png").write_bytes(bytes(png))
    (root / "a" / "ok.png").write_bytes(_encoded("PNG", 3))
    assert main(["data", "inspect", f"folder:{root}", "--json"]) == 0
    header = json.loads(capsys.readouterr().out)
    assert (header["rows"], header["usable"], header["skipped"]) == (2, 2, [])
    assert main(["data", "inspect", f"folder:{root}", "--json", "--decode"]) == 0
    decoded = json.loads(capsys.readouterr().out)
    assert (decoded["rows"], decoded["usable"], decoded["check"]) == (2, 1, "decode")
    assert decoded["skipped"] == [{"path": str(root / "a" / "corrupt.png"), "reason": "corrupt"}]


def test_text_only_rows_are_usable(capsys, tmp_path):
    (tmp_path / "ok.png").write_bytes(_encoded("PNG"))
    (tmp_path / "bad.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text("image,text,label\nok.png,a cat,x\nbad.png,a dog,y\n,just words,y\n")
    assert main(["data", "inspect", f"csv:{tmp_path / 'pairs.csv'}", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["rows"], out["usable"], out["items"]) == (3, 2, 2)
    assert out["class_counts"] == {"x": 1, "y": 1}
    assert out["skipped"] == [{"path": str(tmp_path / "bad.png"), "reason": "zero-byte"}]
