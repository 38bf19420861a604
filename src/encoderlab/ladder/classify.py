"""Classification rungs on cached embeddings: zero-shot (prompt ensembles) and probes (linear, kNN, Tip-Adapter).

Protocol (recorded in every result's ``config``):
- full data: fit on ``train``, choose hyper-parameters on ``val``, refit on train + val, report on ``test``;
- few-shot: k labelled items per class from ``train`` (seeded), hyper-parameters chosen on min(k, 4) items per class
  from ``val``, no refit (so the labels used are exactly what the protocol says), repeated over seeds; the table
  shows mean ± std over seeds and a bootstrap interval over test items of the seed-averaged correctness;
- the test split never chooses anything.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..cpu import small_fit_threads
from ..data.prompts import class_display_names, class_prompts, load_templates
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..features import text_embeddings
from ..heads.zeroshot import ZeroShotClassifier
from ..metrics.bootstrap import bootstrap_ci, classification_intervals
from ..metrics.classification import classification_metrics, per_item_topk_correct
from ..store import EmbeddingStore
from .costs import encoder_ms_per_item, ms_per_item, n_params, peak_rss_mb
from .prepare import Prepared
from .runs import RunResult, data_provenance

METHODS = ("linear", "knn", "tip")
FEW_SHOT_VAL_SHOTS = 4


# ---------------------------------------------------------------------------------------------------- helpers


def full_scores(head: Any, X: np.ndarray, n_classes: int) -> np.ndarray:
    """Class scores in the dataset's class order; classes the head never saw (absent from its training) get -inf."""
    scorer = getattr(head, "decision_function", None) or head.predict_proba  # kNN has vote shares only
    raw = np.asarray(scorer(X), dtype=np.float64)
    if raw.ndim == 1:  # a binary head returns one column
        raw = np.stack([-raw, raw], axis=1)
    classes = np.asarray(head.classes_).astype(np.int64)
    if len(classes) == n_classes and np.array_equal(classes, np.arange(n_classes)):
        return raw
    out = np.full((X.shape[0], n_classes), -np.inf)
    out[:, classes] = raw
    return out


def _evaluate(y: np.ndarray, scores: np.ndarray, classes: list[str], n_boot: int, seed: int) -> dict[str, float]:
    metrics = classification_metrics(y, scores, classes)
    metrics.update(classification_intervals(y, scores, len(classes), n_boot=n_boot, seed=seed))
    return metrics


def _predictions(prep: Prepared, idx: np.ndarray, scores: np.ndarray, setting: str, k: int = 5) -> pd.DataFrame:
    """One row per test item: id, label, prediction, and the top-k class names with their scores."""
    kk = min(k, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :kk]
    cls = np.asarray(prep.classes, dtype=object)
    return pd.DataFrame({
        "setting": setting,
        "id": prep.ids[idx],
        "label": cls[prep.y[idx]],
        "prediction": cls[top[:, 0]],
        "correct": prep.y[idx] == top[:, 0],
        "topk_labels": [list(cls[r]) for r in top],
        "topk_scores": [list(np.round(scores[i, r].astype(float), 5)) for i, r in enumerate(top)],
    })


def _eval_split(prep: Prepared, split: str) -> np.ndarray:
    idx = prep.index(split)
    if idx.size == 0:
        raise EncoderlabError(f"split {split!r} has no labelled items", "choose another --split")
    return idx


def encoder_cost(encoder: Encoder, prep: Prepared, split: str, given: float | None) -> float:
    if given is not None:
        return given
    mask = np.zeros(len(prep.dataset), dtype=bool)
    mask[prep.rows[prep.index(split, labelled=False)]] = True
    return encoder_ms_per_item(encoder, prep.dataset.subset(mask), prep.modality)


# ---------------------------------------------------------------------------------------------------- zero-shot


def zeroshot_classifier(
    encoder: Encoder, classes: Sequence[str], store: EmbeddingStore, templates: Sequence[str],
    class_names: Mapping[str, str] | None = None, progress: bool = False,
) -> tuple[ZeroShotClassifier, np.ndarray, list[str]]:
    """A zero-shot head from the prompt embeddings (cached in the store); also returns ``[C, T, d]`` prompt embeddings."""
    if "text" not in encoder.modalities or "image" not in encoder.modalities:
        raise EncoderlabError(
            f"zero-shot needs a dual encoder with image and text towers; {encoder.spec!r} has only "
            f"{'+'.join(encoder.modalities)}",
            "use `encoderlab probe` (linear, kNN) for single-tower encoders, or align one with `encoderlab align`",
        )
    names = class_display_names(list(classes), class_names)
    prompts = class_prompts(names, templates)
    flat = [p for row in prompts for p in row]
    emb = text_embeddings(encoder, flat, store, progress=progress).reshape(len(classes), len(templates), -1)
    kind = encoder.score_kind if encoder.score_kind in ("softmax", "sigmoid") else "softmax"
    head = ZeroShotClassifier(kind, encoder.logit_scale, encoder.logit_bias).fit(emb, list(range(len(classes))))
    return head, emb, names


def run_zeroshot(
    encoder: Encoder,
    prep: Prepared,
    store: EmbeddingStore,
    *,
    templates: str | Sequence[str] = "clip80",
    class_names: Mapping[str, str] | None = None,
    split: str = "test",
    compare_templates: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    encoder_ms: float | None = None,
) -> RunResult:
    """Zero-shot classification of ``split`` with a prompt ensemble; optionally every template alone as well."""
    template_list = load_templates(templates)
    t0 = time.perf_counter()
    head, emb, names = zeroshot_classifier(encoder, prep.classes, store, template_list, class_names)
    fit_seconds = time.perf_counter() - t0
    idx = _eval_split(prep, split)
    X, y = prep.X[idx], prep.y[idx]
    scores = head.decision_function(X)
    metrics = _evaluate(y, scores, prep.classes, n_boot, seed)
    costs = {
        "fit_seconds": round(fit_seconds, 4),
        "predict_ms_per_item": ms_per_item(lambda: head.decision_function(X), len(idx)),
        "trainable_params": 0,
    }
    costs["encoder_ms_per_item"] = encoder_cost(encoder, prep, split, encoder_ms)
    costs["predict_ms_per_item_with_encoder"] = round(costs["predict_ms_per_item"] + costs["encoder_ms_per_item"], 4)
    costs["peak_rss_mb"] = peak_rss_mb()
    extra: dict[str, Any] = {}
    if compare_templates:
        extra["templates"] = _compare_templates(prep, emb, template_list, head, split)
    config = {
        "method": "zeroshot", "encoder": encoder.spec, "templates": templates if isinstance(templates, str) else "list",
        "n_templates": len(template_list), "class_names": dict(zip(prep.classes, names)), "split": split,
        "score_kind": head.score_kind, "logit_scale": encoder.logit_scale, "logit_bias": encoder.logit_bias,
        "n_boot": n_boot, "seed": seed, "modality": prep.modality,
    }
    return RunResult("zeroshot", metrics, costs, config, data_provenance(prep.dataset, {split: list(prep.ids[idx])}),
                     predictions=_predictions(prep, idx, scores, "zeroshot"), extra=extra,
                     per_item={"zeroshot": per_item_topk_correct(y, scores, 1).astype(float)})


def _compare_templates(prep: Prepared, emb: np.ndarray, templates: list[str], ensemble: ZeroShotClassifier,
                       split: str) -> list[dict[str, Any]]:
    """top-1 of each template alone and of the ensemble, on val (to choose by) and on the reported split."""
    where = {"val": prep.index("val") if "val" in set(prep.split.tolist()) else None, split: prep.index(split)}

    def top1(head: ZeroShotClassifier, idx: np.ndarray | None) -> float | None:
        if idx is None or idx.size == 0:
            return None
        return float(per_item_topk_correct(prep.y[idx], head.decision_function(prep.X[idx]), 1).mean())

    rows = []
    for t, template in enumerate(templates):
        one = ZeroShotClassifier(ensemble.score_kind, ensemble.logit_scale, ensemble.logit_bias)
        one.fit(emb[:, t], list(range(len(prep.classes))))
        rows.append({"template": template, "val_top1": top1(one, where["val"]), f"{split}_top1": top1(one, where[split])})
    rows.sort(key=lambda r: -(r["val_top1"] if r["val_top1"] is not None else r[f"{split}_top1"]))
    rows.insert(0, {"template": f"ensemble of {len(templates)}", "val_top1": top1(ensemble, where["val"]),
                    f"{split}_top1": top1(ensemble, where[split])})
    return rows


# ---------------------------------------------------------------------------------------------------- probes


def make_head(method: str, seed: int, class_weight: str | None = None, logit_scale: float = 100.0) -> Any:
    """A fresh estimator for one probe method (hyper-parameter grids are the estimators' defaults)."""
    if method == "linear":
        from ..heads.linear import LinearProbe

        return LinearProbe(class_weight=class_weight, seed=seed)
    if method == "knn":
        from ..heads.knn import KNNClassifier

        return KNNClassifier(weights="distance", k_grid=(1, 3, 5, 10, 20, 50))
    if method == "tip":
        from ..heads.tip import TipAdapter

        return TipAdapter(logit_scale=logit_scale)
    raise EncoderlabError(f"unknown probe method {method!r}", f"use one of {', '.join(METHODS)}")


def _fit(method: str, head: Any, prep: Prepared, tr: np.ndarray, va: np.ndarray | None, refit: bool,
         class_embeddings: np.ndarray | None) -> Any:
    with small_fit_threads("cpu"):  # small problems: see encoderlab.cpu
        return _fit_head(method, head, prep, tr, va, refit, class_embeddings)


def _fit_head(method: str, head: Any, prep: Prepared, tr: np.ndarray, va: np.ndarray | None, refit: bool,
              class_embeddings: np.ndarray | None) -> Any:
    Xv = prep.X[va] if va is not None and va.size else None
    yv = prep.y[va] if va is not None and va.size else None
    if method == "linear":
        head.refit = refit
        return head.fit(prep.X[tr], prep.y[tr], Xv, yv)
    if method == "tip":
        # The cache model's text classifier rows follow the head's classes_ (the labels present in training).
        present = np.unique(prep.y[tr])
        return head.fit(prep.X[tr], prep.y[tr], class_embeddings[present], Xv, yv)
    return head.fit(prep.X[tr], prep.y[tr], Xv, yv)


def run_probe(
    encoder: Encoder,
    prep: Prepared,
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
) -> RunResult:
    """Fit a probe on frozen embeddings: on the full train split and/or k-shot samples over several seeds."""
    if method not in METHODS:
        raise EncoderlabError(f"unknown probe method {method!r}", f"use one of {', '.join(METHODS)}")
    if not full and not shots:
        raise EncoderlabError("nothing to run: no --shots and --no-full", "give --shots 1,2,4,8,16 or drop --no-full")
    bad = [k for k in shots if int(k) < 1]
    if bad:
        raise EncoderlabError(f"--shots must be positive integers, got {bad[0]}", "write e.g. --shots 1,2,4,8,16")
    if seeds < 1:
        raise EncoderlabError(f"--seeds must be >= 1, got {seeds}", "use e.g. --seeds 3")
    class_emb = None
    if method == "tip":
        zs, _, _ = zeroshot_classifier(encoder, prep.classes, store, load_templates(templates), class_names)
        class_emb = zs.class_embeddings_
    train, val, test = prep.index("train"), prep.index("val"), _eval_split(prep, "test")
    if train.size == 0:
        raise EncoderlabError("the train split has no labelled items", "make splits with --split-ratios")
    Xt, yt = prep.X[test], prep.y[test]
    metrics: dict[str, float] = {}
    costs: dict[str, float] = {}
    settings: list[dict[str, Any]] = []
    preds: list[pd.DataFrame] = []
    notes: list[str] = []
    per_item: dict[str, np.ndarray] = {}
    head_ms = float("nan")
    params = 0

    if full:
        head = make_head(method, seed, class_weight, encoder.logit_scale or 100.0)
        t0 = time.perf_counter()
        _fit(method, head, prep, train, val, True, class_emb)
        fit_s = time.perf_counter() - t0
        scores = full_scores(head, Xt, prep.n_classes)
        metrics.update(_evaluate(yt, scores, prep.classes, n_boot, seed))
        costs["fit_seconds"] = round(fit_s, 4)
        head_ms = ms_per_item(lambda: full_scores(head, Xt, prep.n_classes), len(test))
        params = n_params(head)
        settings.append({"setting": "full", "train_items": int(train.size), "val_items": int(val.size),
                         "fit_seconds": round(fit_s, 4), **_chosen(head)})
        preds.append(_predictions(prep, test, scores, "full"))
        per_item["full"] = per_item_topk_correct(yt, scores, 1).astype(float)

    for k in sorted({int(k) for k in shots}):
        per_seed: list[dict[str, float]] = []
        correct = np.zeros(len(test))
        fit_times = []
        for s in range(seeds):
            tr, note = prep.k_shot(k, s, "train")
            va = prep.k_shot(min(k, FEW_SHOT_VAL_SHOTS), s, "val")[0] if val.size else None
            if note and s == 0:
                notes.append(f"{k}-shot: {note}")
            head = make_head(method, s, class_weight, encoder.logit_scale or 100.0)
            t0 = time.perf_counter()
            _fit(method, head, prep, tr, va, False, class_emb)
            fit_times.append(time.perf_counter() - t0)
            scores = full_scores(head, Xt, prep.n_classes)
            per_seed.append(classification_metrics(yt, scores, prep.classes))
            correct += per_item_topk_correct(yt, scores, 1)
            settings.append({"setting": f"{k}-shot", "seed": s, "train_items": int(tr.size),
                             "val_items": int(va.size) if va is not None else 0,
                             "fit_seconds": round(fit_times[-1], 4), "top1": per_seed[-1]["top1"], **_chosen(head)})
            if s == 0:
                preds.append(_predictions(prep, test, scores, f"{k}-shot seed 0"))
        for name in ("top1", "top5", "balanced_accuracy", "macro_f1"):
            if name in per_seed[0]:
                vals = np.asarray([m[name] for m in per_seed])
                metrics[f"{k}-shot/{name}"] = float(vals.mean())
                metrics[f"{k}-shot/{name}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else 0.0
        per_item[f"{k}-shot"] = correct / seeds
        lo, hi = bootstrap_ci(correct / seeds, n_boot=n_boot, seed=seed)
        metrics[f"{k}-shot/top1_ci_low"], metrics[f"{k}-shot/top1_ci_high"] = lo, hi
        costs[f"{k}-shot/fit_seconds"] = round(float(np.mean(fit_times)), 4)

    if np.isnan(head_ms):  # few-shot only: time the last head
        head_ms = ms_per_item(lambda: full_scores(head, Xt, prep.n_classes), len(test))
        params = n_params(head)
    costs["predict_ms_per_item"] = head_ms
    costs["encoder_ms_per_item"] = encoder_cost(encoder, prep, "test", encoder_ms)
    costs["predict_ms_per_item_with_encoder"] = round(head_ms + costs["encoder_ms_per_item"], 4)
    costs["trainable_params"] = params
    costs["peak_rss_mb"] = peak_rss_mb()
    primary = "top1" if full else f"{max(int(k) for k in shots)}-shot/top1"
    config = {
        "method": method, "encoder": encoder.spec, "shots": sorted({int(k) for k in shots}), "seeds": seeds,
        "full": full, "class_weight": class_weight, "seed": seed, "n_boot": n_boot, "modality": prep.modality,
        "protocol": {"full": "fit train, tune on val, refit train+val, report test",
                     "few_shot": f"k per class from train, tune on min(k, {FEW_SHOT_VAL_SHOTS}) per class from val, "
                                 "no refit, report test; mean and std over seeds"},
        "notes": notes,
    }
    if method == "tip":
        config["templates"] = templates if isinstance(templates, str) else "list"
    data = data_provenance(prep.dataset, {"train": list(prep.ids[train]), "val": list(prep.ids[val]),
                                          "test": list(prep.ids[test])})
    return RunResult(f"probe-{method}", metrics, costs, config, data, primary=primary,
                     predictions=pd.concat(preds, ignore_index=True) if preds else None,
                     extra={"settings": settings}, per_item=per_item)


def _chosen(head: Any) -> dict[str, Any]:
    """The hyper-parameters a head chose on validation (for the record)."""
    out = {}
    for name in ("best_C_", "best_k_", "best_alpha_", "best_beta_"):
        if hasattr(head, name):
            v = getattr(head, name)
            out[name.rstrip("_")] = float(v) if isinstance(v, (float, np.floating)) else v
    return out
