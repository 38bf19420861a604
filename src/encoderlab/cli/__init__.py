"""Command line: a thin layer over the library. ``main(argv)`` is callable from tests.

One module per command group, each with ``register(sub)``; shared options live in ``cli.options``. Every parser
has ``--help`` with an example, and options must be spelled out (an abbreviation such as ``--split`` for
``--split-ratios`` is refused, not guessed). Every subcommand has ``--json`` (one JSON object on stdout; progress and
tables go to stderr / stdout otherwise). Errors print one line on stderr (with ``--json`` also
``{"error", "fix"}`` on stdout) and exit non-zero; ``--debug`` shows the traceback. SIGTERM (``timeout``, Slurm,
``docker stop``) stops a command like Ctrl-C: finished work is kept, exit 143 (130 for Ctrl-C). Under torchrun only
rank 0 writes to stdout (the other processes' output goes to stderr, their JSON nowhere).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any, NoReturn

from .. import __version__
from ..errors import EncoderlabError
from ..results.run import json_default
from . import (
    align,
    bench_encoders,
    cache,
    coop,
    curate,
    data,
    embed,
    encoders,
    finetune,
    index,
    ladder,
    rungs,
    serve,
    store,
)
from .options import FORMATTER, examples, remove_unused_run_dir

COMMAND_GROUPS = (encoders, data, store, embed, rungs, ladder, bench_encoders, align, coop, finetune, curate,
                  index, serve, cache)

#: ``--help`` examples of the parsers that only group subcommands (registered in their modules without any)
GROUP_EXAMPLES = {
    "encoders": "encoderlab encoders list\nencoderlab encoders list 'hf*' --json",
    "data": "encoderlab data fetch emoji\nencoderlab data inspect folder:~/pets --split test",
    "store": "encoderlab store list\nencoderlab store verify --repair\n"
             "encoderlab store export --encoder efficientnet-lite0 --data emoji --to emoji.parquet",
    "rungs": "encoderlab rungs list\nencoderlab rungs list knn --json",
    "cache": "encoderlab cache list\nencoderlab cache prune --max-size 2G",
}

INTERRUPTED = "interrupted (finished work is kept; run again to resume)"
EXIT_USAGE = 2


class UsageError(Exception):
    """A command line argparse refuses; raised by ``Parser.error`` so ``main`` can report it (also as JSON)."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        self.parser, self.message = parser, message
        super().__init__(message)


class Parser(argparse.ArgumentParser):
    """``ArgumentParser`` whose errors reach ``main`` as ``UsageError`` instead of printing and exiting.

    Subparsers are created with the class of their parent, so every parser in the tree is one of these.
    """

    def error(self, message: str) -> NoReturn:
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every parser gets an example epilog and refuses abbreviated options."""
    parser = Parser(
        prog="encoderlab",
        description="Measure how much adaptation a pretrained vision or text encoder needs, then do it.",
        formatter_class=FORMATTER,
        epilog=examples("encoderlab data fetch emoji && encoderlab embed --encoder efficientnet-lite0 --data emoji\n"
                        "encoderlab compare --encoder efficientnet-lite0 --data emoji\n"
                        "encoderlab COMMAND --help"),
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"encoderlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in COMMAND_GROUPS:
        group.register(sub)
    for path, p in walk_parsers(parser):
        # Set here rather than in each group module, so a parser added anywhere in the tree gets them too.
        p.allow_abbrev = False
        if len(path) == 1 and path[0] in GROUP_EXAMPLES and not p.epilog:
            p.epilog = examples(GROUP_EXAMPLES[path[0]])
            p.formatter_class = FORMATTER
    return parser


def walk_parsers(parser: argparse.ArgumentParser,
                 path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``(command path, parser)`` for ``parser`` and every subparser below it, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from walk_parsers(child, (*path, name))


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``args`` chose, for its help and its error messages."""
    found = parser
    for path, p in walk_parsers(parser):
        names = [getattr(args, "command", None), getattr(args, "action", None)]
        if path and list(path) == names[: len(path)]:
            found = p
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command line; returns the exit code (0 ok, 1 error, 2 usage, 130 Ctrl-C, 143 SIGTERM)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Known before parsing, so that even a command line argparse refuses answers in JSON.
    as_json = "--json" in argv
    secondary = _secondary_rank()  # torchrun's other processes: rank 0 reports on stdout, theirs goes to stderr
    if secondary:
        as_json = False
    parser = build_parser()
    args: argparse.Namespace | None = None
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's own parser, whose --help lists what it does take
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except UsageError as e:
        return _usage_error(e, as_json)
    func = getattr(args, "func", None)
    if func is None:
        # `encoderlab` or `encoderlab data` alone: the relevant help on stderr, and a usage exit, not success.
        _command_parser(parser, args).print_help(sys.stderr)
        return EXIT_USAGE
    debug = getattr(args, "debug", False)
    guard = _sigterm_as_interrupt()
    try:
        with guard, contextlib.redirect_stdout(sys.stderr) if secondary else contextlib.nullcontext():
            result = func(args)
    except EncoderlabError as e:
        remove_unused_run_dir(args)
        if debug:
            raise
        return _error(f"error: {e}", {"error": getattr(e, "message", str(e)), "fix": getattr(e, "fix", None)},
                      as_json)
    except KeyboardInterrupt:
        remove_unused_run_dir(args)
        code = 128 + guard.received.get("signal", signal.SIGINT)  # the shell's convention: 130 Ctrl-C, 143 SIGTERM
        _error(INTERRUPTED, {"error": "interrupted", "fix": "run again to resume; finished work is kept",
                             "signal": signal.Signals(code - 128).name}, as_json)
        return code
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where
        remove_unused_run_dir(args)
        if debug:
            raise
        return _error(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)",
                      {"error": f"{type(e).__name__}: {e}", "internal": True,
                       "fix": "rerun with --debug for the traceback"}, as_json)
    if getattr(args, "json", False) and not secondary:
        print(json.dumps(result, default=json_default))
    return 0 if result.get("ok", True) else 1


def _secondary_rank() -> bool:
    """Whether this is a process torchrun started besides rank 0 (``RANK`` > 0 of ``WORLD_SIZE`` > 1).

    Such a process prints neither its result nor its error JSON, and its stdout goes to stderr: with ``--json`` the
    run's stdout is rank 0's one object. Its one-line errors stay on stderr, where torchrun's summary shows them.
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0
    except ValueError:  # torchrun sets integers; anything else is not one of its processes
        return False


def _error(line: str, doc: dict[str, Any], as_json: bool) -> int:
    """The one stderr line of a failure, and with ``--json`` its JSON object on stdout; returns exit code 1."""
    print(f"encoderlab: {line}", file=sys.stderr)
    if as_json:
        print(json.dumps(doc, default=json_default))
    return 1


def _usage_error(e: UsageError, as_json: bool) -> int:
    """argparse's report (usage, then ``prog: error: message``) on stderr, with ``--json`` also on stdout."""
    e.parser.print_usage(sys.stderr)
    fix = f"see `{e.parser.prog} --help`; options are spelled out in full, abbreviations are refused"
    print(f"{e.parser.prog}: error: {e.message} ({fix})", file=sys.stderr)
    if as_json:
        print(json.dumps({"error": f"{e.parser.prog}: {e.message}", "fix": fix, "usage": True}))
    return EXIT_USAGE


class _sigterm_as_interrupt:
    """While active, SIGTERM raises ``KeyboardInterrupt`` in the main thread, exactly like Ctrl-C.

    The default SIGTERM action kills the process at once, losing the rows the store writer still buffers; as an
    exception it unwinds through the writer, which commits them. Only the first SIGTERM interrupts: a second one
    while the buffered rows are being written is ignored so that the flush can finish (SIGKILL still ends it).
    Signal handlers can only be set from the main thread; elsewhere (``main`` called from a worker thread) this
    does nothing. The previous handler is restored on exit. ``received["signal"]`` names the signal that came.
    """

    def __init__(self) -> None:
        self.received: dict[str, int] = {}
        self.previous: Any = None
        self.active = threading.current_thread() is threading.main_thread()

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        if "signal" in self.received:
            return
        self.received["signal"] = signum
        raise KeyboardInterrupt

    def __enter__(self) -> _sigterm_as_interrupt:
        if self.active:
            self.previous = signal.signal(signal.SIGTERM, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            signal.signal(signal.SIGTERM, self.previous)


if __name__ == "__main__":
    sys.exit(main())
