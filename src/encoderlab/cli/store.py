"""``encoderlab store list``, ``verify [--repair] [--compact]``, ``export``, ``rm SPACE...`` and ``gc``."""

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
    int_at_least,
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
    p.add_argument("--min-rows", type=int_at_least(2), default=None,
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
    p = add_parser(st_sub, "rm", "remove spaces by fingerprint prefix (embeddings are recomputed when needed again)",
                   "encoderlab store rm 3fa2c1\nencoderlab store rm 3fa2c1 9b07 --dry-run --json")
    p.add_argument("spaces", nargs="+", metavar="SPACE",
                   help="fingerprint or unique prefix of it (the `space` column of `encoderlab store list`)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    add_store_option(p)
    add_common(p)
    p.set_defaults(func=cmd_store_rm)
    p = add_parser(st_sub, "gc",
                   "remove leftovers of killed writers and spaces of local:/hf: model directories that are gone",
                   "encoderlab store gc --dry-run\nencoderlab store gc --store /data/emb --json")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    add_store_option(p)
    add_common(p)
    p.set_defaults(func=cmd_store_gc)


def open_existing_store(args: argparse.Namespace) -> Any:
    """The store of ``--store``, refused when that directory does not exist: a typo in a path must not read as a
    healthy empty store. The default store may not exist yet (nothing embedded so far): that is no error."""
    store = open_store(args)
    if getattr(args, "store", None) and not store.exists():
        raise EncoderlabError(f"no store at {store.root}",
                              "check the --store path, or run `encoderlab embed` to create a store there")
    return store


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 1e6:.1f} MB"


def cmd_store_list(args: argparse.Namespace) -> dict[str, Any]:
    store = open_existing_store(args)
    spaces = store.spaces()
    if not args.json:
        # A space that cannot be read says why in its own column, not only in --json.
        say(format_table([[s["fingerprint"][:12], (s.get("meta") or {}).get("spec", "?"),
                           (s.get("meta") or {}).get("modality", "?"), s.get("items", 0), s.get("dim"),
                           _mb(s.get("bytes")), _problem_cell(s.get("problem"))] for s in spaces],
                         ["space", "encoder", "modality", "items", "dim", "size", "problem"]))
        say(f"store: {store.root}")
        if any(s.get("problem") for s in spaces):
            warn("encoderlab: some spaces cannot be read: run `encoderlab store verify` for details, "
                 "`encoderlab store verify --repair` to remove what is corrupt")
    return {"store": str(store.root), "spaces": spaces}


def _problem_cell(problem: str | None, width: int = 60) -> str:
    if not problem:
        return "-"
    return problem if len(problem) <= width else problem[: width - 3] + "..."


def cmd_store_verify(args: argparse.Namespace) -> dict[str, Any]:
    from ..store import COMPACT_MIN_ROWS

    min_rows = COMPACT_MIN_ROWS if args.min_rows is None else args.min_rows
    if args.min_rows is not None and not args.compact:
        raise EncoderlabError("--min-rows only applies to compaction", "add --compact, or drop --min-rows")
    if args.compact and min_rows < 2:
        raise EncoderlabError(f"--min-rows must be at least 2, got {min_rows}", f"e.g. --min-rows {COMPACT_MIN_ROWS}")
    store = open_existing_store(args)
    problems: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    compacted: list[dict[str, Any]] = []
    # space_names, not spaces(): opening a space would already drop a damaged index cache this should report
    for fp in store.space_names():
        space = store.space(fp)
        found = space.verify(deep=True)
        problems += [{"space": fp, **p} for p in found]
        if args.repair and found:
            removed += [{"space": fp, **r} for r in space.repair()]
        if args.compact:
            if any(p["kind"] in ("corrupt", "cache") for p in found) and not args.repair:
                compacted.append({"fingerprint": fp, "skipped": "corrupt shards or index cache: run with --repair"})
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
    corrupt = [p for p in problems if p.get("kind") in ("corrupt", "cache")]
    if corrupt and not args.repair:
        shards = sum(p.get("kind") == "corrupt" for p in problems)
        caches = len(corrupt) - shards
        what = " and ".join(x for x in (f"{shards} corrupt shard(s)" if shards else "",
                                        f"{caches} damaged index cache(s)" if caches else "") if x)
        print(f"encoderlab: error: {what} in {store.root} "
              "(run `encoderlab store verify --repair` to remove them; their items are recomputed by the next embed, "
              "an index cache is rebuilt from the shards)",
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
    store = open_store(args)  # a bad --store fails before data or model are loaded
    ds = load_data(args)
    encoder = make_encoder(args)
    summary = export_embeddings(encoder, ds, store, target, modality=args.modality, progress=progress(args))
    summary["split"] = args.split
    warn(skipped_lines(summary["skipped"], full_list="--json"))
    if not args.json:
        say(format_table([[summary["modality"], summary["rows"], summary["dim"], summary["encoded"],
                           summary["cached"], summary["n_skipped"]]],
                         ["modality", "rows", "dim", "encoded", "cached", "skipped"]))
        say("wrote: " + ", ".join(summary["files"]))
    return summary


def cmd_store_rm(args: argparse.Namespace) -> dict[str, Any]:
    store = open_existing_store(args)
    # Every prefix is resolved before anything is removed: one ambiguous prefix removes nothing.
    targets = list(dict.fromkeys(store.resolve(prefix) for prefix in args.spaces))
    removed = [store.remove_space(fp, dry_run=args.dry_run) for fp in targets]
    total = sum(r["bytes"] for r in removed)
    if not args.json:
        say(format_table([[r["fingerprint"][:12], (r.get("meta") or {}).get("spec", "?"),
                           (r.get("meta") or {}).get("modality", "?"), r["files"], _mb(r["bytes"])] for r in removed],
                         ["space", "encoder", "modality", "files", "size"]))
        verb = "would remove" if args.dry_run else "removed"
        say(f"{verb} {len(removed)} space(s), {_mb(total)} from {store.root}")
    return {"store": str(store.root), "dry_run": args.dry_run, "removed": removed, "bytes": total}


def cmd_store_gc(args: argparse.Namespace) -> dict[str, Any]:
    store = open_existing_store(args)
    out = store.gc(dry_run=args.dry_run)
    if not args.json:
        for o in out["orphans"]:
            say(f"{o['kind']}: {o['path']} ({_mb(o['bytes'])})")
        for s in out["spaces"]:
            say(f"space {s['fingerprint'][:12]} ({(s.get('meta') or {}).get('spec', '?')}): {s['reason']}"
                f" ({_mb(s['bytes'])})")
        verb = "would free" if args.dry_run else "freed"
        say(f"{verb} {_mb(out['bytes'])}: {len(out['orphans'])} leftover file(s), {len(out['spaces'])} space(s)")
    return out
