"""``filter_compare``: does filtering help, or does it merely shrink the data? One rung, one budget, three train sets.

The rung is LiT-style alignment (``train.align``: projection heads on two frozen towers, cached features, so each
arm trains in seconds). It is trained with the same settings and seed on

- ``all``: every train pair;
- ``filtered``: the train pairs the filter keeps (the filter reads the train split only);
- ``random``: a seeded random subset of the train pairs of exactly the filtered size (the control that tells
  filtering from shrinking);

with heads chosen on the untouched val split, and all three are scored on the untouched test split: image->text and
text->image R@1 / R@5 with bootstrap intervals, and paired bootstraps (the same test queries resampled together) of
filtered vs random and filtered vs all.

Budget: ``"steps"`` (default, DataComp's protocol: a fixed number of samples seen) gives the smaller train sets
proportionally more epochs so every arm takes the same optimizer steps; ``"epochs"`` gives every arm the same
epochs (the smaller sets then train for fewer steps). Early stopping is off (patience = epochs) so every arm uses
its whole budget; the heads of the best val epoch are kept, as ``align`` always does.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..atomic import atomic_write_bytes
from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.embeddings import caption_pairs, image_embeddings, text_embeddings
from ..metrics.bootstrap import bootstrap_ci, paired_bootstrap
from ..metrics.retrieval import per_query_hits, retrieval_ranks
from ..results import RunResult, data_provenance, write_run
from ..store import EmbeddingStore
from .pairs import check_captions, check_dual
from .rules import FilterConfig
from .run import FilterResult, filter_dataset, kept_dataset

ARMS = ("all", "filtered", "random")
METRICS = ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")
COMPARISONS = (("filtered", "random"), ("filtered", "all"))
BUDGETS = ("steps", "epochs")
PLOT_NAME = "compare.png"


@dataclass
class ArmResult:
    """One trained arm: its train set size, budget, where its heads are, and its per-test-query hits."""

    name: str
    pairs: int
    images: int
    epochs: int
    steps: int
    model_dir: str
    best_epoch: int
    fit_seconds: float
    hits: dict[str, np.ndarray] = field(repr=False, default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    encoder: Encoder | None = field(repr=False, default=None)


@dataclass
class CompareResult:
    run: RunResult
    arms: dict[str, ArmResult]
    paired: list[dict[str, Any]]
    filter: FilterResult


def default_towers(encoder: Encoder) -> tuple[str, str]:
    """The frozen towers the rung aligns: an aligned pair's own towers, else the dual encoder itself for both."""
    towers = []
    for modality in ("image", "text"):
        source = encoder.feature_source(modality)  # type: ignore[arg-type]
        towers.append(source.base.spec if source is not None else encoder.spec)
    return towers[0], towers[1]


def random_subset(train: Dataset, pairs: pd.DataFrame, n: int, seed: int) -> Dataset:
    """``train`` with a seeded uniform sample of ``n`` of its scored pairs (``pairs`` as ``filter_dataset`` made)."""
    pool = np.flatnonzero(pairs["score"].notna().to_numpy())
    if n > len(pool):
        raise ValueError(f"cannot draw {n} random pairs from {len(pool)} scored ones")
    chosen = np.zeros(len(pairs), bool)
    chosen[np.random.default_rng([seed, 2]).choice(pool, size=n, replace=False)] = True
    return kept_dataset(train, np.arange(len(train)), pairs.assign(kept=chosen))


def arm_epochs(epochs: int, budget: str, pairs: int, pairs_all: int, batch_size: int) -> int:
    """Epochs of an arm of ``pairs`` pairs: the same as the full set's (``epochs``) or the same optimizer steps."""
    if budget == "epochs" or pairs >= pairs_all:
        return epochs
    steps_all = epochs * math.ceil(pairs_all / batch_size)
    return max(epochs, math.ceil(steps_all / math.ceil(max(pairs, 1) / batch_size)))


def test_hits(encoder: Encoder, test: Dataset, store: EmbeddingStore) -> tuple[dict[str, np.ndarray], int, int]:
    """Per-query hits of every ``METRICS`` entry on the test pairs; also the image and caption query counts."""
    emb = image_embeddings(encoder, test, store, progress=False)
    texts, pair_img, pair_txt = caption_pairs(test, emb.rows)
    if not texts:
        raise EncoderlabError(f"the test split of {test.source!r} has no captioned image", "use a captioned test split")
    T = text_embeddings(encoder, texts, store, progress=False)
    i2t, t2i = retrieval_ranks(emb.X, T, pair_img, pair_txt)
    hits = {f"{d}_R@{k}": per_query_hits(r, k).astype(np.float64) for d, r in (("i2t", i2t), ("t2i", t2i))
            for k in (1, 5)}
    return hits, len(emb.X), len(texts)


def _splits(dataset: Dataset, seed: int) -> tuple[Dataset, Dataset, Dataset, Dataset]:
    ds = dataset.ensure_validation(seed=seed)
    missing = [s for s in ("train", "val", "test") if s not in ds.splits]
    if missing:
        raise EncoderlabError(f"filter-compare needs train, val and test splits; {dataset.source!r} has "
                              f"{ds.splits} (missing {missing})",
                              "give the data a test split (a split column, or --split-ratios train=0.8,val=0.1,"
                              "test=0.1); the test split is the held-out set no filter touches")
    return ds, ds.select_split("train"), ds.select_split("val"), ds.select_split("test")


def _train_arm(name: str, train: Dataset, val: Dataset, vision: str, text: str, out: Path, store: EmbeddingStore,
               epochs: int, settings: dict[str, Any], pairs: int, progress: bool, device: str,
               precision: str | None) -> ArmResult:
    from ..encoders import create_encoder
    from ..train.align import align_encoders

    r = align_encoders(vision, text, train, val, out / "arms" / name, store=store, epochs=epochs, patience=epochs,
                       reuse=True, progress=progress, device=device, precision=precision, **settings)
    counts = r.config.get("train", {}).get("counts", {})
    steps = epochs * math.ceil(max(int(counts.get("train_pairs", pairs)), 1) / settings["batch_size"])
    return ArmResult(name, int(counts.get("train_pairs", pairs)), int(counts.get("train_images", 0)), epochs, steps,
                     str(r.path), r.best_epoch, r.fit_seconds,
                     encoder=create_encoder(f"local:{r.path}", device=device, precision=precision))


def filter_compare(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, out_dir: str | Path, *,
                   config: FilterConfig | None = None, vision: str | None = None, text: str | None = None,
                   epochs: int = 10, budget: str = "steps", dim: int = 256, batch_size: int = 256, lr: float = 1e-3,
                   seed: int = 0, n_boot: int = 1000, progress: bool = True, device: str = "auto",
                   precision: str | None = None) -> CompareResult:
    """Filter the train split with ``encoder`` and ``config``, train the rung on all / filtered / random train
    pairs, and compare them on the test split (see the module docstring); writes everything under ``out_dir``."""
    from .output import write_filter

    if budget not in BUDGETS:
        raise EncoderlabError(f"unknown budget {budget!r}", f"use one of {', '.join(BUDGETS)}")
    check_dual(encoder)
    t0 = time.perf_counter()
    ds, train, val, test = _splits(dataset, seed)
    check_captions(test)
    out = Path(out_dir).expanduser()
    vision, text = (vision or default_towers(encoder)[0]), (text or default_towers(encoder)[1])
    filt = filter_dataset(encoder, ds, store, config, split="train", progress=progress)
    write_filter(filt, out / "filter", store)
    sets = {"all": train, "filtered": filt.dataset.select_split("train"),
            "random": random_subset(train, filt.pairs, filt.kept_pairs, seed)}
    n_all = int(filt.pairs["score"].notna().sum())
    sizes = {"all": n_all, "filtered": filt.kept_pairs, "random": filt.kept_pairs}
    settings = {"dim": dim, "batch_size": batch_size, "lr": lr, "seed": seed}
    arms: dict[str, ArmResult] = {}
    queries = None
    for name in ARMS:
        e = arm_epochs(epochs, budget, sizes[name], n_all, batch_size)
        arm = _train_arm(name, sets[name], val, vision, text, out, store, e, settings, sizes[name], progress, device,
                         precision)
        assert arm.encoder is not None
        arm.hits, n_img, n_txt = test_hits(arm.encoder, test, store)
        if queries is not None and queries != (n_img, n_txt):  # the same towers read the same test files
            raise RuntimeError(f"arm {name} was scored on {n_img} images / {n_txt} captions, the others on {queries}")
        queries = (n_img, n_txt)
        for m, h in arm.hits.items():
            lo, hi = bootstrap_ci(h, n_boot=n_boot, seed=seed)
            arm.metrics.update({m: float(h.mean()), f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        arms[name] = arm
    paired = [{"a": a, "b": b, "metric": m, **paired_bootstrap(arms[a].hits[m], arms[b].hits[m], n_boot=n_boot,
                                                                 seed=seed)}
              for a, b in COMPARISONS for m in METRICS]
    run = _run_result(ds, filt, arms, paired, queries or (0, 0), {"vision": vision, "text": text, "epochs": epochs,
                      "budget": budget, **settings, "n_boot": n_boot}, time.perf_counter() - t0)
    _write_outputs(run, arms, paired, filt, out)
    return CompareResult(run, arms, paired, filt)


def _run_result(ds: Dataset, filt: FilterResult, arms: dict[str, ArmResult], paired: list[dict[str, Any]],
                queries: tuple[int, int], settings: dict[str, Any], seconds: float) -> RunResult:
    metrics: dict[str, Any] = {"test_images": queries[0], "test_captions": queries[1]}
    for name, arm in arms.items():
        metrics.update({f"{name}_{k}": v for k, v in arm.metrics.items()})
        metrics[f"{name}_pairs"] = arm.pairs
    for p in paired:
        base = f"{p['a']}_vs_{p['b']}_{p['metric']}"
        metrics.update({f"{base}_diff": p["diff"], f"{base}_ci_low": p["ci_low"], f"{base}_ci_high": p["ci_high"],
                        f"{base}_p": p["p_value"]})
    costs = {"seconds": round(seconds, 3), **{f"{n}_fit_seconds": round(a.fit_seconds, 3) for n, a in arms.items()}}
    config = {"method": "filter-compare", "encoder": filt.encoder, "rung": "align (LiT-style heads)", **settings,
              "filter": {**filt.summary(), "settings": dataclasses.asdict(filt.config)},
              "protocol": "filter on train only; heads chosen on val; all arms scored once on the same test queries"}
    table = [{"arm": n, "pairs": a.pairs, "images": a.images, "epochs": a.epochs, "steps": a.steps,
              "best_epoch": a.best_epoch, "model_dir": a.model_dir, **a.metrics} for n, a in arms.items()]
    data = data_provenance(ds, {"test": ds.select_split("test").table["id"].astype(str).tolist()})
    return RunResult("filter-compare", metrics, costs, config, data, primary="filtered_vs_random_i2t_R@1_diff",
                     extra={"table": table, "paired": paired, "outputs": [PLOT_NAME, "report.html", "filter/"]})


def bar_plot(arms: dict[str, ArmResult]) -> bytes | None:
    """Grouped bars: each metric, one bar per arm, with its 95% interval."""
    try:
        from matplotlib.figure import Figure

        from ..report.plots import png_bytes
    except ImportError:
        return None
    fig = Figure(figsize=(8, 3.6), dpi=100, layout="constrained")
    ax = fig.subplots()
    width = 0.8 / len(arms)
    for k, (name, arm) in enumerate(arms.items()):
        x = np.arange(len(METRICS)) + (k - (len(arms) - 1) / 2) * width
        v = np.array([arm.metrics[m] for m in METRICS])
        lo = v - np.array([arm.metrics[f"{m}_ci_low"] for m in METRICS])
        hi = np.array([arm.metrics[f"{m}_ci_high"] for m in METRICS]) - v
        ax.bar(x, v, width, yerr=[np.clip(lo, 0, None), np.clip(hi, 0, None)], capsize=3,
               label=f"{name} ({arm.pairs} pairs)")
    ax.set_xticks(np.arange(len(METRICS)), METRICS)
    ax.set_ylabel("test recall")
    ax.set_ylim(0, 1)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("same rung, same budget: all vs filtered vs random subset (bars: 95% interval)", fontsize=10)
    return png_bytes(fig)


def _write_outputs(run: RunResult, arms: dict[str, ArmResult], paired: list[dict[str, Any]], filt: FilterResult,
                   out: Path) -> None:
    from ..report import render_report
    from .tables import compare_note

    png = bar_plot(arms)
    if png is not None:
        atomic_write_bytes(out / PLOT_NAME, png)
    # the bar plot stays a file of its own (compare.png): the report has no bar-chart section to inline it in
    doc = {"title": f"encoderlab filter-compare: {filt.dataset.source}", "encoder": filt.encoder,
           "dataset": filt.dataset.source, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "note_md": compare_note(run, arms, paired), "note_title": "Filter comparison",
           "histograms": [{"title": "train pair scores (cosine of normalized embeddings)",
                           "values": filt.pairs["score"].dropna().astype(float).tolist(),
                           "cut": filt.cuts.get("cut"), "xlabel": "pair score"}]}
    render_report(doc, out / "report.html")
    write_run(run, out)
