"""``encoderlab filter`` and ``encoderlab filter-compare``: thin layers over ``encoderlab.curate``."""

from __future__ import annotations

import argparse
import math
from typing import Any

from .options import (
    MIN_N_BOOT,
    add_common,
    add_data_options,
    add_device_options,
    add_engine_options,
    add_max_pixels_option,
    add_parser,
    add_store_option,
    check_engine_options,
    check_spec,
    engine_scope,
    int_at_least,
    load_data,
    make_encoder,
    n_boot_count,
    non_negative_int,
    open_store,
    positive_float,
    positive_int,
    prepare_run_dir,
    progress,
    say,
    warn,
)

FILTER_EXAMPLE = ("encoderlab filter --encoder hf:openai/clip-vit-base-patch32 --data 'jsonl:pairs.jsonl' "
                  "--keep-top 0.8 --out runs/filtered\n"
                  "encoderlab filter --encoder local:~/models/aligned --data openclipart --keep-top 0.8 "
                  "--min-words 2 --max-aspect 3 --near-dup 0.95 --out runs/oc-filter --json")
COMPARE_EXAMPLE = ("encoderlab filter-compare --encoder local:~/models/aligned --data openclipart --keep-top 0.8 "
                   "--out runs/oc-compare\n"
                   "encoderlab filter-compare --encoder hf:openai/clip-vit-base-patch32 --data 'jsonl:pairs.jsonl' "
                   "--keep-top 0.5 --epochs 5 --budget epochs --json")


# ---- argparse ``type=`` functions: a bad value fails while parsing, naming the option, before any work ----------


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value


def keep_top_fraction(text: str) -> float:
    """``--keep-top``: a fraction in (0, 1] of the scored pairs to keep (DataComp's form)."""
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], e.g. 0.8 keeps the best-scored 80% of "
                                         f"pairs, got {text!r}")
    return value


def cosine_value(text: str) -> float:
    """``--min-score``: a cosine similarity in [-1, 1]."""
    value = _number(text)
    if not -1 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a cosine similarity in [-1, 1] (pair scores are cosines of "
                                         f"normalized embeddings), got {text!r}")
    return value


def near_dup_threshold(text: str) -> float | None:
    """``--near-dup``: a cosine in (0, 1], or ``none`` to switch near-duplicate removal off."""
    if text.strip().lower() in ("none", "off"):
        return None
    value = _number(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a cosine in (0, 1] such as 0.95, or 'none' to switch it off, "
                                         f"got {text!r}")
    return value


def aspect_ratio(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 1):
        raise argparse.ArgumentTypeError(f"expected a ratio >= 1 (longer side / shorter side), e.g. 3, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def add_filter_options(p: argparse.ArgumentParser) -> None:
    """The rules, shared by ``filter`` and ``filter-compare``."""
    g = p.add_argument_group("score rules (score = cosine of the normalized image and text embeddings of a pair)")
    g.add_argument("--keep-top", type=keep_top_fraction, metavar="FRACTION",
                   help="keep the best-scored FRACTION of all scored pairs, in (0, 1] (DataComp's form: it reads the "
                        "same across models, a fixed cosine does not)")
    g.add_argument("--min-score", type=cosine_value, metavar="S", help="drop pairs scoring below S, in [-1, 1]")
    g.add_argument("--per-class-quota", type=positive_int, metavar="N",
                   help="keep at most the N best-scored pairs of each class (needs labels)")
    b = p.add_argument_group("basic filters (DataComp's basic filter, less its English check: --min-words 3 "
                             "--min-chars 6 --min-size 200 --max-aspect 3)")
    b.add_argument("--min-words", type=non_negative_int, metavar="N", help="drop captions of fewer words")
    b.add_argument("--max-words", type=non_negative_int, metavar="N", help="drop captions of more words")
    b.add_argument("--min-chars", type=non_negative_int, metavar="N", help="drop captions of fewer characters")
    b.add_argument("--max-chars", type=non_negative_int, metavar="N", help="drop captions of more characters")
    b.add_argument("--min-size", type=non_negative_int, metavar="PX", help="drop images whose shorter side is smaller")
    b.add_argument("--max-aspect", type=aspect_ratio, metavar="R", help="drop images with longer/shorter side above R")
    b.add_argument("--blank-std", type=non_negative_float, default=1.0, metavar="STD",
                   help="drop near-constant images: largest channel std of a 32 px thumbnail below STD, 0-255 scale "
                        "(default: %(default)s; 0 switches it off)")
    d = p.add_argument_group("duplicates (each keeps the best-scored one)")
    d.add_argument("--near-dup", type=near_dup_threshold, default=0.95, metavar="COS|none",
                   help="drop images whose embedding has at least this cosine to a better-scored kept image "
                        "(default: %(default)s; 'none': off); see near_duplicates.png for where the data lies")
    d.add_argument("--near-dup-index", choices=["auto", "flat", "ivf"], default="auto",
                   help="FAISS index of the near-duplicate search: exact flat, or IVF for large sets (default: auto, "
                        "flat up to ~20k images)")
    d.add_argument("--nprobe", type=positive_int, help="IVF lists probed per query (default: 4)")
    d.add_argument("--no-exact-dedup", action="store_true", help="keep identical image files (content hash)")
    d.add_argument("--no-caption-dedup", action="store_true",
                   help="keep repeated captions of one image (same text after lower-casing and removing punctuation)")
    d.add_argument("--max-per-caption", type=positive_int, metavar="N",
                   help="keep one caption on at most N images (the best-scored ones); boilerplate captions")


def filter_config(args: argparse.Namespace) -> Any:
    from ..curate import FilterConfig

    return FilterConfig.merged(
        min_score=args.min_score, keep_top=args.keep_top, per_class_quota=args.per_class_quota,
        min_words=args.min_words, max_words=args.max_words, min_chars=args.min_chars, max_chars=args.max_chars,
        min_size=args.min_size, max_aspect=args.max_aspect, blank_std=args.blank_std or None,
        exact_duplicates=not args.no_exact_dedup, near_dup=args.near_dup, near_dup_index=args.near_dup_index,
        nprobe=args.nprobe, caption_duplicates=not args.no_caption_dedup, max_per_caption=args.max_per_caption,
        seed=args.seed)


def _add_shared(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", required=True, help="dual image-text encoder that scores the pairs")
    p.add_argument("--data", required=True, help="dataset spec with images and captions (jsonl:, csv:, openclipart)")
    add_store_option(p)
    p.add_argument("--out", help="run directory (default: a new one under $ENCODERLAB_HOME/runs)")
    add_device_options(p)
    add_max_pixels_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)


def register(sub: Any) -> None:
    p = add_parser(sub, "filter", "filter image-text pairs: pair score (normalized cosine), basic rules, "
                                  "duplicates; writes a filtered manifest", FILTER_EXAMPLE)
    p.add_argument("--split", default="train",
                   help="the split to filter; the others pass through untouched (default: %(default)s; 'all' filters "
                        "every row)")
    add_filter_options(p)
    p.add_argument("--batch-size", type=positive_int, help="images/texts per forward when embedding what is missing")
    p.add_argument("--examples", type=non_negative_int, default=12,
                   help="lowest- and highest-scored pairs shown in report.html (default: %(default)s)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    p.add_argument("--no-cache", action="store_true", help="recompute pair scores and image checks (not cached)")
    add_engine_options(p)
    _add_shared(p)
    p.set_defaults(func=cmd_filter)

    c = add_parser(sub, "filter-compare", "train the same rung on all / filtered / a random subset of the same size "
                                          "and compare them on the untouched test split", COMPARE_EXAMPLE)
    add_filter_options(c)
    from ..train.align import AlignConfig

    d = AlignConfig()
    c.add_argument("--vision", help="image tower the rung aligns (default: the encoder's own image tower)")
    c.add_argument("--text", help="text tower the rung aligns (default: the encoder's own text tower)")
    c.add_argument("--epochs", type=positive_int, default=10,
                   help="epochs on all pairs; the other arms get the same steps or epochs (--budget) "
                        "(default: %(default)s)")
    c.add_argument("--budget", choices=["steps", "epochs"], default="steps",
                   help="steps: every arm takes the same optimizer steps, DataComp's fixed samples seen; epochs: the "
                        "same epochs (default: %(default)s)")
    c.add_argument("--dim", type=positive_int, default=d.dim, help="joint embedding size (default: %(default)s)")
    c.add_argument("--batch-size", type=int_at_least(2, " (a contrastive batch needs negatives)"),
                   default=d.batch_size, help="pairs per step, >= 2 (default: %(default)s)")
    c.add_argument("--lr", type=positive_float, default=d.lr, help="learning rate (default: %(default)s)")
    c.add_argument("--n-boot", type=n_boot_count, default=1000,
                   help=f"bootstrap resamples for the 95%% intervals, at least {MIN_N_BOOT} (default: %(default)s)")
    _add_shared(c)
    c.set_defaults(func=cmd_filter_compare)


def _encoder_and_data(args: argparse.Namespace, cfg: Any) -> tuple[Any, Any, Any]:
    """Cheap checks first (spec, captions, labels for a quota), then the model (refused without both towers)."""
    from ..curate import check_captions, check_dual
    from ..errors import EncoderlabError

    check_spec(args.encoder)
    check_engine_options(args)
    ds = load_data(args, whole=True)
    check_captions(ds)
    if cfg.per_class_quota is not None and not ds.classes:
        raise EncoderlabError(f"--per-class-quota needs labels, and {ds.source!r} has none",
                              "drop --per-class-quota, or name the label column in the spec (?label=COLUMN)")
    encoder = make_encoder(args)
    check_dual(encoder)
    return ds, encoder, open_store(args)


def cmd_filter(args: argparse.Namespace) -> dict[str, Any]:
    from ..curate import filter_dataset, write_filter
    from ..curate.tables import filter_lines, rule_counts_table

    cfg = filter_config(args)
    out_dir = prepare_run_dir(args, "filter", args.encoder)
    ds, encoder, store = _encoder_and_data(args, cfg)
    with engine_scope(args) as engine:
        result = filter_dataset(encoder, ds, store, cfg, split=args.split, progress=progress(args),
                                batch_size=args.batch_size, max_pixels=args.max_pixels, cache=not args.no_cache,
                                engine=engine)
    run = write_filter(result, out_dir, store, examples=args.examples, report=not args.no_report)
    spec = run.extra["spec"]
    if not args.json:
        say(rule_counts_table(result.counts, result.flagged, len(result.pairs)))
        say(filter_lines(result.summary(), result.scope, spec, str(out_dir)))
        if result.scope == "all":
            warn("note: every split was filtered; evaluate on data the filter did not touch")
    return {**run.to_json(), "spec": spec}


def cmd_filter_compare(args: argparse.Namespace) -> dict[str, Any]:
    from ..curate import filter_compare
    from ..curate.tables import compare_tables

    cfg = filter_config(args)
    for spec in (args.vision, args.text):
        if spec:
            check_spec(spec)
    out_dir = prepare_run_dir(args, "filter-compare", args.encoder)
    ds, encoder, store = _encoder_and_data(args, cfg)
    result = filter_compare(encoder, ds, store, out_dir, config=cfg, vision=args.vision, text=args.text,
                            epochs=args.epochs, budget=args.budget, dim=args.dim, batch_size=args.batch_size,
                            lr=args.lr, seed=args.seed, n_boot=args.n_boot, progress=progress(args),
                            device=args.device, precision=args.precision)
    if not args.json:
        say(compare_tables(result.run))
        say(f"run:   {out_dir}  (report.html, compare.png, filter/)")
    return result.run.to_json()
