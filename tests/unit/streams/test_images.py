"""Listing images by URL and by local path: the SSRF guard's classifier, the guarded local reader and
the HTTP fetcher against a real aiohttp server on loopback (allow-listed by each test that needs it)."""

from __future__ import annotations

import asyncio
import io
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from samestyle.streams.io.addresses import is_metadata, normalise_host, parse_allowed_hosts, refusal
from samestyle.streams.io.images import (
    FetchPolicy,
    GuardedResolver,
    ImageFetcher,
    RefusedAddress,
    is_remote,
    listing_image,
    read_local_image,
    shown,
)
from samestyle.streams.settings import Settings
from samestyle.topics.errors import ConfigError, ImageError


def png(size: int = 24, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------ the classifier


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.255.0.9", "loopback"), ("::1", "loopback"),
    ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"), ("fd12::1", "private"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"), ("fe80::1%2", "link-local"),
    ("224.0.0.1", "multicast"), ("239.1.1.1", "multicast"), ("ff02::1", "multicast"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"),
    ("240.0.0.1", "private"), ("255.255.255.255", "private"),  # reserved ranges Python also calls private
    ("100.64.0.1", "not a globally routable"),  # carrier-grade NAT
    ("::127.0.0.1", "reserved"),  # deprecated IPv4-compatible form
    ("2001:db8::1", "private"),  # documentation
    # cloud metadata, named as such (most sit in a refused range anyway; Azure's wire server does not)
    ("169.254.169.254", "cloud metadata"), ("169.254.170.2", "cloud metadata"),
    ("100.100.100.200", "cloud metadata"), ("168.63.129.16", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
    # IPv6 forms that carry an IPv4 address are judged by it
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:10.0.0.1", "private"), ("::ffff:169.254.169.254", "cloud metadata"),
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 of 169.254.169.254
    ("64:ff9b::a00:1", "private"),  # NAT64 of 10.0.0.1
])
def test_refused_addresses_say_what_they_are(address: str, kind: str) -> None:
    why = refusal(address)
    assert why is not None and kind in why, why


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "::ffff:8.8.8.8",
                                     "64:ff9b::808:808", "2002:808:808::1"])
def test_public_unicast_addresses_pass(address: str) -> None:
    assert refusal(address) is None


def test_metadata_is_recognised_through_ipv6_wrappers() -> None:
    import ipaddress

    assert is_metadata(ipaddress.ip_address("::ffff:169.254.169.254"))
    assert is_metadata(ipaddress.ip_address("fd00:ec2::254"))
    assert not is_metadata(ipaddress.ip_address("8.8.8.8"))


def test_allowed_hosts_are_normalised_and_checked() -> None:
    assert parse_allowed_hosts(" Images.Internal. ,127.0.0.1,[0:0::1],") == {"images.internal", "127.0.0.1", "::1"}
    assert normalise_host("[::FFFF:7f00:1]") == "::ffff:7f00:1"
    for bad in ("*.cdn.example", "host:8080", "http://host", "a b"):
        with pytest.raises(ValueError, match="not a host name"):
            parse_allowed_hosts(bad)
    with pytest.raises(ConfigError, match="SAMESTYLE_IMAGE_ALLOWED_HOSTS: .* not a host name"):
        FetchPolicy.of(Settings.from_env({"SAMESTYLE_IMAGE_ALLOWED_HOSTS": "*.example.com"}))
    policy = FetchPolicy.of(Settings.from_env({"SAMESTYLE_IMAGE_ALLOWED_HOSTS": "a.example, b.example",
                                               "SAMESTYLE_MAX_IMAGE_BYTES": "1234"}))
    assert policy.allowed_hosts == {"a.example", "b.example"} and policy.max_bytes == 1234


@pytest.mark.parametrize("env, message", [
    ({"SAMESTYLE_IMAGE_FETCH_CONCURRENCY": "0"}, "image_fetch_concurrency"),
    ({"SAMESTYLE_IMAGE_FETCH_READ_TIMEOUT_SECONDS": "0"}, "timeouts"),
    ({"SAMESTYLE_IMAGE_FETCH_RETRIES": "-1"}, "image_fetch_retries"),
    ({"SAMESTYLE_IMAGE_BASE_DIR": "/no/such/dir"}, "not a directory"),
])
def test_bad_image_settings_fail_with_a_clear_message(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_urls_in_messages_lose_their_query_and_credentials() -> None:
    assert shown("https://user:pw@cdn.example/a.jpg") == "https://cdn.example/a.jpg"
    assert shown("https://cdn.example/a.jpg?X-Amz-Signature=secret") == "https://cdn.example/a.jpg?…"
    assert "secret" not in shown("https://cdn.example/a.jpg?sig=secret#frag")
    assert is_remote("HTTPS://cdn.example/a.jpg") and not is_remote("file:///a.jpg") and not is_remote("a.jpg")


# ------------------------------------------------------------------------------- local files


@pytest.fixture
def base(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png(colour=(1, 2, 3)))
    return root


def test_local_images_are_read_under_the_base_directory(base: Path) -> None:
    data = (base / "sub" / "a.png").read_bytes()
    assert read_local_image("sub/a.png", base, 10**6) == data
    assert read_local_image(str(base / "sub" / "a.png"), base, 10**6) == data
    assert read_local_image((base / "sub" / "a.png").as_uri(), base, 10**6) == data
    assert read_local_image("sub/../sub/a.png", base, 10**6) == data  # ".." that stays inside is fine
    os.symlink(base / "sub" / "a.png", base / "inside-link.png")
    assert read_local_image("inside-link.png", base, 10**6) == data  # a link that stays inside too


@pytest.mark.parametrize("uri, message", [
    ("../secret.png", "outside SAMESTYLE_IMAGE_BASE_DIR"),
    ("sub/../../secret.png", "outside SAMESTYLE_IMAGE_BASE_DIR"),
    ("/etc/passwd", "outside SAMESTYLE_IMAGE_BASE_DIR"),
    ("file:///etc/passwd", "outside SAMESTYLE_IMAGE_BASE_DIR"),
    ("file://otherhost/images/a.png", "names another host"),
    ("s3://bucket/a.png", "unsupported scheme"),
    ("ftp://host/a.png", "unsupported scheme"),
    ("https://cdn.example/a.png", "is remote"),
    ("sub/missing.png", "not found"),
    ("sub", "not a regular file"),
    ("sub/a.png\x00.jpg", "cannot be resolved"),
    ("", "empty image URI"),
])
def test_local_paths_that_leave_the_base_or_are_not_images_are_refused(base: Path, uri: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        read_local_image(uri, base, 10**6)


def test_symlinks_cannot_escape_the_base_directory(base: Path, tmp_path: Path) -> None:
    os.symlink(tmp_path / "secret.png", base / "escape.png")
    os.symlink(tmp_path, base / "up")
    for uri in ("escape.png", "up/secret.png", str(base / "escape.png")):
        with pytest.raises(ImageError, match="outside SAMESTYLE_IMAGE_BASE_DIR"):
            read_local_image(uri, base, 10**6)


def test_a_fifo_does_not_hang_and_a_big_file_is_refused(base: Path) -> None:
    os.mkfifo(base / "pipe.png")
    with pytest.raises(ImageError, match="not a regular file"):
        read_local_image("pipe.png", base, 10**6)
    (base / "big.png").write_bytes(b"\0" * 5000)
    with pytest.raises(ImageError, match="5,000 bytes, over the 4,000-byte limit"):
        read_local_image("big.png", base, 4000)


def test_without_a_base_directory_no_local_path_is_read(base: Path) -> None:
    with pytest.raises(ImageError, match="SAMESTYLE_IMAGE_BASE_DIR, and none is set"):
        read_local_image(str(base / "sub" / "a.png"), None, 10**6)


def test_listing_image_takes_urls_from_what_was_fetched(base: Path) -> None:
    url = "https://cdn.example/a.png"
    assert listing_image(url, base, 10**6, {url: b"img"}) == b"img"
    with pytest.raises(ImageError, match="HTTP 404"):
        listing_image(url, base, 10**6, {url: ImageError("HTTP 404")})
    with pytest.raises(ImageError, match="not fetched"):
        listing_image(url, base, 10**6, {})
    assert listing_image("sub/a.png", base, 10**6) == (base / "sub" / "a.png").read_bytes()


# ------------------------------------------------------------------------------ the fetcher


LIMIT = 200_000
HUGE_CAP = 64 * 1024 * 1024  # the huge body stops here even if the client never does


@dataclass
class ImageServer:
    """A loopback HTTP server with one route per bad behaviour; counts hits and bytes sent."""

    port: int = 0
    hits: dict[str, int] = field(default_factory=dict)
    huge_bytes_sent: int = 0
    image: bytes = field(default_factory=png)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def app(self) -> web.Application:
        async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                        ) -> web.StreamResponse:
            self.hits[request.path] = self.hits.get(request.path, 0) + 1
            return await handler(request)

        app = web.Application(middlewares=[web.middleware(count)])
        r = app.router

        def image(content_type: str = "image/png", body: bytes | None = None) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(body=self.image if body is None else body, content_type=content_type)
            return handler

        async def slow(request: web.Request) -> web.Response:
            await asyncio.sleep(3)
            return web.Response(body=self.image, content_type="image/png")

        async def drip(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})
            await resp.prepare(request)
            try:
                for _ in range(100):  # one byte every 0.1 s: each read is quick, the whole is not
                    await resp.write(b"x")
                    await asyncio.sleep(0.1)
            except ConnectionError:  # the client gave up
                pass
            return resp

        async def huge(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "image/png"})  # chunked: no length to check
            await resp.prepare(request)
            chunk = b"\xff" * 65536
            try:
                while self.huge_bytes_sent < HUGE_CAP:
                    await resp.write(chunk)
                    self.huge_bytes_sent += len(chunk)
            except (ConnectionResetError, ConnectionError, RuntimeError):
                pass
            return resp

        async def declared(request: web.Request) -> web.Response:
            resp = web.StreamResponse(headers={"Content-Type": "image/png", "Content-Length": str(10**9)})
            await resp.prepare(request)
            await resp.write(b"\xff" * 1000)
            return resp

        def redirect(location: Callable[[web.Request], str], status: int = 302) -> Any:
            async def handler(request: web.Request) -> web.Response:
                return web.Response(status=status, headers={"Location": location(request)})
            return handler

        async def chain(request: web.Request) -> web.Response:
            n = int(request.match_info["n"])
            if n == 0:
                return web.Response(body=self.image, content_type="image/png")
            return web.Response(status=302, headers={"Location": f"/chain/{n - 1}"})

        async def error(request: web.Request) -> web.Response:
            return web.Response(status=int(request.match_info["status"]), text="nope")

        async def flaky(request: web.Request) -> web.Response:
            if self.hits[request.path] == 1:
                return web.Response(status=503, text="try again")
            return web.Response(body=self.image, content_type="image/png")

        r.add_get("/img.png", image())
        r.add_get("/octet", image("application/octet-stream"))
        r.add_get("/html", image("text/html", b"<html>not an image</html>"))
        r.add_get("/svg", image("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>"))
        r.add_get("/text-as-png", image("image/png", b"hello, I am not a picture"))
        r.add_get("/empty", image("image/png", b""))
        r.add_get("/slow", slow)
        r.add_get("/drip", drip)
        r.add_get("/huge", huge)
        r.add_get("/declared", declared)
        r.add_get("/chain/{n}", chain)
        r.add_get("/status/{status}", error)
        r.add_get("/flaky", flaky)
        r.add_get("/to-localhost", redirect(lambda req: self.url("/img.png", "localhost")))
        r.add_get("/to-mapped", redirect(lambda req: self.url("/img.png", "[::ffff:127.0.0.1]")))
        r.add_get("/to-metadata", redirect(lambda req: "http://169.254.169.254/latest/meta-data/", 307))
        r.add_get("/to-ten", redirect(lambda req: "http://10.0.0.1/img.png", 301))
        r.add_get("/to-file", redirect(lambda req: "file:///etc/passwd"))
        r.add_get("/to-decimal", redirect(lambda req: f"http://2130706433:{self.port}/img.png"))
        r.add_get("/to-hex", redirect(lambda req: f"http://0x7f.1:{self.port}/img.png"))
        async def no_location(request: web.Request) -> web.Response:
            return web.Response(status=302)

        r.add_get("/no-location", no_location)
        return app


@asynccontextmanager
async def image_server() -> AsyncIterator[ImageServer]:
    server = ImageServer()
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield server
    finally:
        await runner.cleanup()


def policy(**changes: Any) -> FetchPolicy:
    values: dict[str, Any] = {"max_bytes": LIMIT, "allowed_hosts": frozenset({"127.0.0.1"}), "concurrency": 4,
                              "connect_timeout": 1.0, "read_timeout": 0.5, "total_timeout": 2.0, "retries": 1,
                              "max_redirects": 3, "retry_backoff": 0.01}
    values.update(changes)
    return FetchPolicy(**values)


def fetch(path_or_url: str, **changes: Any) -> tuple[bytes | ImageError, ImageServer, ImageFetcher]:
    """Fetch one URL from a fresh loopback server (paths are on the server)."""

    async def run() -> tuple[bytes | ImageError, ImageServer, ImageFetcher]:
        async with image_server() as server:
            fetcher = ImageFetcher(policy(**changes))
            url = server.url(path_or_url) if path_or_url.startswith("/") else path_or_url
            try:
                got: bytes | ImageError = await fetcher.fetch(url)
            except ImageError as exc:
                got = exc
            finally:
                await fetcher.close()
            return got, server, fetcher

    return asyncio.run(run())


def refused(path_or_url: str, message: str, **changes: Any) -> tuple[str, ImageServer, ImageFetcher]:
    got, server, fetcher = fetch(path_or_url, **changes)
    assert isinstance(got, ImageError), f"{path_or_url} was fetched ({len(got)} bytes)"
    assert message in str(got), str(got)
    return str(got), server, fetcher


def test_an_allow_listed_loopback_image_is_fetched() -> None:
    got, server, _ = fetch("/img.png")
    assert got == server.image
    got, _, _ = fetch("/octet")  # untyped binary: the header decides
    assert got == server.image
    got, server, _ = fetch("/chain/3")  # three redirects: within the bound
    assert got == server.image and server.hits["/chain/0"] == 1


def test_loopback_is_refused_unless_allow_listed() -> None:
    _, server, fetcher = refused("/img.png", "127.0.0.1 is a loopback address", allowed_hosts=frozenset())
    assert "not in SAMESTYLE_IMAGE_ALLOWED_HOSTS" in _
    assert server.hits == {} and fetcher.stats.requests == 0  # refused before any request


def test_a_slow_server_times_out_and_is_retried() -> None:
    message, server, _ = refused("/slow", "timed out")
    assert server.hits["/slow"] == 2  # one retry
    assert "gave up after 2 attempts" in message


def test_a_server_that_drips_bytes_is_stopped_by_the_total_timeout() -> None:
    _, server, _ = refused("/drip", "no complete answer within 1 s", total_timeout=1.0, retries=0)
    assert server.hits["/drip"] == 1


def test_a_huge_body_stops_reading_at_the_limit() -> None:
    message, server, fetcher = refused("/huge", f"over the {LIMIT:,}-byte limit", retries=0)
    assert "stopped reading" in message
    # The fetcher read no more than the limit plus one chunk, and the server could not push the
    # whole 64 MB: the connection was dropped (socket buffers hold a few MB at most).
    assert LIMIT < fetcher.stats.bytes_received <= LIMIT + 65536
    assert server.huge_bytes_sent < HUGE_CAP / 4


def test_a_declared_length_over_the_limit_is_refused_without_reading() -> None:
    _, _, fetcher = refused("/declared", "Content-Length 1,000,000,000 is over the 200,000-byte limit")
    assert fetcher.stats.bytes_received == 0


def test_too_many_redirects_are_refused() -> None:
    _, server, _ = refused("/chain/4", "more than 3 redirects")
    assert "/chain/0" not in server.hits
    refused("/chain/1", "more than 0 redirects", max_redirects=0)


@pytest.mark.parametrize("path, message", [
    ("/to-localhost", "localhost resolves to a refused address: 127.0.0.1 is a loopback address"),
    ("/to-mapped", "carries IPv4 127.0.0.1 is a loopback address"),
    ("/to-metadata", "169.254.169.254 is a cloud metadata address"),
    ("/to-ten", "10.0.0.1 is a private address"),
    ("/to-file", "only http and https"),
    ("/to-decimal", "not a canonical IP address"),
    ("/to-hex", "not a canonical IP address"),
])
def test_a_redirect_to_a_private_address_is_refused_although_the_first_host_is_allowed(path: str, message: str) -> None:
    text, server, _ = refused(path, message)
    assert "redirected to" in text
    assert "/img.png" not in server.hits  # the image behind the private address was never requested


def test_metadata_is_refused_even_when_allow_listed() -> None:
    text, _, fetcher = refused("http://169.254.169.254/latest/meta-data/", "cloud metadata address",
                               allowed_hosts=frozenset({"169.254.169.254"}))
    assert "ALLOWED_HOSTS" not in text and fetcher.stats.requests == 0


@pytest.mark.parametrize("path, message", [
    ("/html", "content type 'text/html' is not an image"),
    ("/svg", "not an image in a supported format"),
    ("/text-as-png", "not an image in a supported format"),
    ("/empty", "the body is empty"),
    ("/status/404", "HTTP 404"),
    ("/status/403", "HTTP 403"),
    ("/no-location", "redirect without a Location"),
])
def test_wrong_content_is_refused_without_retry(path: str, message: str) -> None:
    _, server, _ = refused(path, message)
    assert server.hits[path] == 1


def test_a_500_is_retried_then_given_up() -> None:
    message, server, _ = refused("/status/500", "HTTP 500", retries=2)
    assert server.hits["/status/500"] == 3 and "gave up after 3 attempts" in message


def test_a_503_once_then_the_image_succeeds_on_the_retry() -> None:
    got, server, _ = fetch("/flaky")
    assert got == server.image and server.hits["/flaky"] == 2


@pytest.mark.parametrize("url, message", [
    ("http://user:secret@127.0.0.1/img.png", "credentials are refused"),
    ("http:///img.png", "no host"),
    ("http://[::1/img.png", "not a valid URL"),
])
def test_malformed_urls_are_refused(url: str, message: str) -> None:
    text, _, _ = refused(url, message)
    assert "secret" not in text


def test_a_connection_refused_is_retried_then_dead_lettered() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused(f"http://127.0.0.1:{port}/img.png", "cannot connect")


class FakeResolver(AbstractResolver):
    """Answers from a table, as a DNS server under an attacker's control would."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        self.asked.append(host)
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET6 if ":" in a else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in self.table[host]]

    async def close(self) -> None:
        pass


def test_the_guard_checks_every_resolved_address() -> None:
    async def run() -> None:
        inner = FakeResolver({"cdn.test": ["93.184.216.34"], "rebind.test": ["93.184.216.34", "127.0.0.1"],
                              "meta.test": ["169.254.169.254"], "internal.test": ["10.0.0.7"]})
        guard = GuardedResolver(frozenset({"internal.test", "meta.test"}), inner)
        assert [r["host"] for r in await guard.resolve("cdn.test", 80)] == ["93.184.216.34"]
        with pytest.raises(RefusedAddress, match="127.0.0.1 is a loopback address"):
            await guard.resolve("rebind.test", 80)  # one bad address refuses the whole answer
        assert [r["host"] for r in await guard.resolve("internal.test", 80)] == ["10.0.0.7"]  # allow-listed
        with pytest.raises(RefusedAddress, match="cloud metadata"):
            await guard.resolve("meta.test", 80)  # allow-listed, but metadata never

    asyncio.run(run())


def test_the_connection_goes_to_the_address_that_was_checked() -> None:
    """A name is resolved once, by the guarded resolver, and connected to at that very address: a
    second, different DNS answer (rebinding) is never asked for."""

    async def run() -> None:
        async with image_server() as server:
            inner = FakeResolver({"images.test": ["127.0.0.1"]})
            allowed = ImageFetcher(policy(allowed_hosts=frozenset({"images.test"})), resolver=inner)
            try:
                assert await allowed.fetch(server.url("/img.png", "images.test")) == server.image
            finally:
                await allowed.close()
            assert inner.asked == ["images.test"]
            guarded = ImageFetcher(policy(allowed_hosts=frozenset()), resolver=inner)
            try:
                with pytest.raises(ImageError, match="images.test resolves to a refused address: 127.0.0.1 is"):
                    await guarded.fetch(server.url("/img.png", "images.test"))
            finally:
                await guarded.close()
            assert server.hits["/img.png"] == 1

    asyncio.run(run())


def test_fetch_many_fetches_each_url_once_concurrently_and_reports_each_failure() -> None:
    async def run() -> None:
        async with image_server() as server:
            fetcher = ImageFetcher(policy(concurrency=2))
            try:
                urls = [server.url("/img.png"), server.url("/status/404"), server.url("/img.png"), server.url("/html")]
                got = await fetcher.fetch_many(urls)
            finally:
                await fetcher.close()
            assert list(got) == [urls[0], urls[1], urls[3]]
            assert got[urls[0]] == server.image
            assert isinstance(got[urls[1]], ImageError) and "HTTP 404" in str(got[urls[1]])
            assert isinstance(got[urls[3]], ImageError) and "text/html" in str(got[urls[3]])
            assert server.hits["/img.png"] == 1

    asyncio.run(run())


def test_concurrency_is_bounded() -> None:
    async def run() -> None:
        in_flight = peak = 0

        async def held(request: web.Request) -> web.Response:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await asyncio.sleep(0.1)
            in_flight -= 1
            return web.Response(body=png(), content_type="image/png")

        app = web.Application()
        app.router.add_get("/{n}", held)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        fetcher = ImageFetcher(policy(concurrency=3))
        try:
            got = await fetcher.fetch_many(f"http://127.0.0.1:{port}/{n}" for n in range(12))
        finally:
            await fetcher.close()
            await runner.cleanup()
        assert all(isinstance(v, bytes) for v in got.values()) and len(got) == 12
        assert peak == 3

    asyncio.run(run())


# ------------------------------------------------------------------------------ the embed step


def test_the_embed_step_uses_fetched_images_and_dead_letters_those_that_failed(base: Path) -> None:
    from samestyle.models import create_encoder
    from samestyle.streams.worker.pipeline import EmbedStep, Incoming, remote_image_uris
    from samestyle.topics import LISTINGS, codec_for_topic

    def record(listing_id: str, **extra: Any) -> dict[str, Any]:
        r = {"listing_id": listing_id, "supplier_id": "s1", "category": "mugs", "title": f"mug {listing_id}",
             "description": None, "attributes": {}, "image_uri": None, "image_bytes": None, "op": "UPSERT",
             "event_time": 1}
        r.update(extra)
        return r

    good, bad = "https://cdn.example/good.png", "https://cdn.example/gone.png"
    records = [record("url", image_uri=good), record("gone", image_uri=bad), record("unfetched", image_uri="http://x.example/a.png"),
               record("local", image_uri="sub/a.png"), record("outside", image_uri="/etc/passwd"),
               record("inline", image_uri=good, image_bytes=png()), record("del", op="DELETE", image_uri=bad),
               record("url-again", image_uri=good)]
    codec = codec_for_topic(LISTINGS)
    batch = [Incoming(r["listing_id"].encode(), codec.encode(r), "listings", 0, i) for i, r in enumerate(records)]
    batch.append(Incoming(b"junk", b"\x00 not avro", "listings", 0, len(batch)))
    # Only upserts without inline bytes need fetching, each URL once; junk is left to the step.
    assert remote_image_uris(batch) == [good, bad, "http://x.example/a.png"]

    step = EmbedStep(create_encoder("tiny", "cpu", allow_random_weights=True), Settings(image_base_dir=base))
    out, failures = step(batch, None, {good: png(), bad: ImageError(f"image {bad}: HTTP 404 Not Found")})
    embedded = {codec_for_topic("listing-embeddings").decode(o.value)["listing_id"]: o for o in out}
    assert set(embedded) == {"url", "local", "inline", "del", "url-again"}
    reasons = {f.incoming.key: str(f.error) for f in failures}
    assert reasons[b"gone"] == f"image {bad}: HTTP 404 Not Found"
    assert "was not fetched" in reasons[b"unfetched"]
    assert "outside SAMESTYLE_IMAGE_BASE_DIR" in reasons[b"outside"]
    assert set(reasons) == {b"gone", b"unfetched", b"outside", b"junk"}
