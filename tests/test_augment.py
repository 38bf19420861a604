"""Training augmentation: presets, the encoder's normalization after it, reproducibility, and what each op does."""

from __future__ import annotations

import pickle
import random
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from encoderlab.encoders.base import ImageTransform
from encoderlab.errors import EncoderlabError
from encoderlab.train.augment import PRESETS, Augment, AugmentConfig, crop_box, make_augment

#: an EfficientNet-Lite-style transform, scaled down: shorter side 40, centre crop 32, (x - 127) / 128
LITE = ImageTransform(resize=40, crop=(32, 32), mean=(127.0,) * 3, std=(128.0,) * 3, rescale=1.0)
#: CLIP-style: exact non-square resize, [0, 1] then mean/std
CLIPLIKE = ImageTransform(resize=(24, 32), crop=None, mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28))
#: identity pixels (0..255 floats) so tests can read colours back
RAW = ImageTransform(resize=(32, 32), crop=None, mean=(0.0,) * 3, std=(1.0,) * 3, rescale=1.0)
#: only the crop, covering the whole image: no geometric change, so single ops can be checked in isolation
WHOLE = AugmentConfig(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)


def photo(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    """A smooth colourful image (upscaled noise) with no symmetry."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.Resampling.BICUBIC)


def checkerboard(side: int = 96, cell: int = 4) -> Image.Image:
    yy, xx = np.mgrid[:side, :side] // cell
    arr = np.where((yy + xx) % 2 == 0, 230, 25).astype(np.uint8)
    return Image.fromarray(np.stack([arr] * 3, axis=-1))


class Resize32:
    """A transform that is not an ImageTransform (like a Hugging Face processor): resize to 32x32, scale to [0,1]."""

    def __call__(self, image: Image.Image) -> torch.Tensor:
        arr = np.asarray(image.convert("RGB").resize((32, 32)), dtype=np.float32) / 255
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("tf", [LITE, CLIPLIKE, Resize32()], ids=["lite", "clip", "other"])
def test_shapes_and_dtypes_match_the_encoder_transform(preset, tf):
    aug = make_augment(preset, tf, seed=0)
    for image in (photo(), photo(61, 33).convert("RGBA"), photo(20, 70).convert("L")):
        ref = tf(image.convert("RGB"))
        out = aug(image.convert("RGB") if preset == "none" else image)
        assert out.shape == ref.shape and out.dtype == ref.dtype


def test_none_is_the_inference_transform():
    assert make_augment("none", LITE, seed=3) is LITE
    image = photo()
    assert torch.equal(make_augment("none", LITE, seed=3)(image), LITE(image))


def test_normalization_is_the_encoders_own():
    """With a crop of the whole image, no flip and no jitter, an image at the output size comes out exactly as the
    inference transform makes it: same scaling, offset, mean and std."""
    for tf in (CLIPLIKE, replace(CLIPLIKE, offset=-1.0, rescale=2 / 255)):
        image = photo(32, 24)
        aug = Augment(replace(WHOLE, ratio=(32 / 24, 32 / 24)), tf, seed=0)
        assert torch.equal(aug(image, index=0), tf(image))


def test_deterministic_for_a_seed_index_and_epoch():
    image = photo()
    a, b = make_augment("strong", LITE, seed=7), make_augment("strong", LITE, seed=7)
    assert all(torch.equal(a(image, index=i), b(image, index=i)) for i in range(5))
    assert not torch.equal(a(image, index=0), a(image, index=1))  # items differ within an epoch
    first = a(image, index=0)
    a.set_epoch(1)
    assert not torch.equal(a(image, index=0), first)  # epochs differ
    a.set_epoch(0)
    assert torch.equal(a(image, index=0), first)  # ... and an epoch replays exactly (resume)
    # a generator per call: same seed, same draws; it advances, so consecutive calls differ
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    o1 = [a(image, generator=g1) for _ in range(3)]
    o2 = [b(image, generator=g2) for _ in range(3)]
    assert all(torch.equal(x, y) for x, y in zip(o1, o2)) and not torch.equal(o1[0], o1[1])
    # with neither, a call counter stands in for the index: fresh copies replay the same sequence
    c, d = make_augment("strong", LITE, seed=7), make_augment("strong", LITE, seed=7)
    assert all(torch.equal(c(image), d(image)) for _ in range(3))


def test_different_seeds_differ():
    image = photo()
    for preset in ("light", "strong"):
        outs = [make_augment(preset, LITE, seed=s)(image, index=0) for s in range(4)]
        assert all(not torch.equal(outs[i], outs[j]) for i in range(4) for j in range(i + 1, 4)), preset


def test_flip_actually_flips():
    arr = np.zeros((32, 32, 3), dtype=np.uint8)
    arr[:, :12] = (255, 0, 0)  # red left third, blue rest: left/right asymmetric
    arr[:, 12:] = (0, 0, 255)
    image = Image.fromarray(arr)
    ref = RAW(image)
    aug = Augment(replace(WHOLE, flip=True), RAW, seed=0)
    outs = [aug(image, index=i) for i in range(16)]
    flipped = [torch.equal(o, ref.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, ref) for f, o in zip(flipped, outs))
    assert 2 <= sum(flipped) <= 14  # both happen (p = 0.5)
    assert outs[flipped.index(True)][0, 0, -1] == 255  # red is on the right after a flip
    no_flip = Augment(WHOLE, RAW, seed=0)
    assert all(torch.equal(no_flip(image, index=i), ref) for i in range(8))


def _period(profile: np.ndarray) -> float:
    """Output pixels per checkerboard cell along a line: mean spacing of the threshold crossings."""
    binary = profile > (profile.min() + profile.max()) / 2
    edges = np.flatnonzero(np.diff(binary.astype(np.int8)))
    assert len(edges) >= 3, "too few cells visible to measure"
    return (edges[-1] - edges[0]) / (len(edges) - 1)


@pytest.mark.parametrize("preset", ["light", "strong"])
def test_crop_area_measured_on_a_checkerboard_respects_the_scale_bounds(preset):
    side, cell, out = 96, 4, 128
    image = checkerboard(side, cell)
    tf = ImageTransform(resize=(out, out), crop=None, mean=(0.0,) * 3, std=(1.0,) * 3, rescale=1.0)
    aug = make_augment(preset, tf, seed=1)
    lo, hi = PRESETS[preset].scale
    areas, ratios = [], []
    for i in range(40):
        x = aug(image, index=i)[0].numpy()
        # measure away from the borders' partial cells: the middle row and column
        crop_w = out / _period(x[out // 2]) * cell
        crop_h = out / _period(x[:, out // 2]) * cell
        areas.append(crop_w * crop_h / side**2)
        ratios.append(crop_w / crop_h)
        box = aug.sample(side, side, aug.generator(i)).box  # the drawn box agrees with what is measured
        true_area = (box[2] - box[0]) * (box[3] - box[1]) / side**2
        assert abs(areas[-1] - true_area) <= 0.06 * true_area + 0.005
    assert lo * 0.93 <= min(areas) and max(areas) <= hi * 1.03
    assert min(areas) < lo + 0.2 * (hi - lo) and max(areas) > hi - 0.2 * (hi - lo)  # the range is used
    assert 0.75 * 0.93 <= min(ratios) and max(ratios) <= 4 / 3 * 1.07


def test_crop_box_bounds_on_any_source_shape():
    rng = random.Random(0)
    for cfg in (PRESETS["light"], PRESETS["strong"]):
        for w, h in ((224, 224), (500, 375), (375, 500), (1000, 40), (7, 9)):
            for _ in range(300):
                left, top, right, bottom = crop_box(w, h, [rng.random() for _ in range(40)], cfg)
                assert 0 <= left < right <= w and 0 <= top < bottom <= h
                if min(w, h) >= 100 and max(w, h) / min(w, h) <= 4 / 3:  # sizes where rounding is negligible
                    area = (right - left) * (bottom - top) / (w * h)
                    assert cfg.scale[0] * 0.97 <= area <= cfg.scale[1] * 1.0001
                    assert 0.75 * 0.97 <= (right - left) / (bottom - top) <= 4 / 3 * 1.03


def _jitter_outputs(config: AugmentConfig, image: Image.Image, n: int = 24) -> list[np.ndarray]:
    aug = Augment(config, RAW, seed=0)
    return [aug(image, index=i).numpy() for i in range(n)]  # [3, H, W] pixel values 0..255


def test_brightness_and_contrast_stay_within_their_factors():
    image = photo(32, 32)
    base = RAW(image).numpy()
    gray = Image.new("RGB", (32, 32), (100, 100, 100))
    ratios = [o.mean() / 100 for o in _jitter_outputs(replace(WHOLE, brightness=0.4), gray)]
    assert 0.6 - 0.01 <= min(ratios) and max(ratios) <= 1.4 + 0.01 and max(ratios) - min(ratios) > 0.4
    outs = _jitter_outputs(replace(WHOLE, contrast=0.4), image)
    spread = [o.std() / base.std() for o in outs]
    assert 0.6 - 0.03 <= min(spread) and max(spread) <= 1.4 + 0.03 and max(spread) - min(spread) > 0.3


def test_saturation_and_hue_change_colour_not_gray():
    image = photo(32, 32)
    base = RAW(image).numpy()
    gray = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8)[:, None, None], (1, 32, 3)))
    for cfg in (replace(WHOLE, saturation=0.4), replace(WHOLE, hue=0.1)):
        assert all(np.abs(o - RAW(gray).numpy()).max() <= 1 for o in _jitter_outputs(cfg, gray, 6))
    chroma = base.max(0) - base.min(0)
    sat = [(o.max(0) - o.min(0)).mean() / chroma.mean() for o in _jitter_outputs(replace(WHOLE, saturation=0.4), image)]
    assert 0.6 - 0.03 <= min(sat) and max(sat) <= 1.4 + 0.03 and max(sat) - min(sat) > 0.3
    for o in _jitter_outputs(replace(WHOLE, hue=0.1), image, 8):
        assert np.abs(o.max(0) - base.max(0)).max() <= 2  # a hue rotation keeps HSV's value (the max channel)
    assert any(np.abs(o - base).mean() > 1 for o in _jitter_outputs(replace(WHOLE, hue=0.1), image, 8))


def test_strong_changes_colour_statistics_light_does_not():
    image = Image.new("RGB", (40, 40), (200, 60, 30))
    light = make_augment("light", RAW, seed=0)
    assert all(np.abs(light(image, index=i).numpy() - np.array([200, 60, 30])[:, None, None]).max() <= 1
               for i in range(4))
    strong = make_augment("strong", RAW, seed=0)
    means = np.array([strong(image, index=i).numpy().mean(axis=(1, 2)) for i in range(16)])  # [16, 3]
    assert means.std(axis=0).min() > 3  # every channel's mean moves
    assert means.min() >= 0 and means.max() <= 255  # valid pixels: jitter clips in uint8 like torchvision's PIL path


def test_picklable_and_same_in_dataloader_workers():
    aug = make_augment("strong", LITE, seed=11)
    aug.set_epoch(2)
    copy = pickle.loads(pickle.dumps(aug))
    image = photo()
    assert torch.equal(copy(image, index=3), aug(image, index=3))

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 6

        def __getitem__(self, i: int) -> torch.Tensor:
            return aug(photo(seed=i), index=i)

    loaded = torch.cat(list(torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=2)))
    assert torch.equal(loaded, torch.stack([aug(photo(seed=i), index=i) for i in range(6)]))


def test_bad_preset_lists_the_presets():
    with pytest.raises(EncoderlabError) as err:
        make_augment("medium", LITE, seed=0)
    assert "medium" in str(err.value) and all(p in err.value.fix for p in ("none", "light", "strong"))
    for bad in (dict(scale=(0.0, 1.0)), dict(scale=(0.5, 1.2)), dict(ratio=(2.0, 1.0)), dict(hue=0.7),
                dict(brightness=-0.1)):
        with pytest.raises(EncoderlabError):
            Augment(AugmentConfig(**bad), LITE)
