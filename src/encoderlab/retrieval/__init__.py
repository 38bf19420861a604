"""Retrieval: FAISS indexes over the embedding store, measured against exact search, and searching them.

    from encoderlab.retrieval import open_index, index_dataset, build_index, ArrayVectors

    doc, _ = index_dataset(encoder, dataset, store, "~/indexes/emoji")   # embed what is missing, build, measure
    index = open_index("~/indexes/emoji")                                # memory-mapped
    hits = index.search_text("a red heart", k=10)                        # or search_image / search_like / _vectors
    hits.columns()                                                       # column-wise, JSON-ready

- ``kinds``: flat, hnsw, ivf-flat, sq8, ivf-pq and the ``--kind auto`` rule (by item count and memory budget);
- ``build``: build / append an index directory (``index.faiss``, ``items.parquet``, ``index.json``), streamed;
- ``measure``: held-out queries, exact neighbours, recall@10, tuning of efSearch / nprobe, queries/s;
- ``search``: ``SearchIndex`` (vector, text, image and item-id queries, fingerprint-checked encoder);
- ``collection``: a dataset as index items (one per distinct content key), ``index_dataset`` / ``add_dataset``.

``kinds``, ``vectors``, ``items``, ``measure`` and ``build`` take arrays and store spaces only (no encoder, no
torch); ``collection`` and the text / image searches of ``search`` load encoders. FAISS is optional
(``pip install 'encoderlab[index]'``); without it, using an index fails with that hint.
"""

from .build import DEFAULT_RECALL_TARGET, INDEX_NAME, META_NAME, add_vectors, build_index, read_meta
from .items import ITEM_COLUMNS, ITEMS_NAME, ItemTable
from .kinds import (
    DEFAULT_MEMORY,
    FLAT_BELOW,
    KIND_CHOICES,
    KINDS,
    IndexPlan,
    choose_plan,
    estimate_bytes,
    format_bytes,
    nlist_for,
    parse_memory,
)
from .measure import HeldOut, compute_truth, exact_neighbours, recall_at_k, sample_held_out
from .search import Hits, SearchIndex, check_fingerprint, load_index_encoder, load_query_image, open_index
from .vectors import ArrayVectors, StoreVectors, VectorSource

__all__ = [
    "DEFAULT_MEMORY",
    "DEFAULT_RECALL_TARGET",
    "FLAT_BELOW",
    "INDEX_NAME",
    "ITEMS_NAME",
    "ITEM_COLUMNS",
    "KINDS",
    "KIND_CHOICES",
    "META_NAME",
    "ArrayVectors",
    "HeldOut",
    "Hits",
    "IndexPlan",
    "ItemTable",
    "SearchIndex",
    "StoreVectors",
    "VectorSource",
    "add_dataset",
    "add_vectors",
    "build_index",
    "check_fingerprint",
    "choose_plan",
    "compute_truth",
    "estimate_bytes",
    "exact_neighbours",
    "format_bytes",
    "index_dataset",
    "load_index_encoder",
    "load_query_image",
    "nlist_for",
    "open_index",
    "parse_memory",
    "read_meta",
    "recall_at_k",
    "sample_held_out",
]


def __getattr__(name: str):  # collection imports the extraction code (torch): only when asked for
    if name in ("index_dataset", "add_dataset", "collect", "Collection"):
        from . import collection

        return getattr(collection, name)
    raise AttributeError(f"module 'encoderlab.retrieval' has no attribute {name!r}")
