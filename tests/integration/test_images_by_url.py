"""Listing images by URL on a real worker and the real embedded broker: an image server on loopback
(allow-listed for this worker), good and bad URLs in one stream, and the worker's API behind a token."""

from __future__ import annotations

import asyncio
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from samestyle.streams.dev.broker import free_port
from tests.integration.conftest import Stack, text_listing

pytestmark = pytest.mark.integration

TOKEN = "integration-token-0123456789"


def png(colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, format="PNG")
    return buf.getvalue()


class ImageHost:
    """An aiohttp server on its own thread and loop (the worker is another process), counting hits."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def _app(self) -> web.Application:
        @web.middleware
        async def count(request: web.Request, handler: Any) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            return await handler(request)

        async def image(request: web.Request) -> web.Response:
            return web.Response(body=png((20, 120, 220)), content_type="image/png")

        async def status(request: web.Request) -> web.Response:
            return web.Response(status=int(request.match_info["code"]), text="no")

        async def html(request: web.Request) -> web.Response:
            return web.Response(text="<html>a login page</html>", content_type="text/html")

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(5)
            return web.Response(body=png((1, 1, 1)), content_type="image/png")

        async def to_localhost(request: web.Request) -> web.Response:
            return web.Response(status=302, headers={"Location": self.url("/good.png", "localhost")})

        app = web.Application(middlewares=[count])
        app.router.add_get("/good.png", image)
        app.router.add_get("/status/{code}", status)
        app.router.add_get("/page.html", html)
        app.router.add_get("/slow.png", slow)
        app.router.add_get("/to-localhost.png", to_localhost)
        return app

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        self._loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self._loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> ImageHost:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


@pytest.fixture
def image_host() -> Iterator[ImageHost]:
    with ImageHost() as host:
        yield host


def request(base: str, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read()


def test_images_by_url_are_embedded_bad_ones_dead_lettered_and_the_api_needs_the_token(
        stack: Stack, image_host: ImageHost, tmp_path: Path) -> None:
    base_dir = tmp_path / "images"
    base_dir.mkdir()
    (base_dir / "local.png").write_bytes(png((200, 30, 30)))
    port = free_port()
    stack.start_worker(image_allowed_hosts="127.0.0.1", image_base_dir=base_dir, image_fetch_retries=1,
                       image_fetch_read_timeout_seconds=0.5, image_fetch_timeout_seconds=2.0, web_port=port,
                       api_token=TOKEN)
    first = {
        "url": image_host.url("/good.png"),
        "gone": image_host.url("/status/404"),
        "broken": image_host.url("/status/500"),
        "private": image_host.url("/to-localhost.png"),
        "html": image_host.url("/page.html"),
        "slow": image_host.url("/slow.png"),
        "metadata": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "local": "local.png",
        "outside": "/etc/passwd",
        "climb": "../../../../etc/passwd",
    }
    stack.produce([text_listing(i, f"Mug {i}", image_uri=uri) for i, uri in first.items()])
    out = stack.collect(lambda o: {"url", "local"} <= o.indexed_ids and len(o.dead_letters) >= 8, timeout=120)
    # The stream goes on after the bad ones.
    stack.produce([text_listing("after", "Green glass vase 30 cm")])
    out = stack.collect(lambda o: "after" in o.indexed_ids, timeout=60)

    assert out.indexed_ids == {"url", "local", "after"}
    letters = {m["original_key"].decode(): m for m in out.dead_letters}
    assert set(letters) == set(first) - {"url", "local"}
    reasons = {k: m["error"] for k, m in letters.items()}
    assert "HTTP 404 Not Found" in reasons["gone"]
    assert "HTTP 500" in reasons["broken"] and "gave up after 2 attempts" in reasons["broken"]
    assert "localhost resolves to a refused address: 127.0.0.1 is a loopback address" in reasons["private"]
    assert "content type 'text/html' is not an image" in reasons["html"]
    assert "timed out" in reasons["slow"] or "no complete answer" in reasons["slow"]
    assert "169.254.169.254 is a cloud metadata address" in reasons["metadata"]
    assert "outside SAMESTYLE_IMAGE_BASE_DIR" in reasons["outside"]
    assert "outside SAMESTYLE_IMAGE_BASE_DIR" in reasons["climb"]
    for m in letters.values():
        assert m["error_type"] == "ImageError" and m["stage"] == "embed"
        assert m["original_value"]  # nothing lost: the listing travels with its reason
    assert image_host.hits["/status/500"] == 2  # retried once
    assert image_host.hits["/status/404"] == 1  # a 4xx is not retried
    assert image_host.hits["/good.png"] == 1  # only the allow-listed fetch, never via localhost

    base = f"http://127.0.0.1:{port}"
    status, _, body = request(base, "/health")
    assert status == 200 and json.loads(body)["ok"] is True  # open for probes
    status, headers, body = request(base, "/listings/url")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    assert json.loads(body)["status"] == 401
    status, _, _ = request(base, "/listings/url", "wrong-token-wrong-token")
    assert status == 401
    status, _, body = request(base, "/listings/url", TOKEN)
    listing = json.loads(body)
    assert status == 200 and listing["has_image"] is True and listing["thumbnail"] == "/listings/url/thumbnail"
    # The thumbnail of a URL image is fetched through the same guard and re-encoded.
    status, headers, jpeg = request(base, "/listings/url/thumbnail", TOKEN)
    assert status == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert image_host.hits["/good.png"] == 2
    status, _, jpeg = request(base, "/listings/local/thumbnail", TOKEN)
    assert status == 200 and Image.open(io.BytesIO(jpeg)).format == "JPEG"
    status, _, _ = request(base, "/listings/url/thumbnail")
    assert status == 401
