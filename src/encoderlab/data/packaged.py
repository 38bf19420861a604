"""Packaged real data sets, read from ``data_dir()/NAME`` after ``encoderlab data fetch NAME``.

- ``openclipart``: ``png/CATEGORY/[SUB/...]/x.png`` with SVG twins under ``svg/``. One item per unique real PNG
  (the 1,221 symlinked duplicates become ``aliases`` of the file they point to); label = top-level category
  folder of the real file; caption = ``"TITLE, kw1, kw2, ..."`` from the SVG's ``dc:title`` and ``dc:subject``
  keywords; metadata ``subcategory``, ``title``, ``keywords``, ``description``, ``aliases``.
- ``emoji`` / ``emoji:subcategory``: ``emoji.json`` + ``img/google/64/*.png``; label = category (or
  subcategory); captions = the lower-cased name and the short names with ``_`` as spaces. Only top-level
  entries: skin-tone variants live under ``skin_variations`` and are not items.
- ``fashion-mnist``: PNG trees ``train/CLASS/NNNNN.png`` and ``test/CLASS/NNNNN.png`` made by the fetch step
  (NNNNN = index in the original IDX file); read as a folder source with the given splits.

Listing never opens an image: oversized or broken files are reported when they are decoded.
"""

from __future__ import annotations

import html
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import EncoderlabError, UnknownNameError, close_matches
from ..paths import data_dir
from .sources import SourceResult, list_folder, register_source

MARKER = ".complete"


@dataclass(frozen=True)
class PackagedSet:
    name: str
    description: str
    license: str
    variants: tuple[str, ...] = ("",)


PACKAGED: dict[str, PackagedSet] = {
    "openclipart": PackagedSet(
        "openclipart", "OpenClipart PNGs with SVG titles/keywords as captions, 22 categories", "public domain"
    ),
    "emoji": PackagedSet(
        "emoji", "Google Noto emoji 64px, names as captions, 10 categories / 99 subcategories",
        "data MIT, images Apache-2.0", variants=("", "category", "subcategory"),
    ),
    "fashion-mnist": PackagedSet("fashion-mnist", "Fashion-MNIST 28x28 grey, 10 classes, 60k train / 10k test", "MIT"),
}

# Folder name -> original Fashion-MNIST class name, in label-index order.
FASHION_MNIST_CLASSES: dict[str, str] = {
    "t-shirt_top": "T-shirt/top",
    "trouser": "Trouser",
    "pullover": "Pullover",
    "dress": "Dress",
    "coat": "Coat",
    "sandal": "Sandal",
    "shirt": "Shirt",
    "sneaker": "Sneaker",
    "bag": "Bag",
    "ankle_boot": "Ankle boot",
}


def packaged_root(name: str, data_home: str | os.PathLike | None = None) -> Path:
    """Where a packaged set lives: ``data_home/NAME`` (default ``encoderlab.paths.data_dir()/NAME``)."""
    if name not in PACKAGED:
        guess = close_matches(name, sorted(PACKAGED))
        raise UnknownNameError(f"unknown packaged dataset {name!r}; did you mean {', '.join(guess) or '?'} "
                               f"(known: {', '.join(sorted(PACKAGED))})")
    base = Path(data_home).expanduser() if data_home is not None else data_dir()
    return base / name


def is_fetched(name: str, data_home: str | os.PathLike | None = None) -> bool:
    return (packaged_root(name, data_home) / MARKER).is_file()


def require_fetched(name: str, data_home: str | os.PathLike | None = None) -> Path:
    """The root of a fetched packaged set, or an error saying how to fetch it."""
    root = packaged_root(name, data_home)
    if not (root / MARKER).is_file():
        state = "is incomplete (no .complete marker)" if root.exists() else "is not fetched yet"
        raise EncoderlabError(
            f"packaged dataset {name!r} {state} (looked in {root})",
            f"run `encoderlab data fetch {name}`" + ("" if data_home is None else f" with data home {data_home}"),
        )
    return root


def _check_variant(name: str, target: str) -> str:
    variants = PACKAGED[name].variants
    if target not in variants:
        shown = [v for v in variants if v]
        guess = close_matches(target, shown)
        hint = f"did you mean {name}:{guess[0]}? " if guess else ""
        raise EncoderlabError(f"unknown variant {target!r} of {name}", f"{hint}variants: {shown or 'none'}")
    return target


# -------------------------------------------------------------------------------------------------- openclipart

_WORK = re.compile(r"<cc:Work\b.*?</cc:Work>", re.DOTALL)
_AGENTS = re.compile(r"<dc:(publisher|creator|rights|contributor)\b.*?</dc:\1>", re.DOTALL)
_TITLE = re.compile(r"<dc:title>(.*?)</dc:title>", re.DOTALL)
_DESCRIPTION = re.compile(r"<dc:description>(.*?)</dc:description>", re.DOTALL)
_SUBJECT = re.compile(r"<dc:subject>(.*?)</dc:subject>", re.DOTALL)
_LI = re.compile(r"<rdf:li>(.*?)</rdf:li>", re.DOTALL)
_PLACEHOLDER_KEYWORDS = {"", "unsorted"}


def _xml_text(raw: str) -> str:
    # Some titles are entity-escaped twice ("&amp;quot;"); unescaping twice restores the intended text.
    text = html.unescape(html.unescape(raw.replace("<![CDATA[", "").replace("]]>", "")))
    return " ".join(text.split())


def read_svg_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """``title``, ``keywords`` (list) and ``description`` from an SVG's RDF metadata; reads only the head."""
    try:
        with open(path, "rb") as f:
            head = f.read(64 * 1024)
            if b"</cc:Work>" not in head and b"<cc:Work" in head:
                head += f.read(4 * 1024 * 1024)
    except OSError:
        return {"title": "", "keywords": [], "description": ""}
    text = head.decode("utf-8", errors="replace")
    work = _WORK.search(text)
    body = _AGENTS.sub("", work.group(0)) if work else ""
    title = _TITLE.search(body)
    desc = _DESCRIPTION.search(body)
    subject = _SUBJECT.search(body)
    keywords: list[str] = []
    seen: set[str] = set()
    for raw in _LI.findall(subject.group(1)) if subject else []:
        kw = _xml_text(raw)
        if kw.lower() in _PLACEHOLDER_KEYWORDS or kw.lower() in seen:
            continue
        seen.add(kw.lower())
        keywords.append(kw)
    return {
        "title": _xml_text(title.group(1)) if title else "",
        "keywords": keywords,
        "description": _xml_text(desc.group(1)) if desc else "",
    }


def openclipart_caption(title: str, keywords: list[str]) -> str:
    """``"Title, kw1, kw2"``: the title, then keywords that do not just repeat it (case-insensitive)."""
    kws = [k for k in keywords if k.lower() != title.lower()]
    return ", ".join([title] + kws if title else kws)


def read_openclipart(root: str | os.PathLike) -> SourceResult:
    """List an OpenClipart tree (``png/`` + ``svg/``) without opening any image."""
    root = Path(root)
    png_root = root / "png"
    svg_root = root / "svg"
    if not png_root.is_dir():
        raise EncoderlabError(
            f"openclipart tree at {root} has no png/ folder", "run `encoderlab data fetch openclipart --force`"
        )
    skipped: list[dict[str, Any]] = []
    real_files: list[str] = []
    links: list[tuple[str, str]] = []  # (alias path, real path)
    png_real = os.path.realpath(png_root)
    stack = [str(png_root)]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        except OSError as e:
            skipped.append({"path": directory, "reason": "unreadable", "detail": e.strerror or str(e)})
            continue
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                stack.append(e.path)
            elif not e.name.lower().endswith(".png"):
                skipped.append({"path": e.path, "reason": "not-an-image", "detail": "not a .png file"})
            elif e.is_symlink():
                real = os.path.realpath(e.path)
                if not os.path.isfile(real):
                    skipped.append({"path": e.path, "reason": "missing", "detail": "dangling symlink"})
                elif not real.startswith(png_real + os.sep):
                    skipped.append({"path": e.path, "reason": "outside-tree", "detail": f"symlink to {real}"})
                else:
                    links.append((e.path, real))
            else:
                real_files.append(e.path)

    # Directory symlinks are not followed, so a real file's resolved path is the resolved root + its relative path.
    root_len = len(str(png_root)) + 1
    by_real = {png_real + os.sep + p[root_len:]: p for p in real_files}
    aliases: dict[str, int] = {}
    for alias, real in links:
        if real in by_real:
            aliases[by_real[real]] = aliases.get(by_real[real], 0) + 1
        else:
            skipped.append({"path": alias, "reason": "missing", "detail": f"symlink target {real} not listed"})

    svg_base = str(svg_root) + os.sep
    rows = []
    for path in real_files:
        rel = path[root_len:]
        parts = rel.split(os.sep)
        if len(parts) < 2:
            skipped.append({"path": path, "reason": "not-in-a-class-folder"})
            continue
        meta = read_svg_metadata(svg_base + rel[:-4] + ".svg")
        caption = openclipart_caption(meta["title"], meta["keywords"])
        rows.append({
            "id": "/".join(parts),
            "image": path,
            "texts": [caption] if caption else [],
            "label": parts[0],
            "split": None,
            "subcategory": parts[1] if len(parts) > 2 else "",
            "title": meta["title"],
            "keywords": ", ".join(meta["keywords"]),
            "description": meta["description"],
            "aliases": aliases.get(path, 0),
        })
    table = pd.DataFrame(rows, columns=["id", "image", "texts", "label", "split", "subcategory", "title",
                                        "keywords", "description", "aliases"])
    table = table.sort_values("id", kind="stable").reset_index(drop=True)
    info = {"aliases": sum(aliases.values()), "png_files": len(real_files) + len(links)}
    return SourceResult(table, root, skipped, info)


def _load_openclipart(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
    _check_variant("openclipart", target)
    return read_openclipart(require_fetched("openclipart", data_home))


# -------------------------------------------------------------------------------------------------------- emoji


def emoji_captions(entry: dict[str, Any]) -> list[str]:
    """The lower-cased name, then each short name with underscores as spaces; duplicates removed."""
    out: list[str] = []
    name = str(entry.get("name") or "").strip().lower()
    if name:
        out.append(" ".join(name.split()))
    for short in entry.get("short_names") or []:
        text = " ".join(str(short).replace("_", " ").split())
        if text and text not in out:
            out.append(text)
    return out


def read_emoji(root: str | os.PathLike, label_field: str = "category") -> SourceResult:
    """List the emoji set: top-level entries of ``emoji.json`` with a Google 64px image."""
    root = Path(root)
    index = root / "emoji.json"
    image_dir = root / "img" / "google" / "64"
    try:
        entries = json.loads(index.read_text(encoding="utf-8"))
    except OSError as e:  # str(e) repeats the path; strerror alone says why
        raise EncoderlabError(f"cannot read {index}: {e.strerror or type(e).__name__}",
                              "run `encoderlab data fetch emoji --force`") from None
    except ValueError as e:
        raise EncoderlabError(f"cannot read {index}: not valid JSON ({e})",
                              "run `encoderlab data fetch emoji --force`") from None
    if not isinstance(entries, list):
        raise EncoderlabError(f"{index} is not a JSON list of emoji", "run `encoderlab data fetch emoji --force`")
    other = "subcategory" if label_field == "category" else "category"
    skipped: list[dict[str, Any]] = []
    rows = []
    seen: set[str] = set()
    for n, e in enumerate(entries):
        where = f"{index}:entry {n}"
        if not isinstance(e, dict) or not e.get("unified") or not e.get("image"):
            skipped.append({"path": where, "reason": "bad-row", "detail": "no unified code or image name"})
            continue
        uid = str(e["unified"])
        if uid in seen:
            skipped.append({"path": where, "reason": "duplicate", "detail": uid})
            continue
        image = image_dir / str(e["image"])
        if not e.get("has_img_google", False):
            skipped.append({"path": str(image), "reason": "no-google-image", "detail": uid})
            continue
        if not image.is_file():
            skipped.append({"path": str(image), "reason": "missing", "detail": uid})
            continue
        label = e.get(label_field)
        if not label:
            skipped.append({"path": where, "reason": "bad-row", "detail": f"no {label_field}"})
            continue
        seen.add(uid)
        rows.append({
            "id": uid,
            "image": str(image),
            "texts": emoji_captions(e),
            "label": str(label),
            "split": None,
            other: str(e.get(other) or ""),
            "name": str(e.get("name") or ""),
            "short_name": str(e.get("short_name") or ""),
            "added_in": str(e.get("added_in") or ""),
            "sort_order": int(e.get("sort_order") or 0),
        })
    cols = ["id", "image", "texts", "label", "split", other, "name", "short_name", "added_in", "sort_order"]
    table = pd.DataFrame(rows, columns=cols).sort_values("sort_order", kind="stable").reset_index(drop=True)
    return SourceResult(table, root, skipped, {"label_field": label_field})


def _load_emoji(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
    variant = _check_variant("emoji", target) or "category"
    return read_emoji(require_fetched("emoji", data_home), variant)


# ------------------------------------------------------------------------------------------------ fashion-mnist


def read_fashion_mnist(root: str | os.PathLike) -> SourceResult:
    """List the converted Fashion-MNIST PNG trees (the raw IDX files under ``raw/`` are not items)."""
    result = list_folder(root, ignore=("raw",))
    result.info["class_names"] = dict(FASHION_MNIST_CLASSES)
    return result


def _load_fashion_mnist(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
    _check_variant("fashion-mnist", target)
    return read_fashion_mnist(require_fetched("fashion-mnist", data_home))


register_source("openclipart", _load_openclipart, PACKAGED["openclipart"].description, example="openclipart")
register_source("emoji", _load_emoji, PACKAGED["emoji"].description, example="emoji:subcategory")
register_source("fashion-mnist", _load_fashion_mnist, PACKAGED["fashion-mnist"].description, example="fashion-mnist")
