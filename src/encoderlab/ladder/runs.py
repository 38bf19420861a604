"""Run directories: ``results.json`` (flat metrics, costs, config, data provenance) and ``predictions.parquet``.

A run directory is what a person opens and a program reads; both files are written atomically so an interrupted run
never leaves a half-written result that looks complete.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_write_json
from ..data.manifest import Dataset
from ..hashing import json_digest
from ..paths import runs_dir


@dataclass
class RunResult:
    """One evaluation: ``metrics`` is a flat ``{name: number}`` dict; ``primary`` names the headline metric."""

    task: str
    metrics: dict[str, float]
    costs: dict[str, float]
    config: dict[str, Any]
    data: dict[str, Any]
    primary: str = "top1"
    predictions: pd.DataFrame | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    run_dir: Path | None = None
    #: per test item values by setting (e.g. correctness, seed-averaged for few-shot), for paired comparisons;
    #: not written to results.json (predictions.parquet has the per-item rows)
    per_item: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "task": self.task,
            "primary": self.primary,
            "metrics": _clean(self.metrics),
            "costs": _clean(self.costs),
            "config": self.config,
            "data": self.data,
        }
        out.update(self.extra)
        if self.run_dir is not None:
            out["run_dir"] = str(self.run_dir)
        return out


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """Plain floats/ints (numpy scalars are not JSON) with NaN as null."""
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


def data_provenance(dataset: Dataset, used_rows: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Source, split sizes and a fingerprint of each split's item ids, so a later run can prove it used the same split."""
    t = dataset.table
    splits: dict[str, Any] = {}
    for name in dataset.splits:
        ids = sorted(map(str, t.loc[t["split"] == name, "id"]))
        splits[name] = {"items": len(ids), "fingerprint": json_digest(ids)}
    out: dict[str, Any] = {"source": dataset.source, "items": len(t), "classes": len(dataset.classes),
                           "splits": splits, "split_info": dataset.split_info, "skipped": len(dataset.skipped)}
    if used_rows:
        out["used"] = {k: {"items": len(v), "fingerprint": json_digest(sorted(v))} for k, v in used_rows.items()}
    return out


def default_run_dir(task: str, spec: str) -> Path:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in spec).strip("_")[-50:]
    return runs_dir() / f"{task}-{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def write_run(result: RunResult, out_dir: str | os.PathLike) -> Path:
    """Write ``results.json`` and ``predictions.parquet`` into ``out_dir`` (created), each atomically."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    result.run_dir = out
    if result.predictions is not None:
        fd, tmp = tempfile.mkstemp(dir=out, prefix=".predictions.", suffix=".tmp")
        os.close(fd)
        try:
            result.predictions.to_parquet(tmp, index=False)
            os.replace(tmp, out / "predictions.parquet")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    atomic_write_json(out / "results.json", json.loads(json.dumps(result.to_json(), default=_json_default)))
    return out


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return None if np.isnan(o) else float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)
