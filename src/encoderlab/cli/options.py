"""Options and plumbing every command shares: output switches, data and encoder options, loading, printing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import EncoderlabError

FORMATTER = argparse.RawDescriptionHelpFormatter


def add_parser(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples."""
    return sub.add_parser(name, help=help, epilog="example:\n  " + "\n  ".join(example.strip().splitlines()),
                          formatter_class=FORMATTER)


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-ratios", default=None,
                   help="re-split every item by a hash of its id, e.g. train=0.7,val=0.1,test=0.2 (default: keep the "
                        "source's splits; a source without any gets train=0.8,val=0.1,test=0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash-based split (default: %(default)s)")


def add_store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", help="embedding store directory (default: $ENCODERLAB_HOME/store)")


def add_run_options(p: argparse.ArgumentParser, *, needs_encoder: bool = True) -> None:
    """``--encoder``, ``--data``, store, run directory, device, precision, bootstrap, progress, data, output."""
    if needs_encoder:
        p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
    p.add_argument("--data", required=True, help="dataset spec: emoji, openclipart, folder:DIR, csv:PATH, ...")
    add_store_option(p)
    p.add_argument("--out", help="run directory (default: a new one under $ENCODERLAB_HOME/runs)")
    add_device_options(p)
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto",
                   help="auto (fp32 on CPU, fp16/bf16 autocast on GPU), fp32, fp16, bf16")


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--templates", default="clip80",
                   help="prompt templates: clip80 (CLIP's 80 ImageNet prompts), simple, name, or a file with one "
                        "template per line using {} for the class name (default: %(default)s)")
    p.add_argument("--class-names", help="JSON {label: name} or CSV label,name overriding the humanized labels")


def int_list(text: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; positive integers only."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EncoderlabError(f"expected comma-separated integers, got {text!r}", "write e.g. 1,2,4,8,16") from None
    if any(v < 1 for v in values):
        raise EncoderlabError(f"expected positive integers, got {text!r}", "write e.g. 1,2,4,8,16")
    return values


def parse_ratios(text: str) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise EncoderlabError(f"bad --split-ratios entry {part!r}",
                                  "write e.g. train=0.8,val=0.1,test=0.1") from None
        if not sep or not name.strip() or ratios[name.strip()] < 0:
            raise EncoderlabError(f"bad --split-ratios entry {part!r}", "write e.g. train=0.8,val=0.1,test=0.1")
    if abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise EncoderlabError(f"--split-ratios {text!r} sum to {sum(ratios.values()):g}, not 1", "make them sum to 1")
    return ratios


def load_data(args: argparse.Namespace, *, whole: bool = False) -> Any:
    """The dataset of ``--data`` (re-split by ``--split-ratios``); only ``--split`` unless ``whole``."""
    from ..data import load_dataset

    ratios = parse_ratios(args.split_ratios) if args.split_ratios else None
    ds = load_dataset(args.data, splits=ratios, seed=args.seed)
    if not whole and getattr(args, "split", None):
        ds = ds.select_split(args.split)
    return ds


def open_store(args: argparse.Namespace) -> Any:
    from ..paths import store_dir
    from ..store import EmbeddingStore

    return EmbeddingStore(Path(args.store).expanduser() if getattr(args, "store", None) else store_dir())


def make_encoder(args: argparse.Namespace, spec: str | None = None) -> Any:
    from ..encoders import create_encoder

    return create_encoder(spec or args.encoder, device=args.device, precision=args.precision)


def check_spec(spec: str) -> None:
    """A typo in an encoder spec fails before any data is read."""
    from ..encoders import parse_spec

    parse_spec(spec)


def class_names(args: argparse.Namespace) -> dict[str, str] | None:
    from ..data.prompts import load_class_names

    return load_class_names(args.class_names) if getattr(args, "class_names", None) else None


def progress(args: argparse.Namespace) -> bool:
    return not (getattr(args, "no_progress", False) or getattr(args, "json", False))


def say(text: str) -> None:
    """Print a block of output (tables, lines) to stdout."""
    if text:
        print(text)


def warn(text: str) -> None:
    """Print to stderr (skip reports, notes that must not mix with --json on stdout)."""
    if text:
        print(text, file=sys.stderr)
