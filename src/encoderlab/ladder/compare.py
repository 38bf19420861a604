"""The frozen rungs side by side: zero-shot, kNN, linear probe, Tip-Adapter (few-shot and full) and retrieval.

One ``Prepared`` object feeds every classification rung, so they share rows, splits and cached embeddings; each
row of the table carries its interval, its cost, and a paired bootstrap against zero-shot on the same test items.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..metrics.bootstrap import paired_bootstrap
from ..store import EmbeddingStore
from .classify import encoder_cost, run_probe, run_zeroshot
from .prepare import prepare
from .retrieve import run_retrieval
from .runs import RunResult, write_run

RUNGS = ("zeroshot", "knn", "linear", "tip", "retrieval")


@dataclass
class Comparison:
    results: dict[str, RunResult]
    rows: list[dict[str, Any]]
    retrieval: RunResult | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        metrics: dict[str, Any] = {}
        costs: dict[str, Any] = {}
        for name, r in self.results.items():
            saved = r.to_json()
            metrics.update({f"{name}/{k}": v for k, v in saved["metrics"].items()})
            costs.update({f"{name}/{k}": v for k, v in saved["costs"].items()})
        first = next(iter(self.results.values()))
        return {"task": "compare", "metrics": metrics, "costs": costs, "table": self.rows,
                "config": {name: r.config for name, r in self.results.items()}, "data": first.data,
                "skipped_rungs": self.skipped}


def run_comparison(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    rungs: Sequence[str] = RUNGS,
    shots: Sequence[int] = (1, 4, 16),
    seeds: int = 3,
    templates: str | Sequence[str] = "clip80",
    class_names: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
    probe_features: str = "auto",
) -> Comparison:
    """Run the chosen rungs on one dataset and encoder; write each rung's run directory under ``out_dir``.

    ``probe_features``: which frozen features kNN and the linear probe read. For an encoder built on another one's
    features (an aligned pair of towers), "auto" means the image tower's own features, which the projection head
    can only lose information from; "joint" forces the joint embedding space. Tip-Adapter always works in the joint
    space, since it mixes image affinities with the zero-shot text classifier.
    """
    if probe_features not in ("auto", "joint", "tower"):
        raise EncoderlabError(f"unknown probe_features {probe_features!r}", "use auto, joint or tower")
    unknown = [r for r in rungs if r not in RUNGS]
    if unknown:
        raise EncoderlabError(f"unknown rung {unknown[0]!r}", f"choose from {', '.join(RUNGS)}")
    dual = "image" in encoder.modalities and "text" in encoder.modalities
    skipped = {r: "needs a dual encoder (image and text towers)" for r in rungs
               if r in ("zeroshot", "tip", "retrieval") and not dual}
    prep = prepare(encoder, dataset, store, progress=progress)
    enc_ms = encoder_cost(encoder, prep, "test", None)
    results: dict[str, RunResult] = {}
    common: dict[str, Any] = {"n_boot": n_boot, "seed": seed, "encoder_ms": enc_ms}
    if "zeroshot" in rungs and dual:
        results["zeroshot"] = run_zeroshot(encoder, prep, store, templates=templates, class_names=class_names, **common)
    source = encoder.feature_source(prep.modality)  # type: ignore[arg-type]
    probe_encoder, probe_prep = encoder, prep
    if source is not None and probe_features in ("auto", "tower"):
        probe_encoder = source[0]
        probe_prep = prepare(probe_encoder, dataset, store, modality=prep.modality, progress=progress)
        if not np.array_equal(probe_prep.ids, prep.ids):  # paired comparisons need the very same test items
            raise EncoderlabError("tower and joint features cover different items", "run with probe_features='joint'")
    elif probe_features == "tower":
        raise EncoderlabError(f"{encoder.spec!r} is not built on another encoder's features",
                              "use probe_features='auto' or 'joint'")
    for method in ("knn", "linear", "tip"):
        if method in rungs and method not in skipped:
            enc, pp = (encoder, prep) if method == "tip" else (probe_encoder, probe_prep)
            results[method] = run_probe(enc, pp, store, method=method, shots=shots, seeds=seeds,
                                        templates=templates, class_names=class_names, **common)
            results[method].config["features"] = "tower" if enc is not encoder else "joint"
    retrieval = None
    if "retrieval" in rungs and dual:
        if dataset.has_texts:
            retrieval = run_retrieval(encoder, dataset, store, split="test", progress=progress, **common)
            results["retrieval"] = retrieval
        else:
            skipped["retrieval"] = "the dataset has no captions"
    if out_dir is not None:
        for name, r in results.items():
            write_run(r, Path(out_dir) / name)
    return Comparison(results, comparison_rows(results), retrieval, skipped)


def comparison_rows(results: Mapping[str, RunResult]) -> list[dict[str, Any]]:
    """One row per (rung, setting) with top-1 and its interval, std over seeds, Δ vs zero-shot (paired), costs."""
    base = results.get("zeroshot")
    base_items = base.per_item.get("zeroshot") if base is not None else None
    rows: list[dict[str, Any]] = []
    for name, r in results.items():
        if name == "retrieval":
            continue
        m, c = r.metrics, r.costs
        settings = ["zeroshot"] if name == "zeroshot" else list(r.per_item)
        for setting in settings:
            prefix = "" if setting in ("zeroshot", "full") else f"{setting}/"
            row: dict[str, Any] = {
                "rung": name,
                "setting": "templates" if name == "zeroshot" else setting,
                "features": r.config.get("features", "joint"),
                "top1": m.get(f"{prefix}top1"),
                "top1_std": m.get(f"{prefix}top1_std"),
                "top1_ci_low": m.get(f"{prefix}top1_ci_low"),
                "top1_ci_high": m.get(f"{prefix}top1_ci_high"),
                "balanced_accuracy": m.get(f"{prefix}balanced_accuracy"),
                "macro_f1": m.get(f"{prefix}macro_f1"),
                "fit_seconds": c.get(f"{prefix}fit_seconds", c.get("fit_seconds")),
                "predict_ms_per_item": c.get("predict_ms_per_item"),
                "predict_ms_per_item_with_encoder": c.get("predict_ms_per_item_with_encoder"),
                "trainable_params": c.get("trainable_params"),
            }
            items = r.per_item.get(setting)
            if base_items is not None and items is not None and name != "zeroshot":
                test = paired_bootstrap(items, base_items, seed=0)
                row.update(delta_vs_zeroshot=test["diff"], delta_ci_low=test["ci_low"],
                           delta_ci_high=test["ci_high"], delta_p_value=test["p_value"])
            rows.append(row)
    return rows


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_comparison(comp: Comparison) -> str:
    """The comparison as text tables: classification rungs, then retrieval."""
    header = ["rung", "setting", "features", "top-1 [95% CI]", "± std", "bal. acc", "macro-F1", "Δ vs zero-shot (p)",
              "fit s", "ms/item head", "ms/item +encoder", "params"]
    lines = []
    for r in comp.rows:
        ci = f"{_fmt(r['top1'])} [{_fmt(r['top1_ci_low'])}, {_fmt(r['top1_ci_high'])}]"
        delta = "-"
        if r.get("delta_vs_zeroshot") is not None:
            delta = f"{r['delta_vs_zeroshot']:+.3f} (p={r['delta_p_value']:.3f})"
        lines.append([r["rung"], r["setting"], r["features"], ci, _fmt(r["top1_std"]), _fmt(r["balanced_accuracy"]),
                      _fmt(r["macro_f1"]), delta, _fmt(r["fit_seconds"], 2), _fmt(r["predict_ms_per_item"], 4),
                      _fmt(r["predict_ms_per_item_with_encoder"], 2), _fmt(r["trainable_params"])])
    out = [_table(lines, header)]
    if comp.retrieval is not None:
        m = comp.retrieval.metrics
        rrows = []
        for d in ("i2t", "t2i"):
            rrows.append([d] + [f"{_fmt(m[f'{d}_R@{k}'])} [{_fmt(m[f'{d}_R@{k}_ci_low'])}, "
                                f"{_fmt(m[f'{d}_R@{k}_ci_high'])}]" for k in (1, 5, 10)]
                         + [_fmt(m[f"{d}_mrr"]), _fmt(m[f"{d}_median_rank"], 1), _fmt(m[f"{d}_chance_R@1"], 4),
                            str(m[f"{d}_queries"])])
        out.append(_table(rrows, ["retrieval", "R@1 [95% CI]", "R@5", "R@10", "MRR", "median rank", "chance R@1",
                                  "queries"]))
    for rung, why in comp.skipped.items():
        out.append(f"skipped {rung}: {why}")
    return "\n\n".join(out)


def _table(rows: list[list[str]], header: list[str]) -> str:
    cells = [header] + rows
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)
