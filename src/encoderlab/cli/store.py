"""``encoderlab store list``, ``encoderlab store verify [--repair] [--compact]`` and ``encoderlab store export``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import EncoderlabError
from ..results.tables import format_table, skipped_lines
from .options import (
    add_common,
    add_data_options,
    add_device_options,
    add_parser,
    add_store_option,
    check_spec,
    load_data,
    make_encoder,
    open_store,
    progress,
    say,
    warn,
)


def register(sub: Any) -> None:
    st = sub.add_parser("store", help="look after the embedding store")
    st_sub = st.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(st_sub, "list", "spaces in the store (one per encoder x modality)",
                   "encoderlab store list\nencoderlab store list --store /data/emb --json")
    add_store_option(p)
    add_common(p)
    p.set_defaults(func=cmd_store_list)
    p = add_parser(st_sub, "verify",
                   "check every shard's size and checksum; --repair removes corrupt ones, --compact merges short ones",
                   "encoderlab store verify\nencoderlab store verify --repair --json\n"
                   "encoderlab store verify --compact")
    add_store_option(p)
    p.add_argument("--repair", action="store_true",
                   help="delete corrupt shards (their items are recomputed by the next embed)")
    p.add_argument("--compact", action="store_true",
                   help="merge shards shorter than --min-rows into larger ones (every key and value is kept)")
    p.add_argument("--min-rows", type=int, default=None,
                   help="with --compact: shards with fewer rows are merged (default: 4096, a full shard)")
    add_common(p)
    p.set_defaults(func=cmd_store_verify)
    p = add_parser(st_sub, "export", "write a dataset's embeddings (from the store, encoding what it lacks) to a file",
                   "encoderlab store export --encoder efficientnet-lite0 --data emoji --to emoji.parquet\n"
                   "encoderlab store export --encoder hf:openai/clip-vit-base-patch32 --data folder:~/pets "
                   "--split test --modality text --to pets.npy --json")
    p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", help="only this split")
    p.add_argument("--modality", choices=["auto", "image", "text"], default="auto",
                   help="image (each row's image) or text (each row's first caption); auto = image when both the "
                        "encoder and the data have images, else text")
    p.add_argument("--to", required=True, metavar="FILE",
                   help="FILE.parquet (one table with an embedding column) or FILE.npy (the [n, d] float32 matrix, "
                        "with FILE.parquet of the metadata beside it, row for row)")
    add_store_option(p)
    add_device_options(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_store_export)


def cmd_store_list(args: argparse.Namespace) -> dict[str, Any]:
    store = open_store(args)
    spaces = store.spaces()
    if not args.json:
        say(format_table([[s["fingerprint"][:12], (s.get("meta") or {}).get("spec", "?"),
                           (s.get("meta") or {}).get("modality", "?"), s.get("items", 0), s.get("dim"),
                           f"{s.get('bytes', 0) / 1e6:.1f} MB"] for s in spaces],
                         ["space", "encoder", "modality", "items", "dim", "size"]))
        say(f"store: {store.root}")
    return {"store": str(store.root), "spaces": spaces}


def cmd_store_verify(args: argparse.Namespace) -> dict[str, Any]:
    from ..store import COMPACT_MIN_ROWS

    min_rows = COMPACT_MIN_ROWS if args.min_rows is None else args.min_rows
    if args.min_rows is not None and not args.compact:
        raise EncoderlabError("--min-rows only applies to compaction", "add --compact, or drop --min-rows")
    if args.compact and min_rows < 2:
        raise EncoderlabError(f"--min-rows must be at least 2, got {min_rows}", f"e.g. --min-rows {COMPACT_MIN_ROWS}")
    store = open_store(args)
    problems: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    compacted: list[dict[str, Any]] = []
    for s in store.spaces():
        space = store.space(s["fingerprint"])
        found = space.verify(deep=True)
        problems += [{"space": s["fingerprint"], **p} for p in found]
        if args.repair and found:
            removed += [{"space": s["fingerprint"], **r} for r in space.repair()]
        if args.compact:
            if any(p["kind"] == "corrupt" for p in found) and not args.repair:
                compacted.append({"fingerprint": s["fingerprint"], "skipped": "corrupt shards: run with --repair"})
            else:
                compacted.append(space.compact(min_rows=min_rows))
    merged = sum(c.get("merged", 0) for c in compacted)
    into = sum(c.get("into", 0) for c in compacted)
    dead = sum(c.get("removed_dead", 0) for c in compacted)
    if not args.json:
        for p in problems:
            say(f"{p['space'][:12]}  {p.get('kind')}: {p.get('path') or p.get('shard')}: {p.get('problem')}")
        say(f"{len(problems)} problem(s)" + (f", {len(removed)} removed" if args.repair else ""))
        if args.compact:
            for c in compacted:
                if c.get("skipped") or c.get("busy"):
                    why = c.get("skipped") or "another compaction is running"
                    say(f"{c['fingerprint'][:12]}  not compacted: {why}")
                elif c["merged"] or c["removed_dead"]:
                    say(f"{c['fingerprint'][:12]}  {c['shards_before']} -> {c['shards_after']} shards")
            say(f"compacted: merged {merged} shard(s) into {into}"
                + (f", removed {dead} shard(s) whose keys were all stored earlier" if dead else ""))
    corrupt = [p for p in problems if p.get("kind") == "corrupt"]
    if corrupt and not args.repair:
        print(f"encoderlab: error: {len(corrupt)} corrupt shard(s) in {store.root} "
              "(run `encoderlab store verify --repair` to remove them; their items are recomputed by the next embed)",
              file=sys.stderr)
    # Orphans (leftovers of an interrupted write) are harmless: readers ignore them and writers clean them up.
    out: dict[str, Any] = {"store": str(store.root), "problems": problems, "removed": removed,
                           "ok": not corrupt or args.repair}
    if args.compact:
        out["compacted"] = {"merged": merged, "into": into, "removed_dead": dead, "min_rows": min_rows,
                            "spaces": compacted}
    return out


def cmd_store_export(args: argparse.Namespace) -> dict[str, Any]:
    from ..extract.export import check_export_path, export_embeddings

    target = check_export_path(args.to)  # a wrong suffix fails before data or model are loaded
    check_spec(args.encoder)
    ds = load_data(args)
    encoder = make_encoder(args)
    store = open_store(args)
    summary = export_embeddings(encoder, ds, store, target, modality=args.modality, progress=progress(args))
    summary["split"] = args.split
    warn(skipped_lines(summary["skipped"]))
    if not args.json:
        say(format_table([[summary["modality"], summary["rows"], summary["dim"], summary["encoded"],
                           summary["cached"], summary["n_skipped"]]],
                         ["modality", "rows", "dim", "encoded", "cached", "skipped"]))
        say("wrote: " + ", ".join(summary["files"]))
    return summary
