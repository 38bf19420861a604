"""The runner every head rung shares (linear probe, kNN, Tip-Adapter, and any registered later).

Protocol (recorded in every result's ``config``):
- full data: fit on ``train``, choose knobs on ``val``, refit on train + val, report on ``test``;
- few-shot: k labelled items per class from ``train`` (seeded), knobs chosen on min(k, 4) items per class from
  ``val``, **no refit for any head** — the final model of every head holds exactly the k items per class it was
  given (``fit_counts_``, recorded per setting), so the comparison between heads is on equal labels — repeated
  over seeds; the table shows mean ± std over seeds and a bootstrap interval over test items of the seed-averaged
  correctness;
- the test split never chooses anything.

The validation-free protocol (``selection="fixed"``, after CLAP, Silva-Rodríguez et al. 2024: a validation set
larger than the training shots is unrealistic) fits the same support sets (same seeds, same draws) but gives the
heads no validation data at all — the few-shot validation sample is not even drawn, and the full-data fit gets
train + val as its training items — and every head uses the fixed defaults of its paper. Each setting records
its ``selection``, ``chosen_by``, seed and a digest of its support set, so tables never mix protocols unseen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..cpu import small_fit_threads
from ..data.prompts import load_templates
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..hashing import json_digest
from ..metrics.bootstrap import bootstrap_ci
from ..metrics.classification import classification_metrics, per_item_topk_correct
from ..results import RunResult, data_provenance
from ..store import EmbeddingStore
from .base import SELECTIONS, HeadContext, Rung, RungInputs, RungOptions, create_rung, list_rungs
from .common import (
    chosen_knobs,
    encoder_cost,
    eval_split,
    evaluate,
    full_scores,
    prediction_rows,
    seen_in_training,
)
from .costs import ms_per_item, n_params, peak_rss_mb
from .zeroshot import zeroshot_classifier

FEW_SHOT_VAL_SHOTS = 4
#: what each selection protocol does, recorded in every result's config
PROTOCOLS = {
    "val": {"full": "fit train, choose knobs on val, refit train+val, report test",
            "few_shot": f"k per class from train (seeded draw k_shot(k, seed)), choose knobs on min(k, "
                        f"{FEW_SHOT_VAL_SHOTS}) per class from val, no refit (every head's final model holds exactly "
                        "the k per class), report test; mean and std over seeds"},
    "fixed": {"full": "fit train+val with the fixed defaults of the head's paper, no validation data, report test",
              "few_shot": "k per class from train (the same seeded draws as selection 'val'), fixed defaults, no "
                          "validation data read or drawn, report test; mean and std over seeds"},
}


def head_rung(method: str) -> Rung:
    """The registered rung ``method``, which must fit a head on frozen features."""
    rung = create_rung(method)
    if rung.make_head is None:
        raise EncoderlabError(f"rung {method!r} does not fit a head on embeddings",
                              f"use one of {', '.join(list_rungs(head=True))}")
    return rung


def check_few_shot(shots: Sequence[int], seeds: int, full: bool) -> list[int]:
    if not full and not shots:
        raise EncoderlabError("nothing to run: no --shots and --no-full", "give --shots 1,2,4,8,16 or drop --no-full")
    bad = [k for k in shots if int(k) < 1]
    if bad:
        raise EncoderlabError(f"--shots must be positive integers, got {bad[0]}", "write e.g. --shots 1,2,4,8,16")
    if seeds < 1:
        raise EncoderlabError(f"--seeds must be >= 1, got {seeds}", "use e.g. --seeds 3")
    return sorted({int(k) for k in shots})


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise EncoderlabError(f"selection={selection!r} is not a protocol",
                              'use "val" (knobs chosen on validation data) or "fixed" (the papers\' defaults, no '
                              "validation data)")
    return selection


def _fit(rung: Rung, ctx: HeadContext, emb: LabelledEmbeddings, tr: np.ndarray, va: np.ndarray | None) -> Any:
    assert rung.make_head is not None
    head = rung.make_head(ctx)
    has_val = va is not None and va.size > 0
    with small_fit_threads("cpu"):  # small problems: see encoderlab.cpu
        head.fit(emb.X[tr], emb.y[tr], emb.X[va] if has_val else None, emb.y[va] if has_val else None)
    if ctx.selection == "fixed":
        held = np.asarray(head.fit_counts_)
        given = np.bincount(emb.y[tr], minlength=emb.n_classes)[np.asarray(head.classes_).astype(np.int64)]
        if not np.array_equal(held, given):  # it held some out to choose on: not the validation-free protocol
            raise EncoderlabError(f"rung {rung.name!r} kept {int(held.sum())} of its {tr.size} training items under "
                                  "selection='fixed' (it set some aside to choose its knobs on)",
                                  "build its head with fixed knobs when HeadContext.selection is 'fixed'")
    return head


def _digest(emb: LabelledEmbeddings, idx: np.ndarray | None) -> str | None:
    """A short digest of which items a fit used (same digest = same support set, across rungs and protocols)."""
    return None if idx is None or idx.size == 0 else json_digest(sorted(str(i) for i in emb.ids[idx]))[:16]


def _record(head: Any, setting: str, tr: np.ndarray, va: np.ndarray | None, fit_s: float, rung: Rung,
            on: str, emb: LabelledEmbeddings, selection: str) -> dict[str, Any]:
    counts = np.asarray(head.fit_counts_)
    classes = emb.classes
    # validation-free: a head that still swept chose on its own training items (kNN's leave-one-out)
    knobs = chosen_knobs(head, rung.knobs, "train" if selection == "fixed" else on)
    return {"setting": setting, "selection": selection, "train_items": int(tr.size),
            "val_items": int(va.size) if va is not None else 0,
            "final_model_items": int(counts.sum()),
            "final_model_items_per_class": {classes[int(c)]: int(n) for c, n in zip(head.classes_, counts)},
            "fit_seconds": round(fit_s, 4), "train_digest": _digest(emb, tr), "val_digest": _digest(emb, va),
            **knobs}


@dataclass
class FewShotProtocol:
    """One head rung's run over the full split and the few-shot settings, accumulating what the result holds."""

    rung: Rung
    emb: LabelledEmbeddings
    context: Callable[[int, bool], HeadContext]
    n_boot: int
    seed: int
    selection: str = "val"
    metrics: dict[str, float] = field(default_factory=dict)
    costs: dict[str, Any] = field(default_factory=dict)
    settings: list[dict[str, Any]] = field(default_factory=list)
    preds: list[pd.DataFrame] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    per_item: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        emb = self.emb
        self.train, self.val, self.test = emb.index("train"), emb.index("val"), eval_split(emb, "test")
        if self.train.size == 0:
            raise EncoderlabError("the train split has no labelled items", "make splits with --split-ratios")
        self.notes += emb.notes()

    def fit(self, s: int, refit: bool, tr: np.ndarray, va: np.ndarray | None
            ) -> tuple[Any, float, np.ndarray, np.ndarray | None]:
        """A fitted head, its fit time, its scores on the test items, and the val items it chose on.

        Val items of a class with no item in ``tr`` are left out: no head fit on ``tr`` can predict that class, so
        they would add the same error to every candidate (and the heads refuse labels they were not fit on).
        """
        if va is not None:
            va = va[np.isin(self.emb.y[va], self.emb.y[tr])]
        t0 = time.perf_counter()
        head = _fit(self.rung, self.context(s, refit), self.emb, tr, va)
        fit_s = time.perf_counter() - t0
        return head, fit_s, full_scores(head, self.emb.X[self.test], self.emb.n_classes), va

    def full(self) -> Any:
        """Fit on train, choose on val, refit on train + val; report test. Validation-free: fit train + val."""
        emb, test = self.emb, self.test
        # validation-free: the labelled items of the refit model, none held out to choose on
        tr, va = (np.union1d(self.train, self.val), None) if self.selection == "fixed" else (self.train, self.val)
        head, fit_s, scores, va = self.fit(self.seed, True, tr, va)
        self.metrics.update(evaluate(emb.y[test], scores, emb.classes, self.n_boot, self.seed))
        self.costs["fit_seconds"] = round(fit_s, 4)
        record = _record(head, "full", tr, va, fit_s, self.rung, "val", emb, self.selection)
        self.settings.append({**record, "seed": self.seed})
        self.preds.append(prediction_rows(emb, test, scores, "full"))
        self.per_item["full"] = per_item_topk_correct(emb.y[test], scores, 1).astype(float)
        return head

    def few_shot(self, k: int, seeds: int) -> Any:
        """k per class from train over ``seeds`` samples, knobs on min(k, 4) per class from val, no refit.

        Validation-free: the same k-per-class samples (the train draw does not depend on the val draw), no val.
        """
        emb, yt = self.emb, self.emb.y[self.test]
        per_seed: list[dict[str, float]] = []
        correct = np.zeros(len(self.test))
        fit_times = []
        head = None
        for s in range(seeds):
            tr, note = emb.k_shot(k, s, "train")
            va = None
            if self.val.size and self.selection == "val":
                va = emb.k_shot(min(k, FEW_SHOT_VAL_SHOTS), s, "val")[0]
            if note and s == 0:
                self.notes.append(f"{k}-shot: {note}")
            head, fit_s, scores, va = self.fit(s, False, tr, va)
            fit_times.append(fit_s)
            per_seed.append(classification_metrics(yt, scores, emb.classes))
            correct += per_item_topk_correct(yt, scores, 1)
            record = _record(head, f"{k}-shot", tr, va, fit_s, self.rung, "k-shot-val", emb, self.selection)
            self.settings.append({**record, "seed": s, "top1": per_seed[-1]["top1"]})
            if s == 0:
                self.preds.append(prediction_rows(emb, self.test, scores, f"{k}-shot seed 0"))
        for name in ("top1", "top5", "balanced_accuracy", "macro_f1"):
            if name in per_seed[0]:
                vals = np.asarray([m[name] for m in per_seed])
                self.metrics[f"{k}-shot/{name}"] = float(vals.mean())
                self.metrics[f"{k}-shot/{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        self.per_item[f"{k}-shot"] = correct / seeds
        lo, hi = bootstrap_ci(correct / seeds, n_boot=self.n_boot, seed=self.seed)
        self.metrics[f"{k}-shot/top1_ci_low"], self.metrics[f"{k}-shot/top1_ci_high"] = lo, hi
        self.costs[f"{k}-shot/fit_seconds"] = round(float(np.mean(fit_times)), 4)
        return head

    def inference_costs(self, head: Any, encoder: Encoder, encoder_ms: float | None) -> None:
        Xt = self.emb.X[self.test]
        head_ms = ms_per_item(lambda: full_scores(head, Xt, self.emb.n_classes), len(self.test))
        self.costs["predict_ms_per_item"] = head_ms
        self.costs["encoder_ms_per_item"] = encoder_cost(encoder, self.emb, "test", encoder_ms)
        self.costs["predict_ms_per_item_with_encoder"] = round(head_ms + self.costs["encoder_ms_per_item"], 4)
        self.costs["trainable_params"] = n_params(head)
        self.costs["peak_rss_mb"] = peak_rss_mb()


def run_probe(
    encoder: Encoder,
    emb: LabelledEmbeddings,
    store: EmbeddingStore,
    *,
    method: str = "linear",
    shots: Sequence[int] = (),
    seeds: int = 3,
    full: bool = True,
    class_weight: str | None = None,
    templates: str | Sequence[str] = "clip80",
    class_names: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    encoder_ms: float | None = None,
    zero_shot_encoder: Encoder | None = None,
    selection: str = "val",
) -> RunResult:
    """Fit the head of rung ``method`` on frozen embeddings: full train split and/or k-shot samples over seeds.

    ``zero_shot_encoder`` builds the zero-shot classifier for heads that wrap one (default: ``encoder``).
    ``selection``: "val" (knobs chosen on validation data) or "fixed" (validation-free; see the module docstring).
    """
    rung = head_rung(method)
    ks = check_few_shot(shots, seeds, full)
    check_selection(selection)
    zs_encoder = zero_shot_encoder or encoder
    why = rung.unmet(zs_encoder, emb.dataset)
    if why is not None:  # before any fit: say what is missing and which heads would run
        usable = [n for n in list_rungs(head=True) if create_rung(n).unmet(zs_encoder, emb.dataset) is None]
        raise EncoderlabError(f"--method {rung.name} {why}; {zs_encoder.spec!r} encodes "
                              f"{'+'.join(zs_encoder.modalities)}",
                              f"use --method {' or '.join(usable)}" if usable else "use another encoder or dataset")
    template_list = load_templates(templates) if "dual" in rung.needs else []
    built: dict[str, Any] = {}

    def zero_shot() -> Any:  # built on first use, once, and shared by every fit of this run
        if "head" not in built:
            built["head"] = zeroshot_classifier(zs_encoder, emb.classes, store, template_list, class_names)[0]
        return built["head"]

    def context(s: int, refit: bool) -> HeadContext:
        return HeadContext(seed=s, refit=refit, class_weight=class_weight, selection=selection,
                           zero_shot_factory=zero_shot if "dual" in rung.needs else None)

    run = FewShotProtocol(rung, emb, context, n_boot, seed, selection)
    full_head = run.full() if full else None
    last = None
    for k in ks:
        last = run.few_shot(k, seeds)
    run.inference_costs(full_head if full_head is not None else last, encoder, encoder_ms)  # the full head if any
    config = {
        "method": rung.name, "encoder": encoder.spec, "shots": ks, "seeds": seeds,
        "full": full, "class_weight": class_weight, "seed": seed, "n_boot": n_boot, "modality": emb.modality,
        "knobs": list(rung.knobs), "selection": selection,
        "protocol": PROTOCOLS[selection],
        "notes": run.notes,
    }
    if template_list:
        config["templates"] = templates if isinstance(templates, str) else "list"
    data = data_provenance(emb.dataset, {split: list(emb.ids[idx]) for split, idx in
                                         (("train", run.train), ("val", run.val), ("test", run.test))})
    # a head on features of a model trained on these test items inherits that optimism (tower features do not)
    keys = [] if emb.keys is None else list(emb.keys[run.test])
    data["seen_in_training"] = seen = seen_in_training(encoder, keys, emb.modality, "test items")
    if seen["warning"]:
        config["notes"].append(seen["warning"])
    return RunResult(f"probe-{rung.name}", run.metrics, run.costs, config, data,
                     primary="top1" if full else f"{max(ks)}-shot/top1",
                     predictions=pd.concat(run.preds, ignore_index=True) if run.preds else None,
                     extra={"settings": run.settings}, per_item=run.per_item)


def run_head_rung(rung: Rung, inputs: RungInputs, options: RungOptions) -> RunResult:
    """``Rung.run`` of every head rung: read the features the rung allows, run the shared protocol."""
    encoder, emb, features = inputs.features_for(rung)
    result = run_probe(encoder, emb, inputs.store, method=rung.name, shots=options.shots, seeds=options.seeds,
                       full=options.full, class_weight=options.class_weight, templates=options.templates,
                       class_names=options.class_names, n_boot=options.n_boot, seed=options.seed,
                       encoder_ms=options.encoder_ms, zero_shot_encoder=inputs.encoder, selection=options.selection)
    result.config["features"] = features
    return result
