"""`encoderlab serve`: the JSON API through FastAPI's TestClient, refusals (traversal, bad uploads, bad parameters:
4xx, never 500), a load test and a real headless Chromium against uvicorn on 127.0.0.1.

The collection is made here: solid-colour pictures with a lighter circle or square, indexed with the mock
``ColorEncoder`` (mean RGB), so "red" finds the red ones and every answer can be checked by eye. Its ids hold a
``/`` (``red/3.png``), as a folder dataset's do. Screenshots go to ``$ENCODERLAB_TEST_ARTIFACTS`` (default
``.test-artifacts/``).
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("faiss", reason="serving needs an index, and indexes need faiss-cpu")
pytest.importorskip("fastapi", reason="encoderlab serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("uvicorn", reason="encoderlab serve needs the serve extra (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx (the dev extra)")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from encoderlab.cli import main  # noqa: E402
from encoderlab.data import load_dataset  # noqa: E402
from encoderlab.errors import EncoderlabError  # noqa: E402
from encoderlab.retrieval import ArrayVectors, build_index, index_dataset  # noqa: E402
from encoderlab.serve import CSP, BackgroundServer, create_app  # noqa: E402
from encoderlab.store import EmbeddingStore  # noqa: E402
from encoderlab.testing import COLORS, ColorEncoder, registered_color_encoder  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
BASE = "http://127.0.0.1"
SECRET = b"TOP-SECRET-NOT-IN-THE-COLLECTION"
PER_COLOR = 10
UPLOAD_LIMIT = 256 << 10
PIXEL_LIMIT = 1_000_000


class CountingEncoder(ColorEncoder):
    """``ColorEncoder`` (same fingerprint) that records how many of its calls ever overlapped in time."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.active = self.most_active = self.calls = 0
        self._lock = threading.Lock()

    def _tracked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            self.active += 1
            self.calls += 1
            self.most_active = max(self.most_active, self.active)
        try:
            time.sleep(0.001)  # widen the window in which an unserialized second call would overlap
            return fn(*args)
        finally:
            with self._lock:
                self.active -= 1

    def encode_text_batch(self, texts: list[str]) -> Any:
        return self._tracked(super().encode_text_batch, texts)

    def encode_pixels(self, pixel_values: Any, normalize: bool = False) -> Any:
        return self._tracked(super().encode_pixels, pixel_values, normalize)


def png_bytes(rgb: tuple[int, int, int], size: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = np.clip(np.asarray(rgb) + rng.integers(-12, 12, (size, size, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def make_collection(root: Path) -> Path:
    """30 pictures (3 colours x 10): noisy colour fields with a lighter circle or square; ids like ``red/3.png``."""
    rng = np.random.default_rng(0)
    rows = []
    for c, rgb in COLORS.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(PER_COLOR):
            arr = np.clip(np.asarray(rgb) + rng.integers(-18, 18, (96, 96, 3)), 0, 255).astype(np.uint8)
            im = Image.fromarray(arr)
            shape = ("circle", "square")[i % 2]
            light = tuple(int(min(255, v + 70)) for v in rgb)
            box = (18 + i, 18 + i, 78 - i // 2, 78 - i // 2)
            (ImageDraw.Draw(im).ellipse if shape == "circle" else ImageDraw.Draw(im).rectangle)(box, fill=light)
            path = root / c / f"{c}_{i}.png"
            im.save(path)
            rows.append({"id": f"{c}/{i}.png", "image": str(path), "text": f"a {c} {shape} number {i}",
                         "label": f"{c}_thing", "shape": shape, "size": i % 3})
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "data.jsonl"


@pytest.fixture(scope="module")
def collection(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("serve")
    manifest = make_collection(tmp / "coll")
    (tmp / "secret.txt").write_bytes(SECRET)
    (tmp / "coll" / "secret.png").write_bytes(png_bytes((1, 2, 3)))  # beside the collection, not in it
    with registered_color_encoder():
        ds = load_dataset(f"jsonl:{manifest}")
        index_dataset(ColorEncoder(), ds, EmbeddingStore(tmp / "store"), tmp / "ix", kind="flat", progress=False)
    return {"tmp": tmp, "index": tmp / "ix", "coll": tmp / "coll"}


@pytest.fixture(scope="module")
def app(collection) -> Any:
    return create_app(collection["index"], encoder=CountingEncoder(), max_upload_bytes=UPLOAD_LIMIT,
                      max_pixels=PIXEL_LIMIT)


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app, base_url=BASE)  # raises on a server-side bug: a 500 fails the test where it happens


def refused(r: Any, *statuses: int) -> dict[str, Any]:
    """The JSON body of a refusal with one of ``statuses``, checked for the ``{"error", "fix"}`` shape."""
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert body["error"] and body["fix"], body
    return body


# ---------------------------------------------------------------------------------------------------- the API


def test_page_is_self_contained_under_a_strict_policy(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["content-security-policy"] == CSP and CSP.startswith("default-src 'self'; img-src 'self' data:")
    assert r.headers["x-content-type-options"] == "nosniff"
    page = r.text
    assert "http://" not in page and "https://" not in page and '="//' not in page  # nothing from elsewhere
    assert "<script>" not in page and "style=" not in page and "<style" not in page  # nothing inline to refuse
    for asset, kind in (("/app.js", "javascript"), ("/app.css", "css")):
        got = client.get(asset)
        assert got.status_code == 200 and kind in got.headers["content-type"] and "http" not in got.text
    assert client.get("/info").headers["content-security-policy"] == CSP


def test_health_and_info_describe_the_index_without_paths(client, collection):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["items"] == 3 * PER_COLOR and health["model"] == "test-color"
    r = client.get("/info")
    info = r.json()
    assert info["count"] == 30 and info["kind"] == "flat" and info["queries"] == ["text", "image", "like"]
    assert info["filters"]["label"]["values"] == ["blue_thing", "green_thing", "red_thing"]
    assert set(info["filters"]) == {"label", "split", "shape", "size"}
    assert info["limits"]["max_upload_bytes"] == UPLOAD_LIMIT and info["limits"]["max_pixels"] == PIXEL_LIMIT
    assert info["metrics"]["recall_at_10"] == 1.0
    assert str(collection["tmp"]) not in r.text  # no file path of the server leaves it


def test_text_search_returns_ids_scores_captions_labels_thumbnails(client, collection):
    r = client.get("/search", params={"text": "something red", "k": 5})
    assert r.status_code == 200, r.text
    doc = r.json()
    assert doc["count"] == 5 and doc["query"] == {"text": "something red"} and doc["k"] == 5
    hits = doc["results"]
    assert [h["rank"] for h in hits] == [1, 2, 3, 4, 5]
    assert {h["label"] for h in hits} == {"red_thing"}
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    first = hits[0]
    assert set(first) == {"rank", "score", "id", "caption", "label", "split", "thumbnail"}
    assert first["caption"].startswith("a red ") and first["id"].startswith("red/")
    assert first["thumbnail"] == "/items/" + quote(first["id"], safe="") + "/thumbnail"
    assert str(collection["tmp"]) not in r.text
    assert client.get("/search", params={"text": "blue", "k": 1000}).json()["count"] == 30  # k > items: all


def test_image_upload_multipart_and_raw_body(client):
    files = {"image": ("query.png", png_bytes(COLORS["blue"]), "image/png")}
    doc = client.post("/search", params={"k": 4}, files=files).json()
    assert doc["query"] == {"image": "query.png"} and {h["label"] for h in doc["results"]} == {"blue_thing"}
    assert set(doc["seconds"]) >= {"decode", "encode", "search"}
    raw = client.post("/search?k=3&shape=circle", content=png_bytes(COLORS["green"]),
                      headers={"content-type": "image/png"}).json()
    assert raw["count"] == 3 and {(h["label"], h["id"][-5]) for h in raw["results"]} <= {
        ("green_thing", str(i)) for i in range(0, 10, 2)}


def test_like_and_filters(client):
    like = client.get("/search", params={"like": "green/2.png", "k": 3}).json()
    assert like["results"][0]["id"] == "green/2.png" and like["results"][0]["score"] == pytest.approx(1.0)
    red_only = client.get("/search", params={"like": "green/2.png", "label": "red_thing", "k": 50}).json()
    assert red_only["count"] == PER_COLOR and {h["label"] for h in red_only["results"]} == {"red_thing"}
    typed = client.get("/search?text=red&k=50&shape=square&size=1").json()  # size is an integer column
    assert typed["filters"] == {"shape": ["square"], "size": [1]}
    assert {h["id"] for h in typed["results"]} == {f"{c}/{i}.png" for c in COLORS for i in range(PER_COLOR)
                                                    if i % 2 == 1 and i % 3 == 1}
    either = client.get("/search?text=red&k=50&label=red_thing&label=blue_thing").json()
    assert either["count"] == 2 * PER_COLOR
    none = client.get("/search?text=red&label=purple_thing").json()
    assert none["count"] == 0 and none["note"] == "no item matches the filters"
    body = refused(client.get("/search?text=red&colour=red"), 400)
    assert "'colour'" in body["error"] and body["known"] == ["label", "split", "shape", "size"]
    assert "label, split, shape, size" in body["error"]
    body = refused(client.get("/search?text=red&size=big"), 422)
    assert "size" in body["error"] and "int64" in body["error"]


def test_items_and_thumbnails_come_from_the_item_table(client, app):
    item = client.get("/items/red%2F3.png").json()
    assert item["id"] == "red/3.png" and item["label"] == "red_thing" and "image" not in item and "key" not in item
    before = app.state.service.thumbnails.stats()
    r = client.get(item["thumbnail"])
    assert r.status_code == 200 and r.headers["content-type"] in ("image/png", "image/jpeg")
    with Image.open(io.BytesIO(r.content)) as im:
        assert max(im.size) <= 192 and np.asarray(im.convert("RGB")).mean(axis=(0, 1))[0] > 150  # red
    assert client.get("/items/red/3.png/thumbnail").content == r.content  # an unencoded "/" works too
    after = app.state.service.thumbnails.stats()
    assert after["misses"] == before["misses"] + 1 and after["hits"] == before["hits"] + 1  # decoded once
    refused(client.get("/items/red%2F99.png/thumbnail"), 404)
    refused(client.get("/items/nope"), 404)


def traversal_paths(collection: dict[str, Path]) -> list[str]:
    image = str(collection["coll"] / "red" / "red_0.png")
    secret = str(collection["coll"] / "secret.png")
    paths = [
        "/items/../secret.txt/thumbnail", "/items/../../secret.txt/thumbnail",
        "/items/..%2f..%2fsecret.txt/thumbnail", "/items/%2e%2e%2f%2e%2e%2fsecret.txt/thumbnail",
        "/items/%2E%2E/%2E%2E/secret.txt/thumbnail", "/items/%252e%252e%252fsecret.txt/thumbnail",
        "/items/red%2F..%2Fsecret.png/thumbnail", "/items/red/../secret.png/thumbnail",
        "/items/red%5C..%5Csecret.png/thumbnail", "/items/..%5c..%5csecret.txt/thumbnail",
        "/items//etc/passwd/thumbnail", "/items/%2Fetc%2Fpasswd/thumbnail", "/items/%2fetc%2fpasswd",
        "/items/" + quote(image, safe="") + "/thumbnail", "/items/" + image.lstrip("/") + "/thumbnail",
        "/items/" + quote(secret, safe="") + "/thumbnail", "/items/file:%2F%2F" + quote(secret, safe="") + "/thumbnail",
        "/items/red%2F0.png%00.txt/thumbnail", "/../../secret.txt", "/%2e%2e/%2e%2e/secret.txt", "/app.js/../../x",
    ]
    return paths


def test_traversal_attempts_are_refused(client, collection):
    for path in traversal_paths(collection):
        r = client.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        assert SECRET not in r.content and r.headers["content-type"] == "application/json", path


def bad_requests() -> list[tuple[str, str, dict[str, Any], int, str]]:
    """(method, url, request kwargs, status, words of the message) for inputs a client gets wrong."""
    big = png_bytes((10, 20, 30), size=400, seed=1)
    assert len(big) > UPLOAD_LIMIT
    bomb = io.BytesIO()
    Image.new("RGB", (1200, 1200), (200, 10, 10)).save(bomb, format="PNG")  # 1.4 Mpx in a few KB
    cut = png_bytes((200, 10, 10))[:300]
    img = "image/png"
    return [
        ("GET", "/search?text=red&k=0", {}, 422, "k must be"), ("GET", "/search?text=red&k=-3", {}, 422, "-3"),
        ("GET", "/search?text=red&k=ten", {}, 422, "'ten'"), ("GET", "/search?text=red&k=1001", {}, 422, "1000"),
        ("GET", "/search?text=red&k=1.5", {}, 422, "1.5"), ("GET", "/search?text=red&k=", {}, 200, ""),
        ("GET", "/search?text=red&k=5&k=6", {}, 422, "2 times"), ("GET", "/search?text=", {}, 422, "empty"),
        ("GET", "/search?text=%20%20", {}, 422, "empty"), ("GET", "/search?text=" + "a" * 1001, {}, 422, "1001"),
        ("GET", "/search", {}, 422, "exactly one"), ("GET", "/search?text=red&like=red/1.png", {}, 422, "both"),
        ("GET", "/search?like=red/99.png", {}, 404, "red/99.png"), ("GET", "/search?like=", {}, 404, "no item"),
        ("POST", "/search", {}, 422, "no image"), ("POST", "/search?text=red", {}, 422, "takes an image"),
        ("POST", "/search", {"data": {"image": "not a file"}}, 422, "no image"),
        ("POST", "/search", {"files": {"image": ("x.png", b"hello, not an image", img)}}, 400, "not-an-image"),
        ("POST", "/search", {"files": {"image": ("cut.png", cut, img)}}, 400, "truncated"),
        ("POST", "/search", {"files": {"image": ("empty.png", b"", img)}}, 400, "zero-byte"),
        ("POST", "/search", {"files": {"image": ("big.png", big, img)}}, 413, "larger than"),
        ("POST", "/search", {"files": {"image": ("bomb.png", bomb.getvalue(), img)}}, 413, "too-large"),
        ("POST", "/search", {"content": cut, "headers": {"content-type": img}}, 400, "truncated"),
        ("POST", "/search", {"content": b"--x\r\n", "headers": {"content-type": "multipart/form-data"}}, 400, ""),
        ("POST", "/search?k=0", {"files": {"image": ("q.png", png_bytes((0, 0, 0)), img)}}, 422, "k must"),
        ("GET", "/nowhere", {}, 404, "Not Found"), ("POST", "/health", {}, 405, "Method Not Allowed"),
        ("GET", "/health", {"headers": {"host": "evil.example:8000"}}, 400, "evil.example"),
    ]


def test_bad_inputs_get_a_clear_4xx_never_a_500(client):
    def leftovers() -> set[str]:
        return {p.name for p in Path(tempfile.gettempdir()).glob("encoderlab-query-*")}

    before = leftovers()
    for method, url, kwargs, status, words in bad_requests():
        r = client.request(method, url, **kwargs)
        assert r.status_code == status, (method, url[:80], r.status_code, r.text[:300])
        if status >= 400:
            assert words in refused(r, status)["error"], (url[:80], r.text[:300])
    assert leftovers() <= before  # every decoded upload's temporary file is removed, refused or not


def test_body_limit_stops_reading_past_the_cap():
    from encoderlab.serve.errors import RequestError
    from encoderlab.serve.uploads import MULTIPART_SLACK, BodyLimit

    pulled, sent, called = [0], [], []

    async def endless() -> dict:  # a chunked body that never ends
        pulled[0] += 1
        return {"type": "http.request", "body": b"\0" * 1024, "more_body": True}

    async def app(scope: dict, receive: Any, send: Any) -> None:
        called.append(True)
        while True:
            await receive()

    async def send(message: dict) -> None:
        sent.append(message)

    limit = BodyLimit(app, limit=10_000)
    with pytest.raises(RequestError) as e:
        asyncio.run(limit({"type": "http", "headers": []}, endless, send))
    cut = (10_000 + MULTIPART_SLACK) // 1024 + 1
    assert e.value.status == 413 and pulled[0] == cut  # the chunk past the cap is the last one read
    called.clear()
    asyncio.run(limit({"type": "http", "headers": [(b"content-length", b"999999")]}, endless, send))
    assert not called and sent[0]["status"] == 413 and pulled[0] == cut  # refused before reading a byte


def test_a_bug_is_a_json_500_and_logged(app, monkeypatch, caplog):
    def broken(*args: Any) -> Any:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(app.state.service, "search_text", broken)
    r = TestClient(app, base_url=BASE, raise_server_exceptions=False).get("/search?text=red")
    assert r.status_code == 500 and r.json()["internal"] is True and "ZeroDivisionError" in r.json()["error"]
    assert "internal error on GET /search" in caplog.text


def test_model_loads_once_at_startup_and_vector_indexes_answer_like_only(collection, tmp_path, monkeypatch):
    import encoderlab.encoders as encoders

    made = []
    real = encoders.create_encoder
    monkeypatch.setattr(encoders, "create_encoder", lambda *a, **kw: made.append(a) or real(*a, **kw))
    with registered_color_encoder():
        app = create_app(collection["index"])
    assert len(made) == 1  # at startup, before any request
    client = TestClient(app, base_url=BASE)
    for q in ("red", "green", "blue"):
        assert client.get("/search", params={"text": q}).status_code == 200
    assert client.post("/search", files={"image": ("q.png", png_bytes(COLORS["red"]), "image/png")}).is_success
    assert len(made) == 1

    X = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    ids = pd.DataFrame({"id": [f"v{i}" for i in range(50)], "key": [f"k{i}" for i in range(50)]})
    build_index(ArrayVectors(X), ids, tmp_path / "vec", kind="flat", n_eval=5, n_tune=5)
    vec = TestClient(create_app(tmp_path / "vec"), base_url=BASE)
    assert vec.get("/info").json()["queries"] == ["like"]
    assert vec.get("/search?like=v3&k=2").json()["results"][0]["thumbnail"] is None
    assert "cannot be queried by text" in refused(vec.get("/search?text=red"), 400)["error"]


def test_another_encoder_is_refused_at_startup(collection):
    class OtherColor(ColorEncoder):
        def fingerprint_parts(self) -> dict:
            return {"kind": "other-color", "version": 2}

    with pytest.raises(EncoderlabError, match="fingerprint"):
        create_app(collection["index"], encoder=OtherColor())


# ---------------------------------------------------------------------------------------------------- the CLI


def test_cli_binds_loopback_by_default_and_warns_on_a_public_host(collection, monkeypatch, capsys):
    import encoderlab.serve as serve

    seen: list[tuple[Any, Any]] = []

    def fake_run(app: Any, sock: Any, **kwargs: Any) -> None:
        seen.append((app, sock.getsockname()))
        raise KeyboardInterrupt  # what Ctrl-C does to a running server

    monkeypatch.setattr(serve, "run_server", fake_run)
    with registered_color_encoder():
        assert main(["serve", "--index", str(collection["index"]), "--port", "0", "--json"]) == 0
        out, err = capsys.readouterr()
        assert seen[-1][1][0] == "127.0.0.1" and json.loads(out)["url"].startswith("http://127.0.0.1:")
        assert "warning" not in err and "30 image items (flat), queries by text, image, like; open http" in err
        assert main(["serve", "--index", str(collection["index"]), "--port", "0", "--host", "0.0.0.0"]) == 0
        err = capsys.readouterr().err
        assert "warning: listening on 0.0.0.0, not loopback" in err and "no authentication" in err
        public = TestClient(seen[-1][0], base_url="http://search.example.org")
        assert public.get("/health").status_code == 200  # a public bind answers other host names
        with BackgroundServer(seen[0][0]) as url:  # the port is taken: a clear error, not a traceback
            port = urlsplit(url).port
            assert main(["serve", "--index", str(collection["index"]), "--port", str(port)]) == 1
            assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["serve", "--index", str(collection["index"]), "--port", "70000"]) == 2
    assert main(["serve", "--index", str(collection["tmp"] / "nowhere")]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    helptext = capsys.readouterr().out
    assert "--max-upload-mb" in helptext and "example:" in helptext and "curl -F image=@" in helptext


# ---------------------------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def live(collection) -> Any:
    encoder = CountingEncoder()
    app = create_app(collection["index"], encoder=encoder, max_upload_bytes=UPLOAD_LIMIT, max_pixels=PIXEL_LIMIT)
    with BackgroundServer(app) as url:  # uvicorn in a thread, 127.0.0.1, a free port
        assert urlsplit(url).hostname == "127.0.0.1"
        yield {"url": url, "app": app, "encoder": encoder}


def raw_get(url: str, target: str) -> tuple[int, bytes]:
    """A GET whose request target is sent verbatim (no client-side normalization of ``..`` or ``%2e``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("GET", target, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_traversal_is_refused_by_the_real_server(live, collection):
    for path in traversal_paths(collection):
        status, body = raw_get(live["url"], path)
        assert status in (400, 404), (path, status)
        assert SECRET not in body and b'"error"' in body, path
    status, body = raw_get(live["url"], "/items/red%2F1.png/thumbnail")
    assert status == 200 and (body.startswith(b"\x89PNG") or body.startswith(b"\xff\xd8\xff"))  # PNG or JPEG


def test_oversize_uploads_are_cut_off_by_the_real_server(live):
    parts = urlsplit(live["url"])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.putrequest("POST", "/search")  # declared too large: 413 before any byte of the body is read
    conn.putheader("content-type", "image/png")
    conn.putheader("content-length", str(50 << 20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and b"larger than" in r.read()
    conn.close()

    def chunks() -> Any:  # no length given: counted while it arrives
        for _ in range(64):
            yield b"\0" * (16 << 10)

    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    conn.request("POST", "/search", body=chunks(), headers={"content-type": "image/png"}, encode_chunked=True)
    r = conn.getresponse()
    assert r.status == 413 and b"larger than" in r.read()
    conn.close()


def test_load_50_concurrent_clients(live):
    """50 clients, 500 requests (text, like, upload, thumbnail, info) held together: 0 errors, p50/p99 reported."""
    clients, per_client = 50, 10
    url = urlsplit(live["url"])
    upload = png_bytes(COLORS["green"], size=32)
    words = ["red", "green", "blue", "a red square", "something green"]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def request(conn: http.client.HTTPConnection, n: int) -> tuple[int, bytes]:
        kind = n % 5
        if kind == 3:
            conn.request("POST", "/search?k=5", body=upload, headers={"content-type": "image/png"})
        elif kind == 4:
            conn.request("GET", f"/items/{quote(f'blue/{n % PER_COLOR}.png', safe='')}/thumbnail")
        elif kind == 2:
            conn.request("GET", f"/search?like={quote(f'red/{n % PER_COLOR}.png')}&k=10")
        else:
            conn.request("GET", f"/search?text={quote(words[n % len(words)])}&k=10&label=red_thing")
        r = conn.getresponse()
        return r.status, r.read()

    def client(c: int) -> None:
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        start.wait()
        try:
            for i in range(per_client):
                t0 = time.perf_counter()
                try:
                    status, body = request(conn, c * per_client + i)
                except (OSError, http.client.HTTPException) as e:
                    status, body = -1, repr(e).encode()
                    conn.close()
                    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if status != 200:
                        errors.append(f"{status}: {body[:200]!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    wall = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    stats = live["app"].state.service.worker.stats()
    print(f"\nload: {clients} clients, {len(ms)} requests in {wall:.2f} s ({len(ms) / wall:.0f} req/s), "
          f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms.max():.1f} ms; errors {len(errors)}; "
          f"model queue peak {stats['peak_pending']}")
    assert errors == [] and len(ms) == clients * per_client
    assert p99 < 10_000, p99  # generous: a 2-core machine shared with other jobs
    assert live["encoder"].most_active == 1 and live["encoder"].calls >= 300  # model calls serialized
    assert stats["peak_pending"] >= 2 and stats["pending"] == 0  # clients really waited on one another


# ---------------------------------------------------------------------------------------------------- a browser


def _artifacts() -> Path:
    out = Path(os.environ.get("ENCODERLAB_TEST_ARTIFACTS") or REPO / ".test-artifacts")
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser() -> Any:
    from test_report import chrome  # skips with the reason when chromium / chromedriver / selenium is missing

    driver = chrome("1280,900", {"browser": "ALL"})
    try:
        yield driver
    finally:
        driver.quit()


def _grid_done(driver: Any, query_key: str, n: int) -> bool:
    return bool(driver.execute_script(
        "const g = document.getElementById('grid');"
        "const imgs = Array.from(g.querySelectorAll('img'));"
        "return (g.dataset.query || '').includes(arguments[0]) && g.querySelectorAll('.hit').length === arguments[1]"
        " && imgs.length === arguments[1] && imgs.every(i => i.complete && i.naturalWidth > 0);", query_key, n))


def test_page_in_a_real_browser(live, browser, collection):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait
    from test_report import broken_images, csp_violations

    url, wait = live["url"], WebDriverWait(browser, 30)
    browser.get(url + "/")
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    assert "30 image items" in browser.find_element(By.ID, "about").text
    Select(browser.find_element(By.ID, "k")).select_by_visible_text("20")
    box = browser.find_element(By.ID, "text")
    box.send_keys("something red", Keys.ENTER)
    wait.until(lambda d: _grid_done(d, '"text"', 20))
    labels = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#grid .hit .label")]
    assert labels[:PER_COLOR] == ["red_thing"] * PER_COLOR
    artifacts = _artifacts()
    (artifacts / "serve-text.png").write_bytes(browser.get_screenshot_as_png())

    query = collection["tmp"] / "query-blue.png"
    query.write_bytes(png_bytes(COLORS["blue"], size=64))
    browser.find_element(By.ID, "file").send_keys(str(query))  # what dropping the file does: POST /search
    wait.until(lambda d: _grid_done(d, '"image"', 20))
    assert browser.find_elements(By.CSS_SELECTOR, "#grid .hit .label")[0].text == "blue_thing"

    target = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[12]  # a green one, after the 10 blue
    clicked = target.get_attribute("data-id")
    target.click()
    wait.until(lambda d: _grid_done(d, '"like"', 20))
    first = browser.find_elements(By.CSS_SELECTOR, "#grid .hit")[0]
    assert first.get_attribute("data-id") == clicked
    assert "items like" in browser.find_element(By.ID, "status").text
    (artifacts / "serve.png").write_bytes(browser.get_screenshot_as_png())

    assert broken_images(browser) == []
    assert csp_violations(browser) == []
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert resources and all(u.startswith(url + "/") or u.startswith("data:") for u in resources), resources
