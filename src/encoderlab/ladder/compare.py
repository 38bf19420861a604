"""The rungs side by side: every registered rung that can run on one encoder and dataset, on the same items.

One ``RungInputs`` feeds every rung, so they share rows, splits (a validation part carved once when the data has
none) and cached embeddings; each classification row carries its interval, its cost, and a paired bootstrap
against zero-shot on the same test items. The comparison is itself a ``RunResult`` (task "compare") whose run
directory holds one sub-directory per rung.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.labelled import validation_note
from ..metrics.bootstrap import paired_bootstrap
from ..results import RunResult, data_provenance, format_comparison, write_run
from ..rungs import RungInputs, RungOptions, create_rung, encoder_cost, list_rungs
from ..store import EmbeddingStore

#: the rungs ``compare`` runs by default: every registered frozen or shallow rung (levels 1-2)
DEFAULT_MAX_LEVEL = 2


@dataclass
class Comparison:
    """Per-rung results, the comparison rows, what was skipped and why, as one ``RunResult`` (``result``)."""

    results: dict[str, RunResult]
    rows: list[dict[str, Any]]
    skipped: dict[str, str] = field(default_factory=dict)
    result: RunResult | None = None

    @property
    def retrieval(self) -> RunResult | None:
        return next((r for name, r in self.results.items() if create_rung(name).task == "retrieval"), None)

    def to_json(self) -> dict[str, Any]:
        assert self.result is not None
        return self.result.to_json()

    def format(self) -> str:
        notes = (self.result.config.get("notes", []) if self.result is not None else [])
        retrieval = self.retrieval.metrics if self.retrieval is not None else None
        return format_comparison(self.rows, retrieval, self.skipped, notes)


def default_rungs() -> list[str]:
    return [r for r in list_rungs() if create_rung(r).level <= DEFAULT_MAX_LEVEL]


def run_comparison(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    rungs: Sequence[str] | None = None,
    shots: Sequence[int] = (1, 4, 16),
    seeds: int = 3,
    templates: str | Sequence[str] = "clip80",
    class_names: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    out_dir: str | Path | None = None,
    probe_features: str = "auto",
    selection: str = "val",
) -> Comparison:
    """Run the chosen rungs (default: every frozen and shallow rung) and write each one's run directory.

    ``probe_features``: which frozen features head rungs that allow it (kNN, linear) read. For an encoder built on
    another one's features (an aligned pair of towers), "auto" means the tower's own features, which the
    projection head can only lose information from; "joint" forces the joint space. Tip-Adapter always works in
    the joint space, since it mixes image affinities with the zero-shot text classifier.
    """
    names = list(default_rungs() if rungs is None else rungs)
    chosen = [create_rung(n) for n in names]  # unknown names fail here, with close matches
    if not chosen:
        raise EncoderlabError("no rung to run", f"choose from {', '.join(list_rungs())}")
    inputs = RungInputs(encoder, dataset, store, probe_features=probe_features, progress=progress)
    skipped = {r.name: why for r in chosen if (why := r.unmet(encoder, inputs.dataset)) is not None}
    runnable = [r for r in chosen if r.name not in skipped]
    options = RungOptions(shots=shots, seeds=seeds, templates=templates, class_names=class_names, n_boot=n_boot,
                          seed=seed, progress=progress, selection=selection)
    if any(r.task == "classification" for r in runnable):
        options.encoder_ms = encoder_cost(encoder, inputs.labelled(), "test", None)
    results: dict[str, RunResult] = {}
    for rung in sorted(runnable, key=lambda r: (r.level, r.rank, r.name)):
        results[rung.name] = rung.run(inputs, options)
    rows = comparison_rows(results, n_boot=n_boot)
    if any(r.task == "classification" for r in runnable):
        notes = inputs.labelled().notes()
    else:
        notes = [n for n in [validation_note(inputs.dataset.split_info)] if n]
    for r in results.values():  # warnings of any rung (e.g. items the model was trained on) belong on the whole table
        notes += [n for n in r.config.get("notes", []) if n.startswith("warning:") and n not in notes]
    comp = Comparison(results, rows, skipped)
    comp.result = comparison_result(encoder, inputs.dataset, comp, names, options, probe_features, notes)
    if out_dir is not None:
        for name, r in results.items():
            write_run(r, Path(out_dir) / name)
        write_run(comp.result, out_dir)
    return comp


def comparison_result(encoder: Encoder, dataset: Dataset, comp: Comparison, asked: list[str], options: RungOptions,
                      probe_features: str, notes: list[str]) -> RunResult:
    """The comparison as one result: metrics and costs as ``rung/name``, the table rows, the rungs' configs."""
    metrics: dict[str, Any] = {}
    costs: dict[str, Any] = {}
    for name, r in comp.results.items():
        saved = r.to_json()
        metrics.update({f"{name}/{k}": v for k, v in saved["metrics"].items()})
        costs.update({f"{name}/{k}": v for k, v in saved["costs"].items()})
    config = {"encoder": encoder.spec, "rungs": asked, "shots": list(options.shots), "seeds": options.seeds,
              "templates": options.templates if isinstance(options.templates, str) else "list",
              "n_boot": options.n_boot, "seed": options.seed, "probe_features": probe_features,
              "selection": options.selection,
              "per_rung": {name: r.config for name, r in comp.results.items()}, "notes": notes}
    primary = next((f"{n}/{r.primary}" for n, r in comp.results.items()), "")
    return RunResult("compare", metrics, costs, config, data_provenance(dataset), primary=primary,
                     extra={"table": comp.rows, "skipped_rungs": comp.skipped, "rung_dirs": list(comp.results)})


def comparison_rows(results: Mapping[str, RunResult], n_boot: int = 1000) -> list[dict[str, Any]]:
    """One row per (classification rung, setting): top-1 and interval, std over seeds, Δ vs zero-shot, costs.

    The Δ is a paired bootstrap (``n_boot`` draws) on the same test items; its p-value cannot resolve below
    ``1 / n_boot``, which the row records as ``delta_n_boot`` so the table prints ``p<0.001`` rather than ``p=0.000``.
    """
    base = results.get("zeroshot")
    base_items = base.per_item.get("zeroshot") if base is not None else None
    rows: list[dict[str, Any]] = []
    for name, r in results.items():
        if create_rung(name).task != "classification":
            continue
        m, c = r.metrics, r.costs
        for setting in r.per_item:
            prefix = "" if setting in ("zeroshot", "full") else f"{setting}/"
            row: dict[str, Any] = {
                "rung": name,
                "setting": "templates" if setting == "zeroshot" else setting,
                "features": r.config.get("features", "joint"),
                "selection": r.config.get("selection", "-"),  # zero-shot chooses nothing on labels
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
            if base_items is not None and items is not None and r is not base:
                test = paired_bootstrap(items, base_items, n_boot=n_boot, seed=0)
                row.update(delta_vs_zeroshot=test["diff"], delta_ci_low=test["ci_low"],
                           delta_ci_high=test["ci_high"], delta_p_value=test["p_value"], delta_n_boot=n_boot)
            rows.append(row)
    return rows
