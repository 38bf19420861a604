"""The one encoder contract every adapter implements, plus device / precision selection.

An encoder turns images and/or texts into *projected* embeddings (the space a dual encoder compares in).
Normalization is explicit (``normalize=True``); nothing normalizes behind the caller's back.

Image encoding is split in two so the extraction loop can decode and resize in DataLoader workers while the model
runs: ``image_transform()`` returns a picklable, CPU-only callable ``PIL.Image (RGB) -> Tensor[C, H, W]``, and
``encode_pixels`` runs the model on a stacked batch. ``encode_images`` chains both for convenience.
"""

from __future__ import annotations

import contextlib
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch

from ..errors import EncoderlabError
from ..hashing import json_digest
from ..normalize import normalize_rows

Modality = Literal["image", "text"]
ScoreKind = Literal["softmax", "sigmoid", "cosine"]
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class EncoderInfo:
    """What a registry entry is, without loading it."""

    name: str
    modalities: tuple[str, ...]
    description: str = ""
    requires: str = ""  # the extra or package it needs, for `encoders list`


@dataclass(frozen=True)
class TrainingItems:
    """What a trained model has seen: content keys by modality, for training (``train``) and model selection (``val``).

    ``source`` names the data set it was trained on (for messages).
    """

    train: dict[str, frozenset[str]]
    val: dict[str, frozenset[str]]
    source: str = ""

    def seen(self, modality: str) -> frozenset[str]:
        """Every key of ``modality`` used for training or for choosing the model."""
        return self.train.get(modality, frozenset()) | self.val.get(modality, frozenset())


class FeatureSource(NamedTuple):
    """How an encoder's embeddings derive from another encoder's: ``embeddings = head(base embeddings)``."""

    base: Encoder
    head: Callable[[torch.Tensor], torch.Tensor]


def select_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/"auto" picks cuda, then mps, then cpu; anything else is validated."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise EncoderlabError(f"unknown device {device!r}", "use auto, cpu, cuda, cuda:N or mps") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EncoderlabError(f"device {device!r} requested but CUDA is not available", "use --device cpu or auto")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EncoderlabError(f"device {device!r} requested but MPS is not available", "use --device cpu or auto")
    return dev


def select_precision(device: torch.device, precision: str | None = None) -> str:
    """fp32 on CPU (bf16 autocast is slower on CPUs without bf16 instructions); fp16/bf16 autocast on GPU."""
    if precision is None or precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        if device.type == "mps":
            return "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise EncoderlabError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)} or auto")
    return precision


@contextlib.contextmanager
def inference_context(device: torch.device, precision: str) -> Iterator[None]:
    """``torch.inference_mode`` plus autocast when a reduced precision was chosen."""
    with torch.inference_mode():
        if precision == "fp32":
            yield
        else:
            dtype = torch.float16 if precision == "fp16" else torch.bfloat16
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def state_dict_digest(module: torch.nn.Module, exclude: Collection[str] = ()) -> str:
    """Hash of every parameter and buffer (names, shapes, dtypes, bytes): the weights part of a fingerprint.

    ``exclude`` names entries to leave out: weights a checkpoint lacked (randomly initialized on each load) that
    the embedding never reads, such as an unused pooler, would otherwise make the fingerprint change per load.
    """
    h = hashlib.blake2b(digest_size=16)
    skip = set(exclude)
    for name, t in sorted(module.state_dict().items()):
        if name in skip:
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.dtype == torch.bfloat16:  # numpy has no bf16: hash the raw 16-bit words
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class Encoder(ABC):
    """Contract shared by every adapter. Subclasses set the attributes in ``__init__``.

    Attributes:
        spec: the string it was created from (``hf:openai/clip-vit-base-patch32``).
        modalities: which of "image" / "text" it encodes.
        embed_dim: size of the projected embedding.
        score_kind: how a dual encoder turns cosine similarities into scores: "softmax" (CLIP: logit_scale * cos),
            "sigmoid" (SigLIP: sigmoid(logit_scale * cos + logit_bias)), or "cosine" for single-modality encoders.
        logit_scale / logit_bias: the learned temperature (already exponentiated) and bias, where the model has them.
        device, precision: where and how it runs.
        preferred_batch_size: the image batch size the extraction loop should use, when the adapter measured one.
    """

    spec: str
    modalities: tuple[str, ...]
    embed_dim: int
    score_kind: ScoreKind = "cosine"
    logit_scale: float | None = None
    logit_bias: float | None = None
    device: torch.device
    precision: str = "fp32"
    #: how many texts the tokenizer pads/truncates to; None means "trim to the longest in the batch"
    text_max_length: int | None = None
    #: images per model call that runs fastest on this encoder's device, where measured; None: caller decides
    preferred_batch_size: int | None = None

    # ---- identity -------------------------------------------------------------------------------------
    @abstractmethod
    def fingerprint_parts(self) -> dict[str, Any]:
        """Everything that changes the embeddings: weight digest, preprocessing config, pooling, tokenizer."""

    def fingerprint(self, modality: Modality | None = None) -> str:
        """Stable id of (weights + preprocessing [+ modality] + precision); keys the embedding store."""
        parts = dict(self.fingerprint_parts())
        parts["precision"] = self.precision
        if modality is not None:
            self.check_modality(modality)
            parts["modality"] = modality
        return json_digest(parts)

    def check_modality(self, modality: str) -> None:
        if modality not in self.modalities:
            have = " and ".join(self.modalities)
            raise EncoderlabError(
                f"encoder {self.spec!r} has no {modality} tower (it encodes {have})",
                "pick a dual encoder (hf:..., open_clip:...) or one for that modality",
            )

    def feature_source(self, modality: Modality) -> FeatureSource | None:
        """``FeatureSource(base, head)`` when this encoder's embeddings are ``head(base embeddings)``, else None.

        Encoders built on top of another encoder's frozen features (an aligned pair of towers with projection heads)
        return their tower and head here, so extraction computes the tower features once into the store and derives
        this encoder's embeddings from them instead of running the tower again.
        """
        return None

    def training_items(self) -> TrainingItems | None:
        """Content keys of the items this encoder was trained or selected on (None: not trained by encoderlab).

        Models that encoderlab trained (aligned heads, fine-tuned or prompt-learned models) record them, so an
        evaluation can count and warn about items the model has already seen (the same image under another split
        or seed). Keys are the store's content keys (``hashing.image_key`` / ``hashing.text_key``).
        """
        return None

    # ---- images ---------------------------------------------------------------------------------------
    def image_transform(self) -> Callable[[Any], torch.Tensor]:
        """A picklable ``PIL.Image (RGB) -> Tensor[C,H,W]`` callable run in DataLoader workers."""
        self.check_modality("image")
        raise NotImplementedError

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """Projected image embeddings for a batch of transformed images; fp32, on CPU."""
        self.check_modality("image")
        raise NotImplementedError

    def encode_images(self, images: Sequence[Any], normalize: bool = False) -> torch.Tensor:
        """Convenience path for a few PIL images: transform each, stack, encode."""
        tf = self.image_transform()
        batch = torch.stack([tf(im.convert("RGB")) for im in images])
        return self.encode_pixels(batch, normalize=normalize)

    # ---- texts ----------------------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], normalize: bool = False, batch_size: int = 256) -> torch.Tensor:
        """Projected text embeddings in the order given; duplicates are encoded once; fp32, on CPU."""
        self.check_modality("text")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.embed_dim)
        unique = list(dict.fromkeys(texts))
        # Sorting by length keeps batches of similar length, so trimming padding saves the most work.
        order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
        out = torch.empty(len(unique), self.embed_dim)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            out[idx] = self.encode_text_batch([unique[i] for i in idx]).float().cpu()
        if normalize:
            out = normalize_rows(out)
        pos = {t: i for i, t in enumerate(unique)}
        return out[[pos[t] for t in texts]]

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        """Model call on one batch of distinct texts (unnormalized). Adapters with a text tower implement it."""
        self.check_modality("text")
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, dim={self.embed_dim}, modalities={self.modalities})"


@dataclass
class ImageTransform:
    """Resize (shorter side or exact), center crop, scale to [0,1], normalize: picklable, PIL + torch only.

    Attributes mirror the common image-processor fields so a processor config maps onto it 1:1.
    """

    resize: int | tuple[int, int]  # int: shorter side; (h, w): exact size
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resample: int = 3  # PIL.Image.BICUBIC
    rescale: float = 1 / 255
    offset: float = 0.0  # added after rescale (EfficientNet-style "rescale_offset" uses -1)
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, image: Any) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        if image.mode != "RGB":
            image = image.convert("RGB")
        w, h = image.size
        if isinstance(self.resize, int):
            # The long side truncates (int, not round) exactly as torchvision's and transformers' resize do.
            s = self.resize
            if w <= h:
                nw, nh = s, max(1, int(s * h / w))
            else:
                nw, nh = max(1, int(s * w / h)), s
        else:
            nh, nw = self.resize
        if (nw, nh) != (w, h):
            image = image.resize((nw, nh), resample=Image.Resampling(self.resample))
        if self.crop is not None:
            ch, cw = self.crop
            left = int(round((nw - cw) / 2.0))
            top = int(round((nh - ch) / 2.0))
            image = image.crop((left, top, left + cw, top + ch))
        arr = np.asarray(image, dtype=np.float32) * self.rescale + self.offset
        arr = (arr - np.asarray(self.mean, dtype=np.float32)) / np.asarray(self.std, dtype=np.float32)
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))

    def config(self) -> dict[str, Any]:
        return {
            "resize": self.resize,
            "crop": self.crop,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": self.resample,
            "rescale": self.rescale,
            "offset": self.offset,
            **self.extra,
        }
