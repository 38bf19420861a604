"""Build an index directory from vectors and their items, measuring it; append to one without a rebuild.

An index directory holds three files, replaced together (``atomic.replace_entries``; ``index.json`` last, so a
directory with it is complete):

- ``index.faiss``  the FAISS index (inner product over L2-normalised vectors);
- ``items.parquet`` one row per FAISS row: dataset item id, store key, image, caption(s), label, split, modality;
- ``index.json``   kind, build parameters, tuned search knobs, encoder spec and fingerprint, data source, counts,
  and what was measured at build time: recall@10 against exact search on held-out queries, build seconds, bytes
  per vector, queries/s and one-query latency.

Building streams: vectors are read ``chunk`` rows at a time (the IVF kinds train first on a sample), so memory is
the index plus one chunk. ``add_vectors`` appends (every kind here can): the index is read whole (a memory-mapped
index cannot grow), the new rows are added and the three files replaced, one writer at a time (a lock file);
an opened ``SearchIndex`` keeps serving the files it opened until it is opened again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..atomic import replace_entries
from ..errors import EncoderlabError
from .backend import require_faiss
from .items import ITEMS_NAME, ItemTable
from .kinds import (
    DEFAULT_MEMORY,
    TRAIN_PER_LIST,
    IndexPlan,
    apply_knobs,
    choose_plan,
    new_index,
    search_knobs,
    train_size,
)
from .measure import (
    RECALL_K,
    HeldOut,
    compute_truth,
    faiss_searcher,
    measure_speed,
    recall_at_k,
    sample_held_out,
    tune,
)
from .vectors import DEFAULT_CHUNK, VectorSource, iter_chunks

FORMAT = 1
INDEX_NAME = "index.faiss"
META_NAME = "index.json"
OWNED = (INDEX_NAME, ITEMS_NAME, META_NAME)
DEFAULT_RECALL_TARGET = 0.95
MIN_TRAIN_PQ_ROWS = 39 * 16  # 16 centroids per 4-bit sub-quantizer, 39 vectors each (below it FAISS warns)
LOCK_NAME = ".index.lock"


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``index.json`` of an index directory, or an error saying what the directory is instead."""
    d = Path(path).expanduser()
    doc_path = d / META_NAME
    try:
        doc = json.loads(doc_path.read_text())
    except FileNotFoundError:
        what = "does not exist" if not d.exists() else "is not an index directory (no index.json)"
        raise EncoderlabError(f"{d} {what}", "build one with `encoderlab index build --encoder ... --data ... "
                                             "--out DIR`") from None
    except ValueError as e:
        raise EncoderlabError(f"{doc_path} is not valid JSON ({e})", "rebuild the index") from None
    if not isinstance(doc, dict) or doc.get("format", 0) > FORMAT:
        raise EncoderlabError(f"{doc_path} has format {doc.get('format')!r}; this encoderlab reads up to {FORMAT}",
                              "upgrade encoderlab, or rebuild the index")
    return doc


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace an existing index unless ``force``, and a file given as the directory."""
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"index directory {out} is a file", "pass a directory path for --out")
    if (out / META_NAME).exists() and not force:
        doc = read_meta(out)
        raise EncoderlabError(
            f"{out} already holds an index ({doc.get('count')} items, {doc.get('kind')})",
            "pass --force to replace it, or add items with `encoderlab index add --index DIR --data ...`")


def _train(index: Any, plan: IndexPlan, source: VectorSource, held: HeldOut, seed: int) -> float:
    """Train an IVF kind on a sample of rows that are not queries; returns seconds."""
    if not plan.needs_training:
        return 0.0
    t0 = time.perf_counter()
    pool = np.setdiff1d(np.arange(len(source)), held.all_rows, assume_unique=True)
    if len(pool) == 0:
        pool = np.arange(len(source))
    need = MIN_TRAIN_PQ_ROWS if plan.kind == "ivf-pq" else TRAIN_PER_LIST * plan.params["nlist"]
    if len(pool) < need:
        raise EncoderlabError(f"{plan.kind} needs at least {need} vectors besides the held-out queries to train, "
                              f"this collection has {len(pool)}", "use --kind flat (exact) for so few items")
    want = min(len(pool), train_size(plan))
    rows = np.sort(np.random.default_rng(seed + 1).choice(pool, size=want, replace=False))
    index.train(source.take(rows))
    return time.perf_counter() - t0


def _add(index: Any, source: VectorSource, chunk: int, progress: bool) -> float:
    t0 = time.perf_counter()
    for _, X in iter_chunks(source, chunk, progress=progress, desc="add"):
        index.add(X)
    return time.perf_counter() - t0


def measure(index: Any, plan_kind: str, params: dict[str, Any], source: VectorSource, held: HeldOut,
            recall_target: float, progress: bool = False,
            chunk: int = DEFAULT_CHUNK) -> tuple[dict[str, Any], dict[str, Any], list]:
    """Tune the search knob on the tuning queries, then measure recall@10 and speed on the held-out ones.

    Returns ``(knobs, metrics, tuning trace)``; the index gets the chosen knobs.
    """
    if held.eval_truth is None:
        compute_truth(held, source, RECALL_K, progress=progress, chunk=chunk)
    nlist = params.get("nlist")
    search = faiss_searcher(index, plan_kind, nlist)
    knobs = search_knobs(plan_kind, params)
    trace: list = []
    if len(held.tune_rows):
        knobs, trace = tune(search, plan_kind, knobs, nlist, source.take(held.tune_rows), held.tune_rows,
                            held.tune_truth, recall_target)
    apply_knobs(index, plan_kind, knobs)
    Q = source.take(held.eval_rows)
    recall = recall_at_k(search(Q, RECALL_K + 1, knobs), held.eval_truth, held.eval_rows) if len(Q) else None
    metrics: dict[str, Any] = {
        "recall_at_10": None if recall is None else round(recall, 4),
        "recall_target": recall_target,
        "target_met": None if recall is None else bool(recall >= recall_target),
        "queries": int(len(held.eval_rows)),
        "tuning_queries": int(len(held.tune_rows)),
        **measure_speed(search, Q, knobs),
    }
    if held.exact_seconds:
        metrics["exact_seconds"] = round(held.exact_seconds, 3)
    return knobs, metrics, trace


def build_index(source: VectorSource, items: pd.DataFrame | ItemTable, out: str | os.PathLike, *,
                kind: str = "auto", memory: int | str = DEFAULT_MEMORY, recall_target: float = DEFAULT_RECALL_TARGET,
                refine: str | None = None, held_out: HeldOut | None = None, n_eval: int = 1000, n_tune: int = 500,
                seed: int = 0, meta: dict[str, Any] | None = None, force: bool = False, chunk: int = DEFAULT_CHUNK,
                progress: bool = False) -> dict[str, Any]:
    """Build, tune, measure and write an index of ``source`` (row i = ``items`` row i) into ``out``.

    ``meta`` adds sections to ``index.json`` (``encoder``, ``modality``, ``data``, ``store``). ``held_out`` reuses
    query samples and their exact neighbours (a benchmark building several kinds of one collection).
    Returns the ``index.json`` document.
    """
    out = Path(out).expanduser()
    check_out(out, force)
    items = items if isinstance(items, ItemTable) else ItemTable(items)
    if len(items) != len(source):
        raise ValueError(f"{len(items)} items for {len(source)} vectors")
    held = held_out if held_out is not None else sample_held_out(len(source), n_eval, n_tune, seed)
    train_rows = len(source) - len(held.all_rows)
    plan = choose_plan(len(source), source.dim, kind, memory, refine, train_rows=train_rows)
    index, knobs, metrics, trace = _build_measured(plan, source, held, recall_target, seed, chunk, progress)
    fallback = None
    if kind == "auto" and plan.kind == "hnsw" and metrics["target_met"] is False:
        fallback = {"kind": plan.kind, "search": knobs, "recall_at_10": metrics["recall_at_10"],
                    "build_seconds": metrics["build_seconds"]}
        index = None  # its memory goes before the next kind is built
        plan = choose_plan(len(source), source.dim, kind, memory, refine, train_rows=train_rows, skip=("hnsw",))
        index, knobs, metrics, trace = _build_measured(plan, source, held, recall_target, seed, chunk, progress)
    doc = {
        "format": FORMAT, "encoderlab": __version__, "created": _now(), "kind": plan.kind, "factory": plan.factory,
        "metric": "inner_product", "normalized": True, "dim": source.dim, "count": len(source),
        "params": {**plan.params, **knobs}, "search": knobs,
        "choice": {"asked": kind, "memory_budget_bytes": _budget(memory), **plan.to_json(),
                   **({"fallback_from": fallback} if fallback else {})},
        "metrics": metrics, "tuning": trace, "adds": [], **(meta or {}),
    }
    write_index_dir(out, index, items, doc)
    return doc


def _build_measured(plan: IndexPlan, source: VectorSource, held: HeldOut, recall_target: float, seed: int,
                    chunk: int, progress: bool) -> tuple[Any, dict[str, Any], dict[str, Any], list]:
    """Train (IVF kinds), add every vector in chunks, tune and measure: ``(index, knobs, metrics, trace)``."""
    index = new_index(plan)
    train_s = _train(index, plan, source, held, seed)
    add_s = _add(index, source, chunk, progress)
    t0 = time.perf_counter()
    knobs, metrics, trace = measure(index, plan.kind, plan.params, source, held, recall_target, progress, chunk)
    metrics.update(train_seconds=round(train_s, 3), add_seconds=round(add_s, 3),
                   build_seconds=round(train_s + add_s, 3), measure_seconds=round(time.perf_counter() - t0, 3))
    return index, knobs, metrics, trace


def write_index_dir(out: Path, index: Any, items: ItemTable, doc: dict[str, Any]) -> None:
    """Write the three files into ``out`` at once; ``index.json`` gets the measured size of the index file."""
    faiss = require_faiss()
    with replace_entries(out, OWNED, commit=META_NAME) as tmp:
        faiss.write_index(index, str(tmp / INDEX_NAME))
        items.write(tmp / ITEMS_NAME)
        size = (tmp / INDEX_NAME).stat().st_size
        doc["count"] = int(index.ntotal)
        doc.setdefault("metrics", {}).update(index_bytes=size,
                                             bytes_per_vector=round(size / max(1, index.ntotal), 1))
        (tmp / META_NAME).write_text(json.dumps(doc, indent=2, default=_json_default) + "\n")


def add_vectors(path: str | os.PathLike, source: VectorSource, items: pd.DataFrame,
                note: dict[str, Any] | None = None, chunk: int = DEFAULT_CHUNK, progress: bool = False) -> dict:
    """Append ``source`` (row i = ``items`` row i) to the index in ``path``; returns the new ``index.json``.

    The caller leaves out items the index already holds (``ItemTable.find_keys``). Recall was measured when the
    index was built; each add is recorded under ``adds`` so a reader sees how much came later.
    """
    out = Path(path).expanduser()
    read_meta(out)
    with _locked(out):  # two adds at once would each write the old items plus only their own
        return _add_locked(out, source, items, note, chunk, progress)


def _add_locked(out: Path, source: VectorSource, items: pd.DataFrame, note: dict[str, Any] | None, chunk: int,
                progress: bool) -> dict[str, Any]:
    """``add_vectors`` under the directory's lock: the index read whole, grown, and the three files replaced."""
    faiss = require_faiss()
    doc = read_meta(out)
    if source.dim != doc["dim"]:
        raise EncoderlabError(f"new vectors have {source.dim} dimensions, the index {out} has {doc['dim']}",
                              "add items embedded by the index's encoder")
    index = faiss.read_index(str(out / INDEX_NAME))  # whole, not memory-mapped: a mapped index cannot grow
    old = ItemTable.read(out / ITEMS_NAME)
    if index.ntotal != len(old):
        raise EncoderlabError(f"{out}: index.faiss has {index.ntotal} rows but items.parquet {len(old)}",
                              "rebuild the index (its files do not belong together)")
    t0 = time.perf_counter()
    if len(source):
        _add(index, source, chunk, progress)
        new_items = old.appended(items)
    else:
        new_items = old
    doc["adds"] = list(doc.get("adds", [])) + [{"at": _now(), "added": len(source),
                                                "seconds": round(time.perf_counter() - t0, 3), **(note or {})}]
    if len(source):
        write_index_dir(out, index, new_items, doc)
    return doc


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """An exclusive lock on an index directory (``fcntl.flock`` of a hidden file in it) for one writer at a time."""
    import fcntl

    with open(out / LOCK_NAME, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _budget(memory: int | str) -> int:
    from .kinds import parse_memory

    return parse_memory(memory)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
