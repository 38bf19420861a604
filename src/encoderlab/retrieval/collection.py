"""A dataset as index items: embed what the store lacks, then one item per distinct content key.

An image index has one row per distinct image (rows of the dataset with the same file bytes share one embedding
and are indexed once, under the first row's id); a text index has one row per distinct caption (a caption shared by
many images is indexed once, under the first of them). Rows whose content could not be used are reported with
path and reason, never dropped silently. ``index_dataset`` builds an index from a dataset, ``add_dataset`` appends
one's new items to an existing index.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..data.manifest import Dataset
from ..encoders.base import Encoder
from ..errors import EncoderlabError
from ..extract import extract_images, extract_texts, space_for
from ..hashing import text_key
from ..store import EmbeddingStore
from .build import DEFAULT_RECALL_TARGET, add_vectors, build_index, read_meta
from .items import ITEM_COLUMNS, ITEMS_NAME, ItemTable
from .kinds import DEFAULT_MEMORY
from .vectors import StoreVectors


@dataclass
class Collection:
    """The items of one dataset in one modality, keyed by content, with their vectors in the store."""

    items: pd.DataFrame
    source: StoreVectors
    modality: str
    skipped: list[dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0  # dataset rows (or captions) whose content an earlier one already brought
    without: int = 0  # dataset rows without this modality (no image / no caption)


def collect(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, modality: str, *, progress: bool = True,
            max_pixels: int | None = None, batch_size: int | None = None, engine: Any = None) -> Collection:
    """Embed ``dataset``'s ``modality`` into ``store`` (only what is missing) and list one item per distinct key.

    ``engine``: where the embedding runs (None: this process; ``extract.ray_engine.RayEngine``: a Ray cluster).
    """
    encoder.check_modality(modality)
    # dataset metadata columns named like an item column keep their values under a ``meta_`` prefix
    t = dataset.table.rename(columns={c: f"meta_{c}" for c in dataset.metadata_columns() if c in ITEM_COLUMNS})
    if modality == "image":
        if not dataset.has_images:
            raise EncoderlabError(f"dataset {dataset.source!r} has no images", "index its texts (--modality text)")
        result = extract_images(encoder, dataset, store, progress=progress, max_pixels=max_pixels,
                                batch_size=batch_size, engine=engine)
        keys = pd.Series(result.keys, dtype=object)
        rows = t.assign(key=keys, text=[c[0] if len(c) else None for c in t["texts"]], captions=t["texts"])
        without = int(t["image"].isna().sum())
        skipped = list(dataset.skipped) + list(result.skipped)
    elif modality == "text":
        if not dataset.has_texts:
            raise EncoderlabError(f"dataset {dataset.source!r} has no captions", "index its images (--modality image)")
        extract_texts(encoder, dataset, store, progress=progress, batch_size=batch_size, engine=engine)
        flat = t.assign(captions=t["texts"]).explode("texts").dropna(subset=["texts"]).rename(columns={"texts": "text"})
        rows = flat.assign(key=[text_key(x) for x in flat["text"]])
        without = int((t["texts"].map(len) == 0).sum())
        skipped = list(dataset.skipped)
    else:
        raise EncoderlabError(f"unknown modality {modality!r}", "use image or text")
    usable = rows[rows["key"].notna()]
    first = usable[~usable["key"].duplicated()]
    items = first.drop(columns=[c for c in ("texts",) if c in first.columns]).assign(modality=modality)
    items = items.reset_index(drop=True)
    source = StoreVectors(space_for(store, encoder, modality), items["key"].tolist())
    return Collection(items, source, modality, skipped, int(len(usable) - len(first)), without)


def encoder_meta(encoder: Encoder, modality: str) -> dict[str, Any]:
    """What ``index.json`` records about the encoder: spec, the indexed modality's fingerprint, every tower's."""
    return {"spec": encoder.spec, "fingerprint": encoder.fingerprint(modality), "modality": modality,
            "embed_dim": encoder.embed_dim, "precision": encoder.precision, "modalities": list(encoder.modalities),
            "fingerprints": {m: encoder.fingerprint(m) for m in encoder.modalities}}


def data_meta(dataset: Dataset, col: Collection, split: str | None) -> dict[str, Any]:
    return {"source": dataset.source, "split": split, "rows": len(dataset), "indexed": len(col.items),
            "duplicates": col.duplicates, "without_" + col.modality: col.without, "skipped": len(col.skipped),
            "split_info": dataset.split_info}


def index_dataset(encoder: Encoder, dataset: Dataset, store: EmbeddingStore, out: str | os.PathLike, *,
                  modality: str = "image", split: str | None = None, kind: str = "auto",
                  memory: int | str = DEFAULT_MEMORY, recall_target: float = DEFAULT_RECALL_TARGET,
                  refine: str | None = None, seed: int = 0, force: bool = False, progress: bool = True,
                  max_pixels: int | None = None, engine: Any = None) -> tuple[dict[str, Any], Collection]:
    """Embed (what is missing) and index one dataset; returns ``(index.json document, collection)``."""
    from .build import check_out

    check_out(Path(out).expanduser(), force)  # before any encoding
    col = collect(encoder, dataset, store, modality, progress=progress, max_pixels=max_pixels, engine=engine)
    if not len(col.items):
        raise EncoderlabError(f"no usable {modality} in {dataset.source!r} ({len(col.skipped)} skipped)",
                              "check the files with `encoderlab data inspect --decode`")
    meta = {"modality": modality, "encoder": encoder_meta(encoder, modality), "store": str(store.root),
            "data": data_meta(dataset, col, split)}
    doc = build_index(col.source, col.items, out, kind=kind, memory=memory, recall_target=recall_target,
                      refine=refine, seed=seed, meta=meta, force=force, progress=progress)
    return doc, col


def add_dataset(path: str | os.PathLike, encoder: Encoder, dataset: Dataset, store: EmbeddingStore, *,
                split: str | None = None, progress: bool = True,
                max_pixels: int | None = None, engine: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Append ``dataset``'s items that the index lacks (by store key); returns ``(index.json, summary)``.

    The encoder must be the index's (``search.check_fingerprint``); items already present are skipped and counted.
    """
    from .search import check_fingerprint

    out = Path(path).expanduser()
    doc = read_meta(out)
    check_fingerprint(doc, out, encoder)
    modality = doc.get("modality")
    if modality not in ("image", "text"):
        raise EncoderlabError(f"index {out} was built from vectors, not a dataset", "rebuild it from a dataset")
    col = collect(encoder, dataset, store, modality, progress=progress, max_pixels=max_pixels, engine=engine)
    present = ItemTable.read(out / ITEMS_NAME).find_keys(col.items["key"].tolist()) >= 0
    new = col.items[~present].reset_index(drop=True)
    source = StoreVectors(col.source.space, new["key"].tolist())
    summary = {"data": dataset.source, "split": split, "rows": len(dataset), "added": len(new),
               "already_present": int(present.sum()), "duplicates": col.duplicates, "skipped": len(col.skipped)}
    doc = add_vectors(out, source, new, note=summary, progress=progress)
    return doc, {**summary, "count": doc["count"], "skipped_items": col.skipped}
