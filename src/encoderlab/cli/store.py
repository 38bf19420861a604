"""``encoderlab store list`` and ``encoderlab store verify``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..results.tables import format_table
from .options import add_common, add_parser, add_store_option, open_store, say


def register(sub: Any) -> None:
    st = sub.add_parser("store", help="look after the embedding store")
    st_sub = st.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(st_sub, "list", "spaces in the store (one per encoder x modality)",
                   "encoderlab store list\nencoderlab store list --store /data/emb --json")
    add_store_option(p)
    add_common(p)
    p.set_defaults(func=cmd_store_list)
    p = add_parser(st_sub, "verify", "check every shard's size and checksum; --repair removes corrupt ones",
                   "encoderlab store verify\nencoderlab store verify --repair --json")
    add_store_option(p)
    p.add_argument("--repair", action="store_true",
                   help="delete corrupt shards (their items are recomputed by the next embed)")
    add_common(p)
    p.set_defaults(func=cmd_store_verify)


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
    store = open_store(args)
    problems: list[dict[str, Any]] = []
    removed: list[dict[str, Any]] = []
    for s in store.spaces():
        space = store.space(s["fingerprint"])
        found = space.verify(deep=True)
        problems += [{"space": s["fingerprint"], **p} for p in found]
        if args.repair and found:
            removed += [{"space": s["fingerprint"], **r} for r in space.repair()]
    if not args.json:
        for p in problems:
            say(f"{p['space'][:12]}  {p.get('kind')}: {p.get('path') or p.get('shard')}: {p.get('problem')}")
        say(f"{len(problems)} problem(s)" + (f", {len(removed)} removed" if args.repair else ""))
    corrupt = [p for p in problems if p.get("kind") == "corrupt"]
    if corrupt and not args.repair:
        print(f"encoderlab: error: {len(corrupt)} corrupt shard(s) in {store.root} "
              "(run `encoderlab store verify --repair` to remove them; their items are recomputed by the next embed)",
              file=sys.stderr)
    # Orphans (leftovers of an interrupted write) are harmless: readers ignore them and writers clean them up.
    return {"store": str(store.root), "problems": problems, "removed": removed, "ok": not corrupt or args.repair}
