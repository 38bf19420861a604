"""What a rung costs: fit time, inference latency per item (head alone and with the encoder), memory, parameters.

Latency is measured, not estimated: the head on the cached test embeddings, and the encoder on a small sample of
real items (decode + preprocessing + forward), so "with encoder" is what a user pays per new item.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..data.images import load_image
from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import BadImageError


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024, 1)


def ms_per_item(fn: Callable[[], Any], n_items: int, repeats: int = 3) -> float:
    """Best-of-``repeats`` wall time of ``fn()`` divided by the items it handles, in milliseconds.

    The minimum is the least noisy estimate of what the work itself costs on a shared machine.
    """
    if n_items <= 0:
        return float("nan")
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000.0 / n_items, 4)


def encoder_ms_per_item(encoder: Encoder, dataset: Dataset, modality: str = "image", n: int = 32) -> float:
    """Decode + preprocess + forward of ``n`` items of ``dataset`` (one batch, after a warm-up), per item in ms."""
    if modality == "text":
        texts = [t for row in dataset.table["texts"] for t in (row or [])][:n]
        if not texts:
            return float("nan")
        encoder.encode_texts(texts[:2])  # warm-up: first calls allocate and compile
        return ms_per_item(lambda: encoder.encode_texts(texts), len(texts), repeats=2)
    paths = [p for p in dataset.table["image"] if p is not None][: n + 4]
    transform = encoder.image_transform()

    def run(batch: list[str]) -> int:
        return encode_image_files(encoder, batch, transform)

    if not paths:
        return float("nan")
    run(paths[:4])  # warm-up
    sample = paths[4:] or paths
    return ms_per_item(lambda: run(sample), len(sample), repeats=2)


def encode_image_files(encoder: Encoder, paths: list[str], transform: Any = None) -> int:
    """Decode, preprocess and encode ``paths`` as one batch (undecodable files left out); how many were encoded."""
    transform = transform or encoder.image_transform()
    pixels = []
    for p in paths:
        try:
            pixels.append(transform(load_image(p)))
        except BadImageError:
            continue
    if pixels:
        with torch.inference_mode():
            encoder.encode_pixels(torch.stack(pixels))
    return len(pixels)


def n_params(module: Any) -> int:
    """Trainable parameter count of a torch module, or a head's own count, or of numpy arrays."""
    if hasattr(module, "n_trainable_params"):
        return int(module.n_trainable_params)
    if isinstance(module, torch.nn.Module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)
    if isinstance(module, np.ndarray):
        return int(module.size)
    return 0
