"""Running the app under uvicorn: on a socket bound here (so a busy port fails with a clear message before the
server starts, and ``port=0`` yields the port actually chosen), in the foreground or in a background thread.

One process, one worker: the model is loaded once, in this process; requests that use it are serialized by the
app itself (``worker.ModelWorker``), not by running several server processes.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
import threading
import time
from typing import Any

from ..errors import EncoderlabError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000


def is_loopback(host: str) -> bool:
    """Whether ``host`` binds only this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_socket(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port=0``: a free port); a failure names the address and a fix."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise EncoderlabError(f"cannot resolve --host {host!r}: {e.strerror}",
                              "pass an address such as 127.0.0.1, ::1 or 0.0.0.0") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        fix = ("pick another --port (or --port 0 for any free one)" if e.errno == errno.EADDRINUSE
               else "pick an address of this machine for --host, or a port above 1023")
        raise EncoderlabError(f"cannot listen on {host}:{port}: {e.strerror}", fix) from None
    sock.set_inheritable(True)
    return sock


def server_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def make_server(app: Any, *, log_level: str = "info", access_log: bool = True) -> Any:
    """A uvicorn ``Server`` for ``app``: one worker, no server header, keep-alive for repeated queries."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=access_log, server_header=False,
                            timeout_keep_alive=15, lifespan="on")
    return uvicorn.Server(config)


def run_server(app: Any, sock: socket.socket, *, log_level: str = "info") -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C / SIGTERM (uvicorn's graceful shutdown)."""
    make_server(app, log_level=log_level).run(sockets=[sock])


class BackgroundServer:
    """``with BackgroundServer(app) as url:``: the app served by uvicorn in a thread, on loopback, a free port.

    For tests and notebooks; the thread stops (and the socket closes) when the block ends.
    """

    def __init__(self, app: Any, host: str = DEFAULT_HOST, port: int = 0, *, log_level: str = "warning") -> None:
        self.sock = bind_socket(host, port)
        self.url = server_url(self.sock)
        self.server = make_server(app, log_level=log_level, access_log=False)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="encoderlab-serve")

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise EncoderlabError(f"the server on {self.url} did not start", "see its log above")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout=30)
        self.sock.close()
