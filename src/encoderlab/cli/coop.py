"""``encoderlab coop``: CoOp (Zhou et al. 2022) prompt learning, few-shot; ``--out`` saves a context as local:DIR."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import EncoderlabError
from ..results import write_run
from ..results.tables import costs_line, few_shot_table
from .options import (
    add_parser,
    add_prompt_options,
    add_run_options,
    check_spec,
    class_names,
    int_list,
    load_data,
    make_encoder,
    open_store,
    positive_float,
    positive_int,
    prepare_run_dir,
    progress,
    say,
    warn,
)


def register(sub: Any) -> None:
    from ..train.coop import DEFAULT_N_CTX, CoopConfig

    d = CoopConfig()
    p = add_parser(sub, "coop", "CoOp: learn a prompt context on the frozen text tower from k labelled images per "
                                "class (dual encoders); --out saves it to load as local:DIR",
                   "encoderlab coop --encoder hf:openai/clip-vit-base-patch32 --data emoji --shots 1,2,4,8,16 "
                   "--seeds 3\n"
                   "encoderlab coop --encoder local:~/models/aligned --data emoji --shots 16 --ctx-init 'a photo of "
                   "a' --out ~/models/emoji-coop\n"
                   "encoderlab zeroshot --encoder local:~/models/emoji-coop --data emoji   # the learned prompts\n"
                   "encoderlab coop --encoder hf:google/siglip-base-patch16-224 --data emoji --shots 4 --csc "
                   "--class-token front --json")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot settings, k items per class (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=3,
                   help="k-shot samples per setting, >= 1; mean ± std over them (default: %(default)s)")
    p.add_argument("--n-ctx", type=positive_int, default=None,
                   help=f"context vectors, >= 1 (default: {DEFAULT_N_CTX}, or the token count of --ctx-init)")
    p.add_argument("--ctx-init", default=None,
                   help="initialise the context from this phrase's token embeddings, e.g. 'a photo of a' (default: "
                        "random N(0, 0.02))")
    p.add_argument("--csc", action="store_true", help="one context per class instead of one shared context")
    p.add_argument("--class-token", choices=["end", "middle", "front"], default="end",
                   help="where the class name goes relative to the context (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help=f"maximum epochs, >= 1; the best on val is kept (default: {d.epochs})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"AdamW learning rate, > 0 (default: {d.lr:g})")
    p.add_argument("--patience", type=positive_int, default=None,
                   help=f"epochs without val improvement before stopping, >= 1 (default: {d.patience})")
    add_prompt_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_coop)
    # --out here is the prompt-context directory (the run's results go into its eval/), as in align
    for action in p._actions:
        if action.dest == "out":
            action.help = ("save the context of the largest k (seed 0) to this directory, loadable as local:DIR; "
                           "the run's results go into DIR/eval (default: no context saved, results in a new run "
                           "directory under $ENCODERLAB_HOME/runs)")


def cmd_coop(args: argparse.Namespace) -> dict[str, Any]:
    """Run the few-shot settings; with ``--out`` save the largest-k seed-0 context and write the results beside it."""
    from ..encoders.prompted import EVAL_NAME, check_output_dir
    from ..extract import labelled_embeddings
    from ..results.run import check_out_dir
    from ..rungs.coop import run_coop
    from ..train.coop import CoopConfig, check_config

    shots = int_list(args.shots, "--shots")
    if not shots:
        raise EncoderlabError("coop needs --shots", "write e.g. --shots 1,2,4,8,16")
    check_spec(args.encoder)
    model_dir = Path(args.out).expanduser() if args.out else None
    if model_dir is not None:
        check_output_dir(model_dir)
        check_out_dir(model_dir, fix="pass an --out DIR in a directory you can write to")
        out_dir = model_dir / EVAL_NAME
    else:
        out_dir = prepare_run_dir(args, "coop", args.encoder)
    loop = {k: getattr(args, k) for k in ("epochs", "lr", "patience") if getattr(args, k) is not None}
    config = CoopConfig(n_ctx=args.n_ctx, ctx_init=args.ctx_init, csc=args.csc, class_token=args.class_token, **loop)
    store = open_store(args)
    ds = load_data(args, whole=True).ensure_validation(seed=args.seed)
    encoder = make_encoder(args)
    names_map = class_names(args)
    from ..data.prompts import class_display_names

    check_config(config, encoder, class_display_names(ds.classes, names_map))  # before extracting anything
    emb = labelled_embeddings(encoder, ds, store, progress=progress(args))
    result, heads = run_coop(encoder, emb, shots=shots, seeds=args.seeds, config=config, class_names=names_map,
                             n_boot=args.n_boot, seed=args.seed, progress=progress(args))
    saved = _save(model_dir, encoder, emb, heads, max(shots), config) if model_dir is not None else None
    write_run(result, out_dir)
    for note in result.config.get("notes", []):
        warn(f"note: {note}")
    out = result.to_json()
    out["run_dir"] = str(out_dir)
    if saved is not None:
        out.update(model_dir=str(saved), spec=f"local:{saved}")
    if not args.json:
        say(few_shot_table(result.metrics, shots, False))
        say(costs_line(result.costs))
        if saved is not None:
            say(f"prompt context: {saved}  (use it as --encoder local:{saved})")
        say(f"run: {out_dir}")
    return out


def _save(model_dir: Path, encoder: Any, emb: Any, heads: dict, k: int, config: Any) -> Path:
    """Save the k-shot seed-0 context with its training record and the train / val image keys it saw."""
    from ..encoders.base import TrainingItems
    from ..encoders.prompted import save_prompted

    head = heads[(k, 0)]
    fit = head.fit_
    tr, _ = emb.k_shot(k, 0, "train")
    va, _ = emb.k_shot(min(k, 4), 0, "val") if emb.index("val").size else (tr[:0], "")
    keys = (lambda idx: frozenset(str(x) for x in emb.keys[idx] if x is not None)) if emb.keys is not None else None
    items = TrainingItems(train={"image": keys(tr)}, val={"image": keys(va)}, source=emb.dataset.source) \
        if keys is not None else None
    train = {"setting": f"{k}-shot", "seed": 0, "best_epoch": fit.best_epoch, "val_top1": fit.best_metric,
             "chosen_by": fit.chosen_by, "epochs_run": len(fit.history), "fit_seconds": round(fit.fit_seconds, 3),
             "items_per_class": {emb.classes[int(c)]: int(n) for c, n in zip(head.classes_, head.fit_counts_)},
             "data": emb.dataset.source, **fit.config}
    return save_prompted(model_dir, encoder, fit.ctx, n_ctx=fit.n_ctx, class_token=config.class_token, csc=config.csc,
                         classes=emb.classes, names=head.names, train=train, training_items=items)
