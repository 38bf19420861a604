"""``encoderlab serve --index DIR``: the search service (JSON API + web page) over an index, a thin layer over
``encoderlab.serve``."""

from __future__ import annotations

import argparse
from typing import Any

from .options import (
    add_common,
    add_device_options,
    add_max_pixels_option,
    add_parser,
    int_at_least,
    positive_float,
    warn,
)

MAX_PORT = 65_535


def port_number(text: str) -> int:
    """``--port``: 0 (any free port) to 65535."""
    value = int_at_least(0)(text)
    if value > MAX_PORT:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to {MAX_PORT}, got {text!r}")
    return value


def register(sub: Any) -> None:
    p = add_parser(sub, "serve", "serve an index: a JSON search API and a web page (text, image and "
                                 "more-like-this queries with a thumbnail grid); binds 127.0.0.1 unless --host",
                   "encoderlab serve --index ~/indexes/emoji                  # then open http://127.0.0.1:8000/\n"
                   "encoderlab serve --index ~/indexes/photos --port 9000 --max-upload-mb 4 --device cuda\n"
                   "curl 'http://127.0.0.1:8000/search?text=a+red+heart&k=5&label=Smileys+%26+Emotion'\n"
                   "curl -F image=@query.png 'http://127.0.0.1:8000/search?k=10'\n"
                   "encoderlab serve --index ~/indexes/emoji --host 0.0.0.0   # every network: no authentication!")
    p.add_argument("--index", required=True, metavar="DIR", help="index directory (`encoderlab index build`)")
    p.add_argument("--host", default=None,
                   help="address to listen on (default: 127.0.0.1, this machine only); another address, e.g. "
                        "0.0.0.0, lets every machine that reaches it search the index and see its images: the "
                        "service has no authentication")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port, 0 for any free one (default: 8000)")
    p.add_argument("--max-upload-mb", type=positive_float, default=10.0,
                   help="largest query image accepted, in MB; larger uploads get 413 (default: 10)")
    add_max_pixels_option(p)
    p.add_argument("--max-k", type=int_at_least(1), default=1000,
                   help="largest k a query may ask for (default: %(default)s)")
    add_device_options(p)
    p.set_defaults(precision=None)  # the precision the index was built at (another changes the fingerprint)
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info",
                   help="server log level; info shows one access line per request (default: %(default)s)")
    add_common(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from ..serve import DEFAULT_HOST, LOOPBACK_HOSTS, bind_socket, create_app, is_loopback, run_server, server_url
    from ..serve.app import require_serve_extra

    require_serve_extra()
    host = args.host or DEFAULT_HOST
    public = not is_loopback(host)
    sock = bind_socket(host, args.port)  # a busy port fails now, before the model is loaded
    try:
        app = create_app(args.index, max_upload_bytes=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                         max_k=args.max_k, device=args.device, precision=args.precision,
                         allowed_hosts=None if public else LOOPBACK_HOSTS)
        service = app.state.service
        url, port = server_url(sock), sock.getsockname()[1]
        if public:
            warn(f"warning: listening on {host}, not loopback: anyone who can reach this machine on port "
                 f"{port} can search the index and read the thumbnails of its images (there is "
                 f"no authentication); leave out --host to serve this machine only")
        where = (f"http://127.0.0.1:{port}/ here, http://ADDRESS:{port}/ from elsewhere" if _unspecified(host)
                 else f"{url}/")
        warn(f"encoderlab serve: {len(service.index):,} {service.index.modality} items ({service.index.kind}), "
             f"queries by {', '.join(service.queries)}; open {where} (Ctrl-C stops)")
        try:
            run_server(app, sock, log_level=args.log_level)
        except KeyboardInterrupt:  # stopping a server is its normal end, not an interruption of work
            pass
    finally:
        sock.close()
    return {"index": str(args.index), "url": url, "host": host, "stopped": True}


def _unspecified(host: str) -> bool:
    """``0.0.0.0`` / ``::``: every interface, so no one URL to open."""
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False
