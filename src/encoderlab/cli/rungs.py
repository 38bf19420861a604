"""Commands of the rungs: ``zeroshot``, ``probe``, ``retrieval`` and ``compare``.

Each is a thin layer over a library function (``encoderlab.rungs`` / ``encoderlab.ladder``); each writes a run
directory (``results.json`` + ``predictions.parquet``) and prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..results import write_run
from ..results.tables import (
    classification_table,
    costs_line,
    few_shot_table,
    format_table,
    retrieval_table,
    template_table,
)
from .options import (
    add_common,
    add_parser,
    add_prompt_options,
    add_run_options,
    check_spec,
    class_names,
    int_list,
    load_data,
    make_encoder,
    open_store,
    positive_int,
    prepare_run_dir,
    progress,
    say,
    warn,
)

#: zeroshot and retrieval read --split alike
SPLIT_HELP = "split to report on, or 'all' for every item (default: %(default)s)"
#: probe and compare read --selection alike
SELECTION_HELP = ("how head rungs choose their knobs: 'val' on the validation split (few-shot: min(k, 4) per class "
                  "of it), or 'fixed' with their papers' defaults and no validation data at all (default: "
                  "%(default)s)")


def add_selection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--selection", choices=["val", "fixed"], default="val", help=SELECTION_HELP)


def register(sub: Any) -> None:
    from ..rungs import list_rungs

    group = sub.add_parser("rungs", help="list the rungs of the ladder: what each needs and chooses")
    group_sub = group.add_subparsers(dest="action", metavar="ACTION")
    p = add_parser(group_sub, "list", "list registered rungs in ladder order",
                   "encoderlab rungs list\nencoderlab rungs list 'l*' --json")
    p.add_argument("pattern", nargs="?", help="glob or substring filter, e.g. 'knn' or 't*'")
    add_common(p)
    p.set_defaults(func=cmd_rungs_list)

    p = add_parser(sub, "zeroshot", "zero-shot classification with prompt templates (dual encoders)",
                   "encoderlab zeroshot --encoder hf:openai/clip-vit-base-patch32 --data folder:~/pets\n"
                   "encoderlab zeroshot --encoder local:~/models/aligned --data emoji --templates simple "
                   "--compare-templates\n"
                   "encoderlab zeroshot --encoder hf:google/siglip-base-patch16-224 --data emoji --class-names "
                   "names.json --json")
    add_prompt_options(p)
    p.add_argument("--split", default="test", help=SPLIT_HELP)
    p.add_argument("--compare-templates", action="store_true",
                   help="also score every template alone (on val, to choose by, and on the reported split)")
    add_run_options(p)
    p.set_defaults(func=cmd_zeroshot)

    heads = list_rungs(head=True)
    p = add_parser(sub, "probe", "a head on frozen embeddings (" + ", ".join(heads) + "): full data and few-shot",
                   "encoderlab probe --encoder efficientnet-lite0 --data emoji --method linear\n"
                   "encoderlab probe --encoder efficientnet-lite0 --data emoji --method linear --shots 1,2,4,8,16 "
                   "--seeds 3\n"
                   "encoderlab probe --encoder local:~/models/aligned --data emoji --method tip --shots 16 --no-full "
                   "--json")
    p.add_argument("--method", choices=heads, default="linear", help="head rung (default: %(default)s)")
    p.add_argument("--shots", default="", help="few-shot settings, e.g. 1,2,4,8,16 (k items per class)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="k-shot samples per setting, >= 1; mean ± std over them (default: %(default)s)")
    p.add_argument("--no-full", action="store_true", help="skip the full-data fit (few-shot only)")
    add_selection(p)
    p.add_argument("--class-weight", choices=["balanced"], default=None,
                   help="linear probe: weight classes inversely to their frequency")
    p.add_argument("--modality", choices=["image", "text"], default=None,
                   help="what to classify (default: images when the data and encoder have them, else texts)")
    add_prompt_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_probe)

    p = add_parser(sub, "retrieval", "image↔text retrieval: Recall@1/5/10, MRR, median rank (dual encoders)",
                   "encoderlab retrieval --encoder local:~/models/aligned --data openclipart\n"
                   "encoderlab retrieval --encoder hf:openai/clip-vit-base-patch32 --data 'csv:pairs.csv?text=caption' "
                   "--split all --json")
    p.add_argument("--split", default="test", help=SPLIT_HELP)
    p.add_argument("--chunk-size", type=positive_int, default=1024,
                   help="queries scored at once, >= 1 (bounds memory; default: %(default)s)")
    add_run_options(p)
    p.set_defaults(func=cmd_retrieval)

    from ..ladder.compare import default_rungs

    p = add_parser(sub, "compare", "the rungs side by side: " + ", ".join(default_rungs()),
                   "encoderlab compare --encoder local:~/models/aligned --data emoji\n"
                   "encoderlab compare --encoder efficientnet-lite0 --data emoji --rungs knn,linear --shots 1,2,4,8,16 "
                   "--json")
    p.add_argument("--rungs", default=",".join(default_rungs()),
                   help=f"comma-separated rungs, from {', '.join(list_rungs())} (default: all of them)")
    p.add_argument("--shots", default="1,4,16", help="few-shot settings (default: 1,4,16)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="k-shot samples per setting, >= 1 (default: %(default)s)")
    p.add_argument("--probe-features", choices=["auto", "joint", "tower"], default="auto",
                   help="features kNN and the linear probe read; auto: the image tower's own features when the "
                        "encoder is an aligned pair (the projection can only lose information), else the embedding")
    add_selection(p)
    add_prompt_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_compare)


def cmd_rungs_list(args: argparse.Namespace) -> dict[str, Any]:
    from ..rungs import create_rung, list_rungs

    rows = [create_rung(n).describe() for n in list_rungs(args.pattern)]
    if not args.json:
        say(format_table([[r["level"], r["name"], r["task"], "+".join(r["needs"]) or "-", ",".join(r["knobs"]) or "-",
                           r["description"]] for r in rows],
                         ["level", "rung", "task", "needs", "chooses", "description"]))
    return {"rungs": rows}


def _context(args: argparse.Namespace, task: str) -> tuple[Any, Any, Any, Path]:
    """(encoder, dataset, store, run directory), cheapest checks first.

    A typo in the encoder spec fails before any data is read, a bad ``--out`` or ``--store`` before the data is
    read and the model loaded.
    """
    check_spec(args.encoder)
    out_dir = prepare_run_dir(args, task, args.encoder)
    store = open_store(args)
    ds = load_data(args, whole=True)  # every rung needs its train/val/test; --split only picks what is reported
    return make_encoder(args), ds.ensure_validation(seed=args.seed), store, out_dir


def _finish(args: argparse.Namespace, result: Any, out_dir: Path) -> dict[str, Any]:
    write_run(result, out_dir)
    for note in result.config.get("notes", []):
        warn(f"note: {note}")
    return result.to_json()


def cmd_zeroshot(args: argparse.Namespace) -> dict[str, Any]:
    from ..extract import labelled_embeddings
    from ..rungs import run_zeroshot

    encoder, ds, store, out_dir = _context(args, "zeroshot")
    emb = labelled_embeddings(encoder, ds, store, progress=progress(args))
    result = run_zeroshot(encoder, emb, store, templates=args.templates, class_names=class_names(args),
                          split=args.split, compare_templates=args.compare_templates, n_boot=args.n_boot,
                          seed=args.seed)
    if emb.validation_note:
        result.config["notes"] = [emb.validation_note]
    out = _finish(args, result, out_dir)
    if not args.json:
        say(classification_table(result.metrics))
        if args.compare_templates:
            say(template_table(result.extra["templates"]))
        say(costs_line(result.costs))
        say(f"run: {out['run_dir']}")
    return out


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from ..extract import labelled_embeddings
    from ..rungs import run_probe

    shots = int_list(args.shots, "--shots")
    encoder, ds, store, out_dir = _context(args, f"probe-{args.method}")
    emb = labelled_embeddings(encoder, ds, store, modality=args.modality, progress=progress(args))
    result = run_probe(encoder, emb, store, method=args.method, shots=shots, seeds=args.seeds,
                       full=not args.no_full, class_weight=args.class_weight, templates=args.templates,
                       class_names=class_names(args), n_boot=args.n_boot, seed=args.seed, selection=args.selection)
    out = _finish(args, result, out_dir)
    if not args.json:
        say(f"selection: {args.selection}")
        say(few_shot_table(result.metrics, shots, not args.no_full))
        say(costs_line(result.costs))
        say(f"run: {out['run_dir']}")
    return out


def cmd_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from ..rungs import run_retrieval

    encoder, ds, store, out_dir = _context(args, "retrieval")
    result = run_retrieval(encoder, ds, store, split=args.split, chunk_size=args.chunk_size, n_boot=args.n_boot,
                           seed=args.seed, progress=progress(args))
    out = _finish(args, result, out_dir)
    if not args.json:
        m = result.metrics
        say(retrieval_table(m))
        say(f"{m['images']} images, {m['texts']} distinct captions, {m['pairs']} pairs")
        say(costs_line(result.costs))
        say(f"run: {out['run_dir']}")
    return out


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from ..ladder import run_comparison

    shots = int_list(args.shots, "--shots")
    encoder, ds, store, out_dir = _context(args, "compare")
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    comp = run_comparison(encoder, ds, store, rungs=rungs, shots=shots, seeds=args.seeds,
                          templates=args.templates, class_names=class_names(args), n_boot=args.n_boot,
                          seed=args.seed, progress=progress(args), out_dir=out_dir,
                          probe_features=args.probe_features, selection=args.selection)
    out = comp.to_json()
    if not args.json:
        say(f"{encoder.spec} on {ds.source}: {len(ds)} items, {len(ds.classes)} classes; selection: "
            f"{args.selection}")
        say(comp.format())
        say(f"run: {out_dir}")
    return out
