"""The moderation API without a broker: the alert buffer, the filters, and every bad decision
request answered 400 with a JSON error (aiohttp's test client, the routes as the worker wires them)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from samestyle.streams.http.auth import token_auth
from samestyle.streams.http.moderation import AlertBuffer, moderation_routes
from samestyle.streams.http.search import json_errors
from samestyle.topics import MODERATION_DECISIONS, codec_for_topic

T0 = 1_764_590_000_000
TOKEN = "moderation-token-0123456789"


def alert(listing_id: str, duplicate_of: str, *, supplier: str = "s1", score: float = 0.9,
          probability: float | None = 0.75, emitted_at: int = T0) -> dict[str, Any]:
    return {"listing_id": listing_id, "duplicate_of": duplicate_of, "supplier_id": supplier, "score": score,
            "scores": {"image": None, "text": score, "image_text": score}, "model_version": "tiny-v1",
            "probability": probability, "threshold": 0.5, "decided_by": "classifier", "reason": "r",
            "event_time": emitted_at - 5, "emitted_at": emitted_at}


def filled() -> AlertBuffer:
    buffer = AlertBuffer(capacity=10)
    buffer.add_alert(alert("A2", "A1", emitted_at=T0))
    buffer.add_alert(alert("B2", "B1", supplier="s2", score=0.85, probability=None, emitted_at=T0 + 20))
    buffer.add_alert(alert("C2", "C1", score=0.97, probability=0.95, emitted_at=T0 + 10))
    return buffer


PAYLOADS = {"A1": {"title": "red mug", "supplier_id": "s1", "image_uri": "/img/a1.png", "has_image": True},
            "A2": {"title": "red mug!", "supplier_id": "s1", "has_image": False}}


def run(buffer: AlertBuffer, check: Callable[[TestClient, list[tuple[bytes, bytes]]], Awaitable[None]],
        token: str | None = None) -> None:
    sent: list[tuple[bytes, bytes]] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append((key, value))

    app = web.Application()
    token_auth(token)(app)
    app.middlewares.append(json_errors)
    moderation_routes(buffer, PAYLOADS.get, send, clock=lambda: T0 / 1000 + 60)(app)

    async def main() -> None:
        async with TestClient(TestServer(app)) as client:
            await check(client, sent)

    asyncio.run(main())


# --- the buffer ---------------------------------------------------------------------------------


def test_buffer_keeps_the_newest_per_pair_and_orders_newest_first() -> None:
    buffer = AlertBuffer(capacity=2)
    buffer.add_alert(alert("A2", "A1", emitted_at=T0))
    buffer.add_alert(alert("B2", "B1", emitted_at=T0 + 1))
    buffer.add_alert(alert("A2", "A1", score=0.95, emitted_at=T0 + 2))  # a re-sent alert replaces its copy
    assert [a["listing_id"] for a in buffer.recent()] == ["A2", "B2"]
    assert buffer.alert("A2", "A1")["score"] == 0.95
    buffer.add_alert(alert("C2", "C1", emitted_at=T0 + 3))  # over capacity: the oldest held drops out
    assert len(buffer) == 2 and buffer.alert("B2", "B1") is None
    with pytest.raises(ValueError):
        AlertBuffer(0)


def test_buffer_filters() -> None:
    buffer = filled()
    assert [a["listing_id"] for a in buffer.recent()] == ["B2", "C2", "A2"]
    assert [a["listing_id"] for a in buffer.recent(supplier="s1")] == ["C2", "A2"]
    assert [a["listing_id"] for a in buffer.recent(min_score=0.9)] == ["C2", "A2"]
    # An alert without a probability (cosine rule) never passes a probability filter.
    assert [a["listing_id"] for a in buffer.recent(min_probability=0.7)] == ["C2", "A2"]
    assert [a["listing_id"] for a in buffer.recent(min_probability=0.9, limit=1)] == ["C2"]


# --- GET /moderation/alerts ---------------------------------------------------------------------


def test_alerts_route_shows_both_listings_filters_and_decisions() -> None:
    buffer = filled()
    buffer.add_decision({"listing_id": "C2", "duplicate_of": "C1", "decision": "rejected", "moderator_id": "m",
                         "decided_at": T0, "model_version": "tiny-v1", "probability": 0.95})

    async def check(client: TestClient, sent: list[Any]) -> None:
        r = await client.get("/moderation/alerts")
        assert r.status == 200
        body = await r.json()
        assert [a["listing_id"] for a in body["alerts"]] == ["B2", "C2", "A2"]
        assert body["buffered"] == 3 and body["capacity"] == 10 and body["ready"] is False
        a2 = body["alerts"][2]
        assert a2["listing"]["title"] == "red mug!" and a2["listing"]["thumbnail"] is None
        assert a2["original"]["thumbnail"] == "/listings/A1/thumbnail"
        assert a2["probability"] == 0.75 and a2["model_version"] == "tiny-v1" and a2["decision"] is None
        assert body["alerts"][1]["decision"]["decision"] == "rejected"
        assert body["alerts"][0]["listing"] is None  # not in the index (any more)
        r = await client.get("/moderation/alerts", params={"supplier": "s1", "min_probability": "0.9"})
        assert [a["listing_id"] for a in (await r.json())["alerts"]] == ["C2"]

    run(buffer, check)


@pytest.mark.parametrize(("params", "match"), [
    ({"min_score": "high"}, "min_score must be a number"),
    ({"min_score": "1.5"}, "min_score must be from -1 to 1"),
    ({"min_score": "nan"}, "min_score must be from"),
    ({"min_probability": "-0.1"}, "min_probability must be from 0 to 1"),
    ({"limit": "0"}, "limit must be from 1"),
    ({"limit": "ten"}, "limit must be an integer"),
    ({"supplier_id": "s1"}, "unknown parameters"),
])
def test_alerts_route_rejects_bad_filters(params: dict[str, str], match: str) -> None:
    async def check(client: TestClient, sent: list[Any]) -> None:
        r = await client.get("/moderation/alerts", params=params)
        assert r.status == 400
        body = await r.json()
        assert body["status"] == 400 and match in body["error"]

    run(filled(), check)


# --- POST /moderation/decisions -----------------------------------------------------------------


def test_a_decision_is_encoded_sent_and_shown() -> None:
    buffer = filled()

    async def check(client: TestClient, sent: list[tuple[bytes, bytes]]) -> None:
        r = await client.post("/moderation/decisions", json={
            "listing_id": "C2", "duplicate_of": "C1", "decision": "confirmed", "moderator_id": "  ana  "})
        assert r.status == 201, await r.text()
        record = (await r.json())["decision"]
        [(key, value)] = sent
        assert key == b"C2"
        decoded = codec_for_topic(MODERATION_DECISIONS).decode(value)
        expected = {"listing_id": "C2", "duplicate_of": "C1", "decision": "confirmed", "moderator_id": "ana",
                    "decided_at": T0 + 60_000, "model_version": "tiny-v1", "probability": pytest.approx(0.95)}
        assert decoded == expected and record == expected  # the alert's model version and probability
        shown = (await (await client.get("/moderation/alerts")).json())["alerts"]
        assert shown[1]["decision"]["moderator_id"] == "ana"

    run(buffer, check)


GOOD = {"listing_id": "A2", "duplicate_of": "A1", "decision": "rejected", "moderator_id": "ana"}


@pytest.mark.parametrize(("body", "match"), [
    (b"not json", "not valid JSON"),
    (b"", "must be a JSON object"),
    (b"[1, 2]", "must be a JSON object"),
    ({**GOOD, "decision": "maybe"}, "decision must be one of ['confirmed', 'rejected']"),
    ({**GOOD, "decision": "CONFIRMED"}, "decision must be one of"),
    ({**GOOD, "decision": None}, "decision must be one of"),
    ({k: v for k, v in GOOD.items() if k != "decision"}, "decision must be one of"),
    ({**GOOD, "moderator_id": ""}, "moderator_id must be a non-empty string"),
    ({**GOOD, "moderator_id": "   "}, "moderator_id must be a non-empty string"),
    ({**GOOD, "moderator_id": 7}, "moderator_id must be a non-empty string"),
    ({k: v for k, v in GOOD.items() if k != "moderator_id"}, "moderator_id must be a non-empty string"),
    ({**GOOD, "moderator_id": "x" * 129}, "at most 128 printable"),
    ({**GOOD, "moderator_id": "ana\nroot"}, "at most 128 printable"),
    ({**GOOD, "listing_id": 12}, "listing_id must be a non-empty string"),
    ({**GOOD, "duplicate_of": ""}, "duplicate_of must be a non-empty string"),
    ({**GOOD, "listing_id": "Z9"}, "no alert says 'Z9' duplicates 'A1'"),
    ({**GOOD, "listing_id": "A1", "duplicate_of": "A2"}, "no alert says 'A1' duplicates 'A2'"),  # reversed pair
    ({**GOOD, "score": 1.0}, "unknown fields ['score']"),
])
def test_bad_decisions_are_400_and_send_nothing(body: Any, match: str) -> None:
    async def check(client: TestClient, sent: list[Any]) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post("/moderation/decisions", data=data, headers={"Content-Type": "application/json"})
        assert r.status == 400
        answer = await r.json()
        assert answer["status"] == 400 and match in answer["error"], answer
        assert sent == []

    run(filled(), check)


def test_wrong_method_is_a_json_405() -> None:
    async def check(client: TestClient, sent: list[Any]) -> None:
        r = await client.get("/moderation/decisions")
        assert r.status == 405 and (await r.json())["status"] == 405

    run(filled(), check)


def test_moderation_routes_sit_behind_the_token() -> None:
    async def check(client: TestClient, sent: list[Any]) -> None:
        assert (await client.get("/moderation/alerts")).status == 401
        r = await client.post("/moderation/decisions", json=GOOD)
        assert r.status == 401 and (await r.json())["status"] == 401
        assert sent == []
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/moderation/alerts", headers=auth)).status == 200
        assert (await client.post("/moderation/decisions", json=GOOD, headers=auth)).status == 201
        assert len(sent) == 1

    run(filled(), check, token=TOKEN)


def test_the_feed_folds_alerts_and_decisions_and_skips_what_does_not_decode(tmp_path: Any) -> None:
    from samestyle.streams.io.reader import LogRecord
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.alerts import AlertFeed
    from samestyle.topics import DUPLICATE_ALERTS, topic_specs

    specs = topic_specs("t-")
    buffer = AlertBuffer(capacity=5)
    feed = AlertFeed(Settings(state_dir=tmp_path), specs, buffer)
    alerts, decisions = specs[DUPLICATE_ALERTS].name, specs[MODERATION_DECISIONS].name
    decision = {"listing_id": "A2", "duplicate_of": "A1", "decision": "confirmed", "moderator_id": "ana",
                "decided_at": T0, "model_version": None, "probability": None}
    for offset, (topic, value) in enumerate([
            (alerts, codec_for_topic(DUPLICATE_ALERTS).encode(alert("A2", "A1"))),
            (alerts, b"not an alert"), (alerts, None),
            (decisions, codec_for_topic(DUPLICATE_ALERTS).encode(alert("B2", "B1"))),  # another schema
            (decisions, codec_for_topic(MODERATION_DECISIONS).encode(decision))]):
        feed.fold(LogRecord(topic, 0, offset, b"A2", value, T0))
    assert len(buffer) == 1 and buffer.alert("A2", "A1")["supplier_id"] == "s1"
    assert buffer.decision("A2", "A1") == decision and buffer.decision("B2", "B1") is None
