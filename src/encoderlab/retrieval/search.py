"""``open_index(DIR) -> SearchIndex``: search an index directory by vector, text, image or item id.

The index is memory-mapped where FAISS can map its kind (flat, HNSW storage, IVF lists, the re-ranking copy of
ivf-pq), so opening a large index is quick and its pages are read on demand. Queries are encoded with the encoder
the index was built with (its spec and precision are in ``index.json``); an encoder whose fingerprint differs is
refused with both names. Results (``Hits``) gather their item columns with one Arrow ``take``.

    index = open_index("~/indexes/emoji")
    hits = index.search_text("a red heart", k=10)
    hits.columns()          # {"rank": [...], "score": [...], "id": [...], "image": [...], ...}, JSON-ready
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BadImageError, EncoderlabError, close_matches
from ..normalize import normalize_rows
from .backend import require_faiss, to_gpu_if_available
from .build import INDEX_NAME, read_meta
from .items import ITEMS_NAME, ItemTable
from .kinds import search_parameters

#: columns a hit shows by default (``captions`` and metadata on request)
HIT_COLUMNS = ("id", "key", "image", "text", "label", "split")


@dataclass
class Hits:
    """The results of one query, best first: index ``rows``, cosine ``scores``, and their ``items``."""

    rows: np.ndarray
    scores: np.ndarray
    items: ItemTable
    seconds: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, names: tuple[str, ...] | list[str] | None = None) -> dict[str, list]:
        """Column-wise, JSON-ready: ``rank``, ``score``, ``row`` and the item columns (``HIT_COLUMNS`` by default)."""
        wanted = [c for c in (names or HIT_COLUMNS) if c in self.items.names]
        cols = self.items.take(self.rows, wanted)
        out: dict[str, list] = {"rank": list(range(1, len(self.rows) + 1)),
                                "score": np.round(self.scores.astype(np.float64), 6).tolist(),
                                "row": self.rows.tolist()}
        out.update(cols)
        return out

    def frame(self, names: tuple[str, ...] | list[str] | None = None) -> Any:
        import pandas as pd

        return pd.DataFrame(self.columns(names))


class SearchIndex:
    """An opened index directory. ``search_vectors`` needs no encoder; the other searches load it once."""

    def __init__(self, path: str | os.PathLike, *, mmap: bool = True, gpu: bool | None = None) -> None:
        faiss = require_faiss()
        self.path = Path(path).expanduser()
        self.doc = read_meta(self.path)
        self.kind: str = self.doc["kind"]
        self.modality: str = self.doc.get("modality") or "vector"
        self.knobs: dict[str, Any] = dict(self.doc.get("search") or {})
        flags = faiss.IO_FLAG_MMAP_IFC if mmap else 0  # maps flat codes, HNSW storage, IVF lists, Refine copies
        try:
            self.index = faiss.read_index(str(self.path / INDEX_NAME), flags)
        except RuntimeError as e:
            raise EncoderlabError(f"cannot read {self.path / INDEX_NAME}: {str(e).splitlines()[-1]}",
                                  "rebuild the index with `encoderlab index build`") from None
        self.mmapped = mmap
        self._cpu_index = self.index  # filtered searches (an ID selector) stay on the CPU
        if self.kind == "flat" and gpu is not False:
            self.index = to_gpu_if_available(self.index)
        self.items = ItemTable.read(self.path / ITEMS_NAME)
        if self.index.ntotal != len(self.items):
            raise EncoderlabError(f"{self.path}: {INDEX_NAME} has {self.index.ntotal} rows but {ITEMS_NAME} has "
                                  f"{len(self.items)}", "rebuild the index (its files do not belong together)")
        self._encoder: Any = None
        self._space: Any = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self) -> str:
        return f"SearchIndex({str(self.path)!r}, kind={self.kind}, items={len(self)}, modality={self.modality})"

    @property
    def dim(self) -> int:
        return int(self.doc["dim"])

    @property
    def fingerprint(self) -> str | None:
        return (self.doc.get("encoder") or {}).get("fingerprint")

    def info(self) -> dict[str, Any]:
        """``index.json`` with the path and the live item count."""
        return {**self.doc, "path": str(self.path), "count": len(self), "mmapped": self.mmapped}

    # ---- searching ------------------------------------------------------------------------------------

    def search_batch(self, queries: np.ndarray, k: int = 10, *, allowed: np.ndarray | None = None,
                     knobs: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, rows)``, each ``[n, k]``, for ``n`` query vectors (normalised here); row -1 where fewer.

        ``allowed``: index rows (e.g. ``items.rows_where(label="cat")``) the results are restricted to.
        ``knobs`` overrides the tuned efSearch / nprobe / k_factor for this call.
        """
        Q = normalize_rows(np.atleast_2d(np.asarray(queries, dtype=np.float32)))
        if Q.shape[1] != self.dim:
            raise EncoderlabError(f"query vectors have {Q.shape[1]} dimensions, index {self.path} has {self.dim}",
                                  "encode queries with the index's encoder")
        k = max(1, min(int(k), len(self)))
        params = search_parameters(self.kind, {**self.knobs, **(knobs or {})}, k, len(self),
                                   self.doc.get("params", {}).get("nlist"), allowed)
        if params is None:
            return self.index.search(Q, k)
        return self._cpu_index.search(Q, k, params=params)

    def search_vectors(self, query: np.ndarray, k: int = 10, *, allowed: np.ndarray | None = None,
                       knobs: dict[str, Any] | None = None) -> Hits:
        """The ``k`` items nearest one query vector (cosine), best first."""
        t0 = time.perf_counter()
        scores, rows = self.search_batch(np.asarray(query).reshape(1, -1), k, allowed=allowed, knobs=knobs)
        keep = rows[0] >= 0
        return Hits(rows[0][keep], scores[0][keep], self.items, {"search": time.perf_counter() - t0})

    def search_text(self, text: str, k: int = 10, **kwargs: Any) -> Hits:
        """Items nearest a text, encoded by the index's text tower (text -> image on an image index)."""
        if not isinstance(text, str) or not text.strip():
            raise EncoderlabError(f"the query text is empty ({text!r})", "pass some words, e.g. --text 'a red car'")
        t0 = time.perf_counter()
        enc = self.encoder("text")
        q = enc.encode_texts([text], normalize=True).numpy()
        hits = self.search_vectors(q[0], k, **kwargs)
        hits.seconds["encode"] = time.perf_counter() - t0 - hits.seconds["search"]
        return hits

    def search_image(self, image: Any, k: int = 10, *, max_pixels: int | None = None, **kwargs: Any) -> Hits:
        """Items nearest an image (a path or a PIL image), encoded by the index's image tower."""
        t0 = time.perf_counter()
        img = load_query_image(image, max_pixels)
        enc = self.encoder("image")
        q = enc.encode_images([img], normalize=True).numpy()
        hits = self.search_vectors(q[0], k, **kwargs)
        hits.seconds["encode"] = time.perf_counter() - t0 - hits.seconds["search"]
        return hits

    def search_like(self, item_id: str, k: int = 10, **kwargs: Any) -> Hits:
        """Items nearest an item of the index (its own vector; the item itself comes first, score 1)."""
        rows = self.items.rows_of_id(item_id)
        if not len(rows):
            sample = self.items.table.column("id").slice(0, 2000).to_pylist()
            guess = close_matches(str(item_id), sample, n=3)
            raise EncoderlabError(f"no item with id {item_id!r} in index {self.path} ({len(self)} items)",
                                  (f"did you mean {', '.join(map(repr, guess))}? " if guess else "")
                                  + "ids are the dataset's item ids (the id column of `encoderlab search --json`)")
        return self.search_vectors(self.vector_of(int(rows[0])), k, **kwargs)

    def vector_of(self, row: int) -> np.ndarray:
        """The stored embedding of one index row: from the store when it is reachable, else from the index."""
        key = str(self.items.table.column("key")[row].as_py())
        space = self._store_space()
        if space is not None:
            try:
                return space.get([key])[0]
            except EncoderlabError:
                pass  # gone from the store since the build: the index's own copy follows
        try:
            return self.index.reconstruct(int(row))
        except RuntimeError:
            ivf = require_faiss().extract_index_ivf(self.index)
            ivf.make_direct_map()
            return self.index.reconstruct(int(row))

    def _store_space(self) -> Any:
        """The store space the index was built from, opened once (None when it is not reachable)."""
        if self._space is None:
            root, fp = self.doc.get("store"), self.fingerprint
            if not (root and fp and (Path(root) / fp).is_dir()):
                return None
            from ..store import EmbeddingStore

            self._space = EmbeddingStore(root).space(fp)
        return self._space

    # ---- the query encoder ----------------------------------------------------------------------------

    def encoder(self, modality: str = "text") -> Any:
        """The query encoder (``load_encoder`` with the recorded spec on first use), checked for ``modality``."""
        if self._encoder is None:
            self.load_encoder()
        self._encoder.check_modality(modality)
        return self._encoder

    def load_encoder(self, spec: str | None = None, *, device: str | None = None,
                     precision: str | None = None) -> Any:
        """Load the query encoder once: ``spec`` or the one in ``index.json``, at the recorded precision unless
        ``precision`` is given; refused unless its fingerprint matches the index's."""
        self._encoder = load_index_encoder(self.doc, self.path, spec=spec, device=device, precision=precision)
        return self._encoder

    def use_encoder(self, encoder: Any) -> None:
        """Query with ``encoder`` (already loaded, e.g. by a service); refused unless its fingerprint matches."""
        check_fingerprint(self.doc, self.path, encoder)
        self._encoder = encoder


def open_index(path: str | os.PathLike, *, mmap: bool = True, gpu: bool | None = None) -> SearchIndex:
    """Open an index directory for searching (memory-mapped by default)."""
    return SearchIndex(path, mmap=mmap, gpu=gpu)


def load_query_image(image: Any, max_pixels: int | None = None) -> Any:
    """A PIL image from a path (decoded robustly) or a PIL image; an unusable file fails with path and reason."""
    if hasattr(image, "convert"):
        return image.convert("RGB")
    from ..data.images import load_image

    try:
        return load_image(os.fspath(image), max_pixels=max_pixels)
    except BadImageError as e:
        raise EncoderlabError(f"query image {e.path} cannot be used: {e.reason}" + (f" ({e.detail})" if e.detail
                                                                                    else ""),
                              "pass a readable image file (PNG, JPEG, WebP, ...)") from None


def load_index_encoder(doc: dict[str, Any], path: Path, *, spec: str | None = None, device: str | None = None,
                       precision: str | None = None) -> Any:
    """The encoder of an index: ``spec`` or the one recorded, at the recorded precision, fingerprint checked."""
    from ..encoders import create_encoder

    rec = doc.get("encoder") or {}
    use = spec or rec.get("spec")
    if not use:
        raise EncoderlabError(f"index {path} records no encoder (built from vectors)",
                              "search it with vectors (SearchIndex.search_vectors), or pass --encoder")
    enc = create_encoder(use, device=device, precision=precision or rec.get("precision"))
    check_fingerprint(doc, path, enc)
    return enc


def check_fingerprint(doc: dict[str, Any], path: Path, encoder: Any) -> None:
    """Refuse an encoder whose embeddings of the index's modality differ from the index's (both named)."""
    rec = doc.get("encoder") or {}
    want, modality = rec.get("fingerprint"), doc.get("modality")
    if not want or modality not in ("image", "text"):
        return
    have = encoder.fingerprint(modality) if modality in encoder.modalities else None
    if have == want:
        return
    same_spec = encoder.spec == rec.get("spec")
    source = (doc.get("data") or {}).get("source", "DATA")
    why = ("it loads with other weights or preprocessing than when the index was built" if same_spec
           else f"it is another encoder than the index's {rec.get('spec')!r}")
    raise EncoderlabError(
        f"index {path} was built from {modality} embeddings of encoder {rec.get('spec')!r} (fingerprint "
        f"{want[:12]}), but the query encoder {encoder.spec!r} has fingerprint {(have or 'none')[:12]}: {why}",
        f"query with the index's own encoder {rec.get('spec')!r} (leave out --encoder), or rebuild the index for "
        f"this one: encoderlab index build --encoder {encoder.spec} --data {source} --out DIR")
