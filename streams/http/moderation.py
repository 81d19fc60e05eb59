"""The moderation view of the page: recent duplicate alerts, and moderators' decisions on them.

:class:`AlertBuffer` holds the newest alerts and the decisions read back (pure, no I/O; the worker's
:class:`~samestyle.streams.worker.alerts.AlertFeed` fills it from ``duplicate-alerts`` and
``moderation-decisions``). :func:`moderation_routes` serves

* ``GET /moderation/alerts?supplier=&min_score=&min_probability=&limit=``: buffered alerts, newest
  first, each with both listings as the index knows them and the latest decision on the pair;
* ``POST /moderation/decisions`` with JSON ``{listing_id, duplicate_of, decision, moderator_id}``:
  validated (the pair must be a buffered alert, ``decision`` ``confirmed`` or ``rejected``), then
  written to ``moderation-decisions`` and acknowledged by the broker before the 201 answer.

Client mistakes are JSON 400s, like the rest of the API (:func:`~samestyle.streams.http.search.json_errors`).
"""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from samestyle.streams.http.search import ApiError, listing_json
from samestyle.streams.http.server import RouteRegistrar
from samestyle.topics import MODERATION_DECISIONS, codec_for_topic
from samestyle.topics.errors import BadInputError

DECISIONS = ("confirmed", "rejected")
DEFAULT_LIMIT = 100
MAX_LIMIT = 500
MAX_MODERATOR_ID = 128
_DECISION_FIELDS = {"listing_id", "duplicate_of", "decision", "moderator_id"}
_ALERT_PARAMS = {"supplier", "min_score", "min_probability", "limit"}

#: (listing_id, duplicate_of): the alert's pair, newer listing first.
Pair = tuple[str, str]


class AlertBuffer:
    """The newest ``capacity`` alerts, one per pair (a re-sent alert replaces its earlier copy), and
    the latest decision on each pair (bounded the same way)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._alerts: OrderedDict[Pair, dict[str, Any]] = OrderedDict()
        self._decisions: OrderedDict[Pair, dict[str, Any]] = OrderedDict()
        #: Set once the log read at start-up is in (the page says "loading" until then).
        self.ready = False

    def __len__(self) -> int:
        return len(self._alerts)

    @staticmethod
    def _put(store: OrderedDict[Pair, dict[str, Any]], pair: Pair, record: dict[str, Any], capacity: int) -> None:
        store.pop(pair, None)
        store[pair] = record
        while len(store) > capacity:
            store.popitem(last=False)

    def add_alert(self, alert: Mapping[str, Any]) -> None:
        self._put(self._alerts, (alert["listing_id"], alert["duplicate_of"]), dict(alert), self.capacity)

    def add_decision(self, decision: Mapping[str, Any]) -> None:
        self._put(self._decisions, (decision["listing_id"], decision["duplicate_of"]), dict(decision),
                  self.capacity)

    def alert(self, listing_id: str, duplicate_of: str) -> dict[str, Any] | None:
        return self._alerts.get((listing_id, duplicate_of))

    def decision(self, listing_id: str, duplicate_of: str) -> dict[str, Any] | None:
        return self._decisions.get((listing_id, duplicate_of))

    def recent(self, supplier: str | None = None, min_score: float | None = None,
               min_probability: float | None = None, limit: int = DEFAULT_LIMIT) -> list[dict[str, Any]]:
        """Alerts newest first (by emission time); ``min_probability`` drops alerts without one."""
        kept = [a for a in self._alerts.values()
                if (supplier is None or a["supplier_id"] == supplier)
                and (min_score is None or a["score"] >= min_score)
                and (min_probability is None or (a.get("probability") is not None
                                                 and a["probability"] >= min_probability))]
        kept.sort(key=lambda a: (a["emitted_at"], a["event_time"]), reverse=True)
        return kept[:limit]


# ------------------------------------------------------------------------------ request parsing


def _number(query: Mapping[str, str], name: str, low: float, high: float) -> float | None:
    raw = query.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be a number from {low:g} to {high:g}, got {raw!r}") from None
    if not low <= value <= high:  # also refuses nan
        raise ApiError(400, f"{name} must be from {low:g} to {high:g}, got {raw!r}")
    return value


def parse_alert_query(query: Mapping[str, str]) -> dict[str, Any]:
    """The filters of ``GET /moderation/alerts`` (keyword arguments of :meth:`AlertBuffer.recent`)."""
    unknown = sorted(set(query) - _ALERT_PARAMS)
    if unknown:
        raise ApiError(400, f"unknown parameters {unknown}; expected {sorted(_ALERT_PARAMS)}")
    raw_limit = query.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit not in (None, ""):
        try:
            limit = int(raw_limit)
        except ValueError:
            raise ApiError(400, f"limit must be an integer from 1 to {MAX_LIMIT}, got {raw_limit!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise ApiError(400, f"limit must be from 1 to {MAX_LIMIT}, got {limit}")
    supplier = (query.get("supplier") or "").strip() or None
    return {"supplier": supplier, "min_score": _number(query, "min_score", -1.0, 1.0),
            "min_probability": _number(query, "min_probability", 0.0, 1.0), "limit": limit}


def _id_field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value.strip():
        raise ApiError(400, f"{name} must be a non-empty string")
    return value


def parse_decision(body: Any, alerts: AlertBuffer, now_ms: int) -> dict[str, Any]:
    """A ``moderation-decisions`` record from a request body; :class:`ApiError` 400 for anything
    wrong: not an object, unknown or missing fields, a decision other than ``confirmed`` /
    ``rejected``, an empty or overlong moderator id, a pair that is not a buffered alert."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    unknown = sorted(set(body) - _DECISION_FIELDS)
    if unknown:
        raise ApiError(400, f"unknown fields {unknown}; expected {sorted(_DECISION_FIELDS)}")
    listing_id, duplicate_of = _id_field(body, "listing_id"), _id_field(body, "duplicate_of")
    decision = body.get("decision")
    if decision not in DECISIONS:
        raise ApiError(400, f"decision must be one of {list(DECISIONS)}, got {decision!r}")
    moderator = body.get("moderator_id")
    if not isinstance(moderator, str) or not moderator.strip():
        raise ApiError(400, "moderator_id must be a non-empty string (who decides)")
    moderator = moderator.strip()
    if len(moderator) > MAX_MODERATOR_ID or not moderator.isprintable():
        raise ApiError(400, f"moderator_id must be at most {MAX_MODERATOR_ID} printable characters")
    alert = alerts.alert(listing_id, duplicate_of)
    if alert is None:
        raise ApiError(400, f"no alert says {listing_id!r} duplicates {duplicate_of!r} among the "
                            f"{len(alerts)} most recent alerts")
    return {"listing_id": listing_id, "duplicate_of": duplicate_of, "decision": decision,
            "moderator_id": moderator, "decided_at": now_ms, "model_version": alert.get("model_version"),
            "probability": alert.get("probability")}


# ------------------------------------------------------------------------------------ responses


def _round(x: float | None) -> float | None:
    # Avro floats are float32: 0.9 comes back as 0.8999999761581421.
    return None if x is None else round(float(x), 6)


def alert_json(alert: Mapping[str, Any], listing: Callable[[str], dict[str, Any] | None],
               decision: Mapping[str, Any] | None) -> dict[str, Any]:
    """One alert for the page: its fields, both listings (None when no longer indexed), the decision."""
    scores = alert.get("scores") or {}
    return {
        "listing_id": alert["listing_id"], "duplicate_of": alert["duplicate_of"],
        "supplier_id": alert["supplier_id"], "score": _round(alert["score"]),
        "scores": {view: _round(scores.get(view)) for view in ("image", "text", "image_text")},
        "probability": _round(alert.get("probability")), "threshold": _round(alert.get("threshold")),
        "decided_by": alert.get("decided_by"), "model_version": alert.get("model_version"),
        "reason": alert.get("reason"), "event_time": alert["event_time"], "emitted_at": alert["emitted_at"],
        "listing": listing(alert["listing_id"]), "original": listing(alert["duplicate_of"]),
        "decision": dict(decision) if decision is not None else None,
    }


# ------------------------------------------------------------------------------------- routes


def moderation_routes(alerts: AlertBuffer, payload_of: Callable[[str], Mapping[str, Any] | None],
                      send: Callable[[bytes, bytes], Awaitable[None]],
                      clock: Callable[[], float] = time.time) -> RouteRegistrar:
    """The moderation API. ``payload_of(listing_id)``: the listing's index payload (None when not
    indexed); ``send(key, value)``: write one encoded record to ``moderation-decisions`` and wait for
    the broker's acknowledgement. Register after the search routes (their JSON error middleware)."""
    codec = codec_for_topic(MODERATION_DECISIONS)

    def listing(listing_id: str) -> dict[str, Any] | None:
        payload = payload_of(listing_id)
        return None if payload is None else listing_json(listing_id, payload)

    async def list_alerts(request: web.Request) -> web.Response:
        filters = parse_alert_query(request.query)
        found = alerts.recent(**filters)
        return web.json_response({
            "alerts": [alert_json(a, listing, alerts.decision(a["listing_id"], a["duplicate_of"])) for a in found],
            "buffered": len(alerts), "capacity": alerts.capacity, "ready": alerts.ready,
            "filters": filters,
        })

    async def decide(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = json.loads(raw or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not valid JSON: {exc}") from None
        record = parse_decision(body, alerts, int(clock() * 1000))
        try:
            value = codec.encode(record)
        except BadInputError as exc:  # validated above; a mismatch here is a bug, said plainly
            raise ApiError(400, f"the decision does not fit the schema: {exc}") from None
        await send(record["listing_id"].encode(), value)
        alerts.add_decision(record)
        return web.json_response({"decision": record}, status=201)

    def register(app: web.Application) -> None:
        app.router.add_get("/moderation/alerts", list_alerts)
        app.router.add_post("/moderation/decisions", decide)

    return register


__all__ = ["DECISIONS", "AlertBuffer", "alert_json", "moderation_routes", "parse_alert_query", "parse_decision"]
