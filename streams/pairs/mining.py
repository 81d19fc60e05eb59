"""Click events → positive pairs, as pure functions of the table state (no Faust, no broker).

``sessionize_step`` and ``evidence_step`` are what the two agents run per event;
:class:`PairMiner` runs both offline (the pairs report uses it, so the report scores the agents'
own logic). :class:`PairRules` are the evidence, category and cosine constraints, from Settings.
"""

from __future__ import annotations

import bisect
import json
import re
import time
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

import numpy as np

from samestyle.streams.settings import Settings

_CATEGORY_SEPARATORS = re.compile(r"\s*(?:>|/|\|)\s*")


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
    def from_settings(cls, settings: Settings) -> "PairRules":
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
        if evidence["co_clicks"] < self.min_co_clicks:
            return Decision(False, f"co_clicks {evidence['co_clicks']} < {self.min_co_clicks}")
        if len(evidence["sessions"]) < self.min_sessions:
            return Decision(False, f"sessions {len(evidence['sessions'])} < {self.min_sessions}")
        shared: str | None = None
        if self.category_level > 0:
            path_a, path_b = category_path(category_a), category_path(category_b)
            if path_a is None or path_b is None:
                if self.unknown_category == "reject":
                    return Decision(False, "category unknown")
            else:
                level = self.category_level
                if path_a[:level] != path_b[:level]:
                    return Decision(False, f"categories differ at level {level}: "
                                           f"{category_a!r} vs {category_b!r}")
                shared = " > ".join(path_a[:min(level, len(path_a))])
        if cosine is None:
            if self.require_cosine:
                return Decision(False, "not indexed yet: cosine unknown", shared)
        elif cosine < self.min_cosine:
            return Decision(False, f"cosine {cosine:.3f} < {self.min_cosine}", shared, cosine)
        return Decision(True, "positive", shared, cosine)


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
    return state, {**click, "session_id": f"{click['session_id']}#{window}"}


def click_id(click: Mapping[str, Any]) -> str:
    """Identity of one click (session window, time, both listings, position): replays are recognised."""
    return "|".join(str(click[k]) for k in ("session_id", "event_time", "trigger_id", "clicked_id", "position"))


def new_evidence() -> dict[str, Any]:
    return {"co_clicks": 0, "sessions": [], "dwell_ms": 0, "clicks": [], "emitted": None, "emitted_by": None,
            "sent": False, "reason": None}


def add_click(evidence: dict[str, Any] | None, click: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
    """Count ``click`` (from click-pairs: session_id is the session window) once; returns (evidence, counted)."""
    evidence = new_evidence() if evidence is None else {**evidence}
    cid = click_id(click)
    if cid in evidence["clicks"]:
        return evidence, False
    evidence["clicks"] = [*evidence["clicks"], cid]
    evidence["co_clicks"] += 1
    evidence["dwell_ms"] += int(click["dwell_ms"])
    if click["session_id"] not in evidence["sessions"]:
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


def evidence_step(state: dict[str, Any] | None, click: Mapping[str, Any], rules: PairRules,
                  lookup: Callable[[str], Any], model_version: str | None,
                  now: int | None = None) -> tuple[dict[str, Any], bool, dict[str, Any] | None]:
    """Stage 2 for one click of click-pairs: ``(new state, counted, positive record to send or None)``.

    A click already counted (a replay) changes nothing; if it is the click that made the pair
    positive and the send was not confirmed (``sent``, written after the broker acknowledged it),
    the stored record is returned again, so a crash between the table write and the send loses
    nothing. Only a crash between that acknowledgement and the ``sent`` changelog write repeats
    the pair (byte-identical, same key; the topic is compacted).
    """
    a, b = click["trigger_id"], click["clicked_id"]
    state, counted = add_click(state, click)
    if not counted:
        resend = state["emitted_by"] == click_id(click) and not state.get("sent")
        return state, False, state["emitted"] if resend else None
    record = None
    if state["emitted"] is None:
        cosine, payload_a, payload_b = cosine_of(lookup, a, b)
        decision = rules.decide(state, (payload_a or {}).get("category"), (payload_b or {}).get("category"), cosine)
        state["reason"] = decision.reason
        if decision.ok:
            record = positive_record(a, b, state, decision, model_version, click["event_time"],
                                     now if now is not None else int(time.time() * 1000))
            state["emitted"], state["emitted_by"] = record, click_id(click)
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


class PairMiner:
    """Both stages in one object, without a broker: what the agents do, for offline replays and tests.

    ``lookup(listing_id)`` returns ``(vector, payload)`` or None, like ``LiveIndex.get``.
    """

    def __init__(self, rules: PairRules, lookup: Callable[[str], Any] | None = None,
                 model_version: str | None = None) -> None:
        self.rules = rules
        self.lookup = lookup or (lambda _id: None)
        self.model_version = model_version
        self.sessions: dict[str, list[int]] = {}
        self.evidence: dict[str, dict[str, Any]] = {}
        self.emitted: list[dict[str, Any]] = []

    def sessionize(self, click: Mapping[str, Any]) -> dict[str, Any] | None:
        state, forwarded = sessionize_step(self.sessions.get(click["session_id"]), click, self.rules)
        if forwarded is not None:
            self.sessions[click["session_id"]] = state  # type: ignore[assignment]
        return forwarded

    def count(self, pair_click: Mapping[str, Any], now: int | None = None) -> dict[str, Any] | None:
        """Stage 2 for one forwarded click; returns the positive pair record to send, if any."""
        key = pair_key(pair_click["trigger_id"], pair_click["clicked_id"])
        state, counted, record = evidence_step(self.evidence.get(key), pair_click, self.rules, self.lookup,
                                               self.model_version, now)
        if counted:
            self.evidence[key] = state
        if record is not None:
            self.evidence[key] = {**state, "sent": True}
        return record

    def feed(self, click: Mapping[str, Any]) -> dict[str, Any] | None:
        forwarded = self.sessionize(click)
        if forwarded is None:
            return None
        record = self.count(forwarded)
        if record is not None:
            self.emitted.append(record)
        return record


__all__ = ["Decision", "PairMiner", "PairRules", "add_click", "category_path", "click_id", "cosine_of",
           "evidence_step", "new_evidence", "pair_key", "positive_record", "session_window", "sessionize_step"]
