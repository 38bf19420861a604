"""The embedding store: content-keyed, sharded, resumable, memory-mapped. Every later step reads from here.

Layout::

    <root>/<fingerprint>/space.json          encoder meta, written once, for humans
    <root>/<fingerprint>/shards/shard-*.npy  2-D float32/float16 rows
    <root>/<fingerprint>/shards/shard-*.json sidecar: keys, shape, dtype, byte size, sha256 (commit record)
    <root>/<fingerprint>/index/              consolidated key index, a cache rebuilt from sidecars at will

A space is one encoder fingerprint (weights + preprocessing + modality + precision); items are keyed by
content (``hashing.image_key`` / ``text_key``), so an image shared by two datasets is encoded once and a
renamed file is not recomputed.

- Commit: a shard's ``.npy`` is written atomically, then its sidecar; only a shard with a sidecar counts, so a
  writer killed at any point loses at most its uncommitted rows. Its leftovers are ignored by readers and
  deleted by the next writer once their owner (host + pid in the name) is gone.
- Concurrency: any number of processes may write one space at once. Shard names are unique per writer and a
  committed shard is never rewritten; readers call ``refresh()`` to see shards committed since they opened.
- Duplicates: a writer skips keys the space (as it last read it) already holds; two writers racing may still
  store a key twice, and readers then take the copy in the first shard in read order (sequence, name), the
  same in every process.
- Integrity: on its first read in a process a shard's size, npy header and sha256 must match its sidecar,
  else ``CorruptStoreError`` names the file and the fix; ``verify()`` / ``repair()`` check or remove shards.
  The index cache records digests of its files: a damaged one is dropped and rebuilt, never trusted (keys it
  could not find would be stored again), and ``verify()`` reports it (``deep``: compared with every sidecar).
- Cleaning up: ``EmbeddingStore.remove_space`` (renamed aside, then deleted) and ``gc`` (files of dead writers,
  spaces of ``local:`` / ``hf:`` model directories that are gone).
- Commits by time: a writer also commits every ``commit_seconds`` (default ``writer.COMMIT_SECONDS``), so
  ``compact()`` merges the short shards this leaves, keeping every key and value at every moment (``compact``).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError, EncoderlabError
from . import shards as _shards
from .space import EmbeddingSpace

_FINGERPRINT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# Where ``remove_space`` moves a space before deleting it; the leading dot keeps it out of every listing.
_REMOVING_PREFIX = ".removing-"
# Encoder spec prefixes whose target may be a model directory on disk (what ``gc`` checks for existence).
_DIR_PREFIXES = ("local", "hf", "hf-vision", "hf-text")


class EmbeddingStore:
    """A directory of embedding spaces, one per encoder fingerprint."""

    def __init__(self, root: str | os.PathLike | None = None, checksum_on_read: bool = True) -> None:
        """``checksum_on_read``: hash each shard fully on its first read in a process (size and header are
        always checked); turn off only for stores on trusted storage where first reads must be cheap."""
        if root is None:
            from ..paths import store_dir

            root = store_dir()
        self.root = Path(root)
        _check_root(self.root)  # a file given as the store fails here, before any work
        self.checksum_on_read = checksum_on_read
        self._spaces: dict[str, EmbeddingSpace] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EmbeddingStore({str(self.root)!r})"

    def space(self, fingerprint: str, meta: Mapping[str, Any] | None = None) -> EmbeddingSpace:
        """The space of one encoder fingerprint, created on first use; ``meta`` goes to ``space.json`` once."""
        if not isinstance(fingerprint, str) or not _FINGERPRINT_RE.match(fingerprint):
            raise EncoderlabError(
                f"invalid encoder fingerprint {fingerprint!r}",
                "a fingerprint is 1-128 letters, digits, '.', '_' or '-' (e.g. a hex digest), used as a directory name",
            )
        with self._lock:
            sp = self._spaces.get(fingerprint)
            if sp is None:
                sp = self._spaces[fingerprint] = EmbeddingSpace(
                    self.root / fingerprint, fingerprint, checksum_on_read=self.checksum_on_read
                )
        if meta is not None:
            sp._write_meta(dict(meta))
        return sp

    def exists(self) -> bool:
        """Whether the store directory exists (a typo in a path must not look like an empty store)."""
        return self.root.is_dir()

    def space_names(self) -> list[str]:
        """Fingerprints of the spaces on disk, sorted, without opening them."""
        if not self.root.is_dir():
            return []
        return [
            d.name
            for d in sorted(self.root.iterdir())
            if d.is_dir() and _FINGERPRINT_RE.match(d.name) and ((d / "space.json").exists() or (d / "shards").is_dir())
        ]

    def spaces(self) -> list[dict[str, Any]]:
        """One summary per space on disk: fingerprint, meta, items, shards, dim, bytes (and problem, if any)."""
        return [self.space(name).summary() for name in self.space_names()]

    def resolve(self, prefix: str) -> str:
        """The one space whose fingerprint is ``prefix`` or starts with it; ambiguous or unknown prefixes fail."""
        names = self.space_names()
        if prefix in names:
            return prefix
        found = [n for n in names if prefix and n.startswith(prefix)]
        if len(found) == 1:
            return found[0]
        if found:
            raise EncoderlabError(
                f"space prefix {prefix!r} matches {len(found)} spaces in store {self.root}: "
                + ", ".join(n[:16] for n in found[:5]) + (" ..." if len(found) > 5 else ""),
                "give more characters of the fingerprint (see `encoderlab store list`)",
            )
        raise EncoderlabError(f"no space {prefix!r} in store {self.root}", "see `encoderlab store list` for the spaces")

    def remove_space(self, fingerprint: str, dry_run: bool = False) -> dict[str, Any]:
        """Delete one space (exact fingerprint); returns fingerprint, path, meta, files and bytes (freed).

        The directory is first renamed aside in one step, so a reader or writer never sees half a space: a reader
        then finds its shards gone (``ShardRemovedError``, then missing keys), a writer still running recreates the
        space with only its own later shards. A removal killed midway leaves a hidden directory ``gc`` deletes.
        """
        if fingerprint not in self.space_names():
            raise EncoderlabError(f"no space {fingerprint!r} in store {self.root}", "see `encoderlab store list`")
        path = self.root / fingerprint
        files, size = _tree_size(path)
        meta = None
        with contextlib.suppress(CorruptStoreError):
            meta = self.space(fingerprint).meta
        out = {"fingerprint": fingerprint, "path": str(path), "meta": meta, "files": files, "bytes": size,
               "removed": False}
        if dry_run:
            return out
        aside = self.root / f"{_REMOVING_PREFIX}{fingerprint}-{secrets.token_hex(4)}"
        try:
            os.replace(path, aside)
        except OSError as e:
            raise _shards.write_error(e, path, self.root) or EncoderlabError(
                f"cannot remove space {path}: {e.strerror or e}", "check the store's permissions"
            ) from None
        with self._lock:
            sp = self._spaces.pop(fingerprint, None)
        if sp is not None:
            sp.forget()
        shutil.rmtree(aside, ignore_errors=True)
        out["removed"] = True
        return out

    def gc(self, dry_run: bool = False) -> dict[str, Any]:
        """Delete what no run needs: files of writers that died mid-write, half-removed spaces, and spaces whose
        encoder is a ``local:`` / ``hf:`` model directory that no longer exists (e.g. a test's temporary model).

        Returns ``orphans`` and ``spaces`` (what was, or with ``dry_run`` would be, removed) and ``bytes`` freed.
        Spaces of hub ids or relative paths are kept: whether they still exist cannot be told from here.
        """
        orphans: list[dict[str, Any]] = []
        spaces: list[dict[str, Any]] = []
        if self.root.is_dir():
            for d in sorted(self.root.iterdir()):
                if d.is_dir() and d.name.startswith(_REMOVING_PREFIX):
                    files, size = _tree_size(d)
                    orphans.append({"kind": "removed-space", "path": str(d), "bytes": size})
                    if not dry_run:
                        shutil.rmtree(d, ignore_errors=True)
        for name in self.space_names():
            sp = self.space(name)
            for o in _shards.find_orphans(sp.shards_dir):
                if not o["removable"]:
                    continue
                try:
                    size = Path(o["path"]).stat().st_size
                    if not dry_run:
                        os.unlink(o["path"])
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise _shards.write_error(e, Path(o["path"]), self.root) or e from None
                orphans.append({"kind": o["problem"], "space": name, "path": o["path"], "bytes": size})
            try:
                spec = (sp.meta or {}).get("spec")
            except CorruptStoreError:
                continue
            model_dir = _spec_dir(spec)
            if model_dir is not None and not model_dir.exists():
                done = self.remove_space(name, dry_run=dry_run)
                spaces.append({**done, "reason": f"encoder directory {model_dir} no longer exists"})
        total = sum(o["bytes"] for o in orphans) + sum(s["bytes"] for s in spaces)
        return {"store": str(self.root), "dry_run": dry_run, "orphans": orphans, "spaces": spaces, "bytes": total}

    def stats(self) -> dict[str, Any]:
        """Totals over all spaces."""
        spaces = self.spaces()
        return {
            "root": str(self.root),
            "spaces": len(spaces),
            "items": sum(s["items"] or 0 for s in spaces),
            "shards": sum(s["shards"] for s in spaces),
            "bytes": sum(s["bytes"] for s in spaces),
            "problems": sum(1 for s in spaces if s.get("problem")),
        }


def _check_root(root: Path) -> None:
    """Refuse a store root that is a file (or lies under one), naming it, before anything reads or writes."""
    base = _shards.nearest_existing(root)
    if base.exists() and not base.is_dir():
        where = f"{root} is a file" if base == root else f"{root} is under {base}, which is a file"
        raise EncoderlabError(
            f"embedding store {where}, not a directory",
            "pass a directory as --store (or EmbeddingStore(root)); a missing one is created on the first write",
        )


def _tree_size(path: Path) -> tuple[int, int]:
    """(files, bytes) under ``path`` (files that vanish meanwhile are skipped)."""
    files = size = 0
    for dirpath, _, names in os.walk(path):
        for n in names:
            with contextlib.suppress(OSError):
                size += os.lstat(os.path.join(dirpath, n)).st_size
                files += 1
    return files, size


def _spec_dir(spec: Any) -> Path | None:
    """The model directory an encoder spec names (``local:DIR``, ``hf:/abs/dir``), None for hub ids and the like.

    Only absolute (or ``~``) paths count: a relative one was relative to a working directory not recorded.
    """
    if not isinstance(spec, str):
        return None
    prefix, sep, target = spec.partition(":")
    if not sep or prefix not in _DIR_PREFIXES or not target:
        return None
    path = Path(target.split("?", 1)[0]).expanduser()
    return path if path.is_absolute() else None
