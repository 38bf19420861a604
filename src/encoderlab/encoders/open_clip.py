"""``open_clip:ARCH[/PRETRAINED]`` — dual encoders from the optional open_clip backend.

``PRETRAINED`` is one of open_clip's tags (``laion2b_s34b_b79k``) or a local checkpoint file;
``open_clip:hf-hub:ORG/REPO`` loads an open_clip model published on the Hugging Face hub. open_clip is imported
only when such a spec is used.

Preprocessing is rebuilt from ``model.visual.preprocess_cfg`` with PIL + torch only, because open_clip's own
transform needs torchvision, which encoderlab does not require. The rebuilt transform reproduces torchvision's
eval pipeline (resize with truncated long side, center crop, or the keep-ratio resize plus crop-or-pad).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import EncoderlabError, close_matches
from ..normalize import normalize_rows
from .base import Encoder, ImageTransform, inference_context, state_dict_digest
from .hf_loading import hub_errors
from .registry import register_prefix
from .trainable import ModelBackedTrainable, TowerLayout, TowerModule

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "random": 3}  # open_clip evaluates "random" with bicubic
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def import_open_clip() -> Any:
    """The open_clip module, or an error naming the extra that installs it."""
    try:
        import open_clip
    except ImportError as e:
        raise EncoderlabError(
            f"open_clip specs need the open_clip_torch package, which could not be imported ({e})",
            "pip install 'encoderlab[open-clip]' (it also needs torchvision matching your torch)",
        ) from e
    return open_clip


def parse_open_clip_target(target: str) -> tuple[str, str | None]:
    """Split a target into (architecture, pretrained tag or checkpoint path or None).

    ``ViT-B-32/laion2b_s34b_b79k`` -> (arch, tag); ``ViT-B-32//abs/ckpt.pt`` -> (arch, path);
    ``hf-hub:org/repo`` -> (hub id, None).
    """
    target = target.strip()
    if target.startswith("hf-hub:"):
        if len(target) == len("hf-hub:"):
            raise EncoderlabError(f"open_clip spec {target!r} names no hub repo", "e.g. open_clip:hf-hub:org/repo")
        return target, None
    arch, _, pretrained = target.partition("/")
    if not arch:
        raise EncoderlabError(f"open_clip spec {target!r} names no architecture", "e.g. open_clip:ViT-B-32/openai")
    return arch, (pretrained or None)


@dataclass
class KeepRatioTransform:
    """open_clip's ``ResizeKeepRatio`` + ``CenterCropOrPad`` (resize_mode "longest", or non-square "shortest")."""

    size: tuple[int, int]  # (h, w)
    longest: float  # 1: fit the longest side (then pad), 0: fit the shortest side (then crop)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = 3
    fill: int = 0

    def __call__(self, image: Any) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        th, tw = self.size
        rh, rw = h / th, w / tw
        ratio = max(rh, rw) * self.longest + min(rh, rw) * (1.0 - self.longest)
        nh, nw = round(h / ratio), round(w / ratio)
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample=Image.Resampling(self.resample))
        if tw > nw or th > nh:  # pad first, left/top getting the smaller half, as open_clip does
            left, top = max(0, (tw - nw) // 2), max(0, (th - nh) // 2)
            canvas = Image.new("RGB", (max(tw, nw), max(th, nh)), (self.fill,) * 3)
            canvas.paste(image, (left, top))
            image, (nw, nh) = canvas, canvas.size
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        image = image.crop((left, top, left + tw, top + th))
        arr = np.asarray(image, dtype=np.float32) / 255.0
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def config(self) -> dict[str, Any]:
        return {
            "keep_ratio": list(self.size),
            "longest": self.longest,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
            "fill": self.fill,
        }


def transform_from_preprocess_cfg(cfg: dict[str, Any]) -> ImageTransform | KeepRatioTransform:
    """The eval transform open_clip's ``image_transform_v2`` would build, without torchvision."""
    size = cfg.get("size", 224)
    hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    mean = tuple(float(v) for v in (cfg.get("mean") or OPENAI_MEAN))
    std = tuple(float(v) for v in (cfg.get("std") or OPENAI_STD))
    interpolation = cfg.get("interpolation") or "bicubic"
    if interpolation not in _RESAMPLE:
        raise EncoderlabError(f"open_clip interpolation {interpolation!r} is not supported", "use bicubic or bilinear")
    resample = _RESAMPLE[interpolation]
    mode = cfg.get("resize_mode") or "shortest"
    if mode == "squash":
        return ImageTransform(resize=hw, crop=None, mean=mean, std=std, resample=resample)
    if mode == "longest":
        return KeepRatioTransform(hw, 1.0, mean, std, resample, int(cfg.get("fill_color") or 0))
    if mode != "shortest":
        raise EncoderlabError(f"open_clip resize_mode {mode!r} is not supported", "use shortest, longest or squash")
    if hw[0] == hw[1]:
        return ImageTransform(resize=hw[0], crop=hw, mean=mean, std=std, resample=resample)
    return KeepRatioTransform(hw, 0.0, mean, std, 3)  # open_clip's ResizeKeepRatio here is always bicubic


def _preprocess_cfg(model: Any) -> dict[str, Any]:
    cfg = getattr(getattr(model, "visual", None), "preprocess_cfg", None)
    if cfg:
        return dict(cfg)
    size = getattr(getattr(model, "visual", None), "image_size", 224)  # open_clip < 2.23: OpenAI defaults
    return {"size": size, "mean": OPENAI_MEAN, "std": OPENAI_STD, "interpolation": "bicubic"}


class OpenClipEncoder(ModelBackedTrainable, Encoder):
    """An open_clip model: ``encode_image`` / ``encode_text`` with ``normalize=False`` and the learned scores."""

    def __init__(self, target: str, *, device: torch.device, precision: str) -> None:
        open_clip = import_open_clip()
        model_name, pretrained = parse_open_clip_target(target)
        self.spec = f"open_clip:{target}"
        self.model_name, self.pretrained = model_name, pretrained
        self.device, self.precision = device, precision
        self.model = _create_model(open_clip, model_name, pretrained).to(device).eval()
        try:
            self.tokenizer = open_clip.get_tokenizer(model_name)
        except hub_errors() as e:  # SigLIP-style models fetch an HF tokenizer from the hub
            raise EncoderlabError(
                f"could not load the tokenizer of open_clip model {model_name!r}: {str(e).splitlines()[0]}",
                "its tokenizer comes from the Hugging Face hub: run once where the hub is reachable so it is cached",
            ) from e
        self.modalities = ("image", "text")
        self._transform = transform_from_preprocess_cfg(_preprocess_cfg(self.model))
        self._weights_digest: str | None = None
        with torch.no_grad():
            self.logit_scale = float(self.model.logit_scale.float().exp().item())
            bias = getattr(self.model, "logit_bias", None)
            self.logit_bias = float(bias.float().item()) if isinstance(bias, torch.Tensor) else None
        self.score_kind = "sigmoid" if self.logit_bias is not None else "softmax"
        self.text_max_length = int(getattr(self.tokenizer, "context_length", 77))  # pads every text to it
        self.embed_dim = int(self.encode_text_batch(["a"]).shape[-1])

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """``{"input_ids": ids}`` exactly as open_clip's tokenizer makes them (padded to its context length)."""
        return {"input_ids": self.tokenizer(list(texts))}

    def image_transform(self) -> ImageTransform | KeepRatioTransform:
        return self._transform

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)
        with inference_context(self.device, self.precision):
            out = self.model.encode_image(x, normalize=False)
        out = out.float().cpu()
        return normalize_rows(out) if normalize else out

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenize(texts)["input_ids"].to(self.device)
        with inference_context(self.device, self.precision):
            out = self.model.encode_text(ids, normalize=False)
        return out.float().cpu()

    def fingerprint_parts(self) -> dict[str, Any]:
        if self._weights_digest is None:
            self._weights_digest = state_dict_digest(self.model)
        return {
            "adapter": "open_clip",
            "model_name": self.model_name,
            "weights": self._weights_digest,
            "image_transform": self._transform.config(),
            "tokenizer": {"class": type(self.tokenizer).__name__, "context_length": self.text_max_length},
            "pooling": "model",
        }


    # ---- the trainable contract (encoders.trainable): the same features, with gradients ---------------------
    def tower_layout(self, tower: str) -> TowerLayout:
        """Where the ``tower`` ("image" / "text") parameters live: open_clip's ViT image and text transformers."""
        if tower not in self.modalities:
            raise EncoderlabError(f"unknown tower {tower!r} of {self.spec!r}", "use image or text")
        return open_clip_layout(self.model, tower, self.spec)

    def image_module(self) -> TowerModule:
        """Pixel values -> ``encode_image(normalize=False)``, as in ``encode_pixels`` but fp32 with gradients."""

        def features(pixel_values: torch.Tensor) -> torch.Tensor:
            x = pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)
            return self.model.encode_image(x, normalize=False)

        return TowerModule(self.model, self.tower_layout("image"), features, on_train=self._weights_changed)

    def text_module(self) -> TowerModule:
        """``tokenize`` dict -> ``encode_text(normalize=False)``, with gradients."""

        def features(tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return self.model.encode_text(tokens["input_ids"].to(self.device), normalize=False)

        return TowerModule(self.model, self.tower_layout("text"), features, on_train=self._weights_changed)

    def _weights_changed(self) -> None:
        self._weights_digest = None  # recomputed on the next fingerprint


def open_clip_layout(model: torch.nn.Module, tower: str, spec: str = "open_clip model") -> TowerLayout:
    """The layout of open_clip's ViT towers (``CLIP``: text at the top level; ``CustomTextCLIP``: under ``text``)."""
    names = [n for n, _ in model.named_parameters()]
    if tower == "image":
        if not any(n.startswith("visual.transformer.resblocks.") for n in names):
            raise EncoderlabError(f"{spec}: only open_clip ViT image towers are trainable here",
                                  "use a ViT architecture (e.g. ViT-B-32) or an hf: dual encoder")
        v = "visual."
        return TowerLayout(
            before=(("embeddings", tuple(v + p for p in ("conv1", "class_embedding", "positional_embedding",
                                                         "ln_pre"))),),
            blocks=v + "transformer.resblocks",
            after=(("pool", (v + "attn_pool",)), ("final_norm", (v + "ln_post",)), ("projection", (v + "proj",))),
        )
    t = "text." if any(n.startswith("text.") for n in names) else ""
    return TowerLayout(before=(("embeddings", (t + "token_embedding", t + "positional_embedding")),),
                       blocks=t + "transformer.resblocks",
                       after=(("final_norm", (t + "ln_final",)), ("projection", (t + "text_projection",))))


def _create_model(open_clip: Any, model_name: str, pretrained: str | None) -> torch.nn.Module:
    """``open_clip.create_model`` with unknown names, tags, files and hub failures as clear errors."""
    if pretrained and (pretrained.endswith(_CHECKPOINT_SUFFIXES) or os.sep in pretrained):
        path = os.path.expanduser(pretrained)
        if not os.path.isfile(path):
            raise EncoderlabError(f"open_clip checkpoint {pretrained!r} does not exist", "pass a .pt/.safetensors file")
        pretrained = path
    elif not model_name.startswith("hf-hub:"):
        known = open_clip.list_models()
        if model_name not in known:
            guess = close_matches(model_name, known)
            hint = f"did you mean {', '.join(guess)}?" if guess else "see open_clip.list_models()"
            raise EncoderlabError(f"open_clip has no architecture {model_name!r}", hint)
        if pretrained:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            if pretrained not in tags:
                raise EncoderlabError(
                    f"open_clip has no pretrained tag {pretrained!r} for {model_name}",
                    f"known tags: {', '.join(tags) or 'none'}",
                )
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained)
    except (RuntimeError, *hub_errors()) as e:
        raise EncoderlabError(
            f"could not load open_clip model {model_name!r} (pretrained={pretrained!r}): {str(e).splitlines()[0]}",
            "check the network (weights download from the Hugging Face hub), or pass a local checkpoint: "
            "open_clip:ARCH/path/to/checkpoint.pt",
        ) from e
    return model[0] if isinstance(model, tuple) else model


def load_open_clip(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``open_clip:ARCH[/PRETRAINED]`` factory; imports open_clip lazily."""
    return OpenClipEncoder(target, device=device, precision=precision)


register_prefix("open_clip", load_open_clip, "open_clip dual encoder: ARCH/PRETRAINED (needs the open-clip extra)")
