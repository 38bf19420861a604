"""The Ray engine's overhead on one machine: `embed` with the local engine vs `--engine ray`, same images, same model.

    .venv/bin/python bench/scale.py                          # efficientnet-lite0 on 6,000 OpenClipart images (~6 min)
    .venv/bin/python bench/scale.py --encoder hf:DIR --limit 500 --repeats 1

Every case embeds the same images into a fresh store (nothing cached) from a model already loaded on the driver, as
the CLI does. Measured in this same run:
  local                  ``embed_dataset`` in this process (the baseline);
  ray cold               a local Ray cluster started and stopped around the run, the default plan (what one
                         `encoderlab embed --engine ray` pays on a laptop);
  ray (W x C CPU)        on a running cluster (what `--ray-address auto` pays): W encoder actors of C CPUs each,
                         booted per run (a model load each, overlapping the hashing): the default plan (one actor
                         per CPU), then 1 x all CPUs (the local engine's shape), 1 x 1 and 2 x 1 (throughput at 1
                         and 2 workers).
The headline is the default plan's wall time over the local engine's (target <= 1.15 at 2 CPUs); results go to
bench/results/scale.json with the per-actor image rate (images per second of an actor's own time) that
docs/scale.md scales up from. Embeddings are checked equal to the local run's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from encoderlab.data import load_dataset
from encoderlab.encoders import create_encoder
from encoderlab.extract import embed_dataset
from encoderlab.extract.loop import space_for
from encoderlab.store import EmbeddingStore

HERE = Path(__file__).resolve().parent


def run_case(name: str, encoder, ds, engine_factory, repeats: int, reference: dict | None) -> dict:
    """Wall seconds of ``repeats`` fresh-store embeddings (median and best), plus an equality check."""
    walls, summary, store_dir = [], None, None
    for i in range(repeats):
        store_dir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{name.replace(' ', '-')}-"))
        t0 = time.perf_counter()
        engine, owned = engine_factory()
        if engine is not None:
            engine.release_workers()  # every run boots its actors, as every command does
        try:
            summary = embed_dataset(encoder, ds, EmbeddingStore(store_dir), "image", progress=False, engine=engine)
        finally:
            if owned:
                engine.close()
        walls.append(time.perf_counter() - t0)
        if i < repeats - 1:
            shutil.rmtree(store_dir, ignore_errors=True)
    space = space_for(EmbeddingStore(store_dir), encoder, "image")
    keys = sorted(space.keys())
    out = {"case": name, "wall_s": round(statistics.median(walls), 2), "best_s": round(min(walls), 2),
           "runs": [round(w, 2) for w in walls], "encoded": summary["encoded"],
           "images_per_s": round(summary["encoded"] / statistics.median(walls), 2),
           "skipped": len(summary["skipped"]), "engine": summary["engine"],
           "per_actor_images_per_s": (summary["engine"].get("runs") or [{}])[-1].get("per_actor_items_per_s")}
    if reference is not None:
        ref = EmbeddingStore(reference["store"])
        out["max_abs_diff_vs_local"] = float(np.abs(space_for(ref, encoder, "image").get(keys)
                                                    - space.get(keys)).max())
    out["store"] = str(store_dir)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--data", default="openclipart")
    ap.add_argument("--limit", type=int, default=6000, help="images (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per case, median reported (default: %(default)s)")
    ap.add_argument("--out", default=str(HERE / "results" / "scale.json"))
    args = ap.parse_args()

    from encoderlab.extract.ray_engine import RayEngine

    ds = load_dataset(args.data)
    ds = ds.derive(ds.table[ds.table["image"].notna()].iloc[: args.limit])
    encoder = create_encoder(args.encoder, device="cpu")
    cpus = os.cpu_count() or 1
    print(f"{args.encoder} on {len(ds)} images of {args.data}, {cpus} CPUs, {args.repeats} repeats per case",
          flush=True)
    rows = [run_case("local", encoder, ds, lambda: (None, False), args.repeats, None)]
    local = rows[0]
    print(f"  local: {local['wall_s']} s", flush=True)

    rows.append(run_case("ray cold (start + stop cluster)", encoder, ds, lambda: (RayEngine(num_cpus=cpus), True),
                         args.repeats, local))
    print(f"  ray cold: {rows[-1]['wall_s']} s", flush=True)
    plans = [(None, None)] + [(w, c) for w, c in ((1, cpus), (1, 1), (2, 1)) if w * c <= cpus]
    for workers, per in plans:
        with RayEngine(num_cpus=cpus, workers=workers, cpus_per_worker=per) as eng:
            p = eng.plan()
            name = f"ray ({p['workers']} x {p['cpus_per_worker']} CPU){' default' if workers is None else ''}"
            rows.append(run_case(name, encoder, ds, lambda: (eng, False), args.repeats, local))
            print(f"  {name}: {rows[-1]['wall_s']} s", flush=True)
    for r in rows:
        r["ratio_vs_local"] = round(r["wall_s"] / local["wall_s"], 3)
        shutil.rmtree(r.pop("store"), ignore_errors=True)
    warm_row = rows[2]  # the default plan on a running cluster
    doc = {"encoder": args.encoder, "data": args.data, "images": len(ds), "cpus": cpus, "repeats": args.repeats,
           "cases": rows, "headline": {"ray_over_local": warm_row["ratio_vs_local"], "target": 1.15,
                                       "cold_over_local": rows[1]["ratio_vs_local"],
                                       "per_actor_images_per_s": warm_row["images_per_s"]},
           "python": sys.version.split()[0], "when": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"\n{'case':34s} {'wall s':>8s} {'best s':>8s} {'img/s':>8s} {'x local':>8s} {'max |diff|':>11s}")
    for r in rows:
        print(f"{r['case']:34s} {r['wall_s']:8.2f} {r['best_s']:8.2f} {r['images_per_s']:8.1f} "
              f"{r['ratio_vs_local']:8.3f} {r.get('max_abs_diff_vs_local', 0.0):11.2e}")
    h = doc["headline"]
    print(f"\nray / local = {h['ray_over_local']:.3f} (target <= 1.15); with cluster start {h['cold_over_local']:.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
