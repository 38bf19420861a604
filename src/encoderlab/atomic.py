"""Atomic file and directory writes: write to a temporary sibling, fsync, then rename over the target.

A reader (or a run resumed after kill -9) sees either the old file or the complete new one, never a partial write.
``replace_entries`` does the same for a saved model's own files inside a directory, keeping everything else a user
put there.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from .errors import EncoderlabError


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary sibling of ``path`` for writing; on success it replaces ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results should be as readable as any other
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _read_umask() -> int:
    # os.umask can only be read by setting it; done once at import, before any worker threads exist.
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def process_umask() -> int:
    """The process umask read at import: new files and directories get ``0o666 / 0o777 & ~umask``."""
    return _UMASK


ASIDE_SUFFIX = ".old"  # previous entries moved aside by ``replace_entries``, removed once the swap is done


@contextlib.contextmanager
def replace_entries(path: str | os.PathLike, owned: Collection[str], *, commit: str) -> Iterator[Path]:
    """Yield a temporary sibling directory to fill; on success its entries replace the ``owned`` entries of ``path``.

    Entries of ``path`` that are not ``owned`` (a user's notes, a run they wrote there) are kept as they are; owned
    entries the new content lacks are removed (they belonged to the previous content). ``commit`` is the entry
    whose presence makes ``path`` count as complete (a model's config): it is moved out first and in last.

    Each entry moves with one ``os.replace`` (same filesystem, so nothing is copied). The crash window is the few
    renames between moving the previous ``commit`` aside and moving the new one in: a process killed there leaves
    ``path`` without ``commit``, so it never loads as a mix of previous and new entries; the previous entries are
    in the sibling ``.NAME.*.old`` (see ``interrupted_saves``; those not moved yet are still in ``path``), so moving
    them back restores it. An exception in that window (or in the body) moves everything back itself.
    """
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"output path {str(out)!r} is a file", "pass a directory path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        new = sorted(p.name for p in tmp.iterdir())
        foreign = [n for n in new if n not in owned]
        if foreign or commit not in new:  # a caller's bug, not a user error
            raise ValueError(f"replace_entries: {foreign} are not owned entries, or {commit!r} was not written")
        if not out.exists():
            os.replace(tmp, out)  # a new directory: one rename, nothing to keep
        else:
            _swap_entries(out, tmp, [n for n in new if n != commit] + [commit], owned, commit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _fsync_dir(out.parent)


def _swap_entries(out: Path, new_dir: Path, new: list[str], owned: Collection[str], commit: str) -> None:
    """Move the owned entries of ``out`` aside (``commit`` first), then ``new`` in (``commit`` last); undo on error."""
    previous = [n for n in owned if os.path.lexists(out / n)]
    previous.sort(key=lambda n: n != commit)  # the commit entry leaves first
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=ASIDE_SUFFIX, dir=out.parent))
    moved_out: list[str] = []
    moved_in: list[str] = []
    try:
        for name in previous:
            os.replace(out / name, aside / name)
            moved_out.append(name)
        for name in new:
            os.replace(new_dir / name, out / name)
            moved_in.append(name)
    except BaseException:
        # Undo in reverse: the new commit entry (if it got in) leaves first, the previous one comes back last.
        for name in reversed(moved_in):
            os.replace(out / name, new_dir / name)
        for name in reversed(moved_out):
            os.replace(aside / name, out / name)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    _fsync_dir(out)


def interrupted_saves(path: str | os.PathLike) -> list[Path]:
    """Sibling directories a killed ``replace_entries`` left behind for ``path``, holding previous entries."""
    out = Path(path)
    if not out.parent.is_dir():
        return []
    return sorted(p for p in out.parent.glob(f".{glob.escape(out.name)}.*{ASIDE_SUFFIX}") if p.is_dir())


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not supported everywhere (e.g. Windows), where it is a no-op.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")
