"""``encoderlab encoders list``."""

from __future__ import annotations

import argparse
from typing import Any

from ..results.tables import format_table
from .options import add_common, add_parser, say


def register(sub: Any) -> None:
    enc = sub.add_parser("encoders", help="list encoders and adapter prefixes")
    enc_sub = enc.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(enc_sub, "list", "list known encoders",
                   "encoderlab encoders list\nencoderlab encoders list 'hf*' --json")
    p.add_argument("pattern", nargs="?", help="glob or substring filter, e.g. 'minilm' or 'hf*'")
    add_common(p)
    p.set_defaults(func=cmd_encoders_list)


def cmd_encoders_list(args: argparse.Namespace) -> dict[str, Any]:
    from ..encoders import list_encoders

    rows = [{"name": i.name, "modalities": list(i.modalities), "description": i.description,
             "requires": i.requires} for i in list_encoders(args.pattern)]
    if not args.json:
        say(format_table([[r["name"], "+".join(r["modalities"]) or "-", r["description"]] for r in rows],
                         ["name", "modalities", "description"]))
    return {"encoders": rows}
