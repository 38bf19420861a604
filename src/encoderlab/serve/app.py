"""``create_app(index) -> FastAPI``: the JSON API and the web page of ``encoderlab serve``.

Routes: ``GET /`` (the page, with ``/app.js`` and ``/app.css``), ``GET /health``, ``GET /info``,
``GET /search?text=...|like=ID&k=N&COLUMN=VALUE``, ``POST /search`` (an image: multipart field ``image`` or a raw
``image/*`` body; same query parameters), ``GET /items/{id}`` and ``GET /items/{id}/thumbnail``.

Every response carries a strict Content-Security-Policy (``default-src 'self'; img-src 'self' data:`` and no
framing); requests whose ``Host`` is not one of ``allowed_hosts`` (by default the loopback names, which stops DNS
rebinding from reaching a service bound to 127.0.0.1) get 400; bodies over ``max_upload_bytes`` get 413.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ..errors import EncoderlabError
from ..retrieval.search import SearchIndex
from .errors import install_error_handlers
from .service import SearchService, ServeLimits
from .uploads import BodyLimit

CSP = "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
SECURITY_HEADERS = ((b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"), (b"referrer-policy", b"no-referrer"))
#: ``Host`` names a loopback-bound service answers to
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def create_app(index: SearchIndex | str | os.PathLike, *, max_upload_bytes: int = 10 << 20,
               max_pixels: int | None = None, max_k: int = 1000, encoder: Any = None, device: str | None = None,
               precision: str | None = None, allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS,
               limits: ServeLimits | None = None) -> Any:
    """The web app of an index directory (or an opened ``SearchIndex``); loads the query encoder now, once.

    ``encoder``: an already loaded encoder to query with (fingerprint-checked); else the index's own spec is
    loaded on ``device``. ``allowed_hosts``: ``Host`` header names to answer (None: any, for a public bind).
    ``limits`` overrides ``max_upload_bytes`` / ``max_pixels`` / ``max_k`` and sets the others.
    """
    require_serve_extra()
    from fastapi import FastAPI

    from .routes import add_api_routes, add_page_routes

    limits = limits or ServeLimits(max_upload_bytes=max_upload_bytes, max_pixels=max_pixels, max_k=max_k)
    service = SearchService(index, limits=limits, encoder=encoder, device=device, precision=precision)

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        yield
        service.close()

    app = FastAPI(title="encoderlab search", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.service = service
    install_error_handlers(app)
    add_page_routes(app)
    add_api_routes(app, service)
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes)
    app.add_middleware(Guard, allowed_hosts=allowed_hosts)
    return app


def require_serve_extra() -> None:
    """FastAPI, uvicorn and python-multipart, or an error saying how to install them."""
    import importlib.util

    # python-multipart before 0.0.13 installs its module as ``multipart`` only
    missing = [name for name, modules in (("fastapi", ("fastapi",)), ("uvicorn", ("uvicorn",)),
                                          ("python-multipart", ("python_multipart", "multipart")))
               if not any(importlib.util.find_spec(m) for m in modules)]
    if missing:
        raise EncoderlabError(f"the search service needs {', '.join(missing)}, which are not installed",
                              "pip install 'encoderlab[serve]'")


class Guard:
    """ASGI middleware: answers only ``allowed_hosts`` (None: any) and adds the security headers to every reply."""

    def __init__(self, app: Any, allowed_hosts: Sequence[str] | None) -> None:
        self.app = app
        self.allowed = None if allowed_hosts is None else {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        host = _host_name(dict(scope.get("headers") or ()).get(b"host", b"").decode("latin-1"))
        if self.allowed is not None and host not in self.allowed:
            from fastapi.responses import JSONResponse

            reply = JSONResponse({"error": f"this service answers only to {', '.join(sorted(self.allowed))}, not "
                                           f"to Host {host[:100]!r}",
                                  "fix": "open it as http://127.0.0.1:PORT/ (start it with --host to serve other "
                                         "names)"}, status_code=400)
            await reply(scope, receive, with_headers)
            return
        await self.app(scope, receive, with_headers)


def _host_name(header: str) -> str:
    """``Host`` without its port: ``127.0.0.1:8000`` -> ``127.0.0.1``, ``[::1]:8000`` -> ``::1``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header
