"""Benchmark: listing a large Parquet manifest (``load_dataset("parquet:...")``), peak memory and seconds.

    .venv/bin/python bench/listing.py                       # 1M and 10M rows (a few minutes)
    .venv/bin/python bench/listing.py --sizes 200000

The file has ``id`` (unique), ``image`` (a relative path; the rows cycle over ``--files`` real image files, so
the existence check stats each distinct path once), ``caption`` and ``label`` columns. Two listings of it run,
each in a fresh child process (peak RSS = VmHWM, and peak anonymous memory sampled every 20 ms):

- ``baseline``: what a listing with Python objects per cell costs at least: ``pandas.read_parquet`` and the
  string columns converted to object dtype (one Python str per cell, as ``normalize_table`` made them before);
- ``ours``: ``encoderlab.data.load_dataset("parquet:FILE?text=caption")``, the real listing (checks, grouping,
  hash splits); its table keeps the string columns Arrow-backed.

Prints a table and the ratio baseline / ours; JSON goes to bench/results/listing.json.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from index import PeakMemory  # noqa: E402

ROW_GROUP = 1_000_000


def make_parquet(path: Path, n: int, files: int) -> None:
    """``n`` rows written a row group at a time with Arrow compute (no Python object per row)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    img_dir = path.parent / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (img_dir / f"{i:05d}.png").write_bytes(b"\x89PNG")
    writer = None
    try:
        for start in range(0, n, ROW_GROUP):
            idx = pa.array(np.arange(start, min(n, start + ROW_GROUP), dtype=np.int64))
            num = pc.utf8_lpad(pc.cast(idx, pa.string()), 9, "0")
            img = pc.utf8_lpad(pc.cast(pc.remainder(idx, files), pa.string()), 5, "0")
            table = pa.table({
                "id": pc.binary_join_element_wise("item-", num, ""),
                "image": pc.binary_join_element_wise("img/", img, ".png", ""),
                "caption": pc.binary_join_element_wise("a photo of thing number ", num, ""),
                "label": pc.binary_join_element_wise("class-", pc.cast(pc.remainder(idx, 100), pa.string()), ""),
            })
            writer = writer or pq.ParquetWriter(path, table.schema)
            writer.write_table(table)
    finally:
        if writer is not None:
            writer.close()


def child(mode: str, path: str) -> None:
    import pandas as pd

    import encoderlab.data as data

    base = PeakMemory.status()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        if mode == "baseline":
            t = pd.read_parquet(path)
            for c in ("id", "image", "caption", "label"):
                t[c] = t[c].astype(object)
            items, dtype = len(t), str(t["image"].dtype)
        else:
            ds = data.load_dataset(f"parquet:{path}?text=caption")
            items, dtype = len(ds), str(ds.table["image"].dtype)
        seconds = time.perf_counter() - t0
    status = PeakMemory.status()
    anon = max(mem.peak_anon, status.get("RssAnon", 0))
    print(json.dumps({"mode": mode, "items": items, "image_dtype": dtype, "seconds": round(seconds, 2),
                      "peak_rss_mb": round(status["VmHWM"] / 2**20, 1), "peak_anon_mb": round(anon / 2**20, 1),
                      "start_anon_mb": round(base.get("RssAnon", 0) / 2**20, 1)}))


def run_child(mode: str, path: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, str(path)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000000,10000000")
    p.add_argument("--files", type=int, default=1000, help="distinct image files the rows cycle over")
    p.add_argument("--modes", default="baseline,ours")
    p.add_argument("--work", help="working directory (default: a temporary one, removed afterwards)")
    p.add_argument("--out", default=str(HERE / "results" / "listing.json"))
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(*args.child)
        return 0
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="encoderlab-bench-listing-"))
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    try:
        for n in sorted(int(s) for s in args.sizes.split(",")):
            path = work / f"rows-{n}.parquet"
            if not path.exists():
                make_parquet(path, n, args.files)
            for mode in args.modes.split(","):
                r = {"rows": n, **run_child(mode, path)}
                runs.append(r)
                print(f"{n:>11,} {mode:9s} {r['seconds']:7.1f} s  VmHWM {r['peak_rss_mb']:7.0f} MB  anon "
                      f"{r['peak_anon_mb']:7.0f} MB  image dtype {r['image_dtype']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    for r in runs:
        base = next((b for b in runs if b["rows"] == r["rows"] and b["mode"] == "baseline"), None)
        if base and r["mode"] != "baseline":
            r["anon_ratio_baseline_over_ours"] = round(base["peak_anon_mb"] / r["peak_anon_mb"], 2)
            print(f"{r['rows']:>11,}: baseline / ours peak anonymous memory = {r['anon_ratio_baseline_over_ours']}x")
    doc = {"machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}, "files": args.files, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
