"""``encoderlab align``: LiT-style projection heads on two frozen towers; the result loads as ``local:DIR``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import EncoderlabError
from ..results.run import check_out_dir
from ..results.tables import retrieval_table
from .options import (
    add_parser,
    add_run_options,
    check_spec,
    int_at_least,
    load_data,
    open_store,
    positive_float,
    positive_int,
    progress,
    say,
)


def register(sub: Any) -> None:
    from ..train.align import AlignConfig

    d = AlignConfig()  # the trainer's defaults, said in the help without passing them (a changed one follows)
    p = add_parser(sub, "align", "align a frozen image encoder and a frozen text encoder with projection heads "
                                 "(LiT-style); the result loads as local:DIR",
                   "encoderlab align --vision efficientnet-lite0 --text minilm-l6 --data openclipart "
                   "--out ~/models/aligned\n"
                   "encoderlab align --vision hf-vision:facebook/dinov2-small --text minilm-l6 "
                   "--data 'csv:pairs.csv?text=caption' --out ~/models/dino-minilm --head mlp --json")
    p.add_argument("--vision", required=True, help="image encoder spec, e.g. efficientnet-lite0")
    p.add_argument("--text", required=True, help="text encoder spec, e.g. minilm-l6")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear", help="projection head (default: %(default)s)")
    p.add_argument("--dim", type=positive_int, default=256, help="joint embedding size, >= 1 (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=None, help=f"maximum epochs, >= 1 (default: {d.epochs})")
    p.add_argument("--batch-size", type=int_at_least(2, " (a contrastive batch needs negatives)"), default=None,
                   help=f"pairs per step, >= 2 (default: {d.batch_size})")
    p.add_argument("--lr", type=positive_float, default=None, help=f"learning rate, > 0 (default: {d.lr:g})")
    p.add_argument("--patience", type=positive_int, default=None,
                   help=f"epochs without val improvement before stopping, >= 1 (default: {d.patience})")
    p.add_argument("--shuffle-pairs", action="store_true",
                   help="control run: captions shuffled across images (held-out retrieval should fall to chance)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out test retrieval after training")
    p.add_argument("--force", action="store_true",
                   help="train even when MODEL_DIR already holds a model of the same towers, data and settings")
    p.add_argument("--checkpoint-every", type=positive_int, default=None, metavar="STEPS",
                   help="also checkpoint every STEPS optimizer steps, not only after each epoch (checkpoints go to "
                        "the sibling .MODEL_DIR.train/ and are removed once the model is saved)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming the interrupted run's checkpoint")
    add_run_options(p, needs_encoder=False)
    p.set_defaults(func=cmd_align)


def cmd_align(args: argparse.Namespace) -> dict[str, Any]:
    """Train (or, when up to date, reuse) the aligned model, evaluate it on the test split, print the outcome."""
    from ..train.align import align_encoders

    if not args.out:
        raise EncoderlabError("align needs --out MODEL_DIR (where the aligned model is saved)",
                              "add e.g. --out ~/models/aligned; it then loads as local:~/models/aligned")
    check_spec(args.vision)
    check_spec(args.text)
    model_dir = Path(args.out).expanduser()
    check_out_dir(model_dir, fix="pass an --out MODEL_DIR in a directory you can write to")  # before any work
    store = open_store(args)
    ds = load_data(args, whole=True).ensure_validation(seed=args.seed)
    options = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "patience") if getattr(args, k) is not None}
    show = progress(args)
    result = align_encoders(args.vision, args.text, ds.select_split("train"), ds.select_split("val"), model_dir,
                            store=store, head=args.head, dim=args.dim, seed=args.seed, shuffle_pairs=args.shuffle_pairs,
                            reuse=not args.force, progress=show, device=args.device, precision=args.precision,
                            resume=not args.no_resume, checkpoint_every=args.checkpoint_every, **options)
    out: dict[str, Any] = {"model_dir": str(result.path), "spec": f"local:{result.path}",
                           "up_to_date": result.up_to_date}
    if result.up_to_date:  # same towers, same split, same settings: training again would give the same heads
        train_info = result.config.get("train", {})
        out.update({k: train_info.get(k) for k in ("best_epoch", "epochs_run", "fit_seconds")})
        evaluated = model_dir / "eval" / "results.json"
        if not args.no_eval and evaluated.is_file():
            out["test_retrieval"] = json.loads(evaluated.read_text())["metrics"]
    else:
        out.update(result.summary())
        if not args.no_eval and "test" in ds.splits:
            out["test_retrieval"] = _evaluate(args, ds, store, result, show)
    if not args.json:
        _say(out)
    return out


def _evaluate(args: argparse.Namespace, ds: Any, store: Any, result: Any, show: bool) -> dict[str, Any]:
    """Test-split retrieval of the new model, written to MODEL_DIR/eval (reused while the model is up to date)."""
    from ..encoders import create_encoder
    from ..results import write_run
    from ..rungs import run_retrieval

    encoder = create_encoder(f"local:{result.path}", device=args.device, precision=args.precision)
    ev = run_retrieval(encoder, ds, store, split="test", n_boot=args.n_boot, seed=args.seed, progress=show)
    ev.costs.update(fit_seconds=result.fit_seconds, trainable_params=result.trainable_params)
    ev.config["align"] = result.summary()
    write_run(ev, Path(result.path) / "eval")
    return ev.to_json()["metrics"]


def _say(out: dict[str, Any]) -> None:
    """The human-readable report of ``cmd_align``."""
    if out["up_to_date"]:
        say(f"aligned model {out['model_dir']} is up to date (same towers, data split and settings; --force retrains)")
    else:
        say(f"aligned model: {out['model_dir']}  (use it as --encoder local:{out['model_dir']})")
        say(f"best epoch {out['best_epoch']} of {out['epochs_run']}, head training {out['fit_seconds']:.1f} s, "
            f"{out['trainable_params']} trainable parameters")
    if "test_retrieval" in out:
        say(retrieval_table(out["test_retrieval"], label="test retrieval", full=False))
