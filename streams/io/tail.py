"""``samestyle tail``: a topic's records decoded, one JSON object per line, for moderators and SREs.

Reads with the one log reader (:class:`~samestyle.streams.io.reader.LogReader`, no consumer
group, so nothing is committed and no worker's partitions move) and decodes with the topic's own
codec. Each line::

    {"topic": ..., "partition": 0, "offset": 12, "timestamp": 1718000000000, "key": "L1",
     "value": {...}}

Bytes never appear raw: a vector field (``vector_*``) shows as ``{"dim", "norm"}``, other bytes
as ``{"bytes": length}`` (plus ``"text"`` when short, printable UTF-8, such as a dead letter's
original key), and a dead letter's ``original_value`` is decoded with its source topic's codec
where it can be (``"decoded"``, or ``"decode_error"`` saying why not). A value that does not decode
gets ``"error"`` instead of ``"value"``; a tombstone has ``"value": null``.

What is printed:

* default: the last ``limit`` records (10 when not given), oldest first, then stop;
* ``from_beginning``: every record from the first, at most ``limit`` of them;
* ``follow``: after that, keep printing records as they arrive (until Ctrl-C, or until ``limit``
  records are printed when reading from the beginning);
* ``key``: only records with that key (the default mode then scans the whole topic to find its
  last ``limit``).

Records of different partitions are ordered by their timestamp (then partition, offset): all of
the output when a limit applies, each fetched chunk when everything is streamed; within a
partition the log order always holds.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from samestyle.streams.io.reader import LogReader, LogRecord, Partition, reader_for
from samestyle.streams.settings import Settings
from samestyle.topics import DEAD_LETTERS, TopicSpec, codec_for_topic, topic_specs
from samestyle.topics.errors import BrokerError, ConfigError, DecodeError

#: Records printed by default when not reading from the beginning (like tail(1)).
DEFAULT_LAST = 10
#: Bytes shown as text when they are printable UTF-8 of at most this length.
TEXT_BYTES = 256


@dataclass(frozen=True)
class TailRequest:
    """What ``samestyle tail`` was asked for (see the module docstring)."""

    topic: str
    from_beginning: bool = False
    follow: bool = False
    limit: int | None = None
    key: str | None = None
    #: Longest wait to read up to the end of the log (without ``follow``).
    timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


def find_topic(name: str, settings: Settings) -> TopicSpec:
    """The spec of ``name``: a registry name (``duplicate-alerts``) or the full, prefixed name."""
    specs = topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id)
    spec = specs.get(name) or next((s for s in specs.values() if s.name == name), None)
    known = ", ".join(k for k, s in specs.items() if s.schema)
    if spec is None:
        raise ConfigError(f"unknown topic {name!r}; known: {known}")
    if spec.schema is None:
        raise ConfigError(f"topic {spec.name!r} is a Faust table changelog with no Avro schema; "
                          f"tail decodes: {known}")
    return spec


def _bytes_view(data: bytes) -> dict[str, Any]:
    view: dict[str, Any] = {"bytes": len(data)}
    if len(data) <= TEXT_BYTES:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return view
        if text.isprintable():
            view["text"] = text
    return view


def _vector_view(data: bytes) -> dict[str, Any]:
    if len(data) % 4:
        return {"bytes": len(data)}
    vector = np.frombuffer(data, dtype="<f4")
    norm = float(np.linalg.norm(vector.astype(np.float64)))
    return {"dim": int(vector.size), "norm": round(norm, 6) if math.isfinite(norm) else None}


def render(value: Any, field: str = "") -> Any:
    """A decoded record made JSON-safe: vectors as dimension and norm, other bytes by length."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return _vector_view(data) if field.startswith("vector") else _bytes_view(data)
    if isinstance(value, dict):
        return {k: render(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [render(v, field) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return value


class RecordRenderer:
    """One JSON-ready dict per :class:`LogRecord` of a topic."""

    def __init__(self, spec: TopicSpec, settings: Settings) -> None:
        self.spec = spec
        self._codec = codec_for_topic(spec.key)
        # A dead letter names its source topic by its broker name.
        self._by_name = {s.name: s for s in topic_specs(settings.topic_prefix, settings.partitions).values()
                         if s.schema is not None}

    def __call__(self, record: LogRecord) -> dict[str, Any]:
        line: dict[str, Any] = {"topic": record.topic, "partition": record.partition, "offset": record.offset,
                                "timestamp": record.timestamp, "key": _key_view(record.key)}
        if record.value is None:
            line["value"] = None
            return line
        try:
            decoded = self._codec.decode(record.value)
        except DecodeError as exc:
            line["error"] = f"DecodeError: {exc}"
            line["value_bytes"] = len(record.value)
            return line
        line["value"] = render(decoded)
        if self.spec.key == DEAD_LETTERS and decoded.get("original_value") is not None:
            line["value"]["original_value"].update(self._original(decoded))
        return line

    def _original(self, letter: dict[str, Any]) -> dict[str, Any]:
        source = self._by_name.get(letter.get("topic") or "")
        if source is None:
            return {"decode_error": f"unknown source topic {letter.get('topic')!r}"}
        try:
            return {"decoded": render(codec_for_topic(source.key).decode(letter["original_value"]))}
        except DecodeError as exc:
            return {"decode_error": str(exc)}


def _key_view(key: bytes | None) -> Any:
    if key is None:
        return None
    view = _bytes_view(key)
    return view.get("text", view)


def _order(record: LogRecord) -> tuple[int, int, int]:
    return record.timestamp, record.partition, record.offset


async def tail(settings: Settings, request: TailRequest, write: Callable[[str], None]) -> int:
    """Print what ``request`` asks for with ``write`` (one JSON line per call); returns how many
    records were printed. Raises ConfigError for an unknown topic, BrokerError for a missing one
    or a log that cannot be read to its end within ``request.timeout``."""
    spec = find_topic(request.topic, settings)
    render_record = RecordRenderer(spec, settings)
    key = request.key.encode() if request.key is not None else None
    printed = 0

    def emit(records: list[LogRecord]) -> bool:
        """Print ``records`` (in order) until the limit; True once the limit is reached."""
        nonlocal printed
        for record in records:
            if request.from_beginning and request.limit is not None and printed >= request.limit:
                return True
            write(json.dumps(render_record(record), ensure_ascii=False, allow_nan=False))
            printed += 1
        return request.from_beginning and request.limit is not None and printed >= request.limit

    async with reader_for(settings, "tail") as reader:
        partitions = (await reader.topic_partitions()).get(spec.name)
        if not partitions:
            raise BrokerError(f"topic {spec.name!r} does not exist on {settings.bootstrap} "
                              "(create it with `samestyle create-topics`)")
        every = [(spec.name, p) for p in range(partitions)]
        await reader.assign(every)
        if not request.from_beginning:
            if key is None:
                # The last N of each partition hold the last N overall; start there (or earlier).
                last = request.limit or DEFAULT_LAST
                bounds = await reader.listed_bounds()
                await reader.assign({p: max(first, end - last) for p, (first, end) in bounds.items()})
            done = await _last(reader, request, key, emit)
        else:
            done = await _from_beginning(reader, request, key, emit)
        while request.follow and not done:
            records = sorted((r for r in await reader.fetch(0.5) if key is None or r.key == key), key=_order)
            done = emit(records)
    return printed


async def _last(reader: LogReader, request: TailRequest, key: bytes | None,
                emit: Callable[[list[LogRecord]], bool]) -> bool:
    """Read to the end, keeping the last N (matching) records of each partition; print the last N."""
    last = request.limit or DEFAULT_LAST
    kept: dict[Partition, deque[LogRecord]] = {p: deque(maxlen=last) for p in reader.partitions}
    await _read_to_end(reader, request.timeout, lambda records: [
        kept[(r.topic, r.partition)].append(r) for r in records if key is None or r.key == key])
    newest = sorted((r for q in kept.values() for r in q), key=_order)[-last:]
    return emit(newest)


async def _from_beginning(reader: LogReader, request: TailRequest, key: bytes | None,
                          emit: Callable[[list[LogRecord]], bool]) -> bool:
    """Without a limit: everything, printed as it is fetched. With one: read each partition until
    it has ``limit`` (matching) records or ends, then print the first ``limit`` of them all."""
    if request.limit is None:
        await _read_to_end(reader, request.timeout, lambda records: emit(
            sorted((r for r in records if key is None or r.key == key), key=_order)))
        return False
    first: dict[Partition, list[LogRecord]] = {p: [] for p in reader.partitions}

    def take(records: list[LogRecord]) -> None:
        for r in records:
            kept = first[(r.topic, r.partition)]
            if len(kept) < (request.limit or 0) and (key is None or r.key == key):
                kept.append(r)

    async def enough() -> bool:
        for p, kept in first.items():
            high = reader.highwater(p)
            if len(kept) < (request.limit or 0) and (high is None or await reader.position(p) < high):
                return False
        return True

    await _read_to_end(reader, request.timeout, take, stop=enough)
    return emit(sorted((r for kept in first.values() for r in kept), key=_order))


async def _read_to_end(reader: LogReader, timeout: float, take: Callable[[list[LogRecord]], Any],
                       stop: Callable[[], Awaitable[bool]] | None = None) -> None:
    """Fetch into ``take`` until every partition is read to its high-water mark (or ``stop()``)."""
    deadline = time.monotonic() + timeout
    while True:
        take(await reader.fetch(0.3))
        if await reader.at_end() or (stop is not None and await stop()):
            return
        if time.monotonic() > deadline:
            raise BrokerError(f"could not read {sorted({t for t, _ in reader.partitions})} to the end "
                              f"in {timeout:g} s")


__all__ = ["DEFAULT_LAST", "RecordRenderer", "TailRequest", "find_topic", "render", "tail"]
