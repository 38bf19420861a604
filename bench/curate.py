"""Curation at scale: score and deduplicate a synthetic store of N image-text pairs through the real store code.

    python bench/curate.py                         # 200k pairs of 512-d
    python bench/curate.py --pairs 200000,1000000  # and 1M (about 4 GB of shards in --workdir, minutes)

For each N it writes N image and N text embeddings into a fresh ``EmbeddingStore`` (synthetic, clustered, with 2%
planted near-copies and 10% of the captions given to another image), then, in a child process so the memory figure
is the filter's own, runs what ``encoderlab filter`` runs after extraction: the pair scores (streamed from the
store in chunks, then cached), the near-duplicate search (FAISS: exact flat up to ~20k items, IVF beyond) and every
rule (``curate.run.decide`` with ``--keep-top 0.8 --near-dup 0.95``). It prints seconds per stage and peak RSS, and
measures, in the same run:

- near-duplicate recall of the index against an exact search, on 4,000 (1M: 2,000) random query images;
- the exact flat index on a 20k subsample, extrapolated to N by (N / 20k)^2 (its cost grows with N^2), and the
  memory an N x N similarity matrix would need (not run: it would not fit);
- how many of the swapped captions keep-top 0.8 drops.

JSON goes to bench/results/curate.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CHUNK = 32768


def _rss_mb() -> float:
    """Peak resident memory so far (includes the store shards' memory-mapped pages that were read)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _anon_mb() -> float | None:
    """Resident anonymous memory now (heap, index; without the file-backed shard pages), Linux only."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def build_store(root: Path, n: int, dim: int, seed: int) -> dict:
    """N image and N text rows written through ``EmbeddingSpace.writer`` in chunks (never all in memory)."""
    from encoderlab.store import EmbeddingStore

    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(max(16, n // 50), dim)).astype(np.float32)
    store = EmbeddingStore(root)
    t0 = time.perf_counter()
    copies, swapped = 0, []
    with store.space("bench-image").writer(shard_size=CHUNK) as wi, \
            store.space("bench-text").writer(shard_size=CHUNK) as wt:
        for s in range(0, n, CHUNK):
            m = min(CHUNK, n - s)
            img = centres[rng.integers(0, len(centres), m)] + 0.9 * rng.normal(size=(m, dim)).astype(np.float32)
            copy = np.flatnonzero(rng.random(m) < 0.02)  # near-copies of the row before: cosine 0.95-0.998
            copy = copy[copy > 0]
            spread = rng.uniform(0.1, 0.45, size=(len(copy), 1)).astype(np.float32)
            img[copy] = img[copy - 1] + spread * rng.normal(size=(len(copy), dim)).astype(np.float32)
            txt = img + 1.5 * rng.normal(size=(m, dim)).astype(np.float32)  # a matching caption: cosine ~0.67
            swap = np.flatnonzero(rng.random(m) < 0.10)  # wrong pairs: another image's caption
            txt[swap] = txt[rng.permutation(swap)]
            copies += len(copy)
            swapped.append(swap + s)
            wi.add([f"i{k}" for k in range(s, s + m)], img)
            wt.add([f"t{k}" for k in range(s, s + m)], txt)
    np.save(root.parent / f"swapped-{n}.npy", np.concatenate(swapped))
    return {"build_seconds": round(time.perf_counter() - t0, 2), "planted_copies": copies,
            "swapped": int(sum(len(x) for x in swapped))}


def child(root: Path, n: int, dim: int) -> dict:
    """The measured part: scores (cached), every rule including near-duplicates, in this process."""
    import pandas as pd

    from encoderlab.curate import FilterConfig, ScoreCache, cosine_scores
    from encoderlab.curate.run import _reader, decide
    from encoderlab.store import EmbeddingStore

    store = EmbeddingStore(root)
    img, txt = store.space("bench-image"), store.space("bench-text")
    ik, tk = [f"i{k}" for k in range(n)], [f"t{k}" for k in range(n)]
    out: dict = {"rss_start_mb": _rss_mb()}
    t0 = time.perf_counter()
    scores = cosine_scores(img, txt, ik, tk)
    cache = ScoreCache(store, "bench-image", "bench-text")
    cache.add(ik, tk, scores)
    cache.save()
    out.update(score_seconds=round(time.perf_counter() - t0, 2), rss_after_score_mb=_rss_mb())
    t1 = time.perf_counter()
    cached = ScoreCache(store, "bench-image", "bench-text").lookup(ik, tk)
    out.update(cache_read_seconds=round(time.perf_counter() - t1, 2), cache_hits=int(np.isfinite(cached).sum()))
    pairs = pd.DataFrame({"row": np.arange(n), "id": [f"r{k}" for k in range(n)], "text_index": np.zeros(n, int),
                          "text": [f"caption {k}" for k in range(n)], "image": [f"/x/{k}.jpg" for k in range(n)],
                          "label": None, "split": "train", "image_key": ik, "text_key": tk, "score": scores})
    cfg = FilterConfig.merged(keep_top=0.8, near_dup=0.95, blank_std=None)
    t2 = time.perf_counter()
    verdict, found = decide(pairs, cfg, unreadable={}, stats=None, reader_for=_reader(img))
    near = found["near"]
    out.update(rules_seconds=round(time.perf_counter() - t2, 2),
               near_dup_seconds=round(found["seconds"]["near_duplicates"], 2), rss_peak_mb=_rss_mb(),
               rss_anon_after_rules_mb=_anon_mb(),
               near_backend=near.backend, nlist=near.nlist, nprobe=near.nprobe, near_pairs=len(near.pair_i),
               near_dropped=int((verdict.reason == "near-duplicate").sum()),
               keep_top_dropped=int((verdict.reason == "keep-top").sum()), kept=int(verdict.open.sum()))
    swapped = np.load(root.parent / f"swapped-{n}.npy")
    flagged = np.zeros(n, bool)
    flagged[np.argsort(-scores, kind="stable")[int(round(0.8 * n)):]] = True
    out["swapped_caught_at_keep_top_0.8"] = round(float(flagged[swapped].mean()), 4)
    out.update(_recall(img, ik, near, found["near_keys"], n))
    return out


def _recall(space, keys: list[str], near, near_keys: list[str], n: int, t: float = 0.95) -> dict:
    """Share of the exact near-duplicate pairs of random queries that the index found; exact by streaming."""
    from encoderlab.normalize import normalize_rows

    rng = np.random.default_rng(1)
    queries = 4000 if n <= 200_000 else 2000  # the exact check streams every row once per block of queries
    q = np.sort(rng.choice(n, size=min(queries, n), replace=False))
    Q = normalize_rows(space.get([keys[i] for i in q]))
    exact = set()
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        S = Q @ normalize_rows(space.get(keys[s : s + CHUNK])).T
        qi, j = np.nonzero(S >= t)
        exact |= {(int(q[a]), int(b) + s) for a, b in zip(qi, j) if q[a] != b + s}
    item = np.array([int(k[1:]) for k in near_keys])  # the rule ranks keys by score: back to row numbers
    a, b = item[near.pair_i].tolist(), item[near.pair_j].tolist()
    found = set(zip(a, b)) | set(zip(b, a))
    hit = sum(1 for p in exact if p in found)
    return {"recall_queries": len(q), "recall_exact_pairs": len(exact),
            "near_dup_recall": round(hit / max(len(exact), 1), 4),
            "exact_check_seconds": round(time.perf_counter() - t0, 2)}


def flat_baseline(root: Path, n: int, dim: int, sample: int = 20000) -> dict:
    """The exact flat index (range search over everything) on a subsample, and its N^2 extrapolation."""
    from encoderlab.curate import near_duplicates
    from encoderlab.normalize import normalize_rows
    from encoderlab.store import EmbeddingStore

    m = min(sample, n)
    X = normalize_rows(EmbeddingStore(root).space("bench-image").get([f"i{k}" for k in range(m)]))
    t0 = time.perf_counter()
    near_duplicates(lambda a, b: X[a:b], m, dim, 0.95, kind="flat")
    sec = time.perf_counter() - t0
    return {"flat_sample": m, "flat_sample_seconds": round(sec, 2),
            "flat_extrapolated_seconds": round(sec * (n / m) ** 2, 1),
            "nxn_matrix_gb": round(n * n * 4 / 1e9, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", default="200000", help="comma-separated pair counts (default: %(default)s)")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--workdir", help="where the synthetic stores go (default: a temporary directory)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "curate.json"))
    ap.add_argument("--child", nargs=3, metavar=("ROOT", "N", "DIM"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), int(args.child[1]), int(args.child[2]))))
        return
    results = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in (int(x) for x in args.pairs.split(",")):
            root = Path(tmp) / f"store-{n}"
            row = {"pairs": n, "dim": args.dim, **build_store(root, n, args.dim, seed=0)}
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, __file__, "--child", str(root), str(n), str(args.dim)],
                                  capture_output=True, text=True, check=True)
            row.update(json.loads(done.stdout.strip().splitlines()[-1]), child_wall_seconds=round(
                time.perf_counter() - t0, 1))
            row.update(flat_baseline(root, n, args.dim))
            print(json.dumps(row), flush=True)
            results.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
