"""Interactive search over the worker's index: the HTTP API and the web page at ``/``.

The index is the worker's live replica or, with ``SAMESTYLE_INDEX_BACKEND=milvus``, a view of the
active Milvus collection: both answer :class:`LiveIndex`'s reading methods, and every call on it
runs off the event loop (on Milvus each is a request). An index server that cannot be reached is a
503 the client may retry.

:func:`search_routes` registers the routes on the worker's
:class:`~samestyle.streams.http.server.WebServer`: ``POST /search``, ``GET /listings/{id}`` and its
``similar``, ``duplicates`` and ``thumbnail`` sub-resources, ``GET /stats`` and ``GET /openapi.json``
(the OpenAPI 3 description of them all). Blocking work never runs on the event loop. Every error a
client can cause is a 4xx JSON ``{"error": ..., "status": ...}``, aiohttp's own HTTP errors included.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol

import numpy as np
from aiohttp import web

from samestyle.models.query import Query, QueryEmbedding, embed_queries
from samestyle.streams.http.server import RouteRegistrar
from samestyle.streams.io.images import ImageFetcher, is_remote, read_local_image
from samestyle.index_store.backend import IndexUnavailableError
from samestyle.streams.settings import Settings
from samestyle.topics.errors import BadInputError, ImageError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.index_store import LiveIndex
    from samestyle.models.encoder import Encoder


log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_K = 10
MAX_K = 100
#: How many neighbours a duplicates request searches before keeping same-supplier ones.
DUPLICATE_CANDIDATES = 100
#: Room for the JSON around a base64 image (base64 is 4/3 of the bytes) and for form fields.
_BODY_OVERHEAD = 64 * 1024
#: A body this many times over the limit is not drained before answering 413: the connection is
#: closed instead (the client may then see a reset rather than the JSON error).
_VIEW_ORDER = ("image", "text", "image_text")  # the order of LiveIndex views (streams.pipeline.VIEWS)


class ApiError(Exception):
    """A client error, answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message, "status": status}, status=status)


@web.middleware
async def json_errors(request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Every error of this server as JSON: ApiError, aiohttp's HTTP errors (404, 405, 413)."""
    try:
        return await handler(request)
    except ApiError as exc:
        return _error(exc.status, exc.message)
    except IndexUnavailableError as exc:
        log.warning("%s %s: %s", request.method, request.path, exc)
        return _error(503, "the index is unavailable; retry")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _error(exc.status, exc.reason)
    except Exception:  # a bug or an outage, not the client's fault: logged, and still JSON
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, "internal error; see the worker log")


# ------------------------------------------------------------------------------ request parsing


def _parse_k(raw: Any) -> int:
    if raw is None or raw == "":
        return DEFAULT_K
    try:
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        k = int(raw)
    except (TypeError, ValueError):
        raise ApiError(400, f"k must be an integer from 1 to {MAX_K}, got {raw!r}") from None
    if not 1 <= k <= MAX_K:
        raise ApiError(400, f"k must be from 1 to {MAX_K}, got {k}")
    return k


def _text_field(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    return value.strip() or None


def _decode_base64_image(value: Any, limit: int) -> bytes | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ApiError(400, "image must be a base64 string (optionally a data: URL)")
    if value.startswith("data:"):
        value = value.partition(",")[2]
    if len(value) > limit * 4 // 3 + 4:
        raise ApiError(413, f"image is over the {limit:,}-byte limit")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image is not valid base64") from None
    if not data:
        return None
    return data


def search_body_limit(max_image_bytes: int) -> int:
    """The request body limit of ``/search``: a base64 image of ``max_image_bytes`` plus the rest.
    The server enforces it (aiohttp's ``client_max_size``), reading and dropping what is left of an
    oversized body (lingering close) so the client receives the 413 answer."""
    return max_image_bytes * 4 // 3 + _BODY_OVERHEAD


async def parse_search(request: web.Request, image_limit: int) -> tuple[Query, int]:
    """A :class:`Query` and ``k`` from a JSON or a multipart/form-data request."""
    try:
        if request.content_type == "multipart/form-data":
            form = await request.post()
        else:  # JSON, whatever the client called it (curl -d says x-www-form-urlencoded)
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"request body is over the {request.client_max_size:,}-byte limit") from None
    if request.content_type == "multipart/form-data":
        body: dict[str, Any] = {}
        image: bytes | None = None
        for name, value in form.items():
            if isinstance(value, web.FileField):
                if name == "image":
                    image = value.file.read() or None
            elif name == "image":
                image = value.encode() or None
            else:
                body[name] = value
    else:
        try:
            body = json.loads(raw or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        unknown = sorted(set(body) - {"text", "image", "modifier", "k"})
        if unknown:
            raise ApiError(400, f"unknown fields {unknown}; expected text, image, modifier, k")
        image = _decode_base64_image(body.get("image"), image_limit)
    if image is not None and len(image) > image_limit:
        raise ApiError(413, f"image of {len(image):,} bytes is over the {image_limit:,}-byte limit")
    text, modifier = _text_field(body, "text"), _text_field(body, "modifier")
    if text and modifier:
        raise ApiError(400, "send text (a query) or modifier (with an image), not both")
    if modifier and image is None:
        raise ApiError(400, "modifier needs an image: it says how results should differ from it")
    query = Query(text=text or modifier, image=image)
    if not query.has_text and query.image is None:
        raise ApiError(400, "no query: send text, an image, or an image with a modifier")
    return query, _parse_k(body.get("k"))


# ------------------------------------------------------------------------------------ responses


def listing_json(listing_id: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """An indexed listing as the API shows it (title, supplier, thumbnail URL, ...) from its index payload."""
    return {
        "listing_id": listing_id,
        "title": payload.get("title"),
        "supplier_id": payload.get("supplier_id"),
        "category": payload.get("category"),
        "has_image": bool(payload.get("has_image")),
        # Where the page gets a thumbnail, for listings whose image the server can read.
        "thumbnail": f"/listings/{listing_id}/thumbnail" if payload.get("image_uri") else None,
        "event_time": payload.get("event_time"),
    }


#: Longest side of a served thumbnail, in pixels.
THUMBNAIL_SIZE = 160


def render_thumbnail(raw: bytes, settings: Settings) -> bytes:
    """A JPEG thumbnail of an indexed listing's image bytes (blocking).

    The bytes are decoded as an image and re-encoded, never sent as they are: an ``image_uri`` that
    names something other than an image fails to decode instead of leaking.
    """
    import io

    from samestyle.models.images import decode_image

    image = decode_image(raw, max_bytes=settings.max_image_bytes, draft_size=THUMBNAIL_SIZE * 2)
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _cos(a: np.ndarray | None, b: np.ndarray) -> float | None:
    return None if a is None else round(float(a @ b), 6)


def search_index(index: "LiveIndex", q: QueryEmbedding, k: int) -> list[dict[str, Any]]:
    """Top-k listings for one embedded query, with the query's per-view cosines (blocking; ``index``
    is a LiveIndex or anything with its reading methods, such as a Milvus collection's view)."""
    hits = index.search(q.search[None, :], k)[0]
    results = []
    for hit in hits:
        got = index.get(hit.listing_id)
        if got is None:  # deleted between the search and here
            continue
        _, payload, views = got
        assert views is not None  # [3, dim] image / text / image_text
        has_image = bool(payload.get("has_image"))
        scores = {
            "image": _cos(q.image, views[0]) if has_image else None,
            "text": _cos(q.text, views[1]),
            "image_text": _cos(q.image_text, views[2]),
        }
        results.append({**listing_json(hit.listing_id, payload), "score": round(float(hit.score), 6),
                        "scores": scores})
    return results


def similar_to(index: "LiveIndex", listing_id: str, k: int, threshold: float,
               duplicates_only: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """A listing and its neighbours by image+text cosine (what similar-products carries), each
    with per-view cosines and whether it is a duplicate (same supplier, score >= threshold)."""
    got = index.get(listing_id)
    if got is None:
        return None
    vector, payload, views = got
    assert views is not None
    wanted = max(k, DUPLICATE_CANDIDATES) if duplicates_only else k
    hits = index.search(vector[None, :], wanted, exclude=[listing_id])[0]
    results = []
    for hit in hits:
        other = index.get(hit.listing_id)
        if other is None:
            continue
        _, other_payload, other_views = other
        assert other_views is not None
        score = float(hit.score)
        duplicate = other_payload.get("supplier_id") == payload.get("supplier_id") and score >= threshold
        if duplicates_only and not duplicate:
            continue
        both_images = bool(payload.get("has_image")) and bool(other_payload.get("has_image"))
        scores = {
            "image": round(float(views[0] @ other_views[0]), 6) if both_images else None,
            "text": round(float(views[1] @ other_views[1]), 6),
            "image_text": round(float(views[2] @ other_views[2]), 6),
        }
        results.append({**listing_json(hit.listing_id, other_payload), "score": round(score, 6), "scores": scores,
                        "duplicate": duplicate})
        if len(results) >= k:
            break
    return listing_json(listing_id, payload), results


# ------------------------------------------------------------------------------------- routes


class SearchBackend(Protocol):
    """What the search API needs of a worker: the served index and the model that made it."""

    @property
    def index(self) -> "LiveIndex | None":
        """The index being served (None until it is loaded): a LiveIndex or a view of the active collection."""

    @property
    def serving_version(self) -> str | None:
        """The model version of :attr:`index`."""

    async def encoder_for(self, version: str) -> "Encoder":
        """The encoder of ``version`` (loaded off the event loop on first use)."""

    async def run_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run model work on the worker's model thread."""

    def lag_by_consumer(self) -> Mapping[str, int]:
        """Total consumer lag per consumer (``group``, ``replica``)."""


def search_routes(settings: Settings, backend: SearchBackend, health: Callable[[], Mapping[str, Any]], *,
                  max_image_bytes: int | None = None, fetcher: ImageFetcher | None = None) -> RouteRegistrar:
    """The search API and page of one worker. ``max_image_bytes`` (default: the listings' limit,
    ``settings.max_image_bytes``) caps an uploaded query image. Thumbnails read a listing's
    ``image_uri`` through the embed path's guards: a local path only under
    ``SAMESTYLE_IMAGE_BASE_DIR``, a URL with ``fetcher`` (the worker's, with its SSRF guard and
    limits; without one, remote thumbnails are refused)."""
    image_limit = max_image_bytes or settings.max_image_bytes
    loop_executor = None  # the default executor, for index searches (LiveIndex serialises them)

    def index_or_503() -> "LiveIndex":
        index = backend.index
        if index is None:
            raise ApiError(503, "the index is not loaded yet")
        return index

    async def encoder(index: "LiveIndex") -> "Encoder":
        # The encoder of the model whose index is searched (a switch can happen in between; the
        # first use loads the model, seconds: on the model thread, never on the loop).
        version = backend.serving_version
        if version is None or backend.index is not index:
            raise ApiError(503, "the served model is switching; retry")
        return await backend.encoder_for(version)

    def model_version() -> str | None:
        return backend.serving_version

    async def search(request: web.Request) -> web.Response:
        started = time.perf_counter()
        query, k = await parse_search(request, image_limit)
        index = index_or_503()
        enc = await encoder(index)
        try:
            [embedded] = await backend.run_model(embed_queries, enc, [query])
        except BadInputError as exc:
            raise ApiError(400, f"cannot use this query: {exc}") from None
        loop = asyncio.get_running_loop()
        results = await loop.run_in_executor(loop_executor, search_index, index, embedded, k)
        size = await loop.run_in_executor(loop_executor, len, index)
        return web.json_response({
            "query": {"mode": embedded.mode, "text": query.text, "has_image": query.image is not None, "k": k,
                      "searched_view": {"text": "T", "image": "I", "image_text": "IT"}[embedded.mode],
                      "against_view": "IT"},
            "model_version": enc.version,
            "index_size": size,
            "took_ms": round(1000 * (time.perf_counter() - started), 2),
            "results": results,
        })

    async def payload_of(listing_id: str) -> dict[str, Any] | None:
        index = index_or_503()
        return await asyncio.get_running_loop().run_in_executor(loop_executor, index.payload, listing_id)

    async def get_listing(request: web.Request) -> web.Response:
        listing_id = request.match_info["listing_id"]
        payload = await payload_of(listing_id)
        if payload is None:
            raise ApiError(404, f"no listing {listing_id!r} in the index")
        return web.json_response({**listing_json(listing_id, payload), "model_version": model_version()})

    async def neighbours(request: web.Request, duplicates_only: bool) -> web.Response:
        listing_id = request.match_info["listing_id"]
        k = _parse_k(request.query.get("k"))
        index = index_or_503()
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(loop_executor, similar_to, index, listing_id, k,
                                           settings.effective_cosine_threshold, duplicates_only)
        if found is None:
            raise ApiError(404, f"no listing {listing_id!r} in the index")
        listing, results = found
        return web.json_response({"listing": listing, "model_version": model_version(), "k": k,
                                  "duplicate_threshold": settings.effective_cosine_threshold, "results": results})

    async def thumbnail(request: web.Request) -> web.Response:
        listing_id = request.match_info["listing_id"]
        payload = await payload_of(listing_id)
        if payload is None:
            raise ApiError(404, f"no listing {listing_id!r} in the index")
        uri = payload.get("image_uri")
        if not uri:
            raise ApiError(404, f"listing {listing_id!r} has no image the server can read")
        loop = asyncio.get_running_loop()
        try:
            if is_remote(uri):
                if fetcher is None:
                    raise ImageError("remote images are not fetched by this server")
                raw = await fetcher.fetch(uri)
            else:
                raw = await loop.run_in_executor(loop_executor, read_local_image, uri, settings.image_base_dir,
                                                 settings.max_image_bytes)
            data = await loop.run_in_executor(loop_executor, render_thumbnail, raw, settings)
        except BadInputError as exc:
            raise ApiError(404, f"listing {listing_id!r}: {exc}") from None
        # private: behind the API token, shared caches must not keep it.
        return web.Response(body=data, content_type="image/jpeg",
                            headers={"Cache-Control": "private, max-age=300"})

    async def similar(request: web.Request) -> web.Response:
        return await neighbours(request, duplicates_only=False)

    async def duplicates(request: web.Request) -> web.Response:
        return await neighbours(request, duplicates_only=True)

    async def stats(request: web.Request) -> web.Response:
        lag = dict(backend.lag_by_consumer())
        status = health()
        return web.json_response({
            "worker_id": settings.worker_id,
            "ok": status["ok"],
            "index_size": status["index_vectors"],
            "model_version": status["model_version"],
            "replica": status["replica"],
            "lag": lag,
            "duplicate_threshold": settings.effective_cosine_threshold,
        })

    async def openapi(request: web.Request) -> web.Response:
        return web.json_response(openapi_spec(image_limit))

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(STATIC_DIR / "index.html")

    def register(app: web.Application) -> None:
        app.middlewares.append(json_errors)
        app.router.add_post("/search", search)
        app.router.add_get("/listings/{listing_id}", get_listing)
        app.router.add_get("/listings/{listing_id}/similar", similar)
        app.router.add_get("/listings/{listing_id}/duplicates", duplicates)
        app.router.add_get("/listings/{listing_id}/thumbnail", thumbnail)
        app.router.add_get("/stats", stats)
        app.router.add_get("/openapi.json", openapi)
        app.router.add_get("/", page)
        app.router.add_static("/static/", STATIC_DIR, follow_symlinks=False)

    return register


# ------------------------------------------------------------------------------------ OpenAPI


def openapi_spec(max_image_bytes: int) -> dict[str, Any]:
    """The API's OpenAPI 3.0 description."""
    nullable_number = {"type": "number", "nullable": True}
    scores = {"type": "object", "description": "Cosine of the query's (or listing's) view with the result's same "
                                               "view; null where either side lacks it.",
              "properties": {v: nullable_number for v in _VIEW_ORDER}}
    listing = {"type": "object", "properties": {
        "listing_id": {"type": "string"}, "title": {"type": "string", "nullable": True},
        "supplier_id": {"type": "string"}, "category": {"type": "string", "nullable": True},
        "has_image": {"type": "boolean"},
        "thumbnail": {"type": "string", "nullable": True,
                      "description": "URL of a JPEG thumbnail, if the server can read the listing's image"},
        "event_time": {"type": "integer", "description": "ms since epoch"}}}
    result = {"allOf": [{"$ref": "#/components/schemas/Listing"}, {"type": "object", "properties": {
        "score": {"type": "number", "description": "The ranking score: inner product with the listing's IT vector"},
        "scores": {"$ref": "#/components/schemas/ViewScores"},
        "duplicate": {"type": "boolean", "description": "similar/duplicates only: same supplier and score >= "
                                                         "the duplicate threshold"}}}]}
    error = {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}},
             "required": ["error", "status"]}

    def err(description: str) -> dict[str, Any]:
        return {"description": description,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}

    k_param = {"name": "k", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": MAX_K,
                                                      "default": DEFAULT_K}}
    id_param = {"name": "listing_id", "in": "path", "required": True, "schema": {"type": "string"}}
    neighbours = {"type": "object", "properties": {
        "listing": {"$ref": "#/components/schemas/Listing"}, "model_version": {"type": "string"},
        "k": {"type": "integer"}, "duplicate_threshold": {"type": "number"},
        "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}}}}
    search_fields = {
        "text": {"type": "string", "description": "A text query (alone), or the modifier when sent with an image"},
        "modifier": {"type": "string", "description": "How results should differ from the image "
                                                      "(\"the same, but red\"); needs image"},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K, "default": DEFAULT_K},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "samestyle search", "version": "1",
                 "description": "Search the worker's live index by text (T view), image (I view) or image + "
                                "modifier text (IT view); every query is matched against the listings' IT vectors."},
        "paths": {
            "/search": {"post": {
                "summary": "Search by text, image, or image + modifier",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"type": "object", "properties": {
                        **search_fields, "image": {"type": "string", "format": "byte",
                                                   "description": f"base64 image (or data: URL), at most "
                                                                  f"{max_image_bytes} bytes decoded"}}}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        **search_fields, "image": {"type": "string", "format": "binary"}}}}}},
                "responses": {
                    "200": {"description": "Results, best first", "content": {"application/json": {"schema": {
                        "type": "object", "properties": {
                            "query": {"type": "object"}, "model_version": {"type": "string"},
                            "index_size": {"type": "integer"}, "took_ms": {"type": "number"},
                            "results": {"type": "array", "items": {"$ref": "#/components/schemas/Result"}}}}}}},
                    "400": err("No query, a broken image, bad fields or k out of range"),
                    "413": err("Image or body over the limit"),
                    "503": err("The index is not loaded yet")}}},
            "/listings/{listing_id}": {"get": {
                "summary": "One indexed listing", "parameters": [id_param],
                "responses": {"200": {"description": "The listing", "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/Listing"}}}},
                    "404": err("Not in the index")}}},
            "/listings/{listing_id}/similar": {"get": {
                "summary": "Nearest neighbours by image+text cosine", "parameters": [id_param, k_param],
                "responses": {"200": {"description": "Neighbours", "content": {"application/json": {
                    "schema": neighbours}}},
                    "400": err("k out of range"), "404": err("Not in the index")}}},
            "/listings/{listing_id}/duplicates": {"get": {
                "summary": "Same-supplier neighbours at or above the duplicate threshold",
                "parameters": [id_param, k_param],
                "responses": {"200": {"description": "Duplicates", "content": {"application/json": {
                    "schema": neighbours}}},
                    "400": err("k out of range"), "404": err("Not in the index")}}},
            "/listings/{listing_id}/thumbnail": {"get": {
                "summary": "A JPEG thumbnail of the listing's image (decoded and re-encoded, never the raw file)",
                "parameters": [id_param],
                "responses": {"200": {"description": "JPEG", "content": {"image/jpeg": {}}},
                              "404": err("Not in the index, or no readable image")}}},
            "/moderation/alerts": {"get": {
                "summary": "The newest duplicate alerts held by this worker, newest first, with both listings "
                           "and the latest moderation decision on each pair",
                "parameters": [
                    {"name": "supplier", "in": "query", "schema": {"type": "string"}},
                    {"name": "min_score", "in": "query", "schema": {"type": "number", "minimum": -1, "maximum": 1}},
                    {"name": "min_probability", "in": "query",
                     "schema": {"type": "number", "minimum": 0, "maximum": 1}},
                    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500,
                                                                "default": 100}}],
                "responses": {"200": {"description": "Alerts"}, "400": err("A bad filter")}}},
            "/moderation/decisions": {"post": {
                "summary": "Confirm or reject an alert: written to moderation-decisions",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {
                    "type": "object", "required": ["listing_id", "duplicate_of", "decision", "moderator_id"],
                    "properties": {"listing_id": {"type": "string"}, "duplicate_of": {"type": "string"},
                                   "decision": {"type": "string", "enum": ["confirmed", "rejected"]},
                                   "moderator_id": {"type": "string", "maxLength": 128}}}}}},
                "responses": {"201": {"description": "The decision as written"},
                              "400": err("Bad fields, or the pair is not a held alert")}}},
            "/stats": {"get": {"summary": "Index size, consumer lag per consumer, model version",
                               "responses": {"200": {"description": "Counters"}}}},
            "/health": {"get": {"summary": "Worker health", "security": [], "responses": {
                "200": {"description": "Healthy"}, "503": {"description": "Not healthy"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "security": [],
                                 "responses": {"200": {"description": "Text format"}}}},
        },
        # Required when the worker runs with SAMESTYLE_API_TOKEN (every route but /health, /metrics).
        "security": [{"bearer": []}],
        "components": {"schemas": {"Listing": listing, "ViewScores": scores, "Result": result, "Error": error},
                       "securitySchemes": {"bearer": {
                           "type": "http", "scheme": "bearer",
                           "description": "SAMESTYLE_API_TOKEN, when the worker has one (else the API is open); a "
                                          "missing or wrong token is a 401 with WWW-Authenticate: Bearer"}}},
    }


__all__ = ["search_routes", "openapi_spec", "search_index", "similar_to", "parse_search", "listing_json", "json_errors",
           "ApiError", "STATIC_DIR"]
