"""Command line: a thin layer over the library. ``main(argv)`` is callable from tests.

One module per command group, each with ``register(sub)``; shared options live in ``cli.options``. Every subcommand
has ``--help`` with an example and ``--json`` (one JSON object on stdout; progress and tables go to stderr / stdout
otherwise). Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import EncoderlabError
from . import align, data, embed, encoders, rungs, store
from .options import FORMATTER

COMMAND_GROUPS = (encoders, data, store, embed, rungs, align)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="encoderlab",
        description="Measure how much adaptation a pretrained vision or text encoder needs, then do it.",
        formatter_class=FORMATTER,
        epilog="example:\n  encoderlab data fetch emoji && encoderlab embed --encoder efficientnet-lite0 --data emoji",
    )
    parser.add_argument("--version", action="version", version=f"encoderlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        # `encoderlab` or `encoderlab data` alone: show the relevant help instead of an error.
        parser.parse_args([*(argv if argv is not None else sys.argv[1:]), "--help"])
        return 2
    try:
        result = func(args)
    except EncoderlabError as e:
        if getattr(args, "debug", False):
            raise
        print(f"encoderlab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("encoderlab: interrupted (finished work is kept; run again to resume)", file=sys.stderr)
        return 130
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where
        if getattr(args, "debug", False):
            raise
        print(f"encoderlab: internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    if getattr(args, "json", False):
        print(json.dumps(result, default=str))
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
