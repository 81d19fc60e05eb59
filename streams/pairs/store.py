"""One partition of a pairs table, in memory: the state the agents fold batches into (no Kafka).

A :class:`TableStore` maps keys to JSON-able values, remembers which keys changed since the last
:meth:`TableStore.changes` (the agents write exactly those to the changelog, once per batch) and
expires keys by **event time**: a key whose newest event is more than ``ttl_ms`` older than the
newest event of its partition (the *watermark*) is dropped, as a change with value None (a
tombstone on the changelog). Keys are kept in the order they were last written, and
:meth:`TableStore.expire` drops from the oldest write on and stops at the first key still
young: one sweep costs what it drops. A key written late with an old event time waits until the
keys written before it are gone too.

:func:`encode_value` / :func:`decode_value` are the changelog's value format (compact JSON).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterator, MutableMapping
from typing import Any

#: ``time_of(value)``: the newest event time (ms) of a value, None when it has none.
TimeOf = Callable[[Any], "int | None"]
#: ``kind_of(value)``: a label to count values by (a metric), e.g. the constraint holding a pair.
KindOf = Callable[[Any], str]


def encode_value(value: Any) -> bytes | None:
    """A changelog record's value: compact JSON, None for a tombstone."""
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def decode_value(data: bytes | None) -> Any:
    return None if data is None else json.loads(data)


class TableStore(MutableMapping[str, Any]):
    """Values by key for one partition, with changes since the last batch and event-time expiry."""

    def __init__(self, ttl_ms: int | None, time_of: TimeOf, kind_of: KindOf | None = None) -> None:
        if ttl_ms is not None and ttl_ms <= 0:
            raise ValueError("ttl_ms must be > 0 (or None: never expire)")
        self.ttl_ms = ttl_ms
        self._time_of = time_of
        self._kind_of = kind_of
        self._data: dict[str, Any] = {}
        self._times: dict[str, int] = {}
        self._changed: dict[str, None] = {}
        #: Values by ``kind_of`` (empty without one).
        self.kinds: Counter[str] = Counter()
        #: The newest event time written to this partition (ms), None before the first.
        self.watermark: int | None = None

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._data.get(key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        """Write ``value`` (not None); the key counts as changed."""
        self._put(key, value)
        self._changed[key] = None

    def __delitem__(self, key: str) -> None:
        """Drop ``key``: a change with value None (a tombstone)."""
        if key not in self._data:
            raise KeyError(key)
        self._drop(key)
        self._changed[key] = None

    def load(self, key: str, value: Any) -> None:
        """Apply one changelog record (None deletes); not a change to write back."""
        if value is None:
            self._drop(key)
        else:
            self._put(key, value)

    def expire(self) -> int:
        """Drop the keys idle for more than ``ttl_ms`` of event time (see the module docstring);
        each becomes a change with value None. Returns how many went."""
        if self.ttl_ms is None or self.watermark is None:
            return 0
        cutoff = self.watermark - self.ttl_ms
        old = []
        for key in self._data:  # oldest write first
            if self._times[key] >= cutoff:
                break
            old.append(key)
        for key in old:
            self._drop(key)
            self._changed[key] = None
        return len(old)

    def changes(self) -> list[tuple[str, Any]]:
        """``(key, value or None)`` for every key written or dropped since the last call, once each."""
        out = [(key, self._data.get(key)) for key in self._changed]
        self._changed.clear()
        return out

    def _put(self, key: str, value: Any) -> None:
        previous = self._data.pop(key, None)  # re-inserted: the order is the order of last writes
        self._data[key] = value
        t = self._time_of(value)
        if t is None:  # no event time: as young as the partition
            t = self.watermark if self.watermark is not None else 0
        elif self.watermark is None or t > self.watermark:
            self.watermark = t
        self._times[key] = t
        if self._kind_of is not None:
            if previous is not None:
                self.kinds[self._kind_of(previous)] -= 1
            self.kinds[self._kind_of(value)] += 1

    def _drop(self, key: str) -> None:
        previous = self._data.pop(key, None)
        self._times.pop(key, None)
        if previous is not None and self._kind_of is not None:
            self.kinds[self._kind_of(previous)] -= 1


def session_time(state: list[int]) -> int:
    """A session state's newest event time (``[last, start of window 0, ...]``)."""
    return state[0]


def evidence_time(evidence: dict[str, Any]) -> int | None:
    return evidence.get("last_time")


def evidence_kind(evidence: dict[str, Any]) -> str:
    """``emitted`` for a pair already positive, else the constraint holding it."""
    if evidence.get("emitted") is not None:
        return "emitted"
    return evidence.get("held_by") or "co_clicks"


__all__ = ["TableStore", "decode_value", "encode_value", "evidence_kind", "evidence_time", "session_time"]
