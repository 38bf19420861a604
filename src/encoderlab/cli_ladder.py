"""CLI commands of the frozen rungs: ``zeroshot``, ``probe``, ``retrieval``, ``align`` and ``compare``.

Each is a thin layer over a library function in ``encoderlab.ladder`` / ``encoderlab.train``; each writes a run
directory (``results.json`` + ``predictions.parquet``) and prints a table, or one JSON object with ``--json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import EncoderlabError

EXAMPLES = {
    "zeroshot": (
        "example:\n  encoderlab zeroshot --encoder hf:openai/clip-vit-base-patch32 --data folder:~/pets\n"
        "  encoderlab zeroshot --encoder local:~/models/aligned --data emoji --templates simple --compare-templates\n"
        "  encoderlab zeroshot --encoder hf:google/siglip-base-patch16-224 --data emoji --class-names names.json --json"
    ),
    "probe": (
        "example:\n  encoderlab probe --encoder efficientnet-lite0 --data emoji --method linear\n"
        "  encoderlab probe --encoder efficientnet-lite0 --data emoji --method linear --shots 1,2,4,8,16 --seeds 3\n"
        "  encoderlab probe --encoder local:~/models/aligned --data emoji --method tip --shots 16 --no-full --json"
    ),
    "retrieval": (
        "example:\n  encoderlab retrieval --encoder local:~/models/aligned --data openclipart\n"
        "  encoderlab retrieval --encoder hf:openai/clip-vit-base-patch32 --data 'csv:pairs.csv?text=caption' "
        "--split all --json"
    ),
    "align": (
        "example:\n  encoderlab align --vision efficientnet-lite0 --text minilm-l6 --data openclipart "
        "--out ~/models/aligned\n"
        "  encoderlab align --vision hf-vision:facebook/dinov2-small --text minilm-l6 --data 'csv:pairs.csv?text=caption' "
        "--out ~/models/dino-minilm --head mlp --json"
    ),
    "compare": (
        "example:\n  encoderlab compare --encoder local:~/models/aligned --data emoji\n"
        "  encoderlab compare --encoder efficientnet-lite0 --data emoji --rungs knn,linear --shots 1,2,4,8,16 --json"
    ),
}


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EncoderlabError(f"expected comma-separated integers, got {text!r}", "write e.g. 1,2,4,8,16") from None
    if any(v < 1 for v in values):
        raise EncoderlabError(f"expected positive integers, got {text!r}", "write e.g. 1,2,4,8,16")
    return values


def add_commands(sub: Any, fmt: type, common: Callable, data_options: Callable) -> None:
    """Register the rung subcommands on the main parser's subparsers."""

    def encoder_options(p: argparse.ArgumentParser, needs_encoder: bool = True) -> None:
        if needs_encoder:
            p.add_argument("--encoder", required=True, help="encoder spec (see `encoderlab encoders list`)")
        p.add_argument("--data", required=True, help="dataset spec: emoji, openclipart, folder:DIR, csv:PATH, ...")
        p.add_argument("--store", help="embedding store directory (default: $ENCODERLAB_HOME/store)")
        p.add_argument("--out", help="run directory (default: under $ENCODERLAB_HOME/runs)")
        p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
        p.add_argument("--precision", default="auto", help="auto, fp32, fp16, bf16")
        p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
        p.add_argument("--no-progress", action="store_true", help="hide progress bars")
        data_options(p)
        common(p)

    def prompt_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--templates", default="clip80",
                       help="prompt templates: clip80 (CLIP's 80 ImageNet prompts), simple, name, or a file with one "
                            "template per line using {} for the class name (default: %(default)s)")
        p.add_argument("--class-names", help="JSON {label: name} or CSV label,name overriding the humanized labels")

    p = sub.add_parser("zeroshot", help="zero-shot classification with prompt templates (dual encoders)",
                       epilog=EXAMPLES["zeroshot"], formatter_class=fmt)
    prompt_options(p)
    p.add_argument("--split", default="test", help="split to report on (default: %(default)s)")
    p.add_argument("--compare-templates", action="store_true",
                   help="also score every template alone (on val, to choose by, and on the reported split)")
    encoder_options(p)
    p.set_defaults(func=cmd_zeroshot)

    p = sub.add_parser("probe", help="linear probe, kNN or Tip-Adapter on frozen embeddings (full data and few-shot)",
                       epilog=EXAMPLES["probe"], formatter_class=fmt)
    p.add_argument("--method", choices=["linear", "knn", "tip"], default="linear", help="probe (default: %(default)s)")
    p.add_argument("--shots", default="", help="few-shot settings, e.g. 1,2,4,8,16 (k items per class)")
    p.add_argument("--seeds", type=int, default=3, help="k-shot samples per setting; mean ± std over them")
    p.add_argument("--no-full", action="store_true", help="skip the full-data fit (few-shot only)")
    p.add_argument("--class-weight", choices=["balanced"], default=None, help="linear probe: weight classes inversely "
                   "to their frequency")
    p.add_argument("--modality", choices=["image", "text"], default=None,
                   help="what to classify (default: images when the data and encoder have them, else texts)")
    prompt_options(p)
    encoder_options(p)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("retrieval", help="image↔text retrieval: Recall@1/5/10, MRR, median rank (dual encoders)",
                       epilog=EXAMPLES["retrieval"], formatter_class=fmt)
    p.add_argument("--split", default="test", help="split to evaluate, or 'all' (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=1024, help="queries scored at once (bounds memory)")
    encoder_options(p)
    p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("align", help="align a frozen image encoder and a frozen text encoder with projection heads "
                                     "(LiT-style); the result loads as local:DIR", epilog=EXAMPLES["align"],
                       formatter_class=fmt)
    p.add_argument("--vision", required=True, help="image encoder spec, e.g. efficientnet-lite0")
    p.add_argument("--text", required=True, help="text encoder spec, e.g. minilm-l6")
    p.add_argument("--head", choices=["linear", "mlp"], default="linear", help="projection head (default: %(default)s)")
    p.add_argument("--dim", type=int, default=256, help="joint embedding size (default: %(default)s)")
    p.add_argument("--epochs", type=int, default=None, help="maximum epochs (default: the trainer's)")
    p.add_argument("--batch-size", type=int, default=None, help="pairs per step (default: the trainer's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the trainer's)")
    p.add_argument("--patience", type=int, default=None, help="epochs without val improvement before stopping")
    p.add_argument("--shuffle-pairs", action="store_true",
                   help="control run: captions shuffled across images (held-out retrieval should fall to chance)")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out test retrieval after training")
    p.add_argument("--force", action="store_true",
                   help="train even when MODEL_DIR already holds a model of the same towers, data and settings")
    encoder_options(p, needs_encoder=False)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("compare", help="the frozen rungs side by side: zero-shot, kNN, linear, Tip-Adapter, retrieval",
                       epilog=EXAMPLES["compare"], formatter_class=fmt)
    p.add_argument("--rungs", default="zeroshot,knn,linear,tip,retrieval",
                   help="comma-separated subset of zeroshot,knn,linear,tip,retrieval (default: all)")
    p.add_argument("--shots", default="1,4,16", help="few-shot settings (default: 1,4,16)")
    p.add_argument("--seeds", type=int, default=3, help="k-shot samples per setting (default: %(default)s)")
    p.add_argument("--probe-features", choices=["auto", "joint", "tower"], default="auto",
                   help="features kNN and the linear probe read; auto: the image tower's own features when the "
                        "encoder is an aligned pair (the projection can only lose information), else the embedding")
    prompt_options(p)
    encoder_options(p)
    p.set_defaults(func=cmd_compare)


# -------------------------------------------------------------------------------------------------- shared


def _context(args: argparse.Namespace, encoder_spec: str | None = None) -> tuple[Any, Any, Any]:
    """(encoder, dataset, store); a typo in the encoder spec fails before any data is read."""
    from .cli import _load, _open_store
    from .encoders import create_encoder, parse_spec

    spec = encoder_spec or args.encoder
    parse_spec(spec)
    ds = _load(args, whole=True)  # every rung needs its train/val/test; --split only picks what is reported
    return create_encoder(spec, device=args.device, precision=args.precision), ds, _open_store(args)


def _class_names(args: argparse.Namespace) -> dict[str, str] | None:
    from .data.prompts import load_class_names

    return load_class_names(args.class_names) if getattr(args, "class_names", None) else None


def _finish(args: argparse.Namespace, result: Any, task: str, spec: str) -> dict[str, Any]:
    from .ladder import default_run_dir, write_run

    out = Path(args.out).expanduser() if args.out else default_run_dir(task, spec)
    write_run(result, out)
    return result.to_json()


def _ci(m: dict[str, Any], name: str) -> str:
    v = m.get(name)
    if v is None:
        return "-"
    lo, hi = m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")
    return f"{v:.3f} [{lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else f"{v:.3f}"


def _print_costs(costs: dict[str, Any]) -> None:
    keys = ("fit_seconds", "predict_ms_per_item", "encoder_ms_per_item", "predict_ms_per_item_with_encoder",
            "trainable_params", "peak_rss_mb")
    print("costs: " + ", ".join(f"{k}={costs[k]}" for k in keys if k in costs))


# -------------------------------------------------------------------------------------------------- commands


def cmd_zeroshot(args: argparse.Namespace) -> dict[str, Any]:
    from .cli import _table
    from .ladder import prepare, run_zeroshot

    encoder, ds, store = _context(args)
    prep = prepare(encoder, ds, store, progress=not (args.no_progress or args.json))
    result = run_zeroshot(encoder, prep, store, templates=args.templates, class_names=_class_names(args),
                          split=args.split, compare_templates=args.compare_templates, n_boot=args.n_boot,
                          seed=args.seed)
    out = _finish(args, result, "zeroshot", encoder.spec)
    if not args.json:
        m = result.metrics
        _table([[n, _ci(m, n)] for n in ("top1", "top5", "balanced_accuracy", "macro_f1") if n in m],
               ["metric", "value [95% CI]"])
        recalls = sorted((k[len("recall/"):], v) for k, v in m.items() if k.startswith("recall/"))
        if recalls:
            print("per-class recall: " + ", ".join(f"{c} {v:.2f}" for c, v in recalls))
        if args.compare_templates:
            rows = result.extra["templates"]
            cols = [c for c in rows[0] if c != "template"]
            _table([[r["template"]] + [("-" if r[c] is None else f"{r[c]:.3f}") for c in cols] for r in rows],
                   ["template"] + cols)
        _print_costs(result.costs)
        print(f"run: {out['run_dir']}")
    return out


def cmd_probe(args: argparse.Namespace) -> dict[str, Any]:
    from .cli import _table
    from .ladder import prepare, run_probe

    args.shots = _int_list(args.shots)
    encoder, ds, store = _context(args)
    prep = prepare(encoder, ds, store, modality=args.modality, progress=not (args.no_progress or args.json))
    result = run_probe(encoder, prep, store, method=args.method, shots=args.shots, seeds=args.seeds,
                       full=not args.no_full, class_weight=args.class_weight, templates=args.templates,
                       class_names=_class_names(args), n_boot=args.n_boot, seed=args.seed)
    out = _finish(args, result, f"probe-{args.method}", encoder.spec)
    if not args.json:
        m = result.metrics
        rows = []
        for k in sorted(set(args.shots)):
            p = f"{k}-shot/"
            rows.append([f"{k}-shot", f"{m[p + 'top1']:.3f} ± {m[p + 'top1_std']:.3f}",
                         f"[{m[p + 'top1_ci_low']:.3f}, {m[p + 'top1_ci_high']:.3f}]",
                         f"{m[p + 'balanced_accuracy']:.3f}", f"{m[p + 'macro_f1']:.3f}"])
        if not args.no_full:
            rows.append(["full", f"{m['top1']:.3f}", f"[{m['top1_ci_low']:.3f}, {m['top1_ci_high']:.3f}]",
                         f"{m['balanced_accuracy']:.3f}", f"{m['macro_f1']:.3f}"])
        _table(rows, ["setting", "top-1 (mean ± std over seeds)", "95% CI", "bal. acc", "macro-F1"])
        _print_costs(result.costs)
        print(f"run: {out['run_dir']}")
    return out


def cmd_retrieval(args: argparse.Namespace) -> dict[str, Any]:
    from .cli import _table
    from .ladder import run_retrieval

    encoder, ds, store = _context(args)
    result = run_retrieval(encoder, ds, store, split=args.split, chunk_size=args.chunk_size, n_boot=args.n_boot,
                           seed=args.seed, progress=not (args.no_progress or args.json))
    out = _finish(args, result, "retrieval", encoder.spec)
    if not args.json:
        m = result.metrics
        _table([[d] + [_ci(m, f"{d}_R@{k}") for k in (1, 5, 10)]
                + [_ci(m, f"{d}_mrr"), f"{m[f'{d}_median_rank']:.0f}", f"{m[f'{d}_chance_R@1']:.4f}",
                   str(m[f"{d}_queries"])] for d in ("i2t", "t2i")],
               ["direction", "R@1 [95% CI]", "R@5", "R@10", "MRR", "median rank", "chance R@1", "queries"])
        print(f"{m['images']} images, {m['texts']} distinct captions, {m['pairs']} pairs")
        _print_costs(result.costs)
        print(f"run: {out['run_dir']}")
    return out


def _align_request(args: argparse.Namespace, ds: Any, options: dict[str, Any]) -> str:
    """Digest of everything an aligned model depends on: tower weights, data split, settings."""
    from .encoders import create_encoder
    from .encoders.aligned import tower_fingerprint
    from .hashing import json_digest
    from .ladder import data_provenance

    towers = {m: tower_fingerprint(create_encoder(spec, device=args.device, precision=args.precision))
              for m, spec in (("image", args.vision), ("text", args.text))}
    data = data_provenance(ds)
    return json_digest({"towers": towers, "data": data["source"], "splits": data["splits"], "head": args.head,
                        "dim": args.dim, "seed": args.seed, "shuffle_pairs": args.shuffle_pairs, **options})


def cmd_align(args: argparse.Namespace) -> dict[str, Any]:
    import json

    from .atomic import atomic_write_json
    from .cli import _load, _open_store, _table
    from .encoders import create_encoder, parse_spec
    from .encoders.aligned import is_aligned_dir, read_config
    from .ladder import run_retrieval, write_run
    from .train.align import align_encoders

    if not args.out:
        raise EncoderlabError("align needs --out MODEL_DIR (where the aligned model is saved)",
                              "add e.g. --out ~/models/aligned; it then loads as local:~/models/aligned")
    parse_spec(args.vision)
    parse_spec(args.text)
    ds = _load(args, whole=True)
    store = _open_store(args)
    model_dir = Path(args.out).expanduser()
    options = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "patience") if getattr(args, k) is not None}
    progress = not (args.no_progress or args.json)
    request = _align_request(args, ds, options)
    stamp = model_dir / "request.json"
    up_to_date = (not args.force and is_aligned_dir(model_dir) and stamp.is_file()
                  and json.loads(stamp.read_text()).get("digest") == request)
    if up_to_date:  # same towers, same split, same settings: training again would give the same heads
        train_info = read_config(model_dir).get("train", {})
        out: dict[str, Any] = {"model_dir": str(model_dir), "spec": f"local:{model_dir}", "up_to_date": True,
                               "best_epoch": train_info.get("best_epoch"), "epochs_run": train_info.get("epochs_run"),
                               "fit_seconds": train_info.get("fit_seconds")}
        evaluated = model_dir / "eval" / "results.json"
        if not args.no_eval and evaluated.is_file():
            out["test_retrieval"] = json.loads(evaluated.read_text())["metrics"]
    else:
        train, val = ds.select_split("train"), ds.select_split("val")
        result = align_encoders(args.vision, args.text, train, val, model_dir, store=store, head=args.head,
                                dim=args.dim, seed=args.seed, shuffle_pairs=args.shuffle_pairs, progress=progress,
                                device=args.device, **options)
        atomic_write_json(stamp, {"digest": request})
        out = {"model_dir": str(result.path), "spec": f"local:{result.path}", "up_to_date": False, **result.summary()}
        if not args.no_eval and "test" in ds.splits:
            encoder = create_encoder(f"local:{result.path}", device=args.device, precision=args.precision)
            ev = run_retrieval(encoder, ds, store, split="test", n_boot=args.n_boot, seed=args.seed,
                               progress=progress)
            ev.costs.update(fit_seconds=result.fit_seconds, trainable_params=result.trainable_params)
            ev.config["align"] = result.summary()
            write_run(ev, Path(result.path) / "eval")
            out["test_retrieval"] = ev.to_json()["metrics"]
    if not args.json:
        if out["up_to_date"]:
            print(f"aligned model {model_dir} is up to date (same towers, data split and settings; --force retrains)")
        else:
            print(f"aligned model: {out['model_dir']}  (use it as --encoder local:{out['model_dir']})")
            print(f"best epoch {out['best_epoch']} of {out['epochs_run']}, head training {out['fit_seconds']:.1f} s, "
                  f"{out['trainable_params']} trainable parameters")
        if "test_retrieval" in out:
            m = out["test_retrieval"]
            _table([[d] + [_ci(m, f"{d}_R@{k}") for k in (1, 5, 10)] + [_ci(m, f"{d}_mrr"),
                    f"{m[f'{d}_chance_R@1']:.4f}"] for d in ("i2t", "t2i")],
                   ["test retrieval", "R@1 [95% CI]", "R@5", "R@10", "MRR", "chance R@1"])
    return out


def cmd_compare(args: argparse.Namespace) -> dict[str, Any]:
    from .atomic import atomic_write_json
    from .ladder import default_run_dir, format_comparison, run_comparison

    args.shots = _int_list(args.shots)
    encoder, ds, store = _context(args)
    rungs = [r.strip() for r in args.rungs.split(",") if r.strip()]
    out_dir = Path(args.out).expanduser() if args.out else default_run_dir("compare", encoder.spec)
    comp = run_comparison(encoder, ds, store, rungs=rungs, shots=args.shots, seeds=args.seeds,
                          templates=args.templates, class_names=_class_names(args), n_boot=args.n_boot,
                          seed=args.seed, progress=not (args.no_progress or args.json), out_dir=out_dir,
                          probe_features=args.probe_features)
    out = comp.to_json()
    out["run_dir"] = str(out_dir)
    atomic_write_json(out_dir / "results.json", out)
    if not args.json:
        print(f"{encoder.spec} on {ds.source}: {len(ds)} items, {len(ds.classes)} classes")
        print(format_comparison(comp))
        print(f"run: {out_dir}")
    return out
