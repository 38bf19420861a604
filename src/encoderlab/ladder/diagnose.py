"""What still fails, and what is wrong with the data, read from a classifier's test predictions and one kNN graph.

Two kinds of findings, kept apart because they may read different labels:

* **the test report**: per-class recall, the most confused class pairs, per-slice accuracy over the dataset's
  metadata columns, and a few failing test items with their nearest train neighbours. These are the final test
  numbers, so they read test labels (once, like every rung's test score).
* **the data audit**, from one exact k-nearest-neighbour graph over every item's embedding: how often a class's
  neighbours share its label (which classes the embedding mixes), likely label errors, near-duplicates across
  splits, outliers and class imbalance. Everything here that involves labels reads train and val labels only: a
  test item's label is never a vote, so nothing found here (or decided from it) depends on test labels.

The graph is FAISS's exact inner-product index when ``faiss`` imports, else blocks of ``chunk x N`` similarities
from a torch matmul (memory O(chunk x N), never N x N); both return the same neighbours (``knn_graph``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.audit import cross_split_duplicates
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..metrics.bootstrap import bootstrap_ci
from ..metrics.classification import confusion_matrix
from ..normalize import normalize_rows
from ..progress import progress_bar

#: similarities one block of queries may hold (float32): 64 Mi entries = 256 MiB
_BLOCK_ENTRIES = 1 << 26
#: entries of each list kept in the report; the counts always cover everything found
MAX_LISTED = 100
#: z of the two-sided 95% interval
_Z95 = 1.959963984540054
#: scale that turns a median absolute deviation into a standard deviation for normal data
_MAD_SCALE = 1.4826
#: train/val splits whose labels the audit may read
_SEEN = ("train", "val")


# ------------------------------------------------------------------------------------------------- the kNN graph


@dataclass
class KNNGraph:
    """The ``k`` most similar other items of every item, most similar first (inner products of unit rows)."""

    neighbors: np.ndarray  # [N, k] int64 positions
    similarities: np.ndarray  # [N, k] float32
    backend: str  # "faiss" or "torch"
    seconds: float

    @property
    def k(self) -> int:
        return int(self.neighbors.shape[1])


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def default_chunk(n: int) -> int:
    """Queries per block so one block of similarities stays within 256 MiB, between 1 and 4096."""
    return int(max(1, min(4096, _BLOCK_ENTRIES // max(n, 1))))


def knn_graph(X: np.ndarray, k: int = 10, *, backend: str = "auto", chunk_size: int | None = None,
              progress: bool = False) -> KNNGraph:
    """Exact kNN graph of the rows of ``X`` by inner product, excluding each item itself (by position, so an exact
    duplicate of an item is still its neighbour).

    ``backend``: ``"auto"`` (FAISS if importable, else torch), ``"faiss"`` or ``"torch"``. ``k`` is clipped to
    ``N - 1``. Pass unit rows for cosine similarity.
    """
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2 or X.shape[0] < 2:
        raise EncoderlabError(f"a kNN graph needs at least 2 rows of a 2-D array, got shape {X.shape}",
                              "pass one embedding per item")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise EncoderlabError(f"k must be a positive integer, got {k!r}", "use e.g. k=10")
    if backend not in ("auto", "faiss", "torch"):
        raise EncoderlabError(f"unknown kNN backend {backend!r}", "use auto, faiss or torch")
    if backend == "faiss" and not faiss_available():
        raise EncoderlabError("the faiss backend was asked for but faiss is not installed",
                              "pip install faiss-cpu, or use backend='torch' (exact, chunked)")
    k = int(min(k, X.shape[0] - 1))
    chunk = default_chunk(X.shape[0]) if chunk_size is None else int(chunk_size)
    if chunk < 1:
        raise EncoderlabError(f"chunk_size must be >= 1, got {chunk_size!r}", "leave it unset for the default")
    t0 = time.perf_counter()
    use_faiss = backend == "faiss" or (backend == "auto" and faiss_available())
    search = _faiss_search if use_faiss else _torch_search
    idx, sims = search(X, k, chunk, progress)
    return KNNGraph(idx, sims, "faiss" if use_faiss else "torch", time.perf_counter() - t0)


def _torch_search(X: np.ndarray, k: int, chunk: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of ``chunk`` queries against all items; the diagonal is masked so an item never finds itself."""
    n = X.shape[0]
    data = torch.from_numpy(X)
    idx = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    with torch.inference_mode(), progress_bar(n, "item", progress, "kNN graph", leave=False) as bar:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            s = data[start:stop] @ data.T
            r = torch.arange(stop - start)
            s[r, r + start] = -torch.inf
            top = torch.topk(s, k, dim=1)
            sims[start:stop], idx[start:stop] = top.values.numpy(), top.indices.numpy()
            bar.update(stop - start)
    return idx, sims


def _faiss_search(X: np.ndarray, k: int, chunk: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """FAISS exact inner-product search for ``k + 1`` neighbours, then each row's own position dropped."""
    import faiss

    n = X.shape[0]
    index = faiss.IndexFlatIP(X.shape[1])
    index.add(X)
    idx = np.empty((n, k), np.int64)
    sims = np.empty((n, k), np.float32)
    step = max(chunk, 1024)
    with progress_bar(n, "item", progress, "kNN graph", leave=False) as bar:
        for start in range(0, n, step):
            stop = min(start + step, n)
            D, I = index.search(X[start:stop], k + 1)
            sims[start:stop], idx[start:stop] = drop_self(D, I, np.arange(start, stop))
            bar.update(stop - start)
    return idx, sims


def drop_self(D: np.ndarray, I: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``k + 1`` search results per row -> ``k``: the row's own position removed, or the last result if absent
    (exact duplicates can push an item out of its own top ``k + 1``)."""
    is_self = I == rows[:, None]
    drop = np.where(is_self.any(axis=1), is_self.argmax(axis=1), I.shape[1] - 1)
    keep = np.ones(I.shape, bool)
    keep[np.arange(len(rows)), drop] = False
    k = I.shape[1] - 1
    return D[keep].reshape(-1, k).astype(np.float32), I[keep].reshape(-1, k).astype(np.int64)


# ------------------------------------------------------------------------------------------------------ intervals


def wilson_interval(successes: int, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion: sensible for small ``n`` and for 0 or n successes, where a bootstrap
    interval collapses to a point. ``(nan, nan)`` when ``n`` is 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


# --------------------------------------------------------------------------------------------------- the report


@dataclass
class Diagnosis:
    """Findings for the Encoder Note; every list is ordered worst first and capped at ``MAX_LISTED`` entries."""

    n_items: int
    k: int
    backend: str
    graph_seconds: float
    overall: dict[str, float]
    per_class: list[dict[str, Any]]
    worst_classes: list[str]
    confused_pairs: list[dict[str, Any]]
    slices: list[dict[str, Any]]
    neighbour_agreement: list[dict[str, Any]]
    label_error_candidates: list[dict[str, Any]]
    cross_split_near_duplicates: list[dict[str, Any]]
    exact_duplicate_groups: list[dict[str, Any]]
    outliers: list[dict[str, Any]]
    outlier_threshold: float
    train_class_counts: dict[str, int]
    imbalance_ratio: float
    failing_examples: list[dict[str, Any]]
    counts: dict[str, Any] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def n_label_error_candidates(self) -> int:
        return int(self.counts.get("label_error_candidates", len(self.label_error_candidates)))

    @property
    def n_cross_split_near_duplicates(self) -> int:
        return int(self.counts.get("cross_split_near_duplicates", len(self.cross_split_near_duplicates)))

    @property
    def n_outliers(self) -> int:
        return int(self.counts.get("outliers", len(self.outliers)))

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types only (no numpy scalars, NaN as None)."""
        return _plain(asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return [_plain(v) for v in obj.tolist()]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if np.isfinite(v) else None
    return obj


# ------------------------------------------------------------------------------------ test report (test labels)


def _check_predictions(le: LabelledEmbeddings, test_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    """(test positions, predictions as class indices) after checking they line up."""
    test = le.index("test")
    pred = np.asarray(test_pred).reshape(-1)
    if pred.size != test.size:
        raise EncoderlabError(f"{pred.size} test predictions for {test.size} labelled test items",
                              "pass one predicted class index per position of le.index('test'), in that order")
    if pred.size and (pred.dtype.kind not in "iu" or pred.min() < 0 or pred.max() >= le.n_classes):
        raise EncoderlabError(f"test predictions must be class indices in [0, {le.n_classes})",
                              "map predicted labels through le.classes first")
    return test, pred.astype(np.int64)


def class_report(y: np.ndarray, pred: np.ndarray, classes: Sequence[str], *, top_pairs: int = 10
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per-class recall with Wilson intervals (worst first) and the most confused (true, predicted) pairs."""
    c = len(classes)
    cm = confusion_matrix(y, pred, c) if y.size else np.zeros((c, c), np.int64)
    support = cm.sum(axis=1)
    rows = []
    for i in np.flatnonzero(support):
        lo, hi = wilson_interval(int(cm[i, i]), int(support[i]))
        off = cm[i].copy()
        off[i] = 0
        j = int(off.argmax())
        rows.append({"class": classes[i], "n": int(support[i]), "recall": cm[i, i] / support[i], "ci_low": lo,
                     "ci_high": hi, "most_confused_with": classes[j] if off[j] else None,
                     "confused_count": int(off[j])})
    rows.sort(key=lambda r: (r["recall"], r["ci_high"], -r["n"], r["class"]))
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top_pairs]
    pairs = [{"true": classes[t], "predicted": classes[p], "count": int(off[t, p]), "share_of_true": off[t, p] /
              support[t]} for t, p in zip(*np.unravel_index(flat, off.shape)) if off[t, p] > 0]
    return rows, pairs


def _slice_values(values: list[Any]) -> list[str] | None:
    """A metadata column's test values as strings ("(missing)" for empty cells); None if not sliceable."""
    out = []
    for v in values:
        if isinstance(v, (list, tuple, dict, set, np.ndarray)):
            return None
        missing = v is None or (isinstance(v, float) and np.isnan(v))
        out.append("(missing)" if missing else str(v))
    return out


def slice_report(le: LabelledEmbeddings, test: np.ndarray, correct: np.ndarray, *, min_slice: int = 10,
                 max_values: int = 50) -> tuple[list[dict[str, Any]], list[str]]:
    """Accuracy per value of every metadata column with 2..``max_values`` distinct test values, worst first.

    Slices are ranked by the upper end of their Wilson interval, so a small slice with one miss does not outrank a
    large one that surely fails; ``small`` flags slices with fewer than ``min_slice`` items. Returns the slices and
    notes naming the columns left out.
    """
    table = le.dataset.table.iloc[le.rows[test]]
    out: list[dict[str, Any]] = []
    notes: list[str] = []
    n = correct.size
    for col in le.dataset.metadata_columns():
        values = _slice_values(table[col].tolist())
        distinct = sorted(set(values)) if values is not None else []
        if values is None or not 2 <= len(distinct) <= max_values:
            why = "holds lists" if values is None else f"has {len(distinct)} distinct test value(s)"
            notes.append(f"metadata column {col!r} not sliced: it {why}")
            continue
        arr = np.asarray(values, dtype=object)
        for v in distinct:
            m = arr == v
            k, hits = int(m.sum()), int(correct[m].sum())
            lo, hi = wilson_interval(hits, k)
            rest = n - k
            rest_acc = (int(correct.sum()) - hits) / rest if rest else float("nan")
            out.append({"column": col, "value": v, "n": k, "accuracy": hits / k, "ci_low": lo, "ci_high": hi,
                        "gap_vs_rest": hits / k - rest_acc, "small": k < min_slice})
    out.sort(key=lambda s: (s["ci_high"], s["accuracy"], -s["n"], s["column"], s["value"]))
    return out, notes


# ---------------------------------------------------------------------------- data audit (train/val labels only)


def _seen_labels(le: LabelledEmbeddings) -> np.ndarray:
    """Labels the audit may read: train and val labels; -1 for test, unlabelled and split-less items."""
    seen = np.isin(le.split.astype(str), _SEEN)
    return np.where(seen & (le.y >= 0), le.y, -1)


def _votes(labels: np.ndarray, graph: KNNGraph) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item, from its neighbours' readable labels: (valid votes, commonest label, its vote count).

    Ties between labels go to the one held by the closer neighbour (neighbours are sorted by similarity).
    """
    nl = labels[graph.neighbors]  # [N, k]
    valid = nl >= 0
    same = (nl[:, :, None] == nl[:, None, :]) & valid[:, None, :]
    count = np.where(valid, same.sum(axis=2), 0)
    best = count.argmax(axis=1)
    rows = np.arange(nl.shape[0])
    return valid.sum(axis=1), np.where(valid.any(axis=1), nl[rows, best], -1), count[rows, best]


def neighbour_agreement(le: LabelledEmbeddings, graph: KNNGraph, labels: np.ndarray) -> list[dict[str, Any]]:
    """Per class (train/val items): share whose neighbours' majority label is their own, the mean share of
    neighbours with the same label, and the class its items' neighbours most often belong to instead."""
    c = le.n_classes
    nl = labels[graph.neighbors]
    valid = nl >= 0
    items = np.flatnonzero((labels >= 0) & valid.any(axis=1))
    n_valid, major, _ = _votes(labels, graph)
    own = labels[items]
    same_share = ((nl[items] == own[:, None]) & valid[items]).sum(axis=1) / n_valid[items]
    pair = (own[:, None] * c + np.where(valid[items], nl[items], 0))[valid[items]]
    mix = np.bincount(pair, minlength=c * c).reshape(c, c)
    out = []
    for i in range(c):
        m = own == i
        if not m.any():
            continue
        other = mix[i].copy()
        other[i] = 0
        j = int(other.argmax())
        out.append({"class": le.classes[i], "n": int(m.sum()), "agreement": float((major[items][m] == i).mean()),
                    "same_label_share": float(same_share[m].mean()),
                    "mixed_with": le.classes[j] if other[j] else None,
                    "mixed_share": float(other[j] / max(mix[i].sum(), 1))})
    out.sort(key=lambda r: (r["agreement"], r["same_label_share"], r["class"]))
    return out


def label_error_candidates(le: LabelledEmbeddings, graph: KNNGraph, labels: np.ndarray,
                           heldout_pred: np.ndarray | None = None, *, min_votes: int = 3) -> list[dict[str, Any]]:
    """Train/val items whose neighbours (by train/val labels) mostly hold another label, ranked by confidence.

    ``score`` = share of the item's labelled neighbours voting for the suggested label minus the share voting
    for its own; +0.5 when ``heldout_pred`` (a probe's out-of-fold or val prediction, -1 where unknown) agrees with
    the suggestion. When a held-out prediction exists and equals the item's label, it is not a candidate.
    """
    n_valid, major, major_count = _votes(labels, graph)
    nl = labels[graph.neighbors]
    own_count = ((nl == labels[:, None]) & (nl >= 0)).sum(axis=1)
    cand = (labels >= 0) & (n_valid >= min_votes) & (major >= 0) & (major != labels) & (major_count > own_count)
    probe = np.full(labels.size, -1, np.int64) if heldout_pred is None else np.asarray(heldout_pred, np.int64)
    if probe.shape != labels.shape:
        raise EncoderlabError(f"heldout_pred has {probe.size} entries for {labels.size} items",
                              "pass one prediction per row of le.X (-1 where there is none)")
    cand &= ~((probe >= 0) & (probe == labels))
    out = []
    for i in np.flatnonzero(cand):
        share = (major_count[i] - own_count[i]) / n_valid[i]
        score = share + (0.5 if probe[i] == major[i] else 0.0)
        out.append({"id": str(le.ids[i]), "split": str(le.split[i]), "label": le.classes[labels[i]],
                    "suggested": le.classes[major[i]], "score": float(score),
                    "neighbour_votes": int(major_count[i]), "own_votes": int(own_count[i]), "votes": int(n_valid[i]),
                    "probe": le.classes[probe[i]] if probe[i] >= 0 else None})
    out.sort(key=lambda r: (-r["score"], r["id"]))
    return out


def near_duplicates(le: LabelledEmbeddings, graph: KNNGraph, threshold: float = 0.98) -> list[dict[str, Any]]:
    """Pairs of items in different splits whose cosine similarity is >= ``threshold``, among graph neighbours.

    ``exact`` marks pairs with the same content key (identical bytes / text). Only the ``k`` neighbours of each
    item are looked at, so a group of more than ``k`` copies can hide some of its pairs (never all of them).
    """
    split = le.split.astype(str)
    a, j = np.nonzero(graph.similarities >= threshold)
    b = graph.neighbors[a, j]
    has_split = np.asarray([v is not None for v in le.split], dtype=bool)
    cross = (split[a] != split[b]) & has_split[a] & has_split[b]
    a, b, s = a[cross], b[cross], graph.similarities[a, j][cross]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    _, first = np.unique(lo * len(split) + hi, return_index=True)
    out = []
    for p in first:
        x, y = int(lo[p]), int(hi[p])
        if split[x] != "test" and split[y] == "test":
            x, y = y, x  # the evaluated item first
        exact = le.keys is not None and le.keys[x] is not None and le.keys[x] == le.keys[y]
        out.append({"id": str(le.ids[x]), "split": split[x], "other_id": str(le.ids[y]), "other_split": split[y],
                    "similarity": float(s[p]), "exact": bool(exact)})
    out.sort(key=lambda r: (r["split"] != "test", -r["similarity"], r["id"], r["other_id"]))
    return out


def outliers(le: LabelledEmbeddings, graph: KNNGraph, z: float = 3.0) -> tuple[list[dict[str, Any]], float]:
    """Items whose mean similarity to their neighbours is below ``median - z * 1.4826 * MAD`` (robust to the
    outliers themselves), lowest first, and that threshold."""
    mean_sim = graph.similarities.mean(axis=1).astype(np.float64)
    med = float(np.median(mean_sim))
    mad = float(np.median(np.abs(mean_sim - med))) * _MAD_SCALE
    threshold = med - z * mad
    found = np.flatnonzero(mean_sim < threshold)
    found = found[np.argsort(mean_sim[found], kind="stable")]
    return [{"id": str(le.ids[i]), "split": str(le.split[i]), "mean_similarity": float(mean_sim[i])}
            for i in found], threshold


def class_balance(le: LabelledEmbeddings) -> tuple[dict[str, int], float, list[str]]:
    """Train items per class, the largest over the smallest non-zero count, and the classes with no train item."""
    train = le.y[(le.split == "train") & (le.y >= 0)]
    counts = np.bincount(train, minlength=le.n_classes)
    present = counts[counts > 0]
    ratio = float(present.max() / present.min()) if present.size else float("nan")
    return ({c: int(n) for c, n in zip(le.classes, counts)}, ratio,
            [c for c, n in zip(le.classes, counts) if n == 0])


def failing_examples(le: LabelledEmbeddings, X: np.ndarray, test: np.ndarray, pred: np.ndarray,
                     worst: Sequence[str], *, n_examples: int = 5, n_neighbours: int = 3) -> list[dict[str, Any]]:
    """A few misclassified test items, one per worst class first, each with its nearest train items (an exact
    search over train only, so neighbours are train items even where the full graph holds other test items)."""
    wrong = test[le.y[test] != pred]
    pred_of = dict(zip(test.tolist(), pred.tolist()))
    index = {c: i for i, c in enumerate(le.classes)}
    picked: list[int] = []
    for name in worst:
        hit = wrong[le.y[wrong] == index[name]]
        if hit.size and len(picked) < n_examples:
            picked.append(int(hit[0]))
    picked += [int(i) for i in wrong if int(i) not in picked][: n_examples - len(picked)]
    train = np.flatnonzero((le.split == "train") & (le.y >= 0))
    if not picked or not train.size:
        return []
    sims = np.full((len(picked), X.shape[0]), -np.inf, np.float32)
    sims[:, train] = (X @ X[picked].T).T[:, train]  # N x few: no copy of the train embeddings
    top = np.argsort(-sims, axis=1, kind="stable")[:, : min(n_neighbours, train.size)]
    return [{"id": str(le.ids[i]), "label": le.classes[le.y[i]], "predicted": le.classes[pred_of[i]],
             "neighbours": [{"id": str(le.ids[j]), "label": le.classes[le.y[j]], "similarity": float(sims[r, j])}
                            for j in top[r]]}
            for r, i in enumerate(picked)]


def _exact_groups(le: LabelledEmbeddings) -> list[dict[str, Any]]:
    """Identical images spread over splits (``data.audit.cross_split_duplicates`` on the keys already known)."""
    if le.keys is None or le.modality != "image":
        return []  # identical texts show up as near-duplicates with exact=True
    return cross_split_duplicates(le.dataset, dict(zip(le.ids.tolist(), le.keys.tolist())))


# ------------------------------------------------------------------------------------------------------ the entry


def diagnose(le: LabelledEmbeddings, test_pred: Any, *, heldout_pred: Any = None, k: int = 10,
             graph: KNNGraph | None = None, near_dup_threshold: float = 0.98, outlier_z: float = 3.0,
             min_slice: int = 10, max_slice_values: int = 50, n_examples: int = 5, backend: str = "auto",
             chunk_size: int | None = None, n_boot: int = 1000, seed: int = 0, progress: bool = False) -> Diagnosis:
    """Everything a note needs about what fails and what is wrong with the data, from one kNN graph.

    ``test_pred``: a classifier's predicted class index per position of ``le.index("test")``. ``heldout_pred``:
    optional held-out predictions per row of ``le.X`` (out-of-fold on train, plain on val; -1 where none), a
    second opinion for label errors. ``graph``: a graph already built on ``le.X`` (else one is built here).
    """
    test, pred = _check_predictions(le, test_pred)
    X = normalize_rows(le.X)
    if graph is None:
        graph = knn_graph(X, k, backend=backend, chunk_size=chunk_size, progress=progress)
    elif graph.neighbors.shape[0] != X.shape[0]:
        raise EncoderlabError(f"the kNN graph has {graph.neighbors.shape[0]} rows for {X.shape[0]} items",
                              "build it on le.X (knn_graph(le.X)) or leave graph out")
    correct = le.y[test] == pred
    lo, hi = bootstrap_ci(correct, n_boot=n_boot, seed=seed) if test.size else (float("nan"), float("nan"))
    overall = {"accuracy": float(correct.mean()) if test.size else float("nan"), "ci_low": lo, "ci_high": hi,
               "n": int(test.size)}
    per_class, pairs = class_report(le.y[test], pred, le.classes)
    slices, slice_notes = slice_report(le, test, correct, min_slice=min_slice, max_values=max_slice_values)
    labels = _seen_labels(le)  # from here on, no test label is read
    heldout = None
    if heldout_pred is not None:
        heldout = np.asarray(heldout_pred, dtype=np.int64).reshape(-1)
        if heldout.size != labels.size:
            raise EncoderlabError(f"heldout_pred has {heldout.size} entries for {labels.size} items",
                                  "pass one prediction per row of le.X (-1 where there is none)")
        heldout = np.where(np.isin(le.split.astype(str), _SEEN), heldout, -1)  # a test prediction is no evidence
    errors = label_error_candidates(le, graph, labels, heldout)
    dups = near_duplicates(le, graph, near_dup_threshold)
    odd, threshold = outliers(le, graph, outlier_z)
    counts, ratio, untrained = class_balance(le)
    worst = [r["class"] for r in per_class if r["recall"] < 1.0][:5]
    exact = _exact_groups(le)
    summary = {"label_error_candidates": len(errors), "cross_split_near_duplicates": len(dups),
               "test_items_with_near_duplicate": len({d["id"] for d in dups if d["split"] == "test"}),
               "exact_duplicate_groups": len(exact), "outliers": len(odd), "imbalance_ratio": ratio,
               "classes_without_train_items": len(untrained), "small_slices": sum(s["small"] for s in slices),
               "failing_test_items": int((~correct).sum())}
    notes = slice_notes + ([f"classes with no train item: {', '.join(untrained)}"] if untrained else [])
    return Diagnosis(
        n_items=int(X.shape[0]), k=graph.k, backend=graph.backend, graph_seconds=round(graph.seconds, 3),
        overall=overall, per_class=per_class, worst_classes=worst, confused_pairs=pairs, slices=slices[:MAX_LISTED],
        neighbour_agreement=neighbour_agreement(le, graph, labels), label_error_candidates=errors[:MAX_LISTED],
        cross_split_near_duplicates=dups[:MAX_LISTED], exact_duplicate_groups=exact[:MAX_LISTED],
        outliers=odd[:MAX_LISTED], outlier_threshold=threshold, train_class_counts=counts, imbalance_ratio=ratio,
        failing_examples=failing_examples(le, X, test, pred, worst, n_examples=n_examples), counts=summary,
        settings={"k": graph.k, "near_dup_threshold": near_dup_threshold, "outlier_z": outlier_z,
                  "min_slice": min_slice, "max_slice_values": max_slice_values, "labels_read_by_audit": list(_SEEN),
                  "heldout_predictions": heldout_pred is not None},
        notes=notes)
