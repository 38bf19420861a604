"""Query images sent by clients: the request body is capped before it is read, then decoded like any dataset file.

``BodyLimit`` refuses a body over the limit from its ``Content-Length`` (413 before a byte is read) and counts the
bytes of bodies without one (chunked uploads), so neither memory nor the temporary directory of the multipart
parser can be filled by one request. ``decode_upload`` writes the bytes to a private temporary file and decodes
it with ``encoderlab.data.images.load_image``, which checks the pixel limit from the header before decoding and
names the reason (``truncated``, ``not-an-image``, ``too-large``, ...) of anything it refuses.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from ..data.images import load_image
from ..errors import BadImageError
from .errors import RequestError, bad_upload

#: room for the multipart boundaries and part headers around the file itself
MULTIPART_SLACK = 64 << 10


def too_large(size: int | None, limit: int) -> RequestError:
    got = f" ({size / 2**20:.1f} MB)" if size is not None else ""
    return RequestError(413, f"the upload is larger than the service's limit of {limit / 2**20:g} MB{got}",
                        "send a smaller image (the server's --max-upload-mb sets the limit)", limit_bytes=limit)


class BodyLimit:
    """ASGI middleware: request bodies over ``limit`` bytes (plus multipart slack) get 413."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit
        self.cap = limit + MULTIPART_SLACK

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.cap:
                await _send_error(send, too_large(declared, self.limit))
                return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.cap:
                    raise too_large(None, self.limit)  # answered by the EncoderlabError handler
            return message

        await self.app(scope, counted, send)


async def _send_error(send: Any, e: RequestError) -> None:
    import json

    body = json.dumps({"error": e.message, "fix": e.fix, **e.extra}).encode()
    await send({"type": "http.response.start", "status": e.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def upload_name(filename: str | None) -> str:
    """How an upload is named in messages: its client-side file name, quoted and shortened, never a server path."""
    name = os.path.basename((filename or "").replace("\\", "/")) or "upload"
    return repr(name if len(name) <= 80 else name[:77] + "...")


def decode_upload(data: bytes, filename: str | None, max_pixels: int | None) -> Any:
    """An RGB PIL image from uploaded bytes; an unusable image -> ``RequestError`` 400 (or 413 over the limit)."""
    name = upload_name(filename)
    if not data:
        raise RequestError(400, f"the uploaded image {name} cannot be used: zero-byte (the upload is empty)",
                           "send the image file's bytes (multipart field 'image')", reason="zero-byte")
    fd, path = tempfile.mkstemp(prefix="encoderlab-query-", suffix=".img")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return load_image(path, max_pixels=max_pixels)
    except BadImageError as e:
        raise bad_upload(e, name) from None
    finally:
        os.unlink(path)
