"""Click events → positive pairs, as pure functions of the table state (no Kafka, no broker).

``sessionize_step`` and ``evidence_step`` fold one click into one key's state;
``sessionize_batch`` and ``evidence_batch`` fold a batch into a table (any mapping: the agents'
:class:`~samestyle.streams.pairs.store.TableStore` or a dict), one state per key however many of
the batch's clicks it got. :class:`PairMiner` runs both stages offline (the pairs report uses it,
so the report scores the agents' own logic). :class:`PairRules` are the evidence, category and
cosine constraints, from Settings.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from samestyle.streams.settings import Settings

_CATEGORY_SEPARATORS = re.compile(r"\s*(?:>|/|\|)\s*")


@functools.lru_cache(maxsize=1 << 16)  # a pair clicked once is clicked again: the agents' hot path
def pair_key(a: str, b: str) -> str:
    """The key of an unordered pair: a JSON array of the two ids, sorted (unambiguous for any id)."""
    return json.dumps(sorted((a, b)), ensure_ascii=False, separators=(",", ":"))


def category_path(category: str | None) -> tuple[str, ...] | None:
    """``"Electronics > Audio"`` / ``"electronics/audio"`` → ``("electronics", "audio")``; None if empty."""
    if not category or not category.strip():
        return None
    parts = tuple(p.casefold() for p in _CATEGORY_SEPARATORS.split(category.strip()) if p)
    return parts or None


@dataclass(frozen=True)
class Decision:
    """Whether a pair is positive now, why not, and what it is emitted with."""

    ok: bool
    reason: str
    category: str | None = None  # shared category prefix, when checked
    cosine: float | None = None  # when both listings were indexed
    #: The constraint that holds the pair (one of :data:`CONSTRAINTS`), None when it passed.
    constraint: str | None = None


#: The constraints in the order they are checked (the ``held_by`` of a pair's evidence).
CONSTRAINTS = ("co_clicks", "sessions", "category", "cosine")


_SETTING_DEFAULTS = {f.name: f.default for f in fields(Settings)}


@dataclass(frozen=True)
class PairRules:
    """The category and relevance constraints (see the module docstring)."""

    # Defaults are the settings' defaults (one place to change them: streams/settings.py).
    category_level: int = _SETTING_DEFAULTS["pairs_category_level"]
    unknown_category: str = _SETTING_DEFAULTS["pairs_unknown_category"]
    min_co_clicks: int = _SETTING_DEFAULTS["pairs_min_co_clicks"]
    min_sessions: int = _SETTING_DEFAULTS["pairs_min_sessions"]
    min_dwell_ms: int = _SETTING_DEFAULTS["pairs_min_dwell_ms"]
    min_cosine: float = _SETTING_DEFAULTS["pairs_min_cosine"]
    require_cosine: bool = _SETTING_DEFAULTS["pairs_require_cosine"]
    session_gap_ms: int = int(_SETTING_DEFAULTS["pairs_session_gap_seconds"] * 1000)

    @classmethod
    def from_settings(cls, settings: Settings) -> PairRules:
        return cls(category_level=settings.pairs_category_level,
                   unknown_category=settings.pairs_unknown_category,
                   min_co_clicks=settings.pairs_min_co_clicks, min_sessions=settings.pairs_min_sessions,
                   min_dwell_ms=settings.pairs_min_dwell_ms, min_cosine=settings.pairs_min_cosine,
                   require_cosine=settings.pairs_require_cosine,
                   session_gap_ms=int(settings.pairs_session_gap_seconds * 1000))

    def is_evidence(self, click: Mapping[str, Any]) -> bool:
        """A click counts only between two different listings and with enough dwell (no bounce)."""
        return click["trigger_id"] != click["clicked_id"] and click["dwell_ms"] >= self.min_dwell_ms

    def decide(self, evidence: Mapping[str, Any], category_a: str | None, category_b: str | None,
               cosine: float | None) -> Decision:
        """Apply every constraint to a pair's evidence; the first failing one is the reason."""
        held = self.decide_counts(evidence)
        if held is not None:
            return held
        shared: str | None = None
        if self.category_level > 0:
            path_a, path_b = category_path(category_a), category_path(category_b)
            if path_a is None or path_b is None:
                if self.unknown_category == "reject":
                    return Decision(False, "category unknown", constraint="category")
            else:
                level = self.category_level
                if path_a[:level] != path_b[:level]:
                    return Decision(False, f"categories differ at level {level}: "
                                           f"{category_a!r} vs {category_b!r}", constraint="category")
                shared = " > ".join(path_a[:min(level, len(path_a))])
        if cosine is None:
            if self.require_cosine:
                return Decision(False, "not indexed yet: cosine unknown", shared, constraint="cosine")
        elif cosine < self.min_cosine:
            return Decision(False, f"cosine {cosine:.3f} < {self.min_cosine}", shared, cosine, constraint="cosine")
        return Decision(True, "positive", shared, cosine)

    def decide_counts(self, evidence: Mapping[str, Any]) -> Decision | None:
        """The evidence constraints alone (no index lookup needed): the Decision that holds the
        pair, or None when its co-clicks and sessions suffice."""
        if evidence["co_clicks"] < self.min_co_clicks:
            return Decision(False, f"co_clicks {evidence['co_clicks']} < {self.min_co_clicks}",
                            constraint="co_clicks")
        if len(evidence["sessions"]) < self.min_sessions:
            return Decision(False, f"sessions {len(evidence['sessions'])} < {self.min_sessions}",
                            constraint="sessions")
        return None


def session_window(state: list[int] | None, event_time: int, gap_ms: int) -> tuple[list[int], int]:
    """Session state after a click, and the number of the click's session window.

    The state is ``[last event time, start of window 0, start of window 1, ...]``. A click more
    than ``gap_ms`` after the session's latest click opens the next window. Any other click lands
    in the window whose start precedes it, so a click replayed after a crash gets the window it
    got the first time even when later clicks opened new windows since.
    """
    if state is None:
        return [event_time, event_time], 0
    last, starts = state[0], list(state[1:])
    if event_time - last > gap_ms:
        starts.append(event_time)
    window = max(bisect.bisect_right(starts, event_time) - 1, 0)
    return [max(last, event_time), *starts], window


def sessionize_step(state: list[int] | None, click: Mapping[str, Any],
                    rules: PairRules) -> tuple[list[int] | None, dict[str, Any] | None]:
    """Stage 1 for one click: ``(new session state, click to forward with session_id = window id)``.

    Self-clicks and bounces are dropped (state unchanged, nothing forwarded).
    """
    if not rules.is_evidence(click):
        return state, None
    state, window = session_window(state, click["event_time"], rules.session_gap_ms)
    return state, {**click, "session_id": windowed_session_id(click["session_id"], window)}


def windowed_session_id(session_id: str, window: int | str) -> str:
    """The id of one window of a session (what a pair's ``sessions`` evidence counts)."""
    return f"{session_id}#{window}"


def window_of(forwarded: Mapping[str, Any]) -> str:
    """The window number of a click :func:`sessionize_step` forwarded."""
    return str(forwarded["session_id"]).rpartition("#")[2]


#: Where a click was first read: ``(source, offset)``. ``source`` names the click-events partition
#: the sessionize stage read it from (as a string: a JSON object key); every copy of the click on
#: click-pairs (a replay re-forwards it) carries the same origin.
Origin = tuple[str, int]


def new_evidence() -> dict[str, Any]:
    """A pair's evidence before its first click.

    ``origins``: per source, the highest origin offset counted (a click at or below it is a copy);
    ``sessions``: the distinct session windows counted, until the pair is emitted (frozen then:
    the record carries their number); ``last_time``: the newest event time counted (the table
    expires a pair idle too long by it); ``held_by``: the constraint that holds the pair (None
    once emitted); ``emitted_by``: the origin of the click that made it positive."""
    return {"co_clicks": 0, "sessions": [], "dwell_ms": 0, "origins": {}, "emitted": None, "emitted_by": None,
            "sent": False, "reason": None, "held_by": None, "last_time": None}


def add_click(evidence: dict[str, Any] | None, click: Mapping[str, Any],
              origin: Origin) -> tuple[dict[str, Any], bool]:
    """Count ``click`` (from click-pairs: session_id is the session window) once; returns (evidence, counted).

    Copies are recognised by their origin: the sessionize stage reads each click-events
    partition in order and forwards in that order, so the copies a replay re-forwards come after
    the originals, at or below the highest offset of their source already counted. One number
    per source instead of one id per click: a pair's state does not grow with its clicks.
    """
    evidence = new_evidence() if evidence is None else {**evidence}
    source, offset = origin
    origins = evidence["origins"]
    if offset <= origins.get(source, -1):
        return evidence, False
    evidence["origins"] = {**origins, source: offset}
    evidence["co_clicks"] += 1
    evidence["dwell_ms"] += int(click["dwell_ms"])
    last = evidence["last_time"]
    evidence["last_time"] = click["event_time"] if last is None else max(last, click["event_time"])
    if evidence["emitted"] is None and click["session_id"] not in evidence["sessions"]:
        evidence["sessions"] = [*evidence["sessions"], click["session_id"]]
    return evidence, True


def positive_record(a: str, b: str, evidence: Mapping[str, Any], decision: Decision, model_version: str | None,
                    event_time: int, emitted_at: int) -> dict[str, Any]:
    first, second = sorted((a, b))
    return {"listing_id_a": first, "listing_id_b": second, "category": decision.category,
            "co_clicks": evidence["co_clicks"], "sessions": len(evidence["sessions"]),
            "dwell_ms_total": evidence["dwell_ms"], "relevance_score": decision.cosine,
            "model_version": model_version if decision.cosine is not None else None,
            "event_time": event_time, "emitted_at": emitted_at}


def evidence_step(state: dict[str, Any] | None, click: Mapping[str, Any], origin: Origin, rules: PairRules,
                  lookup: Callable[[str], Any], model_version: str | None,
                  now: int | None = None) -> tuple[dict[str, Any], bool, dict[str, Any] | None]:
    """Stage 2 for one click of click-pairs: ``(new state, counted, positive record to send or None)``.

    A click already counted (a copy, :func:`add_click`) changes nothing; if it is the click that made the pair
    positive and the send was not confirmed (``sent``, written after the broker acknowledged it),
    the stored record is returned again, so a crash between the table write and the send loses
    nothing. Only a crash between that acknowledgement and the ``sent`` changelog write repeats
    the pair (byte-identical, same key; the topic is compacted).
    """
    a, b = click["trigger_id"], click["clicked_id"]
    state, counted = add_click(state, click, origin)
    if not counted:
        resend = state["emitted_by"] == [origin[0], origin[1]] and not state.get("sent")
        return state, False, state["emitted"] if resend else None
    record = None
    if state["emitted"] is None:
        decision = rules.decide_counts(state)  # cheap first: most pairs never get past the counts
        if decision is None:
            cosine, payload_a, payload_b = cosine_of(lookup, a, b)
            decision = rules.decide(state, (payload_a or {}).get("category"), (payload_b or {}).get("category"),
                                    cosine)
        state["reason"], state["held_by"] = decision.reason, decision.constraint
        if decision.ok:
            record = positive_record(a, b, state, decision, model_version, click["event_time"],
                                     now if now is not None else int(time.time() * 1000))
            state["emitted"], state["emitted_by"] = record, [origin[0], origin[1]]
    return state, True, record


def cosine_of(get: Callable[[str], Any], a: str, b: str) -> tuple[float | None, dict | None, dict | None]:
    """(cosine, payload a, payload b) from a LiveIndex-like ``get``; None where a listing is absent."""
    got_a, got_b = get(a), get(b)
    payload_a = got_a[1] if got_a is not None else None
    payload_b = got_b[1] if got_b is not None else None
    if got_a is None or got_b is None or got_a[0] is None or got_b[0] is None:
        return None, payload_a, payload_b
    va, vb = np.asarray(got_a[0], np.float32), np.asarray(got_b[0], np.float32)
    norm = float(np.linalg.norm(va) * np.linalg.norm(vb))
    return (float(va @ vb) / norm if norm > 0 else 0.0), payload_a, payload_b


def sessionize_batch(sessions: MutableMapping[str, list[int]], clicks: Iterable[Mapping[str, Any]],
                     rules: PairRules) -> list[tuple[int, dict[str, Any]]]:
    """Stage 1 over a batch of one click-events partition, in log order: folds every click into
    ``sessions`` (a session's state is written once, whatever number of clicks it got) and
    returns ``(position in the batch, click to forward)`` for the clicks that go on to click-pairs."""
    forwarded: list[tuple[int, dict[str, Any]]] = []
    for i, click in enumerate(clicks):
        session = click["session_id"]
        state, out = sessionize_step(sessions.get(session), click, rules)
        if out is not None:
            sessions[session] = state  # type: ignore[assignment]
            forwarded.append((i, out))
    return forwarded


def evidence_batch(evidence: MutableMapping[str, dict[str, Any]], clicks: Iterable[tuple[Origin, Mapping[str, Any]]],
                   rules: PairRules, lookup: Callable[[str], Any], model_version: str | None,
                   now: int | None = None) -> list[tuple[str, dict[str, Any]]]:
    """Stage 2 over a batch of one click-pairs partition, in log order (``(origin, click)`` each): folds every click into
    ``evidence`` and returns ``(pair key, positive record)`` to send: pairs that became positive,
    and unconfirmed sends of a replay (:func:`evidence_step`), each pair once. The caller sends
    them after the states naming them are written, then marks them with :func:`mark_sent`."""
    to_send: dict[str, dict[str, Any]] = {}
    for origin, click in clicks:
        key = pair_key(click["trigger_id"], click["clicked_id"])
        state, counted, record = evidence_step(evidence.get(key), click, origin, rules, lookup, model_version, now)
        if counted:
            evidence[key] = state
        if record is not None:
            to_send.setdefault(key, record)  # a replayed copy in the same batch is the same record
    return list(to_send.items())


def mark_sent(evidence: MutableMapping[str, dict[str, Any]], keys: Iterable[str]) -> None:
    """Record that the broker acknowledged the positive records of ``keys`` (no re-send on replay)."""
    for key in keys:
        state = evidence.get(key)
        if state is not None and not state.get("sent"):
            evidence[key] = {**state, "sent": True}


class PairMiner:
    """Both stages in one object, without a broker: what the agents do, for offline replays and tests.

    ``lookup(listing_id)`` returns ``(vector, payload)`` or None, like ``LiveIndex.get``. The
    tables are plain dicts: nothing expires (the agents' tables drop keys idle past their TTL).
    """

    def __init__(self, rules: PairRules, lookup: Callable[[str], Any] | None = None,
                 model_version: str | None = None) -> None:
        self.rules = rules
        self.lookup = lookup or (lambda _id: None)
        self.model_version = model_version
        self.sessions: dict[str, list[int]] = {}
        self.evidence: dict[str, dict[str, Any]] = {}
        self.emitted: list[dict[str, Any]] = []
        self._read = 0  # clicks fed so far: the origin offset of the next one

    def sessionize(self, click: Mapping[str, Any]) -> dict[str, Any] | None:
        forwarded = sessionize_batch(self.sessions, [click], self.rules)
        return forwarded[0][1] if forwarded else None

    def count(self, pair_click: Mapping[str, Any], origin: Origin, now: int | None = None) -> dict[str, Any] | None:
        """Stage 2 for one forwarded click; returns the positive pair record to send, if any."""
        out = evidence_batch(self.evidence, [(origin, pair_click)], self.rules, self.lookup, self.model_version, now)
        mark_sent(self.evidence, [key for key, _ in out])
        return out[0][1] if out else None

    def feed(self, click: Mapping[str, Any]) -> dict[str, Any] | None:
        origin = ("0", self._read)  # one source, read in order
        self._read += 1
        forwarded = self.sessionize(click)
        if forwarded is None:
            return None
        record = self.count(forwarded, origin)
        if record is not None:
            self.emitted.append(record)
        return record


__all__ = ["CONSTRAINTS", "Decision", "Origin", "PairMiner", "PairRules", "add_click", "category_path", "cosine_of",
           "evidence_batch", "evidence_step", "mark_sent", "new_evidence", "pair_key", "positive_record",
           "session_window", "sessionize_batch", "sessionize_step", "window_of", "windowed_session_id"]
