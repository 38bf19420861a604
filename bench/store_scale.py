"""Benchmark: peak memory of reading, pair scoring and IVF-PQ building as an embedding store grows to 1M items.

    .venv/bin/python bench/store_scale.py                          # N = 100k, 250k, 500k, 1M (~10-15 min)
    .venv/bin/python bench/store_scale.py --sizes 20000,50000      # quick

One store is grown cumulatively (synthetic clustered 512-d unit vectors from ``bench/index.py``, written in chunks
through ``EmbeddingSpace.writer``): an ``image`` and a ``text`` space keyed by the same item ids. After growing to
each N, three steps run, each in a fresh child process (so VmHWM is its own):

- ``read``: open the image space, list its N keys, stream every row through ``StoreVectors`` / ``iter_chunks``
  (a running sum touches each row);
- ``score``: ``curate.pairs.cosine_scores`` (what curation scores pairs with) of the N (image, text) pairs, a
  float32 array of N;
- ``index``: ``retrieval.build_index`` with kind ``ivf-pq`` (trains on a sample, adds in chunks).

Per child: seconds, VmHWM (counts store pages read through memory maps, which the kernel can drop), peak anonymous
memory (heap: what must fit), the anonymous memory right after the imports, and the growth over it. What must grow
with N ("must grow"): the key index (a 14-byte key + 8-byte hash + 8-byte position per item), the keys listed as
Python strings (~70 bytes each), the N float32 scores, and the index (PQ codes plus the fp16 re-ranking copy that
``build_index`` adds when it fits: ~1.1 KB a vector at 512-d); the rows are read through mmap and must not.
"MB per 100k" is the slope of anonymous growth from the previous N to this one. ``--from-json FILE`` redoes the
table and plot of a saved run. Results: bench/results/store_scale.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from index import PeakMemory, synthetic_chunks  # noqa: E402

STEPS = ("read", "score", "index")
DIM = 512
CHUNK = 65_536


def item_keys(start: int, stop: int) -> list[str]:
    return [f"item-{i:09d}" for i in range(start, stop)]


def grow_store(root: Path, have: int, n: int) -> float:
    """Add items ``have:n`` to the image and text spaces (text = image + noise, so pairs score ~0.9)."""
    from encoderlab.store import EmbeddingStore

    store = EmbeddingStore(root)
    t0 = time.perf_counter()
    img = store.space("image", meta={"spec": "bench:synthetic", "modality": "image", "embed_dim": DIM})
    txt = store.space("text", meta={"spec": "bench:synthetic", "modality": "text", "embed_dim": DIM})
    with img.writer(shard_size=CHUNK, commit_seconds=3600) as wi, txt.writer(shard_size=CHUNK,
                                                                               commit_seconds=3600) as wt:
        for start, X in synthetic_chunks(n - have, DIM, seed=have):
            keys = item_keys(have + start, have + start + len(X))
            wi.add(keys, X)
            noise = np.random.default_rng(have + start).standard_normal(X.shape).astype(np.float32)
            wt.add(keys, X + noise * (0.5 / np.sqrt(DIM)))
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------- child


def must_grow(spaces, keys: list[str]) -> dict:
    """Bytes that have to grow with N: each space's key index arrays and the listed keys as Python strings."""
    index = sum(a.nbytes for sp in spaces for seg in sp.index().segments for a in (seg.keys, seg.hashes,
                                                                                   seg.positions))
    listed = sum(sys.getsizeof(k) for k in keys) + 8 * len(keys)
    return {"key_index_bytes": index, "key_list_bytes": listed}


def step_read(space) -> dict:
    from encoderlab.retrieval import StoreVectors
    from encoderlab.retrieval.vectors import iter_chunks

    keys = space.keys()
    total = np.zeros(space.dim, dtype=np.float64)
    src = StoreVectors(space, keys)
    for _, X in iter_chunks(src, CHUNK):
        total += X.sum(axis=0, dtype=np.float64)
    grow = must_grow([space], keys)
    return {"rows": len(src), "checksum": round(float(total.sum()), 3), **grow,
            "must_grow_mb": round((grow["key_index_bytes"] + grow["key_list_bytes"] + 8 * len(keys)) / 2**20, 1)}


def step_score(store, space) -> dict:
    from encoderlab.curate.pairs import cosine_scores

    keys = space.keys()
    text = store.space("text")
    scores = cosine_scores(space, text, keys, keys)
    grow = must_grow([space, text], keys)
    return {"rows": len(scores), "mean_score": round(float(scores.mean()), 4), "score_bytes": scores.nbytes, **grow,
            "must_grow_mb": round((grow["key_index_bytes"] + grow["key_list_bytes"] + scores.nbytes) / 2**20, 1)}


def step_index(space, out: Path) -> dict:
    import pandas as pd

    from encoderlab.retrieval import StoreVectors, build_index, sample_held_out

    keys = space.keys()
    items = pd.DataFrame({"id": keys, "key": keys})
    held = sample_held_out(len(keys), 200, 100, seed=0)
    doc = build_index(StoreVectors(space, keys), items, out, kind="ivf-pq", memory="2G", held_out=held, force=True)
    m = doc["metrics"]
    grow = must_grow([space], keys)
    fixed = grow["key_index_bytes"] + grow["key_list_bytes"] + m["index_bytes"]
    return {"rows": doc["count"], "factory": doc["factory"], "recall_at_10": m["recall_at_10"],
            "index_bytes": m["index_bytes"], "bytes_per_vector": m["bytes_per_vector"],
            "train_seconds": m["train_seconds"], "add_seconds": m["add_seconds"], **grow,
            "must_grow_mb": round(fixed / 2**20, 1)}


def child(args: argparse.Namespace) -> None:
    """One step in this process; prints one JSON line of its metrics and memory."""
    import encoderlab.curate.pairs  # noqa: F401 - imports first, so the baseline holds them
    import encoderlab.retrieval  # noqa: F401
    from encoderlab.store import EmbeddingStore

    base = PeakMemory.status()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        store = EmbeddingStore(args.store)
        space = store.space("image")
        n = len(space)
        opened = time.perf_counter() - t0
        if args.child == "read":
            res = step_read(space)
        elif args.child == "score":
            res = step_score(store, space)
        else:
            res = step_index(space, Path(args.out))
        seconds = time.perf_counter() - t0
    status = PeakMemory.status()
    anon = max(mem.peak_anon, status.get("RssAnon", 0))
    print(json.dumps({"step": args.child, "n": n, "seconds": round(seconds, 2), "open_seconds": round(opened, 3),
                      **res, "peak_rss_mb": round(status["VmHWM"] / 2**20, 1),
                      "peak_anon_mb": round(anon / 2**20, 1),
                      "start_anon_mb": round(base.get("RssAnon", 0) / 2**20, 1),
                      "anon_growth_mb": round((anon - base.get("RssAnon", 0)) / 2**20, 1)}))


def run_child(store: Path, step: str, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", step, "--store", str(store), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {step} failed:\n{proc.stderr[-3000:]}")
    shutil.rmtree(out, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------- main


def add_growth(rows: list[dict]) -> None:
    """MB per 100k items of each step's anonymous growth, from the previous N to this one (the slope)."""
    for step in STEPS:
        runs = sorted((r for r in rows if r["step"] == step), key=lambda r: r["n"])
        for prev, r in zip(runs, runs[1:]):
            r["mb_per_100k"] = round((r["anon_growth_mb"] - prev["anon_growth_mb"]) / (r["n"] - prev["n"]) * 1e5, 2)


def print_table(rows: list[dict]) -> None:
    print(f"\n{'N':>9} {'step':6} {'seconds':>8} {'VmHWM MB':>9} {'anon MB':>8} {'growth MB':>9} {'MB/100k':>8} "
          f"{'must grow MB':>12}")
    for r in rows:
        per, must = r.get("mb_per_100k"), r.get("must_grow_mb")
        print(f"{r['n']:>9,} {r['step']:6} {r['seconds']:>8.1f} {r['peak_rss_mb']:>9.0f} {r['peak_anon_mb']:>8.0f} "
              f"{r['anon_growth_mb']:>9.0f} {'' if per is None else f'{per:8.1f}':>8} "
              f"{'' if must is None else f'{must:12.0f}':>12}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for step, color in zip(STEPS, ("C0", "C1", "C2")):
        runs = sorted((r for r in rows if r["step"] == step), key=lambda r: r["n"])
        ns = [r["n"] for r in runs]
        ax.plot(ns, [r["peak_rss_mb"] for r in runs], "o-", color=color, label=f"{step}: VmHWM")
        ax.plot(ns, [r["peak_anon_mb"] for r in runs], "s--", color=color, label=f"{step}: anonymous")
    ax.set_xlabel("items N (512-d float32)")
    ax.set_ylabel("peak MB")
    ax.set_title("Peak memory per step vs store size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="100000,250000,500000,1000000")
    p.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    p.add_argument("--out", default=str(HERE / "results" / "store_scale.json"))
    p.add_argument("--from-json", help="print the table and redo the plot of a saved result instead of measuring")
    p.add_argument("--child", choices=STEPS, help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        return report(doc, Path(args.out))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="encoderlab-bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    writes = []
    try:
        store, have = work / "store", 0
        for n in sizes:
            secs = grow_store(store, have, n)
            writes.append({"n": n, "added": n - have, "seconds": round(secs, 1)})
            print(f"store grown to {n:,} items (image + text spaces) in {secs:.1f} s", flush=True)
            have = n
            for step in STEPS:
                r = run_child(store, step, work / "index")
                rows.append(r)
                print(f"  {step:6s} {r['seconds']:7.1f} s  VmHWM {r['peak_rss_mb']:7.0f} MB  anon "
                      f"{r['peak_anon_mb']:6.0f} MB (start {r['start_anon_mb']:.0f}, +{r['anon_growth_mb']:.0f})",
                      flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    doc = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "dim": DIM, "chunk": CHUNK,
           "store": "one store grown cumulatively; image + text spaces keyed by the same item ids",
           "writes": writes, "runs": rows}
    return report(doc, Path(args.out))


def report(doc: dict, out: Path) -> int:
    add_growth(doc["runs"])
    print_table(doc["runs"])
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    plot(doc["runs"], out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
