"""Memory of store reads that must stay flat as a space grows (issue 12 §4; bench/store_scale.py measures 1M).

Rows are read through memory maps a chunk at a time, so streaming every row, scoring every pair or adding every
row to an index holds a few chunks, never all N rows; what grows with N is the key index (numpy arrays, ~30 bytes
a key), the keys a caller lists and the N scores. tracemalloc sees numpy buffers and Python objects, not the
mapped shard pages, so a read that materialised every row would show up here as N x dim x 4 bytes.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from encoderlab.retrieval import StoreVectors
from encoderlab.retrieval.vectors import iter_chunks
from encoderlab.store import EmbeddingStore

N, DIM, CHUNK = 40_000, 64, 2048
ROWS_BYTES = N * DIM * 4  # 10 MB: what a read holding every row would trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale") / "store"
    store = EmbeddingStore(root)
    keys = [f"item-{i:07d}" for i in range(N)]
    rng = np.random.default_rng(0)
    for name in ("image", "text"):
        with store.space(name).writer(shard_size=4096) as w:
            for s in range(0, N, 8192):
                w.add(keys[s:s + 8192], rng.standard_normal((min(8192, N - s), DIM)).astype(np.float32))
    return root, keys


def _traced_peak(fn):
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_streaming_every_row_holds_a_few_chunks_not_all_rows(store):
    root, keys = store
    space = EmbeddingStore(root).space("image")
    space.get(keys[:1])  # open the index and verify the shards outside the measurement
    src = StoreVectors(space, keys)

    def stream():
        total = np.zeros(DIM)
        for _, X in iter_chunks(src, CHUNK):
            total += X.sum(axis=0)
        return total

    total, peak = _traced_peak(stream)
    assert np.isfinite(total).all()
    chunk_bytes = CHUNK * DIM * 4
    assert peak < 8 * chunk_bytes + 64 * N, f"streaming traced {peak / 2**20:.1f} MB (all rows: 10 MB)"
    assert peak < ROWS_BYTES / 2


def test_pair_scores_hold_the_scores_and_a_few_chunks(store):
    from encoderlab.curate.pairs import cosine_scores

    root, keys = store
    st = EmbeddingStore(root)
    img, txt = st.space("image"), st.space("text")
    img.get(keys[:1]), txt.get(keys[:1])
    scores, peak = _traced_peak(lambda: cosine_scores(img, txt, keys, keys, chunk_size=CHUNK))
    assert scores.shape == (N,) and scores.dtype == np.float32
    assert peak < 12 * CHUNK * DIM * 4 + 64 * N, f"scoring traced {peak / 2**20:.1f} MB (all rows: 10 MB)"


def test_key_index_is_numpy_arrays_of_a_few_bytes_per_key(store):
    root, keys = store
    space = EmbeddingStore(root).space("image")
    idx, peak = _traced_peak(space.index)
    per_key = sum(seg.keys.nbytes + seg.hashes.nbytes + seg.positions.nbytes for seg in idx.segments) / N
    assert per_key <= len(keys[0]) + 16 + 2, per_key  # key bytes + 8-byte hash + 8-byte position
    assert peak < 4 * 64 * N, f"opening the key index traced {peak / 2**20:.1f} MB"


def test_a_scan_keeps_at_most_open_bytes_of_shards_mapped(tmp_path, monkeypatch):
    """The pages a memory map has touched stay in RSS until it is closed: a scan over a store bigger than
    ``OPEN_BYTES`` must close maps as it goes (RSS flat in the store's size), and still read every row right."""
    from encoderlab.store import space as space_mod

    monkeypatch.setattr(space_mod, "OPEN_BYTES", 1 << 20)  # 1 MiB: 4 of the 8 shards
    rng = np.random.default_rng(0)
    space = EmbeddingStore(tmp_path / "s").space("scan")
    X = rng.standard_normal((8192, 64)).astype(np.float32)
    with space.writer(shard_size=1024) as w:  # 1024 x 64 x 4 B = 256 KiB a shard, 8 shards: 2 MiB in all
        w.add([f"k{i}" for i in range(len(X))], X)
    assert len(space.shard_records()) == 8 and space_mod.OPEN_BYTES < X.nbytes
    peak = 0
    for start in range(0, len(X), 512):
        got = space.get([f"k{i}" for i in range(start, start + 512)])
        np.testing.assert_array_equal(got, X[start : start + 512])
        peak = max(peak, sum(m.nbytes for m in space._maps.values()))
    assert peak <= space_mod.OPEN_BYTES
