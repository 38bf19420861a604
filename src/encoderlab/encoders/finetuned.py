"""``local:DIR`` for a model written by ``encoderlab finetune``: a base encoder, its changed image-tower weights, and
the classifier trained with them.

A directory holds ``encoderlab.json`` (kind "finetuned": base spec and fingerprint, what trained, the classifier's
shape and classes, the training record), ``tower.safetensors`` (only what changed: the trained image-tower
parameters and buffers by the model's own names, or for LoRA the ``lora.<module>.A`` / ``.B`` factors that are
merged into those modules' weights at load, ``W + scaling * B @ A``, exactly as peft merges them, so loading needs
no peft), ``classifier.safetensors`` (``weight`` [C, d], ``bias`` [C]), ``training_items.json.gz`` (train / val
image keys, so evaluations warn about items the model was trained or selected on) and, from the CLI, ``eval/``.
The base is rebuilt from its spec, so the directory stays small.

The loaded encoder is the base with the fine-tuned image tower (and, for a dual encoder, the unchanged text tower),
so zeroshot, probe, retrieval and compare run on it like on any encoder; ``classifier()`` gives the trained head.
A model fine-tuned with ``--objective contrastive`` has no classifier (``"classifier": null``, no classifier file);
its tower file may hold text-tower tensors and the model's ``logit_scale`` / ``logit_bias``, which set its scores.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_write_bytes, atomic_write_json, replace_entries
from ..errors import EncoderlabError
from ..hashing import json_digest
from .base import Encoder, FeatureSource, Modality, TrainingItems, state_dict_digest
from .local import read_model_config, rebuild_base, register_local_kind

KIND = "finetuned"
FORMAT_VERSION = 1
CONFIG_NAME = "encoderlab.json"
TOWER_NAME = "tower.safetensors"
CLASSIFIER_NAME = "classifier.safetensors"
TRAINING_ITEMS_NAME = "training_items.json.gz"  # same format as an aligned model's (aligned.encode_training_items)
EVAL_NAME = "eval"  # the run directory ``encoderlab finetune --out`` writes the test results to
#: every entry a fine-tuned model directory owns: replaced together on retraining; all other entries are kept
MODEL_FILES = (CONFIG_NAME, TOWER_NAME, CLASSIFIER_NAME, TRAINING_ITEMS_NAME, EVAL_NAME)
LORA_PREFIX = "lora."
HEAD_KINDS = ("cosine", "linear")


# ---- the classifier ---------------------------------------------------------------------------------------


class ClassifierHead(torch.nn.Module):
    """Class logits from tower features.

    ``cosine``: ``scale * cos(f, W)`` (+ a constant bias for sigmoid models, which a softmax ignores) — the
    zero-shot head of FLYP / WiSE-FT, ``W`` initialised to the normalised class prompt embeddings. ``linear``:
    ``f @ W.T + b`` on raw features — LP-FT's head, initialised from a linear probe fitted on the frozen features.
    """

    def __init__(self, kind: str, weight: torch.Tensor, bias: torch.Tensor | None = None, scale: float = 1.0) -> None:
        super().__init__()
        if kind not in HEAD_KINDS:
            raise ValueError(f"unknown head kind {kind!r}")
        self.kind, self.scale = kind, float(scale)
        self.weight = torch.nn.Parameter(weight.detach().clone().float())
        b = bias if bias is not None else torch.zeros(weight.shape[0])
        # the cosine head's bias is SigLIP's constant logit bias: a buffer, never trained
        if kind == "linear":
            self.bias = torch.nn.Parameter(b.detach().clone().float())
        else:
            self.register_buffer("bias", b.detach().clone().float())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.float()
        if self.kind == "cosine":
            return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T + self.bias
        return x @ self.weight.T + self.bias


class SavedClassifier:
    """The trained head on an encoder's image embeddings: ``decision_function(X)`` -> logits [n, C] (numpy)."""

    def __init__(self, head: ClassifierHead, classes: list[str]) -> None:
        self.head, self.classes = head.eval().requires_grad_(False), classes
        self.classes_ = np.arange(len(classes))

    def decision_function(self, X: Any) -> np.ndarray:
        with torch.no_grad():
            return self.head(torch.as_tensor(np.asarray(X, dtype=np.float32))).numpy()

    scores = decision_function


# ---- LoRA deltas ------------------------------------------------------------------------------------------


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``(B @ A) * scaling``: the weight change of one LoRA-adapted linear layer (peft's ``get_delta_weight``)."""
    return (b.float() @ a.float()) * scaling


def merge_lora_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], scaling: float,
                     what: str = "model") -> None:
    """Add the saved LoRA factors ``lora.<module>.A`` / ``.B`` into the weights of ``model``'s linear layers."""
    modules = dict(model.named_modules())
    names = sorted({k[len(LORA_PREFIX):].rsplit(".", 1)[0] for k in state})
    with torch.no_grad():
        for name in names:
            layer = modules.get(name)
            if not isinstance(layer, torch.nn.Linear):
                raise EncoderlabError(f"{what} has no linear layer {name!r} for its LoRA factors",
                                      "load the model with the base encoder it was trained from")
            delta = lora_delta(state[f"{LORA_PREFIX}{name}.A"], state[f"{LORA_PREFIX}{name}.B"], scaling)
            if tuple(delta.shape) != tuple(layer.weight.shape):
                raise EncoderlabError(f"{what}: LoRA factors of {name!r} do not fit its weight",
                                      "load the model with the base encoder it was trained from")
            layer.weight += delta.to(layer.weight.device, layer.weight.dtype)


def load_tower_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str = "model") -> None:
    """Copy saved parameters and buffers into ``model`` by name; unknown names or shapes are an error."""
    entries = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    unknown = [k for k in state if k not in entries]
    wrong = [k for k, v in state.items() if k in entries and tuple(v.shape) != tuple(entries[k].shape)]
    if unknown or wrong:
        raise EncoderlabError(f"{what}: the saved tower does not fit the base (unknown {unknown[:3]}, shapes differ "
                              f"for {wrong[:3]})", "load the model with the base encoder it was trained from")
    with torch.no_grad():
        for k, v in state.items():
            entries[k].copy_(v.to(entries[k].device, entries[k].dtype))


# ---- the directory format ---------------------------------------------------------------------------------


def check_output_dir(path: str | os.PathLike) -> None:
    """Refuse a file, or a non-empty directory that is not a fine-tuned model (it is someone's, not ours to replace)."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise EncoderlabError(f"output path {str(out)!r} is a file", "pass a directory path for the fine-tuned model")
    if out.is_dir() and (entries := sorted(p.name for p in out.iterdir())) and _kind(out) != KIND:
        raise EncoderlabError(f"output directory {str(out)!r} is not empty ({', '.join(entries[:5])}) and is not an "
                              "encoderlab fine-tuned model",
                              "pass a new or empty directory (in an existing fine-tuned model directory only the "
                              "model's own files are replaced)")


def _kind(path: Path) -> str | None:
    import json

    try:
        return json.loads((path / CONFIG_NAME).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None


def save_finetuned(out_dir: str | os.PathLike, config: dict[str, Any], tower: Mapping[str, torch.Tensor],
                   head: ClassifierHead | None, *, training_items: TrainingItems | None = None) -> Path:
    """Write the config, the changed tower tensors, the classifier and the training items; swapped in atomically."""
    from safetensors.torch import save as st_save

    from .aligned import encode_training_items

    out = Path(out_dir)
    check_output_dir(out)

    def plain(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}

    meta = {"format": "pt", "kind": KIND}
    with replace_entries(out, MODEL_FILES, commit=CONFIG_NAME) as tmp:
        atomic_write_bytes(tmp / TOWER_NAME, st_save(plain(tower), metadata=meta))
        if head is not None:  # contrastive fine-tuning trains no classifier
            atomic_write_bytes(tmp / CLASSIFIER_NAME, st_save(plain({"weight": head.weight, "bias": head.bias}),
                                                              metadata=meta))
        if training_items is not None:
            atomic_write_bytes(tmp / TRAINING_ITEMS_NAME, encode_training_items(training_items))
        atomic_write_json(tmp / CONFIG_NAME, config)
    return out


def read_finetuned_config(path: str | os.PathLike) -> dict[str, Any]:
    """The model's config, checked for kind and format version."""
    return read_model_config(path, KIND, "a fine-tuned model", "finetune", FORMAT_VERSION)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, FileNotFoundError, OSError) as e:
        raise EncoderlabError(f"{file} is missing or damaged ({e})",
                              "train it again with encoderlab finetune --out, or copy the directory again") from e


def _identity(features: torch.Tensor) -> torch.Tensor:
    return features.float()


class FinetunedEncoder(Encoder):
    """A base encoder with its fine-tuned image tower (text tower unchanged) and the classifier trained with it."""

    def __init__(self, path: str | os.PathLike, *, device: torch.device, precision: str) -> None:
        self.path = Path(path)
        self.config = cfg = read_finetuned_config(self.path)
        self.spec = f"local:{self.path}"
        self.base = rebuild_base(self.path, cfg, device=device, precision=precision, what="fine-tuned model",
                                 command="finetune")
        tower = _load_tensors(self.path / TOWER_NAME)
        self.tuned = bool(tower)  # heads only: the base's weights are untouched
        if tower:
            # an encoder with a separate trainable network (unfolded batch norms) takes the weights there and
            # rebuilds its inference network from it on the next encode (``_weights_changed``)
            trainable = getattr(self.base, "trainable_model", None)
            model = trainable if isinstance(trainable, torch.nn.Module) else getattr(self.base, "model", None)
            if not isinstance(model, torch.nn.Module):
                raise EncoderlabError(f"{str(self.path)!r}: base {cfg['base']!r} has no torch model to load the tower "
                                      "into", "load it with the base encoder it was trained from")
            lora = {k: v for k, v in tower.items() if k.startswith(LORA_PREFIX)}
            load_tower_state(model, {k: v for k, v in tower.items() if k not in lora}, what=self.spec)
            if lora:
                merge_lora_state(model, lora, float(cfg["train"]["lora"]["scaling"]), what=self.spec)
            getattr(self.base, "_weights_changed", lambda: None)()  # the base's cached weight digest is stale
            with torch.no_grad():  # a contrastive fine-tune trains the temperature (and SigLIP's bias) too
                if "logit_scale" in tower:
                    self.base.logit_scale = float(tower["logit_scale"].float().exp())
                if "logit_bias" in tower:
                    self.base.logit_bias = float(tower["logit_bias"].float())
        head_cfg = cfg.get("classifier")
        self.head: ClassifierHead | None = None
        self.classes: list[str] = []
        if head_cfg is not None:
            head_t = _load_tensors(self.path / CLASSIFIER_NAME)
            self.head = ClassifierHead(head_cfg["kind"], head_t["weight"], head_t["bias"], float(head_cfg["scale"]))
            self.classes = [str(c) for c in head_cfg["classes"]]
        self.modalities = self.base.modalities
        self.embed_dim = self.base.embed_dim
        self.score_kind = self.base.score_kind
        self.logit_scale, self.logit_bias = self.base.logit_scale, self.base.logit_bias
        self.device, self.precision = device, precision
        self.text_max_length = self.base.text_max_length
        self.preferred_batch_size = self.base.preferred_batch_size
        self._head_digest = state_dict_digest(self.head) if self.head is not None else None

    def fingerprint_parts(self) -> dict[str, Any]:
        from .aligned import tower_fingerprint

        return {"adapter": KIND, "format_version": int(self.config.get("format_version", FORMAT_VERSION)),
                "base": tower_fingerprint(self.base), "train": self.config["train"]["spec"],
                "classifier": self._head_digest, "classes": json_digest(self.classes)}

    def training_items(self) -> TrainingItems | None:
        from .aligned import read_training_items

        if not hasattr(self, "_training_items"):
            self._training_items = read_training_items(self.path)
        return self._training_items

    def feature_source(self, modality: Modality) -> FeatureSource | None:
        """Heads-only models embed exactly as their base: extraction reuses the base's cached features."""
        self.check_modality(modality)
        return None if self.tuned else FeatureSource(self.base, _identity)

    def classifier(self) -> SavedClassifier:
        """The trained head over this encoder's image embeddings (class order: ``self.classes``)."""
        if self.head is None:
            raise EncoderlabError(f"{self.spec!r} was fine-tuned contrastively and has no classifier",
                                  "classify with zeroshot or probe on it, or fine-tune with --objective classify")
        return SavedClassifier(self.head, self.classes)

    def image_transform(self) -> Any:
        return self.base.image_transform()

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        return self.base.encode_pixels(pixel_values, normalize=normalize)

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        return self.base.encode_text_batch(texts)


def load_finetuned(path: str | os.PathLike, *, device: torch.device, precision: str) -> Encoder:
    """``local:DIR`` loader for kind "finetuned"."""
    return FinetunedEncoder(path, device=device, precision=precision)


register_local_kind(KIND, load_finetuned, description="a base encoder + its fine-tuned image tower and classifier")
