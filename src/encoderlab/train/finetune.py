"""Fine-tune an encoder's image tower with a classifier on labelled images (``encoderlab finetune --objective
classify``), through the shared loop (``loop.fit``).

The head starts where the frozen encoder already is, so fine-tuning cannot begin by destroying features with a
random head's gradients (LP-FT, Kumar et al. 2022):

- dual encoders: the zero-shot head, ``logits = scale * cos(f, W)`` with ``W`` the normalised class-prompt
  embeddings, trainable (the zero-shot init of WiSE-FT / FLYP, Wortsman et al. 2022, Goyal et al. 2023);
- single towers: a linear probe fitted on the frozen features (``heads.LinearProbe``, C chosen on val), then
  fine-tuned from it (LP-FT).

What trains (``--train``): ``heads`` (towers locked, only the classifier), ``last:N`` (the last N parameter groups
of ``parameter_groups("image")`` plus the head), ``all``, or ``lora:R`` (rank-R LoRA adapters from ``peft`` on the
image tower's attention q/k/v projections, as CLIP-LoRA, Zanella & Ben Ayed 2024, merged into the weights after
training). ``freeze_norms`` keeps every normalisation layer's parameters (and BatchNorm statistics) fixed.

Images are decoded and transformed every epoch through the encoder's own ``image_transform()``; ``augment`` (a
``PIL.Image -> PIL.Image`` hook, none yet) runs before it on training images only. Loss: cross-entropy with
``label_smoothing``. Epochs are chosen by early stopping on validation accuracy; test is never read here.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders.base import Encoder
from ..encoders.finetuned import LORA_PREFIX, ClassifierHead, merge_lora_state
from ..encoders.trainable import trainable_module
from ..errors import EncoderlabError
from ..extract.labelled import LabelledEmbeddings
from ..store import EmbeddingStore
from .loop import FitResult, LoopSettings, decay_groups, fit
from .prefix import prefix_activations

OBJECTIVES = ("classify",)
TRAIN_KINDS = ("heads", "last:N", "all", "lora:R")
HEAD_INITS = ("auto", "zeroshot", "probe")
#: default learning rates: a head alone tolerates a large step; whole towers use FLYP / LP-FT's 1e-5; LoRA
#: CLIP-LoRA's 2e-4
DEFAULT_LR = {"heads": 1e-3, "last": 1e-5, "all": 1e-5, "lora": 2e-4}
#: names of attention input projections that LoRA adapts (transformers 5: q_proj/k_proj/v_proj; BERT: query/...)
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "query", "key", "value")
NORM_TYPES = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.modules.batchnorm._BatchNorm)
#: transformed eval images kept in memory between epochs up to this many bytes (beyond it they are decoded again)
EVAL_CACHE_BYTES = 512 << 20
Augment = Callable[[Any], Any]  # PIL.Image -> PIL.Image, training images only


@dataclass(frozen=True)
class TrainSpec:
    """What trains: kind "heads" / "last" / "all" / "lora", with N blocks (last) or rank R (lora)."""

    kind: str
    n: int = 0

    def __str__(self) -> str:
        return f"{self.kind}:{self.n}" if self.kind in ("last", "lora") else self.kind


def parse_train_spec(text: str) -> TrainSpec:
    """``heads``, ``all``, ``last:N`` or ``lora:R`` (N, R >= 1); anything else fails naming the value."""
    fix = "use --train heads, last:N (e.g. last:2), all or lora:R (e.g. lora:4)"
    value = str(text).strip()
    if value in ("heads", "all"):
        return TrainSpec(value)
    kind, sep, number = value.partition(":")
    if kind in ("last", "lora") and sep:
        try:
            n = int(number)
        except ValueError:
            n = 0
        if n >= 1:
            return TrainSpec(kind, n)
        raise EncoderlabError(f"--train {value!r}: {kind}: needs a whole number >= 1", fix)
    raise EncoderlabError(f"unknown --train spec {value!r}", fix)


@dataclass(frozen=True)
class FinetuneConfig:
    """The settings of one fine-tuning run (with the encoder and the data split they determine the model)."""

    objective: str = "classify"
    train: str = "heads"
    epochs: int = 10
    lr: float | None = None  # None: DEFAULT_LR of the train kind
    batch_size: int = 32
    label_smoothing: float = 0.0
    freeze_norms: bool = False
    weight_decay: float = 0.1  # WiSE-FT / FLYP
    patience: int = 3
    warmup_steps: int = 50  # capped by the loop at a tenth of all steps
    schedule: str = "cosine"
    seed: int = 0
    max_norm: float | None = 1.0
    head_init: str = "auto"  # auto: zeroshot for dual encoders, probe for single towers
    lora_alpha: float = 1.0  # CLIP-LoRA: alpha 1 (scaling alpha / r)
    lora_dropout: float = 0.25  # CLIP-LoRA
    precision: str = "auto"

    @property
    def spec(self) -> TrainSpec:
        return parse_train_spec(self.train)

    @property
    def resolved_lr(self) -> float:
        return float(self.lr) if self.lr is not None else DEFAULT_LR[self.spec.kind]

    def loop_settings(self) -> LoopSettings:
        return LoopSettings(epochs=self.epochs, batch_size=self.batch_size, lr=self.resolved_lr,
                            patience=self.patience, warmup_steps=self.warmup_steps, schedule=self.schedule,
                            seed=self.seed, max_norm=self.max_norm, precision=self.precision)

    def check(self) -> None:
        """Fail before any work on a value training cannot use, naming it."""
        if self.objective not in OBJECTIVES:
            raise EncoderlabError(f"--objective {self.objective!r} is not available yet",
                                  f"use --objective {' or '.join(OBJECTIVES)}")
        self.spec  # noqa: B018 - parses (and fails on) the --train value
        if self.head_init not in HEAD_INITS:
            raise EncoderlabError(f"unknown head init {self.head_init!r}", f"use one of {', '.join(HEAD_INITS)}")
        if not (self.lr is None or (math.isfinite(self.lr) and self.lr > 0)):
            raise EncoderlabError(f"--lr must be a number > 0, got {self.lr!r}", "use e.g. --lr 1e-5")
        if not 0 <= self.label_smoothing < 1:
            raise EncoderlabError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing!r}",
                                  "use e.g. --label-smoothing 0.1")
        if not (self.lora_alpha > 0 and 0 <= self.lora_dropout < 1):
            raise EncoderlabError("lora_alpha must be > 0 and lora_dropout in [0, 1)", "use alpha 1, dropout 0.25")
        self.loop_settings().check()

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "lr": self.resolved_lr, "optimizer": "AdamW", "loss": "cross-entropy"}


# ---- what trains ------------------------------------------------------------------------------------------


@dataclass
class TrainPlan:
    """The checked answer to "what trains": group names, LoRA target modules, the head's init."""

    spec: TrainSpec
    groups: list[str] = field(default_factory=list)
    n_groups: int = 0
    lora_targets: list[str] = field(default_factory=list)
    head_init: str = "zeroshot"


def is_dual(encoder: Encoder) -> bool:
    return "image" in encoder.modalities and "text" in encoder.modalities


def plan_training(encoder: Encoder, config: FinetuneConfig) -> TrainPlan:
    """Every check that needs no training, before any: the config, the tower's block map, N, LoRA targets."""
    from ..encoders.trainable import as_trainable

    config.check()
    encoder.check_modality("image")
    spec = config.spec
    head_init = config.head_init if config.head_init != "auto" else ("zeroshot" if is_dual(encoder) else "probe")
    if head_init == "zeroshot" and not is_dual(encoder):
        raise EncoderlabError(f"a zero-shot head needs a dual encoder; {encoder.spec!r} encodes "
                              f"{'+'.join(encoder.modalities)}", "use head init probe (LP-FT) for single towers")
    plan = TrainPlan(spec, head_init=head_init)
    if spec.kind == "heads":
        return plan  # the tower only runs forward: any image encoder will do
    groups = as_trainable(encoder).parameter_groups("image")  # a family without a block map fails here
    plan.n_groups = len(groups)
    if spec.kind == "last" and spec.n > len(groups):
        raise EncoderlabError(f"--train last:{spec.n}: the image tower of {encoder.spec!r} has only {len(groups)} "
                              f"parameter groups ({', '.join(n for n, _ in groups)})",
                              f"use last:1 .. last:{len(groups)}, or all")
    chosen = groups[-spec.n:] if spec.kind == "last" else groups
    plan.groups = [name for name, _ in chosen] if spec.kind != "lora" else []
    if spec.kind == "lora":
        plan.lora_targets = lora_targets(encoder, groups)
    return plan


def lora_targets(encoder: Encoder, groups: Sequence[tuple[str, list[torch.nn.Parameter]]]) -> list[str]:
    """Full names of the image tower's attention q/k/v linear layers (CLIP-LoRA's targets)."""
    model = trainable_module(encoder)
    tower = {id(p) for _, ps in groups for p in ps}
    names = [name for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in QKV_NAMES
             and id(m.weight) in tower]
    if not names:
        raise EncoderlabError(f"the image tower of {encoder.spec!r} has no attention q/k/v layers for LoRA (a "
                              "convolutional tower?)", "use --train last:N or all for this encoder")
    return names


class FrozenTower(torch.nn.Module):
    """The locked image tower of ``--train heads``: the encoder's own ``encode_pixels`` (no gradients, any kind)."""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self._encoder = encoder  # a plain attribute: the tower's weights stay out of this module's state

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # clone: a tensor made under inference_mode cannot enter the head's autograd graph
        return self._encoder.encode_pixels(pixels).clone().to(self._encoder.device)


def prepare_tower(encoder: Encoder, plan: TrainPlan, config: FinetuneConfig) -> torch.nn.Module:
    """Freeze the model, unfreeze what the plan trains (or inject LoRA), return the image module to train."""
    if plan.spec.kind == "heads":
        return FrozenTower(encoder)
    from ..encoders.trainable import as_trainable

    enc = as_trainable(encoder)
    model = trainable_module(encoder)
    model.requires_grad_(False)
    open_trainable(model, enc, plan.spec, {"image": plan.groups}, plan.lora_targets, config)
    return enc.image_module()


def open_trainable(model: torch.nn.Module, enc: Any, spec: TrainSpec, groups: dict[str, Any],
                   lora_targets: Sequence[str], config: FinetuneConfig) -> None:
    """Make trainable what ``spec`` says on a frozen ``model``: inject LoRA adapters (seeded, through peft) into
    ``lora_targets``, or unfreeze the named parameter groups of each tower in ``groups``; ``--freeze-norms`` keeps
    every norm layer frozen. Shared by the classify and contrastive objectives."""
    if spec.kind == "lora":
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise EncoderlabError("--train lora:R needs the peft library, which is not installed",
                                  "pip install 'encoderlab[finetune]' (or use --train last:N or all)") from None
        lora = LoraConfig(r=spec.n, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(lora_targets), bias="none")
        with torch.random.fork_rng(devices=[]):  # LoRA's A init draws from the global RNG: seeded, and left alone
            torch.manual_seed(config.seed)
            inject_adapter_in_model(lora, model)
        return
    for tower, names in groups.items():
        for name, params in enc.parameter_groups(tower):
            if name in names:
                for p in params:
                    p.requires_grad_(True)
    if config.freeze_norms:
        for m in model.modules():
            if isinstance(m, NORM_TYPES):
                m.requires_grad_(False)


class FinetuneModel(torch.nn.Module):
    """Image tower + classifier; in train mode every fully frozen part stays in eval (no dropout, fixed BN stats)."""

    def __init__(self, tower: torch.nn.Module, head: ClassifierHead) -> None:
        super().__init__()
        self.tower, self.head = tower, head

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.tower(pixels))

    def train(self, mode: bool = True) -> FinetuneModel:
        super().train(mode)
        if mode:
            for m in self.tower.modules():
                params = list(m.parameters())
                if params and not any(p.requires_grad for p in params):
                    m.eval()
        return self


# ---- the head's initialisation ----------------------------------------------------------------------------


def initial_head(encoder: Encoder, emb: LabelledEmbeddings, store: EmbeddingStore, init: str, *,
                 templates: Sequence[str], class_names: dict[str, str] | None = None, seed: int = 0
                 ) -> tuple[ClassifierHead, dict[str, Any]]:
    """The classifier at step 0: the zero-shot head (dual) or a linear probe on the frozen features (LP-FT)."""
    if init == "zeroshot":
        from ..rungs.zeroshot import zeroshot_classifier

        zs = zeroshot_classifier(encoder, emb.classes, store, templates, class_names)[0]
        sigmoid = zs.score_kind == "sigmoid" and zs.logit_bias is not None
        bias = torch.full((emb.n_classes,), float(zs.logit_bias) if sigmoid else 0.0)
        scale = float(zs.logit_scale if zs.logit_scale is not None else 100.0)
        head = ClassifierHead("cosine", torch.as_tensor(zs.class_embeddings_), bias, scale)
        return head, {"init": "zeroshot", "templates": len(templates), "scale": scale}
    from ..cpu import small_fit_threads
    from ..heads.linear import LinearProbe

    tr, va = emb.index("train"), emb.index("val") if "val" in set(emb.split.tolist()) else np.zeros(0, np.int64)
    va = va[np.isin(emb.y[va], emb.y[tr])]
    probe = LinearProbe(seed=seed, refit=False)  # fit on train only: val stays honest for early stopping
    with small_fit_threads("cpu"):
        probe.fit(emb.X[tr], emb.y[tr], emb.X[va] if va.size else None, emb.y[va] if va.size else None)
    weight = torch.zeros(emb.n_classes, emb.X.shape[1])
    bias = torch.full((emb.n_classes,), -1e4)  # a class without training items is never predicted
    cls = torch.as_tensor(np.asarray(probe.classes_).astype(np.int64))
    weight[cls] = torch.as_tensor(probe.coef_, dtype=torch.float32)
    bias[cls] = torch.as_tensor(probe.intercept_, dtype=torch.float32)
    return ClassifierHead("linear", weight, bias), {"init": "probe", "C": float(probe.best_C_), "probe": probe}


# ---- images -----------------------------------------------------------------------------------------------


class ImageItems:
    """Decode + transform images by position; eval sets (no ``augment``) are cached in memory when they fit."""

    def __init__(self, paths: Sequence[str], transform: Callable[[Any], torch.Tensor],
                 augment: Augment | None = None, cache: bool = False) -> None:
        self.paths, self.transform, self.augment = list(paths), transform, augment
        self.cache: dict[int, torch.Tensor] | None = {} if cache and augment is None else None

    def __len__(self) -> int:
        return len(self.paths)

    def _one(self, i: int) -> torch.Tensor:
        from ..data.images import load_image

        if self.cache is not None and i in self.cache:
            return self.cache[i]
        image = load_image(self.paths[i])  # usable: the frozen pass already decoded every one of these
        if self.augment is not None:
            image = self.augment(image)
        x = self.transform(image)
        if self.cache is not None and (len(self.cache) + 1) * x.numel() * x.element_size() <= EVAL_CACHE_BYTES:
            self.cache[i] = x
        return x

    def pixels(self, positions: Sequence[int]) -> torch.Tensor:
        return torch.stack([self._one(int(i)) for i in positions])


def predict(model: torch.nn.Module, items: ImageItems, batch_size: int) -> np.ndarray:
    """Logits [n, C] of every item, in eval mode without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for s in range(0, len(items), batch_size):
            out.append(model(items.pixels(range(s, min(s + batch_size, len(items))))).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


# ---- the run ----------------------------------------------------------------------------------------------


@dataclass
class FinetuneResult:
    """A finished fine-tune: the changed encoder (in place), its head, what changed, how it was chosen."""

    encoder: Encoder
    model: FinetuneModel
    head: ClassifierHead
    plan: TrainPlan
    fitted: FitResult
    fit_seconds: float
    trainable_params: int
    tower_state: dict[str, torch.Tensor]
    init: dict[str, Any]
    positions: dict[str, np.ndarray]
    config: FinetuneConfig
    lora: dict[str, Any] | None = None
    head0: ClassifierHead | None = None  # the head at step 0: WiSE-FT's zero-shot end (train.wise_ft)
    prefix_cache: dict[str, Any] = field(default_factory=dict)  # {"enabled": bool, "reason": str, "cut": ...}
    wise_ft: dict[str, Any] | None = None  # set when the weights are a WiSE-FT mix (train.wise_ft.apply_alpha)

    def scores(self, emb: LabelledEmbeddings, split: str, batch_size: int = 64) -> np.ndarray:
        """Logits of the fine-tuned model on ``split``'s labelled items (decoded through the encoder's transform)."""
        return predict(self.model, split_items(self.encoder, emb, emb.index(split), cache=False), batch_size)


def split_items(encoder: Encoder, emb: LabelledEmbeddings, positions: np.ndarray, *, augment: Augment | None = None,
                cache: bool = True) -> ImageItems:
    paths = [str(emb.dataset.table["image"].iloc[int(r)]) for r in emb.rows[positions]]
    return ImageItems(paths, encoder.image_transform(), augment, cache=cache)


def _objective(model: Any, split: Any, acts_tr: Any, acts_va: Any, train_items: Any, val_items: Any,
               y_tr: torch.Tensor, y_va: np.ndarray, config: FinetuneConfig) -> tuple[Any, Any]:
    """The loop's ``step`` (cross-entropy on a batch, from cached prefix activations when there are some) and its
    ``evaluate`` (val accuracy; without val items the latest epoch counts as the best)."""
    dev = y_tr.device
    va_size = len(y_va)

    def step(idx: torch.Tensor) -> torch.Tensor:
        if acts_tr is not None:
            logits = model.head(split.suffix(acts_tr[idx.to(acts_tr.device)]))  # type: ignore[union-attr]
        else:
            logits = model(train_items.pixels(idx.tolist()))
        return F.cross_entropy(logits.float(), y_tr[idx.to(dev)], label_smoothing=config.label_smoothing)

    def val_logits() -> np.ndarray:
        if acts_va is None:
            return predict(model, val_items, config.batch_size)
        model.eval()
        with torch.no_grad():
            out = [model.head(split.suffix(acts_va[s:s + config.batch_size])).float().cpu()  # type: ignore
                   for s in range(0, len(acts_va), config.batch_size)]
        return torch.cat(out).numpy()

    epochs_seen = [0]

    def evaluate() -> tuple[float, dict[str, float]]:
        epochs_seen[0] += 1
        if va_size == 0:  # nothing to choose on: the latest epoch is the best
            return float(epochs_seen[0]), {}
        logits = val_logits()
        acc = float((logits.argmax(axis=1) == y_va).mean())
        loss = float(F.cross_entropy(torch.from_numpy(logits), torch.from_numpy(y_va)))
        return acc, {"val_top1": acc, "val_loss": loss}

    return step, evaluate


def finetune_classifier(
    encoder: Encoder,
    emb: LabelledEmbeddings,
    store: EmbeddingStore,
    config: FinetuneConfig,
    *,
    templates: Sequence[str] = ("a photo of a {}.",),
    class_names: dict[str, str] | None = None,
    augment: Augment | None = None,
    plan: TrainPlan | None = None,
    progress: bool = False,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    run_config: dict[str, Any] | None = None,
    prefix_cache: bool | None = None,
    prefix_cache_store: bool = True,
) -> FinetuneResult:
    """Fine-tune ``encoder`` (changed in place) on ``emb``'s train images; early stopping on val accuracy.

    ``emb`` are the frozen encoder's labelled image embeddings (their rows and splits define the items; LP-FT fits
    its probe on them). Without val items every epoch runs and the last is kept.

    ``prefix_cache`` (None: whenever valid): run the frozen prefix (everything before the first trained group)
    once per image and train the rest from its cached outputs; the same losses and gradients, far fewer FLOPs.
    ``prefix_cache_store``: keep those outputs in ``store`` (a later fine-tune at the same cut reads them) rather
    than in memory for this fit only (``train.prefix``).
    """
    plan = plan or plan_training(encoder, config)
    if emb.modality != "image":
        raise EncoderlabError("finetune classifies images", "use a dataset with images")
    tr = emb.index("train")
    if tr.size == 0:
        raise EncoderlabError("the train split has no labelled items", "make splits with --split-ratios")
    va = emb.index("val") if "val" in set(emb.split.tolist()) else np.zeros(0, np.int64)
    head, init = initial_head(encoder, emb, store, plan.head_init, templates=templates, class_names=class_names,
                              seed=config.seed)
    head0 = copy.deepcopy(head)  # training changes ``head`` in place; WiSE-FT interpolates from this one
    dev = encoder.device
    tower = prepare_tower(encoder, plan, config)
    model = FinetuneModel(tower, head.to(dev)).to(dev)
    train_items = split_items(encoder, emb, tr, augment=augment, cache=False)
    val_items = split_items(encoder, emb, va)
    y_tr = torch.as_tensor(emb.y[tr], dtype=torch.long, device=dev)
    y_va = emb.y[va]
    t0 = time.perf_counter()
    split, acts_tr, acts_va, cache_info = prefix_activations(encoder, tower, plan, augment, model, train_items,
                                                             val_items, va.size > 0, config.batch_size, prefix_cache,
                                                             store=store if prefix_cache_store else None)

    step, evaluate = _objective(model, split, acts_tr, acts_va, train_items, val_items, y_tr, y_va, config)

    settings = config.loop_settings()
    if va.size == 0:
        settings = dataclasses.replace(settings, patience=settings.epochs + 1)
    groups = decay_groups(model.named_parameters(), config.weight_decay)
    if not groups:
        raise EncoderlabError("nothing to train (every parameter is frozen)", "drop --freeze-norms or train more")
    fitted = fit(model, step, int(tr.size), groups, evaluate, settings, progress=progress, desc="finetune",
                 checkpoint_dir=checkpoint_dir, resume=resume, run_config=run_config)
    fit_seconds = time.perf_counter() - t0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    tower_state, lora = _finish(encoder, plan, config)
    model.eval()
    return FinetuneResult(encoder, model, head, plan, fitted, fit_seconds, trainable, tower_state, init,
                          {"train": tr, "val": va}, config, lora, head0=head0, prefix_cache=cache_info)


def _finish(encoder: Encoder, plan: TrainPlan, config: FinetuneConfig
            ) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """What changed in the tower (to save), with LoRA merged into the weights; everything frozen again."""
    if plan.spec.kind == "heads":
        return {}, None
    model = trainable_module(encoder)
    lora = None
    if plan.spec.kind == "lora":
        state, scaling = unload_lora(model)
        merge_lora_state(model, state, scaling, what=encoder.spec)
        lora = {"rank": plan.spec.n, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
                "scaling": scaling, "targets": plan.lora_targets}
    else:
        state = trained_state(model)
    model.requires_grad_(False)
    getattr(encoder, "_weights_changed", lambda: None)()
    return state, lora


def trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the parameters that require grad, plus the persistent buffers (BatchNorm running statistics) of
    the modules that own such parameters: what a fine-tune changed, by the model's own names."""
    state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, m in model.named_modules():
        if any(p.requires_grad for p in m.parameters(recurse=False)):
            for b, t in m.named_buffers(recurse=False):
                if b not in m._non_persistent_buffers_set:
                    state[f"{name}.{b}" if name else b] = t.detach().clone()
    return state


def unload_lora(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], float]:
    """Replace every peft LoRA layer by its base layer; returns the factors ``lora.<name>.A/B`` and the scaling."""
    from peft.tuners.lora import LoraLayer

    state: dict[str, torch.Tensor] = {}
    scaling = 1.0
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        state[f"{LORA_PREFIX}{name}.A"] = module.lora_A["default"].weight.detach().clone()
        state[f"{LORA_PREFIX}{name}.B"] = module.lora_B["default"].weight.detach().clone()
        scaling = float(module.scaling["default"])
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return state, scaling
