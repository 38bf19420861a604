"""Image augmentation for fine-tuning, without torchvision: random resized crop, horizontal flip, colour jitter.

``make_augment(preset, image_transform, seed)`` returns a picklable ``PIL.Image -> Tensor[C,H,W]`` callable that
augments in PIL (uint8, C code) and then applies the encoder's own scaling and normalization, so a DataLoader worker
can run it in place of ``encoder.image_transform()``. Presets (``--augment``):

* ``none``: the encoder's inference transform itself (the same object).
* ``light``: random resized crop with scale (0.5, 1), ratio (3/4, 4/3); horizontal flip.
* ``strong``: random resized crop with scale (0.08, 1) (the ImageNet recipe); flip; colour jitter 0.4/0.4/0.4/0.1.

The operations follow torchvision's PIL backend (``RandomResizedCrop``'s 10 tries then a centre-crop fallback;
``ColorJitter``'s random order of brightness / contrast / saturation / hue via ``ImageEnhance`` and an HSV hue shift).
Plain PIL was chosen over kornia by measurement (``bench/augment.py``, batch 64, 2 CPU cores): kornia's batched
tensor ops ran at 0.1-0.55x the images/s of this per-image PIL path for both presets and source sizes, at 1 and at 2
torch threads; and plain PIL needs no new dependency.

Reproducibility: the random draws of one call come from a ``torch.Generator`` that is either passed in
(``aug(image, generator=g)``) or derived from ``(seed, epoch, index)`` (``aug(image, index=i)`` after
``aug.set_epoch(epoch)``). With the item index a resumed run replays exactly the same augmentations whatever the
number of workers or the order items are loaded in. Called with neither, a per-process call counter (mixed with the
DataLoader worker id so workers differ) stands in for the index: deterministic in one process, not across worker
counts.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import torch

from ..encoders.base import ImageTransform
from ..errors import EncoderlabError

#: uniform draws one call consumes, whatever it ends up using, so a caller's generator advances predictably:
#: 10 crop tries x (area, log-ratio, top, left), 1 flip, 4 jitter factors, 4 for the jitter order
_CROP_TRIES = 10
_N_DRAWS = _CROP_TRIES * 4 + 1 + 4 + 4


@dataclass(frozen=True)
class AugmentConfig:
    """What one augmentation does. ``scale``/``ratio`` bound the crop's area fraction and aspect ratio (w/h);
    jitter strengths follow ``ColorJitter``: factors in [max(0, 1 - s), 1 + s], hue shift in [-hue, hue] turns."""

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def check(self) -> None:
        """Fail on values that cannot be sampled, naming the bad one."""
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise EncoderlabError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.scale}", "e.g. (0.08, 1)")
        rlo, rhi = self.ratio
        if not 0 < rlo <= rhi:
            raise EncoderlabError(f"crop ratio must satisfy 0 < low <= high, got {self.ratio}", "e.g. (3/4, 4/3)")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise EncoderlabError(f"{name} jitter must be >= 0, got {getattr(self, name)}", "e.g. 0.4")
        if not 0 <= self.hue <= 0.5:
            raise EncoderlabError(f"hue jitter must be in [0, 0.5], got {self.hue}", "e.g. 0.1")

    @property
    def jitters(self) -> bool:
        return bool(self.brightness or self.contrast or self.saturation or self.hue)


PRESETS: dict[str, AugmentConfig | None] = {
    "none": None,
    "light": AugmentConfig(scale=(0.5, 1.0), flip=True),
    "strong": AugmentConfig(scale=(0.08, 1.0), flip=True, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1),
}


class AugmentParams(NamedTuple):
    """One call's draws: the crop box in source pixels, the flip, and the jitter steps in the order applied."""

    box: tuple[int, int, int, int]  # left, top, right, bottom
    flip: bool
    jitter: tuple[tuple[str, float], ...]  # ("brightness" | "contrast" | "saturation", factor) or ("hue", shift)


def item_seed(seed: int, epoch: int, index: int | str) -> int:
    """A 63-bit seed for one item of one epoch; hashed so nearby (seed, epoch, index) give unrelated streams."""
    digest = hashlib.blake2b(f"encoderlab-augment:{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def crop_box(width: int, height: int, u: list[float], config: AugmentConfig) -> tuple[int, int, int, int]:
    """``RandomResizedCrop``'s box from 40 uniforms: 10 tries of (area, log-ratio, top, left), then the whole image
    clamped to the ratio range (torchvision's fallback, which keeps the area within bounds for scale high = 1)."""
    area = width * height
    log_lo, log_hi = math.log(config.ratio[0]), math.log(config.ratio[1])
    lo, hi = config.scale
    for t in range(_CROP_TRIES):
        ua, ur, ui, uj = u[4 * t : 4 * t + 4]
        target = area * (lo + (hi - lo) * ua)
        aspect = math.exp(log_lo + (log_hi - log_lo) * ur)
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = min(int(ui * (height - h + 1)), height - h)
            left = min(int(uj * (width - w + 1)), width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < config.ratio[0]:
        w, h = width, round(width / config.ratio[0])
    elif in_ratio > config.ratio[1]:
        w, h = round(height * config.ratio[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _output_size(transform: Callable[[Any], torch.Tensor]) -> tuple[int, int]:
    """(h, w) the encoder's transform produces; other callables are asked with a blank image."""
    if isinstance(transform, ImageTransform):
        if transform.crop is not None:
            return tuple(transform.crop)  # type: ignore[return-value]
        if isinstance(transform.resize, int):  # shorter-side resize without a crop: a square crop of that side
            return transform.resize, transform.resize
        return tuple(transform.resize)  # type: ignore[return-value]
    from PIL import Image

    out = transform(Image.new("RGB", (256, 256), (127, 127, 127)))
    return int(out.shape[-2]), int(out.shape[-1])


def _normalizer(transform: Callable[[Any], torch.Tensor], size: tuple[int, int]) -> Callable[[Any], torch.Tensor]:
    """The encoder's scaling/normalization for an image already at ``size``.

    For an ``ImageTransform`` it is the same transform with an exact resize to ``size`` and no crop, which skips the
    resize on an image of that size, so the pixels go through exactly the inference code. Any other transform
    (e.g. a Hugging Face processor) gets the augmented image at its output size and is called as is.
    """
    if isinstance(transform, ImageTransform):
        return replace(transform, resize=size, crop=None)
    return transform


class Augment:
    """Picklable ``PIL.Image -> Tensor[C,H,W]``: augment in PIL, then the encoder's normalization.

    Call as ``aug(image, index=i)`` (after ``aug.set_epoch(epoch)``) or ``aug(image, generator=g)`` for
    reproducible draws; see the module docstring.
    """

    def __init__(self, config: AugmentConfig, image_transform: Callable[[Any], torch.Tensor], seed: int = 0,
                 epoch: int = 0) -> None:
        config.check()
        self.config = config
        self.image_transform = image_transform
        self.seed = int(seed)
        self.epoch = int(epoch)
        self.size = _output_size(image_transform)
        self.resample = int(getattr(image_transform, "resample", 3))  # BICUBIC unless the transform says otherwise
        self._normalize = _normalizer(image_transform, self.size)
        self._calls = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draws; call before each epoch (before the DataLoader iterator is made, so workers that
        are re-created per epoch get it; with ``persistent_workers`` pass a generator or index per call instead)."""
        self.epoch = int(epoch)

    def generator(self, index: int | str) -> torch.Generator:
        """The generator of item ``index`` in the current epoch."""
        return torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))

    def sample(self, width: int, height: int, generator: torch.Generator) -> AugmentParams:
        """Draw one call's parameters for a ``width`` x ``height`` source (always ``_N_DRAWS`` uniforms)."""
        u = torch.rand(_N_DRAWS, generator=generator, dtype=torch.float64).tolist()
        cfg = self.config
        box = crop_box(width, height, u[: _CROP_TRIES * 4], cfg)
        k = _CROP_TRIES * 4
        flip = cfg.flip and u[k] < 0.5
        factors = u[k + 1 : k + 5]
        order = sorted(range(4), key=lambda i: u[k + 5 + i])  # a uniform random permutation, as ColorJitter's
        steps: list[tuple[str, float]] = []
        for i in order:
            name = ("brightness", "contrast", "saturation", "hue")[i]
            strength = getattr(cfg, name)
            if not strength:
                continue
            if name == "hue":
                steps.append((name, -strength + 2 * strength * factors[i]))
            else:
                lo, hi = max(0.0, 1 - strength), 1 + strength
                steps.append((name, lo + (hi - lo) * factors[i]))
        return AugmentParams(box, flip, tuple(steps))

    def apply(self, image: Any, params: AugmentParams) -> Any:
        """The augmented PIL image at the output size for ``params``."""
        from PIL import Image

        h, w = self.size
        # One resample from the crop box straight to the output size (no intermediate crop copy).
        out = image.resize((w, h), resample=Image.Resampling(self.resample), box=params.box)
        if params.flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        for name, value in params.jitter:
            out = _JITTER[name](out, value)
        return out

    def __call__(self, image: Any, index: int | str | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        if image.mode != "RGB":
            image = image.convert("RGB")
        if generator is None:
            if index is None:
                worker = torch.utils.data.get_worker_info()
                index = f"auto:{worker.id if worker is not None else -1}:{self._calls}"
                self._calls += 1
            generator = self.generator(index)
        params = self.sample(image.size[0], image.size[1], generator)
        return self._normalize(self.apply(image, params))

    def __repr__(self) -> str:
        return f"Augment({self.config}, size={self.size}, seed={self.seed}, epoch={self.epoch})"


def _brightness(image: Any, factor: float) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Brightness(image).enhance(factor)


def _contrast(image: Any, factor: float) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Contrast(image).enhance(factor)


def _saturation(image: Any, factor: float) -> Any:
    from PIL import ImageEnhance

    return ImageEnhance.Color(image).enhance(factor)


def _hue(image: Any, shift: float) -> Any:
    """Rotate hue by ``shift`` turns in PIL's 8-bit HSV (as torchvision's PIL backend; the lookup table wraps)."""
    from PIL import Image

    h, s, v = image.convert("HSV").split()
    step = round(shift * 255)
    h = h.point([(i + step) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


_JITTER: dict[str, Callable[[Any, float], Any]] = {
    "brightness": _brightness,
    "contrast": _contrast,
    "saturation": _saturation,
    "hue": _hue,
}


def make_augment(preset: str, image_transform: Callable[[Any], torch.Tensor], seed: int = 0
                 ) -> Callable[..., torch.Tensor]:
    """The training-time transform for ``--augment preset``: ``image_transform`` itself for "none", else an
    ``Augment`` (picklable; deterministic per (seed, epoch, index) or per generator, see ``Augment``)."""
    if preset not in PRESETS:
        raise EncoderlabError(f"unknown augment preset {preset!r}", f"use one of {', '.join(PRESETS)}")
    config = PRESETS[preset]
    if config is None:
        return image_transform
    return Augment(config, image_transform, seed=seed)
