"""The one Kafka log reader: assigned partitions outside any consumer group, read to the end or followed.

Every component that reads a topic as a log (the index replica, the model watcher, the
re-embedding, the trainer, the output reader of the demo and tests, the pairs report) uses
:class:`LogReader`. The end of a partition is the high-water mark carried by fetch responses,
never ``end_offsets``/``seek_to_end``: the embedded broker (tansu) answers those with the start
of the last batch, and the high-water mark is right on Apache Kafka too.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from samestyle.topics.errors import BrokerError

#: (topic, partition)
Partition = tuple[str, int]


@dataclass(frozen=True)
class LogRecord:
    """One record as read: where it sits in the log, and its raw key and value."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp: int


class LogReader:
    """A group-less consumer of assigned partitions that knows where each one ends.

    ``assign({(topic, p): offset})`` sets what to read (``None``: from the beginning); ``fetch``
    returns the next records; ``highwater`` is the end a fetch response last reported;
    ``read_to_end`` reads until every assigned partition reached the high-water mark of its first
    fetch. Records are not decoded here: each caller knows its topic's codec and error policy.
    """

    def __init__(self, bootstrap_servers: str, *, client_id: str, fetch_max_wait_ms: int = 100,
                 max_message_bytes: int = 1_048_576) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap_servers, group_id=None, enable_auto_commit=False,
            auto_offset_reset="earliest", client_id=client_id, fetch_max_wait_ms=fetch_max_wait_ms,
            max_partition_fetch_bytes=max_message_bytes,
            fetch_max_bytes=max(max_message_bytes, 52_428_800))
        self._started = False
        self._assigned: list[TopicPartition] = []
        self._positions: dict[Partition, int] = {}

    async def start(self) -> LogReader:
        await self._consumer.start()
        self._started = True
        return self

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def __aenter__(self) -> LogReader:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def partitions(self) -> list[Partition]:
        return [(tp.topic, tp.partition) for tp in self._assigned]

    async def assign(self, positions: Mapping[Partition, int | None] | Iterable[Partition]) -> None:
        """Read exactly these partitions, each from its offset (``None`` or absent: the beginning)."""
        wanted = dict(positions) if isinstance(positions, Mapping) else {p: None for p in positions}
        self._assigned = [TopicPartition(t, p) for t, p in wanted]
        self._consumer.assign(self._assigned)
        self._positions = {}
        for tp in self._assigned:
            offset = wanted[(tp.topic, tp.partition)]
            if offset is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, offset)
                self._positions[(tp.topic, tp.partition)] = offset

    async def topic_partitions(self) -> dict[str, int]:
        """Every topic of the cluster with its partition count. Asks for the metadata of *all*
        topics, which never auto-creates one (asking for a missing topic by name would, on the
        embedded broker: BROKER.md trap 2)."""
        names = await self._consumer.topics()
        return {t: len(self._consumer.partitions_for_topic(t) or ()) for t in names}

    async def listed_bounds(self) -> dict[Partition, tuple[int, int]]:
        """Per assigned partition: its first offset and the end the broker *lists*. The listed end
        can lie below the real one (tansu answers the start of the last batch + 1, BROKER.md trap
        1), so it is only fit where starting early is harmless: to read the last N records, start
        at the listed end - N, read up to the high-water mark and keep the last N."""
        begin = await self._consumer.beginning_offsets(self._assigned)
        end = await self._consumer.end_offsets(self._assigned)
        return {(tp.topic, tp.partition): (begin[tp], end[tp]) for tp in self._assigned}

    def unassign(self) -> None:
        """Read nothing until the next :meth:`assign`."""
        self._assigned = []
        self._positions = {}
        self._consumer.assign([])

    def seek(self, partition: Partition, offset: int) -> None:
        """Read ``partition`` again from ``offset`` (it must be assigned)."""
        self._consumer.seek(TopicPartition(*partition), offset)
        self._positions[partition] = offset

    async def fetch(self, timeout: float = 0.2, max_records: int = 10_000) -> list[LogRecord]:
        """The records that arrive within ``timeout`` seconds (possibly none), in log order per partition."""
        if not self._assigned:
            return []
        batches = await self._consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_records)
        out: list[LogRecord] = []
        for tp, records in batches.items():
            for r in records:
                out.append(LogRecord(tp.topic, tp.partition, r.offset, r.key, r.value, r.timestamp))
            if records:
                self._positions[(tp.topic, tp.partition)] = records[-1].offset + 1
        return out

    def highwater(self, partition: Partition) -> int | None:
        """The end of ``partition`` as the last fetch response said (None before one answered)."""
        try:
            return self._consumer.highwater(TopicPartition(*partition))
        except Exception:  # aiokafka raises for a partition it holds no fetch state for
            return None

    def highwaters(self) -> dict[Partition, int | None]:
        return {p: self.highwater(p) for p in self.partitions}

    async def position(self, partition: Partition) -> int:
        """The next offset this reader will return for ``partition``."""
        if partition not in self._positions:
            self._positions[partition] = await self._consumer.position(TopicPartition(*partition))
        return self._positions[partition]

    async def at_end(self) -> bool:
        """Whether every assigned partition is read up to its last reported high-water mark."""
        for p in self.partitions:
            high = self.highwater(p)
            if high is None or await self.position(p) < high:
                return False
        return True

    async def read_to_end(self, timeout: float, poll: float = 0.3) -> list[LogRecord]:
        """Every record up to the high-water marks; :class:`BrokerError` after ``timeout`` seconds."""
        records: list[LogRecord] = []
        deadline = time.monotonic() + timeout
        while True:
            records.extend(await self.fetch(poll))
            if await self.at_end():
                return records
            if time.monotonic() > deadline:
                topics = sorted({t for t, _ in self.partitions})
                raise BrokerError(f"could not read {topics} to the end in {timeout:.0f} s")


def every_partition(topic: str, partitions: int) -> list[Partition]:
    """``[(topic, 0), ..., (topic, partitions - 1)]``."""
    return [(topic, p) for p in range(partitions)]


def reader_for(settings: Any, role: str, *, fetch_max_wait_ms: int = 100) -> LogReader:
    """A :class:`LogReader` with the worker's broker, client id ``<worker_id>-<role>`` and size limit."""
    return LogReader(settings.bootstrap_servers, client_id=f"{settings.worker_id}-{role}",
                     fetch_max_wait_ms=fetch_max_wait_ms, max_message_bytes=settings.max_message_bytes)


__all__ = ["LogReader", "LogRecord", "Partition", "every_partition", "reader_for"]
