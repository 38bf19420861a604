"""``encoderlab embed``: a thin layer over ``extract.embed_dataset``."""

from __future__ import annotations

import argparse
from typing import Any

from ..results import RunResult, data_provenance, write_run
from ..results.run import SKIPPED_NAME
from ..results.tables import format_table, skipped_lines
from .options import (
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
    load_data,
    make_encoder,
    non_negative_int,
    open_store,
    positive_int,
    prepare_run_dir,
    progress,
    say,
    warn,
)


def register(sub: Any) -> None:
    p = add_parser(sub, "embed", "compute (or reuse) embeddings of a dataset into the store",
                   "encoderlab embed --encoder efficientnet-lite0 --data emoji\n"
                   "encoderlab embed --encoder hf:openai/clip-vit-base-patch32 --data folder:~/pets --split train "
                   "--json")
    p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
    p.add_argument("--data", required=True, help="dataset spec")
    p.add_argument("--split", help="only this split")
    p.add_argument("--modality", choices=["auto", "image", "text", "both"], default="auto",
                   help="what to embed; auto = every modality both the encoder and the data have")
    add_store_option(p)
    p.add_argument("--out",
                   help="run directory for results.json and skipped.jsonl (default: under $ENCODERLAB_HOME/runs)")
    p.add_argument("--batch-size", type=positive_int,
                   help="images/texts per forward, >= 1 (default: chosen per encoder and device)")
    p.add_argument("--workers", type=non_negative_int,
                   help="image decode worker processes; 0 decodes in this process (default: half the cores)")
    add_device_options(p)
    add_engine_options(p)
    add_max_pixels_option(p)
    p.add_argument("--strict", action="store_true", help="fail on the first file that cannot be used")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_data_options(p)
    add_common(p)
    p.set_defaults(func=cmd_embed)


def cmd_embed(args: argparse.Namespace) -> dict[str, Any]:
    from ..extract.embed import check_strict, embed_dataset

    check_spec(args.encoder)
    check_engine_options(args)
    # Cheap checks of where things go come before the data is read and the model loaded, so they fail first.
    out_dir = prepare_run_dir(args, "embed", args.encoder)
    store = open_store(args)
    ds = load_data(args)
    if args.strict:
        check_strict(ds)  # before the model is even loaded
    encoder = make_encoder(args)
    with engine_scope(args) as engine:
        summary = embed_dataset(encoder, ds, store, args.modality, batch_size=args.batch_size,
                                num_workers=args.workers, max_pixels=args.max_pixels, strict=args.strict,
                                progress=progress(args), engine=engine)
    results = summary.pop("results")
    summary.update(split=args.split, run_dir=str(out_dir))
    metrics = {k: summary[k] for k in ("items", "encoded", "cached", "items_per_s")}
    metrics["skipped"] = len(summary["skipped"])
    run = RunResult("embed", metrics, {"seconds": round(sum(r.seconds for r in results), 3)},
                    {"encoder": encoder.spec, "modality": args.modality, "split": args.split,
                     "batch_size": args.batch_size, "strict": args.strict, "engine": summary["engine"]},
                    data_provenance(ds), primary="encoded", extra={"summary": summary}, skipped=summary["skipped"])
    write_run(run, out_dir)
    if not args.json:
        say(format_table([[r.modality, r.items, r.encoded, r.cached, len(r.skipped), f"{r.items_per_s:.1f}",
                           f"{r.seconds:.1f}"] for r in results],
                         ["modality", "items", "encoded", "cached", "skipped", "items/s", "seconds"]))
        warn(skipped_lines(summary["skipped"], full_list=f"{out_dir / SKIPPED_NAME} and --json"))
        say(f"store: {store.root}\nrun:   {out_dir}")
    return summary
