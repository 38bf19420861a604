"""Rung ``zeroshot``: classification by prompt ensembles of the class names, no labels used."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..data.prompts import class_display_names, class_prompts, load_templates
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.embeddings import text_embeddings
from ..extract.labelled import LabelledEmbeddings
from ..heads.zeroshot import ZeroShotClassifier
from ..metrics.classification import per_item_topk_correct
from ..results import RunResult, data_provenance
from ..store import EmbeddingStore
from .base import Rung, RungInputs, RungOptions, register_rung
from .common import encoder_cost, eval_split, evaluate, prediction_rows, seen_in_training
from .costs import ms_per_item, peak_rss_mb


def zeroshot_classifier(
    encoder: Encoder, classes: Sequence[str], store: EmbeddingStore, templates: Sequence[str],
    class_names: Mapping[str, str] | None = None, progress: bool = False,
) -> tuple[ZeroShotClassifier, np.ndarray, list[str]]:
    """A fitted zero-shot head over class indices ``0..C-1`` from the prompt embeddings (cached in the store).

    Also returns the ``[C, T, d]`` prompt embeddings and the display names used.
    """
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
    emb: LabelledEmbeddings,
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
    """Zero-shot classification of ``split`` ("all": every labelled item) with a prompt ensemble; optionally every
    template alone as well."""
    template_list = load_templates(templates)
    t0 = time.perf_counter()
    head, prompt_emb, names = zeroshot_classifier(encoder, emb.classes, store, template_list, class_names)
    fit_seconds = time.perf_counter() - t0
    idx = eval_split(emb, split)
    X, y = emb.X[idx], emb.y[idx]
    scores = head.decision_function(X)
    metrics = evaluate(y, scores, emb.classes, n_boot, seed)
    costs: dict[str, Any] = {
        "fit_seconds": round(fit_seconds, 4),
        "predict_ms_per_item": ms_per_item(lambda: head.decision_function(X), len(idx)),
        "trainable_params": 0,
    }
    costs["encoder_ms_per_item"] = encoder_cost(encoder, emb, split, encoder_ms)
    costs["predict_ms_per_item_with_encoder"] = round(costs["predict_ms_per_item"] + costs["encoder_ms_per_item"], 4)
    costs["peak_rss_mb"] = peak_rss_mb()
    extra: dict[str, Any] = {}
    if compare_templates:
        extra["templates"] = compare_template_scores(emb, prompt_emb, template_list, head, split)
    config = {
        "method": "zeroshot", "encoder": encoder.spec, "templates": templates if isinstance(templates, str) else "list",
        "n_templates": len(template_list), "class_names": dict(zip(emb.classes, names)), "split": split,
        "score_kind": head.score_kind, "logit_scale": encoder.logit_scale, "logit_bias": encoder.logit_bias,
        "n_boot": n_boot, "seed": seed, "modality": emb.modality,
        "chosen": {"templates": "fixed (the ensemble given; --compare-templates scores each on val)"},
        "labels_used": 0,
        "notes": [n for n in [emb.unlabelled_note()] if n],  # nothing is chosen on val, and no class needs training
    }
    data = data_provenance(emb.dataset, {split: list(emb.ids[idx])})
    data["seen_in_training"] = seen = seen_in_training(encoder, _keys(emb, idx), emb.modality, f"{split} items")
    if seen["warning"]:
        config["notes"].append(seen["warning"])
    return RunResult("zeroshot", metrics, costs, config, data,
                     predictions=prediction_rows(emb, idx, scores, "zeroshot"), extra=extra,
                     per_item={"zeroshot": per_item_topk_correct(y, scores, 1).astype(float)})


def _keys(emb: LabelledEmbeddings, idx: np.ndarray) -> list[str | None]:
    return [] if emb.keys is None else list(emb.keys[idx])


def compare_template_scores(emb: LabelledEmbeddings, prompt_emb: np.ndarray, templates: list[str],
                            ensemble: ZeroShotClassifier, split: str) -> list[dict[str, Any]]:
    """top-1 of each template alone and of the ensemble, on val (to choose by) and on the reported split."""
    where = {"val": emb.index("val") if "val" in set(emb.split.tolist()) else None, split: eval_split(emb, split)}

    def top1(head: ZeroShotClassifier, idx: np.ndarray | None) -> float | None:
        if idx is None or idx.size == 0:
            return None
        return float(per_item_topk_correct(emb.y[idx], head.decision_function(emb.X[idx]), 1).mean())

    rows = []
    for t, template in enumerate(templates):
        one = ZeroShotClassifier(ensemble.score_kind, ensemble.logit_scale, ensemble.logit_bias)
        one.fit(prompt_emb[:, t], list(range(len(emb.classes))))
        rows.append({"template": template, "val_top1": top1(one, where["val"]),
                     f"{split}_top1": top1(one, where[split])})
    rows.sort(key=lambda r: -(r["val_top1"] if r["val_top1"] is not None else r[f"{split}_top1"]))
    rows.insert(0, {"template": f"ensemble of {len(templates)}", "val_top1": top1(ensemble, where["val"]),
                    f"{split}_top1": top1(ensemble, where[split])})
    return rows


def _run(inputs: RungInputs, options: RungOptions) -> RunResult:
    return run_zeroshot(inputs.encoder, inputs.labelled(), inputs.store, templates=options.templates,
                        class_names=options.class_names, split=options.split,
                        compare_templates=options.compare_templates, n_boot=options.n_boot, seed=options.seed,
                        encoder_ms=options.encoder_ms)


register_rung(Rung("zeroshot", level=1, rank=0, task="classification", needs=("dual", "labels"), knobs=("templates",),
                   description="prompt-ensemble zero-shot classification (no labels used)", run=_run))
