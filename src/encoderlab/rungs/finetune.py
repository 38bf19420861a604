"""Rung ``finetune`` (level 4): fine-tune the image tower with a classifier on the full train split, report test.

Protocol (recorded in the result's config): fit on ``train`` from the zero-shot head (dual encoders) or a linear
probe (single towers, LP-FT), epochs chosen by early stopping on ``val`` accuracy, no refit on train + val (the
model is the one chosen), report ``test``; the test split chooses nothing. The result has the probes' shape
(metrics with intervals, per-item correctness under setting "full", costs), so ``compare`` shows it with its paired
Δ vs zero-shot on the same test items. Few-shot settings are not run (a later step).

The rung trains a fresh copy of the encoder (rebuilt from its spec), so the other rungs of a comparison keep the
frozen one; ``encoderlab finetune`` trains its own encoder and saves it (``save_finetune``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.prompts import load_templates
from ..encoders.base import Encoder, TrainingItems
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..hashing import json_digest
from ..metrics.classification import per_item_topk_correct
from ..results import RunResult, data_provenance
from ..store import EmbeddingStore
from ..train import distributed
from ..train.finetune import Augment, FinetuneConfig, FinetuneResult, finetune_classifier, plan_training
from .base import Rung, RungInputs, RungOptions, register_rung
from .common import encoder_cost, eval_split, evaluate, prediction_rows, seen_in_training
from .costs import ms_per_item, peak_rss_mb

#: what the rung trains when ``compare`` runs it (the CLI chooses with --train)
RUNG_CONFIG = FinetuneConfig(train="all")
PROTOCOL = {"full": "fit train from the zero-shot head (dual) or a linear probe (LP-FT), epochs by early stopping "
                    "on val accuracy, no refit, report test",
            "few_shot": "not run yet"}


def fresh_copy(encoder: Encoder) -> Encoder:
    """The same encoder rebuilt from its spec: training changes weights in place, the caller's must stay frozen."""
    from ..encoders.registry import create_encoder

    return create_encoder(encoder.spec, device=str(encoder.device), precision=encoder.precision)


def run_finetune(
    encoder: Encoder,
    emb: LabelledEmbeddings,
    store: EmbeddingStore,
    *,
    config: FinetuneConfig | None = None,
    templates: str | Sequence[str] = "clip80",
    class_names: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    encoder_ms: float | None = None,
    progress: bool = False,
    copy: bool = True,
    augment: Augment | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    wise_ft: Sequence[float] | None = None,
    also_eval: LabelledEmbeddings | None = None,
) -> tuple[RunResult, FinetuneResult]:
    """Fine-tune (a copy of, unless ``copy=False``) ``encoder`` on ``emb``; returns the test result and the fit.

    ``wise_ft`` (α values): also report the WiSE-FT curve (Wortsman et al. 2022) between ``encoder`` (zero-shot) and
    the fine-tuned copy (``copy`` is forced, θ0 must survive training), choose α on val, and leave the returned
    fit at the chosen α's weights (what ``save_finetune`` writes); the metrics above stay the fine-tuned (α = 1)
    model's. ``also_eval``: labelled embeddings of a second dataset for the curve's zero-shot forgetting column.
    """
    from ..encoders.aligned import tower_fingerprint
    from ..train import wise_ft as wft

    config = config or FinetuneConfig(seed=seed)
    plan = plan_training(encoder, config)  # every check before any work
    test = eval_split(emb, "test")
    if also_eval is not None and wise_ft is None:
        raise EncoderlabError("--also-eval reports forgetting along the WiSE-FT curve", "add --wise-ft 0:1:0.1")
    alphas = wft.check_wise_ft(encoder, emb, wise_ft, also_eval) if wise_ft is not None else None
    copy = copy or alphas is not None
    zeroshot_templates = plan.head_init == "zeroshot" or also_eval is not None
    template_list = load_templates(templates) if zeroshot_templates else []
    base_fp = tower_fingerprint(encoder)
    work = fresh_copy(encoder) if copy else encoder
    tr, va = emb.index("train"), emb.index("val") if "val" in set(emb.split.tolist()) else np.zeros(0, np.int64)
    run_config = {"base": base_fp, "train": str(plan.spec), "head_init": plan.head_init,
                  "label_smoothing": config.label_smoothing, "freeze_norms": config.freeze_norms,
                  "templates": json_digest(template_list), "data": json_digest([sorted(emb.ids[tr].tolist()),
                                                                                sorted(emb.ids[va].tolist())])}
    ft = finetune_classifier(work, emb, store, config, templates=template_list,
                             class_names=dict(class_names) if class_names else None, augment=augment, plan=plan,
                             progress=progress, checkpoint_dir=checkpoint_dir, resume=resume, run_config=run_config)
    ft.init["base_fingerprint"], ft.init["base_spec"] = base_fp, encoder.spec
    scores = ft.scores(emb, "test", config.batch_size)
    y = emb.y[test]
    metrics = evaluate(y, scores, emb.classes, n_boot, seed)
    costs = _costs(ft, work, emb, test, encoder_ms if plan.spec.kind == "heads" else None)
    fitted = ft.fitted
    setting = {"setting": "full", "selection": "val", "train_items": int(tr.size), "val_items": int(va.size),
               "final_model_items": int(tr.size), "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
               "val_top1": fitted.best_metric if va.size else None, "chosen_by": "val" if va.size else "fixed",
               "knobs": {"epochs": fitted.best_epoch}, "seed": config.seed}
    result_config = {
        "method": "finetune", "encoder": encoder.spec, "train": str(plan.spec), "groups": plan.groups,
        "lora_targets": len(plan.lora_targets), "head_init": plan.head_init, "head_C": ft.init.get("C"),
        "finetune": config.describe(), "full": True, "shots": [], "seed": seed, "n_boot": n_boot,
        "modality": emb.modality, "knobs": ["epochs"], "selection": "val", "protocol": PROTOCOL,
        "history": fitted.history, "prefix_cache": getattr(ft, "prefix_cache", None),
        "notes": list(emb.notes()) + ["few-shot settings are not run by finetune yet"],
    }
    if template_list:
        result_config["templates"] = templates if isinstance(templates, str) else "list"
    data = data_provenance(emb.dataset, {split: list(emb.ids[idx]) for split, idx in
                                         (("train", tr), ("val", va), ("test", test))})
    keys = [] if emb.keys is None else list(emb.keys[test])
    data["seen_in_training"] = seen = seen_in_training(encoder, keys, emb.modality, "test items")
    if seen["warning"]:
        result_config["notes"].append(seen["warning"])
    result = RunResult("finetune", metrics, costs, result_config, data,
                       predictions=prediction_rows(emb, test, scores, "full"), extra={"settings": [setting]},
                       per_item={"full": per_item_topk_correct(y, scores, 1).astype(float)})
    if alphas is not None:
        _add_wise_ft(result, encoder, ft, emb, store, alphas, also_eval, template_list, config, n_boot, seed)
    return result, ft


def _costs(ft: FinetuneResult, work: Encoder, emb: LabelledEmbeddings, test: np.ndarray,
           encoder_ms: float | None) -> dict[str, Any]:
    """Fit time, trainable parameters, head and encoder latency (a tuned tower is measured anew), memory."""
    feats = torch.zeros(len(test), int(ft.head.weight.shape[1]), device=ft.head.weight.device)
    head_ms = ms_per_item(lambda: ft.head(feats), len(test))
    costs: dict[str, Any] = {"fit_seconds": round(ft.fit_seconds, 4), "trainable_params": ft.trainable_params,
                             "predict_ms_per_item": head_ms,
                             "encoder_ms_per_item": encoder_cost(work, emb, "test", encoder_ms)}
    costs["predict_ms_per_item_with_encoder"] = round(head_ms + costs["encoder_ms_per_item"], 4)
    costs["peak_rss_mb"] = peak_rss_mb()
    return costs


def _add_wise_ft(result: RunResult, encoder: Encoder, ft: FinetuneResult, emb: LabelledEmbeddings,
                 store: EmbeddingStore, alphas: Sequence[float], also_eval: LabelledEmbeddings | None,
                 template_list: list[str], config: FinetuneConfig, n_boot: int, seed: int) -> None:
    """The WiSE-FT curve into ``result``; leaves ``ft`` at the chosen α's weights (what ``save_finetune`` writes)."""
    from ..train import wise_ft as wft

    curve = wft.wise_ft_curve(encoder, ft, emb, store, alphas, also_eval=also_eval, templates=template_list,
                              batch_size=config.batch_size)
    chosen = evaluate(emb.y[eval_split(emb, "test")], curve["scores"], emb.classes, n_boot, seed)
    result.per_item["wise-ft"] = per_item_topk_correct(emb.y[eval_split(emb, "test")], curve["scores"], 1).astype(
        float)
    result.metrics.update({"wise_ft/alpha": curve["alpha"], "wise_ft/top1": chosen["top1"],
                           "wise_ft/top1_ci_low": chosen["top1_ci_low"],
                           "wise_ft/top1_ci_high": chosen["top1_ci_high"]})
    result.extra["wise_ft"] = record = wft.result_record(curve)
    result.config["wise_ft"] = {"alphas": list(alphas), "chosen_by": curve["chosen_by"]}
    wft.apply_alpha(encoder, ft, curve["alpha"])
    ft.wise_ft = {**record, "test": {k: chosen[k] for k in ("top1", "top1_ci_low", "top1_ci_high")}}


def save_finetune(out_dir: str | os.PathLike, ft: FinetuneResult, emb: LabelledEmbeddings,
                  result: RunResult | None = None) -> Path:
    """Save what changed (tower tensors, classifier) with the base spec, fingerprint and training record."""
    from ..encoders.aligned import portable_spec
    from ..encoders.finetuned import FORMAT_VERSION, KIND, save_finetuned

    model_dir = Path(out_dir)
    tr, va = ft.positions["train"], ft.positions["val"]
    fitted = ft.fitted
    init = {k: v for k, v in ft.init.items() if k not in ("probe", "base_fingerprint", "base_spec")}
    config = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        "base": portable_spec(str(ft.init["base_spec"]), model_dir), "base_fingerprint": ft.init["base_fingerprint"],
        "classifier": {"kind": ft.head.kind, "scale": ft.head.scale, "classes": list(emb.classes),
                       "dim": int(ft.head.weight.shape[1]), **init},
        "train": {
            "spec": str(ft.plan.spec), "objective": ft.config.objective, "groups": ft.plan.groups,
            "n_groups": ft.plan.n_groups, "lora": ft.lora, "settings": ft.config.describe(),
            "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
            "val_top1": fitted.best_metric if va.size else None, "history": fitted.history,
            "total_steps": fitted.total_steps, "warmup_steps": fitted.warmup_steps, "precision": fitted.precision,
            "costs": {"fit_seconds": round(ft.fit_seconds, 3), "trainable_params": ft.trainable_params},
            "counts": {"train": int(tr.size), "val": int(va.size)},
            "data": data_provenance(emb.dataset, {"train": list(emb.ids[tr]), "val": list(emb.ids[va])}),
        },
    }
    if result is not None:
        config["test"] = {k: result.metrics.get(k) for k in ("top1", "top1_ci_low", "top1_ci_high")}
    if ft.wise_ft is not None:  # the saved weights are the chosen α's: its test numbers describe them
        config["wise_ft"] = {**ft.wise_ft, "finetuned_test": config.get("test")}
        config["test"] = dict(ft.wise_ft["test"])
    items = None
    if emb.keys is not None:
        def keys(idx: np.ndarray) -> frozenset[str]:
            return frozenset(str(k) for k in emb.keys[idx] if k is not None)  # type: ignore[index]

        items = TrainingItems(train={"image": keys(tr)}, val={"image": keys(va)}, source=emb.dataset.source)
    return save_finetuned(model_dir, config, ft.tower_state, ft.head, training_items=items)


#: the ladder's small adaptation (level 3): the last two parameter groups (for an aligned pair: the projection and
#: the tower's last stage; for CLIP: the final norm and the projection) at a head-sized learning rate
LAST_CONFIG = FinetuneConfig(train="last:2", lr=1e-4, epochs=10, patience=3)
#: the WiSE-FT grid of the level-4 rung (α on val; 0 is zero-shot, 1 the fine-tuned model)
WISE_FT_ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))


def _runner(config: FinetuneConfig, wise_ft: bool) -> Any:
    def run(inputs: RungInputs, options: RungOptions) -> RunResult:
        if not options.full:
            raise EncoderlabError("finetune runs the full train split only (few-shot settings are not available "
                                  "yet)", "drop --no-full for finetune")
        from dataclasses import replace

        dual = "image" in inputs.encoder.modalities and "text" in inputs.encoder.modalities
        result, _ = run_finetune(inputs.encoder, inputs.labelled(), inputs.store,
                                 config=replace(config, seed=options.seed), templates=options.templates,
                                 class_names=options.class_names, n_boot=options.n_boot, seed=options.seed,
                                 encoder_ms=options.encoder_ms, progress=options.progress,
                                 wise_ft=list(WISE_FT_ALPHAS) if wise_ft and dual else None)
        if "wise-ft" in result.per_item:  # the rung's number is the α chosen on val (α = 1 is the plain fine-tune)
            result.per_item = {"full": result.per_item["wise-ft"], "fine-tuned": result.per_item["full"]}
        return result

    return run


def _supports_config(config: FinetuneConfig) -> Any:
    def supports(encoder: Encoder) -> str | None:
        """Why the rung's fine-tuning cannot run on ``encoder`` (None when it can)."""
        if "image" not in encoder.modalities:
            return "needs an image tower"
        try:
            plan_training(encoder, config)
        except EncoderlabError as e:
            return f"cannot fine-tune its image tower ({e.message})"
        return None

    return supports


_run, _supports = _runner(RUNG_CONFIG, wise_ft=True), _supports_config(RUNG_CONFIG)
RUNG = register_rung(Rung("finetune", level=4, rank=0, task="classification", needs=("labels",), knobs=("epochs",),
                          features="joint", run=_run, supports=_supports,
                          description="fine-tune the whole image tower + a zero-shot / linear-probe initialised "
                                      "classifier (FLYP-style init, LP-FT), full train split; dual encoders: WiSE-FT "
                                      "α on val"))
LAST_RUNG = register_rung(Rung("finetune-last", level=3, rank=2, task="classification", needs=("labels",),
                               knobs=("epochs",), features="joint", run=_runner(LAST_CONFIG, wise_ft=False),
                               supports=_supports_config(LAST_CONFIG),
                               description="fine-tune the last two parameter groups of the image tower + the "
                                           "classifier (lr 1e-4, early stopping on val), full train split"))


# ---- --objective contrastive: FLYP-style fine-tuning on image–caption pairs, test retrieval --------------------


def run_finetune_contrastive(
    encoder: Encoder,
    dataset: Any,
    store: EmbeddingStore,
    *,
    config: Any = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
    copy: bool = True,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
) -> tuple[RunResult | None, Any]:
    """Fine-tune (a copy of) ``encoder`` contrastively on ``dataset``'s train pairs (early stopping on val retrieval),
    then report test retrieval of the tuned encoder (``run_retrieval``); returns the result and the fit. Data-parallel
    (torchrun) only rank 0 tests, the others get None: their encoders would write the same embeddings to the store."""
    from ..encoders.aligned import tower_fingerprint
    from ..train.finetune_contrastive import ContrastiveConfig, check_captions, finetune_contrastive, plan_contrastive
    from .retrieval import run_retrieval

    config = config or ContrastiveConfig(seed=seed)
    check_captions(dataset)  # every check before any work
    plan = plan_contrastive(encoder, config)
    if "test" not in dataset.splits:
        raise EncoderlabError(f"dataset {dataset.source!r} has no test split", "make splits with --split-ratios")
    base_fp = tower_fingerprint(encoder)
    work = fresh_copy(encoder) if copy else encoder
    ids = {s: sorted(map(str, dataset.table.loc[dataset.table["split"] == s, "id"])) for s in ("train", "val")}
    run_config = {"base": base_fp, "objective": "contrastive", "train": str(plan.spec), "lock": config.lock,
                  "freeze_norms": config.freeze_norms, "data": json_digest([ids["train"], ids["val"]])}
    ft = finetune_contrastive(work, dataset, config, plan=plan, progress=progress, checkpoint_dir=checkpoint_dir,
                              resume=resume, run_config=run_config, store=store)
    ft.init["base_fingerprint"], ft.init["base_spec"] = base_fp, encoder.spec
    if not distributed.is_main():  # data-parallel: every rank holds the same model; rank 0 alone tests it
        return None, ft
    result = run_retrieval(work, dataset, store, split="test", n_boot=n_boot, seed=seed, progress=progress)
    fitted, va = ft.fitted, ft.splits["val"]
    left_out = ft.splits["train"].skipped + va.skipped  # undecodable images left out of training, by name
    if left_out:
        result.skipped = (result.skipped or []) + left_out
    result.costs.update(fit_seconds=round(ft.fit_seconds, 4), trainable_params=ft.trainable_params,
                        peak_rss_mb=peak_rss_mb())
    result.config.update({
        "method": "finetune-contrastive", "encoder": encoder.spec, "objective": "contrastive",
        "train": str(plan.spec), "lock": config.lock, "towers": list(plan.towers), "groups": plan.groups,
        "lora_targets": len(plan.lora_targets), "loss": "sigmoid" if plan.score_kind == "sigmoid" else "infonce",
        "finetune": config.describe(), "selection": "val" if len(va) else "fixed", "val_metric_name":
        "mean of i2t_R@1 and t2i_R@1", "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
        "val_metric": fitted.best_metric if len(va) else None, "history": fitted.history, "init": dict(ft.init),
        "prefix_cache": ft.prefix_cache})
    return result, ft


def save_finetune_contrastive(out_dir: str | os.PathLike, ft: Any, dataset: Any, result: RunResult | None = None
                              ) -> Path:
    """Save what changed (tower tensors of both towers, temperature, bias) with the base spec and training record;
    no classifier (the model loads as a dual encoder, ``local:DIR``)."""
    from ..encoders.aligned import portable_spec
    from ..encoders.finetuned import FORMAT_VERSION, KIND, save_finetuned
    from ..hashing import text_key

    model_dir = Path(out_dir)
    fitted = ft.fitted
    tr, va = ft.splits["train"], ft.splits["val"]
    config = {
        "kind": KIND, "format_version": FORMAT_VERSION,
        "base": portable_spec(str(ft.init["base_spec"]), model_dir), "base_fingerprint": ft.init["base_fingerprint"],
        "classifier": None,
        "train": {
            "spec": str(ft.plan.spec), "objective": "contrastive", "lock": ft.config.lock,
            "towers": list(ft.plan.towers), "groups": ft.plan.groups, "n_groups": ft.plan.n_groups, "lora": ft.lora,
            "settings": ft.config.describe(), "best_epoch": fitted.best_epoch, "epochs_run": len(fitted.history),
            "val_metric_name": "mean of i2t_R@1 and t2i_R@1", "val_metric": fitted.best_metric if len(va) else None,
            "val": ft.val_metrics, "history": fitted.history, "total_steps": fitted.total_steps,
            "warmup_steps": fitted.warmup_steps, "precision": fitted.precision,
            "init": {k: v for k, v in ft.init.items() if k not in ("base_fingerprint", "base_spec")},
            "costs": {"fit_seconds": round(ft.fit_seconds, 3), "trainable_params": ft.trainable_params},
            "counts": {"train_pairs": len(tr), "val_pairs": len(va), "train_images": len(tr.items),
                       "val_images": len(va.items)},
            "data": data_provenance(dataset, {"train": tr.ids, "val": va.ids}),
        },
    }
    if result is not None:
        config["test"] = {k: result.metrics.get(k) for k in ("i2t_R@1", "t2i_R@1", "i2t_R@5", "t2i_R@5")}
    items = TrainingItems(train={"image": frozenset(tr.image_keys), "text": frozenset(map(text_key, tr.captions))},
                          val={"image": frozenset(va.image_keys), "text": frozenset(map(text_key, va.captions))},
                          source=dataset.source)
    return save_finetuned(model_dir, config, ft.tower_state, None, training_items=items)
