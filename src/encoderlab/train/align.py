"""Align two frozen encoders LiT-style: train only projection heads (and a temperature) on cached tower features.

The towers never run during training: their embeddings come from the store (computed once, reused by every later
run), so an epoch over thousands of pairs takes well under a second on a CPU. Heads are selected on validation
retrieval (mean of image->text and text->image R@1) with early stopping, and saved as a directory that
``create_encoder("local:DIR")`` loads as a dual encoder (see ``encoders.aligned``). The epoch loop is ``loop.fit``;
with ``reuse=True`` a model directory trained from the same towers, split and settings is returned untrained.
Training checkpoints after every epoch (and every ``checkpoint_every`` steps) into the sibling work directory
``.NAME.train/`` (``checkpoint.work_dir``; the model directory holds only ``MODEL_FILES``), so a killed run resumes
where it was and ends with the same heads; the work directory is removed once the model is saved.

Head inputs are L2-normalized tower embeddings (``input_normalize=True``) so the head sees the same scale whatever
the tower. Measured on OpenClipart (efficientnet-lite0 + minilm-l6, val = mean R@1): for the default bias-free linear
head it makes no difference (0.469 vs 0.471 raw; normalize(W x) does not depend on the scale of x, only Adam's path
does), while the MLP head did better on raw inputs (0.458 vs 0.434) but stays below the linear head.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..cpu import small_fit_threads
from ..data.manifest import Dataset
from ..encoders.aligned import (
    FORMAT_VERSION,
    HEAD_KINDS,
    KIND,
    REQUEST_NAME,
    TRAINING_ITEMS_NAME,
    build_head,
    check_output_dir,
    is_aligned_dir,
    load_heads,
    portable_spec,
    read_config,
    save_aligned,
    tower_fingerprint,
)
from ..encoders.base import Encoder, TrainingItems, select_device
from ..errors import EncoderlabError, close_matches
from ..extract.embeddings import caption_pairs, image_embeddings, text_embeddings
from ..hashing import json_digest, text_key
from ..metrics.retrieval import retrieval_metrics
from ..store import EmbeddingStore
from . import checkpoint, distributed
from .loop import FitResult, LoopSettings, decay_groups, fit, run_settings
from .losses import contrastive_targets, symmetric_infonce, symmetric_infonce_global
from .schedule import check_schedule

INIT_LOGIT_SCALE = 1 / 0.07  # CLIP's initial temperature
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp: a sharper softmax only destabilizes training
VAL_METRIC = "mean of i2t_R@1 and t2i_R@1"


@dataclass(frozen=True)
class AlignConfig:
    """The settings of one align run; together with the towers and the data split they determine the model."""

    head: Literal["linear", "mlp"] = "linear"
    dim: int = 256
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    patience: int = 5
    warmup_steps: int = 50
    schedule: Literal["cosine", "constant"] = "cosine"
    input_normalize: bool = True
    seed: int = 0
    shuffle_pairs: bool = False

    @classmethod
    def merged(cls, base: AlignConfig | None, overrides: dict[str, Any]) -> AlignConfig:
        """``base`` (or the defaults) with keyword overrides, checked; an unknown name fails with close matches."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in overrides:
            if key not in names:
                guess = close_matches(key, names)
                hint = f"did you mean {', '.join(guess)}? " if guess else ""
                raise EncoderlabError(f"unknown align setting {key!r}", f"{hint}settings: {', '.join(names)}")
        cfg = dataclasses.replace(base or cls(), **overrides)
        cfg.check()
        return cfg

    def check(self) -> None:
        """Fail before any work on a value training cannot use, naming it."""
        if self.head not in HEAD_KINDS:
            raise EncoderlabError(f"unknown head {self.head!r}", f"use one of {', '.join(HEAD_KINDS)}")
        check_schedule(self.schedule)
        for name in ("dim", "epochs", "batch_size", "patience"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise EncoderlabError(f"{name} must be a positive integer, got {value!r}", f"pass {name}=1 or more")
        if self.batch_size < 2:
            raise EncoderlabError("batch_size must be at least 2 (a contrastive batch needs negatives)",
                                  "pass batch_size=2 or more")


@dataclass
class PairFeatures:
    """One split as the trainer sees it: tower features of its images and distinct captions, and the pairs.

    ``img_ids`` are content ids (equal for identical image files); text ids are the caption indices themselves,
    because ``caption_pairs`` already keeps each distinct caption once.
    """

    images: torch.Tensor  # [n_img, d_image] (L2-normalized when the heads take normalized inputs)
    texts: torch.Tensor  # [n_txt, d_text]
    pair_img: np.ndarray  # image position of each pair
    pair_txt: np.ndarray  # caption index of each pair
    img_ids: np.ndarray  # content id of each image position
    rows: int  # dataset rows
    skipped: int  # rows whose image could not be used
    image_keys: list[str] = field(default_factory=list)  # store content key of each image position
    text_keys: list[str] = field(default_factory=list)  # ``text_key`` of each caption

    def keys(self) -> dict[str, frozenset[str]]:
        """The content keys this split contributed, by modality (what ``TrainingItems`` records)."""
        return {"image": frozenset(self.image_keys), "text": frozenset(self.text_keys)}


@dataclass
class AlignResult:
    """What ``align_encoders`` did. ``heads`` holds the selected in-memory heads (image / text modules)."""

    path: str
    best_epoch: int
    epochs_run: int
    val_metrics: dict[str, float]
    history: list[dict[str, float]]
    fit_seconds: float  # head training + per-epoch validation, excluding feature extraction
    feature_seconds: float  # tower loading + feature extraction / store reads
    trainable_params: int
    logit_scale: float
    config: dict[str, Any]
    heads: dict[str, torch.nn.Module] = field(default_factory=dict, repr=False)
    up_to_date: bool = False  # True: nothing was trained, this is the record of the model already saved there
    resumed_at: int = 0  # optimizer steps restored from an interrupted run's checkpoint (0: trained from the start)

    def summary(self) -> dict[str, Any]:
        """A JSON-able digest for the CLI and reports."""
        return {
            "path": self.path,
            "best_epoch": self.best_epoch,
            "epochs_run": self.epochs_run,
            "val_metric": VAL_METRIC,
            "val": {k: round(v, 4) for k, v in self.val_metrics.items()},
            "logit_scale": round(self.logit_scale, 3),
            "trainable_params": self.trainable_params,
            "fit_seconds": round(self.fit_seconds, 3),
            "feature_seconds": round(self.feature_seconds, 3),
            "resumed_at": self.resumed_at,
        }


def pair_features(
    vision: Encoder, text: Encoder, ds: Dataset, store: EmbeddingStore, *, input_normalize: bool, progress: bool
) -> PairFeatures:
    """Tower features of a split from the store (extracting what it lacks) and its (image, caption) pairs."""
    emb = image_embeddings(vision, ds, store, progress=progress)
    captions, pair_img, pair_txt = caption_pairs(ds, emb.rows)
    if len(pair_img) == 0:
        raise EncoderlabError(
            f"no (image, caption) pair in {ds.source or 'the dataset'} ({len(ds)} rows)",
            "align needs a dataset whose rows have an image and at least one caption (texts column)",
        )
    T = text_embeddings(text, captions, store, progress=progress)
    keys = [emb.result.keys[int(r)] for r in emb.rows]
    ids: dict[str | None, int] = {}
    img_ids = np.asarray([ids.setdefault(k, len(ids)) for k in keys], dtype=np.int64)
    images, texts = torch.from_numpy(emb.X), torch.from_numpy(T)
    if input_normalize:
        images, texts = F.normalize(images, dim=-1), F.normalize(texts, dim=-1)
    return PairFeatures(images, texts, pair_img, pair_txt, img_ids, len(ds), len(ds) - len(emb.rows),
                        image_keys=[str(k) for k in keys], text_keys=[text_key(c) for c in captions])


def _project(heads: dict[str, torch.nn.Module], feats: PairFeatures, device: torch.device) -> tuple[np.ndarray, ...]:
    with torch.inference_mode():
        zi = heads["image"](feats.images.to(device)).float().cpu().numpy()
        zt = heads["text"](feats.texts.to(device)).float().cpu().numpy()
    return zi, zt


def _val_loss(heads: dict[str, torch.nn.Module], feats: PairFeatures, scale: float, batch: int,
              device: torch.device) -> float:
    """Contrastive loss over the val pairs in fixed consecutive batches (comparable across epochs)."""
    total, n = 0.0, len(feats.pair_img)
    with torch.inference_mode():
        for s in range(0, n, batch):
            pi, pt = feats.pair_img[s : s + batch], feats.pair_txt[s : s + batch]
            if len(pi) < 2:
                continue
            zi = heads["image"](feats.images[pi].to(device))
            zt = heads["text"](feats.texts[pt].to(device))
            mask = contrastive_targets(torch.from_numpy(feats.img_ids[pi]), torch.from_numpy(pt)).to(device)
            total += float(symmetric_infonce(zi, zt, scale, mask)) * len(pi)
    return total / n


def align_encoders(
    vision: str,
    text: str,
    train: Dataset,
    val: Dataset,
    out_dir: str | os.PathLike,
    *,
    store: EmbeddingStore,
    config: AlignConfig | None = None,
    reuse: bool = False,
    progress: bool = True,
    device: str = "auto",
    precision: str | None = None,
    resume: bool = True,
    checkpoint_every: int | None = None,
    **settings: Any,
) -> AlignResult:
    """Train projection heads that map ``vision`` image features and ``text`` text features into one space.

    ``train`` / ``val`` are datasets whose rows have an image and captions (``texts``); every caption of a row is a
    pair. Settings come from ``config`` with ``settings`` (``AlignConfig`` field names: ``head=``, ``epochs=``, ...)
    overriding it. ``shuffle_pairs=True`` is the control: captions are permuted across train images (seeded), so
    held-out retrieval should fall to chance. The heads of the best val epoch are saved to ``out_dir`` (see
    ``encoders.aligned``); an existing aligned model there is replaced, any other non-empty directory is refused.
    ``reuse=True``: when ``out_dir`` already holds a model of the same towers, data split and settings, nothing is
    trained and its record is returned (``up_to_date=True``). Training resumes from the checkpoint of a killed run
    (``resume=False``: start over); one written under other settings is refused before features are extracted.
    """
    cfg = AlignConfig.merged(config, settings)
    check_output_dir(out_dir)  # fail before any work, not after training
    dev = select_device(device)
    t0 = time.perf_counter()
    towers = _load_towers(vision, text, dev, precision)
    parts = request_parts(towers, train, val, cfg)
    work = checkpoint.work_dir(out_dir)
    if reuse and is_up_to_date(out_dir, json_digest(parts)):
        shutil.rmtree(work, ignore_errors=True)  # scratch of a run superseded by the saved model
        return saved_result(out_dir, feature_seconds=time.perf_counter() - t0)
    run_config = {**parts["settings"], "towers": json_digest(parts["towers"]), "feature_precision": parts["precision"],
                  "data": json_digest([parts["train"], parts["val"]])}
    if resume:  # a checkpoint of other settings fails here, not after minutes of feature extraction
        checkpoint.check_resumable(work, {"loop": run_settings(_loop_settings(cfg), "fp32"), "client": run_config})
    tr, va = (pair_features(towers["image"], towers["text"], ds, store, input_normalize=cfg.input_normalize,
                            progress=progress) for ds in (train, val))
    feature_seconds = time.perf_counter() - t0

    t1 = time.perf_counter()
    resumable = {"checkpoint_dir": work, "checkpoint_every": checkpoint_every, "resume": resume,
                 "run_config": run_config}
    model, fitted, val_metrics = _train_heads(tr, va, cfg, dev, progress, resumable)
    fit_seconds = time.perf_counter() - t1
    best_scale = fitted.history[fitted.best_epoch - 1]["logit_scale"]
    out = os.fspath(out_dir)
    hyper = {
        "seed": cfg.seed, "epochs_max": cfg.epochs, "epochs_run": len(fitted.history), "best_epoch": fitted.best_epoch,
        "val_metric_name": VAL_METRIC, "val_metric": fitted.best_metric,
        "val": {k: float(v) for k, v in val_metrics.items()},
        "batch_size": cfg.batch_size, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "patience": cfg.patience,
        "warmup_steps": fitted.warmup_steps, "schedule": cfg.schedule, "optimizer": "AdamW",
        "shuffle_pairs": cfg.shuffle_pairs, "fit_seconds": round(fit_seconds, 3),
    }
    config_json = _model_config(vision, text, towers, out, cfg, best_scale, tr, va, train, val, hyper)
    tensors = {f"{m}.{k}": v for m, h in model.heads.items() for k, v in h.state_dict().items()}
    tensors["logit_scale"] = torch.tensor(best_scale)
    # What the heads were fit on (train) and selected on (val), so evaluations can spot items the model has seen.
    items = TrainingItems(train=tr.keys(), val=va.keys(), source=train.source or val.source or "")
    save_aligned(out, config_json, tensors, extra_json={REQUEST_NAME: {"digest": json_digest(parts)}},
                 training_items=items)
    shutil.rmtree(work, ignore_errors=True)  # kept until now: a failed save retries without training again
    return AlignResult(
        path=out, best_epoch=fitted.best_epoch, epochs_run=len(fitted.history), val_metrics=val_metrics,
        history=fitted.history, fit_seconds=fit_seconds, feature_seconds=feature_seconds, logit_scale=best_scale,
        config=config_json, trainable_params=sum(p.numel() for p in model.parameters()), heads=dict(model.heads),
        resumed_at=fitted.resumed_at,
    )


def _load_towers(vision: str, text: str, device: torch.device, precision: str | None) -> dict[str, Encoder]:
    """The two frozen towers, each checked to encode its modality."""
    from ..encoders.registry import create_encoder

    towers = {"image": create_encoder(vision, device=str(device), precision=precision),
              "text": create_encoder(text, device=str(device), precision=precision)}
    for modality, tower in towers.items():
        tower.check_modality(modality)
    return towers


class AlignHeads(torch.nn.Module):
    """What align trains: one head per tower and the log of the contrastive temperature (CLIP's ``logit_scale``)."""

    def __init__(self, heads: dict[str, torch.nn.Module], init_scale: float) -> None:
        super().__init__()
        self.heads = torch.nn.ModuleDict(heads)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(init_scale)))

    def clamp_scale(self) -> None:
        """CLIP clamps the temperature after each step, not inside the graph: a sharper softmax only destabilizes."""
        with torch.no_grad():
            self.logit_scale.clamp_(0.0, math.log(MAX_LOGIT_SCALE))


def _loop_settings(cfg: AlignConfig) -> LoopSettings:
    """The loop's settings of an align run; fp32 everywhere: tiny head matmuls gain nothing from autocast."""
    return LoopSettings(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, patience=cfg.patience,
                        warmup_steps=cfg.warmup_steps, schedule=cfg.schedule, seed=cfg.seed, precision="fp32")


def _train_heads(tr: PairFeatures, va: PairFeatures, cfg: AlignConfig, dev: torch.device, progress: bool,
                 resumable: dict[str, Any] | None = None) -> tuple[AlignHeads, FitResult, dict[str, float]]:
    """Fit heads on the train pairs with ``loop.fit``; returns them (best epoch loaded), the fit, its val metrics.

    ``resumable`` holds ``fit``'s checkpoint arguments (``checkpoint_dir``, ``checkpoint_every``, ...).
    """
    pair_img = tr.pair_img
    if cfg.shuffle_pairs:
        # A separate stream, so init and batch order are exactly those of the real run.
        pair_img = np.random.default_rng([cfg.seed, 1]).permutation(len(tr.images))[pair_img]
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        heads = {"image": build_head(cfg.head, tr.images.shape[1], cfg.dim),
                 "text": build_head(cfg.head, tr.texts.shape[1], cfg.dim)}
    model = AlignHeads(heads, INIT_LOGIT_SCALE).to(dev)
    tr_img, tr_txt = tr.images.to(dev), tr.texts.to(dev)
    pi_all, pt_all, ids_all = torch.from_numpy(pair_img), torch.from_numpy(tr.pair_txt), torch.from_numpy(tr.img_ids)

    data_parallel = distributed.active()  # under torchrun: negatives from every rank's share of the batch

    def step(idx: torch.Tensor) -> torch.Tensor:
        pi, pt = pi_all[idx], pt_all[idx]
        zi, zt = model.heads["image"](tr_img[pi.to(dev)]), model.heads["text"](tr_txt[pt.to(dev)])
        if data_parallel:
            return symmetric_infonce_global(zi, zt, model.logit_scale.exp(), ids_all[pi].to(dev), pt.to(dev))
        return symmetric_infonce(zi, zt, model.logit_scale.exp(), contrastive_targets(ids_all[pi], pt).to(dev))

    def evaluate() -> tuple[float, dict[str, float]]:
        scale = model.logit_scale.detach().exp().item()
        metrics = retrieval_metrics(*_project(dict(model.heads), va, dev), va.pair_img, va.pair_txt)
        val_metric = 0.5 * (metrics["i2t_R@1"] + metrics["t2i_R@1"])
        return val_metric, {"val_loss": _val_loss(dict(model.heads), va, scale, cfg.batch_size, dev),
                            "val_metric": val_metric, "val_i2t_R@1": metrics["i2t_R@1"],
                            "val_t2i_R@1": metrics["t2i_R@1"], "logit_scale": scale}

    groups = decay_groups(model.named_parameters(), cfg.weight_decay)
    with small_fit_threads(dev):  # tiny matmuls: one thread is faster and immune to a busy core
        fitted = fit(model, step, len(pair_img), groups, evaluate, _loop_settings(cfg), after_step=model.clamp_scale,
                     progress=progress, desc="align", **(resumable or {}))
    model.eval().requires_grad_(False)
    # The best epoch's full metrics, recomputed from its (reloaded) heads: the same numbers, also after a resume.
    return model, fitted, retrieval_metrics(*_project(dict(model.heads), va, dev), va.pair_img, va.pair_txt)


# ---- reuse: same towers, same split, same settings -> the saved model is up to date ------------------------


def request_digest(towers: dict[str, Encoder], train: Dataset, val: Dataset, cfg: AlignConfig) -> str:
    """Digest of everything an aligned model depends on: tower weights and precision, the data split, settings."""
    return json_digest(request_parts(towers, train, val, cfg))


def request_parts(towers: dict[str, Encoder], train: Dataset, val: Dataset, cfg: AlignConfig) -> dict[str, Any]:
    """What ``request_digest`` digests, by part (a checkpoint names the part that changed)."""

    def split(ds: Dataset) -> dict[str, Any]:
        ids = sorted(map(str, ds.table["id"]))
        return {"source": ds.source, "items": len(ids), "ids": json_digest(ids), "split_info": ds.split_info}

    return {"towers": {m: tower_fingerprint(t) for m, t in towers.items()}, "precision": towers["image"].precision,
            "train": split(train), "val": split(val), "settings": dataclasses.asdict(cfg)}


def is_up_to_date(out_dir: str | os.PathLike, request: str) -> bool:
    """True when ``out_dir`` holds an aligned model whose recorded request digest is ``request``.

    A model saved before training items were recorded is not up to date: retraining (seconds, on cached features)
    gives it the record evaluations use to warn about items it was trained on.
    """
    stamp = Path(out_dir) / REQUEST_NAME
    if not (is_aligned_dir(out_dir) and stamp.is_file() and (Path(out_dir) / TRAINING_ITEMS_NAME).is_file()):
        return False
    try:
        return json.loads(stamp.read_text()).get("digest") == request
    except (OSError, ValueError, AttributeError):
        return False


def saved_result(out_dir: str | os.PathLike, *, feature_seconds: float = 0.0) -> AlignResult:
    """The record of a saved aligned model (``up_to_date=True``; no per-epoch history is saved)."""
    out = os.fspath(out_dir)
    config = read_config(out)
    info = config.get("train", {})
    heads = load_heads(out, config)
    return AlignResult(
        path=out, best_epoch=int(info.get("best_epoch", 0)), epochs_run=int(info.get("epochs_run", 0)),
        val_metrics=dict(info.get("val", {})), history=[], fit_seconds=float(info.get("fit_seconds", 0.0)),
        feature_seconds=feature_seconds, trainable_params=sum(p.numel() for h in heads.values() for p in h.parameters())
        + 1, logit_scale=float(config["logit_scale"]), config=config, heads=heads, up_to_date=True,
    )


def evaluate_retrieval(encoder: Encoder, ds: Dataset, store: EmbeddingStore, *, progress: bool = False
                       ) -> dict[str, float]:
    """Image<->caption retrieval of a dual encoder on a dataset (through the store, so derived models reuse features).

    Besides ``retrieval_metrics`` it reports ``{d}_prior_R@1``: the best R@1 of a retriever that ignores the query
    (always the most common caption / the image with most captions). With captions shared by many images this is
    far above random chance, and it is the honest floor for "did the model learn anything from the content".
    """
    emb = image_embeddings(encoder, ds, store, progress=progress)
    captions, pair_img, pair_txt = caption_pairs(ds, emb.rows)
    if len(pair_img) == 0:
        raise EncoderlabError(f"no (image, caption) pair in {ds.source or 'the dataset'}", "use a captioned dataset")
    T = text_embeddings(encoder, captions, store, progress=progress)
    out = retrieval_metrics(emb.X, T, pair_img, pair_txt)
    # Distinct pairs only; queries without a positive are excluded, as in retrieval_metrics.
    pairs = np.unique(pair_img * len(captions) + pair_txt)
    pi, pt = pairs // len(captions), pairs % len(captions)
    out["i2t_prior_R@1"] = float(np.bincount(pt).max() / len(np.unique(pi)))
    out["t2i_prior_R@1"] = float(np.bincount(pi).max() / len(np.unique(pt)))
    return out


def _model_config(vision: str, text: str, towers: dict[str, Encoder], out: str, cfg: AlignConfig, scale: float,
                  tr: PairFeatures, va: PairFeatures, train: Dataset, val: Dataset, hyper: dict[str, Any]
                  ) -> dict[str, Any]:
    """The ``encoderlab.json`` of an aligned model (see ``encoders.aligned``)."""
    model_dir = Path(out)
    return {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "vision": portable_spec(vision, model_dir),
        "text": portable_spec(text, model_dir),
        "head": cfg.head,
        "dim": cfg.dim,
        "input_normalize": cfg.input_normalize,
        "input_dims": {"image": int(tr.images.shape[1]), "text": int(tr.texts.shape[1])},
        "tower_fingerprints": {m: tower_fingerprint(t) for m, t in towers.items()},
        "logit_scale": scale,
        "train": {
            "data": {"train": train.source, "val": val.source, "split_info": train.split_info},
            "counts": {
                "train_rows": tr.rows, "train_images": len(tr.images), "train_captions": len(tr.texts),
                "train_pairs": len(tr.pair_img), "train_skipped": tr.skipped,
                "val_rows": va.rows, "val_images": len(va.images), "val_captions": len(va.texts),
                "val_pairs": len(va.pair_img), "val_skipped": va.skipped,
            },
            "feature_precision": towers["image"].precision,
            **hyper,
        },
    }
