"""Hugging Face transformers adapters: ``hf:`` dual encoders, ``hf-vision:`` backbones, ``hf-text:`` text encoders.

Everything loads through ``from_pretrained`` (config, weights, tokenizer, image processor), so a hub id and a
directory written by ``save_pretrained`` behave the same. Preprocessing is the model's own image processor (PIL
backend, the reference implementation) and its own tokenizer, with each family's padding rule: CLIP and ALIGN trim
padding to the longest text in a batch, SigLIP pads to ``max_length`` because its text tower was trained that way.

Options ride on the spec after ``?``: ``hf-vision:facebook/dinov2-small?pool=mean``,
``hf-text:BAAI/bge-small-en-v1.5?pool=cls&max_length=256``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import EncoderlabError
from ..hashing import json_digest
from ..normalize import normalize_rows
from .base import Encoder, ScoreKind, inference_context, state_dict_digest
from .hf_loading import load_config, load_image_processor, load_model, load_tokenizer, output_tensor, split_target
from .hf_onnx import INT8_ENV, TowerRuntime, int8_wanted, parameter_version
from .onnx_runtime import ENV_SWITCH, onnxruntime_wanted
from .registry import register_prefix
from .trainable import ModelBackedTrainable, ParameterGroups, TowerLayout, TowerModule

# ---- family tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DualFamily:
    """How one dual-encoder family scores and tokenizes."""

    score_kind: ScoreKind
    padding: Literal["longest", "max_length"]
    #: SigLIP's text tower was trained on max_length-padded ids with no attention mask (big_vision, open_clip);
    #: passing a mask changes its last-token pooled output.
    use_attention_mask: bool = True
    #: truncation length used by the family's own processor, when it overrides the tokenizer's
    max_length: int | None = None
    #: FLAVA's get_image_features / get_text_features project every token; its contrastive embedding (the one
    #: FlavaForPreTraining scores) is the first (CLS) token of that sequence
    first_token: bool = False


DUAL_FAMILIES: dict[str, DualFamily] = {
    "clip": DualFamily(score_kind="softmax", padding="longest"),
    "siglip": DualFamily(score_kind="sigmoid", padding="max_length", use_attention_mask=False),
    "align": DualFamily(score_kind="softmax", padding="longest", max_length=64),  # AlignProcessor's max_length
    "flava": DualFamily(score_kind="softmax", padding="longest", first_token=True),  # BERT tokenizer, masked
}


def _layout(embeddings: tuple[str, ...], blocks: str, *after: tuple[str, tuple[str, ...]]) -> TowerLayout:
    return TowerLayout(before=(("embeddings", embeddings),), blocks=blocks, after=after)


#: where each family's towers live in the transformers model, input -> output (the trainable contract's groups)
DUAL_LAYOUTS: dict[str, dict[str, TowerLayout]] = {
    "clip": {
        "image": _layout(("vision_model.embeddings", "vision_model.pre_layrnorm"), "vision_model.encoder.layers",
                         ("final_norm", ("vision_model.post_layernorm",)), ("projection", ("visual_projection",))),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layers",
                        ("final_norm", ("text_model.final_layer_norm",)), ("projection", ("text_projection",))),
    },
    "siglip": {  # SigLIP's "head"s are its projections: attention pooling (image), a linear layer (text)
        "image": _layout(("vision_model.embeddings",), "vision_model.encoder.layers",
                         ("final_norm", ("vision_model.post_layernorm",)), ("projection", ("vision_model.head",))),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layers",
                        ("final_norm", ("text_model.final_layer_norm",)), ("projection", ("text_model.head",))),
    },
    "align": {  # EfficientNet image features are pooled without a projection; BERT's pooler is unused
        "image": _layout(("vision_model.embeddings",), "vision_model.encoder.blocks"),
        "text": _layout(("text_model.embeddings",), "text_model.encoder.layer",
                        ("pooler", ("text_model.pooler",)), ("projection", ("text_projection",))),
    },
    # FLAVA: ViT / BERT towers projecting the final-norm CLS token; their tanh poolers are unused (listed so each
    # tower's parameters are covered), and the multimodal encoder is in neither tower
    "flava": {
        tower: _layout((f"{tower}_model.embeddings",), f"{tower}_model.encoder.layer",
                       ("pooler", (f"{tower}_model.pooler",)), ("final_norm", (f"{tower}_model.layernorm",)),
                       ("projection", (f"{tower}_projection",)))
        for tower in ("image", "text")
    },
}

def _single(embeddings: str, blocks: str, *after: str) -> TowerLayout:
    return TowerLayout(before=(("embeddings", (embeddings,)),), blocks=blocks, after=tuple((a, (a,)) for a in after))


_VIT = (_single("embeddings", "layers", "layernorm", "pooler"),  # transformers 5: ViTModel.layers
        _single("embeddings", "encoder.layer", "layernorm", "pooler"))  # transformers 4: ViTModel.encoder.layer
_BERT = (_single("embeddings", "encoder.layer", "pooler"),)
#: single-tower layouts by ``model_type``, input -> output (embeddings -> blocks / stages -> final norm, pooler);
#: several candidates where transformers versions name the blocks differently (the first that exists is used).
#: A ResNet's "blocks" are its stages; its pooler is a parameter-free average pool.
SINGLE_LAYOUTS: dict[str, tuple[TowerLayout, ...]] = {
    "vit": _VIT,
    "deit": _VIT,
    "dinov2": (_single("embeddings", "encoder.layer", "layernorm"),),
    "dinov2_with_registers": (_single("embeddings", "encoder.layer", "layernorm"),),
    "resnet": (_single("embedder", "encoder.stages", "pooler"),),
    "bert": _BERT,
    "roberta": _BERT,
    "xlm-roberta": _BERT,
}


def single_layout(model: torch.nn.Module, model_type: str, spec: str) -> TowerLayout:
    """The layout of a one-tower model, or an error naming the family and the ones with a block map."""
    for layout in SINGLE_LAYOUTS.get(model_type, ()):
        try:
            model.get_submodule(layout.blocks)
        except AttributeError:
            continue
        return layout
    known = ", ".join(sorted(SINGLE_LAYOUTS))
    raise EncoderlabError(f"{spec!r} is a {model_type!r} model, which has no block map for training (known: {known})",
                          "train only the classifier (--train heads), or use a family with a block map")


#: model types whose image input is not a fixed-size [C,H,W] tensor, with what to use instead
UNSUPPORTED_DUAL: dict[str, str] = {
    "siglip2": "NaFlex SigLIP 2 (model_type siglip2) takes variable-size patch sequences, which this adapter does "
    "not support; the fixed-resolution SigLIP 2 checkpoints (e.g. google/siglip2-base-patch16-224) load as "
    "model_type siglip and work with hf:",
}

#: two unrelated texts encoded at load: a model that embeds them identically has a broken tokenizer
SANITY_TEXTS = ("a photo of a cat", "the stock market report")
#: above this the two texts count as one embedding. Not 0.9999: tiny random towers pooling the CLS token reach
#: 1 - 6e-6 (their residual stream is mostly the CLS embedding), while real models keep unrelated texts far apart
SAME_TEXT_COSINE = 1 - 1e-6

PoolMode = Literal["pooler", "cls", "mean"]
VISION_POOLS: tuple[str, ...] = ("pooler", "cls", "mean")
TEXT_POOLS: tuple[str, ...] = ("mean", "cls")

#: default image pooling per ``model_type``: "pooler" where the family's pooler_output is its trained global
#: descriptor, "cls" where the classifier reads the CLS token but the pooler is an (often untrained) tanh layer,
#: "mean" (patch tokens without CLS/registers, or spatial mean for CNN maps) for everything else.
VISION_POOLING: dict[str, PoolMode] = {
    "vit": "cls",  # ViTForImageClassification and DINO read the final-norm CLS; ViTModel's tanh pooler is untrained
    "deit": "cls",  # same structure as ViT
    "vit_mae": "mean",  # MAE's CLS is not trained for a global representation; its papers mean-pool patches
    "dinov2": "pooler",  # final-norm CLS token, DINOv2's global descriptor
    "dinov2_with_registers": "pooler",
    "beit": "pooler",  # layer-normed mean of patch tokens (use_mean_pooling)
    "data2vec-vision": "pooler",
    "clip_vision_model": "pooler",  # post-layernorm CLS (unprojected)
    "siglip_vision_model": "pooler",  # attention-pooling head
    "swin": "pooler",  # average of final-norm tokens
    "swinv2": "pooler",
    "resnet": "pooler",  # global average pool of the last stage
    "convnext": "pooler",  # layer-normed global average pool
    "convnextv2": "pooler",
    "regnet": "pooler",
    "bit": "pooler",
    "efficientnet": "pooler",
    "mobilenet_v2": "pooler",
}

#: submodule prefixes that only feed ``pooler_output``: when a checkpoint lacks them and we do not pool with them,
#: their random initialization must not reach the fingerprint
_POOLER_PREFIXES = ("pooler.",)

class HFImageTransform:
    """Picklable ``PIL.Image -> Tensor[C,H,W]`` running the model's own image processor on one image."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> torch.Tensor:
        if getattr(image, "mode", "RGB") != "RGB":
            image = image.convert("RGB")
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def config(self) -> dict[str, Any]:
        cfg = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        cfg["class"] = type(self.processor).__name__  # PIL and torchvision backends differ slightly
        return cfg


def _text_max_length(tokenizer: Any, text_config: Any, override: int | None = None) -> int | None:
    """Truncation length: the smallest of the override, the tokenizer's limit and the position table."""
    limits = [override] if override else []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # unset limits are a huge sentinel
        limits.append(tok_max)
    pos = getattr(text_config, "max_position_embeddings", None)
    if isinstance(pos, int) and pos > 0:
        limits.append(pos)
    return min(limits) if limits else None


class TextTokenization:
    """One family's tokenization rule: padding, truncation length, which inputs reach the model."""

    def __init__(self, tokenizer: Any, padding: str, max_length: int | None, use_attention_mask: bool) -> None:
        if padding == "max_length" and max_length is None:
            raise EncoderlabError("padding to max_length needs a maximum length", "set max_length in the spec")
        if tokenizer.pad_token is None:  # decoder-style tokenizers: padding is masked out, any id will do
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        self.tokenizer = tokenizer
        self.padding = padding
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask

    def __call__(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts),
            padding=self.padding,
            truncation=self.max_length is not None,
            max_length=self.max_length,
            return_tensors="pt",
        )
        batch = dict(batch)
        if not self.use_attention_mask:
            batch.pop("attention_mask", None)
        return batch

    def config(self) -> dict[str, Any]:
        tok = self.tokenizer
        vocab = sorted(tok.get_vocab().items())
        return {
            "class": type(tok).__name__,
            "vocab": json_digest(vocab),
            "do_lower_case": getattr(tok, "do_lower_case", None),
            "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
            "padding": self.padding,
            "max_length": self.max_length,
            "attention_mask": self.use_attention_mask,
        }


# ---- encoders ----------------------------------------------------------------------------------------------


class _HFEncoder(Encoder):
    """Shared plumbing: device placement, forward under inference_context, cached fingerprint parts."""

    adapter: str = "hf"

    def __init__(self, model_id: str, model: torch.nn.Module, device: torch.device, precision: str) -> None:
        self.spec = model_id
        self.model_id = model_id
        self.device = device
        self.precision = precision
        self.model = model.to(device).eval()
        self.model_type: str = getattr(model.config, "model_type", type(model).__name__)
        self._digest_exclude: list[str] = []
        self._parts: dict[str, Any] | None = None
        self._parts_version: int | None = None

    def fingerprint_parts(self) -> dict[str, Any]:
        # Hashing every weight and the vocabulary is the slow part: do it once per encoder -- and again only when
        # the weights were written in place since (``load_state_dict``, an optimizer step), which bumps the
        # parameters' version counters: a digest of the old weights would key new embeddings into their space.
        version = parameter_version(self.model)
        if self._parts is not None and version is not None and version != self._parts_version:
            self._weights_changed()
        if self._parts is None:
            self._parts = {
                "adapter": self.adapter,
                "model_type": self.model_type,
                "weights": state_dict_digest(self.model, exclude=self._digest_exclude),
                **self._preprocessing_parts(),
            }
            self._parts_version = version
        return dict(self._parts)

    def _weights_changed(self) -> None:
        self._parts = None  # the weight digest is recomputed on the next fingerprint

    def _preprocessing_parts(self) -> dict[str, Any]:
        """Image processor / tokenizer / pooling config: whatever besides weights changes the embeddings."""
        raise NotImplementedError

    def _pixels(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return pixel_values.to(self.device, dtype=torch.float32, non_blocking=True)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    @staticmethod
    def _finish(x: torch.Tensor, normalize: bool) -> torch.Tensor:
        x = x.float().cpu()
        return normalize_rows(x) if normalize else x

    def _check_texts_differ(self) -> int:
        """Encode two unrelated texts and refuse a model that cannot tell them apart; returns the embedding dim.

        An empty or default tokenizer (vocabulary files missing from a hub repo or a copied directory) maps every
        text to unknown tokens, and nothing downstream would notice: zero-shot and retrieval just become chance.
        Two checks: the tokens (all one non-special id: the tokenizer has no vocabulary, whatever the model), and
        the embeddings (identical: the text tower ignores its input).
        """
        texts = list(SANITY_TEXTS)
        tokens = self.tokenize(texts)["input_ids"]
        special = set(getattr(self.tokenization.tokenizer, "all_special_ids", []) or [])
        raw = [[int(i) for i in row] for row in tokens]
        ids = [[i for i in row if i not in special] for row in raw]
        z = self.encode_text_batch(texts).float()
        norms = z.norm(dim=-1)
        cosine = float(z[0] @ z[1] / norms.prod()) if bool((norms > 0).all()) else 1.0
        fix = "check its tokenizer files (AutoTokenizer.from_pretrained(ORIGINAL).save_pretrained(DIR)) and weights"
        if len({i for row in ids for i in row}) <= 1:
            raise EncoderlabError(
                f"the tokenizer of {self.model_id!r} has no usable vocabulary: {texts[0]!r} and {texts[1]!r} "
                f"become the same unknown / special tokens ({raw[0]} and {raw[1]}), so every text would get the same "
                "embedding",
                fix,
            )
        if cosine > SAME_TEXT_COSINE:
            raise EncoderlabError(
                f"{self.model_id!r} gives different texts the same embedding (cosine {cosine:.6f} between "
                f"{texts[0]!r} and {texts[1]!r}): its text weights are broken, so zero-shot and retrieval would be "
                "meaningless", fix,
            )
        return int(z.shape[-1])


class HFDualEncoder(ModelBackedTrainable, _HFEncoder):
    """CLIP / SigLIP / ALIGN / FLAVA: projected image and text embeddings in one space, with the model's own scoring."""

    adapter = "hf-dual"

    def __init__(self, model_id: str, *, device: torch.device, precision: str) -> None:
        config = load_config(model_id)
        model_type = getattr(config, "model_type", None)
        family = _dual_family(model_id, config)
        model, missing = load_model(model_id)
        super().__init__(model_id, model, device, precision)
        self.family = family
        self.modalities = ("image", "text")
        self.score_kind = family.score_kind
        self.processor = load_image_processor(model_id)
        tokenizer = load_tokenizer(model_id)
        self.tokenization = TextTokenization(
            tokenizer,
            padding=family.padding,
            max_length=_text_max_length(tokenizer, getattr(config, "text_config", None), family.max_length),
            use_attention_mask=family.use_attention_mask,
        )
        if family.padding == "max_length":
            self.text_max_length = self.tokenization.max_length
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        self._set_scores(model_type)
        # ONNX Runtime for each tower (hf_onnx), built on its first CPU fp32 batch; equal to PyTorch to ~1e-7
        self._onnx_image, self._onnx_text = TowerRuntime("image"), TowerRuntime("text")
        self.int8 = int8_wanted()  # opt-in: dynamic int8 image tower (different embeddings, own fingerprint)
        if self.int8 and not onnxruntime_wanted(self.device, self.precision):
            raise EncoderlabError(f"{INT8_ENV}=1 runs the image tower in ONNX Runtime, which is off or unavailable "
                                  f"here (CPU fp32 with the onnx extra, {ENV_SWITCH} not 0)", f"unset {INT8_ENV}")
        with self._onnx_text.pause():
            self.embed_dim = self._probe_dim()

    def _set_scores(self, model_type: str | None) -> None:
        with torch.no_grad():
            if model_type == "align":  # logits = cos / temperature
                self.logit_scale = float(1.0 / self.model.temperature.float().item())
            else:
                self.logit_scale = float(self.model.logit_scale.float().exp().item())
            bias = getattr(self.model, "logit_bias", None)
            self.logit_bias = float(bias.float().item()) if isinstance(bias, torch.Tensor) else None

    def _probe_dim(self) -> int:
        return self._check_texts_differ()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact model inputs for ``texts`` (CPU tensors): padding, truncation and masks as the family needs."""
        return self.tokenization(texts)

    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor)

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        network = self._onnx_image.network_for(self, {"pixel_values": pixel_values})
        if network is not None:  # CPU fp32: ONNX Runtime (hf_onnx), equal to the PyTorch path below to ~1e-7
            return self._finish(network({"pixel_values": pixel_values}), normalize)
        if self.int8:  # the image fingerprint promises int8 embeddings: fp32 ones must not be stored under it
            raise EncoderlabError(f"{INT8_ENV}=1: the int8 image tower of {self.spec!r} cannot run here "
                                  f"({ENV_SWITCH}=0, training mode, or another input size)", f"unset {INT8_ENV}")
        with inference_context(self.device, self.precision):
            out = self._features(self.model.get_image_features(pixel_values=self._pixels(pixel_values)))
        return self._finish(out, normalize)

    @property
    def runtime(self) -> str:
        """What runs the image tower: "onnxruntime" once its export is in use, else "torch"."""
        return "onnxruntime" if self._onnx_image.network is not None else "torch"

    @property
    def text_runtime(self) -> str:
        """What runs the text tower: "onnxruntime" once its export is in use, else "torch"."""
        return "onnxruntime" if self._onnx_text.network is not None else "torch"

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenize(texts)
        network = self._onnx_text.network_for(self, tokens)
        if network is not None:  # dynamic sequence axis: the per-batch padding trim still applies
            return network(tokens).float()
        batch = self._to_device(tokens)
        with inference_context(self.device, self.precision):
            out = self._features(self.model.get_text_features(**batch))
        return out.float().cpu()

    def _features(self, out: Any) -> torch.Tensor:
        """One embedding per input from a get_*_features output (FLAVA: the CLS token of its projected sequence)."""
        x = output_tensor(out)
        return x[:, 0] if self.family.first_token else x

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {
            "image_processor": self.image_transform().config(),
            "tokenizer": self.tokenization.config(),
            "pooling": "model",  # get_image_features / get_text_features: the family's own projection
        }

    def fingerprint(self, modality: Any = None) -> str:
        """As ``Encoder.fingerprint``; an int8 image tower gives other image embeddings, so another image key
        (texts, still fp32, keep theirs). fp32 ONNX Runtime and PyTorch agree to ~1e-7 and share one."""
        if not self.int8 or modality == "text":
            return super().fingerprint(modality)
        return json_digest({"base": super().fingerprint(modality), "image_tower": "onnxruntime-int8-dynamic"})

    # ---- the trainable contract (encoders.trainable): the same features, with gradients ---------------------
    def tower_layout(self, tower: str) -> TowerLayout:
        """Where the ``tower`` ("image" / "text") parameters live in this family's model."""
        if tower not in self.modalities:
            raise EncoderlabError(f"unknown tower {tower!r} of {self.spec!r}", "use image or text")
        return DUAL_LAYOUTS[self.model_type][tower]

    def image_module(self) -> TowerModule:
        """Pixel values -> ``get_image_features``, as in ``encode_pixels`` but fp32 and with gradients."""

        def features(pixel_values: torch.Tensor) -> torch.Tensor:
            return self._features(self.model.get_image_features(pixel_values=self._pixels(pixel_values)))

        return TowerModule(self.model, self.tower_layout("image"), features, on_train=self._weights_changed)

    def text_module(self) -> TowerModule:
        """``tokenize`` dict -> ``get_text_features``, as in ``encode_text_batch`` but with gradients."""

        def features(tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return self._features(self.model.get_text_features(**self._to_device(dict(tokens))))

        return TowerModule(self.model, self.tower_layout("text"), features, on_train=self._weights_changed)

    def _weights_changed(self) -> None:
        self._parts = None  # the weight digest is recomputed on the next fingerprint
        self._onnx_image.reset()  # and the ONNX exports of the old weights are not used again
        self._onnx_text.reset()


def _dual_family(model_id: str, config: Any) -> DualFamily:
    model_type = getattr(config, "model_type", None)
    if model_type in DUAL_FAMILIES:
        return DUAL_FAMILIES[model_type]
    if model_type in UNSUPPORTED_DUAL:
        raise EncoderlabError(f"{model_id!r}: {UNSUPPORTED_DUAL[model_type]}")
    vision = hasattr(config, "num_channels") or hasattr(config, "image_size") or hasattr(config, "hidden_sizes")
    alt = "hf-vision" if vision else "hf-text"
    raise EncoderlabError(
        f"{model_id!r} is a {model_type!r} model, not a dual image-text encoder "
        f"(hf: supports {', '.join(sorted(DUAL_FAMILIES))})",
        f"use {alt}:{model_id} for its {'image' if vision else 'text'} embeddings",
    )


def _load_single_tower(model_id: str) -> tuple[Any, Any, list[str]]:
    """(config, model, missing keys) of a one-tower model; a dual encoder is pointed at ``hf:``."""
    config = load_config(model_id)
    model_type = getattr(config, "model_type", None)
    if model_type in DUAL_FAMILIES or model_type in UNSUPPORTED_DUAL:
        raise EncoderlabError(
            f"{model_id!r} is a dual image-text encoder ({model_type})", f"use hf:{model_id} for its embeddings"
        )
    model, missing = load_model(model_id)
    return config, model, missing


class _SingleTowerTrainable(ModelBackedTrainable):
    """``ModelBackedTrainable`` for one-tower models whose embedding may not use the model's pooler."""

    pool: str

    def parameter_groups(self, tower: str) -> ParameterGroups:
        """The layout's groups, without the pooler's unless the embedding is the pooler output (``?pool=pooler``,
        vision only): a group that gets no gradient would make ``last:1`` train nothing."""
        return [(n, ps) for n, ps in super().parameter_groups(tower) if n != "pooler" or self.pool == "pooler"]


class HFVisionEncoder(_SingleTowerTrainable, _HFEncoder):
    """Any AutoModel vision backbone; the embedding is pooled per ``VISION_POOLING`` (or ``?pool=``).

    Trainable (``encoders.trainable``) for the families of ``SINGLE_LAYOUTS``; the whole model is the image tower.
    """

    adapter = "hf-vision"

    def __init__(self, target: str, *, device: torch.device, precision: str) -> None:
        model_id, options = split_target(target, {"pool": VISION_POOLS})
        config, model, missing = _load_single_tower(model_id)
        model_type = getattr(config, "model_type", None)
        super().__init__(model_id, model, device, precision)
        self.modalities = ("image",)
        self.pool: PoolMode = options.get("pool") or VISION_POOLING.get(str(model_type), "mean")
        if self.pool == "pooler" and any(k.startswith(_POOLER_PREFIXES) for k in missing):
            raise EncoderlabError(
                f"{model_id!r} has no trained pooler weights (they would be random)",
                f"use hf-vision:{model_id}?pool=cls or ?pool=mean",
            )
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        self.processor = load_image_processor(model_id)
        self.patch_size = _patch_size(config)
        self.embed_dim = self._probe_dim()

    def _probe_dim(self) -> int:
        from PIL import Image

        pixels = self.image_transform()(Image.new("RGB", (64, 64)))
        return int(self.encode_pixels(pixels[None]).shape[-1])

    def image_transform(self) -> HFImageTransform:
        return HFImageTransform(self.processor)

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self._pixels(pixel_values)
        with inference_context(self.device, self.precision):
            out = self.model(pixel_values=x)
            pooled = pool_vision_output(out, self.pool, self._prefix_tokens(out, x))
        return self._finish(pooled, normalize)

    def _prefix_tokens(self, out: Any, pixel_values: torch.Tensor) -> int:
        """CLS and register tokens before the patch tokens: sequence length minus the patch count."""
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None or hidden.dim() != 3 or self.patch_size is None:
            return 0
        h, w = pixel_values.shape[-2:]
        patches = (h // self.patch_size) * (w // self.patch_size)
        extra = hidden.shape[1] - patches
        return extra if 0 <= extra <= 16 else 0  # hierarchical models (Swin) merge patches: no prefix

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {"image_processor": self.image_transform().config(), "pooling": self.pool}

    # ---- the trainable contract: the same pooled features, with gradients -----------------------------------
    def tower_layout(self, tower: str) -> TowerLayout:
        """The backbone's layout (``SINGLE_LAYOUTS``); "image" is its only tower."""
        if tower != "image":
            raise EncoderlabError(f"{self.spec!r} has no {tower} tower", "use image")
        return single_layout(self.model, self.model_type, self.spec)

    def image_module(self) -> TowerModule:
        """Pixel values -> pooled features, as in ``encode_pixels`` but fp32 and with gradients."""

        def features(pixel_values: torch.Tensor) -> torch.Tensor:
            x = self._pixels(pixel_values)
            out = self.model(pixel_values=x)
            return pool_vision_output(out, self.pool, self._prefix_tokens(out, x))

        return TowerModule(self.model, self.tower_layout("image"), features, on_train=self._weights_changed)

    def text_module(self) -> TowerModule:
        raise EncoderlabError(f"{self.spec!r} has no text tower", "use a dual encoder (hf:) for text training")

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        raise EncoderlabError(f"{self.spec!r} has no text tower", "use a dual encoder (hf:) for text inputs")

    def _weights_changed(self) -> None:
        self._parts = None  # the weight digest is recomputed on the next fingerprint


def _patch_size(config: Any) -> int | None:
    p = getattr(config, "patch_size", None)
    if isinstance(p, (list, tuple)):
        p = p[0]
    return int(p) if isinstance(p, int) else None


def pool_vision_output(out: Any, pool: str, prefix_tokens: int) -> torch.Tensor:
    """One vector per image from a backbone output: its pooler, its CLS token, or the mean of patch tokens."""
    if pool == "pooler":
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            raise EncoderlabError("this model has no pooler_output", "use ?pool=mean or ?pool=cls")
        return pooled.flatten(1)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        raise EncoderlabError("this model returns no last_hidden_state to pool", "use ?pool=pooler")
    if hidden.dim() == 4:  # CNN feature map [B, C, H, W]
        if pool == "cls":
            raise EncoderlabError("a convolutional backbone has no CLS token", "use ?pool=mean or ?pool=pooler")
        return hidden.mean(dim=(2, 3))
    if pool == "cls":
        return hidden[:, 0]
    return hidden[:, prefix_tokens:].mean(dim=1)


class HFTextEncoder(_SingleTowerTrainable, _HFEncoder):
    """Any AutoModel text encoder: mean over the attention mask (default) or the first token (``?pool=cls``).

    Trainable (``encoders.trainable``) for the families of ``SINGLE_LAYOUTS``; the whole model is the text tower.
    """

    adapter = "hf-text"

    def __init__(
        self, target: str, *, device: torch.device, precision: str, default_max_length: int | None = None
    ) -> None:
        model_id, options = split_target(target, {"pool": TEXT_POOLS, "max_length": int})
        config, model, missing = _load_single_tower(model_id)
        super().__init__(model_id, model, device, precision)
        self.modalities = ("text",)
        self.pool: PoolMode = options.get("pool", "mean")
        self._digest_exclude = [k for k in missing if k.startswith(_POOLER_PREFIXES)]
        tokenizer = load_tokenizer(model_id)
        max_length = _text_max_length(tokenizer, config, options.get("max_length") or default_max_length)
        self.tokenization = TextTokenization(tokenizer, "longest", max_length, use_attention_mask=True)
        self.embed_dim = self._check_texts_differ()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """The exact model inputs for ``texts`` (CPU tensors), padded to the longest."""
        return self.tokenization(texts)

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        batch = self._to_device(self.tokenize(texts))
        with inference_context(self.device, self.precision):
            hidden = self.model(**batch).last_hidden_state
            pooled = pool_text_output(hidden, batch["attention_mask"], self.pool)
        return pooled.float().cpu()

    def _preprocessing_parts(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenization.config(), "pooling": self.pool}

    # ---- the trainable contract: the same pooled features, with gradients -----------------------------------
    def tower_layout(self, tower: str) -> TowerLayout:
        """The encoder's layout (``SINGLE_LAYOUTS``); "text" is its only tower."""
        if tower != "text":
            raise EncoderlabError(f"{self.spec!r} has no {tower} tower", "use text")
        return single_layout(self.model, self.model_type, self.spec)

    def text_module(self) -> TowerModule:
        """``tokenize`` dict -> pooled features, as in ``encode_text_batch`` but with gradients."""

        def features(tokens: Mapping[str, torch.Tensor]) -> torch.Tensor:
            batch = self._to_device(dict(tokens))
            return pool_text_output(self.model(**batch).last_hidden_state, batch["attention_mask"], self.pool)

        return TowerModule(self.model, self.tower_layout("text"), features, on_train=self._weights_changed)

    def image_module(self) -> TowerModule:
        raise EncoderlabError(f"{self.spec!r} has no image tower", "use an image encoder for image training")

    def _weights_changed(self) -> None:
        self._parts = None  # the weight digest is recomputed on the next fingerprint


def pool_text_output(hidden: torch.Tensor, attention_mask: torch.Tensor, pool: str) -> torch.Tensor:
    """Mean of token states over the attention mask (sentence-transformers' rule), or the first (CLS) token."""
    if pool == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


# ---- factories -----------------------------------------------------------------------------------------


def load_hf(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf:ID`` — a CLIP / SigLIP / ALIGN / FLAVA dual encoder from the hub or a save_pretrained directory."""
    model_id, _ = split_target(target, {})
    return HFDualEncoder(model_id, device=device, precision=precision)


def load_hf_vision(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf-vision:ID[?pool=pooler|cls|mean]`` — image embeddings from any transformers vision backbone."""
    return HFVisionEncoder(target, device=device, precision=precision)


def load_hf_text(target: str, *, device: torch.device, precision: str) -> Encoder:
    """``hf-text:ID[?pool=mean|cls&max_length=N]`` — text embeddings from any transformers text encoder."""
    return HFTextEncoder(target, device=device, precision=precision)


register_prefix("hf", load_hf,
                "transformers dual image-text encoder: CLIP, SigLIP, ALIGN, FLAVA (hub id or directory)")
register_prefix("hf-vision", load_hf_vision, "transformers vision backbone: ViT, DINOv2, ResNet, ConvNeXt, ...")
register_prefix("hf-text", load_hf_text, "transformers text encoder (BERT family), mean pooling by default")
