"""Every failure of the service answers JSON ``{"error", "fix"}`` with a 4xx status; only real bugs get a 500.

``RequestError`` carries its HTTP status; any other ``EncoderlabError`` (a bad query text, a query kind the encoder
cannot encode, an unreadable index item) is the client's to fix: 400. FastAPI's parameter validation, Starlette's
``HTTPException`` (unknown routes, malformed multipart bodies) and decoding failures answer in the same shape.
Anything else is a bug: logged with the request line, answered ``{"error", "fix", "internal": true}`` with 500.
"""

from __future__ import annotations

import logging
from typing import Any

from ..errors import BadImageError, EncoderlabError

log = logging.getLogger("encoderlab.serve")

#: reasons of ``encoderlab.data.images`` that mean "too big" rather than "broken"
TOO_LARGE_REASONS = ("too-large",)


class RequestError(EncoderlabError):
    """A request the service refuses, with the HTTP status to answer (400, 404, 413, 422, 503)."""

    def __init__(self, status: int, message: str, fix: str | None = None, **extra: Any) -> None:
        super().__init__(message, fix)
        self.status = status
        self.extra = extra


def error_body(message: str, fix: str | None, **extra: Any) -> dict[str, Any]:
    return {"error": message, "fix": fix, **extra}


def bad_upload(e: BadImageError, name: str) -> RequestError:
    """An uploaded image that ``load_image`` refused: 413 over the pixel limit, else 400, naming the reason."""
    detail = e.detail.replace(e.path, name) if e.detail else ""
    message = f"the uploaded image {name} cannot be used: {e.reason}" + (f" ({detail})" if detail else "")
    if e.reason in TOO_LARGE_REASONS:
        return RequestError(413, message, "send a smaller image (fewer pixels), e.g. resized to 1024 px",
                            reason=e.reason)
    return RequestError(400, message, "send a readable image file (PNG, JPEG, WebP, GIF, BMP, TIFF)", reason=e.reason)


def install_error_handlers(app: Any) -> None:
    """Register the handlers that give every failure the ``{"error", "fix"}`` shape."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(EncoderlabError)
    async def _encoderlab_error(request: Any, e: EncoderlabError) -> JSONResponse:
        status = getattr(e, "status", 400)
        return JSONResponse(error_body(e.message, e.fix, **getattr(e, "extra", {})), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Any, e: RequestValidationError) -> JSONResponse:
        parts = []
        for err in e.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg')} (got {err.get('input')!r})" if where else str(err.get("msg")))
        return JSONResponse(error_body("; ".join(parts) or "invalid request",
                                       "see GET /info for the parameters and their limits"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Any, e: HTTPException) -> JSONResponse:
        fix = {400: "send an image as multipart/form-data with one file field named 'image', or as an image/* body",
               404: "see GET / for the page and GET /info for the API",
               405: "see GET /info for the methods of each route"}.get(e.status_code, "check the request")
        return JSONResponse(error_body(str(e.detail), fix), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: Any, e: Exception) -> JSONResponse:
        # Starlette re-raises after this response, so the server still prints the traceback.
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(e).__name__, e)
        return JSONResponse(error_body(f"internal error: {type(e).__name__}",
                                       "this is a bug in encoderlab: report it with the server log", internal=True),
                            status_code=500)
