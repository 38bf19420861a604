"""The ``wds:`` source and ``export_wds``: round trip, brace expansion, broken shards, the extraction cache."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoderlab.cli import main
from encoderlab.data import load_dataset, wds
from encoderlab.data.wds import expand_braces, export_wds, shard_paths
from encoderlab.testing import color_dataset, color_spec


def _png(rgb=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), rgb, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _sample(key: str, caption: str = "a red square", **meta) -> list[tuple[str, bytes]]:
    out = [(f"{key}.png", _png()), (f"{key}.txt", caption.encode())]
    if meta:
        out.append((f"{key}.json", json.dumps(meta).encode()))
    return out


def _load(spec: str, home: Path, **kw):
    return load_dataset(spec, data_home=home, **kw)


def test_round_trip_keeps_ids_captions_labels_splits_and_bytes(tmp_path):
    src = load_dataset(color_spec(color_dataset(tmp_path / "colors", n_per_class=4)))
    out = export_wds(src, tmp_path / "shards", shard_size=5)
    assert out["shards"] == -(-len(src) // 5) and out["items"] == len(src)
    assert sorted(os.listdir(tmp_path / "shards")) == [f"{i:05d}.tar" for i in range(out["shards"])]
    back = _load(out["spec"], tmp_path / "home")
    assert back.skipped == []
    a = src.table.set_index("id")
    b = back.table.set_index("id")
    assert list(a.index) == list(b.index)
    for col in ("label", "split"):
        assert a[col].tolist() == b[col].tolist()
    assert [list(t) for t in a["texts"]] == [list(t) for t in b["texts"]]
    for pa, pb in zip(a["image"], b["image"]):
        assert Path(pa).read_bytes() == Path(pb).read_bytes()
        assert str(pb).startswith(str(tmp_path / "home" / "wds-cache"))


def test_cli_export_prints_the_spec(tmp_path, capsys):
    spec = color_spec(color_dataset(tmp_path / "colors", n_per_class=2))
    assert main(["data", "export-wds", "--data", spec, "--out", str(tmp_path / "s"), "--shard-size", "3",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["spec"].startswith("wds:") and "{00000..0000" in out["spec"] and out["items"] == len(load_dataset(spec))


def test_brace_expansion_ranges_lists_and_quotes(tmp_path):
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("d/{8..10}.tar") == ["d/8.tar", "d/9.tar", "d/10.tar"]
    assert expand_braces("d/{098..100}.tar") == ["d/098.tar", "d/099.tar", "d/100.tar"]
    assert expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    assert expand_braces("d/{x}.tar") == ["d/{x}.tar"]
    base = str(tmp_path)
    want = [f"{base}/00000.tar", f"{base}/00001.tar"]
    assert shard_paths(f"{base}/{{00000..00001}}.tar") == want
    assert shard_paths(f"'{base}/{{00000..00001}}.tar'") == want
    assert shard_paths(f'"{base}/{{00000,00001}}.tar"') == want
    assert shard_paths(f"{base}/00000.tar {base}/00001.tar") == want  # what an unquoted shell expansion gives
    for i in range(2):
        _tar(tmp_path / f"{i:05d}.tar", _sample(f"k{i}", split="train"))
    for spec in (f"wds:{base}/{{00000..00001}}.tar", f"wds:'{base}/{{00000..00001}}.tar'",
                 f"wds:{base}/{{00000,00001}}.tar"):
        assert sorted(_load(spec, tmp_path / "home").table["id"]) == ["k0", "k1"]


def test_truncated_tar_corrupt_image_and_missing_shard_are_reported(tmp_path):
    d = tmp_path / "shards"
    d.mkdir()
    good = _tar(d / "00000.tar", _sample("a0", split="train") + _sample("a1", split="test"))
    bad_img = [("b0.png", _png()[:40]), ("b0.txt", b"cut image"), ("b0.json", b'{"split": "train"}')]
    _tar(d / "00001.tar", bad_img + _sample("b1", split="train") + [("b2.txt", b"caption but no image")])
    full = _tar(d / "00002.tar", sum((_sample(f"c{i}", split="train") for i in range(4)), []))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) // 2 + 100])  # cut in the middle of the samples
    (d / "00004.tar").write_bytes(b"this is not a tar file at all" * 40)
    ds = _load(f"wds:{d}/{{00000..00004}}.tar", tmp_path / "home")
    reasons = {s["path"]: s["reason"] for s in ds.skipped}
    assert reasons[str(d / "00003.tar")] == "missing"
    assert reasons[str(d / "00002.tar")] == "truncated"
    assert reasons[str(d / "00004.tar")] == "corrupt"
    assert reasons[f"{d / '00001.tar'}/b0.png"] in ("truncated", "corrupt")
    assert reasons[f"{d / '00001.tar'}/b2.txt"] == "not-an-image"
    ids = set(ds.table["id"])
    assert {"a0", "a1", "b1"} <= ids and "b0" not in ids
    assert {i for i in ids if i.startswith("c")} and "c3" not in ids  # samples before the cut are kept
    assert good.exists()


def test_splits_from_metadata_option_or_none(tmp_path):
    _tar(tmp_path / "m.tar", _sample("x0", label="cat") + _sample("x1", label="dog"))
    assert set(_load(f"wds:{tmp_path}/m.tar?split=train", tmp_path / "h").table["split"]) == {"train"}
    ds = _load(f"wds:{tmp_path}/m.tar", tmp_path / "h", splits=False)
    assert ds.table["split"].isna().all() and ds.table["label"].tolist() == ["cat", "dog"]
    assert _load(f"wds:{tmp_path}/m.tar?label=", tmp_path / "h").table["label"].isna().all()
    _tar(tmp_path / "c.tar", _sample("y0", split="val") + [("y0.cls", b"bird")])
    ds = _load(f"wds:{tmp_path}/c.tar", tmp_path / "h")
    assert ds.table["label"].tolist() == ["bird"] and ds.table["split"].tolist() == ["val"]


def test_second_load_reuses_the_cache(tmp_path):
    shard = _tar(tmp_path / "00000.tar", _sample("k0", split="train") + _sample("k1", split="train"))
    spec = f"wds:{shard}"
    before = wds.EXTRACTIONS["count"]
    first = _load(spec, tmp_path / "home")
    assert wds.EXTRACTIONS["count"] == before + 1
    mtimes = {p: os.stat(p).st_mtime_ns for p in first.table["image"]}
    second = _load(spec, tmp_path / "home")
    assert wds.EXTRACTIONS["count"] == before + 1
    assert second.table["image"].tolist() == first.table["image"].tolist()
    assert {p: os.stat(p).st_mtime_ns for p in second.table["image"]} == mtimes
    cache = tmp_path / "home" / "wds-cache"
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no temporary folders left
    _tar(shard, _sample("k0", "changed", split="train"))  # a changed shard is extracted again
    os.utime(shard, ns=(1, 1))
    assert _load(spec, tmp_path / "home").table["texts"].tolist() == [["changed"]]
    assert wds.EXTRACTIONS["count"] == before + 2


def test_no_usable_samples_is_an_error_naming_the_reasons(tmp_path):
    with pytest.raises(Exception, match="missing"):
        _load(f"wds:{tmp_path}/{{0..1}}.tar", tmp_path / "home")
