"""Listing images from where listings say they are: a local file under one base directory, or a URL.

A listing's ``image_uri`` is written by whoever produces listings, so both ways are guarded:

* **Local paths** (:func:`read_local_image`) are read only under ``SAMESTYLE_IMAGE_BASE_DIR``:
  relative ones from it, absolute ones (and ``file://`` URIs) only if they resolve inside it. The
  path is resolved first (``..`` and every symlink followed), the containment is checked on the
  result, and that resolved path is what is opened, without following a link in its last
  component, so neither ``..`` nor a symlink leads out. No base directory: no local images.
* **URLs** (:class:`ImageFetcher`, ``http://`` and ``https://``) are fetched concurrently on the
  event loop with aiohttp: bounded concurrency per worker, connect/read timeouts and a total
  per attempt, a body cap that stops reading at ``max_bytes`` (``Content-Length`` is checked
  first, and counted bytes stop the read either way; no transparent decompression), redirects
  followed by hand up to a bound, each new location checked like the first, ``image/*`` (or
  untyped binary) content only, image bytes checked by their header, and a short retry on 5xx,
  timeouts and dropped connections. **SSRF guard**: every address a host name resolves to is
  classified (:mod:`samestyle.streams.io.addresses`) and the fetch is refused if any is
  loopback, private, link-local, multicast, reserved or a cloud metadata address, unless the
  host is allow-listed (metadata never is). The check runs inside the connector's resolver, so
  the connection goes to exactly the addresses that were checked (no DNS rebinding between check
  and connect); IP literals, which aiohttp connects to without resolving, are checked before the
  request. Proxies from the environment are ignored (a proxy would connect on our behalf).

Every failure is an :class:`~samestyle.topics.errors.ImageError` whose message is the reason a
dead letter carries. URLs in messages lose their query string (signed URLs carry credentials).
"""

from __future__ import annotations

import asyncio
import io
import ipaddress
import logging
import os
import socket
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver
from PIL import Image
from yarl import URL

from samestyle.streams.io.addresses import is_metadata, normalise_host, parse_allowed_hosts, refusal
from samestyle.topics.errors import ConfigError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.streams.settings import Settings

log = logging.getLogger(__name__)

REMOTE_SCHEMES = ("http", "https")
#: Content types accepted from an image host: any image type, or untyped binary (object stores
#: serve images uploaded without a type so); the bytes' header decides then.
BINARY_CONTENT_TYPES = ("application/octet-stream", "binary/octet-stream")
REDIRECT_STATUSES = (301, 302, 303, 307, 308)
#: Pause before the first retry; doubled for each further one.
RETRY_BACKOFF_SECONDS = 0.2
_CHUNK = 64 * 1024
#: aiohttp >= 3.11 tells a failed lookup apart from a failed connection.
_DNS_ERROR: Any = getattr(aiohttp, "ClientConnectorDNSError", ())


def is_remote(uri: str) -> bool:
    """Whether ``uri`` is fetched over HTTP(S) rather than read from the local disk."""
    return urlparse(uri.strip()).scheme.lower() in REMOTE_SCHEMES


def shown(uri: str | URL, limit: int = 200) -> str:
    """A URL as messages show it: without credentials or query string (it may carry a signature),
    and short."""
    text = str(uri)
    try:
        url = URL(text)
        if url.user is not None or url.password is not None:
            url = url.with_user(None)
        text = str(url.with_query(None).with_fragment(None)) + ("?…" if url.query_string else "")
    except (ValueError, TypeError):
        pass
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------- local files


def read_local_image(uri: str, base_dir: Path | str | None, max_bytes: int) -> bytes:
    """The bytes of a local image named by an untrusted ``uri``, only from under ``base_dir``.

    ``uri`` is a path or a ``file://`` URI (host empty or ``localhost``); other schemes are
    refused. Raises ImageError for no base directory, a path outside it, a missing file, anything
    but a regular file, or a file over ``max_bytes``.
    """
    if not uri or not uri.strip():
        raise ImageError("empty image URI")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"image URI {shown(uri)!r} names another host; file URIs are local only")
        raw_path = unquote(parsed.path)
    elif scheme in REMOTE_SCHEMES:
        raise ImageError(f"image URI {shown(uri)!r} is remote; it is fetched, not read from disk")
    elif scheme and len(scheme) > 1:  # a one-letter "scheme" is a Windows drive, a path
        raise ImageError(f"image URI {shown(uri)!r} has an unsupported scheme {scheme!r} "
                         f"(supported: http, https, file, or a path)")
    else:
        raw_path = uri
    if base_dir is None:
        raise ImageError(f"local image {raw_path!r} refused: local image paths are read only under "
                         "SAMESTYLE_IMAGE_BASE_DIR, and none is set")
    try:
        base = Path(base_dir).resolve(strict=True)
        candidate = Path(raw_path)
        # resolve() follows every symlink and "..": what it returns is where the bytes are.
        resolved = (candidate if candidate.is_absolute() else base / candidate).resolve()
    except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, symlink loop
        raise ImageError(f"image path {raw_path!r} cannot be resolved: {exc}") from None
    if not resolved.is_relative_to(base):
        raise ImageError(f"image path {raw_path!r} is outside SAMESTYLE_IMAGE_BASE_DIR ({str(base)!r})")
    try:
        # O_NOFOLLOW: a symlink put in place since resolve() is refused, not followed.
        # O_NONBLOCK: a FIFO under the base directory cannot hang the worker on open.
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(f"image file not found: {raw_path!r}") from None
    except OSError as exc:
        raise ImageError(f"cannot open image file {raw_path!r}: {exc.strerror or exc}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ImageError(f"image path {raw_path!r} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > max_bytes:
            raise ImageError(f"image file {raw_path!r} is {info.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        data = fh.read(max_bytes + 1)  # one byte past the limit: the file may have grown since fstat
    if len(data) > max_bytes:
        raise ImageError(f"image file {raw_path!r} is over the {max_bytes:,}-byte limit")
    return data


# -------------------------------------------------------------------------------------- fetching


@dataclass(frozen=True)
class FetchPolicy:
    """The limits of :class:`ImageFetcher` (built from the worker's settings by :meth:`of`)."""

    max_bytes: int
    allowed_hosts: frozenset[str] = frozenset()
    concurrency: int = 16
    connect_timeout: float = 3.0
    read_timeout: float = 5.0
    total_timeout: float = 10.0
    retries: int = 2
    max_redirects: int = 3
    retry_backoff: float = RETRY_BACKOFF_SECONDS

    @classmethod
    def of(cls, settings: Settings) -> FetchPolicy:
        """The worker's policy; ConfigError for a malformed ``SAMESTYLE_IMAGE_ALLOWED_HOSTS``."""
        try:
            allowed = parse_allowed_hosts(settings.image_allowed_hosts)
        except ValueError as exc:
            raise ConfigError(f"SAMESTYLE_IMAGE_ALLOWED_HOSTS: {exc}") from None
        return cls(max_bytes=settings.max_image_bytes, allowed_hosts=allowed,
                   concurrency=settings.image_fetch_concurrency,
                   connect_timeout=settings.image_fetch_connect_timeout_seconds,
                   read_timeout=settings.image_fetch_read_timeout_seconds,
                   total_timeout=settings.image_fetch_timeout_seconds, retries=settings.image_fetch_retries,
                   max_redirects=settings.image_fetch_max_redirects)


class RefusedAddress(OSError):
    """Raised inside the connector's resolver: the host resolved to an address we must not reach."""

    def __init__(self, host: str, reason: str) -> None:
        super().__init__(f"{host} resolves to a refused address: {reason}")
        self.host = host
        self.reason = reason


class _Retryable(Exception):
    """A failure worth another attempt (5xx, timeout, dropped connection)."""


class GuardedResolver(AbstractResolver):
    """Resolves like the default resolver, then refuses the whole answer if any address is not
    public (unless the host is allow-listed; metadata addresses always). The connector connects
    to what this returns, so what was checked is what is connected to."""

    def __init__(self, allowed_hosts: frozenset[str], inner: AbstractResolver | None = None) -> None:
        self._allowed = allowed_hosts
        self._inner = inner or ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = normalise_host(host) in self._allowed
        for result in results:
            address = ipaddress.ip_address(result["host"])
            if is_metadata(address):
                raise RefusedAddress(host, f"{address} is a cloud metadata address")
            why = None if allowed else refusal(address)
            if why is not None:
                raise RefusedAddress(host, why)
        return results

    async def close(self) -> None:
        await self._inner.close()


@dataclass
class FetchStats:
    """What a fetcher did, for tests and logs."""

    requests: int = 0
    bytes_received: int = 0


class ImageFetcher:
    """Fetches ``http(s)://`` listing images under a :class:`FetchPolicy` (see the module docstring).

    One per worker: its semaphore bounds the fetches in flight across every caller. The HTTP
    session is opened on first use, on the running loop; :meth:`close` ends it.
    """

    def __init__(self, policy: FetchPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        #: The resolver the guard wraps (default: aiohttp's threaded getaddrinfo; tests fake DNS).
        self._resolver = resolver
        self.stats = FetchStats()
        self._slots: asyncio.Semaphore | None = None
        self._session: aiohttp.ClientSession | None = None
        self._in_flight = 0

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            p = self.policy
            connector = aiohttp.TCPConnector(resolver=GuardedResolver(p.allowed_hosts, self._resolver),
                                             limit=p.concurrency,
                                             family=0, ttl_dns_cache=10)
            self._session = aiohttp.ClientSession(
                connector=connector, trust_env=False, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=p.connect_timeout, sock_read=p.read_timeout),
                headers={"Accept": "image/*", "Accept-Encoding": "identity", "User-Agent": "samestyle-image-fetcher"})
            self._slots = asyncio.Semaphore(p.concurrency)
        return self._session

    async def close(self, grace_seconds: float = 5.0) -> None:
        """Close the HTTP session once the fetches in flight finished (at most ``grace_seconds``):
        a worker that stops while a batch is being fetched must not dead-letter that batch's
        listings for a session closed under them. A later :meth:`fetch` opens a new session."""
        deadline = asyncio.get_running_loop().time() + grace_seconds
        while self._in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> ImageFetcher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def fetch_many(self, uris: Iterable[str]) -> dict[str, bytes | ImageError]:
        """Every distinct URI fetched concurrently: its bytes, or the ImageError saying why not."""
        wanted = list(dict.fromkeys(uris))
        if not wanted:
            return {}

        async def one(uri: str) -> bytes | ImageError:
            try:
                return await self.fetch(uri)
            except ImageError as exc:
                return exc

        return dict(zip(wanted, await asyncio.gather(*(one(u) for u in wanted))))

    async def fetch(self, uri: str) -> bytes:
        """The image bytes at ``uri``; raises ImageError with the reason it cannot be had."""
        session = self._open()
        assert self._slots is not None
        p = self.policy
        self._in_flight += 1
        try:
            async with self._slots:
                for attempt in range(p.retries + 1):
                    try:
                        return await asyncio.wait_for(self._attempt(session, uri), p.total_timeout)
                    except (_Retryable, asyncio.TimeoutError) as exc:
                        why = str(exc) if isinstance(exc, _Retryable) else \
                            f"image {shown(uri)}: no complete answer within {p.total_timeout:g} s"
                        if attempt == p.retries:
                            tries = f"{p.retries + 1} attempts" if p.retries else "1 attempt"
                            raise ImageError(f"{why} (gave up after {tries})") from None
                        log.debug("%s; retrying", why)
                        await asyncio.sleep(p.retry_backoff * 2 ** attempt)
        finally:
            self._in_flight -= 1
        raise AssertionError("unreachable")

    def _check_url(self, url: URL, where: str) -> None:
        """Scheme, host and (for an IP literal, which is never resolved) the address of one hop;
        ``where`` names the hop in messages."""
        if url.scheme not in REMOTE_SCHEMES:
            raise ImageError(f"{where}: only http and https URLs are fetched")
        if not url.raw_host:
            raise ImageError(f"{where}: the URL has no host")
        if url.user is not None or url.password is not None:
            raise ImageError(f"{where}: URLs with credentials are refused")
        host = normalise_host(url.raw_host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            if _legacy_ipv4(host):
                raise ImageError(f"{where}: {host!r} is not a canonical IP address") from None
            return  # a name: checked on the addresses it resolves to, in GuardedResolver
        why = f"{address} is a cloud metadata address" if is_metadata(address) else (
            None if host in self.policy.allowed_hosts else refusal(address))
        if why is not None:
            raise ImageError(f"{where} refused: {why}{self._hint(host, why)}")

    def _hint(self, host: str, why: str) -> str:
        if host in self.policy.allowed_hosts or "metadata" in why:  # metadata: no allow-list opens it
            return ""
        return " (not in SAMESTYLE_IMAGE_ALLOWED_HOSTS)"

    async def _attempt(self, session: aiohttp.ClientSession, uri: str) -> bytes:
        p = self.policy
        try:
            url = URL(uri.strip())
        except (ValueError, TypeError) as exc:
            raise ImageError(f"image URI {shown(uri)!r} is not a valid URL: {exc}") from None
        for hop in range(p.max_redirects + 1):
            where = f"image {shown(uri)}" + ("" if hop == 0 else f" (redirected to {shown(url)})")
            self._check_url(url, where)
            try:
                self.stats.requests += 1
                async with session.get(url, allow_redirects=False) as resp:
                    if resp.status in REDIRECT_STATUSES:
                        location = resp.headers.get("Location")
                        if not location:
                            raise ImageError(f"{where}: HTTP {resp.status} redirect without a Location")
                        try:
                            url = url.join(URL(location))
                        except (ValueError, TypeError):
                            raise ImageError(f"{where}: redirect to an invalid URL {location[:200]!r}") from None
                        continue
                    if resp.status >= 500:
                        raise _Retryable(f"{where}: HTTP {resp.status} {resp.reason or ''}".rstrip())
                    if resp.status != 200:
                        raise ImageError(f"{where}: HTTP {resp.status} {resp.reason or ''}".rstrip())
                    return await self._body(resp, where)
            except RefusedAddress as exc:  # raised directly by some aiohttp paths
                raise ImageError(f"{where} refused: {exc}{self._hint(normalise_host(exc.host), exc.reason)}") from None
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, RefusedAddress):
                    refused = exc.os_error
                    hint = self._hint(normalise_host(refused.host), refused.reason)
                    raise ImageError(f"{where} refused: {refused}{hint}") from None
                if isinstance(exc, _DNS_ERROR):
                    raise ImageError(f"{where}: cannot resolve {url.raw_host!r}: {exc.os_error}") from None
                if isinstance(exc, (aiohttp.ClientConnectorCertificateError, aiohttp.ClientConnectorSSLError)):
                    raise ImageError(f"{where}: TLS failed: {exc}") from None
                raise _Retryable(f"{where}: cannot connect: {exc.os_error}") from None
            except aiohttp.InvalidURL as exc:
                raise ImageError(f"{where}: invalid URL: {exc}") from None
            except (aiohttp.ServerTimeoutError, asyncio.TimeoutError):
                raise _Retryable(f"{where}: timed out (connect {p.connect_timeout:g} s, "
                                 f"read {p.read_timeout:g} s)") from None
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                raise _Retryable(f"{where}: connection dropped: {exc}") from None
            except aiohttp.ClientResponseError as exc:  # a malformed answer (bad headers, too long)
                raise ImageError(f"{where}: bad HTTP answer: {exc.message}") from None
            except aiohttp.ClientError as exc:
                raise ImageError(f"{where}: {type(exc).__name__}: {exc}") from None
        raise ImageError(f"image {shown(uri)}: more than {p.max_redirects} redirects (last to {shown(url)})")

    async def _body(self, resp: aiohttp.ClientResponse, where: str) -> bytes:
        limit = self.policy.max_bytes
        ctype = resp.content_type
        if not (ctype.startswith("image/") or ctype in BINARY_CONTENT_TYPES):
            raise ImageError(f"{where}: content type {ctype!r} is not an image")
        if resp.content_length is not None and resp.content_length > limit:
            raise ImageError(f"{where}: Content-Length {resp.content_length:,} is over the {limit:,}-byte limit")
        chunks: list[bytes] = []
        received = 0
        async for chunk in resp.content.iter_chunked(_CHUNK):
            received += len(chunk)
            self.stats.bytes_received += len(chunk)
            if received > limit:
                resp.close()  # drop the connection: nothing more is read
                raise ImageError(f"{where}: body is over the {limit:,}-byte limit (stopped reading "
                                 f"after {received:,} bytes)")
            chunks.append(chunk)
        data = b"".join(chunks)
        sniff_image(data, where)
        return data


def sniff_image(data: bytes, where: str) -> None:
    """Refuse bytes whose header is not an image of a supported format (the full decode, with
    its pixel limit, happens when the listing is prepared, on the model thread)."""
    # Imported here: samestyle.models.images loads torch, which the search module's import
    # (and `samestyle tail`) need not pay for.
    from samestyle.models.images import IMAGE_FORMATS

    if not data:
        raise ImageError(f"{where}: the body is empty")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:  # header only
            img.size  # noqa: B018 - parsed with the header
    except Exception:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
        raise ImageError(f"{where}: the body is not an image in a supported format "
                         f"({len(data):,} bytes starting {data[:8]!r})") from None


def _legacy_ipv4(host: str) -> bool:
    """``2130706433``, ``0x7f.1``, ``127.1``: numeric forms the C resolver reads as IPv4."""
    try:
        socket.inet_aton(host)
    except OSError:
        return False
    return True


# ----------------------------------------------------------------------------------- one listing


def listing_image(uri: str, base_dir: Path | None, max_bytes: int,
                  fetched: Mapping[str, bytes | ImageError] | None = None) -> bytes:
    """The image of a listing's ``image_uri``: fetched bytes for a URL (``fetched``, from
    :meth:`ImageFetcher.fetch_many`), the guarded local file otherwise. Raises ImageError."""
    if is_remote(uri):
        got: Any = (fetched or {}).get(uri)
        if got is None:
            raise ImageError(f"image {shown(uri)} was not fetched before embedding")
        if isinstance(got, ImageError):
            raise got
        return got
    return read_local_image(uri, base_dir, max_bytes)


__all__ = ["FetchPolicy", "FetchStats", "GuardedResolver", "ImageFetcher", "RefusedAddress", "is_remote",
           "listing_image", "read_local_image", "shown", "sniff_image"]
