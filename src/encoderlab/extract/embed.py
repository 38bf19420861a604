"""``embed_dataset``: every modality a dataset and an encoder share, into the store, with one summary.

This is what ``encoderlab embed`` runs; the ladder runner and scripts call it the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..store import EmbeddingStore
from .loop import ExtractResult, extract_images, extract_texts

MODALITY_CHOICES = ("auto", "image", "text", "both")


def choose_modalities(asked: str, encoder: Encoder, dataset: Dataset) -> list[str]:
    """The modalities to embed: ``auto`` = every one both the encoder and the data have; else exactly those asked."""
    if asked not in MODALITY_CHOICES:
        raise EncoderlabError(f"unknown modality {asked!r}", f"use one of {', '.join(MODALITY_CHOICES)}")
    enc_mods = encoder.modalities
    data_mods = [m for m, ok in (("image", dataset.has_images), ("text", dataset.has_texts)) if ok]
    if asked == "auto":
        chosen = [m for m in ("image", "text") if m in enc_mods and m in data_mods]
        if not chosen:
            raise EncoderlabError(
                f"encoder {encoder.spec!r} encodes {'+'.join(enc_mods)} but dataset {dataset.source!r} has "
                f"{'+'.join(data_mods) or 'nothing to encode'}",
                "pick an encoder for the data's modality",
            )
        return chosen
    wanted = ["image", "text"] if asked == "both" else [asked]
    for m in wanted:
        if m not in enc_mods:
            raise EncoderlabError(f"encoder {encoder.spec!r} has no {m} tower", "change --modality or --encoder")
        if m not in data_mods:
            raise EncoderlabError(f"dataset {dataset.source!r} has no {m}s", "change --modality or --data")
    return wanted


def check_strict(dataset: Dataset) -> None:
    """Strict mode with files the listing already skipped fails before any encoding (or model loading)."""
    if dataset.skipped:
        s = dataset.skipped[0]
        raise EncoderlabError(f"--strict: {s['path']} cannot be used ({s['reason']})",
                              "fix or remove the file, or drop --strict to skip and report bad files")


def embed_dataset(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    modality: str = "auto",
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    max_pixels: int | None = None,
    strict: bool = False,
    progress: bool = True,
    commit_seconds: float | None = None,
    engine: Any = None,
) -> dict[str, Any]:
    """Embed ``dataset`` into ``store``; returns a JSON-able summary (counts, skips with reasons, speed).

    ``commit_seconds``: a shard is committed at least this often (None: ``$ENCODERLAB_COMMIT_SECONDS`` or 30 s),
    so an interrupted run loses at most that much work.
    ``strict`` fails on the first unusable file, before any encoding when the listing already skipped some.
    ``engine``: where hashing and encoding run (None: this process; see ``extract.ray_engine``).
    ``summary["results"]`` holds the per-modality ``ExtractResult`` objects (not JSON; dropped by ``to_json``).
    """
    if strict:
        check_strict(dataset)
    modalities = choose_modalities(modality, encoder, dataset)
    results: list[ExtractResult] = []
    for m in modalities:
        if m == "image":
            results.append(extract_images(encoder, dataset, store, batch_size=batch_size, num_workers=num_workers,
                                          max_pixels=max_pixels, progress=progress, strict=strict,
                                          commit_seconds=commit_seconds, engine=engine))
        else:
            results.append(extract_texts(encoder, dataset, store, batch_size=batch_size, progress=progress,
                                         commit_seconds=commit_seconds, engine=engine))
    summary = embed_summary(encoder, dataset, store, results)
    summary["engine"] = engine.summary() if engine is not None else {"engine": "local"}
    return summary


def embed_summary(encoder: Encoder, dataset: Dataset, store: EmbeddingStore,
                  results: Sequence[ExtractResult]) -> dict[str, Any]:
    skipped = list(dataset.skipped) + [s for r in results for s in r.skipped]
    encoded = sum(r.encoded for r in results)
    return {
        "encoder": encoder.spec,
        "data": dataset.source,
        "items": len(dataset),
        "encoded": encoded,
        "cached": sum(r.cached for r in results),
        "skipped": skipped,
        "items_per_s": round(encoded / max(sum(r.seconds for r in results), 1e-9), 2),
        "modalities": {r.modality: r.summary() for r in results},
        "store": str(store.root),
        "split_info": dataset.split_info,
        "results": list(results),
    }
