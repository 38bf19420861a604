"""``encoderlab ladder``: climb the rungs on one encoder and dataset, stop where the evidence says, explain why.

Two phases, so that no choice reads a test label:

1. **decide** on the decision dataset (``shape.decision_dataset``: train, half of val for the rungs' own knobs, the
   other half as the split they are scored on; the real test rows left out): the simple baselines, every rung level
   by level with the stop rule (``climb``), the few-shot curve and the modality check.
2. **report** on the original dataset: every rung that ran in phase 1 again (knobs on the whole val split), the
   baselines, each with its test interval, paired differences, costs; the diagnosis of the chosen rung's test
   predictions (what still fails, data problems from one kNN graph); retrieval when the data has captions.

The ``RunResult`` (task "ladder") holds both phases; ``note.md`` is the Encoder Note (``ladder.note``), and
``report.html`` the self-contained report with plots (``encoderlab.report``).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..metrics.bootstrap import paired_bootstrap
from ..results import RunResult, data_provenance, write_run
from ..rungs import RungInputs, RungOptions, create_rung
from ..rungs.common import encoder_cost
from ..store import EmbeddingStore
from .climb import Climb, RungScore, best_of, climb, score

#: finished rungs of an unfinished ladder (per request digest), so a rerun after an interruption resumes
WORK_NAME = ".ladder-work"


@dataclass(frozen=True)
class LadderConfig:
    """Every knob of a ladder run (recorded in results.json)."""

    max_rung: int = 4
    run_all: bool = False
    min_gain: float = 0.01
    budget_minutes: float | None = None
    shots: tuple[int, ...] = (1, 2, 4, 8, 16)
    seeds: int = 3
    templates: str | Sequence[str] = "clip80"
    class_names: Mapping[str, str] | None = None
    n_boot: int = 1000
    seed: int = 0
    rungs: tuple[str, ...] | None = None
    knn_k: int = 10

    def check(self) -> None:
        if not 1 <= self.max_rung <= 4:
            raise EncoderlabError(f"--max-rung must be 1..4, got {self.max_rung}", "use --max-rung 2 (frozen + heads)")
        if not 0 <= self.min_gain < 1:
            raise EncoderlabError(f"--min-gain must be in [0, 1), got {self.min_gain}", "use e.g. --min-gain 0.01")
        if self.budget_minutes is not None and not self.budget_minutes > 0:
            raise EncoderlabError(f"--budget-minutes must be > 0, got {self.budget_minutes}", "e.g. 30")
        for name in self.rungs or ():
            create_rung(name)  # unknown names fail here, with close matches

    def describe(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["templates"] = self.templates if isinstance(self.templates, str) else list(self.templates)
        out["class_names"] = bool(self.class_names)
        return out


@dataclass
class LadderRun:
    """A finished ladder: the result, the note, the decision and report phases, where it was written."""

    result: RunResult
    note: str
    decision: Climb
    test: dict[str, RunResult] = field(default_factory=dict)
    run_dir: Path | None = None
    report: Path | None = None


def _options(config: LadderConfig, progress: bool) -> RungOptions:
    return RungOptions(shots=config.shots, seeds=config.seeds, templates=config.templates,
                       class_names=config.class_names, n_boot=config.n_boot, seed=config.seed, progress=progress)


def _baselines(ds: Dataset, modality: str, inputs: RungInputs, config: LadderConfig) -> list[Any]:
    from .baselines import run_baselines

    le = inputs.labelled()
    rows = le.rows[le.index("test")]
    return run_baselines(ds, modality=modality, seed=config.seed, test_rows=rows, tasks=["classification"],
                         n_boot=config.n_boot)


def _baseline_items(baseline: Any, inputs: RungInputs) -> np.ndarray | None:
    """Per-item correctness of a classification baseline on the rungs' test items (same order)."""
    if baseline.kind != "classification" or baseline.unavailable or baseline.predictions is None:
        return None
    le = inputs.labelled()
    test = le.index("test")
    by_row = dict(zip(np.asarray(baseline.test_rows).tolist(), np.asarray(baseline.predictions).tolist()))
    classes = {c: i for i, c in enumerate(le.classes)}
    base = [classes.get(baseline.classes[p]) if p is not None and p >= 0 else None
            for p in (by_row.get(int(r)) for r in le.rows[test])]
    return np.asarray([1.0 if b is not None and b == y else 0.0 for b, y in zip(base, le.y[test])])


def _vs_baselines(scores: Mapping[str, RungScore], baselines: list[Any], inputs: RungInputs,
                  n_boot: int) -> dict[str, Any]:
    """The best baseline, and the paired difference of the best frozen and best overall rung to it."""
    items = {b.name: it for b in baselines if (it := _baseline_items(b, inputs)) is not None}
    if not items:
        return {}
    name = max(items, key=lambda n: (items[n].mean(), n))
    out: dict[str, Any] = {"best_baseline": name, "best_baseline_top1": float(items[name].mean())}
    for label, pick in (("frozen", [s for s in scores.values() if s.level == 1]), ("best", list(scores.values()))):
        best = best_of(pick)
        if best is not None and best.items.size == items[name].size:
            test = paired_bootstrap(best.items, items[name], n_boot=n_boot, seed=0)
            out[label] = {"rung": best.name, "top1": best.top1, **{k: test[k] for k in ("diff", "ci_low", "ci_high",
                                                                                           "p_value")}}
    return out


def _decide(encoder: Encoder, ds: Dataset, store: EmbeddingStore, config: LadderConfig, progress: bool,
            say: Any, work_dir: Path | None = None) -> dict[str, Any]:
    """Phase 1 on the decision dataset: baselines, the climb, the curve, the modality check."""
    from .curve import few_shot_curve
    from .modality import modality_check
    from .shape import decision_dataset

    dds, record = decision_dataset(ds, seed=config.seed)
    inputs = RungInputs(encoder, dds, store, progress=progress)
    options = _options(config, progress)
    le = inputs.labelled()
    options.encoder_ms = encoder_cost(encoder, le, "test", None)
    baselines = _baselines(dds, le.modality, inputs, config)
    budget = config.budget_minutes * 60 if config.budget_minutes else None
    decision = climb(inputs, options, max_level=config.max_rung, run_all=config.run_all, min_gain=config.min_gain,
                     budget_seconds=budget, rungs=config.rungs, say=say,
                     work_dir=work_dir / "decision" if work_dir else None)
    counts = le.dataset.table.loc[le.dataset.table["split"] == "train", "label"].value_counts()
    curve = few_shot_curve({n: s.result for n, s in decision.scores.items()}, float(counts.median()))
    return {"climb": decision, "split": record, "baselines": baselines,
            "vs_baselines": _vs_baselines(decision.scores, baselines, inputs, config.n_boot), "curve": curve,
            "modality": modality_check(encoder, dds, store, seed=config.seed, n_boot=config.n_boot),
            "encoder_ms": options.encoder_ms}


def _report_phase(encoder: Encoder, ds: Dataset, store: EmbeddingStore, config: LadderConfig, decided: dict,
                  progress: bool, say: Any, work_dir: Path | None = None) -> dict[str, Any]:
    """Phase 2 on the original dataset: the rungs that ran, again, scored on test once; baselines; diagnosis.

    Each rung runs its phase-1 main setting only (all labels, or its largest few-shot setting for few-shot-only
    rungs such as CoOp): the few-shot curve is a decision (more labels?), made on the decision split."""
    from .climb import failure, run_saved

    decision: Climb = decided["climb"]
    inputs = RungInputs(encoder, ds, store, progress=progress)
    base = _options(config, progress)
    base.encoder_ms = decided["encoder_ms"]  # the encoder's per-item cost, measured once in phase 1
    results, scores, failed = {}, {}, {}
    for name, picked in decision.scores.items():
        if say is not None:
            say(f"ladder: test numbers of {name} ...")
        shots = () if picked.setting in ("full", "zeroshot") else (int(picked.setting.split("-")[0]),)
        options = dataclasses.replace(base, shots=shots, full=picked.setting in ("full", "zeroshot"))
        try:
            results[name] = run_saved(create_rung(name), inputs, options, work_dir / "test" / name if work_dir
                                      else None)
        except Exception as e:  # noqa: BLE001 - the decision stands; the note says which test number is missing
            failed[name] = failure(e)
            continue
        if (s := score(name, results[name])) is not None:
            scores[name] = s
    baselines = _baselines(ds, inputs.labelled().modality, inputs, config)
    chosen = scores.get(decision.chosen or "")
    frozen = best_of([s for s in scores.values() if s.level == 1])
    chosen_vs_frozen = None
    if chosen is not None and frozen is not None and chosen.name != frozen.name:
        t = paired_bootstrap(chosen.items, frozen.items, n_boot=config.n_boot, seed=0)
        chosen_vs_frozen = {"from": frozen.name, "to": chosen.name, **t}
    diagnosis = _diagnosis(inputs, results.get(decision.chosen or ""), chosen, config, progress)
    return {"results": results, "scores": scores, "baselines": baselines, "inputs": inputs, "failed": failed,
            "vs_baselines": _vs_baselines(scores, baselines, inputs, config.n_boot),
            "chosen_vs_frozen": chosen_vs_frozen, "diagnosis": diagnosis}


def _diagnosis(inputs: RungInputs, result: RunResult | None, chosen: RungScore | None, config: LadderConfig,
               progress: bool) -> Any:
    """The diagnosis of the chosen rung's test predictions (None when it has no prediction rows)."""
    from .diagnose import diagnose

    if result is None or chosen is None or result.predictions is None:
        return None
    le = inputs.labelled()
    preds = result.predictions
    preds = preds[preds["setting"] == chosen.setting]
    by_id = dict(zip(preds["id"].astype(str), preds["prediction"].astype(str)))
    classes = {c: i for i, c in enumerate(le.classes)}
    test = le.index("test")
    pred = np.asarray([classes.get(by_id.get(str(i), ""), -1) for i in le.ids[test]], dtype=np.int64)
    if (pred < 0).any():
        return None
    return diagnose(le, pred, heldout_pred=heldout_predictions(le, config.seed), k=config.knn_k,
                    n_boot=config.n_boot, seed=config.seed, progress=progress)


def heldout_predictions(le: Any, seed: int = 0, folds: int = 3) -> np.ndarray:
    """A second opinion for label errors: out-of-fold logistic-regression predictions on train + val (-1 on test
    and unlabelled rows), so no item is judged by a model that saw its own label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from ..cpu import small_fit_threads
    from ..normalize import normalize_rows

    out = np.full(len(le.y), -1, dtype=np.int64)
    seen = np.flatnonzero(np.isin(np.asarray(le.split).astype(str), ("train", "val")) & (le.y >= 0))
    counts = np.bincount(le.y[seen]) if seen.size else np.zeros(0, int)
    if seen.size < 2 * folds or (counts[counts > 0] < folds).any():
        return out  # too few labels per class for folds: the audit uses the neighbours alone
    X = normalize_rows(le.X[seen])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    with small_fit_threads("cpu"):
        for fit, held in splitter.split(X, le.y[seen]):
            model = LogisticRegression(C=1.0, max_iter=300).fit(X[fit], le.y[seen][fit])
            out[seen[held]] = model.predict(X[held])
    return out


def run_ladder(encoder: Encoder, ds: Dataset, store: EmbeddingStore, config: LadderConfig | None = None, *,
               out_dir: str | Path | None = None, progress: bool = True, say: Any = None,
               request: str | None = None) -> LadderRun:
    """The whole ladder (see the module docstring); writes the run directory when ``out_dir`` is given.

    ``request``: a digest of what the run depends on, recorded so that a later call can reuse a finished run."""
    from .note import encoder_note
    from .shape import task_shape

    config = config or LadderConfig()
    config.check()
    t0 = time.perf_counter()
    ds = ds.ensure_validation(seed=config.seed)  # one val split for both phases (carved once when the data has none)
    shape = task_shape(ds, encoder)
    if shape["kind"] == "none":
        raise EncoderlabError(f"dataset {ds.source!r} has neither labels nor image-caption pairs",
                              "give a labelled dataset (classification) or images with captions (retrieval)")
    decided = reported = None
    work = Path(out_dir) / WORK_NAME / (request or "no-request") if out_dir is not None and request else None
    if shape["kind"] in ("classification", "both"):
        decided = _decide(encoder, ds, store, config, progress, say, work)
        reported = _report_phase(encoder, ds, store, config, decided, progress, say, work)
    retrieval = _retrieval(encoder, ds, store, config, progress) if shape["kind"] in ("retrieval", "both") else None
    facts = {"shape": shape, "decided": decided, "reported": reported, "retrieval": retrieval, "config": config,
             "seconds": time.perf_counter() - t0}
    note = encoder_note(facts)
    result = _result(encoder, ds, facts, note)
    result.config["request"] = request
    run = LadderRun(result, note, decided["climb"] if decided else Climb(),
                    reported["results"] if reported else {})
    if out_dir is not None:
        run.run_dir, run.report = _write(run, facts, Path(out_dir))
        import shutil

        shutil.rmtree(Path(out_dir) / WORK_NAME, ignore_errors=True)  # complete: the finished rungs are in rungs/
    return run


def _retrieval(encoder: Encoder, ds: Dataset, store: EmbeddingStore, config: LadderConfig, progress: bool
               ) -> dict[str, Any] | None:
    """Frozen retrieval on test, against the content-blind caption prior (a dual encoder and captions needed)."""
    from .baselines import caption_prior_baseline

    rung = create_rung("retrieval")
    why = rung.unmet(encoder, ds)
    if why is not None:
        return {"skipped": why}
    result = rung.run(RungInputs(encoder, ds, store, progress=progress), _options(config, progress))
    prior = caption_prior_baseline(ds, seed=config.seed, n_boot=config.n_boot)
    t = ds.table
    images = {str(i): str(p) for i, p in zip(t["id"], t["image"]) if isinstance(p, str)}
    return {"result": result, "prior": prior, "root": getattr(ds, "root", None), "images": images}


def _result(encoder: Encoder, ds: Dataset, facts: dict[str, Any], note: str) -> RunResult:
    from .report_doc import ladder_sections

    metrics: dict[str, Any] = {}
    costs: dict[str, Any] = {"ladder_seconds": round(facts["seconds"], 2)}
    decided, reported = facts["decided"], facts["reported"]
    if decided:
        for name, s in decided["climb"].scores.items():
            metrics[f"decision/{name}/top1"] = s.top1
    if reported:
        for name, s in reported["scores"].items():
            row = s.row()
            metrics.update({f"test/{name}/{k}": row[k] for k in ("top1", "top1_ci_low", "top1_ci_high")})
            costs.update({f"{name}/{k}": row[k] for k in ("fit_seconds", "predict_ms_per_item",
                                                         "predict_ms_per_item_with_encoder", "peak_rss_mb",
                                                         "trainable_params") if row[k] is not None})
    chosen = decided["climb"].chosen if decided else None
    primary = f"test/{chosen}/top1" if chosen and f"test/{chosen}/top1" in metrics else ""
    config = {"encoder": encoder.spec, "ladder": facts["config"].describe(), "decision_split": (
        {k: v for k, v in decided["split"].items() if k != "decision_ids"} if decided else None)}
    return RunResult("ladder", metrics, costs, config, data_provenance(ds), primary=primary,
                     extra={**ladder_sections(facts), "note_md": note})


def _write(run: LadderRun, facts: dict[str, Any], out: Path) -> tuple[Path, Path | None]:
    """Each phase-2 rung's run dir, note.md, report.html, then results.json last (its presence = complete)."""
    from ..atomic import atomic_write_bytes
    from .report_doc import report_document

    out.mkdir(parents=True, exist_ok=True)
    for name, r in run.test.items():
        write_run(r, out / "rungs" / name)
    atomic_write_bytes(out / "note.md", run.note.encode("utf-8"))
    report = None
    try:
        from ..report import render_report

        report = render_report(report_document(facts, run.note), out / "report.html")
    except ImportError as e:  # matplotlib is an optional extra: the note and results are still complete
        run.result.extra.setdefault("warnings", []).append(f"report.html not written: {e}")
    write_run(run.result, out)
    return out, report
