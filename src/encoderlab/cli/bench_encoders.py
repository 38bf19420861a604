"""Command ``bench-encoders``: several encoders on one dataset — linear/kNN quality, speed, memory, one table and plot.

A thin layer over ``encoderlab.ladder.bench_encoders``; writes a run directory (``results.json``, one sub-directory
per encoder and rung, ``bench-encoders.png``) and prints the table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
from typing import Any

from .options import (
    add_parser,
    add_run_options,
    load_data,
    open_store,
    positive_int,
    prepare_run_dir,
    progress,
    say,
    warn,
)


def register(sub: Any) -> None:
    from ..ladder.bench_encoders import MODALITIES, SPEED_ITEMS, SPEED_REPEATS

    p = add_parser(sub, "bench-encoders",
                   "several encoders on one dataset: linear-probe and kNN top-1 with intervals, items/s, ms/item, "
                   "peak memory, parameters; one table and one plot",
                   "encoderlab bench-encoders --encoders efficientnet-lite0,efficientnet-lite1,efficientnet-lite2 "
                   "--data emoji\n"
                   "encoderlab bench-encoders --encoders minilm-l6,hf-text:BAAI/bge-small-en-v1.5 --data emoji "
                   "--modality text --json")
    p.add_argument("--encoders", required=True,
                   help="comma-separated encoder specs (see `encoderlab encoders list`); unknown ones fail at once")
    p.add_argument("--modality", choices=MODALITIES, default="auto",
                   help="what to embed and classify; auto: images when the encoder and the data have them, else "
                        "texts; an encoder that does not fit is skipped, with the reason in the table "
                        "(default: %(default)s)")
    p.add_argument("--speed-items", type=positive_int, default=SPEED_ITEMS,
                   help="items of the fixed speed subset (the first by id), embedded cold in a child process per "
                        "encoder (default: %(default)s)")
    p.add_argument("--speed-repeats", type=positive_int, default=SPEED_REPEATS,
                   help="cold extractions of the subset per encoder, each into a new empty store; the fastest counts "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="extraction batch size of the speed measurement (default: each encoder's own)")
    add_run_options(p, needs_encoder=False)
    p.set_defaults(func=cmd_bench_encoders)


def cmd_bench_encoders(args: argparse.Namespace) -> dict[str, Any]:
    from ..ladder.bench_encoders import bench_encoders, check_specs

    specs = check_specs(args.encoders.split(","))  # a typo fails before the data is read or a run dir made
    out_dir = prepare_run_dir(args, "bench-encoders", specs[0] + (f"+{len(specs) - 1}" if len(specs) > 1 else ""))
    store = open_store(args)
    ds = load_data(args, whole=True)
    bench = bench_encoders(specs, ds, store, modality=args.modality, speed_items=args.speed_items,
                           speed_repeats=args.speed_repeats, batch_size=args.batch_size, device=args.device,
                           precision=args.precision, n_boot=args.n_boot, seed=args.seed, progress=progress(args),
                           out_dir=out_dir)
    out = bench.to_json()
    for spec, why in bench.skipped.items():
        warn(f"skipped {spec}: {why}")
    if not args.json:
        say(f"{ds.source}: {len(ds)} items, {len(ds.classes)} classes; modality: {args.modality}")
        say(bench.format())
        if bench.plot is not None:
            say(f"plot: {bench.plot}")
        say(f"run: {out_dir}")
    return out
