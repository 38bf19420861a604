"""Options and plumbing every command shares: output switches, data and encoder options, loading, printing."""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..errors import EncoderlabError

FORMATTER = argparse.RawDescriptionHelpFormatter

#: fewer bootstrap resamples than this give no meaningful 95% interval (its ends would be the 2nd-3rd smallest and
#: largest of a handful of values), so ``--n-boot`` refuses them rather than print a "95% CI" that is not one
MIN_N_BOOT = 100


def examples(text: str) -> str:
    """The ``example:`` epilog of a parser, one command per line of ``text``."""
    return "example:\n  " + "\n  ".join(text.strip().splitlines())


def add_parser(sub: Any, name: str, help: str, example: str) -> argparse.ArgumentParser:
    """A subcommand whose ``--help`` ends with its examples; options must be spelled out (no abbreviations)."""
    return sub.add_parser(name, help=help, epilog=examples(example), formatter_class=FORMATTER, allow_abbrev=False)


# ---- argparse ``type=`` functions: a bad number fails while parsing, naming the option, before any work ----------


def _whole_number(text: str, rule: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number {rule}, got {text!r}") from None


def int_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """A ``type=`` function accepting whole numbers >= ``minimum``; ``why`` is said when a smaller one is refused."""
    rule = f">= {minimum}"

    def parse(text: str) -> int:
        value = _whole_number(text, rule)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number {rule}{why}, got {text!r}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)
n_boot_count = int_at_least(MIN_N_BOOT, " (fewer resamples give no meaningful 95% interval)")


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate, a duration)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def smoothing(text: str) -> float:
    """Label smoothing: a number in [0, 1) (0 = plain cross-entropy)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), e.g. 0.1, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a share of the items)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1 (exclusive), got {text!r}")
    return value


#: what ``--max-pixels none`` passes to the image loader: its value for "no limit" (see data.images._resolve_limit)
NO_PIXEL_LIMIT = 0


def max_pixels(text: str) -> int:
    """``--max-pixels``: a pixel count >= 1, or ``none`` to switch the decompression-bomb guard off.

    0 used to switch it off silently; "no limit" is now the explicit word, and 0 or less is refused.
    """
    if text.strip().lower() == "none":
        return NO_PIXEL_LIMIT
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a pixel count >= 1 (e.g. 64000000) or 'none' for no limit, "
                                         f"got {text!r}")
    return value


def add_max_pixels_option(p: argparse.ArgumentParser) -> None:
    """``--max-pixels N|none``, the decompression-bomb guard of every command that decodes images."""
    p.add_argument("--max-pixels", type=max_pixels, default=None, metavar="N|none",
                   help="refuse images with more than N pixels, read from the header before decoding (a "
                        "decompression-bomb guard); 'none' switches the guard off (default: $ENCODERLAB_MAX_PIXELS, "
                        "else 64000000)")


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--engine local|ray`` and where the Ray cluster is: the same command in this process or on a cluster."""
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="where hashing and encoding run: local (this process, default) or ray (a Ray cluster: "
                        "--ray-address, else a local one is started); same store, same results")
    p.add_argument("--ray-address",
                   help="join this Ray cluster (auto, HOST:6379, ray://HOST:10001); needs --engine ray")
    p.add_argument("--ray-workers", type=positive_int,
                   help="encoder actors, one model load each (default: one per GPU, else one per machine's CPUs)")


def check_engine_options(args: argparse.Namespace) -> None:
    """Ray options without ``--engine ray`` fail before any data is read or model loaded."""
    if getattr(args, "engine", "local") == "local" and (getattr(args, "ray_address", None)
                                                        or getattr(args, "ray_workers", None)):
        raise EncoderlabError("--ray-address / --ray-workers only apply to --engine ray",
                              "add --engine ray, or drop them")


@contextlib.contextmanager
def engine_scope(args: argparse.Namespace) -> Iterator[Any]:
    """The engine ``--engine`` names (None for local), shut down (a local Ray cluster stopped) when the block ends."""
    check_engine_options(args)
    if getattr(args, "engine", "local") == "local":
        yield None
        return
    from ..extract.ray_engine import RayEngine

    engine = RayEngine(args.ray_address, workers=args.ray_workers)
    try:
        yield engine
    finally:
        engine.close()


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-ratios", default=None,
                   help="re-split every item by a hash of its id, e.g. train=0.7,val=0.1,test=0.2 (default: keep the "
                        "source's splits; a source without any gets train=0.8,val=0.1,test=0.1)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the hash-based split and of every random choice, >= 0 (default: %(default)s)")


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
    p.add_argument("--n-boot", type=n_boot_count, default=1000,
                   help=f"bootstrap resamples for the 95%% intervals, at least {MIN_N_BOOT} (fewer give no meaningful "
                        "interval; default: %(default)s)")
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


def int_list(text: str, option: str = "--shots") -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; positive integers only; errors name ``option``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EncoderlabError(f"{option} expects comma-separated integers, got {text!r}",
                              f"write e.g. {option} 1,2,4,8,16") from None
    if any(v < 1 for v in values):
        raise EncoderlabError(f"{option} expects positive integers, got {text!r}", f"write e.g. {option} 1,2,4,8,16")
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


def prepare_run_dir(args: argparse.Namespace, task: str, spec: str) -> Path:
    """The run directory of ``--out`` (or a fresh default one), checked and created before any work.

    A ``--out`` that is a file, lies under a file or cannot be written then fails in a second, not after the
    encoding. A directory created here is noted on ``args`` so that ``main`` removes it again, if still empty,
    when the command fails: a typo in ``--data`` must not leave an empty run directory behind.
    """
    from ..results import resolve_run_dir

    out = getattr(args, "out", None)
    existed = out is not None and Path(out).expanduser().exists()
    path = resolve_run_dir(out, task, spec.strip())
    if not existed:
        args.created_run_dir = path
    return path


def remove_unused_run_dir(args: argparse.Namespace) -> None:
    """Remove the run directory ``prepare_run_dir`` created when nothing was written into it (after a failure)."""
    path = getattr(args, "created_run_dir", None)
    if path is not None:
        try:
            path.rmdir()  # only succeeds while empty: a run's results are never removed
        except OSError:
            pass
