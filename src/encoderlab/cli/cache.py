"""``encoderlab cache list`` and ``cache prune``: the compiled-network cache (``$ENCODERLAB_HOME/compiled``)."""

from __future__ import annotations

import argparse
from typing import Any

from ..results.tables import format_table
from .options import add_common, add_parser, say


def register(sub: Any) -> None:
    cache = sub.add_parser("cache", help="look after the compiled-network cache (ONNX exports)")
    cache_sub = cache.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(cache_sub, "list", "exported graphs, least recently used first, with sizes and the budget",
                   "encoderlab cache list\nencoderlab cache list --json")
    add_common(p)
    p.set_defaults(func=cmd_cache_list)
    p = add_parser(cache_sub, "prune",
                   "delete the least recently used graphs until the cache fits a size (they are re-exported on use)",
                   "encoderlab cache prune\nencoderlab cache prune --max-size 2G --dry-run\n"
                   "encoderlab cache prune --all --json")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-size", default=None, metavar="SIZE",
                      help="e.g. 2G or 500M; 0 = no limit (default: $ENCODERLAB_COMPILED_MAX, else 10G)")
    size.add_argument("--all", action="store_true", help="delete every graph")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    add_common(p)
    p.set_defaults(func=cmd_cache_prune)


def cmd_cache_list(args: argparse.Namespace) -> dict[str, Any]:
    from ..encoders.compiled_cache import graphs, max_bytes
    from ..paths import compiled_dir
    from ..retrieval.kinds import format_bytes

    rows = [g.as_dict() for g in graphs()]
    total, limit = sum(r["bytes"] for r in rows), max_bytes()
    if not args.json:
        say(format_table([[r["name"], format_bytes(r["bytes"]), r["last_used"]] for r in rows],
                         ["graph", "size", "last used"]))
        say(f"{len(rows)} graph(s), {format_bytes(total)} in {compiled_dir()} "
            f"(budget {format_bytes(limit) if limit else 'none'})")
    return {"root": str(compiled_dir()), "graphs": rows, "bytes": total, "limit": limit}


def cmd_cache_prune(args: argparse.Namespace) -> dict[str, Any]:
    from ..encoders.compiled_cache import max_bytes, prune
    from ..retrieval.kinds import format_bytes

    limit = 0 if args.all else max_bytes(args.max_size)
    out = prune(limit, dry_run=args.dry_run)
    if not args.json:
        for r in out["removed"]:
            say(f"{'would remove' if args.dry_run else 'removed'} {r['name']} ({format_bytes(r['bytes'])})")
        say(f"{'would free' if args.dry_run else 'freed'} {format_bytes(out['freed_bytes'])}; "
            f"{out['graphs']} graph(s), {format_bytes(out['bytes'])} left")
    return out
