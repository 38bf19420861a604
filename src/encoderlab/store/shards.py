"""Embedding shards on disk: a ``.npy`` of rows plus a JSON sidecar that is the shard's commit record.

A shard is written in two atomic steps: the ``.npy`` (temp file, fsync, rename), then its sidecar. A shard
exists only once its sidecar does, so a writer killed between the two steps leaves an orphan ``.npy`` that
readers ignore and the next writer deletes. Shard names carry a sequence number (for a stable read order),
a host tag and pid (so an orphan's owner can be checked for liveness) and a random token (so two writers
never pick the same name).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import io
import json
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..errors import EncoderlabError

FORMAT = 1
SUPPORTED_DTYPES = ("float32", "float16")
# An orphan whose owner cannot be checked (another host, or a reused pid) is deleted only after this long.
ORPHAN_GRACE_S = 6 * 3600
MAX_KEY_CHARS = 1024

_NAME_RE = re.compile(r"^shard-(\d{6,})-([0-9a-f]{6})-(\d+)-([0-9a-f]{8})$")
# atomic_open's temp files are ".<target name>.<random>.tmp"
_TMP_RE = re.compile(r"^\.(shard-\d{6,}-[0-9a-f]{6}-\d+-[0-9a-f]{8})\.(?:npy|json)\.[^.]*\.tmp$")
_CHUNK = 1 << 20
# Shards written by compaction carry this host tag and pid (no process has pid 0) and tokens counting down from
# ffffffff: a merged shard sorts before every other shard of its sequence number, the place compaction relies on
# (see ``store.compact``). Their uncommitted files are only ever deleted by the holder of the compaction lock.
MERGED_HOST, MERGED_PID = "000000", 0


def host_tag() -> str:
    """Six hex characters naming this host, so orphan cleanup only judges liveness of local pids."""
    return hashlib.blake2b(socket.gethostname().encode("utf-8"), digest_size=3).hexdigest()


def new_shard_name(seq: int) -> str:
    """A shard name no other writer (process, thread or host) can produce."""
    return f"shard-{seq:06d}-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"


def merged_shard_name(seq: int, taken: set[str]) -> str:
    """The name of a merged shard of sequence ``seq`` that sorts before every name in ``taken`` with that sequence."""
    prefix = f"shard-{seq:06d}-{MERGED_HOST}-{MERGED_PID}-"
    tokens = [int(n[len(prefix) :], 16) for n in taken if n.startswith(prefix)]
    token = min(tokens, default=1 << 32) - 1
    if token < 0:  # pragma: no cover - 2**32 compactions of one sequence number
        raise EncoderlabError(f"no merged shard name left for sequence {seq}", "leave these shards as they are")
    return f"{prefix}{token:08x}"


def is_merged_name(name: str) -> bool:
    """Whether a shard name (no extension) is one that compaction wrote."""
    m = _NAME_RE.match(name)
    return bool(m) and m.group(2) == MERGED_HOST and m.group(3) == str(MERGED_PID)


def shard_seq(name: str) -> int:
    """The sequence number in a shard name (-1 for a name this module did not produce)."""
    m = _NAME_RE.match(name)
    return int(m.group(1)) if m else -1


def is_shard_name(name: str) -> bool:
    return _NAME_RE.match(name) is not None


@dataclass(frozen=True)
class ShardRecord:
    """What a sidecar promises about its ``.npy``: shape, dtype, byte size and checksum."""

    name: str  # without extension
    rows: int
    dim: int
    dtype: str
    nbytes: int
    checksum: str  # "sha256:<hex>" of the whole .npy file

    @property
    def npy_name(self) -> str:
        return self.name + ".npy"

    @property
    def sidecar_name(self) -> str:
        return self.name + ".json"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": self.rows,
            "dim": self.dim,
            "dtype": self.dtype,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
        }

    @classmethod
    def from_json(cls, obj: Any, name: str) -> ShardRecord:
        """Validate a parsed sidecar (or index entry); raises ValueError saying which field is wrong."""
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        for field, typ in (("rows", int), ("dim", int), ("nbytes", int), ("dtype", str), ("checksum", str)):
            if not isinstance(obj.get(field), typ) or isinstance(obj.get(field), bool):
                raise ValueError(f"field {field!r} is {obj.get(field)!r}")
        if obj["rows"] < 1 or obj["dim"] < 1 or obj["nbytes"] < 1:
            raise ValueError(f"rows={obj['rows']}, dim={obj['dim']}, nbytes={obj['nbytes']} must be positive")
        if obj["dtype"] not in SUPPORTED_DTYPES:
            raise ValueError(f"dtype {obj['dtype']!r} is not one of {SUPPORTED_DTYPES}")
        if not obj["checksum"].startswith("sha256:"):
            raise ValueError(f"checksum {obj['checksum']!r} is not 'sha256:<hex>'")
        return cls(name, obj["rows"], obj["dim"], obj["dtype"], obj["nbytes"], obj["checksum"])


# ---------------------------------------------------------------------------------------------- keys


def check_keys(keys: Any) -> list[str]:
    """Keys as a list of non-empty strings without newline or NUL (the sidecar joins them with newlines)."""
    if isinstance(keys, (str, bytes)):
        raise EncoderlabError(f"keys must be a sequence of strings, got a single {type(keys).__name__} {keys!r:.60}")
    out = list(keys)
    # Whole-list checks run at C speed; the per-key loop only runs to name the offending key.
    ok = all(isinstance(k, str) for k in out) if set(map(type, out)) - {str} else True
    if ok and out:
        joined = "\n".join(out)
        ok = (
            joined.count("\n") == len(out) - 1
            and "\x00" not in joined
            and min(map(len, out)) > 0
            and max(map(len, out)) <= MAX_KEY_CHARS
        )
    if not ok:
        for k in out:
            if not isinstance(k, str) or not k or "\n" in k or "\x00" in k or len(k) > MAX_KEY_CHARS:
                raise EncoderlabError(
                    f"invalid embedding key {k!r:.80}",
                    f"keys are non-empty strings of at most {MAX_KEY_CHARS} characters without newline or NUL,"
                    " e.g. from encoderlab.hashing.image_key / text_key",
                )
    return out


def keys_to_blob(keys: list[str]) -> str:
    return "\n".join(keys)


def blob_to_keys(blob: str, rows: int) -> np.ndarray:
    """Decode a sidecar's key blob into a bytes array (``S<width>``); fixed-width keys take a copy-free path."""
    raw = blob.encode("utf-8")
    if b"\x00" in raw:
        raise ValueError("keys contain a NUL byte")
    if rows > 0:
        width = raw.find(b"\n")
        if rows == 1:
            width = len(raw) if width < 0 else -1
        if width > 0 and len(raw) + 1 == rows * (width + 1):
            grid = np.frombuffer(raw + b"\n", dtype=np.uint8).reshape(rows, width + 1)
            if (grid[:, width] == 10).all():
                return np.ascontiguousarray(grid[:, :width]).view(f"S{width}").reshape(rows)
    parts = raw.split(b"\n")
    if len(parts) != rows:
        raise ValueError(f"sidecar lists {len(parts)} keys for {rows} rows")
    if any(not p for p in parts):
        raise ValueError("sidecar lists an empty key")
    return np.array(parts, dtype=bytes)


# --------------------------------------------------------------------------------------- write errors

_DISK_FULL = {errno.ENOSPC} | ({errno.EDQUOT} if hasattr(errno, "EDQUOT") else set())
_READ_ONLY = {errno.EACCES, errno.EPERM, errno.EROFS}


def write_error(e: OSError, path: Path, store: Path) -> EncoderlabError | None:
    """The user's words for an OSError while writing ``path`` of the store at ``store`` (None: another error).

    Disk full and permission errors are the environment, not a bug: they get the file, the cause and the fix.
    """
    if e.errno in _DISK_FULL:
        return EncoderlabError(
            f"cannot write {path}: disk full ({e.strerror or e})",
            f"free space on the disk holding {store} or pass --store on another disk; "
            "embeddings committed so far are kept, so rerunning resumes",
        )
    if e.errno in _READ_ONLY:
        return read_only_error(store, path, e.strerror or str(e))
    return None


def read_only_error(store: Path, path: Path, why: str) -> EncoderlabError:
    return EncoderlabError(
        f"store {store} is read-only: cannot write {path} ({why})",
        "pass a writable --store (e.g. a copy of this one), or get write permission; "
        "reading embeddings it already holds works without it",
    )


def nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (what a ``mkdir(parents=True)`` would write into)."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_writable(path: Path, store: Path) -> None:
    """Fail with ``read_only_error`` unless files can be created in ``path`` (or where it would be created)."""
    target = nearest_existing(path)
    if target.is_dir() and not os.access(target, os.W_OK | os.X_OK):
        raise read_only_error(store, path, f"no write permission on {target}")


# ------------------------------------------------------------------------------------------- writing


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _write_npy(path: Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def _write_sidecar(path: Path, obj: dict[str, Any]) -> None:
    # Separate from _write_npy so tests can kill a process between the two steps.
    with atomic_open(path, "wb") as f:
        f.write((json.dumps(obj, sort_keys=True) + "\n").encode("utf-8"))


def write_shard(directory: Path, name: str, keys: list[str], array: np.ndarray) -> ShardRecord:
    """Write ``array`` (rows aligned to ``keys``) as shard ``name``; returns its record once committed."""
    data = encode_npy(array)
    rec = ShardRecord(
        name=name,
        rows=int(array.shape[0]),
        dim=int(array.shape[1]),
        dtype=str(array.dtype),
        nbytes=len(data),
        checksum="sha256:" + hashlib.sha256(data).hexdigest(),
    )
    npy, sidecar = directory / rec.npy_name, directory / rec.sidecar_name
    if npy.exists() or sidecar.exists():  # never overwrite a committed shard
        raise FileExistsError(f"shard {sidecar} already exists")
    _write_npy(npy, data)
    obj = {
        "format": FORMAT,
        "shard": rec.npy_name,
        **{k: v for k, v in rec.to_json().items() if k != "name"},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "writer": {"host": socket.gethostname(), "pid": os.getpid()},
        "keys": keys_to_blob(keys),
    }
    _write_sidecar(sidecar, obj)
    return rec


# ------------------------------------------------------------------------------------------- reading


def read_sidecar(path: Path) -> tuple[ShardRecord, np.ndarray]:
    """Parse and validate a sidecar; raises ValueError (with the reason) for anything malformed."""
    name = path.name[: -len(".json")]
    try:
        obj = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"invalid JSON: {e}") from None
    rec = ShardRecord.from_json(obj, name)
    if obj.get("format") != FORMAT:
        raise ValueError(f"format {obj.get('format')!r} is not {FORMAT}")
    if not isinstance(obj.get("keys"), str):
        raise ValueError("field 'keys' is missing")
    return rec, blob_to_keys(obj["keys"], rec.rows)


def list_shard_files(directory: Path) -> tuple[list[str], set[str], list[str]]:
    """(sorted committed shard names, names that have a .npy, temp file names) in a shards directory."""
    sidecars: list[str] = []
    npys: set[str] = set()
    temps: list[str] = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return [], set(), []
    for e in entries:
        n = e.name
        if n.endswith(".json") and is_shard_name(n[:-5]):
            sidecars.append(n[:-5])
        elif n.endswith(".npy") and is_shard_name(n[:-4]):
            npys.add(n[:-4])
        elif _TMP_RE.match(n):
            temps.append(n)
    sidecars.sort(key=lambda s: (shard_seq(s), s))
    return sidecars, npys, temps


def file_checksum(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def check_shard(directory: Path, rec: ShardRecord, deep: bool) -> tuple[str, str] | None:
    """(problem, detail) when the ``.npy`` does not match its sidecar, else None.

    Always checks presence, byte size and the npy header; ``deep`` also recomputes the checksum.
    """
    path = directory / rec.npy_name
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing-npy", f"{rec.npy_name} is missing but its sidecar says it holds {rec.rows} rows"
    if size != rec.nbytes:
        what = "truncated" if size < rec.nbytes else "too long"
        return "size-mismatch", f"{rec.npy_name} has {size} bytes, its sidecar expects {rec.nbytes} ({what})"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format version {version} is not one encoderlab writes")
    except Exception as e:  # numpy's header parser raises ValueError, SyntaxError, tokenize errors...
        return "bad-header", f"{rec.npy_name} has an unreadable npy header ({e})"
    if tuple(shape) != (rec.rows, rec.dim) or str(dtype) != rec.dtype:
        return "bad-header", (
            f"{rec.npy_name} holds {dtype} {tuple(shape)}, its sidecar expects {rec.dtype} {(rec.rows, rec.dim)}"
        )
    if deep:
        got = file_checksum(path)
        if got != rec.checksum:
            return "checksum-mismatch", f"{rec.npy_name} checksum {got[:19]}... differs from its sidecar's"
    return None


# ----------------------------------------------------------------------------------------- orphans


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def owner_gone(file_name: str, mtime: float, now: float | None = None) -> bool:
    """Whether the writer that produced an uncommitted file is certainly gone, so the file can be deleted."""
    now = time.time() if now is None else now
    if now - mtime > ORPHAN_GRACE_S:
        return True
    base = file_name
    m = _TMP_RE.match(file_name)
    if m:
        base = m.group(1)
    elif file_name.endswith(".npy"):
        base = file_name[:-4]
    parts = _NAME_RE.match(base)
    if not parts or parts.group(2) != host_tag():
        return False
    pid = int(parts.group(3))
    return pid != os.getpid() and not _pid_alive(pid)


def find_orphans(directory: Path) -> list[dict[str, Any]]:
    """Uncommitted files (an ``.npy`` without sidecar, temp files) with whether their writer is gone."""
    sidecars, npys, temps = list_shard_files(directory)
    committed = set(sidecars)
    found = []
    now = time.time()
    names = [(n + ".npy", "orphan-npy") for n in sorted(npys - committed)] + [(t, "temp-file") for t in temps]
    for fname, problem in names:
        path = directory / fname
        try:
            mtime = path.stat().st_mtime
        except FileNotFoundError:
            continue  # committed or cleaned up meanwhile
        gone = owner_gone(fname, mtime, now)
        found.append(
            {
                "kind": "orphan",
                "problem": problem,
                "shard": fname,
                "path": str(path),
                "detail": "left by an interrupted write; ignored"
                + ("" if gone else " (its writer may still be running; kept)"),
                "removable": gone,
            }
        )
    return found


def _base_name(file_name: str) -> str:
    """The shard name an uncommitted file belongs to (a temp file or an ``.npy`` without sidecar)."""
    m = _TMP_RE.match(file_name)
    if m:
        return m.group(1)
    return file_name[:-4] if file_name.endswith(".npy") else file_name


def remove_merged_orphans(directory: Path) -> list[str]:
    """Delete uncommitted files of merged shards (a compaction that was killed); call only holding the compaction
    lock, which is what makes their writer certainly gone."""
    removed = []
    for o in find_orphans(directory):
        if is_merged_name(_base_name(o["shard"])):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(o["path"])
                removed.append(o["path"])
    return removed


def remove_orphans(directory: Path) -> list[str]:
    """Delete uncommitted files whose writer is gone; returns the deleted paths."""
    removed = []
    for o in find_orphans(directory):
        if o["removable"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(o["path"])
                removed.append(o["path"])
    return removed
