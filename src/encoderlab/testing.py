"""Test helpers that ship with the package: a mock dual encoder with exact answers and a dataset built for it.

``ColorEncoder`` embeds a solid-colour image as its mean RGB (centred) and a text as the RGB of the first colour
word in it, so zero-shot, kNN, probes and retrieval on ``color_dataset`` have answers one can work out by hand.
``registered_color_encoder()`` registers it under a name for the duration of a ``with`` block (or a fixture) and
removes it afterwards, so no test leaves a global registration behind.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from .encoders.base import Encoder, ImageTransform
from .encoders.registry import NAMED, register_encoder, unregister_encoder
from .normalize import normalize_rows

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
COLOR_SPEC = "test-color"


class ColorEncoder(Encoder):
    """Image -> mean RGB (centred); text -> the RGB of the first colour word in it (zeros if none)."""

    def __init__(self, device: torch.device | str = "cpu", precision: str = "fp32") -> None:
        self.spec, self.modalities, self.embed_dim = COLOR_SPEC, ("image", "text"), 3
        self.score_kind, self.logit_scale = "softmax", 10.0
        self.device, self.precision = torch.device(device), precision

    def fingerprint_parts(self) -> dict:
        return {"kind": COLOR_SPEC, "version": 1}

    def image_transform(self) -> ImageTransform:
        return ImageTransform(resize=(8, 8), crop=None, mean=(0.5, 0.5, 0.5), std=(1.0, 1.0, 1.0))

    def encode_pixels(self, pixel_values: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = pixel_values.float().mean(dim=(2, 3))
        return normalize_rows(out) if normalize else out

    def encode_text_batch(self, texts: list[str]) -> torch.Tensor:
        rows = []
        for t in texts:
            word = next((w for w in COLORS if w in t.lower()), None)
            rgb = np.asarray(COLORS[word], dtype=np.float32) / 255.0 - 0.5 if word else np.zeros(3, np.float32)
            rows.append(torch.from_numpy(rgb))
        return torch.stack(rows)


@contextlib.contextmanager
def registered_color_encoder(name: str = COLOR_SPEC) -> Iterator[str]:
    """Register ``ColorEncoder`` as ``name`` inside the block; restore whatever was there before on exit."""
    from .encoders.base import EncoderInfo

    previous = NAMED.peek(name)
    register_encoder(EncoderInfo(name, ("image", "text"), "mock dual encoder for tests"),
                     lambda target, device, precision: ColorEncoder(device, precision))
    try:
        yield name
    finally:
        unregister_encoder(name)
        if previous is not None:
            NAMED.register(name, previous)


def color_dataset(root: Path, n_per_class: int = 12, seed: int = 0, splits: tuple[str, ...] | None = None) -> Path:
    """A jsonl image–caption–label set of solid colour squares with one caption shared by every image.

    ``splits`` cycles over the items of each class (default 8 train, 2 val, 2 test of every 12); pass e.g.
    ``("train",) * 10 + ("test",) * 2`` for a source that ships only train and test.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    cycle = splits or ("train",) * 8 + ("val",) * 2 + ("test",) * 2
    rows = []
    for c, rgb in COLORS.items():
        for i in range(n_per_class):
            noise = rng.integers(-20, 20, size=3)
            arr = np.clip(np.asarray(rgb) + noise, 0, 255).astype(np.uint8)
            path = root / f"{c}_{i}.png"
            Image.fromarray(np.tile(arr, (16, 16, 1))).save(path)
            caption = [f"a {c} square number {i}", "a coloured square"]  # the second caption is on every image
            rows.append({"image": str(path), "text": caption, "label": f"{c}_thing", "split": cycle[i % len(cycle)]})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def color_spec(path: Path) -> str:
    """The data spec that reads ``color_dataset``'s file."""
    return f"jsonl:{path}?image=image&text=text&label=label&split=split"
