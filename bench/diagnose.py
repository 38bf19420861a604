"""Diagnosis speed and memory on 100k x 512 synthetic clustered embeddings (the size of a mid-sized real set).

    python bench/diagnose.py                     # 100,000 items, 512-d, k=10, FAISS if installed else torch
    python bench/diagnose.py --n 20000 --backend torch --json /tmp/diagnose.json

Times, in one run: the exact kNN graph (``knn_graph``; FAISS flat inner product when importable, else blocks of
``chunk x N`` torch matmul similarities, memory O(chunk x N)), then everything ``diagnose`` reads from that graph
(label errors, agreement, near-duplicates, outliers, slices, failing examples). Check in the same run: 200 random
rows of the graph against brute force over all N items (one 200 x N matmul + argsort): they must be exact.
Prints seconds and the process's peak RSS; the target is "a few minutes" on a 2-core CPU.

The data: 200 cluster centres, 100 classes (two clusters each), isotropic noise; 80/10/10 splits; 1% of train
labels flipped; a metadata column with 8 values; test predictions right 75% of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from encoderlab.data.manifest import Dataset
from encoderlab.extract.labelled import LabelledEmbeddings
from encoderlab.ladder.diagnose import default_chunk, diagnose, knn_graph
from encoderlab.normalize import normalize_rows


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def synthetic(n: int, d: int, seed: int = 0) -> tuple[LabelledEmbeddings, np.ndarray]:
    """Clustered unit embeddings with labels, splits and one metadata column, and 75%-right test predictions."""
    rng = np.random.default_rng(seed)
    centres = normalize_rows(rng.standard_normal((200, d), dtype=np.float32))
    cluster = rng.integers(0, 200, n)
    X = centres[cluster] + rng.standard_normal((n, d), dtype=np.float32) * np.float32(0.8 / np.sqrt(d))
    X = normalize_rows(X)
    y = (cluster % 100).astype(np.int64)
    split = rng.choice(np.array(["train", "val", "test"], dtype=object), n, p=[0.8, 0.1, 0.1])
    train = np.flatnonzero(split == "train")
    flip = rng.choice(train, max(1, train.size // 100), replace=False)
    y[flip] = (y[flip] + 1 + rng.integers(0, 99, flip.size)) % 100
    classes = [f"class{c:03d}" for c in range(100)]
    table = pd.DataFrame({"id": [f"item{i:06d}" for i in range(n)], "image": [None] * n,
                          "texts": [[] for _ in range(n)], "label": [classes[v] for v in y], "split": split,
                          "source": rng.choice([f"site{s}" for s in range(8)], n)})
    ds = Dataset(table, source="synthetic")
    le = LabelledEmbeddings(ds, "image", X, np.arange(n), np.asarray(ds.table["id"]), y, split, classes, None)
    test = le.index("test")
    pred = np.where(rng.random(test.size) < 0.75, y[test], rng.integers(0, 100, test.size))
    return le, pred


def check_sample(X: np.ndarray, neighbors: np.ndarray, m: int = 200, seed: int = 0) -> float:
    """Share of ``m`` random rows of the graph whose neighbours equal brute force over all N items."""
    rows = np.random.default_rng(seed).choice(X.shape[0], m, replace=False)
    s = X[rows] @ X.T
    s[np.arange(m), rows] = -np.inf
    brute = np.argsort(-s, axis=1, kind="stable")[:, : neighbors.shape[1]]
    return float(np.mean(np.all(np.sort(neighbors[rows], 1) == np.sort(brute, 1), axis=1)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--backend", default="auto", choices=["auto", "faiss", "torch"])
    ap.add_argument("--chunk", type=int, default=None, help="queries per similarity block (torch backend)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args()
    t0 = time.perf_counter()
    le, pred = synthetic(args.n, args.d)
    make_s = time.perf_counter() - t0
    rss_data = peak_rss_mb()
    graph = knn_graph(le.X, args.k, backend=args.backend, chunk_size=args.chunk, progress=sys.stderr.isatty())
    t1 = time.perf_counter()
    d = diagnose(le, pred, graph=graph)
    rest_s = time.perf_counter() - t1
    exact = check_sample(le.X, graph.neighbors)
    out = {"items": args.n, "dim": args.d, "k": graph.k, "backend": graph.backend,
           "chunk": args.chunk or default_chunk(args.n), "cpus": os.cpu_count(),
           "torch_threads": torch.get_num_threads(),
           "load_avg": [round(v, 2) for v in os.getloadavg()], "make_data_s": round(make_s, 2),
           "graph_s": round(graph.seconds, 2), "diagnose_rest_s": round(rest_s, 2),
           "total_s": round(graph.seconds + rest_s, 2), "peak_rss_mb": peak_rss_mb(), "rss_after_data_mb": rss_data,
           "sample_rows_exact": exact, "counts": d.to_json()["counts"]}
    for key, value in out.items():
        print(f"{key:18s} {value}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
