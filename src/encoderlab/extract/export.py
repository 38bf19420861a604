"""``export_embeddings``: one dataset's embeddings out of the store, one row per usable item, to parquet or .npy.

Embeddings come from the store; only what it lacks is encoded (``image_embeddings`` / ``extract_texts``), so a
second export of the same data encodes nothing. Two layouts:

- ``FILE.parquet``: columns ``id``, ``path`` (image path), ``label``, ``split``, ``caption`` (the first text),
  ``captions`` (all texts) and ``embedding`` (a fixed-size list of float32, one per row);
- ``FILE.npy``: the ``[n, d]`` float32 matrix, plus the same metadata columns (without ``embedding``) in
  ``FILE.parquet`` beside it, row for row. That parquet records the ``.npy``'s row count and sha256, so a pair
  torn apart (one file replaced, the other not) can be recognised.

An image export embeds each row's image; a text export embeds each row's first caption. Rows that cannot be
embedded (an unusable image, no image, no text) are left out and listed in ``summary["skipped"]`` with id, path and
reason, never dropped silently. Files are written atomically (a temp file renamed into place).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_open
from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..hashing import text_key
from ..store import EmbeddingStore
from .embed import choose_modalities
from .embeddings import image_embeddings
from .loop import extract_texts, space_for

SUFFIXES = (".parquet", ".npy")
EXPORT_MODALITIES = ("auto", "image", "text")
META_KEY = b"encoderlab"  # parquet schema metadata: what the file holds and how it was made


def check_export_path(path: str | Path) -> Path:
    """The export target, refused unless it ends in .parquet or .npy (checked before any model is loaded)."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise EncoderlabError(
            f"cannot export embeddings to {str(path)!r}: unknown suffix {path.suffix or '(none)'!r}",
            "name the file .parquet (one table with an embedding column) or .npy (the matrix, with a .parquet of "
            "the metadata beside it)",
        )
    if path.is_dir():
        raise EncoderlabError(f"export target {str(path)!r} is a directory", "give a file name, e.g. emb.parquet")
    return path


def export_modality(asked: str, encoder: Encoder, dataset: Dataset) -> str:
    """The one modality to export: ``auto`` = image when both the encoder and the data have images, else text."""
    if asked not in EXPORT_MODALITIES:
        raise EncoderlabError(f"unknown export modality {asked!r}", f"use one of {', '.join(EXPORT_MODALITIES)}")
    chosen = choose_modalities(asked, encoder, dataset)  # fails on a missing tower or missing data, naming both
    return "image" if "image" in chosen else chosen[0]


def export_embeddings(
    encoder: Encoder,
    dataset: Dataset,
    store: EmbeddingStore,
    path: str | Path,
    modality: str = "auto",
    progress: bool = True,
) -> dict[str, Any]:
    """Write the embeddings of every usable row of ``dataset`` to ``path``; returns a JSON-able summary.

    The summary has ``rows`` (written), ``encoded`` / ``cached`` (distinct contents computed now / read from the
    store), ``skipped`` (rows left out, with ``id``, ``path``, ``reason``; then entries the data listing skipped),
    ``files`` (what was written) and ``dim``.
    """
    t0 = time.perf_counter()
    target = check_export_path(path)
    mod = export_modality(modality, encoder, dataset)
    table = dataset.table
    ids = table["id"].tolist()
    images = table["image"].tolist()
    texts = [list(t) if t is not None else [] for t in table["texts"].tolist()]
    skipped: list[dict[str, Any]] = []
    if mod == "image":
        emb = image_embeddings(encoder, dataset, store, progress=progress)
        rows = emb.rows.tolist()
        X = emb.X
        result = emb.result
        reason_of = {str(s["path"]): s["reason"] for s in result.skipped}
        kept = set(rows)
        for i in range(len(ids)):
            if i not in kept:
                path_i = images[i]
                reason = "no-image" if path_i is None else reason_of.get(str(path_i), "unusable")
                skipped.append({"id": ids[i], "path": path_i, "reason": reason})
    else:
        rows = [i for i, t in enumerate(texts) if t]
        skipped += [{"id": ids[i], "path": images[i], "reason": "no-text"} for i, t in enumerate(texts) if not t]
        firsts = [texts[i][0] for i in rows]
        result = extract_texts(encoder, list(dict.fromkeys(firsts)), store, progress=progress and len(rows) > 256)
        X = np.asarray(space_for(store, encoder, "text").get([text_key(t) for t in firsts]), dtype=np.float32)
    skipped += [{"id": None, **s} for s in dataset.skipped]
    X = np.ascontiguousarray(X, dtype=np.float32)
    meta = {
        "id": [ids[i] for i in rows],
        "path": [images[i] for i in rows],
        "label": [table["label"].iat[i] for i in rows],
        "split": [table["split"].iat[i] for i in rows],
        "caption": [texts[i][0] if texts[i] else None for i in rows],
        "captions": [texts[i] for i in rows],
    }
    info = {
        "encoder": encoder.spec,
        "fingerprint": result.fingerprint,
        "modality": mod,
        "data": dataset.source,
        "rows": len(rows),
        "dim": int(X.shape[1]),
    }
    files = _write(target, meta, X, info)
    return {
        **info,
        "items": len(dataset),
        "encoded": result.encoded,
        "cached": result.cached,
        "skipped": skipped,
        "n_skipped": len(skipped),
        "path": str(target),
        "files": files,
        "store": str(store.root),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def _write(target: Path, meta: dict[str, list], X: np.ndarray, info: dict[str, Any]) -> list[str]:
    """Write the export files atomically; returns their paths (the .npy first in the matrix layout)."""
    import pyarrow as pa

    columns: dict[str, Any] = {
        "id": pa.array(meta["id"], pa.string()),
        "path": pa.array(meta["path"], pa.string()),
        "label": pa.array(meta["label"], pa.string()),
        "split": pa.array(meta["split"], pa.string()),
        "caption": pa.array(meta["caption"], pa.string()),
        "captions": pa.array(meta["captions"], pa.list_(pa.string())),
    }
    if target.suffix.lower() == ".parquet":
        columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(X.reshape(-1), pa.float32()), X.shape[1])
        _write_parquet(target, columns, {**info, "layout": "parquet"})
        return [str(target)]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, X, allow_pickle=False)
    data = buf.getvalue()
    sidecar = target.with_suffix(".parquet")
    with atomic_open(target, "wb") as f:
        f.write(data)
    # Written second and naming the matrix's checksum: a metadata file always describes a complete matrix.
    layout = {"layout": "npy", "npy": target.name, "npy_sha256": hashlib.sha256(data).hexdigest()}
    _write_parquet(sidecar, columns, {**info, **layout})
    return [str(target), str(sidecar)]


def _write_parquet(path: Path, columns: dict[str, Any], info: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table(columns).replace_schema_metadata({META_KEY: json.dumps(info, sort_keys=True).encode("utf-8")})
    with atomic_open(path, "wb") as f:
        pq.write_table(table, f)
