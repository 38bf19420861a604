"""``encoderlab finetune``: fine-tune an image tower with a classifier; ``--out DIR`` is the model (local:DIR).

``torchrun --nproc_per_node N -m encoderlab finetune ...`` trains data-parallel (``train.distributed``):
``--batch-size`` is the global batch, split over the N processes; rank 0 alone writes the model and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import EncoderlabError
from .options import (
    add_parser,
    add_prompt_options,
    add_run_options,
    check_spec,
    class_names,
    load_data,
    make_encoder,
    open_store,
    positive_float,
    positive_int,
    progress,
    say,
    smoothing,
    warn,
)


def register(sub: Any) -> None:
    from ..train.finetune import DEFAULT_LR, FinetuneConfig

    d = FinetuneConfig()
    lrs = ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
    p = add_parser(sub, "finetune", "fine-tune the image tower with a classifier (zero-shot head for dual encoders, "
                                    "LP-FT for single towers); --out saves a model that loads as local:DIR",
                   "encoderlab finetune --encoder hf:openai/clip-vit-base-patch32 --data emoji --objective classify "
                   "--train heads --out ~/models/emoji-heads\n"
                   "encoderlab finetune --encoder hf:openai/clip-vit-base-patch32 --data emoji --train last:2 "
                   "--epochs 5 --out ~/models/emoji-last2\n"
                   "encoderlab finetune --encoder hf-vision:facebook/dinov2-small --data folder:~/pets --train "
                   "lora:4 --label-smoothing 0.1 --out ~/models/pets-lora --json\n"
                   "torchrun --nproc_per_node 4 -m encoderlab finetune --encoder hf:openai/clip-vit-base-patch32 "
                   "--data folder:~/pets --train last:2 --batch-size 256 --out ~/models/pets-last2   # 4 GPUs, "
                   "global batch 256 (64 each); rank 0 writes\n"
                   "encoderlab zeroshot --encoder local:~/models/emoji-last2 --data emoji   # the tuned image tower")
    p.add_argument("--objective", choices=["classify", "contrastive"], default="classify",
                   help="training objective: classify (cross-entropy on the labels) or contrastive (FLYP: the "
                        "pretraining loss on image-caption pairs, InfoNCE or SigLIP's sigmoid; test retrieval) "
                        "(default: %(default)s)")
    p.add_argument("--train", default=None, metavar="heads|last:N|lora:R|all",
                   help="what trains: heads (towers locked), last:N (the image tower's last N parameter groups + "
                        "head), lora:R (rank-R LoRA on attention q/k/v, merged), all (default: heads for classify, "
                        "all for contrastive, which refuses heads)")
    p.add_argument("--lock", choices=["text", "image", "none"], default="text",
                   help="with --objective contrastive: the tower that stays frozen; --train applies to the other "
                        "(none: to both) (default: %(default)s)")
    p.add_argument("--epochs", type=positive_int, default=d.epochs,
                   help="maximum epochs, >= 1; the best on val accuracy is kept (default: %(default)s)")
    p.add_argument("--lr", type=positive_float, default=None, help=f"AdamW learning rate, > 0 (default: {lrs})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="images per step; under torchrun the global batch, split over the processes (default: "
                        "%(default)s)")
    p.add_argument("--patience", type=positive_int, default=d.patience,
                   help="epochs without val improvement before stopping, >= 1 (default: %(default)s)")
    p.add_argument("--label-smoothing", type=smoothing, default=d.label_smoothing,
                   help="cross-entropy label smoothing in [0, 1) (default: %(default)s)")
    p.add_argument("--freeze-norms", action="store_true",
                   help="keep normalisation layers (LayerNorm / BatchNorm weights and statistics) fixed")
    p.add_argument("--wise-ft", type=alpha_grid, default=None, metavar="START:STOP:STEP",
                   help="WiSE-FT (Wortsman et al. 2022): also evaluate the weight-space mixes (1-a)*zero-shot + "
                        "a*fine-tuned for a = START, START+STEP, .., STOP (0 <= START < STOP <= 1), choose a on val "
                        "accuracy and save that model (e.g. 0:1:0.1)")
    p.add_argument("--also-eval", default=None, metavar="DATA",
                   help="with --wise-ft: zero-shot accuracy on a second labelled dataset along the curve, to show "
                        "what fine-tuning forgot (dual encoders)")
    p.add_argument("--no-resume", action="store_true",
                   help="start over instead of resuming an interrupted run's checkpoint")
    add_prompt_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_finetune)
    for action in p._actions:
        if action.dest == "out":
            action.required = True
            action.help = ("the model directory to write, loadable as local:DIR; the test results go into DIR/eval "
                           "(an existing fine-tuned model there is replaced, other files are kept)")


def alpha_grid(text: str) -> list[float]:
    """``type=`` of ``--wise-ft``: a bad grid fails while parsing, naming the spec and showing an example."""
    from ..train.wise_ft import parse_alpha_grid

    try:
        return parse_alpha_grid(text)
    except EncoderlabError as e:
        raise argparse.ArgumentTypeError(f"{e.message}; {e.fix}") from None


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Check everything, embed the frozen features, fine-tune, save the model and its test results.

    Under torchrun (``WORLD_SIZE`` > 1) every process runs this: the checks that need no data first (a bad option
    fails on every rank before any joins the process group), then data-parallel training; rank 0 alone writes the
    model and its run directory and reports, the other ranks return (``_rank_done``) after testing (classify: the
    same test on every rank, nothing written) or right after training (contrastive: its test fills the store).
    """
    from ..encoders.finetuned import EVAL_NAME
    from ..extract import labelled_embeddings
    from ..results import write_run
    from ..results.tables import costs_line
    from ..rungs.finetune import run_finetune, save_finetune
    from ..train import distributed as dp
    from ..train.finetune import FinetuneConfig, plan_training

    if args.objective == "contrastive":
        return _cmd_contrastive(args)
    config = FinetuneConfig(objective=args.objective, train=args.train or d_train(), epochs=args.epochs, lr=args.lr,
                            batch_size=args.batch_size, patience=args.patience,
                            label_smoothing=args.label_smoothing, freeze_norms=args.freeze_norms, seed=args.seed,
                            precision="auto")
    config.check()  # a bad --train / --label-smoothing fails before anything is read
    model_dir = _checked_model_dir(args)
    with _data_parallel(args) as info:
        show = progress(args) and info.is_main
        with dp.together("checking the data and the encoder"):  # one rank failing here fails every rank
            store = open_store(args)
            ds = load_data(args, whole=True).ensure_validation(seed=args.seed)
            if not ds.classes:
                raise EncoderlabError(f"dataset {ds.source!r} has no labels",
                                      "finetune --objective classify needs labels")
            also_ds = _also_eval_data(args)
            encoder = make_encoder(args)
            plan_training(encoder, config)  # block map, N, LoRA targets: before extracting anything
            if also_ds is not None and not ("image" in encoder.modalities and "text" in encoder.modalities):
                raise EncoderlabError(f"--also-eval classifies zero-shot, which needs a dual encoder; "
                                      f"{encoder.spec!r} encodes {'+'.join(encoder.modalities)}",
                                      "drop --also-eval for single towers")

        def embed() -> tuple[Any, Any]:
            emb = labelled_embeddings(encoder, ds, store, progress=show)
            return emb, labelled_embeddings(encoder, also_ds, store, progress=show) if also_ds is not None else None

        emb, also = dp.main_first(embed, "embedding the data")  # rank 0 fills the store, the others read it
        work = _work_dir(model_dir, info)
        result, ft = run_finetune(encoder, emb, store, config=config, templates=args.templates,
                                  class_names=class_names(args), n_boot=args.n_boot, seed=args.seed, progress=show,
                                  copy=False, checkpoint_dir=work, resume=not args.no_resume, wise_ft=args.wise_ft,
                                  also_eval=also)
        if not info.is_main:  # every rank tested the same model (writing nothing); rank 0 reports
            return _rank_done(info)
        saved = save_finetune(model_dir, ft, emb, result)
        write_run(result, saved / EVAL_NAME)
        shutil.rmtree(work, ignore_errors=True)  # kept until the model is saved: a failed save resumes, not retrains
    for note in result.config.get("notes", []):
        warn(f"note: {note}")
    out = _output(result, saved, info)
    if not args.json:
        m = result.metrics
        say(f"finetune --train {ft.plan.spec}: test top-1 {m['top1']:.3f} [{m['top1_ci_low']:.3f}, "
            f"{m['top1_ci_high']:.3f}], best epoch {ft.fitted.best_epoch} of {len(ft.fitted.history)}"
            + _world_note(info))
        if "wise_ft" in result.extra:
            say(_wise_ft_lines(result.extra["wise_ft"], m))
        say(costs_line(result.costs))
        say(f"model: {saved}  (use it as --encoder local:{saved})")
    return out


def d_train() -> str:
    from ..train.finetune import FinetuneConfig

    return FinetuneConfig().train


def _checked_model_dir(args: argparse.Namespace) -> Path:
    """``--out`` as the model directory, checked (with ``--encoder``) before anything is read; on every rank alike."""
    from ..encoders.finetuned import check_output_dir
    from ..results.run import check_out_dir

    check_spec(args.encoder)
    model_dir = Path(args.out).expanduser()
    check_output_dir(model_dir)
    check_out_dir(model_dir, fix="pass an --out DIR in a directory you can write to")
    return model_dir


@contextlib.contextmanager
def _data_parallel(args: argparse.Namespace) -> Iterator[Any]:
    """torchrun's process group for the body, left on the way out (also on an error); this rank's ``DistInfo``.

    Each rank's encoder is built on its own device (``cuda:LOCAL_RANK`` with NCCL, the CPU with gloo); a plain
    process keeps ``--device`` as given.
    """
    from ..train import distributed as dp

    with dp.joined(args.device) as info:
        if info.world > 1:
            args.device = str(info.device)
        yield info


def _work_dir(model_dir: Path, info: Any) -> Path:
    """The checkpoint directory (beside the model's), created by rank 0, which alone writes there."""
    from ..train import checkpoint

    work = checkpoint.work_dir(model_dir)
    if info.is_main:
        work.mkdir(parents=True, exist_ok=True)
    return work


def _rank_done(info: Any) -> dict[str, Any]:
    """What a data-parallel rank other than 0 returns after training: ``main`` prints nothing for it."""
    return {"ok": True, "rank": info.rank, "world": info.world}


def _output(result: Any, saved: Path, info: Any) -> dict[str, Any]:
    """The command's JSON: the run's, where the model went, and how many processes trained it."""
    from ..encoders.finetuned import EVAL_NAME

    out = result.to_json()
    out.update(model_dir=str(saved), spec=f"local:{saved}", run_dir=str(saved / EVAL_NAME), processes=info.world)
    return out


def _world_note(info: Any) -> str:
    return f", {info.world} processes (data-parallel)" if info.world > 1 else ""


def _cmd_contrastive(args: argparse.Namespace) -> dict[str, Any]:
    """``--objective contrastive``: check everything, fine-tune on image-caption pairs, save, test retrieval."""
    from ..encoders.finetuned import EVAL_NAME
    from ..results import write_run
    from ..rungs.finetune import run_finetune_contrastive, save_finetune_contrastive
    from ..train import distributed as dp
    from ..train.finetune_contrastive import ContrastiveConfig, check_captions, plan_contrastive

    if args.wise_ft is not None or args.also_eval is not None:
        raise EncoderlabError("--wise-ft / --also-eval are for --objective classify",
                              "drop them with --objective contrastive")
    config = ContrastiveConfig(train=args.train or ContrastiveConfig().train, lock=args.lock, epochs=args.epochs,
                               lr=args.lr, batch_size=args.batch_size, patience=args.patience,
                               freeze_norms=args.freeze_norms, seed=args.seed, precision="auto")
    config.check()  # --train heads / a bad --lock fail before anything is read
    model_dir = _checked_model_dir(args)
    with _data_parallel(args) as info:
        with dp.together("checking the data and the encoder"):  # one rank failing here fails every rank
            store = open_store(args)
            ds = load_data(args, whole=True).ensure_validation(seed=args.seed)
            check_captions(ds)
            encoder = make_encoder(args)
            plan_contrastive(encoder, config)
        work = _work_dir(model_dir, info)
        result, ft = run_finetune_contrastive(encoder, ds, store, config=config, n_boot=args.n_boot, seed=args.seed,
                                              progress=progress(args) and info.is_main, copy=False,
                                              checkpoint_dir=work, resume=not args.no_resume)
        if result is None:
            return _rank_done(info)
        saved = save_finetune_contrastive(model_dir, ft, ds, result)
        write_run(result, saved / EVAL_NAME)
        shutil.rmtree(work, ignore_errors=True)
    out = _output(result, saved, info)
    if not args.json:
        m = result.metrics
        say(f"finetune --objective contrastive --train {ft.plan.spec} (lock {config.lock}): test i2t R@1 "
            f"{m['i2t_R@1']:.3f}, t2i R@1 {m['t2i_R@1']:.3f}, best epoch {ft.fitted.best_epoch} of "
            f"{len(ft.fitted.history)}" + _world_note(info))
        say(f"model: {saved}  (use it as --encoder local:{saved})")
    return out


def _also_eval_data(args: argparse.Namespace) -> Any:
    """The ``--also-eval`` dataset (its own splits; every labelled item is used), checked before any work."""
    if args.also_eval is None:
        return None
    if args.wise_ft is None:
        raise EncoderlabError("--also-eval reports forgetting along the WiSE-FT curve", "add --wise-ft 0:1:0.1")
    from ..data import load_dataset

    also = load_dataset(args.also_eval, seed=args.seed)
    if not also.classes or not also.has_images:
        raise EncoderlabError(f"--also-eval dataset {also.source!r} has no labelled images",
                              "pass a dataset with labelled images to --also-eval")
    return also


def _wise_ft_lines(curve: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The WiSE-FT curve as a small table, the chosen alpha marked."""
    also = "also_eval_top1" in curve["curve"][0]
    lines = [f"WiSE-FT: alpha {curve['alpha']:g} chosen on {curve['chosen_by']}: test top-1 "
             f"{metrics['wise_ft/top1']:.3f} [{metrics['wise_ft/top1_ci_low']:.3f}, "
             f"{metrics['wise_ft/top1_ci_high']:.3f}]",
             "  alpha  val   test" + ("  also-eval" if also else "")]
    for row in curve["curve"]:
        mark = " *" if row["alpha"] == curve["alpha"] else ""
        extra = f"  {row['also_eval_top1']:.3f}" if also else ""
        lines.append(f"  {row['alpha']:<5g}  {row['val_top1']:.3f} {row['test_top1']:.3f}{extra}{mark}")
    return "\n".join(lines)
