"""Benchmark: exact vs HNSW vs IVF-PQ search at 100k and 1M vectors of 512-d, from an embedding store.

    .venv/bin/python bench/index.py                       # 100k and 1M synthetic + real store spaces (~10 min)
    .venv/bin/python bench/index.py --sizes 100000 --no-real

Synthetic data: 1M clustered unit vectors written in chunks into a temporary embedding store (100 groups of 100
clusters each; every point = its cluster centre + a 16-d offset in a cluster-specific subspace + isotropic noise,
normalised: nearest neighbours lie in the same cluster mostly, as with real embeddings, and IVF needs several
probes). The 100k case is the first 100k items of that store. Real data: every space of the default store with at
least 5,000 items (e.g. OpenClipart's image and caption embeddings), small enough that only recall is telling.

For each size, 1,000 held-out queries (and 500 tuning queries) and their exact neighbours are computed once,
streamed from the store; every kind is then built by ``build_index`` in its own child process (so peak memory is
its own), tuned to recall@10 >= 0.95 on the tuning queries and measured on the held-out ones. Reported per build:
recall@10, batched queries/s, one-query p50 latency, build seconds, bytes per vector, peak RSS (VmHWM, which counts
the store pages read through memory maps) and peak anonymous (private) memory. The headline is the best ANN qps
at recall >= 0.95 over exact qps at 1M. Results: bench/results/index.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SPACE = "bench-synthetic-clustered"
KINDS = ("flat", "hnsw", "ivf-pq")
REAL_MIN_ITEMS = 5000


# ---------------------------------------------------------------------------------------------------- data


def synthetic_chunks(n: int, d: int, seed: int = 0, chunk: int = 65_536, groups: int = 100, clusters: int = 10_000,
                     rank: int = 16):
    """``(start, rows)`` of ``n`` clustered unit vectors, generated chunk by chunk (memory: one chunk)."""
    rng = np.random.default_rng(seed)

    def unit(a):
        return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)

    centres = unit(unit(rng.standard_normal((groups, d)))[rng.integers(0, groups, clusters)]
                   + unit(rng.standard_normal((clusters, d))))
    bases = rng.standard_normal((256, rank, d)).astype(np.float32) / np.sqrt(d)
    for start in range(0, n, chunk):
        r = np.random.default_rng([seed, start])
        m = min(chunk, n - start)
        cid = r.integers(0, clusters, m)
        z = r.standard_normal((m, rank)).astype(np.float32) * (0.8 / np.sqrt(rank))
        x = centres[cid]
        basis = cid % len(bases)
        for b in np.unique(basis):  # one small matmul per basis: no [m, rank, d] temporary
            rows = np.flatnonzero(basis == b)
            x[rows] += z[rows] @ bases[b]
        x += r.standard_normal((m, d)).astype(np.float32) * (0.3 / np.sqrt(d))
        yield start, unit(x)


def synthetic_keys(n: int) -> list[str]:
    return [f"syn-{i:09d}" for i in range(n)]


def write_synthetic_store(root: Path, n: int, d: int) -> dict:
    """The synthetic vectors in an embedding store space (skipped when already there, e.g. with --work)."""
    from encoderlab.store import EmbeddingStore

    space = EmbeddingStore(root).space(SPACE, meta={"spec": "bench:synthetic", "embed_dim": d})
    if len(space) >= n:
        return {"seconds": 0.0, "reused": True}
    t0 = time.perf_counter()
    keys = synthetic_keys(n)
    with space.writer(shard_size=65_536, commit_seconds=3600) as w:
        for start, X in synthetic_chunks(n, d):
            w.add(keys[start:start + len(X)], X)
    return {"seconds": round(time.perf_counter() - t0, 1), "reused": False}


# ---------------------------------------------------------------------------------------------------- child


class PeakMemory:
    """Samples this process's resident and anonymous memory every 20 ms (VmHWM misses the anonymous part)."""

    def __init__(self) -> None:
        self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def status() -> dict[str, int]:
        out = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmHWM", "VmRSS", "RssAnon")):
                    name, value = line.split(":")
                    out[name] = int(value.split()[0]) * 1024
        return out

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_anon = max(self.peak_anon, self.status().get("RssAnon", 0))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def child(args: argparse.Namespace) -> None:
    """One build in this process; prints one JSON line of its metrics and memory."""
    import pandas as pd

    from encoderlab.retrieval import HeldOut, StoreVectors, build_index
    from encoderlab.store import EmbeddingStore

    with PeakMemory() as mem:
        base = PeakMemory.status().get("RssAnon", 0)
        space = EmbeddingStore(args.store).space(args.space)
        keys = space.keys()[: args.n] if args.space != SPACE else synthetic_keys(args.n)
        items = pd.DataFrame({"id": keys, "key": keys})
        doc = build_index(StoreVectors(space, keys), items, args.out, kind=args.kind, memory=args.memory,
                          held_out=HeldOut.load(args.held), force=True)
    status = PeakMemory.status()
    print(json.dumps({"kind": doc["kind"], "factory": doc["factory"], "search": doc["search"], **doc["metrics"],
                      "peak_rss_mb": round(status["VmHWM"] / 2**20, 1),
                      "peak_anon_mb": round(max(mem.peak_anon, status.get("RssAnon", 0)) / 2**20, 1),
                      "start_anon_mb": round(base / 2**20, 1)}))


def run_child(store: Path, space: str, n: int, kind: str, held: Path, out: Path, memory: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--store", str(store), "--space", space, "--n", str(n),
           "--kind", kind, "--held", str(held), "--out", str(out), "--memory", memory]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {kind} n={n} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    shutil.rmtree(out, ignore_errors=True)
    return res


# ---------------------------------------------------------------------------------------------------- main


def held_out_for(store: Path, space_name: str, keys: list[str], queries: int, path: Path) -> dict:
    """Query samples and exact neighbours of one collection, saved for the child builds."""
    from encoderlab.retrieval import StoreVectors, compute_truth, sample_held_out
    from encoderlab.store import EmbeddingStore

    source = StoreVectors(EmbeddingStore(store).space(space_name), keys)
    held = compute_truth(sample_held_out(len(keys), queries, queries // 2, seed=0), source)
    held.save(str(path))
    n_q = len(held.all_rows)
    return {"queries": len(held.eval_rows), "tuning_queries": len(held.tune_rows),
            "exact_stream_seconds": round(held.exact_seconds, 2),
            "exact_stream_qps": round(n_q / held.exact_seconds, 1)}


def bench_collection(name: str, store: Path, space: str, keys: list[str], kinds, queries: int, work: Path,
                     memory: str) -> dict:
    held = work / f"held-{name}.npz"
    entry = {"collection": name, "items": len(keys), **held_out_for(store, space, keys, queries, held)}
    print(f"{name}: {len(keys):,} items, exact neighbours of {entry['queries']}+{entry['tuning_queries']} queries "
          f"streamed from the store in {entry['exact_stream_seconds']} s", flush=True)
    entry["builds"] = []
    for kind in kinds:
        res = run_child(store, space, len(keys), kind, held, work / f"index-{name}-{kind}", memory)
        entry["builds"].append(res)
        print(f"  {kind:8s} {res['factory']:32s} recall@10 {res['recall_at_10']:.3f}  {res['qps']:>9.1f} q/s  "
              f"p50 {res['latency_ms_p50']:.2f} ms  build {res['build_seconds']:.1f} s  "
              f"{res['bytes_per_vector']:.0f} B/vec  peak RSS {res['peak_rss_mb']:.0f} MB "
              f"(anon {res['peak_anon_mb']:.0f} MB)  {res['search']}", flush=True)
    exact = next((b for b in entry["builds"] if b["kind"] == "flat"), None)
    good = [b for b in entry["builds"] if b["kind"] != "flat" and (b["recall_at_10"] or 0) >= 0.95]
    if exact and good:
        best = max(good, key=lambda b: b["qps"])
        entry["best_ann"] = {"kind": best["kind"], "qps": best["qps"], "speedup_vs_exact": round(best["qps"] /
                                                                                                 exact["qps"], 1)}
        print(f"  best ANN at recall >= 0.95: {best['kind']} {best['qps']:.0f} q/s = "
              f"{entry['best_ann']['speedup_vs_exact']}x exact ({exact['qps']:.0f} q/s)", flush=True)
    return entry


def real_spaces(min_items: int) -> list[tuple[str, Path, str, list[str]]]:
    from encoderlab.paths import store_dir
    from encoderlab.store import EmbeddingStore

    store = EmbeddingStore(store_dir())
    found = []
    for s in store.spaces():
        meta = s.get("meta") or {}
        if (s.get("items") or 0) >= min_items and not s.get("problem") and meta.get("spec") and s["dim"] <= 4096:
            name = f"{meta.get('spec', '?').rsplit('/', 1)[-1]}:{meta.get('modality', '?')}"
            found.append((name, store.root, s["fingerprint"], store.space(s["fingerprint"]).keys()))
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--queries", type=int, default=1000, help="held-out queries (half as many tune)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--memory", default="4G")
    p.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    p.add_argument("--no-real", action="store_true", help="skip the spaces of the default store")
    p.add_argument("--out", default=str(HERE / "results" / "index.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for name in ("--store", "--space", "--kind", "--held"):
        p.add_argument(name, help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    sizes = sorted(int(s) for s in args.sizes.split(","))
    kinds = args.kinds.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="encoderlab-bench-index-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        store = work / "store"
        wrote = write_synthetic_store(store, max(sizes), args.dim)
        print(f"synthetic store: {max(sizes):,} x {args.dim} in {wrote['seconds']} s ({store})", flush=True)
        results = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "dim": args.dim,
                   "memory_budget": args.memory, "synthetic_store_seconds": wrote["seconds"], "collections": []}
        for n in sizes:
            results["collections"].append(bench_collection(f"synthetic-{n}", store, SPACE, synthetic_keys(n), kinds,
                                                           args.queries, work, args.memory))
        if not args.no_real:
            for name, root, space, keys in real_spaces(REAL_MIN_ITEMS):
                results["collections"].append(bench_collection(name, root, space, keys, kinds, args.queries, work,
                                                               args.memory))
        big = next((c for c in results["collections"] if c["collection"] == f"synthetic-{max(sizes)}"), None)
        if big and "best_ann" in big:
            results["headline"] = {"items": big["items"], **big["best_ann"]}
            print(f"\n{big['items']:,} x {args.dim}: best ANN at recall@10 >= 0.95 is {big['best_ann']['kind']}, "
                  f"{big['best_ann']['speedup_vs_exact']}x the queries/s of exact search (target >= 10x)")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
