"""``RunResult`` and run directories: the one writer and the one reader of what a run leaves behind.

A run directory holds ``results.json`` (schema ``SCHEMA_VERSION``: task, primary metric, flat metrics, costs, config,
data provenance, and any extra sections), optionally ``predictions.parquet`` (one row per evaluated item) and
``skipped.jsonl`` (one ``{path, reason}`` per unusable input). Every file is written atomically, so an interrupted
run never leaves a half-written result that looks complete; directories are created exclusively, so two runs
finishing in the same second never share one.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_open, atomic_write_json, atomic_write_text
from ..data.manifest import Dataset
from ..errors import EncoderlabError
from ..hashing import json_digest
from ..paths import runs_dir

SCHEMA_VERSION = 1
RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.parquet"
SKIPPED_NAME = "skipped.jsonl"
_CORE_KEYS = ("schema_version", "task", "primary", "metrics", "costs", "config", "data", "run_dir")


@dataclass
class RunResult:
    """One evaluation or job: ``metrics`` is a flat ``{name: number}`` dict; ``primary`` names the headline metric.

    ``extra`` holds further JSON sections (a comparison's table, per-setting records); ``skipped`` the inputs that
    could not be used (written to ``skipped.jsonl``); ``per_item`` per-test-item values by setting (correctness,
    seed-averaged for few-shot) for paired comparisons, kept in memory only (``predictions.parquet`` has the rows).
    """

    task: str
    metrics: dict[str, Any]
    costs: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any]
    primary: str = "top1"
    predictions: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    per_item: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        """The ``results.json`` document: plain JSON types only (numpy scalars converted, NaN as null)."""
        out: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "task": self.task,
            "primary": self.primary,
            "metrics": clean_numbers(self.metrics),
            "costs": clean_numbers(self.costs),
            "config": self.config,
            "data": self.data,
        }
        clash = set(self.extra) & set(_CORE_KEYS)
        if clash:
            raise ValueError(f"extra sections {sorted(clash)} would overwrite core keys of results.json")
        out.update(self.extra)
        if self.run_dir is not None:
            out["run_dir"] = str(self.run_dir)
        return json.loads(json.dumps(out, default=json_default))


def clean_numbers(d: dict[str, Any]) -> dict[str, Any]:
    """Plain floats/ints (numpy scalars are not JSON), rounded to 6 digits, with NaN as null."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, (np.floating, float)):
            v = float(v)
            out[k] = None if np.isnan(v) else round(v, 6)
        elif isinstance(v, (np.integer, int)) and not isinstance(v, bool):
            out[k] = int(v)
        else:
            out[k] = v
    return out


def json_default(o: Any) -> Any:
    """numpy scalars and arrays as plain JSON numbers and lists (NaN as null), paths as strings."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def data_provenance(dataset: Dataset, used_rows: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Source, split sizes and a fingerprint of each split's item ids (a later run can prove it used the same split)."""
    t = dataset.table
    splits: dict[str, Any] = {}
    for name in dataset.splits:
        ids = sorted(map(str, t.loc[t["split"] == name, "id"]))
        splits[name] = {"items": len(ids), "fingerprint": json_digest(ids)}
    out: dict[str, Any] = {"source": dataset.source, "items": len(t), "classes": len(dataset.classes),
                           "splits": splits, "split_info": dataset.split_info, "skipped": len(dataset.skipped)}
    if dataset.classes:  # a labelled dataset: how many items lack a label (classification leaves them out)
        out["unlabelled"] = int(t["label"].isna().sum())
    if used_rows:
        out["used"] = {k: {"items": len(v), "fingerprint": json_digest(sorted(v))} for k, v in used_rows.items()}
    return out


def slug(text: str, limit: int = 50) -> str:
    """A file-name-safe tail of ``text`` (an encoder spec, a task)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-limit:] or "run"


def default_run_dir(task: str, spec: str, parent: str | os.PathLike | None = None) -> Path:
    """Create and return a new, empty run directory ``{task}-{YYYYmmdd-HHMMSS}-{spec slug}[-N]`` under ``parent``.

    Creation is exclusive (``mkdir`` without ``exist_ok``): a second run in the same second gets ``-2``, ``-3``, ...
    and never writes into another run's directory.
    """
    root = Path(parent).expanduser() if parent is not None else runs_dir()
    check_out_dir(root, "the runs directory", "set ENCODERLAB_HOME to a directory you can write to, or pass --out")
    _make_dir(root, "the runs directory")
    base = f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{slug(spec)}"
    for n in range(1, 10_000):
        path = root / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise EncoderlabError(f"could not create a fresh run directory for {base!r} in {root}")  # pragma: no cover


def resolve_run_dir(out: str | os.PathLike | None, task: str, spec: str) -> Path:
    """``--out`` as given (created if missing), else a fresh ``default_run_dir``; checked by ``check_out_dir``."""
    if out is None:
        return default_run_dir(task, spec)
    path = Path(out).expanduser()
    check_out_dir(path)
    _make_dir(path, "--out")
    return path


def check_out_dir(path: Path, what: str = "--out", fix: str = "pass a --out in a directory you can write to") -> None:
    """Fail with the reason when ``path`` cannot be (or become) a directory this process writes into.

    Checked before any work, so a bad ``--out`` is reported in the user's terms at once instead of as an
    internal error after the computing: a file, a path under a file, or a directory (or the nearest existing
    parent it would be created in) that is not writable.
    """
    if path.exists() and not path.is_dir():
        raise EncoderlabError(f"{what} {str(path)!r} is a file, not a directory",
                              "pass a directory path (a new one is created)")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():  # a parent of the path is a file: mkdir would fail with "Not a directory"
        raise EncoderlabError(f"{what} {str(path)!r} lies under {str(existing)!r}, which is a file",
                              "pass a directory path that is not inside a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = ("is not writable" if existing == path
                 else f"would be created in {str(existing)!r}, which is not writable")
        raise EncoderlabError(f"{what} {str(path)!r} {where}", fix)


def _make_dir(path: Path, what: str) -> None:
    """``mkdir -p`` whose failure (a read-only file system, a race with a file) is one line naming ``what``."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EncoderlabError(f"cannot create {what} {str(path)!r}: {e.strerror or e}",
                              "pass a directory path you can write to") from None


def write_run(result: RunResult, out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` (and ``predictions.parquet``, ``skipped.jsonl`` when present) into ``out_dir``.

    Each file is replaced atomically; ``results.json`` goes last, so its presence means the run is complete.
    """
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result.run_dir = out
    if result.predictions is not None:
        with atomic_open(out / PREDICTIONS_NAME, "wb") as f:
            result.predictions.to_parquet(f, index=False)
    if result.skipped is not None:
        atomic_write_text(out / SKIPPED_NAME, "".join(json.dumps(s, default=str) + "\n" for s in result.skipped))
    atomic_write_json(out / RESULTS_NAME, result.to_json())
    return out


def read_run(run_dir: str | os.PathLike, *, predictions: bool = True) -> RunResult:
    """Load a run directory written by ``write_run`` (any task), checking the schema version."""
    path = Path(run_dir).expanduser()
    doc_path = path / RESULTS_NAME
    try:
        doc = json.loads(doc_path.read_text())
    except FileNotFoundError:
        raise EncoderlabError(f"{str(path)!r} holds no {RESULTS_NAME}", "point at a finished run directory") from None
    except ValueError as e:
        raise EncoderlabError(f"{doc_path} is not valid JSON ({e})", "rerun the job that wrote it") from None
    version = doc.get("schema_version")
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        raise EncoderlabError(f"{doc_path} has schema_version {version!r}; this encoderlab reads up to "
                              f"{SCHEMA_VERSION}", "upgrade encoderlab, or rerun the job")
    preds = None
    if predictions and (path / PREDICTIONS_NAME).is_file():
        preds = pd.read_parquet(path / PREDICTIONS_NAME)
    skipped = None
    if (path / SKIPPED_NAME).is_file():
        skipped = [json.loads(line) for line in (path / SKIPPED_NAME).read_text().splitlines() if line.strip()]
    extra = {k: v for k, v in doc.items() if k not in _CORE_KEYS}
    return RunResult(doc["task"], doc.get("metrics", {}), doc.get("costs", {}), doc.get("config", {}),
                     doc.get("data", {}), primary=doc.get("primary", "top1"), predictions=preds, extra=extra,
                     run_dir=path, skipped=skipped)
