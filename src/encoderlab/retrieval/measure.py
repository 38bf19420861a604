"""Measuring an index against exact search: held-out queries, streamed exact neighbours, recall@k, tuning, speed.

The queries are stored vectors held out of training (they stay in the index: they are items of the collection).
Each query's own row is left out of both the exact and the approximate neighbours, so a query finding itself counts
for nothing: recall@10 is the share of the 10 true nearest *other* items that the index returns in its top 10.
Two disjoint samples are drawn: one tunes the search knob (efSearch / nprobe), the other measures the result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backend import require_faiss
from .kinds import IVF_KINDS, search_parameters
from .vectors import DEFAULT_CHUNK, VectorSource, iter_chunks

RECALL_K = 10
EF_GRID = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
K_FACTORS = (2, 4, 8, 16)
GT_CHUNK = 16_384  # rows per exact-search block: 1,500 queries x 16k rows of scores stay under 100 MB


@dataclass
class HeldOut:
    """Query rows held out of training: ``eval_rows`` measure, ``tune_rows`` choose the knob; exact neighbours of
    each (``*_truth``, ``[n, k + 1]`` rows, best first, the query itself possibly among them)."""

    eval_rows: np.ndarray
    tune_rows: np.ndarray
    eval_truth: np.ndarray | None = None
    tune_truth: np.ndarray | None = None
    exact_seconds: float | None = None

    @property
    def all_rows(self) -> np.ndarray:
        return np.concatenate([self.eval_rows, self.tune_rows])

    def save(self, path: str) -> None:
        np.savez(path, eval_rows=self.eval_rows, tune_rows=self.tune_rows, eval_truth=self.eval_truth,
                 tune_truth=self.tune_truth, exact_seconds=np.float64(self.exact_seconds or 0.0))

    @classmethod
    def load(cls, path: str) -> HeldOut:
        z = np.load(path)
        return cls(z["eval_rows"], z["tune_rows"], z["eval_truth"], z["tune_truth"], float(z["exact_seconds"]))


def sample_held_out(n: int, n_eval: int = 1000, n_tune: int = 500, seed: int = 0) -> HeldOut:
    """Disjoint random query rows: at most a fifth of the items measure and a tenth tune (small collections)."""
    n_eval = min(n_eval, max(1, n // 5)) if n > 1 else 0
    n_tune = min(n_tune, max(1, n // 10)) if n > 2 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return HeldOut(np.sort(perm[:n_eval]), np.sort(perm[n_eval:n_eval + n_tune]))


def exact_neighbours(source: VectorSource, queries: np.ndarray, k: int, *, chunk: int = GT_CHUNK,
                     progress: bool = False) -> np.ndarray:
    """Rows of the ``k`` highest inner products of each query over all of ``source``, streamed in chunks."""
    faiss = require_faiss()
    n = len(queries)
    best_d = np.full((n, k), -np.inf, dtype=np.float32)
    best_i = np.full((n, k), -1, dtype=np.int64)
    for start, X in iter_chunks(source, chunk, progress=progress, desc="exact"):
        kc = min(k, len(X))
        D, idx = faiss.knn(queries, X, kc, metric=faiss.METRIC_INNER_PRODUCT)
        d = np.concatenate([best_d, D], axis=1)
        i = np.concatenate([best_i, idx + start], axis=1)
        order = np.argsort(-d, axis=1, kind="stable")[:, :k]
        best_d, best_i = np.take_along_axis(d, order, 1), np.take_along_axis(i, order, 1)
    return best_i


def compute_truth(held: HeldOut, source: VectorSource, k: int = RECALL_K, progress: bool = False,
                  chunk: int = GT_CHUNK) -> HeldOut:
    """Fill in the exact neighbours of both query samples in one streamed pass over ``source``."""
    t0 = time.perf_counter()
    rows = held.all_rows
    if len(rows):
        truth = exact_neighbours(source, source.take(rows), k + 1, chunk=min(chunk, GT_CHUNK), progress=progress)
    else:
        truth = np.zeros((0, k + 1), np.int64)
    held.eval_truth, held.tune_truth = truth[: len(held.eval_rows)], truth[len(held.eval_rows):]
    held.exact_seconds = time.perf_counter() - t0
    return held


def drop_self(ids: np.ndarray, self_rows: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` ids of each row that are not the query's own row (-1 where fewer remain)."""
    keep = (ids != self_rows[:, None]) & (ids >= 0)
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(ids, order, 1)
    out[~np.take_along_axis(keep, order, 1)] = -1
    return out


def recall_at_k(found: np.ndarray, truth: np.ndarray, self_rows: np.ndarray, k: int = RECALL_K) -> float | None:
    """Mean share of each query's true top-``k`` other items found in the index's top ``k`` (None: no queries)."""
    if len(self_rows) == 0:
        return None
    f, t = drop_self(found, self_rows, k), drop_self(truth, self_rows, k)
    hit = ((f[:, :, None] == t[:, None, :]) & (t[:, None, :] >= 0)).any(axis=2).sum(axis=1)
    wanted = (t >= 0).sum(axis=1)
    ok = wanted > 0
    return float(np.mean(hit[ok] / wanted[ok])) if ok.any() else None


Searcher = Callable[[np.ndarray, int, dict[str, Any]], np.ndarray]


def faiss_searcher(index: Any, kind: str, nlist: int | None) -> Searcher:
    """``search(queries, k, knobs) -> ids`` over a FAISS index with the given knob values."""

    def search(Q: np.ndarray, k: int, knobs: dict[str, Any]) -> np.ndarray:
        params = search_parameters(kind, knobs, k, index.ntotal, nlist)
        return index.search(Q, k, params=params)[1] if params is not None else index.search(Q, k)[1]

    return search


def _grid(kind: str, knobs: dict[str, Any], nlist: int | None) -> list[list[dict[str, Any]]]:
    """Knob settings in order of cost: outer steps of efSearch / nprobe, inner steps of k_factor (re-ranking)."""
    if kind == "hnsw":
        return [[{"efSearch": ef}] for ef in EF_GRID]
    if kind in IVF_KINDS:
        probes = [p for p in (2 ** i for i in range(17)) if p <= (nlist or 1)]
        if "k_factor" in knobs:
            return [[{"nprobe": p, "k_factor": f} for f in K_FACTORS] for p in probes]
        return [[{"nprobe": p}] for p in probes]
    return []


def tune(search: Searcher, kind: str, knobs: dict[str, Any], nlist: int | None, Q: np.ndarray,
         rows: np.ndarray, truth: np.ndarray, target: float, k: int = RECALL_K) -> tuple[dict[str, Any], list]:
    """The cheapest knob setting whose recall@k on the tuning queries reaches ``target`` (else the best recall).

    Returns ``(knobs, trace)``; ``trace`` lists every setting tried with its recall and queries/s.
    """
    trace: list[dict[str, Any]] = []
    grid = _grid(kind, knobs, nlist)
    if not grid or len(rows) == 0:
        return dict(knobs), trace
    met: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for step in grid:
        for setting in step:
            t0 = time.perf_counter()
            found = search(Q, k + 1, setting)
            secs = time.perf_counter() - t0
            rec = recall_at_k(found, truth, rows, k) or 0.0
            entry = {**setting, "recall_at_10": round(rec, 4), "qps": round(len(Q) / max(secs, 1e-9), 1)}
            trace.append(entry)
            if best is None or rec > best["recall_at_10"] + 1e-9:
                best = entry
            if rec >= target:
                met.append(entry)
                break
        if _done(trace, met, step):
            break
    pick = max(met, key=lambda e: e["qps"]) if met else best
    assert pick is not None
    return {key: pick[key] for key in grid[0][0]}, trace


def _done(trace: Sequence[dict[str, Any]], met: Sequence[dict[str, Any]], step: list) -> bool:
    """Stop once the target was met (with re-ranking: once a larger nprobe stopped paying), or recall plateaued."""
    if met and (len(step) == 1 or len(met) >= 2):
        return True
    recalls = [e["recall_at_10"] for e in trace]
    if recalls and recalls[-1] >= 0.9999:
        return True
    return len(recalls) >= 4 and max(recalls[-3:]) - recalls[-4] < 0.002 and len(step) == 1


def measure_speed(search: Searcher, Q: np.ndarray, knobs: dict[str, Any], k: int = RECALL_K,
                  min_seconds: float = 0.3, latency_queries: int = 100) -> dict[str, float]:
    """Batched queries/s (all threads, repeated to at least ``min_seconds``) and one-at-a-time p50 latency (ms)."""
    if len(Q) == 0:
        return {"qps": 0.0, "latency_ms_p50": 0.0}
    n, t0 = 0, time.perf_counter()
    while True:
        search(Q, k, knobs)
        n += len(Q)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds:
            break
    lat = []
    budget = time.perf_counter() + 2.0
    for i in range(min(latency_queries, len(Q))):
        t = time.perf_counter()
        search(Q[i:i + 1], k, knobs)
        lat.append(time.perf_counter() - t)
        if time.perf_counter() > budget and len(lat) >= 10:
            break
    return {"qps": round(n / elapsed, 1), "latency_ms_p50": round(float(np.median(lat)) * 1000, 3)}


__all__ = ["DEFAULT_CHUNK", "HeldOut", "compute_truth", "exact_neighbours", "faiss_searcher", "measure_speed",
           "recall_at_k", "sample_held_out", "tune"]
