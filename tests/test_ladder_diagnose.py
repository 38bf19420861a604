"""Diagnosis from one kNN graph: the graph against brute force, then every finding on synthetic embeddings built so
the right answer is known (flipped labels, a planted duplicate, a far-away item, a metadata slice that fails), and
the audit's promise that test labels never move it."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pandas as pd
import pytest

from encoderlab.data.manifest import Dataset
from encoderlab.errors import EncoderlabError
from encoderlab.extract.labelled import LabelledEmbeddings
from encoderlab.ladder.diagnose import (
    diagnose,
    drop_self,
    faiss_available,
    knn_graph,
    slice_report,
    wilson_interval,
)
from encoderlab.normalize import normalize_rows

SPLIT_CYCLE = ("train",) * 7 + ("val",) * 1 + ("test",) * 2


def make_le(X: np.ndarray, y: np.ndarray, split, classes=None, keys=None, modality="text",
            **meta) -> LabelledEmbeddings:
    """LabelledEmbeddings over a constructed table (one row per embedding; image paths are names only)."""
    n = len(y)
    classes = classes or [f"c{i}" for i in range(int(y.max()) + 1)]
    images = [f"/nowhere/{i}.png" for i in range(n)] if modality == "image" else [None] * n
    table = pd.DataFrame({"id": [f"item{i:04d}" for i in range(n)], "image": images,
                          "texts": [[] for _ in range(n)], "label": [classes[v] for v in y], "split": list(split),
                          **meta})
    ds = Dataset(table, source="constructed")
    return LabelledEmbeddings(ds, modality, X.astype(np.float32), np.arange(n), np.asarray(ds.table["id"]),
                              np.asarray(y, np.int64), np.asarray(list(split), dtype=object), classes, None,
                              None if keys is None else np.asarray(keys, dtype=object))


def clustered(n_classes=6, per_class=60, d=32, spread=0.5, seed=0):
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.normal(size=(n_classes, d)))
    y = np.repeat(np.arange(n_classes), per_class)
    X = normalize_rows(centres[y] + spread * rng.normal(size=(y.size, d)) / np.sqrt(d))
    split = np.asarray([SPLIT_CYCLE[i % len(SPLIT_CYCLE)] for i in range(y.size)], dtype=object)
    return X, y, split


def brute_force(X, k):
    s = X @ X.T
    np.fill_diagonal(s, -np.inf)
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


@pytest.mark.parametrize("chunk", [None, 7])
def test_knn_graph_equals_brute_force(chunk):
    X = normalize_rows(np.random.default_rng(1).normal(size=(257, 24))).astype(np.float32)
    g = knn_graph(X, 10, backend="torch", chunk_size=chunk)
    idx, sims = brute_force(X, 10)
    assert g.backend == "torch" and g.k == 10
    np.testing.assert_array_equal(g.neighbors, idx)
    np.testing.assert_allclose(g.similarities, sims, atol=1e-5)
    assert knn_graph(X[:4], 10, backend="torch").k == 3  # k clipped to N - 1


@pytest.mark.skipif(not faiss_available(), reason="faiss is not installed")
def test_knn_graph_faiss_equals_brute_force():
    X = normalize_rows(np.random.default_rng(2).normal(size=(300, 16))).astype(np.float32)
    g = knn_graph(X, 8, backend="faiss")
    idx, sims = brute_force(X, 8)
    assert g.backend == "faiss"
    np.testing.assert_array_equal(g.neighbors, idx)
    np.testing.assert_allclose(g.similarities, sims, atol=1e-5)


class _BruteIndex:
    """Stands in for ``faiss.IndexFlatIP`` (same calls, numpy brute force), to run the FAISS code path anywhere."""

    def __init__(self, d):
        self.X = np.zeros((0, d), np.float32)

    def add(self, X):
        self.X = np.vstack([self.X, X])

    def search(self, Q, k):
        s = Q @ self.X.T
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), order


def test_faiss_code_path_with_a_stand_in_index(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=_BruteIndex))
    X = normalize_rows(np.random.default_rng(4).normal(size=(120, 12))).astype(np.float32)
    X[50:54] = X[10]  # five identical rows: ties can push an item out of its own top k + 1
    g = knn_graph(X, 5)
    assert g.backend == "faiss"
    assert not (g.neighbors == np.arange(120)[:, None]).any()
    idx, sims = brute_force(X, 5)
    np.testing.assert_allclose(g.similarities, sims, atol=1e-5)
    copies = [10, 50, 51, 52, 53]
    plain = ~np.isin(idx, copies).any(axis=1) & ~np.isin(np.arange(120), copies)  # rows without tied neighbours
    assert plain.sum() > 80
    np.testing.assert_array_equal(g.neighbors[plain], idx[plain])
    for i in copies:  # each copy finds the other four first
        assert set(g.neighbors[i, :4]) == set(copies) - {i}


@pytest.mark.skipif(faiss_available(), reason="faiss is installed")
def test_asking_for_faiss_without_it_says_how_to_get_it():
    with pytest.raises(EncoderlabError, match="faiss-cpu"):
        knn_graph(np.eye(3), 1, backend="faiss")


def test_drop_self_keeps_duplicates_and_handles_a_missing_self():
    I = np.array([[0, 5, 6], [4, 7, 8]])  # row 1's own index (1) was pushed out by ties
    D = np.array([[1.0, 0.9, 0.8], [1.0, 1.0, 0.7]])
    d, i = drop_self(D, I, np.array([0, 1]))
    assert i.tolist() == [[5, 6], [4, 7]]
    np.testing.assert_allclose(d, [[0.9, 0.8], [1.0, 1.0]], rtol=1e-6)


def test_wilson_interval_known_values():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert all(np.isnan(wilson_interval(0, 0)))


def _flip(y, split, n, seed=0):
    rng = np.random.default_rng(seed)
    flipped = rng.choice(np.flatnonzero(split == "train"), n, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1 + rng.integers(0, y.max(), n)) % (y.max() + 1)
    return noisy, flipped


def test_label_errors_find_flipped_labels():
    X, y, split = clustered()
    noisy, flipped = _flip(y, split, 10)
    le = make_le(X, noisy, split)
    test = le.index("test")
    d = diagnose(le, noisy[test], n_boot=200)
    top = {c["id"] for c in d.label_error_candidates[:10]}
    assert len(top & {le.ids[i] for i in flipped}) >= 8
    first = d.label_error_candidates[0]
    assert first["suggested"] == le.classes[y[le.ids.tolist().index(first["id"])]]
    assert d.n_label_error_candidates >= 8


def test_label_error_ranking_ignores_test_labels():
    X, y, split = clustered(seed=3)
    noisy, _ = _flip(y, split, 10, seed=3)
    a = make_le(X, noisy, split)
    scrambled = noisy.copy()
    test = a.index("test")
    scrambled[test] = np.random.default_rng(9).permutation(scrambled[test])[::-1]
    b = make_le(X, scrambled, split)
    graph = knn_graph(normalize_rows(a.X), 10)
    held = np.random.default_rng(4).integers(0, 6, y.size)  # test entries differ between the runs below
    held_b = held.copy()
    held_b[test] = (held_b[test] + 1) % 6
    da = diagnose(a, noisy[test], graph=graph, heldout_pred=held, n_boot=100)
    db = diagnose(b, noisy[test], graph=graph, heldout_pred=held_b, n_boot=100)
    assert da.label_error_candidates == db.label_error_candidates
    assert da.neighbour_agreement == db.neighbour_agreement
    assert da.cross_split_near_duplicates == db.cross_split_near_duplicates and da.outliers == db.outliers


def test_heldout_prediction_vetoes_and_confirms():
    X, y, split = clustered(seed=5)
    noisy, flipped = _flip(y, split, 4, seed=5)
    le = make_le(X, noisy, split)
    held = np.full(y.size, -1)
    held[flipped[0]] = noisy[flipped[0]]  # the probe agrees with the (wrong) label: not a candidate
    held[flipped[1]] = y[flipped[1]]  # the probe agrees with the neighbours: ranked first
    d = diagnose(le, noisy[le.index("test")], heldout_pred=held, n_boot=100)
    ids = [c["id"] for c in d.label_error_candidates]
    assert le.ids[flipped[0]] not in ids and ids[0] == le.ids[flipped[1]]


@pytest.mark.parametrize("modality", ["text", "image"])
def test_planted_cross_split_near_duplicate_is_found(modality):
    X, y, split = clustered(spread=0.6, seed=7)
    train_i, test_i = np.flatnonzero(split == "train")[3], np.flatnonzero(split == "test")[5]
    X[test_i] = normalize_rows(X[train_i] + 0.01 * np.random.default_rng(0).normal(size=X.shape[1]))
    keys = [f"k{i}" for i in range(y.size)]
    keys[test_i] = keys[train_i]
    d = diagnose(make_le(X, y, split, keys=keys, modality=modality), y[split == "test"], n_boot=100)
    pair = next(p for p in d.cross_split_near_duplicates if p["id"] == f"item{test_i:04d}")
    assert pair["other_id"] == f"item{train_i:04d}" and pair["other_split"] == "train"
    assert pair["similarity"] >= 0.98 and pair["exact"]
    assert d.n_cross_split_near_duplicates == len(d.cross_split_near_duplicates) == 1
    if modality == "image":  # identical files also come from data.audit's content-hash grouping
        assert [g["ids"] for g in d.exact_duplicate_groups] == [[f"item{train_i:04d}", f"item{test_i:04d}"]]
    else:
        assert d.exact_duplicate_groups == []


def test_outlier_imbalance_and_class_report():
    X, y, split = clustered(seed=11)
    far = 17
    X[far] = normalize_rows(np.random.default_rng(5).normal(size=X.shape[1]))
    keep = ~((y == 5) & (split == "train") & (np.arange(y.size) % 3 == 0))  # class c5 thinner in train
    X, y, split = X[keep], y[keep], split[keep]
    le = make_le(X, y, split)
    test = le.index("test")
    pred = y[test].copy()
    pred[y[test] == 2] = 3  # class c2 is always taken for c3
    d = diagnose(le, pred, n_boot=100)
    assert d.outliers[0]["id"] == "item0017" and d.n_outliers >= 1
    counts = np.bincount(y[split == "train"])
    assert d.imbalance_ratio == pytest.approx(counts.max() / counts.min()) and d.imbalance_ratio > 1
    assert d.worst_classes[0] == "c2" and d.per_class[0]["recall"] == 0 and d.per_class[0]["ci_high"] < 0.5
    assert d.confused_pairs[0]["true"] == "c2" and d.confused_pairs[0]["predicted"] == "c3"
    example = d.failing_examples[0]
    assert example["label"] == "c2" and example["predicted"] == "c3" and len(example["neighbours"]) == 3
    assert {n["label"] for n in example["neighbours"]} == {"c2"}  # its train neighbours say the head is wrong
    assert {a["class"] for a in d.neighbour_agreement} == set(le.classes)
    json.dumps(d.to_json())
    assert d.to_json()["counts"]["outliers"] == d.n_outliers


def test_slice_finder_ranks_the_bad_slice_worst():
    rng = np.random.default_rng(0)
    n = 400
    X = normalize_rows(rng.normal(size=(n, 8)))
    y = rng.integers(0, 3, n)
    split = np.asarray(["test"] * n, dtype=object)
    split[:40] = "train"
    camera = np.asarray(["phone", "dslr", "webcam", "scanner"], dtype=object)[np.arange(n) % 4]
    camera[47] = "drone"  # a slice of one item, wrong: small, and must not outrank the bad one
    other = rng.integers(0, 100, n)  # too many distinct values to slice
    le = make_le(X, y, split, camera=camera, serial=other)
    test = le.index("test")
    pred = y[test].copy()
    wrong = rng.random(test.size) < 0.1  # 10% errors everywhere ...
    wrong |= (camera[test] == "webcam") & (rng.random(test.size) < 0.6)  # ... and many more on webcams
    wrong[camera[test] == "drone"] = True
    pred[wrong] = (pred[wrong] + 1) % 3
    slices, notes = slice_report(le, test, pred == y[test], min_slice=10)
    assert (slices[0]["column"], slices[0]["value"]) == ("camera", "webcam")
    drone = next(s for s in slices if s["value"] == "drone")
    assert drone["small"] and drone["accuracy"] == 0 and not slices[0]["small"]
    assert slices[0]["gap_vs_rest"] < -0.3
    assert any("serial" in n for n in notes)
    d = diagnose(le, pred, n_boot=100)
    assert d.slices[0]["value"] == "webcam" and d.counts["small_slices"] == 1


def test_mismatched_predictions_are_refused():
    X, y, split = clustered(per_class=10)
    le = make_le(X, y, split)
    with pytest.raises(EncoderlabError, match="test predictions"):
        diagnose(le, [0, 1])
    with pytest.raises(EncoderlabError, match="heldout_pred"):
        diagnose(le, y[le.index("test")], heldout_pred=[0])
