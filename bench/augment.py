"""Training-augmentation speed on CPU: encoderlab's plain PIL ``Augment`` vs kornia's batched tensor ops.

    python bench/augment.py                        # emoji PNGs upscaled to 224x224 and 500x375, batch 64
    python bench/augment.py --batch 128 --repeats 5 --json bench/results/augment.json

Every candidate turns a list of decoded RGB PIL images into one normalized batch Tensor[B, 3, 224, 224] for an
EfficientNet-Lite-style transform (resize 256, crop 224, (x - 127) / 128), with the presets of
``encoderlab.train.augment`` (light: resized crop scale (0.5, 1) + flip; strong: scale (0.08, 1) + flip + colour
jitter 0.4/0.4/0.4/0.1):

  naive     the baseline: a per-image PIL loop written the obvious way (crop, then resize, mirror, ImageEnhance,
            hue through numpy HSV, the transform's numpy normalization), with the same random draws as ``plain``;
  plain     ``make_augment(preset, transform, seed)`` per image, then ``torch.stack`` (what a DataLoader worker runs);
  kornia    PIL -> uint8 tensors, stacked, then ``kornia.augmentation`` RandomResizedCrop / RandomHorizontalFlip /
            ColorJitter on the float batch, then the same normalization. Sources are all one size here, which
            favours kornia: real data sets need a per-image resize to a common size before stacking.
  inference the encoder's inference transform alone, per image (the floor: no augmentation).

Times are the median of ``--repeats`` batches (candidates taking turns) after a warm-up batch each, for torch
intra-op threads 1 (what a DataLoader worker gets) and all cores. The ratio column is images/s over ``naive``'s in
the same run and setting.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps

from encoderlab.encoders.base import ImageTransform
from encoderlab.train.augment import PRESETS, Augment, AugmentParams, make_augment

EMOJI = Path.home() / ".cache" / "encoderlab" / "data" / "emoji" / "img"
TRANSFORM = ImageTransform(resize=256, crop=(224, 224), mean=(127.0,) * 3, std=(128.0,) * 3, rescale=1.0)


def load_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Image.Image]:
    """``n`` RGB images of ``size`` (w, h): emoji PNGs on white, upscaled; generated noise blobs when absent."""
    paths = sorted(glob.glob(str(EMOJI / "**" / "*.png"), recursive=True))
    out = []
    if paths:
        rng = np.random.default_rng(seed)
        for p in rng.choice(paths, size=n, replace=len(paths) < n):
            with Image.open(p) as im:
                rgba = im.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            out.append(Image.alpha_composite(bg, rgba).convert("RGB").resize(size, Image.Resampling.BICUBIC))
        return out
    rng = np.random.default_rng(seed)
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        out.append(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))
    return out


# ---- naive baseline ---------------------------------------------------------------------------------------------
def naive_apply(image: Image.Image, p: AugmentParams, size: tuple[int, int]) -> torch.Tensor:
    """The same augmentation written the obvious way, one PIL step after another."""
    h, w = size
    out = image.crop(p.box).resize((w, h), Image.Resampling.BICUBIC)
    if p.flip:
        out = ImageOps.mirror(out)
    for name, value in p.jitter:
        if name == "brightness":
            out = ImageEnhance.Brightness(out).enhance(value)
        elif name == "contrast":
            out = ImageEnhance.Contrast(out).enhance(value)
        elif name == "saturation":
            out = ImageEnhance.Color(out).enhance(value)
        else:  # torchvision's PIL adjust_hue
            hh, s, v = out.convert("HSV").split()
            arr = np.array(hh, dtype=np.uint8)
            with np.errstate(over="ignore"):
                arr += np.array(value * 255).astype(np.uint8)
            out = Image.merge("HSV", (Image.fromarray(arr, "L"), s, v)).convert("RGB")
    arr = np.asarray(out, dtype=np.float32)
    arr = (arr - np.asarray(TRANSFORM.mean, dtype=np.float32)) / np.asarray(TRANSFORM.std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


def naive_batch(preset: str) -> Callable[[list[Image.Image]], torch.Tensor]:
    aug = Augment(PRESETS[preset], TRANSFORM, seed=0)  # type: ignore[arg-type]

    def run(images: list[Image.Image]) -> torch.Tensor:
        out = []
        for i, im in enumerate(images):
            params = aug.sample(im.size[0], im.size[1], aug.generator(i))
            out.append(naive_apply(im, params, aug.size))
        return torch.stack(out)

    return run


def plain_batch(preset: str) -> Callable[[list[Image.Image]], torch.Tensor]:
    aug = make_augment(preset, TRANSFORM, seed=0)
    return lambda images: torch.stack([aug(im, index=i) for i, im in enumerate(images)])


def inference_batch(preset: str) -> Callable[[list[Image.Image]], torch.Tensor]:
    return lambda images: torch.stack([TRANSFORM(im) for im in images])


def kornia_batch(preset: str) -> Callable[[list[Image.Image]], torch.Tensor]:
    import kornia.augmentation as K

    cfg = PRESETS[preset]
    assert cfg is not None
    ops: list[Any] = [K.RandomResizedCrop((224, 224), scale=cfg.scale, ratio=cfg.ratio, resample="bicubic")]
    if cfg.flip:
        ops.append(K.RandomHorizontalFlip())
    if cfg.jitters:
        ops.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue, p=1.0))
    seq = K.AugmentationSequential(*ops)
    mean = torch.tensor(TRANSFORM.mean).view(1, 3, 1, 1)
    std = torch.tensor(TRANSFORM.std).view(1, 3, 1, 1)

    def run(images: list[Image.Image]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float().div_(255)
        with torch.no_grad():
            x = seq(x).clamp_(0, 1)
        return (x * 255 * TRANSFORM.rescale + TRANSFORM.offset - mean) / std

    return run


CANDIDATES: dict[str, Callable[[str], Callable[[list[Image.Image]], torch.Tensor]]] = {
    "naive": naive_batch,
    "plain": plain_batch,
    "kornia": kornia_batch,
    "inference": inference_batch,
}


def time_all(fns: dict[str, Callable[[list[Image.Image]], torch.Tensor]], images: list[Image.Image], repeats: int
             ) -> dict[str, float]:
    """Median seconds per batch of each candidate after one warm-up call each; the candidates take turns in every
    repeat, so a burst of load from other work on the machine hits them all alike."""
    for fn in fns.values():
        out = fn(images)
        assert out.shape == (len(images), 3, 224, 224) and out.dtype == torch.float32, (out.shape, out.dtype)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn(images)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--sizes", default="224x224,500x375", help="source sizes WxH, comma-separated")
    ap.add_argument("--json", default="bench/results/augment.json")
    args = ap.parse_args(argv)

    try:
        import kornia

        kornia_version = kornia.__version__
    except ImportError:
        kornia_version = None
        print("kornia not installed: its rows are skipped (pip install kornia)", file=sys.stderr)
    cores = os.cpu_count() or 1
    rows = []
    print(f"batch {args.batch}, median of {args.repeats}, {cores} cores, torch {torch.__version__}, "
          f"kornia {kornia_version}, load {os.getloadavg()[0]:.2f}")
    print(f"{'source':>8} {'preset':>6} {'threads':>7} {'candidate':>9} {'img/s':>8} {'x naive':>8}")
    for size_s in args.sizes.split(","):
        size = tuple(int(v) for v in size_s.lower().split("x"))
        images = load_images(args.batch, size)  # type: ignore[arg-type]
        for preset in ("light", "strong"):
            for threads in sorted({1, cores}):
                torch.set_num_threads(threads)
                fns = {name: make(preset) for name, make in CANDIDATES.items()
                       if name != "kornia" or kornia_version is not None}
                seconds = time_all(fns, images, args.repeats)
                for name in fns:
                    ips = args.batch / seconds[name]
                    ratio = seconds["naive"] / seconds[name]
                    rows.append({"source": size_s, "preset": preset, "threads": threads, "candidate": name,
                                 "images_per_s": round(ips, 1), "ratio_vs_naive": round(ratio, 3)})
                    print(f"{size_s:>8} {preset:>6} {threads:>7} {name:>9} {ips:>8.1f} {ratio:>8.2f}")
    torch.set_num_threads(cores)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"batch": args.batch, "repeats": args.repeats, "cores": cores, "torch": torch.__version__,
                "kornia": kornia_version, "python": platform.python_version(), "load_1m": os.getloadavg()[0]}
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
