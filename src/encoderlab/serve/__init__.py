"""``encoderlab serve``: a search service over an index directory — a JSON API and a small offline web page.

    from encoderlab.serve import create_app, BackgroundServer

    app = create_app("~/indexes/emoji", max_upload_bytes=10 << 20)   # loads the query encoder once
    with BackgroundServer(app) as url:                               # uvicorn on 127.0.0.1, a free port
        ...                                                          # GET {url}/search?text=a+red+heart

- ``app``: ``create_app`` (routes, security headers, Host check, body limit);
- ``service``: ``SearchService`` (queries, filters, items, thumbnails; no HTTP), ``ServeLimits``;
- ``worker``: the single thread every model call runs on, behind a bounded queue;
- ``filters``, ``thumbnails``, ``uploads``: exact-match filters, the thumbnail LRU, capped and decoded uploads;
- ``errors``: ``RequestError`` and the handlers that answer every failure as ``{"error", "fix"}``;
- ``page``: the HTML, script and style sheet; ``run``: binding, uvicorn in the foreground or a thread.

Needs the ``serve`` extra (``pip install 'encoderlab[serve]'``: FastAPI, uvicorn, python-multipart) and FAISS.
"""

from .app import CSP, LOOPBACK_HOSTS, create_app
from .errors import RequestError
from .run import DEFAULT_HOST, DEFAULT_PORT, BackgroundServer, bind_socket, is_loopback, run_server, server_url
from .service import SearchService, ServeLimits

__all__ = [
    "CSP",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "LOOPBACK_HOSTS",
    "BackgroundServer",
    "RequestError",
    "SearchService",
    "ServeLimits",
    "bind_socket",
    "create_app",
    "is_loopback",
    "run_server",
    "server_url",
]
