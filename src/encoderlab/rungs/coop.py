"""Rung ``coop``: CoOp (Zhou et al. 2022), a learned prompt context on the frozen text tower, few-shot.

It runs through the head rungs' protocol (``rungs.probe.FewShotProtocol``), so its numbers are comparable to theirs item
for item: k labelled images per class from train (seeded), early stopping (the number of epochs, its one knob) on
min(k, 4) per class from val, no refit, mean ± std over seeds, a bootstrap interval over test items, per-item
correctness for the paired Δ vs zero-shot. The "head" is ``CoopHead``: its ``fit`` learns the context on the cached
image features, its scores are the model's logits against the prompted class texts. The context length is fixed
(``--n-ctx``), not chosen. The full-data setting is not run: CoOp is a few-shot method, and on CPU a full train
split costs a text-tower pass per batch for every epoch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..data.prompts import class_display_names
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..heads._base import Head, as_features, class_counts
from ..results import RunResult, data_provenance
from ..train.coop import CoopConfig, CoopFit, check_config, class_logits, fit_coop, prompt_features
from .base import HeadContext, Rung, RungInputs, RungOptions, register_rung
from .common import seen_in_training
from .probe import FEW_SHOT_VAL_SHOTS, FewShotProtocol, check_few_shot


class CoopHead(Head):
    """A CoOp context as a head over class indices ``0..C-1`` (every class has a prompt, trained on or not)."""

    def __init__(self, encoder: Encoder, names: Sequence[str], config: CoopConfig, seed: int = 0,
                 progress: bool = False) -> None:
        self.encoder = encoder
        self.names = list(names)
        self.config = config
        self.seed = seed
        self.progress = progress

    def fit(self, X: Any, y: Any, X_val: Any = None, y_val: Any = None) -> CoopHead:
        Xa = as_features(X)
        ya = np.asarray(y, dtype=np.int64)
        Xv = as_features(X_val, "X_val", Xa.shape[1]) if X_val is not None and len(X_val) else None
        yv = np.asarray(y_val, dtype=np.int64) if Xv is not None else None
        self.fit_: CoopFit = fit_coop(self.encoder, self.names, Xa, ya, Xv, yv, self.config, seed=self.seed,
                                      progress=self.progress)
        n = len(self.names)
        self.classes_ = np.arange(n)
        self.fit_counts_ = class_counts(ya, n)
        self.best_epochs_ = self.fit_.best_epoch
        # what chosen_knobs reads: a non-empty sweep means the epochs were chosen on val, not fixed
        self.sweep_ = self.fit_.history if self.fit_.chosen_by == "val" else []
        self.text_ = prompt_features(self.encoder, self.names, self.fit_.ctx, self.config, self.fit_.n_ctx).numpy()
        return self

    def decision_function(self, X: Any) -> np.ndarray:
        self._check_fitted()
        import torch
        import torch.nn.functional as F

        x = F.normalize(torch.as_tensor(as_features(X, "X", self.text_.shape[1])), dim=-1)
        sigmoid = self.encoder.score_kind == "sigmoid"
        scale = float(self.encoder.logit_scale if self.encoder.logit_scale is not None else 100.0)
        logits = class_logits(x, torch.as_tensor(self.text_), scale, self.encoder.logit_bias if sigmoid else None)
        return logits.numpy()

    @property
    def n_trainable_params(self) -> int:
        return int(self.fit_.ctx.numel()) if hasattr(self, "fit_") else 0


def run_coop(
    encoder: Encoder,
    emb: LabelledEmbeddings,
    *,
    shots: Sequence[int],
    seeds: int = 3,
    config: CoopConfig | None = None,
    class_names: Mapping[str, str] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    encoder_ms: float | None = None,
    progress: bool = False,
) -> tuple[RunResult, dict[tuple[int, int], CoopHead]]:
    """CoOp over the few-shot settings; returns the result and every fitted head by (k, seed) (for saving one)."""
    config = config or CoopConfig()
    ks = check_few_shot(shots, seeds, full=False)
    if emb.modality != "image":
        raise EncoderlabError("coop classifies images (the prompts are the text side)", "use a dataset with images")
    names = class_display_names(emb.classes, class_names)
    _, n_ctx, _ = check_config(config, encoder, names)  # every shape and length check before any training
    heads: dict[tuple[int, int], CoopHead] = {}
    current = {"k": 0}

    def make_head(ctx: HeadContext) -> CoopHead:
        head = CoopHead(encoder, names, config, seed=ctx.seed, progress=progress)
        heads[(current["k"], ctx.seed)] = head
        return head

    rung = dataclasses.replace(RUNG, make_head=make_head)
    run = FewShotProtocol(rung, emb, lambda s, refit: HeadContext(seed=s, refit=refit), n_boot, seed)
    last = None
    for k in ks:
        current["k"] = k
        last = run.few_shot(k, seeds)
    run.inference_costs(last, encoder, encoder_ms)
    for record in run.settings:
        record["knobs"]["n_ctx"] = n_ctx
    config_doc = {
        "method": "coop", "encoder": encoder.spec, "shots": ks, "seeds": seeds, "full": False, "seed": seed,
        "n_boot": n_boot, "modality": emb.modality, "knobs": list(RUNG.knobs), "coop": {**config.describe(),
                                                                                         "n_ctx": n_ctx},
        "class_names": dict(zip(emb.classes, names)),
        "protocol": {"few_shot": f"k per class from train, epochs by early stopping on min(k, {FEW_SHOT_VAL_SHOTS}) "
                                 "per class from val, no refit (the context is trained on exactly k per class), "
                                 "report test; mean and std over seeds",
                     "full": "not run (CoOp is a few-shot method)"},
        "notes": run.notes,
    }
    data = data_provenance(emb.dataset, {split: list(emb.ids[idx]) for split, idx in
                                         (("train", run.train), ("val", run.val), ("test", run.test))})
    keys = [] if emb.keys is None else list(emb.keys[run.test])
    data["seen_in_training"] = seen = seen_in_training(encoder, keys, emb.modality, "test items")
    if seen["warning"]:
        config_doc["notes"].append(seen["warning"])
    result = RunResult("coop", run.metrics, run.costs, config_doc, data, primary=f"{max(ks)}-shot/top1",
                       predictions=pd.concat(run.preds, ignore_index=True) if run.preds else None,
                       extra={"settings": run.settings}, per_item=run.per_item)
    return result, heads


def _run(inputs: RungInputs, options: RungOptions) -> RunResult:
    if not options.shots:
        raise EncoderlabError("coop runs few-shot settings only", "give --shots, e.g. --shots 1,4,16")
    result, _ = run_coop(inputs.encoder, inputs.labelled(), shots=options.shots, seeds=options.seeds,
                         class_names=options.class_names, n_boot=options.n_boot, seed=options.seed,
                         encoder_ms=options.encoder_ms, progress=options.progress)
    return result


def _supports(encoder: Encoder) -> str | None:
    """Why ``encoder``'s text tower cannot take a prompt context (None when it can)."""
    from ..encoders.prompted import prompted_tower

    try:
        prompted_tower(encoder)
    except EncoderlabError as e:
        return f"needs a text tower that takes a prompt context ({e.message})"
    return None


RUNG = register_rung(Rung("coop", level=3, rank=0, task="classification", needs=("dual", "labels"),
                          knobs=("epochs",), features="joint", run=_run, supports=_supports,
                          description="CoOp: a learned prompt context on the frozen text tower (few-shot, dual "
                                      "encoders)"))
