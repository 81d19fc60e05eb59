"""The index replica: a worker's own copy of the live index, built from every partition of
``listing-embeddings``.

Each worker holds a full replica (queries never cross workers), so the replica reads *all*
partitions with a manually assigned consumer outside the consumer group. Its position is part of
its state: snapshots store the index together with the next offset to apply per partition, and a
restart loads the snapshot and replays from there. Upserts are idempotent by listing id, so a
replay never adds a listing twice, and nothing between the snapshot and the crash is lost.

The index agent (group-consumed, so each record is searched and emitted once across workers)
waits until the local replica has applied the record it is about to search for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from aiokafka import AIOKafkaConsumer, TopicPartition
from mode import Service

from index_store import LiveIndex
from topics.errors import BadInputError

from .metrics import PartitionLag, partition_lags
from .pipeline import apply_updates, decode_embedding, now_ms
from .settings import Settings

if TYPE_CHECKING:  # pragma: no cover
    from .metrics import Metrics

log = logging.getLogger(__name__)


class IndexReplica(Service):
    """Keeps ``index`` equal to the state described by the embeddings topic, and snapshots it."""

    def __init__(self, settings: Settings, index: LiveIndex, topic: str, partitions: int,
                 snapshot_dir: Path, offsets: dict[int, int], metrics: "Metrics | None" = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.settings = settings
        self.metrics = metrics
        self.index = index
        self.topic = topic
        self.partitions = partitions
        self.snapshot_dir = snapshot_dir
        #: partition -> next offset to apply (what a snapshot records).
        self.applied: dict[int, int] = dict(offsets)
        self._changed = asyncio.Condition()
        self._dirty = False
        self._consumer: AIOKafkaConsumer | None = None
        self._last_snapshot = time.monotonic()

    async def on_start(self) -> None:
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.bootstrap_servers,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=f"{self.settings.worker_id}-replica",
            fetch_max_wait_ms=50,
            max_partition_fetch_bytes=self.settings.max_message_bytes,
            fetch_max_bytes=max(self.settings.max_message_bytes, 52_428_800),
        )
        await self._consumer.start()
        tps = [TopicPartition(self.topic, p) for p in range(self.partitions)]
        self._consumer.assign(tps)
        for tp in tps:
            if tp.partition in self.applied:
                self._consumer.seek(tp, self.applied[tp.partition])
            else:
                await self._consumer.seek_to_beginning(tp)
        if self.metrics is not None:
            self.metrics.index_vectors.set(len(self.index))
        log.info("index replica: %d listings from snapshot, replaying %s from %s",
                 len(self.index), self.topic, self.applied or "the beginning")

    async def on_stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
            self._consumer = None
        if self._dirty:
            await self.snapshot()

    def lags(self) -> list[PartitionLag]:
        """Fetch high-water mark minus the next offset to apply, per partition of the topic."""
        consumer = self._consumer
        if consumer is None:
            return []
        highwaters = {}
        for p in range(self.partitions):
            try:
                highwaters[(self.topic, p)] = consumer.highwater(TopicPartition(self.topic, p))
            except Exception:  # not fetched yet
                continue
        return partition_lags("replica", highwaters, {(self.topic, p): o for p, o in self.applied.items()})

    def _restart_truncated_partitions(self) -> None:
        """Read a partition again from offset 0 when its log is shorter than what was applied.

        A high-water mark below the next offset to apply means the topic was deleted and created
        again (or the embedded broker restarted empty: it keeps data in memory only). tansu then
        answers fetches beyond the end with no error, so without this the replica would wait for
        the new log to grow past the old offset and silently skip everything before it.
        """
        assert self._consumer is not None
        for p in range(self.partitions):
            tp = TopicPartition(self.topic, p)
            try:
                highwater = self._consumer.highwater(tp)
            except Exception:
                continue
            applied = self.applied.get(p, 0)
            if highwater is not None and highwater < applied:
                log.warning("replica: %s[%d] ends at %d but %d were applied: the topic was recreated; "
                            "reading it again from the start", self.topic, p, highwater, applied)
                self._consumer.seek(tp, 0)
                self.applied[p] = 0
                if self.metrics is not None:
                    self.metrics.log_resets.labels("replica").inc()

    def is_caught_up_to(self, partition: int, offset: int) -> bool:
        return self.applied.get(partition, 0) > offset

    async def wait_applied(self, partition: int, offset: int) -> None:
        """Return once the record at ``offset`` of ``partition`` is in the index."""
        if self.is_caught_up_to(partition, offset):
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.is_caught_up_to(partition, offset) or self.should_stop)

    @Service.task
    async def _apply_loop(self) -> None:
        assert self._consumer is not None
        loop = asyncio.get_running_loop()
        while not self.should_stop:
            self._restart_truncated_partitions()
            batches = await self._consumer.getmany(timeout_ms=200, max_records=2000)
            if batches:
                updates = []
                for tp, records in batches.items():
                    for record in records:
                        try:
                            updates.append(decode_embedding(record.value))
                        except BadInputError as exc:
                            # The index agent dead-letters it; the replica only skips it.
                            log.warning("replica skips %s[%d]@%d: %s", tp.topic, tp.partition, record.offset, exc)
                # The index owns its lock; the executor keeps big upserts off the event loop.
                await loop.run_in_executor(None, apply_updates, self.index, updates)
                if self.metrics is not None:
                    self.metrics.observe_freshness(self.metrics.listing_to_searchable,
                                                   [u.event_time for u in updates if u.op != "DELETE"], now_ms())
                    self.metrics.index_vectors.set(len(self.index))
                async with self._changed:
                    for tp, records in batches.items():
                        self.applied[tp.partition] = records[-1].offset + 1
                    self._dirty = True
                    self._changed.notify_all()
            interval = self.settings.snapshot_interval_seconds
            if interval > 0 and self._dirty and time.monotonic() - self._last_snapshot >= interval:
                await self.snapshot()

    async def snapshot(self) -> None:
        offsets = dict(self.applied)
        self._dirty = False
        self._last_snapshot = time.monotonic()
        loop = asyncio.get_running_loop()
        path = await loop.run_in_executor(None, self.index.snapshot, self.snapshot_dir, offsets)
        if self.metrics is not None:
            self.metrics.index_snapshots.inc()
        log.info("index snapshot: %d listings at offsets %s -> %s", len(self.index), offsets, path)
