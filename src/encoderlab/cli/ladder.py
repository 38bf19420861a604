"""``encoderlab ladder``: climb the rungs, stop where the evidence says, and write the Encoder Note and report."""

from __future__ import annotations

import argparse
from typing import Any

from .options import (
    add_parser,
    add_prompt_options,
    add_run_options,
    class_names,
    int_list,
    positive_int,
    progress,
    say,
)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--min-gain must be a number in [0, 1), got {text!r}; e.g. 0.01") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"--min-gain must be in [0, 1) (a share of accuracy), got {text}; e.g. 0.01")
    return value


def _minutes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"--budget-minutes must be a number > 0, got {text!r}; e.g. 30")
    return value


def _level(text: str) -> int:
    if text not in ("1", "2", "3", "4"):
        raise argparse.ArgumentTypeError(f"--max-rung must be 1, 2, 3 or 4, got {text!r} (1 frozen, 2 heads on "
                                         "cached embeddings, 3 small adaptation, 4 fine-tuning)")
    return int(text)


def register(sub: Any) -> None:
    p = add_parser(sub, "ladder", "climb the representation ladder (frozen -> heads -> small adaptation -> "
                                  "fine-tuning), stop where the validation evidence says, write the Encoder Note",
                   "encoderlab ladder --encoder local:~/models/aligned --data emoji\n"
                   "encoderlab ladder --encoder efficientnet-lite0 --data folder:~/pets --max-rung 2 "
                   "--out ~/runs/pets\n"
                   "encoderlab ladder --encoder hf:openai/clip-vit-base-patch32 --data emoji --all "
                   "--budget-minutes 30 --json")
    p.add_argument("--max-rung", type=_level, default=4,
                   help="highest level to climb to: 1 frozen, 2 heads, 3 CoOp / Tip-Adapter-F, 4 fine-tuning "
                        "(default: %(default)s)")
    p.add_argument("--all", action="store_true",
                   help="run every level anyway (the stop decision is still recorded and used for the choice)")
    p.add_argument("--min-gain", type=_fraction, default=0.01,
                   help="climb only when the lower 95%% bound of the gain over the levels below exceeds this share "
                        "(paired bootstrap on the decision split; default: %(default)s = 1 point)")
    p.add_argument("--budget-minutes", type=_minutes, default=None,
                   help="no new rung starts after this many minutes of the decision phase")
    p.add_argument("--rungs", default=None, help="only these rungs (comma-separated; default: every registered one)")
    p.add_argument("--shots", default="1,2,4,8,16", help="few-shot settings for the curve (default: %(default)s)")
    p.add_argument("--seeds", type=positive_int, default=3, help="k-shot samples per setting (default: %(default)s)")
    p.add_argument("--force", action="store_true",
                   help="run again even when --out holds a finished ladder of the same encoder, data and settings")
    add_prompt_options(p)
    add_run_options(p)
    p.set_defaults(func=cmd_ladder)


def cmd_ladder(args: argparse.Namespace) -> dict[str, Any]:
    from ..ladder.run import LadderConfig, run_ladder
    from .options import check_spec, load_data, make_encoder, open_store, prepare_run_dir

    rungs = tuple(r.strip() for r in args.rungs.split(",") if r.strip()) if args.rungs else None
    config = LadderConfig(max_rung=args.max_rung, run_all=args.all, min_gain=args.min_gain,
                          budget_minutes=args.budget_minutes, shots=tuple(int_list(args.shots, "--shots")),
                          seeds=args.seeds, templates=args.templates, class_names=class_names(args),
                          n_boot=args.n_boot, seed=args.seed, rungs=rungs)
    config.check()  # an unknown rung fails before anything is read
    check_spec(args.encoder)
    out_dir = prepare_run_dir(args, "ladder", args.encoder)
    store = open_store(args)
    ds = load_data(args, whole=True)
    encoder = make_encoder(args)
    request = request_digest(encoder, ds, config)
    done = None if args.force else finished_run(out_dir, request)
    if done is not None:
        if not args.json:
            say(done["note_md"])
            say(f"up to date: {out_dir} holds this ladder already (same encoder, data and settings; --force reruns)")
        return {**done, "run_dir": str(out_dir), "note": str(out_dir / "note.md"), "reused": True,
                "report": str(out_dir / "report.html") if (out_dir / "report.html").exists() else None}
    run = run_ladder(encoder, ds, store, config, out_dir=out_dir, progress=progress(args),
                     say=None if args.json else say, request=request)
    out = run.result.to_json()
    out.update(run_dir=str(run.run_dir), note=str(run.run_dir / "note.md"),
               report=str(run.report) if run.report else None)
    if not args.json:
        say(run.note)
        say(f"note: {run.run_dir / 'note.md'}")
        say(f"report: {run.report}" if run.report else "report: not written (see results.json warnings)")
    return out


def request_digest(encoder: Any, ds: Any, config: Any) -> str:
    """What a ladder's answer depends on: the encoder's weights and preprocessing, the data's items and splits, the
    settings, and this encoderlab's version."""
    from .. import __version__
    from ..hashing import json_digest
    from ..results import data_provenance

    fingerprints = {m: encoder.fingerprint(m) for m in encoder.modalities}
    return json_digest({"encoder": fingerprints, "data": data_provenance(ds), "config": config.describe(),
                        "version": __version__})


def finished_run(out_dir: Any, request: str) -> dict[str, Any] | None:
    """The results.json of a complete ladder in ``out_dir`` made from ``request``, else None."""
    import json

    path = out_dir / "results.json"
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if doc.get("task") != "ladder" or doc.get("config", {}).get("request") != request:
        return None
    return doc if (out_dir / "note.md").exists() else None
