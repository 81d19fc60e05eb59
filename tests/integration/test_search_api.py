"""The search API of a real worker (tiny random-weight encoder) over a small indexed sample."""

from __future__ import annotations

import base64
import json
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from samestyle.models.data import read_listings
from samestyle.streams.dev.broker import EmbeddedBroker, create_topics
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.io.producer import listing_message
from samestyle.streams.settings import Settings
from samestyle.topics import topic_specs
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

#: Query images are capped at this many bytes in these tests (settings.max_image_bytes).
IMAGE_LIMIT = 2_000_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Served:
    """A worker with its web server up and a sample catalogue indexed."""

    base: str
    messages: list[dict[str, Any]]
    stack: Stack

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(self.base + path, data=body, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as err:
            status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
            err.close()
        return status, json.loads(raw) if "json" in ctype else raw

    def post_json(self, payload: dict[str, Any]) -> tuple[int, Any]:
        return self.request("POST", "/search", json.dumps(payload).encode(), {"Content-Type": "application/json"})

    def image(self, k: int = 0) -> bytes:
        return [m for m in self.messages if m["image_bytes"]][k]["image_bytes"]


def serve_sample(broker: EmbeddedBroker, tmp: Path, n_products: int = 10, **overrides: Any) -> Iterator[Served]:
    """Start a worker on a free web port, index a generated sample, yield it (stopped after).
    ``overrides`` change the worker's settings (an API token, ...)."""
    run = uuid.uuid4().hex[:8]
    port = free_port()
    (tmp / "images").mkdir()
    settings = Settings(bootstrap=broker.bootstrap, topic_prefix=f"t{run}-", app_id=f"samestyle-test-{run}",
                        encoder="tiny", allow_random_weights=True, state_dir=tmp / "state",
                        snapshot_interval_seconds=5.0, batch_linger_seconds=0.05, web_port=port,
                        max_image_bytes=IMAGE_LIMIT, image_base_dir=tmp / "images", **overrides)
    specs = topic_specs(settings.topic_prefix)
    create_topics(broker.bootstrap, topic_specs(settings.topic_prefix, app_id=settings.app_id).values())
    stack = Stack(settings, specs, tmp)
    listings_csv, _ = generate_sample(tmp / "sample", n_products=n_products, seed=3)
    messages = [listing_message(r, image_mode="bytes") for r in read_listings(listings_csv)]
    ids = {m["listing_id"] for m in messages}
    try:
        stack.start_worker()
        stack.produce(messages)
        stack.collect(lambda o: ids <= o.indexed_ids)
        yield Served(f"http://127.0.0.1:{port}", messages, stack)
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def served(broker: EmbeddedBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    yield from serve_sample(broker, tmp_path_factory.mktemp("search-api"))


def assert_results(body: dict[str, Any], k: int, mode: str) -> None:
    assert body["query"]["mode"] == mode
    assert body["model_version"] == "tiny-random-concat-v1"
    results = body["results"]
    assert len(results) == k
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    for r in results:
        assert r["listing_id"] and r["title"] and r["supplier_id"]
        assert set(r["scores"]) == {"image", "text", "image_text"}


def test_text_search_returns_listings_with_text_scores(served: Served) -> None:
    title = served.messages[0]["title"]
    status, body = served.post_json({"text": title, "k": 5})
    assert status == 200, body
    assert_results(body, 5, "text")
    assert body["query"]["searched_view"] == "T"
    assert body["index_size"] == len(served.messages)
    top = body["results"][0]
    assert top["scores"]["text"] is not None and top["scores"]["image"] is None
    # The exact title finds its own listing first, random weights or not (same text, same tokens).
    assert top["title"] == title


def test_image_search_by_base64_and_by_multipart_upload(served: Served) -> None:
    image = served.image(0)
    status, body = served.post_json({"image": base64.b64encode(image).decode(), "k": 3})
    assert status == 200, body
    assert_results(body, 3, "image")
    assert any(r["scores"]["image"] is not None for r in body["results"])

    boundary = "samestyle" + uuid.uuid4().hex
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    status, multipart = served.request("POST", "/search", form,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, multipart
    assert [r["listing_id"] for r in multipart["results"]] == [r["listing_id"] for r in body["results"]]


def test_image_plus_modifier_is_a_composed_query(served: Served) -> None:
    image = "data:image/png;base64," + base64.b64encode(served.image(1)).decode()
    status, body = served.post_json({"image": image, "modifier": "the same, but red", "k": 4})
    assert status == 200, body
    assert_results(body, 4, "image_text")
    assert body["query"]["searched_view"] == "IT"
    assert all(r["scores"]["image_text"] == pytest.approx(r["score"], abs=1e-4) for r in body["results"])


def test_listing_similar_and_duplicates(served: Served) -> None:
    listing = served.messages[0]
    status, body = served.request("GET", f"/listings/{listing['listing_id']}")
    assert status == 200
    assert body["title"] == listing["title"] and body["model_version"] == "tiny-random-concat-v1"

    status, similar = served.request("GET", f"/listings/{listing['listing_id']}/similar?k=4")
    assert status == 200
    assert len(similar["results"]) == 4
    assert listing["listing_id"] not in [r["listing_id"] for r in similar["results"]]

    status, dups = served.request("GET", f"/listings/{listing['listing_id']}/duplicates")
    assert status == 200
    for r in dups["results"]:
        assert r["duplicate"] and r["supplier_id"] == dups["listing"]["supplier_id"]
        assert r["score"] >= dups["duplicate_threshold"]


def test_unknown_listing_is_a_json_404(served: Served) -> None:
    for path in ("/listings/no-such-id", "/listings/no-such-id/similar", "/listings/no-such-id/duplicates"):
        status, body = served.request("GET", path)
        assert status == 404 and "no-such-id" in body["error"]


@pytest.mark.parametrize("payload, status, fragment", [
    ({}, 400, "no query"),
    ({"text": "   "}, 400, "no query"),
    ({"text": "mug", "k": 0}, 400, "k must be"),
    ({"text": "mug", "k": 101}, 400, "k must be"),
    ({"text": "mug", "k": "ten"}, 400, "k must be"),
    ({"image": "%%% not base64 %%%"}, 400, "base64"),
    ({"image": base64.b64encode(b"definitely not an image").decode()}, 400, "cannot use this query"),
    ({"modifier": "but red"}, 400, "modifier needs an image"),
    ({"text": 42}, 400, "text must be a string"),
    ({"query": "mug"}, 400, "unknown fields"),
])
def test_bad_search_requests_are_json_4xx(served: Served, payload: dict[str, Any], status: int,
                                          fragment: str) -> None:
    got, body = served.post_json(payload)
    assert (got, body["status"]) == (status, status)
    assert fragment in body["error"]


def test_broken_bodies_and_huge_uploads_are_4xx(served: Served) -> None:
    status, body = served.request("POST", "/search", b"{not json", {"Content-Type": "application/json"})
    assert status == 400 and "JSON" in body["error"]
    huge = base64.b64encode(b"\x89PNG" + b"\0" * (IMAGE_LIMIT + 1)).decode()
    status, body = served.post_json({"image": huge})
    assert status == 413 and "limit" in body["error"]
    boundary = "samestyle-huge"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n\r\n".encode()
            + b"\0" * (2 * IMAGE_LIMIT) + f"\r\n--{boundary}--\r\n".encode())
    status, body = served.request("POST", "/search", form, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413 and "limit" in body["error"]
    status, body = served.request("GET", "/search")
    assert status == 405 and body["status"] == 405


def test_stats_openapi_health_and_page(served: Served) -> None:
    status, stats = served.request("GET", "/stats")
    assert status == 200
    assert stats["index_size"] == len(served.messages)
    assert stats["model_version"] == "tiny-random-concat-v1"
    assert set(stats["lag"]) <= {"group", "replica"}
    status, spec = served.request("GET", "/openapi.json")
    assert status == 200 and spec["openapi"].startswith("3.")
    assert {"/search", "/listings/{listing_id}", "/listings/{listing_id}/similar", "/health"} <= set(spec["paths"])
    status, health = served.request("GET", "/health")
    assert status == 200 and health["ok"]
    status, page = served.request("GET", "/")
    assert status == 200 and b"search-form" in page
    status, script = served.request("GET", "/static/app.js")
    assert status == 200 and b"/search" in script
    status, _ = served.request("GET", "/static/../search_api.py")
    assert status in (403, 404)


def test_thumbnails_are_re_encoded_images_never_raw_files(served: Served, tmp_path: Path) -> None:
    import io

    from PIL import Image

    assert served.stack.settings.image_base_dir is not None
    picture = served.stack.settings.image_base_dir / "lamp.png"
    picture.write_bytes(served.image(0))
    with_uri = dict(served.messages[0], listing_id="thumb-uri", image_bytes=None, image_uri=str(picture))
    served.stack.produce([with_uri])
    served.stack.collect(lambda o: "thumb-uri" in o.indexed_ids)

    status, listing = served.request("GET", "/listings/thumb-uri")
    assert status == 200 and listing["thumbnail"] == "/listings/thumb-uri/thumbnail"
    status, jpeg = served.request("GET", listing["thumbnail"])
    assert status == 200
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and max(image.size) <= 160

    # A listing sent with inline bytes has no file to read: no thumbnail, a clear 404.
    status, body = served.request("GET", f"/listings/{served.messages[0]['listing_id']}/thumbnail")
    assert status == 404 and "no image" in body["error"]
    # The file behind an indexed image_uri becomes a link out of the base directory: not followed.
    secret = tmp_path / "secret.png"
    secret.write_bytes(served.image(1))
    picture.unlink()
    picture.symlink_to(secret)
    status, body = served.request("GET", "/listings/thumb-uri/thumbnail")
    assert status == 404 and "outside SAMESTYLE_IMAGE_BASE_DIR" in body["error"]
    # ... or changes into a secret: it is not served.
    picture.unlink()
    picture.write_text("password=hunter2")
    status, body = served.request("GET", "/listings/thumb-uri/thumbnail")
    assert status == 404 and "hunter2" not in json.dumps(body)
