"""The routes of the search service (see ``app``): the page and its two assets, and the JSON API.

Kept apart from ``app`` because FastAPI reads these signatures (``request: Request``), so this module imports
FastAPI at the top; ``app.create_app`` imports it only after checking that the ``serve`` extra is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ..retrieval.search import Hits
from .errors import RequestError
from .page import APP_CSS, APP_JS, PAGE_HTML
from .service import SearchService
from .uploads import too_large

#: query parameters that are not filters
QUERY_PARAMS = ("text", "like", "k")
IMAGE_BODY_TYPES = ("image/", "application/octet-stream")


def add_page_routes(app: FastAPI) -> None:
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE_HTML)

    @app.get("/app.js", include_in_schema=False)
    def script() -> Response:
        return Response(APP_JS, media_type="text/javascript; charset=utf-8")

    @app.get("/app.css", include_in_schema=False)
    def style() -> Response:
        return Response(APP_CSS, media_type="text/css; charset=utf-8")


def add_api_routes(app: FastAPI, service: SearchService) -> None:
    @app.get("/health")
    def health() -> dict[str, Any]:
        return service.health()

    @app.get("/info")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/search")
    async def search(request: Request) -> dict[str, Any]:
        params = request.query_params
        text, like = _single(params, "text"), _single(params, "like")
        if (text is None) == (like is None):
            raise RequestError(422, "pass exactly one of ?text=... and ?like=ID" + (" (both given)" if text else ""),
                               "e.g. /search?text=a+red+car&k=10, or POST an image to /search")
        k = service.parse_k(_single(params, "k"))
        allowed, filters = service.allowed(_filter_params(params))
        if text is not None:
            service.check_query("text")
            query, job = {"text": text}, (service.search_text, service.parse_text(text), k, allowed)
        else:
            service.rows_of(like)
            query, job = {"like": like}, (service.search_like, like, k, allowed)
        hits = await service.worker.run(*job) if allowed is None or len(allowed) else None
        return _answer(service, hits, query, k, filters, allowed)

    @app.post("/search")
    async def search_image(request: Request) -> dict[str, Any]:
        params = request.query_params
        if _single(params, "text") is not None or _single(params, "like") is not None:
            raise RequestError(422, "POST /search takes an image; text and like queries are GET /search",
                               "GET /search?text=... or send the image alone")
        k = service.parse_k(_single(params, "k"))
        allowed, filters = service.allowed(_filter_params(params))
        service.check_query("image")
        data, name = await _read_image(request, service.limits.max_upload_bytes)
        hits = (await service.worker.run(service.search_image, data, name, k, allowed)
                if allowed is None or len(allowed) else None)
        return _answer(service, hits, {"image": name}, k, filters, allowed)

    # ids may hold "/" (folder datasets): the whole rest of the path is the id, looked up in the item table only
    @app.get("/items/{item_id:path}/thumbnail")
    async def thumbnail(item_id: str) -> Response:
        thumb = await run_in_threadpool(service.thumbnail, item_id)
        return Response(thumb.data, media_type=thumb.media_type, headers={"cache-control": "private, max-age=3600"})

    @app.get("/items/{item_id:path}")
    def item(item_id: str) -> dict[str, Any]:
        return service.item(item_id)


def _single(params: Any, name: str) -> str | None:
    values = params.getlist(name)
    if len(values) > 1:
        raise RequestError(422, f"?{name}= is given {len(values)} times", f"pass {name} once")
    return values[0] if values else None


def _filter_params(params: Any) -> list[tuple[str, str]]:
    return [(n, v) for n, v in params.multi_items() if n not in QUERY_PARAMS]


def _answer(service: SearchService, hits: Any, query: dict[str, Any], k: int, filters: dict[str, list[Any]],
            allowed: Any) -> dict[str, Any]:
    if hits is None:  # the filters match nothing: nothing to search
        hits = Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), service.index.items)
    return service.results(hits, query, k, filters, allowed)


async def _read_image(request: Request, limit: int) -> tuple[bytes, str | None]:
    """The uploaded image's bytes and client-side name: multipart field ``image``, or a raw ``image/*`` body."""
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith(IMAGE_BODY_TYPES):
        data = await request.body()
        name = request.headers.get("x-filename") or "upload"
    else:
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")
        if not isinstance(upload, UploadFile):
            raise RequestError(422, "no image in the request (expected a multipart file field named 'image', or "
                                    f"an image/* body; got content-type {ctype or 'none'!r})",
                               "curl -F image=@query.png 'http://127.0.0.1:8000/search?k=10'")
        data, name = await upload.read(limit + 1), upload.filename
        await upload.close()
    if len(data) > limit:
        raise too_large(len(data), limit)
    return data, name
