"""``SearchService``: what the web app asks of an index, apart from HTTP — queries, filters, items, thumbnails.

The query encoder is loaded (or handed in) once, when the service is created, and fingerprint-checked against the
index. Item ids are looked up in the index's item table and nowhere else; a result names its item's thumbnail by
id (``/items/{id}/thumbnail``), never by file path, and the paths of the collection's files never leave the
service (the encoder spec in ``/info`` is the one the index recorded, a directory for ``local:`` encoders).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import quote

import numpy as np

from ..data.images import max_pixels_default
from ..retrieval.search import Hits, SearchIndex, open_index
from .errors import RequestError
from .filters import allowed_rows, filter_columns, filter_values, parse_filters
from .thumbnails import THUMB_PX, Thumbnail, ThumbnailCache
from .uploads import decode_upload
from .worker import MAX_PENDING, ModelWorker

#: item columns a result shows (besides rank, score and the thumbnail URL)
RESULT_COLUMNS = ("id", "text", "label", "split")


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for. ``max_pixels`` None: ``$ENCODERLAB_MAX_PIXELS`` or 64 Mpx; 0: no limit."""

    max_upload_bytes: int = 10 << 20
    max_pixels: int | None = None
    max_k: int = 1000
    max_text_chars: int = 1000
    max_pending: int = MAX_PENDING
    thumb_px: int = THUMB_PX

    def public(self) -> dict[str, Any]:
        out = asdict(self)
        out["max_pixels"] = max_pixels_default() if self.max_pixels is None else self.max_pixels
        return out


class SearchService:
    """An opened index, its query encoder (loaded once), a model worker and a thumbnail cache."""

    def __init__(self, index: SearchIndex | str | os.PathLike, *, limits: ServeLimits | None = None,
                 encoder: Any = None, device: str | None = None, precision: str | None = None) -> None:
        self.index = index if isinstance(index, SearchIndex) else open_index(index)
        self.limits = limits or ServeLimits()
        self.encoder = self._load_encoder(encoder, device, precision)
        self.worker = ModelWorker(self.limits.max_pending)
        self.thumbnails = ThumbnailCache(self.limits.thumb_px, self.limits.max_pixels)
        self.filters = filter_columns(self.index.items)
        self._has_image = _valid(self.index.items.table.column("image"))
        self._info_filters: dict[str, Any] | None = None
        self.started = time.time()

    def _load_encoder(self, encoder: Any, device: str | None, precision: str | None) -> Any:
        if encoder is not None:
            self.index.use_encoder(encoder)  # refused unless its fingerprint is the index's
            return encoder
        if not (self.index.doc.get("encoder") or {}).get("spec"):
            return None  # an index built from vectors: only "more like this" queries
        return self.index.load_encoder(device=device, precision=precision)

    @property
    def queries(self) -> list[str]:
        """The query kinds this index answers: ``like`` always, ``text`` / ``image`` when the encoder has them."""
        kinds = [m for m in ("text", "image") if self.encoder is not None and m in self.encoder.modalities]
        return [*kinds, "like"]

    # ---- describing ------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "items": len(self.index), "model": getattr(self.encoder, "spec", None),
                "uptime_s": round(time.time() - self.started, 1), "queue": self.worker.stats()}

    def info(self) -> dict[str, Any]:
        """What a client needs: the index (kind, size, what was measured), queries, filters, limits; no file paths."""
        doc = self.index.doc
        enc = doc.get("encoder") or {}
        data = {k: v for k, v in (doc.get("data") or {}).items() if k in ("split", "rows", "indexed", "duplicates")}
        return {"kind": self.index.kind, "factory": doc.get("factory"), "count": len(self.index),
                "dim": self.index.dim, "modality": self.index.modality, "created": doc.get("created"),
                "encoder": {k: enc.get(k) for k in ("spec", "fingerprint", "precision", "modalities")},
                "metrics": doc.get("metrics", {}), "data": data, "queries": self.queries,
                "filters": self._filter_values(), "limits": self.limits.public(),
                "thumbnails": self.thumbnails.stats(),
                "routes": {"GET /search": "?text=... or ?like=ID, &k=N, &COLUMN=VALUE filters",
                           "POST /search": "multipart field 'image' (or a raw image body), same query parameters",
                           "GET /items/{id}": "one item", "GET /items/{id}/thumbnail": "its image, shrunk"}}

    def _filter_values(self) -> dict[str, Any]:
        if self._info_filters is None:  # the items do not change while serving: counted once
            self._info_filters = filter_values(self.index.items, self.filters)
        return self._info_filters

    # ---- parameters -------------------------------------------------------------------------------------

    def parse_k(self, raw: str | None) -> int:
        if raw is None or raw == "":
            return 10
        k = int(raw) if raw.strip().isdigit() and raw.strip().isascii() else 0
        if not 1 <= k <= self.limits.max_k:
            raise RequestError(422, f"k must be a whole number from 1 to {self.limits.max_k}, got {raw!r}",
                               "pass e.g. ?k=10")
        return k

    def parse_text(self, text: str) -> str:
        if not text.strip():
            raise RequestError(422, "the query text is empty", "type some words, e.g. ?text=a+red+car")
        if len(text) > self.limits.max_text_chars:
            raise RequestError(422, f"the query text has {len(text)} characters, more than the limit of "
                                    f"{self.limits.max_text_chars}", "shorten the query")
        return text

    def allowed(self, params: list[tuple[str, str]]) -> tuple[np.ndarray | None, dict[str, list[Any]]]:
        """Rows allowed by the filter parameters, and the filters as parsed (echoed in the response)."""
        filters = parse_filters(self.index.items, params, self.filters)
        return allowed_rows(self.index.items, filters), filters

    def rows_of(self, item_id: str) -> np.ndarray:
        """Index rows of item ``item_id`` (looked up in the item table only), or 404."""
        rows = self.index.items.rows_of_id(item_id)
        if not len(rows):
            raise RequestError(404, f"no item with id {item_id[:200]!r} in this index ({len(self.index)} items)",
                               "use an id from a search result (the id field)")
        return rows

    def check_query(self, kind: str) -> None:
        if kind not in self.queries:
            why = ("it was built from vectors, without an encoder" if self.encoder is None
                   else f"its encoder {self.encoder.spec!r} has no {kind} tower")
            raise RequestError(400, f"this index cannot be queried by {kind}: {why}",
                               f"query it by {' or '.join(self.queries)}", queries=self.queries)

    # ---- queries (run on the model worker) ---------------------------------------------------------------

    def search_text(self, text: str, k: int, allowed: np.ndarray | None) -> Hits:
        return self.index.search_text(text, k, allowed=allowed)

    def search_image(self, data: bytes, filename: str | None, k: int, allowed: np.ndarray | None) -> Hits:
        t0 = time.perf_counter()
        image = decode_upload(data, filename, self.limits.max_pixels)
        hits = self.index.search_image(image, k, allowed=allowed)
        hits.seconds["decode"] = time.perf_counter() - t0 - sum(hits.seconds.values())
        return hits

    def search_like(self, item_id: str, k: int, allowed: np.ndarray | None) -> Hits:
        return self.index.search_like(item_id, k, allowed=allowed)

    def results(self, hits: Hits, query: dict[str, Any], k: int, filters: dict[str, list[Any]],
                allowed: np.ndarray | None) -> dict[str, Any]:
        """The JSON answer: one object per hit, best first, with its thumbnail URL (None without an image)."""
        cols = hits.columns(RESULT_COLUMNS)
        has_image = self._has_image[hits.rows] if len(hits) else []
        rows = [{"rank": r, "score": s, "id": i, "caption": t, "label": lab, "split": sp,
                 "thumbnail": thumbnail_url(i) if img else None}
                for r, s, i, t, lab, sp, img in zip(cols["rank"], cols["score"], cols["id"], cols["text"],
                                                    cols["label"], cols["split"], has_image)]
        out: dict[str, Any] = {"query": query, "k": k, "count": len(rows), "modality": self.index.modality,
                               "filters": filters, "seconds": {n: round(v, 6) for n, v in hits.seconds.items()},
                               "results": rows}
        if allowed is not None and not len(allowed):
            out["note"] = "no item matches the filters"
        return out

    # ---- items ----------------------------------------------------------------------------------------------

    def item(self, item_id: str) -> dict[str, Any]:
        rows = self.rows_of(item_id)
        names = [c for c in self.index.items.names if c not in ("key", "image", "modality")]
        cols = self.index.items.take(rows[:1], names)
        out = {c: v[0] for c, v in cols.items()}
        out["thumbnail"] = thumbnail_url(item_id) if self._has_image[rows[0]] else None
        out["rows"] = len(rows)
        return out

    def thumbnail(self, item_id: str) -> Thumbnail:
        thumb = self.thumbnails.cached(item_id)
        if thumb is None:
            row = int(self.rows_of(item_id)[0])
            path = self.index.items.take([row], ["image"])["image"][0]
            if path is None:
                raise RequestError(404, f"item {item_id[:200]!r} has no image", "its caption is in the search result")
            thumb = self.thumbnails.render(item_id, str(path))
        if thumb.reason is not None:
            raise RequestError(404, f"the image of item {item_id[:200]!r} cannot be read: {thumb.reason}",
                               "check the collection's files with `encoderlab data inspect --decode`",
                               reason=thumb.reason)
        return thumb

    def close(self) -> None:
        self.worker.close()


def _valid(column: Any) -> np.ndarray:
    import pyarrow.compute as pc

    return np.asarray(pc.is_valid(column).to_numpy(zero_copy_only=False), dtype=bool)


def thumbnail_url(item_id: str) -> str:
    """``/items/{id}/thumbnail`` with the id percent-encoded whole (a ``/`` in an id becomes ``%2F``)."""
    return f"/items/{quote(str(item_id), safe='')}/thumbnail"
