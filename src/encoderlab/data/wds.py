"""WebDataset shards: the ``wds:`` source and ``export_wds``.

``wds:PATH/{00000..00099}.tar`` reads tar shards in the img2dataset layout: per sample ``KEY.jpg|jpeg|png|webp``
(any image extension), ``KEY.txt`` (the caption), ``KEY.json`` (metadata) and an optional ``KEY.cls`` (the label).
Braces are expanded here, not by the shell: ``{00000..00099}`` (zero padding kept), ``{a,b}`` lists, several groups;
the target may be quoted (``wds:'dir/{0..9}.tar'``) or be a list of shards split by spaces or ``::``.

Design: the rest of encoderlab reads images by file path (decoding, the image checks, the content-keyed store), so
each shard is streamed once (``tarfile`` in stream mode, one member at a time) and its images are written into a
content-addressed cache, ``DATA_HOME/wds-cache/<digest of the shard's bytes>/``, built in a temporary folder and
renamed into place (atomic: a killed run leaves no half cache). Captions and metadata go into that folder's
``index.json``. A rerun finds the digest through a memo keyed by the shard's path, size and mtime, so it neither
re-extracts nor re-hashes an unchanged shard; a changed shard gets a new digest and a new cache folder.

Labels: the JSON field ``label`` (``?label=FIELD`` picks another, ``?label=`` ignores labels), else ``KEY.cls``.
Splits: the JSON field ``split``, else ``?split=NAME``, else none (``load_dataset`` then hash-splits 80/10/10).
Reported in ``skipped`` (never raised): a missing shard (``missing``), a shard that is not a tar (``corrupt``), a
truncated shard (``truncated``; the samples read before the cut are kept), a sample without an image
(``not-an-image``) or with nothing at all (``empty-row``), a sample whose JSON does not parse (``bad-row``), whose
text is not UTF-8 (``bad-value``), whose image fails the header check (the image reasons), a repeated id
(``conflict``). Paths in skip entries name the shard and member: ``dir/00003.tar/000031.jpg``.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import BadImageError, EncoderlabError
from ..hashing import bytes_digest, file_digest
from .images import IMAGE_EXTENSIONS, probe_image
from .manifest import Dataset, clean_str, has_invalid_text
from .sources import SourceResult, register_source

CACHE_DIRNAME = "wds-cache"
INDEX_NAME = "index.json"
INDEX_VERSION = 1
#: JSON fields that feed the core columns, not metadata columns
_RESERVED = {"id", "image", "texts", "text", "caption", "label", "split", "key", "shard"}
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
#: counts extractions in this process (tests check that a rerun reuses the cache)
EXTRACTIONS = {"count": 0}


# ------------------------------------------------------------------------------------------------- shard lists


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00099}`` ranges (zero padding kept when either end has it) and ``{a,b}`` lists, every group,
    left to right. A group that is neither (``{x}``) stays as written."""
    m = None
    for cand in _BRACE.finditer(pattern):
        if _RANGE.match(cand.group(1)) or "," in cand.group(1):
            m = cand
            break
    if m is None:
        return [pattern]
    head, tail, body = pattern[: m.start()], pattern[m.end():], m.group(1)
    r = _RANGE.match(body)
    if r:
        a, b = r.group(1), r.group(2)
        lo, hi = int(a), int(b)
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if hi >= lo else -1
        items = [str(i).zfill(width) if width else str(i) for i in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def _unquote(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text


def shard_paths(target: str) -> list[str]:
    """The shard paths a ``wds:`` target names, in order, duplicates dropped."""
    text = _unquote(target)
    if not text:
        raise EncoderlabError("wds: needs shard paths", "e.g. wds:shards/{00000..00099}.tar")
    out: dict[str, None] = {}
    for piece in re.split(r"\s+|::", text):
        piece = _unquote(piece)
        if piece.startswith("wds:"):
            piece = piece[4:]
        if piece:
            for path in expand_braces(piece):
                out[os.path.abspath(os.path.expanduser(path))] = None
    return list(out)


def shard_width(n: int) -> int:
    """Digits in the names of ``n`` shards: 5 (``00000.tar``), more past 100 000 shards."""
    return max(5, len(str(max(n, 1) - 1)))


def shards_spec(out_dir: str | os.PathLike, n: int, width: int | None = None) -> str:
    """The ``wds:`` spec naming shards ``00000.tar`` .. of ``export_wds``."""
    width = width or shard_width(n)
    base = os.path.abspath(os.fspath(out_dir))
    if n == 1:
        return f"wds:{base}/{0:0{width}d}.tar"
    return f"wds:{base}/{{{0:0{width}d}..{n - 1:0{width}d}}}.tar"


# ------------------------------------------------------------------------------------------------- the cache


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the name up to the first dot of its last part; the rest is the extension."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def _read_members(tf: tarfile.TarFile, samples: dict[str, dict[str, Any]], tmp: Path) -> None:
    """Stream members into ``samples`` (key -> parts); images are written to ``tmp``. Raises on a broken stream."""
    for member in tf:
        if not member.isfile():
            continue
        key, ext = _split_name(member.name)
        if not key or not ext:
            continue
        fobj = tf.extractfile(member)
        data = fobj.read() if fobj is not None else b""
        if len(data) != member.size:
            raise tarfile.ReadError(f"unexpected end of data in member {member.name!r}")
        sample = samples.setdefault(key, {"key": key, "members": []})
        sample["members"].append(member.name)
        if "." + ext in IMAGE_EXTENSIONS and "image" not in sample:
            name = f"{bytes_digest(key.encode('utf-8', 'surrogateescape'))}.{ext}"
            (tmp / name).write_bytes(data)
            sample["image"], sample["image_member"] = name, member.name
        elif ext in ("txt", "json", "cls"):
            sample[ext] = data.decode("utf-8", "surrogateescape")
    # tarfile stops quietly when the file ends at (or inside) a header; a whole archive ends with a zero block,
    # which it has read when it stops.
    if tf.fileobj.tell() - tf.offset < tarfile.BLOCKSIZE:
        raise tarfile.ReadError("unexpected end of data: the archive ends without its end-of-archive block")


def _extract(shard: str, tmp: Path) -> dict[str, Any]:
    """Read one shard into ``tmp`` (images) and return its index (samples and shard-level problems)."""
    EXTRACTIONS["count"] += 1
    samples: dict[str, dict[str, Any]] = {}
    error = None
    try:
        with tarfile.open(shard, "r|*") as tf:
            _read_members(tf, samples, tmp)
    except (tarfile.ReadError, tarfile.CompressionError, EOFError, zlib.error, OSError) as e:
        msg = str(e) or type(e).__name__
        started = bool(samples)
        reason = "truncated" if isinstance(e, EOFError) or "end of data" in msg else "corrupt"
        if started:  # the last sample may be missing members: keep only the complete ones before it
            last = samples.pop(next(reversed(samples)))
            if last.get("image"):
                (tmp / last["image"]).unlink(missing_ok=True)
        detail = f"{msg}; kept the {len(samples)} complete sample(s) before it" if started else msg
        error = {"reason": reason, "detail": f"not a readable tar: {detail}" if reason == "corrupt" else detail}
    for s in samples.values():
        if s.get("image"):
            try:
                probe_image(tmp / s["image"])
            except BadImageError as e:
                s["bad_image"] = {"reason": e.reason, "detail": e.detail}
    return {"version": INDEX_VERSION, "shard": shard, "error": error, "samples": list(samples.values())}


def _memo_path(root: Path, shard: str, st: os.stat_result) -> Path:
    return root / "_memo" / bytes_digest(f"{shard}\0{st.st_size}\0{st.st_mtime_ns}".encode("utf-8", "replace"))


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def cached_shard(shard: str, root: Path) -> tuple[Path, dict[str, Any]]:
    """(cache folder, index) of one shard, extracting it once; raises ``FileNotFoundError`` if it does not exist."""
    st = os.stat(shard)
    memo = _memo_path(root, shard, st)
    digest = memo.read_text().strip() if memo.is_file() else None
    folder = root / digest if digest else None
    if folder is None or not (folder / INDEX_NAME).is_file():
        digest = file_digest(shard)
        folder = root / digest
        if not (folder / INDEX_NAME).is_file():
            root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{digest}.tmp-"))
            try:
                index = _extract(shard, tmp)
                (tmp / INDEX_NAME).write_text(json.dumps(index), encoding="utf-8")
                try:
                    os.rename(tmp, folder)
                except OSError:  # another process finished first: use its copy
                    if not (folder / INDEX_NAME).is_file():
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        _atomic_write(memo, digest)
    index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    return folder, index


# ------------------------------------------------------------------------------------------------- the source


def _sample_row(s: dict[str, Any], folder: Path, where: str,
                options: dict[str, str]) -> tuple[dict | None, dict | None]:
    """(row, None) for a usable sample, (None, skip entry) otherwise."""
    name = f"{where}/{s.get('image_member') or s['members'][0]}"
    texts_raw = [v for v in (s.get("txt"), s.get("json"), s.get("cls")) if v is not None]
    if has_invalid_text(texts_raw):
        return None, {"path": name, "reason": "bad-value", "detail": "a .txt/.json/.cls member is not valid UTF-8"}
    meta: dict[str, Any] = {}
    if s.get("json") is not None:
        try:
            meta = json.loads(s["json"])
        except json.JSONDecodeError as e:
            return None, {"path": f"{where}/{s['key']}.json", "reason": "bad-row", "detail": f"invalid JSON: {e.msg}"}
        if not isinstance(meta, dict):
            return None, {"path": f"{where}/{s['key']}.json", "reason": "bad-row", "detail": "not a JSON object"}
    texts = meta.get("texts") if isinstance(meta.get("texts"), list) else [s.get("txt")]
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not s.get("image"):
        reason = "not-an-image" if texts or meta else "empty-row"
        return None, {"path": name, "reason": reason, "detail": f"sample {s['key']!r} has no image member"}
    if s.get("bad_image"):
        return None, {"path": name, **s["bad_image"]}
    label_field = options.get("label", "label")
    label = None
    if label_field:
        label = clean_str(meta.get(label_field)) if label_field in meta else clean_str((s.get("cls") or "").strip())
    split = clean_str(meta.get("split")) or options.get("split") or None
    row = {"id": clean_str(meta.get("id")) or s["key"], "image": str(folder / s["image"]), "texts": texts,
           "label": label, "split": split, "shard": where, "key": s["key"]}
    for k, v in meta.items():
        if k not in _RESERVED and (v is None or isinstance(v, (str, int, float, bool))):
            row[k] = v
    return row, None


def read_wds(target: str, options: dict[str, str], cache_root: Path) -> SourceResult:
    """Rows of every shard ``target`` names (see the module docstring); problems go to ``skipped``."""
    shards = shard_paths(target)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    seen: set[str] = set()
    without_caption = 0
    for shard in shards:
        try:
            folder, index = cached_shard(shard, cache_root)
        except FileNotFoundError:
            skipped.append({"path": shard, "reason": "missing", "detail": "shard file does not exist"})
            continue
        except IsADirectoryError:
            skipped.append({"path": shard, "reason": "is-a-directory"})
            continue
        except OSError as e:
            skipped.append({"path": shard, "reason": "unreadable", "detail": e.strerror or str(e)})
            continue
        if index.get("error"):
            skipped.append({"path": shard, **index["error"]})
        for s in index["samples"]:
            row, skip = _sample_row(s, folder, shard, options)
            if skip is None and row["id"] in seen:
                skip = {"path": f"{shard}/{s['key']}", "reason": "conflict", "detail": f"id {row['id']!r} repeats"}
            if skip is not None:
                skipped.append(skip)
                continue
            seen.add(row["id"])
            without_caption += not row["texts"]
            rows.append(row)
    table = pd.DataFrame(rows)
    if table.empty:
        table = pd.DataFrame(columns=["id", "image", "texts", "label", "split"])
    root = Path(os.path.commonpath([os.path.dirname(p) for p in shards]))
    info = {"wds": {"shards": len(shards), "cache": str(cache_root), "without_caption": without_caption}}
    has_split = not table.empty and table["split"].notna().any()
    return SourceResult(table, root, skipped, info, {"method": "source"} if has_split else None)


def _load_wds(target: str, options: dict[str, str], *, columns: dict, data_home: Path | None) -> SourceResult:
    from ..paths import data_dir

    return read_wds(target, options, (data_home or data_dir()) / CACHE_DIRNAME)


register_source(
    "wds",
    _load_wds,
    "WebDataset tar shards, img2dataset layout (KEY.jpg|png|webp, KEY.txt caption, KEY.json, KEY.cls); "
    "braces expanded: {00000..00099}, {a,b}",
    options=("split", "label"),
    example="wds:shards/{00000..00099}.tar",
)


# ------------------------------------------------------------------------------------------------- export


_SKIP = object()


def _json_value(v: Any) -> Any:
    """A metadata cell as a JSON value, or ``_SKIP``."""
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        try:
            v = v.item()
        except (ValueError, AttributeError):
            return _SKIP
    if v is None or (isinstance(v, float) and v != v):
        return _SKIP
    if isinstance(v, (str, int, float, bool)):
        return v
    return _SKIP


def _add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tf.addfile(info, io.BytesIO(data))


def _sample_members(row: dict[str, Any], key: str, extra: list[str]) -> tuple[list[tuple[str, bytes]], dict | None]:
    """The (member name, bytes) of one item, or ([], skip entry)."""
    image = row.get("image")
    if image is None:
        return [], {"path": str(row["id"]), "reason": "not-an-image", "detail": "a wds sample needs an image"}
    ext = os.path.splitext(str(image))[1].lower()
    try:
        data = Path(image).read_bytes()
    except FileNotFoundError:
        return [], {"path": str(image), "reason": "missing"}
    except OSError as e:
        return [], {"path": str(image), "reason": "unreadable", "detail": e.strerror or str(e)}
    texts = list(row.get("texts") or [])
    meta: dict[str, Any] = {"id": str(row["id"])}
    for col in ("label", "split"):
        if clean_str(row.get(col)) is not None:
            meta[col] = row[col]
    if texts:
        meta["caption"] = texts[0]
    if len(texts) > 1:
        meta["texts"] = texts
    for col in extra:
        v = _json_value(row.get(col))
        if v is not _SKIP:
            meta[col] = v
    members = [(f"{key}{ext or '.jpg'}", data)]
    if texts:
        members.append((f"{key}.txt", texts[0].encode("utf-8")))
    members.append((f"{key}.json", json.dumps(meta, ensure_ascii=False).encode("utf-8")))
    if meta.get("label") is not None:
        members.append((f"{key}.cls", str(meta["label"]).encode("utf-8")))
    return members, None


def _write_shard(path: Path, samples: list[list[tuple[str, bytes]]]) -> None:
    """Write one shard atomically: a temporary file in the same folder, renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tf:
            for members in samples:
                for name, data in members:
                    _add_member(tf, name, data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _chunks(ds: Dataset, shard_size: int, skipped: list[dict[str, Any]]) -> Iterator[list[list[tuple[str, bytes]]]]:
    extra = [c for c in ds.table.columns if c not in _RESERVED]
    chunk: list[list[tuple[str, bytes]]] = []
    n = 0
    for row in ds.table.to_dict("records"):
        members, skip = _sample_members(row, f"{n:09d}", extra)
        if skip is not None:
            skipped.append(skip)
            continue
        n += 1
        chunk.append(members)
        if len(chunk) == shard_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def export_wds(ds: Dataset, out: str | os.PathLike, *, shard_size: int = 1000,
               progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Write ``ds`` as shards ``out/00000.tar``, ... (the layout ``wds:`` reads); return a summary with the spec.

    Image bytes are copied as they are; the caption is the first text (all of them in the JSON's ``texts`` when there
    are several); ``id``, ``label``, ``split`` and scalar metadata columns go into ``KEY.json``, the label also into
    ``KEY.cls``. Items without a readable image are left out and reported in ``skipped``.
    """
    if shard_size < 1:
        raise EncoderlabError(f"shard size must be >= 1, got {shard_size}", "e.g. --shard-size 1000")
    out_dir = Path(out).expanduser().absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    skipped: list[dict[str, Any]] = []
    shards, items = 0, 0
    width = shard_width(-(-len(ds) // shard_size))
    for chunk in _chunks(ds, shard_size, skipped):
        _write_shard(out_dir / f"{shards:0{width}d}.tar", chunk)
        shards += 1
        items += len(chunk)
        if progress is not None:
            progress(items)
    if not shards:
        raise EncoderlabError(f"nothing to export from {ds.source!r}: no item has a readable image",
                              "wds shards hold image samples; check the images with `encoderlab data inspect`")
    return {"data": ds.source, "out": str(out_dir), "shards": shards, "items": items,
            "spec": shards_spec(out_dir, shards, width), "skipped": skipped}
