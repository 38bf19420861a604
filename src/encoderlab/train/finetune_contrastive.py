"""Fine-tune a dual encoder on image–caption pairs with its own pretraining loss (``encoderlab finetune --objective
contrastive``; FLYP, Goyal et al. 2023), through the shared loop (``loop.fit``).

Loss: CLIP's symmetric InfoNCE with the model's learnable temperature (its ``logit_scale``, clamped at 100 after
every step) for softmax models, SigLIP's pairwise sigmoid loss with its learnable scale and bias for sigmoid models
(``encoder.score_kind``). A caption shared by several images (or an image with several captions) is a positive of
each of them, never a negative: targets come from content ids (``losses.contrastive_targets``), as in align.

What trains: ``--train last:N`` / ``lora:R`` / ``all`` on each tower that ``--lock`` leaves open (``text``, the
default, locks the text tower; ``image`` locks the image tower; ``none`` trains both), plus the temperature (and
bias). ``heads`` trains nothing here (there is no classifier) and is refused. Epochs are chosen by early stopping on
the val split's retrieval (mean of i2t and t2i R@1); test is never read here.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from . import distributed
from .finetune import (
    DEFAULT_LR,
    FinetuneConfig,
    ImageItems,
    TrainSpec,
    lora_targets,
    open_trainable,
    trainable_module,
    trained_state,
    unload_lora,
)
from .loop import FitResult, decay_groups, fit
from .losses import (
    contrastive_targets,
    sigmoid_loss,
    sigmoid_loss_global,
    symmetric_infonce,
    symmetric_infonce_global,
)

OBJECTIVE = "contrastive"
LOCKS = ("text", "image", "none")
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp
VAL_METRIC = "mean of i2t_R@1 and t2i_R@1"


@dataclass(frozen=True)
class ContrastiveConfig(FinetuneConfig):
    """``FinetuneConfig`` for the contrastive objective; ``lock``: the tower that stays frozen (or ``none``)."""

    objective: str = OBJECTIVE
    train: str = "all"
    lock: str = "text"

    @property
    def towers(self) -> tuple[str, ...]:
        return {"text": ("image",), "image": ("text",), "none": ("image", "text")}[self.lock]

    def check(self) -> None:
        if self.objective != OBJECTIVE:
            raise EncoderlabError(f"ContrastiveConfig has objective {self.objective!r}", "use objective contrastive")
        spec = self.spec
        if spec.kind == "heads":
            raise EncoderlabError("--train heads: --objective contrastive has no classifier head to train (the "
                                  "towers would stay as they are)",
                                  "use --train last:N (e.g. last:2), lora:R or all with --objective contrastive")
        if self.lock not in LOCKS:
            raise EncoderlabError(f"unknown --lock {self.lock!r}", f"use --lock {', '.join(LOCKS)}")
        if not (self.lr is None or (math.isfinite(self.lr) and self.lr > 0)):
            raise EncoderlabError(f"--lr must be a number > 0, got {self.lr!r}", "use e.g. --lr 1e-5")
        if not (self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise EncoderlabError("lora_alpha must be > 0 and lora_dropout in [0, 1)", "use alpha 1, dropout 0.25")
        if self.batch_size < 2:
            raise EncoderlabError("--batch-size must be at least 2 (a contrastive batch needs negatives)",
                                  "use --batch-size 2 or more")
        self.loop_settings().check()

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.spec.kind]

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lr": self.resolved_lr, "optimizer": "AdamW",
                "loss": "contrastive (InfoNCE or sigmoid, by the model's score kind)", "towers": list(self.towers)}


@dataclass
class ContrastivePlan:
    """What trains: per tower the group names (last / all) or LoRA target modules."""

    spec: TrainSpec
    towers: tuple[str, ...]
    groups: dict[str, list[str]] = field(default_factory=dict)
    n_groups: dict[str, int] = field(default_factory=dict)
    lora_targets: list[str] = field(default_factory=list)
    score_kind: str = "softmax"


def check_captions(ds: Dataset) -> None:
    """Fail before any work when ``ds`` has no image–caption pairs."""
    if not ds.has_texts or not ds.has_images:
        raise EncoderlabError(f"--objective contrastive: dataset {ds.source!r} has no captioned images",
                              "use a dataset with images and captions (a texts column), or --objective classify")


def plan_contrastive(encoder: Encoder, config: ContrastiveConfig) -> ContrastivePlan:
    """Every check that needs no training: the config, a dual trainable encoder, each open tower's groups."""
    from ..encoders.trainable import as_trainable

    config.check()
    if not ("image" in encoder.modalities and "text" in encoder.modalities):
        raise EncoderlabError(f"--objective contrastive needs a dual encoder; {encoder.spec!r} encodes "
                              f"{'+'.join(encoder.modalities)}", "use a CLIP / SigLIP model, or --objective classify")
    if encoder.score_kind not in ("softmax", "sigmoid"):
        raise EncoderlabError(f"{encoder.spec!r} scores with {encoder.score_kind!r}", "use a CLIP or SigLIP model")
    spec = config.spec
    plan = ContrastivePlan(spec, config.towers, score_kind=encoder.score_kind)
    trainable = as_trainable(encoder)
    for tower in config.towers:
        groups = trainable.parameter_groups(tower)
        plan.n_groups[tower] = len(groups)
        if spec.kind == "last" and spec.n > len(groups):
            raise EncoderlabError(f"--train last:{spec.n}: the {tower} tower of {encoder.spec!r} has only "
                                  f"{len(groups)} parameter groups", f"use last:1 .. last:{len(groups)}, or all")
        if spec.kind == "lora":
            plan.lora_targets += lora_targets(encoder, groups)
            plan.groups[tower] = []
        else:
            chosen = groups[-spec.n:] if spec.kind == "last" else groups
            plan.groups[tower] = [name for name, _ in chosen]
    return plan


# ---- the data ---------------------------------------------------------------------------------------------


@dataclass
class PairSplit:
    """One split's images (decoded on demand), distinct captions, and the (image, caption) pairs with content ids."""

    items: ImageItems
    captions: list[str]
    pair_img: np.ndarray
    pair_txt: np.ndarray
    img_ids: np.ndarray  # content id of each image position (equal for identical files)
    ids: list[str]  # dataset item ids of the images
    image_keys: list[str]
    skipped: list[dict[str, str]] = field(default_factory=list)  # images left out: {split, path, reason}

    def __len__(self) -> int:
        return len(self.pair_img)


def pair_split(encoder: Encoder, ds: Dataset, split: str, *, cache: bool = True) -> PairSplit:
    """The captioned images of ``split``; a caption shared by images is one caption (a positive of each)."""
    from ..extract.embeddings import caption_pairs
    from ..hashing import image_key

    part = ds.select_split(split) if split in ds.splits else None
    if part is None:
        part = Dataset(ds.table.iloc[0:0], source=ds.source)
    t = part.table
    rows = [i for i in range(len(t)) if isinstance(t["image"].iloc[i], str) and len(t["texts"].iloc[i] or []) > 0]
    skipped = _unusable_images(t, rows, split)
    if skipped:
        bad = {s["path"] for s in skipped}
        rows = [i for i in rows if str(t["image"].iloc[i]) not in bad]
    captions, pair_img, pair_txt = caption_pairs(part, rows)
    paths = [str(t["image"].iloc[r]) for r in rows]
    keys = [image_key(p) for p in paths]
    seen: dict[str, int] = {}
    img_ids = np.asarray([seen.setdefault(k, len(seen)) for k in keys], dtype=np.int64)
    return PairSplit(ImageItems(paths, encoder.image_transform(), cache=cache), list(captions),
                     np.asarray(pair_img, np.int64), np.asarray(pair_txt, np.int64), img_ids,
                     [str(t["id"].iloc[r]) for r in rows], keys, skipped)


def _unusable_images(t: Any, rows: list[int], split: str) -> list[dict[str, str]]:
    """Images that cannot be decoded (missing, truncated, too large, not an image), by path and reason, with a
    warning: they are left out of the pairs instead of stopping training mid-epoch."""
    import warnings

    from ..data.audit import check_images

    bad = check_images([str(t["image"].iloc[i]) for i in rows], progress=False)
    if bad:
        shown = "; ".join(f"{b['path']} ({b['reason']})" for b in bad[:3])
        warnings.warn(f"{len(bad)} {split} image(s) cannot be used and are left out of the pairs: {shown}"
                      + (" ..." if len(bad) > 3 else ""), UserWarning, stacklevel=3)
    return [{"split": split, "path": b["path"], "reason": b["reason"]} for b in bad]


# ---- the model --------------------------------------------------------------------------------------------


class ContrastiveModel(torch.nn.Module):
    """Both towers and the temperature (+ SigLIP's bias); frozen parts stay in eval mode while training."""

    def __init__(self, encoder: Encoder, image: torch.nn.Module, text: torch.nn.Module) -> None:
        super().__init__()
        self.encoder, self.score_kind = encoder, encoder.score_kind
        self.image, self.text = image, text
        #: while training from the frozen-prefix cache: (suffix, val activations), so val retrieval uses them too
        self.cached_image: tuple[Any, Any] | None = None
        model = trainable_module(encoder)
        scale, bias = getattr(model, "logit_scale", None), getattr(model, "logit_bias", None)
        # the model's own (log) temperature and bias train with the towers; a model without one keeps its scale
        self.logit_scale = scale if isinstance(scale, torch.nn.Parameter) else None
        self.logit_bias = bias if isinstance(bias, torch.nn.Parameter) and self.score_kind == "sigmoid" else None

    def scale(self) -> torch.Tensor | float:
        return self.logit_scale.float().exp() if self.logit_scale is not None else float(self.encoder.logit_scale)

    def bias(self) -> torch.Tensor | float:
        if self.logit_bias is not None:
            return self.logit_bias.float()
        return float(self.encoder.logit_bias or 0.0)

    def loss(self, zi: torch.Tensor, zt: torch.Tensor, positives: torch.Tensor | None = None, *,
             img_ids: torch.Tensor | None = None, txt_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The batch's loss; its positives from the pairs' content ids (``contrastive_targets``), or given.

        Data-parallel (a process group of several processes) it is this rank's share of the global batch's loss,
        against every rank's features gathered with their gradients (``losses.*_global``), so the ranks' mean is
        one process's loss on the global batch; the positives then come from every rank's ids, which it needs.
        """
        if distributed.active():
            if img_ids is None or txt_ids is None:
                raise ValueError("a data-parallel contrastive loss needs img_ids and txt_ids: a local positives "
                                 "matrix says nothing about the pairs of the other ranks")
            if self.score_kind == "sigmoid":
                return sigmoid_loss_global(zi, zt, self.scale(), self.bias(), img_ids, txt_ids)
            return symmetric_infonce_global(zi, zt, self.scale(), img_ids, txt_ids)
        if positives is None and img_ids is not None and txt_ids is not None:
            positives = contrastive_targets(img_ids, txt_ids)
        if self.score_kind == "sigmoid":
            return sigmoid_loss(zi, zt, self.scale(), self.bias(), positives)
        return symmetric_infonce(zi, zt, self.scale(), positives)

    def clamp_scale(self) -> None:
        if self.logit_scale is not None:
            with torch.no_grad():
                self.logit_scale.clamp_(max=math.log(MAX_LOGIT_SCALE))

    def train(self, mode: bool = True) -> ContrastiveModel:
        super().train(mode)
        if mode:
            for tower in (self.image, self.text):
                for m in tower.modules():
                    params = list(m.parameters())
                    if params and not any(p.requires_grad for p in params):
                        m.eval()
        return self


def prepare_towers(encoder: Encoder, plan: ContrastivePlan, config: ContrastiveConfig) -> ContrastiveModel:
    """Freeze everything, open what the plan trains (or inject LoRA) and the temperature; the model to train."""
    from ..encoders.trainable import as_trainable

    enc = as_trainable(encoder)
    model = trainable_module(encoder)
    model.requires_grad_(False)
    open_trainable(model, enc, plan.spec, {t: plan.groups[t] for t in plan.towers}, plan.lora_targets, config)
    out = ContrastiveModel(encoder, enc.image_module(), enc.text_module())
    for p in (out.logit_scale, out.logit_bias):
        if p is not None:
            p.requires_grad_(True)
    return out


# ---- embedding a split ------------------------------------------------------------------------------------


def embed_images(model: ContrastiveModel, items: ImageItems, positions: Any, batch_size: int) -> torch.Tensor:
    out = [model.image(items.pixels(list(positions)[s:s + batch_size])).float()
           for s in range(0, len(positions), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def embed_texts(model: ContrastiveModel, captions: list[str], batch_size: int) -> torch.Tensor:
    from ..encoders.trainable import as_trainable

    tok = as_trainable(model.encoder).tokenize
    out = [model.text(tok(captions[s:s + batch_size])).float() for s in range(0, len(captions), batch_size)]
    return torch.cat(out) if out else torch.zeros(0)


def val_retrieval(model: ContrastiveModel, va: PairSplit, batch_size: int) -> dict[str, float]:
    """Retrieval metrics of the current towers on ``va`` (eval mode, no gradients)."""
    from ..metrics.retrieval import retrieval_metrics

    model.eval()
    with torch.no_grad():
        if model.cached_image is not None and model.cached_image[1] is not None:
            suffix, acts = model.cached_image
            zi = torch.cat([suffix(acts[s:s + batch_size]).float() for s in range(0, len(acts), batch_size)])
            zi = zi.cpu().numpy()
        else:
            zi = embed_images(model, va.items, range(len(va.items)), batch_size).cpu().numpy()
        zt = embed_texts(model, va.captions, batch_size).cpu().numpy()
    return retrieval_metrics(zi, zt, va.pair_img, va.pair_txt)


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class ContrastiveResult:
    """A finished contrastive fine-tune: the changed encoder (in place), what changed, how it was chosen."""

    encoder: Encoder
    model: ContrastiveModel
    plan: ContrastivePlan
    fitted: FitResult
    fit_seconds: float
    trainable_params: int
    tower_state: dict[str, torch.Tensor]
    config: ContrastiveConfig
    splits: dict[str, PairSplit]
    val_metrics: dict[str, float] = field(default_factory=dict)
    lora: dict[str, Any] | None = None
    init: dict[str, Any] = field(default_factory=dict)
    prefix_cache: dict[str, Any] = field(default_factory=dict)  # {"enabled": bool, "reason": str, "cut": ...}


def _fixed_parts(encoder: Encoder, model: ContrastiveModel, plan: ContrastivePlan, tr: PairSplit, va: PairSplit,
                 bs: int, prefix_cache: bool | None, store: Any) -> tuple[Any, Any, Any, Any, dict[str, Any]]:
    """What is the same every epoch, computed once: a locked tower's features, or the open image tower's frozen
    prefix outputs (``train.prefix``). Returns (image features, text features, cut, train activations, record)."""
    dev = encoder.device
    model.eval()
    with torch.no_grad():
        img_fixed = None if "image" in plan.towers else embed_images(model, tr.items, range(len(tr.items)), bs).to(dev)
        txt_fixed = None if "text" in plan.towers else embed_texts(model, tr.captions, bs).to(dev)
    if "image" not in plan.towers:
        return img_fixed, txt_fixed, None, None, {"enabled": False, "reason": "the image tower is locked"}
    from .prefix import prefix_activations

    cut, acts_tr, acts_va, info = prefix_activations(encoder, model.image, plan, None, model, tr.items, va.items,
                                                     len(va) > 0, bs, prefix_cache, store=store)
    if cut is not None:
        model.cached_image = (cut.suffix, acts_va)  # val retrieval embeds from the cached activations too
    return img_fixed, txt_fixed, cut, acts_tr, info


def finetune_contrastive(
    encoder: Encoder,
    ds: Dataset,
    config: ContrastiveConfig,
    *,
    plan: ContrastivePlan | None = None,
    progress: bool = False,
    checkpoint_dir: Any = None,
    resume: bool = True,
    run_config: dict[str, Any] | None = None,
    store: Any = None,
    prefix_cache: bool | None = None,
) -> ContrastiveResult:
    """Fine-tune ``encoder`` (changed in place) on the train split's image–caption pairs; early stopping on val.

    With ``--train last:N`` the image tower's frozen prefix runs once per image (``train.prefix``; its outputs kept in
    ``store`` when given), as for the classify objective; ``prefix_cache=False`` switches that off.
    """
    check_captions(ds)
    plan = plan or plan_contrastive(encoder, config)
    tr = pair_split(encoder, ds, "train", cache=False)
    if len(tr) == 0:
        raise EncoderlabError("the train split has no captioned images", "make splits with --split-ratios")
    va = pair_split(encoder, ds, "val")
    dev = encoder.device
    model = prepare_towers(encoder, plan, config).to(dev)
    with torch.no_grad():
        init = {"logit_scale": float(model.scale()),
                "logit_bias": float(model.bias()) if plan.score_kind == "sigmoid" else None}
    bs = config.batch_size
    img_fixed, txt_fixed, cut, acts_tr, cache_info = _fixed_parts(encoder, model, plan, tr, va, bs, prefix_cache,
                                                                   store)
    from ..encoders.trainable import as_trainable

    tokenize = as_trainable(encoder).tokenize
    pi_all, pt_all = torch.from_numpy(tr.pair_img), torch.from_numpy(tr.pair_txt)
    ids_all = torch.from_numpy(tr.img_ids)

    def step(idx: torch.Tensor) -> torch.Tensor:
        pi, pt = pi_all[idx], pt_all[idx]
        if img_fixed is not None:
            zi = img_fixed[pi.to(dev)]
        elif acts_tr is not None:
            zi = cut.suffix(acts_tr[pi.to(acts_tr.device)])  # type: ignore[union-attr]
        else:
            zi = model.image(tr.items.pixels(pi.tolist()))
        zt = model.text(tokenize([tr.captions[int(t)] for t in pt])) if txt_fixed is None else txt_fixed[pt.to(dev)]
        return model.loss(zi.float(), zt.float(), img_ids=ids_all[pi].to(dev), txt_ids=pt.to(dev))

    epochs_seen = [0]

    def evaluate() -> tuple[float, dict[str, float]]:
        epochs_seen[0] += 1
        with torch.no_grad():
            fields = {"logit_scale": float(model.scale())}
        if len(va) == 0:  # nothing to choose on: the latest epoch is the best
            return float(epochs_seen[0]), fields
        m = val_retrieval(model, va, bs)
        metric = 0.5 * (m["i2t_R@1"] + m["t2i_R@1"])
        return metric, {**fields, "val_metric": metric, "val_i2t_R@1": m["i2t_R@1"], "val_t2i_R@1": m["t2i_R@1"]}

    settings = config.loop_settings()
    if len(va) == 0:
        settings = dataclasses.replace(settings, patience=settings.epochs + 1)
    groups = decay_groups(model.named_parameters(), config.weight_decay)
    if not groups:
        raise EncoderlabError("nothing to train (every parameter is frozen)", "drop --freeze-norms or train more")
    t0 = time.perf_counter()
    fitted = fit(model, step, len(tr), groups, evaluate, settings, after_step=model.clamp_scale, progress=progress,
                 desc="finetune-contrastive", checkpoint_dir=checkpoint_dir, resume=resume, run_config=run_config)
    fit_seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    val_metrics = val_retrieval(model, va, bs) if len(va) else {}
    model.cached_image = None
    tower_state, lora = _finish(encoder, model, plan, config)
    model.eval()
    return ContrastiveResult(encoder, model, plan, fitted, fit_seconds, trainable, tower_state, config,
                             {"train": tr, "val": va}, val_metrics, lora, init, prefix_cache=cache_info)


def _finish(encoder: Encoder, cmodel: ContrastiveModel, plan: ContrastivePlan, config: ContrastiveConfig
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """What changed (towers, temperature, bias) to save, LoRA merged; frozen again; the encoder's scores updated."""
    from ..encoders.finetuned import merge_lora_state

    model = trainable_module(encoder)
    state = trained_state(model)
    lora = None
    if plan.spec.kind == "lora":
        state = {k: v for k, v in state.items() if "lora_" not in k}  # the factors are saved by module below
        factors, scaling = unload_lora(model)
        merge_lora_state(model, factors, scaling, what=encoder.spec)
        state.update(factors)
        lora = {"rank": plan.spec.n, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "scaling": scaling, "targets": plan.lora_targets}
    model.requires_grad_(False)
    with torch.no_grad():
        if cmodel.logit_scale is not None:
            encoder.logit_scale = float(cmodel.logit_scale.float().exp())
        if cmodel.logit_bias is not None:
            encoder.logit_bias = float(cmodel.logit_bias.float())
    getattr(encoder, "_weights_changed", lambda: None)()
    return state, lora
