"""``encoderlab index build|info|add`` and ``encoderlab search``: a thin layer over ``encoderlab.retrieval``."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ..errors import EncoderlabError
from ..results.tables import format_table, skipped_lines
from .options import (
    FORMATTER,
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
    examples,
    int_at_least,
    load_data,
    make_encoder,
    open_store,
    progress,
    say,
    warn,
)

TEXT_WIDTH = 60


def memory_size(text: str) -> int:
    """``--memory``: ``4G``, ``512M``, ``1.5GB`` or a byte count."""
    from ..retrieval.kinds import parse_memory

    try:
        return parse_memory(text)
    except EncoderlabError as e:
        raise argparse.ArgumentTypeError(f"{e.message} ({e.fix})") from None


def recall_target(text: str) -> float:
    """``--recall-target``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a recall between 0 (exclusive) and 1, e.g. 0.95, got {text!r}")
    return value


def register(sub: Any) -> None:
    from ..retrieval.kinds import KIND_CHOICES, REFINES

    ix = sub.add_parser("index", help="build, inspect and grow FAISS indexes over the embedding store",
                        epilog=examples("encoderlab index build --encoder efficientnet-lite0 --data emoji --out "
                                        "~/indexes/emoji\nencoderlab index info --index ~/indexes/emoji\n"
                                        "encoderlab index add --index ~/indexes/emoji --data folder:~/more-emoji"),
                        formatter_class=FORMATTER)
    ix_sub = ix.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(ix_sub, "build", "embed a dataset (what the store lacks) and build a measured FAISS index of it",
                   "encoderlab index build --encoder efficientnet-lite0 --data emoji --out ~/indexes/emoji\n"
                   "encoderlab index build --encoder hf:openai/clip-vit-base-patch32 --data folder:~/photos "
                   "--out ~/indexes/photos --kind hnsw --recall-target 0.98 --json")
    p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
    p.add_argument("--data", required=True, help="dataset spec: emoji, openclipart, folder:DIR, csv:PATH, ...")
    p.add_argument("--split", help="only this split")
    p.add_argument("--modality", choices=["auto", "image", "text"], default="auto",
                   help="what the index holds: image (one row per distinct image) or text (one per distinct "
                        "caption); auto = image when the encoder and the data have images (default: %(default)s)")
    p.add_argument("--out", required=True, help="index directory to write (index.faiss, items.parquet, index.json)")
    p.add_argument("--kind", choices=KIND_CHOICES, default="auto",
                   help="flat (exact), hnsw, ivf-flat, sq8, ivf-pq; auto: flat under 50,000 items, else the first "
                        "of hnsw, ivf-flat, sq8, ivf-pq that fits --memory (default: %(default)s)")
    p.add_argument("--memory", type=memory_size, default="4G",
                   help="memory budget of the index for --kind auto, e.g. 4G, 512M (default: 4G)")
    p.add_argument("--recall-target", type=recall_target, default=0.95,
                   help="recall@10 the search knob (efSearch / nprobe) is tuned to reach on held-out queries "
                        "(default: %(default)s)")
    p.add_argument("--refine", choices=REFINES, default=None,
                   help="ivf-pq only: the re-ranking copy kept beside the PQ codes (default: the most precise that "
                        "fits --memory when ivf-pq is asked for by name, none under auto)")
    p.add_argument("--force", action="store_true", help="replace an index already in --out")
    add_store_option(p)
    add_device_options(p)
    add_engine_options(p)
    add_max_pixels_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_index_build)

    p = add_parser(ix_sub, "info", "what an index holds and what was measured when it was built",
                   "encoderlab index info --index ~/indexes/emoji\nencoderlab index info --index ~/indexes/emoji "
                   "--json")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory")
    add_common(p)
    p.set_defaults(func=cmd_index_info)

    p = add_parser(ix_sub, "add", "append a dataset's new items to an index without a rebuild",
                   "encoderlab index add --index ~/indexes/emoji --data folder:~/more-emoji\n"
                   "encoderlab index add --index ~/indexes/photos --data csv:new.csv --json")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory")
    p.add_argument("--data", required=True, help="dataset spec of the items to add")
    p.add_argument("--split", help="only this split")
    p.add_argument("--encoder", help="encoder spec (default: the index's; another one is refused)")
    add_store_option(p)
    add_device_options(p)
    p.set_defaults(precision=None)  # the precision the index was built at (another changes the fingerprint)
    add_engine_options(p)
    add_max_pixels_option(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_index_add)
    _register_search(sub)


def _register_search(sub: Any) -> None:
    p = add_parser(sub, "search", "query an index by text, image or item id (text->image, image->image, "
                                  "image->text: the index's modality decides what comes back)",
                   "encoderlab search --index ~/indexes/emoji --text 'a red heart'\n"
                   "encoderlab search --index ~/indexes/emoji --image ~/heart.png --k 20 --json\n"
                   "encoderlab search --index ~/indexes/emoji --like emoji_u2764 --label 'Smileys & Emotion'")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="query text (encoded by the index's text tower)")
    q.add_argument("--image", metavar="PATH", help="query image file (encoded by the index's image tower)")
    q.add_argument("--like", metavar="ID", help="an item of the index: its neighbours (the item itself comes first)")
    p.add_argument("--k", type=int_at_least(1), default=10, help="results to return, >= 1 (default: %(default)s)")
    p.add_argument("--label", help="only items with this label")
    p.add_argument("--encoder", help="query encoder spec (default: the index's; another one is refused)")
    add_device_options(p)
    p.set_defaults(precision=None)
    add_max_pixels_option(p)
    add_common(p)
    p.set_defaults(func=cmd_search)


# ---------------------------------------------------------------------------------------------------- build


def cmd_index_build(args: argparse.Namespace) -> dict[str, Any]:
    from ..retrieval.build import check_out
    from ..retrieval.collection import index_dataset

    check_spec(args.encoder)
    from pathlib import Path
    check_engine_options(args)

    check_out(Path(args.out).expanduser(), args.force)  # before the data is read and the model loaded
    store = open_store(args)
    ds = load_data(args)
    encoder = make_encoder(args)
    modality = args.modality
    if modality == "auto":
        modality = "image" if ds.has_images and "image" in encoder.modalities else "text"
    with engine_scope(args) as engine:
        doc, col = index_dataset(encoder, ds, store, args.out, modality=modality, split=args.split,
                                 kind=args.kind, memory=args.memory, recall_target=args.recall_target,
                                 refine=args.refine, seed=args.seed, force=args.force, progress=progress(args),
                                 max_pixels=args.max_pixels, engine=engine)
    doc = {**doc, "index": str(Path(args.out).expanduser()), "skipped": col.skipped}
    if not args.json:
        say(summary_table(doc))
        say(f"chosen: {doc['choice']['reason']}")
        fb = doc["choice"].get("fallback_from")
        if fb:
            say(f"        {fb['kind']} was built first and reached recall@10 {fb['recall_at_10']} at most "
                f"({fb['search']}), under the target: the next kind that fits was built instead")
        warn(skipped_lines(col.skipped, full_list="--json"))
        warn(_target_note(doc))
        say(f"index: {doc['index']}")
    return doc


def summary_table(doc: dict[str, Any]) -> str:
    """One row: kind, items, what was measured at build time, and the knobs chosen."""
    m = doc.get("metrics", {})
    knobs = " ".join(f"{k}={v}" for k, v in (doc.get("search") or {}).items()) or "-"
    rec = m.get("recall_at_10")
    return format_table(
        [[doc["kind"], f"{doc['count']:,}", doc["dim"], doc["factory"], knobs, "-" if rec is None else f"{rec:.3f}",
          f"{m.get('qps', 0):,.0f}", f"{m.get('latency_ms_p50', 0):.2f}", f"{m.get('bytes_per_vector', 0):.0f}",
          f"{m.get('build_seconds', 0):.1f}"]],
        ["kind", "items", "dim", "faiss", "search", "recall@10", "q/s", "p50 ms", "B/vec", "build s"])


def _target_note(doc: dict[str, Any]) -> str:
    m = doc.get("metrics", {})
    if m.get("target_met") is False:
        return (f"note: recall@10 {m['recall_at_10']:.3f} is under the target {m['recall_target']}: the best "
                f"setting tried; a larger --memory (or --kind hnsw / ivf-flat) reaches it")
    return ""


def cmd_index_info(args: argparse.Namespace) -> dict[str, Any]:
    from ..retrieval.build import read_meta

    doc = read_meta(args.index)
    if not args.json:
        say(summary_table(doc))
        enc, data, m = doc.get("encoder") or {}, doc.get("data") or {}, doc.get("metrics", {})
        if enc:
            say(f"encoder: {enc.get('spec')} ({doc.get('modality')} fingerprint {str(enc.get('fingerprint'))[:12]}, "
                f"{enc.get('precision')})")
        if data:
            say(f"data:    {data.get('source')}" + (f" split {data['split']}" if data.get("split") else "")
                + f": {data.get('rows')} rows, {data.get('indexed')} indexed, {data.get('duplicates')} duplicate "
                  f"contents, {data.get('skipped')} skipped")
        say(f"measured at build: recall@10 {m.get('recall_at_10')} on {m.get('queries')} held-out queries "
            f"(target {m.get('recall_target')}, tuned on {m.get('tuning_queries')}); "
            f"index {m.get('index_bytes', 0) / 2**20:.1f} MB")
        for a in doc.get("adds", []):
            say(f"added:   {a.get('added')} items from {a.get('data')} at {a.get('at')} "
                f"({a.get('already_present')} already present)")
    return {**doc, "index": str(args.index)}


def cmd_index_add(args: argparse.Namespace) -> dict[str, Any]:
    from pathlib import Path

    from ..retrieval.build import read_meta
    from ..retrieval.collection import add_dataset
    from ..retrieval.search import load_index_encoder

    check_engine_options(args)
    path = Path(args.index).expanduser()
    doc = read_meta(path)
    if args.encoder:
        check_spec(args.encoder)
    store = open_store(args)
    ds = load_data(args)
    encoder = load_index_encoder(doc, path, spec=args.encoder, device=args.device, precision=args.precision)
    with engine_scope(args) as engine:
        doc, summary = add_dataset(path, encoder, ds, store, split=args.split, progress=progress(args),
                                   max_pixels=args.max_pixels, engine=engine)
    if not args.json:
        say(f"added {summary['added']} items to {path}; skipped {summary['already_present']} already in the index"
            f" and {summary['duplicates']} repeated contents; now {summary['count']} items")
        warn(skipped_lines(summary["skipped_items"], full_list="--json"))
    return {"index": str(path), **summary}


# ---------------------------------------------------------------------------------------------------- search


def cmd_search(args: argparse.Namespace) -> dict[str, Any]:
    from ..retrieval.search import open_index

    index = open_index(args.index)
    allowed = index.items.rows_where(label=args.label) if args.label is not None else None
    if allowed is not None and not len(allowed):
        raise EncoderlabError(f"no item of index {args.index} has label {args.label!r}",
                              "see the labels with `encoderlab search --json` (label column)")
    if args.text is not None or args.image is not None:
        index.load_encoder(args.encoder, device=args.device, precision=args.precision)
    if args.text is not None:
        hits, query = index.search_text(args.text, args.k, allowed=allowed), {"text": args.text}
    elif args.image is not None:
        hits = index.search_image(args.image, args.k, max_pixels=args.max_pixels, allowed=allowed)
        query = {"image": args.image}
    else:
        hits, query = index.search_like(args.like, args.k, allowed=allowed), {"like": args.like}
    cols = hits.columns()
    out = {"index": str(index.path), "modality": index.modality, "kind": index.kind, "query": query, "k": args.k,
           "count": len(hits), "seconds": {k: round(v, 6) for k, v in hits.seconds.items()}, "results": cols}
    if not args.json:
        say(hits_table(cols, index.modality))
    return out


def hits_table(cols: dict[str, list], modality: str) -> str:
    """The hits as a text table: rank, score, id, label, and the image path or the caption."""
    what = "text" if modality == "text" else "image"
    shown = [(t if t is None or len(t) <= TEXT_WIDTH else t[: TEXT_WIDTH - 3] + "...") for t in cols.get(what, [])]
    rows = zip(cols["rank"], (f"{s:.4f}" for s in cols["score"]), cols["id"], cols.get("label", []), shown)
    return format_table([[r, s, i, lab if lab is not None else "-", w if w is not None else "-"]
                         for r, s, i, lab, w in rows], ["rank", "score", "id", "label", what])
