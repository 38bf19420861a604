"""The one extraction loop: every encoder, every dataset, into the embedding store.

Images are decoded and resized in DataLoader worker processes while the model runs on the previous batch; items
are keyed by content, so only what the store lacks is computed. Memory stays bounded: batches stream through and
the store writer flushes a shard every ``shard_size`` rows or ``commit_seconds`` (None: the store's default, see
``store.writer.COMMIT_SECONDS``), so a killed run keeps all but its last seconds of work. Bad images are skipped
and reported by path and reason (``strict=True`` turns any skip into an error); a CUDA out-of-memory error halves
the batch and retries.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..data.images import load_image
from ..data.manifest import Dataset
from ..encoders.base import Encoder, FeatureSource
from ..errors import BadImageError, EncoderlabError
from ..hashing import image_key, text_key
from ..progress import progress_bar
from ..store import EmbeddingSpace, EmbeddingStore


@dataclass
class ExtractResult:
    """What one extraction did. ``keys[i]`` is the content key of dataset row i (None where it was skipped)."""

    modality: str
    items: int  # rows asked for
    encoded: int  # distinct contents computed now
    cached: int  # distinct contents already in the store
    skipped: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    keys: list[str | None] = field(default_factory=list)
    fingerprint: str = ""
    repaired: list[dict[str, Any]] = field(default_factory=list)  # corrupt shards removed; their items recomputed

    @property
    def items_per_s(self) -> float:
        """Newly encoded items per second of wall time (0 when nothing needed encoding)."""
        return self.encoded / self.seconds if self.seconds > 0 and self.encoded else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "modality": self.modality,
            "items": self.items,
            "encoded": self.encoded,
            "cached": self.cached,
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items_per_s, 2),
            "fingerprint": self.fingerprint,
            "repaired_shards": len(self.repaired),
        }


def default_batch_size(encoder: Encoder, modality: str) -> int:
    """A throughput-oriented default: the encoder's own preference, else larger on accelerators."""
    pref = getattr(encoder, "preferred_batch_size", None)
    if modality == "image" and pref:
        return int(pref)
    if encoder.device.type == "cpu":
        return 32 if modality == "image" else 128
    return 256 if modality == "image" else 512


def default_num_workers(device: torch.device) -> int:
    """Decode worker processes that run beside the model.

    On an accelerator the host only decodes, so several workers keep it fed. On a CPU the model itself wants every
    core; with 2 cores a worker process only competes with the model's threads (efficientnet-lite0 on OpenClipart,
    PyTorch: 28 img/s decoding in-process vs 25.5 with one worker and 24 with two; ONNX Runtime: 38-41 vs 39-40),
    so decoding runs in the main process between forwards, on a thread pool (PIL releases the GIL there).
    """
    n = os.cpu_count() or 1
    if device.type == "cpu":
        return 0 if n <= 2 else max(1, n // 4)
    return max(1, min(8, n - 1))


def still_missing(space: EmbeddingSpace, wanted: list[str]) -> tuple[list[str], list[dict[str, Any]]]:
    """(keys of ``wanted`` to compute, corrupt shards removed): what the space lacks once the shards holding the
    rest have passed the check a read does.

    Counting a key as cached on the word of a corrupt shard would report success and fail a later step; the store
    can recompute what such a shard held, so the run heals itself: the shard is removed (as ``store verify
    --repair`` does) and its items join the work. Verification is cached per process (``checksum_on_read``).
    """
    todo = space.missing(wanted)
    absent = set(todo)
    cached = [k for k in wanted if k not in absent]
    repaired = space.verify_holding(cached, repair=True) if cached else []
    if repaired:
        todo = space.missing(wanted)
        for r in repaired:
            warnings.warn(f"removed corrupt embedding shard {r['path']} ({r['detail']}); its {r['rows']} items are"
                          " recomputed", stacklevel=3)
    return todo, repaired


def space_for(store: EmbeddingStore, encoder: Encoder, modality: str):
    """The store space holding this encoder's embeddings of one modality."""
    fp = encoder.fingerprint(modality)  # type: ignore[arg-type]
    meta = {"spec": encoder.spec, "modality": modality, "embed_dim": encoder.embed_dim, "precision": encoder.precision}
    return store.space(fp, meta=meta)


# ---------------------------------------------------------------------------------------------------- images


class _DecodeDataset(torch.utils.data.Dataset):
    """(key, path) pairs -> (key, tensor or None, path, reason). Errors become data, never worker crashes."""

    def __init__(self, items: list[tuple[str, str]], transform: Callable, max_pixels: int | None) -> None:
        self.items = items
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, torch.Tensor | None, str, str]:
        key, path = self.items[i]
        try:
            img = load_image(path, max_pixels=self.max_pixels)
            return key, self.transform(img), path, ""
        except BadImageError as e:
            return key, None, path, e.reason
        except Exception as e:  # a transform failing on one odd image must not end the run
            return key, None, path, f"transform-failed: {type(e).__name__}: {e}"


def _collate(batch: list[tuple[str, torch.Tensor | None, str, str]]):
    good = [(k, t) for k, t, _, _ in batch if t is not None]
    bad = [(k, {"path": p, "reason": r}) for k, t, p, r in batch if t is None]
    keys = [k for k, _ in good]
    pixels = torch.stack([t for _, t in good]) if good else None
    return keys, pixels, bad


def _threaded_batches(decode: _DecodeDataset, batch_size: int) -> Iterator[tuple]:
    """Batches decoded in this process by a thread pool, one batch at a time (no overlap with the model)."""
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        for start in range(0, len(decode), batch_size):
            yield _collate(list(pool.map(decode.__getitem__, range(start, min(start + batch_size, len(decode))))))


def is_out_of_memory(err: BaseException) -> bool:
    """True for a CUDA/MPS/CPU allocator failure (torch raises RuntimeError with "out of memory" for most)."""
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def encode_with_backoff(encode: Callable[[Any], torch.Tensor], batch: Any) -> torch.Tensor:
    """Run ``encode(batch)``; on out-of-memory split the batch (a tensor or a list) in halves, recursively.

    A batch of one that still does not fit re-raises: there is nothing left to split.
    """
    try:
        return encode(batch)
    except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
        if not is_out_of_memory(e) or len(batch) <= 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(batch) // 2
        return torch.cat([encode_with_backoff(encode, batch[:half]), encode_with_backoff(encode, batch[half:])])


def _hash_images(
    paths: Sequence[str | None], progress: bool, workers: int = 4
) -> tuple[list[str | None], list[dict[str, str]]]:
    """Content keys for image paths (threaded: hashing is I/O bound); unreadable files are reported.

    Every run re-reads the bytes (about 0.5 GB/s here): a key must follow the file's content, not its name or mtime.
    """

    def one(p: str | None) -> tuple[str | None, dict[str, str] | None]:
        if p is None:
            return None, None
        try:
            return image_key(p), None
        except FileNotFoundError:
            return None, {"path": str(p), "reason": "missing"}
        except IsADirectoryError:
            return None, {"path": str(p), "reason": "is-a-directory"}
        except OSError as e:
            return None, {"path": str(p), "reason": f"unreadable: {e.strerror or e}"}

    with ThreadPoolExecutor(max_workers=workers) as pool, progress_bar(len(paths), "file", progress, "hash") as bar:
        results = []
        for r in pool.map(one, paths):
            results.append(r)
            bar.update(1)
    return [k for k, _ in results], [s for _, s in results if s]


@dataclass(frozen=True)
class ImageOptions:
    """How images are encoded once it is known which: the same for every engine (and sent to Ray workers)."""

    batch_size: int
    num_workers: int | None = None
    max_pixels: int | None = None
    shard_size: int = 4096
    commit_seconds: float | None = None
    strict: bool = False


@dataclass(frozen=True)
class TextOptions:
    batch_size: int
    shard_size: int = 4096
    commit_seconds: float | None = None


def encode_image_items(encoder: Encoder, space: EmbeddingSpace, items: Sequence[tuple[str, str]],
                       options: ImageOptions, bar: Any = None) -> tuple[int, list[dict[str, str]]]:
    """Decode, encode and commit ``(key, path)`` items into ``space``; returns (rows encoded, skips).

    Each skip is ``{"path", "reason", "key"}`` (the key tells the caller which content failed). The writer commits
    a shard every ``shard_size`` rows or ``commit_seconds``, and what was computed is kept when this raises.
    """
    workers = default_num_workers(encoder.device) if options.num_workers is None else options.num_workers
    decode = _DecodeDataset(list(items), encoder.image_transform(), options.max_pixels)
    if workers > 0:
        loader: Any = torch.utils.data.DataLoader(decode, batch_size=options.batch_size, shuffle=False,
                                                  num_workers=workers, collate_fn=_collate, prefetch_factor=2,
                                                  pin_memory=encoder.device.type == "cuda")
    else:
        loader = _threaded_batches(decode, options.batch_size)
    encoded, skipped = 0, []
    with space.writer(shard_size=options.shard_size, commit_seconds=options.commit_seconds) as writer:
        for batch_keys, pixels, bad in loader:
            for key, b in bad:
                if options.strict:
                    _raise_strict([b])
                skipped.append({**b, "key": key})
            if pixels is not None:
                emb = encode_with_backoff(encoder.encode_pixels, pixels)
                writer.add(batch_keys, emb.numpy().astype(np.float32, copy=False))
                encoded += len(batch_keys)
            if bar is not None:
                bar.update(len(batch_keys) + len(bad))
    return encoded, skipped


def encode_text_items(encoder: Encoder, space: EmbeddingSpace, texts: Sequence[str], options: TextOptions,
                      bar: Any = None) -> int:
    """Encode and commit ``texts`` (keyed by ``text_key``) into ``space`` in batches; returns rows encoded."""
    encoded = 0
    with space.writer(shard_size=options.shard_size, commit_seconds=options.commit_seconds) as writer:
        for start in range(0, len(texts), options.batch_size):
            chunk = list(texts[start : start + options.batch_size])
            emb = encode_with_backoff(lambda b: encoder.encode_texts(b, batch_size=len(b)), chunk)
            writer.add([text_key(t) for t in chunk], emb.numpy().astype(np.float32, copy=False))
            encoded += len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return encoded


class LocalEngine:
    """Hashing and encoding in this process (decode on threads or DataLoader workers): the default engine."""

    name = "local"

    def hash_images(self, paths: Sequence[str | None], progress: bool, encoder: Encoder | None = None):
        return _hash_images(paths, progress)

    def encode_images(self, encoder: Encoder, space: EmbeddingSpace, items: Sequence[tuple[str, str]],
                      options: ImageOptions, progress: bool) -> tuple[int, list[dict[str, str]]]:
        with progress_bar(len(items), "img", progress) as bar:
            return encode_image_items(encoder, space, items, options, bar)

    def encode_texts(self, encoder: Encoder, space: EmbeddingSpace, texts: Sequence[str], options: TextOptions,
                     progress: bool) -> int:
        with progress_bar(len(texts), "text", progress) as bar:
            return encode_text_items(encoder, space, texts, options, bar)


LOCAL = LocalEngine()


def extract_images(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    *,
    batch_size: int | None = None,
    num_workers: int | None = None,
    max_pixels: int | None = None,
    shard_size: int = 4096,
    commit_seconds: float | None = None,
    progress: bool = True,
    strict: bool = False,
    engine: Any = None,
) -> ExtractResult:
    """Embed every image of ``dataset`` that the store lacks; returns counts, skips and per-row keys.

    ``engine``: where hashing and encoding run (None: this process; ``RayEngine``: a Ray cluster). Everything else
    (what is missing, which rows share a content, the result) is decided here, the same for every engine.
    """
    encoder.check_modality("image")
    engine = engine or LOCAL
    t0 = time.perf_counter()
    source = encoder.feature_source("image")
    if source is not None:
        base = extract_images(source.base, dataset, store, batch_size=batch_size, num_workers=num_workers,
                              max_pixels=max_pixels, shard_size=shard_size, commit_seconds=commit_seconds,
                              progress=progress, strict=strict, engine=engine)
        return _derive(encoder, "image", source, base, store, shard_size, t0, commit_seconds=commit_seconds)
    space = space_for(store, encoder, "image")
    paths = list(dataset.table["image"])
    if all(p is None for p in paths):
        raise EncoderlabError(f"dataset {dataset.source!r} has no images (no image column, or none was usable)",
                              "use a dataset with images for this step, or embed its texts instead")
    keys, skipped = engine.hash_images(paths, progress and len(paths) >= 10_000, encoder=encoder)
    wanted = list(dict.fromkeys(k for k in keys if k is not None))
    missing, repaired = still_missing(space, wanted)
    todo = set(missing)
    first_path: dict[str, str] = {}
    for k, p in zip(keys, paths):
        if k is not None and k in todo and k not in first_path:
            first_path[k] = str(p)
    items = list(first_path.items())
    n_rows = sum(p is not None for p in paths)
    result = ExtractResult("image", n_rows, 0, len(wanted) - len(items), skipped, fingerprint=space.fingerprint,
                           repaired=repaired)
    if strict and skipped:
        _raise_strict(skipped)
    if items:
        options = ImageOptions(batch_size or default_batch_size(encoder, "image"), num_workers, max_pixels,
                               shard_size, commit_seconds, strict)
        encoded, bad = engine.encode_images(encoder, space, items, options, progress)
        result.encoded = encoded
        result.skipped.extend(bad)
        failed = {b["key"] for b in bad}
        for b in bad:
            del b["key"]
        # Rows whose content failed to decode get no key, so nothing downstream reads a missing embedding.
        keys = [None if k in failed else k for k in keys]
    result.keys = keys
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------------- texts


def extract_texts(
    encoder: Encoder,
    dataset: Dataset | Sequence[str],
    store: EmbeddingStore,
    *,
    batch_size: int | None = None,
    shard_size: int = 4096,
    commit_seconds: float | None = None,
    progress: bool = True,
    engine: Any = None,
) -> ExtractResult:
    """Embed every distinct text (all captions of all rows) that the store lacks.

    ``keys[i]`` is the key of row i's *first* text; ``text_keys`` of all captions come from ``hashing.text_key``.
    ``engine``: where the encoding runs (None: this process), as for ``extract_images``.
    """
    encoder.check_modality("text")
    engine = engine or LOCAL
    t0 = time.perf_counter()
    source = encoder.feature_source("text")
    if source is not None:
        base = extract_texts(source.base, dataset, store, batch_size=batch_size, shard_size=shard_size,
                             commit_seconds=commit_seconds, progress=progress, engine=engine)
        if isinstance(dataset, Dataset):
            per_row = [list(t) if t is not None else [] for t in dataset.table["texts"]]
        else:
            per_row = [[t] for t in dataset]
        every = list(dict.fromkeys(text_key(t) for row in per_row for t in row))
        return _derive(encoder, "text", source, base, store, shard_size, t0, every, commit_seconds=commit_seconds)
    space = space_for(store, encoder, "text")
    if isinstance(dataset, Dataset):
        per_row = [list(t) if t is not None else [] for t in dataset.table["texts"]]
    else:
        per_row = [[t] for t in dataset]
    if not any(per_row):
        raise EncoderlabError(f"dataset {getattr(dataset, 'source', 'given')!r} has no texts (no caption column)",
                              "use a dataset with captions for this step, or embed its images instead")
    distinct = list(dict.fromkeys(t for row in per_row for t in row))
    key_of = {t: text_key(t) for t in distinct}
    missing, repaired = still_missing(space, list(dict.fromkeys(key_of[t] for t in distinct)))
    todo = set(missing)
    texts = [t for t in distinct if key_of[t] in todo]
    result = ExtractResult("text", sum(1 for r in per_row if r), 0, len(distinct) - len(texts), [],
                           fingerprint=space.fingerprint, repaired=repaired)
    if texts:
        texts.sort(key=len)  # similar lengths per batch: least padding
        options = TextOptions(batch_size or default_batch_size(encoder, "text"), shard_size, commit_seconds)
        result.encoded = engine.encode_texts(encoder, space, texts, options, progress)
    result.keys = [key_of[r[0]] if r else None for r in per_row]
    result.seconds = time.perf_counter() - t0
    return result


def _derive(
    encoder: Encoder,
    modality: str,
    source: FeatureSource,
    base: ExtractResult,
    store: EmbeddingStore,
    shard_size: int,
    t0: float,
    all_keys: Sequence[str] | None = None,
    commit_seconds: float | None = None,
) -> ExtractResult:
    """Embeddings of an encoder that is a head on another encoder's features: read the base space, apply the head.

    The content keys are the same in both spaces, so whatever the base extraction cached is reused and only rows
    the derived space lacks go through the (cheap) head.
    """
    base_space = space_for(store, source.base, modality)
    space = space_for(store, encoder, modality)
    wanted = list(dict.fromkeys(all_keys if all_keys is not None else [k for k in base.keys if k is not None]))
    todo, repaired = still_missing(space, wanted)
    result = ExtractResult(modality, base.items, 0, len(wanted) - len(todo), list(base.skipped),
                           keys=list(base.keys), fingerprint=space.fingerprint, repaired=base.repaired + repaired)
    if todo:
        with space.writer(shard_size=shard_size, commit_seconds=commit_seconds) as writer, torch.inference_mode():
            for start in range(0, len(todo), shard_size):
                chunk = todo[start : start + shard_size]
                feats = torch.from_numpy(np.ascontiguousarray(base_space.get(chunk)))
                writer.add(chunk, source.head(feats).float().cpu().numpy().astype(np.float32, copy=False))
                result.encoded += len(chunk)
    result.seconds = time.perf_counter() - t0
    return result


# ---------------------------------------------------------------------------------------------------- helpers


def _raise_strict(skipped: list[dict[str, str]]) -> None:
    first = skipped[0]
    more = f" and {len(skipped) - 1} more" if len(skipped) > 1 else ""
    raise EncoderlabError(
        f"--strict: {first['path']} cannot be used ({first['reason']}){more}",
        "fix or remove the file, or drop --strict to skip and report bad files",
    )
