"""Near-duplicate images by embedding, with an index instead of an N x N matrix, and the keep-one policy.

``near_duplicates`` reads unit rows in chunks (from the store, or an array) into a FAISS inner-product index, then
streams the rows again as queries: a range search (``index.range_search``) gives every pair at or above the
threshold, and a k-nearest-neighbour search gives each item's similarity to its nearest other item (all items up to
``NN_SAMPLE``, a seeded sample beyond), the distribution plotted beside the threshold. The index is exact
(``IndexFlatIP``) while ``n * n * d`` stays under ``FLAT_WORK`` (20k items of 512-d); beyond that an inverted file
(``IndexIVFFlat``, ``2 sqrt(n)`` lists, ``nprobe`` = 4 probed), whose cost grows with ``n * n * nprobe / nlist``
instead of ``n * n``: 200k items in about 20 s on 2 cores instead of about 14 minutes (``bench/curate.py``, where
its recall against the exact search is measured). Memory is the index (n x d float32) plus one chunk, never an
n x n matrix. Without faiss an exact numpy search in blocks does the same (O(n^2) time, O(chunk x n) memory).

``keep_one`` resolves the pairs greedily: items in priority order (best first: the caller passes the best pair
score, ties broken by content key), an item is kept unless an already kept item is its near-duplicate, in which case
it is dropped as a duplicate of the best-ranked such item. The best item of every group is always kept; no two kept
items are near-duplicates; each dropped item names the kept item it duplicates. ``group`` numbers the connected
components of the near-duplicate graph (what a person looks at as one group of copies).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import EncoderlabError
from ..progress import progress_bar

#: n * n * d below which the exact flat index is used (20k x 20k x 512 ~ 2e11 multiply-adds, ~10 s on 2 cores)
FLAT_WORK = 2.1e11
INDEX_KINDS = ("auto", "flat", "ivf")
#: neighbours fetched per query in the kNN pass (more than 2 so that identical vectors cannot hide the query itself)
KNN_K = 4
QUERY_CHUNK = 8192
#: queries per range search: bounds the result lists (a group of g copies returns g results per query)
RANGE_CHUNK = 1024
#: items whose nearest-neighbour similarity is measured for the plot (all of them up to this many, else a sample)
NN_SAMPLE = 20_000
#: IVF lists probed per query: near-duplicates sit in the same or an adjacent list (recall 1.0 on bench/curate.py)
DEFAULT_NPROBE = 4
#: IVF training rows per list (FAISS asks for at least 39): k-means on 40 * nlist rows, 10 iterations
TRAIN_PER_LIST = 40

#: ``read(start, stop)`` -> unit rows ``[stop - start, d]`` float32 of items start..stop-1
RowReader = Callable[[int, int], np.ndarray]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class NearDuplicates:
    """Every pair of items at or above ``threshold`` (``i < j``, each pair once) and each item's nearest-neighbour
    similarity (NaN when there is a single item)."""

    threshold: float
    pair_i: np.ndarray
    pair_j: np.ndarray
    pair_sim: np.ndarray
    nn_similarity: np.ndarray
    backend: str  # "faiss-flat", "faiss-ivf" or "numpy"
    seconds: float
    nlist: int = 0
    nprobe: int = 0
    nn_sampled: int = 0  # items whose nearest-neighbour similarity was measured (the rest are NaN)


class _NumpyIndex:
    """Exact inner-product search in blocks, with faiss's ``search`` / ``range_search`` return shapes."""

    def __init__(self, X: np.ndarray) -> None:
        self.X = X

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        s = q @ self.X.T
        k = min(k, s.shape[1])
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(s, top, 1), axis=1, kind="stable")
        idx = np.take_along_axis(top, order, 1)
        return np.take_along_axis(s, idx, 1), idx

    def range_search(self, q: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        s = q @ self.X.T
        rows, cols = np.nonzero(s > radius)
        lims = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=len(q)))])
        return lims, s[rows, cols], cols.astype(np.int64)


def choose_kind(n: int, dim: int, kind: str = "auto") -> str:
    if kind not in INDEX_KINDS:
        raise EncoderlabError(f"unknown near-duplicate index {kind!r}", f"use one of {', '.join(INDEX_KINDS)}")
    if kind != "auto":
        return kind
    return "flat" if float(n) * n * dim <= FLAT_WORK else "ivf"


def _build_index(read: RowReader, n: int, dim: int, kind: str, nprobe: int | None, chunk: int,
                 progress: bool, seed: int) -> tuple[object, str, int, int]:
    """(index, backend, nlist, nprobe) holding all n rows, added chunk by chunk."""
    if not faiss_available():
        X = np.concatenate([read(s, min(s + chunk, n)) for s in range(0, n, chunk)]) if n else np.zeros((0, dim))
        return _NumpyIndex(np.ascontiguousarray(X, dtype=np.float32)), "numpy", 0, 0
    import faiss

    nlist = 0
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    else:
        nlist = int(min(max(16, round(2 * math.sqrt(n))), max(16, n // 8)))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = 10
        index.cp.seed = seed
        index.cp.max_points_per_centroid = TRAIN_PER_LIST  # the sample drawn below is all it trains on
        sample = np.sort(np.random.default_rng(seed).choice(n, size=min(n, TRAIN_PER_LIST * nlist), replace=False))
        index.train(np.ascontiguousarray(_gather(read, sample, chunk), dtype=np.float32))
        index.nprobe = int(nprobe or DEFAULT_NPROBE)
    with progress_bar(n, "item", progress, "index", leave=False) as bar:
        for s in range(0, n, chunk):
            rows = np.ascontiguousarray(read(s, min(s + chunk, n)), dtype=np.float32)
            index.add(rows)
            bar.update(len(rows))
    return index, f"faiss-{kind}", nlist, int(getattr(index, "nprobe", 0)) if kind == "ivf" else 0


def _gather(read: RowReader, positions: np.ndarray, chunk: int) -> np.ndarray:
    """Rows at sorted ``positions``, reading whole chunks and keeping the wanted rows of each."""
    parts = []
    for s in range(0, int(positions[-1]) + 1, chunk):
        want = positions[(positions >= s) & (positions < s + chunk)]
        if len(want):
            parts.append(read(s, min(s + chunk, int(positions[-1]) + 1))[want - s])
    return np.concatenate(parts)


def _nearest_other(D: np.ndarray, I: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Similarity of each query's best neighbour that is not the query itself."""
    not_self = (I != ids[:, None]) & (I >= 0)
    first = np.argmax(not_self, axis=1)
    sims = D[np.arange(len(D)), first].astype(np.float32)
    sims[~not_self.any(axis=1)] = np.nan
    return sims


def near_duplicates(read: RowReader, n: int, dim: int, threshold: float, *, kind: str = "auto",
                    nprobe: int | None = None, chunk: int = QUERY_CHUNK, progress: bool = False,
                    seed: int = 0) -> NearDuplicates:
    """Pairs of the ``n`` unit rows ``read`` returns whose inner product is at least ``threshold``."""
    if not -1.0 <= threshold <= 1.0:
        raise EncoderlabError(f"near-duplicate threshold must be a cosine similarity in [-1, 1], got {threshold!r}",
                              "use e.g. 0.95 (1.0: identical embeddings only)")
    t0 = time.perf_counter()
    kind = choose_kind(n, dim, kind)
    nn = np.full(n, np.nan, dtype=np.float32)
    empty = np.zeros(0, np.int64)
    if n < 2:
        return NearDuplicates(threshold, empty, empty, np.zeros(0, np.float32), nn, "none", 0.0)
    index, backend, nlist, probes = _build_index(read, n, dim, kind, nprobe, chunk, progress, seed)
    sample = np.arange(n) if n <= NN_SAMPLE else np.sort(np.random.default_rng(seed).choice(n, NN_SAMPLE, False))
    pi, pj, ps = [], [], []
    with progress_bar(n, "item", progress, "near-duplicates", leave=False) as bar:
        for s in range(0, n, chunk):
            q = np.ascontiguousarray(read(s, min(s + chunk, n)), dtype=np.float32)
            for r in range(0, len(q), RANGE_CHUNK):  # bounded result lists, even for a huge group of copies
                ids = np.arange(s + r, s + min(r + RANGE_CHUNK, len(q)))
                lims, RD, RI = index.range_search(q[r : r + RANGE_CHUNK], float(threshold) - 1e-6)
                rows = np.repeat(ids, np.diff(np.asarray(lims, dtype=np.int64)))
                keep = (RI != rows) & (RD >= threshold) & (RI >= 0)
                pi.append(rows[keep])
                pj.append(RI[keep].astype(np.int64))
                ps.append(RD[keep].astype(np.float32))
            mine = sample[(sample >= s) & (sample < s + len(q))]
            if len(mine):  # each (sampled) item's nearest other item, for the distribution beside the threshold
                D, I = index.search(np.ascontiguousarray(q[mine - s]), min(KNN_K, n))
                nn[mine] = _nearest_other(D, I, mine)
            bar.update(len(q))
    i, j = np.concatenate(pi), np.concatenate(pj)
    sim = np.concatenate(ps)
    a, b = np.minimum(i, j), np.maximum(i, j)  # each pair once, whichever side found it (an IVF may find one)
    _, first = np.unique(a * n + b, return_index=True)
    return NearDuplicates(threshold, a[first], b[first], sim[first], nn, backend, time.perf_counter() - t0,
                          nlist, probes, len(sample))


@dataclass
class KeepOne:
    """``kept[i]``; ``duplicate_of[i]`` (-1 when kept) the kept item that item i duplicates, with similarity
    ``similarity[i]``; ``group[i]`` the connected component of the near-duplicate graph (-1: no near-duplicate)."""

    kept: np.ndarray
    duplicate_of: np.ndarray
    similarity: np.ndarray
    group: np.ndarray

    @property
    def groups(self) -> int:
        return int(self.group.max() + 1) if len(self.group) else 0


def components(n: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Connected-component label of each of ``n`` nodes (the smallest node id in it) for undirected edges
    ``rows[k] - cols[k]``: min-label propagation with pointer jumping, all in numpy."""
    label = np.arange(n)
    while True:
        low = np.minimum(label[rows], label[cols])
        new = label.copy()
        np.minimum.at(new, rows, low)
        np.minimum.at(new, cols, low)
        new = new[new]
        if np.array_equal(new, label):
            return label
        label = new


def keep_one(n: int, pair_i: np.ndarray, pair_j: np.ndarray, pair_sim: np.ndarray, rank: np.ndarray) -> KeepOne:
    """Greedy keep-one over the near-duplicate pairs; ``rank[i]`` is item i's priority (0 = best, all distinct)."""
    kept = np.ones(n, dtype=bool)
    dup_of = np.full(n, -1, dtype=np.int64)
    dup_sim = np.full(n, np.nan, dtype=np.float32)
    group = np.full(n, -1, dtype=np.int64)
    if len(pair_i) == 0:
        return KeepOne(kept, dup_of, dup_sim, group)
    rows = np.concatenate([pair_i, pair_j]).astype(np.int64)
    cols = np.concatenate([pair_j, pair_i]).astype(np.int64)
    order = np.argsort(rows, kind="stable")  # adjacency lists (CSR) of the symmetric graph
    indices, data = cols[order], np.concatenate([pair_sim, pair_sim])[order]
    indptr = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))])
    involved = np.unique(rows)
    _, dense = np.unique(components(n, rows, cols)[involved], return_inverse=True)
    group[involved] = dense
    for item in involved[np.argsort(rank[involved], kind="stable")]:  # best first
        nbrs, nsim = indices[indptr[item] : indptr[item + 1]], data[indptr[item] : indptr[item + 1]]
        better = kept[nbrs] & (rank[nbrs] < rank[item])
        if better.any():  # dropped as a copy of its best-ranked kept duplicate
            cands = np.flatnonzero(better)
            best = cands[np.argmin(rank[nbrs[cands]])]
            kept[item], dup_of[item], dup_sim[item] = False, nbrs[best], nsim[best]
    return KeepOne(kept, dup_of, dup_sim, group)
