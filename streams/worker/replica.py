"""The index replica: a worker's own full copy of the live index, built from every partition of
``listing-embeddings`` by a manually assigned consumer outside the consumer group.

Snapshots store the index with the next offset per partition; a restart replays from there, and
idempotent upserts make that exact. The index agent waits on :meth:`IndexReplica.is_caught_up_to`
before it searches. One index per model version (:class:`ModelIndexes`); ``ready`` once the log as
of start-up is applied, then it switches to the target model as soon as the target's index is complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Mapping

from mode import Service

from samestyle.index_store import LiveIndex
from samestyle.streams.io.reader import LogReader, reader_for
from samestyle.streams.settings import Settings
from samestyle.streams.switch.indexes import ModelIndexes
from samestyle.streams.worker.metrics import PartitionLag, partition_lags
from samestyle.streams.worker.pipeline import decode_embedding, now_ms
from samestyle.topics.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.streams.worker.metrics import Metrics

log = logging.getLogger(__name__)


class IndexReplica(Service):
    """Keeps ``index`` equal to the state described by the embeddings topic, and snapshots it."""

    def __init__(self, settings: Settings, indexes: ModelIndexes, topic: str, partitions: int,
                 snapshot_dir: Path, offsets: dict[int, int], metrics: "Metrics | None" = None,
                 target_version: Callable[[], str] | None = None,
                 version_order: Callable[[], Mapping[str, int]] | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.settings = settings
        self.metrics = metrics
        self.indexes = indexes
        self.target_version = target_version
        self.version_order = version_order or (lambda: {})
        #: Set once the log as it stood at start-up is applied and the active index is chosen.
        self.ready = asyncio.Event()
        #: partition -> high-water mark of the first fetch: the log "as it stood at start-up"
        #: (not ``end_offsets``, which tansu answers short: BROKER.md, trap 1).
        self._start_ends: dict[int, int] = {}
        self.topic = topic
        self.partitions = partitions
        self.snapshot_dir = snapshot_dir
        #: partition -> next offset to apply (what a snapshot records).
        self.applied: dict[int, int] = dict(offsets)
        self._changed = asyncio.Condition()
        self._dirty = False
        self._reader: LogReader | None = None
        self._last_snapshot = time.monotonic()
        #: A target version to switch to even though its index is incomplete (a switch's deadline).
        self._forced: str | None = None

    async def on_start(self) -> None:
        self._reader = await reader_for(self.settings, "replica", fetch_max_wait_ms=50).start()
        await self._reader.assign({(self.topic, p): self.applied.get(p) for p in range(self.partitions)})
        self._set_index_gauge()
        log.info("index replica: %s from snapshot, replaying %s from %s",
                 {v: len(i) for v, i in self.indexes.indexes.items()} or "nothing", self.topic,
                 self.applied or "the beginning")

    @property
    def index(self) -> LiveIndex | None:
        """The active index (None before the replica is ready or before any vector arrived)."""
        return self.indexes.active_index

    @property
    def active_version(self) -> str | None:
        return self.indexes.active

    def _set_index_gauge(self) -> None:
        if self.metrics is not None:
            index = self.indexes.active_index
            self.metrics.index_vectors.set(len(index) if index is not None else 0)

    def _check_models(self) -> None:
        """Become ready after the start-up log is in; then switch to the target model when complete."""
        target = self.target_version() if self.target_version is not None else None
        if not self.ready.is_set():
            assert self._reader is not None
            for p in range(self.partitions):
                if p not in self._start_ends:
                    highwater = self._reader.highwater((self.topic, p))
                    if highwater is None:
                        return
                    self._start_ends[p] = highwater
            if any(self.applied.get(p, 0) < end for p, end in self._start_ends.items()):
                return
            if self.indexes.active is None or self.indexes.active not in self.indexes.indexes:
                if target is None:
                    return
                chosen = self.indexes.choose_active(target, self.version_order())
                log.info("index replica ready: serving model %s (%d listings)", chosen,
                         len(self.indexes.active_index or ()))
            self.ready.set()
        if target is not None and target != self.indexes.active:
            if self.indexes.try_switch(target, force=self._forced == target):
                self._dirty = True
                if self.metrics is not None:
                    self.metrics.model_switches.inc()
        self._set_index_gauge()

    async def on_stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None
        if self._dirty:
            await self.snapshot()

    def lags(self) -> list[PartitionLag]:
        """Fetch high-water mark minus the next offset to apply, per partition of the topic."""
        if self._reader is None:
            return []
        highwaters = {tp: high for tp, high in self._reader.highwaters().items() if high is not None}
        return partition_lags("replica", highwaters, {(self.topic, p): o for p, o in self.applied.items()})

    def _restart_truncated_partitions(self) -> None:
        """Read a partition again from offset 0 when its log is shorter than what was applied.

        A high-water mark below the next offset to apply means the topic was deleted and created
        again (or the embedded broker restarted empty: it keeps data in memory only). tansu then
        answers fetches beyond the end with no error, so without this the replica would wait for
        the new log to grow past the old offset and silently skip everything before it.
        """
        assert self._reader is not None
        for p in range(self.partitions):
            highwater = self._reader.highwater((self.topic, p))
            applied = self.applied.get(p, 0)
            if highwater is not None and highwater < applied:
                log.warning("replica: %s[%d] ends at %d but %d were applied: the topic was recreated; "
                            "reading it again from the start", self.topic, p, highwater, applied)
                self._reader.seek((self.topic, p), 0)
                self.applied[p] = 0
                if self.metrics is not None:
                    self.metrics.log_resets.labels("replica").inc()

    def force_switch(self, target: str) -> None:
        """Switch to ``target`` at the next check even if its index lacks listings of the active one
        (applied by the apply loop, the indexes' one writer)."""
        self._forced = target

    def is_caught_up_to(self, partition: int, offset: int) -> bool:
        return self.applied.get(partition, 0) > offset

    async def wait_ready(self) -> None:
        """Return once the replica serves from a chosen index (or the worker stops)."""
        if self.ready.is_set():
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.ready.is_set() or self.should_stop)

    async def wait_applied(self, partition: int, offset: int) -> None:
        """Return once the record at ``offset`` of ``partition`` is in the index."""
        if self.is_caught_up_to(partition, offset) and self.ready.is_set():
            return
        async with self._changed:
            await self._changed.wait_for(
                lambda: (self.is_caught_up_to(partition, offset) and self.ready.is_set()) or self.should_stop)

    @Service.task
    async def _apply_loop(self) -> None:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        while not self.should_stop:
            self._restart_truncated_partitions()
            records = await self._reader.fetch(timeout=0.2, max_records=2000)
            if records:
                updates = []
                for record in records:
                    try:
                        updates.append(decode_embedding(record.value))
                    except BadInputError as exc:
                        # The index agent dead-letters it; the replica only skips it.
                        log.warning("replica skips %s[%d]@%d: %s", record.topic, record.partition,
                                    record.offset, exc)
                # Each index owns its lock; the executor keeps big upserts off the event loop.
                await loop.run_in_executor(None, self.indexes.apply, updates)
                if self.metrics is not None:
                    self.metrics.observe_freshness(self.metrics.listing_to_searchable,
                                                   [u.event_time for u in updates if u.op != "DELETE"], now_ms())
                async with self._changed:
                    for record in records:
                        self.applied[record.partition] = record.offset + 1
                    self._dirty = True
                    self._check_models()
                    self._changed.notify_all()
            elif not self.ready.is_set() or (self.target_version is not None
                                             and self.target_version() != self.indexes.active):
                async with self._changed:
                    self._check_models()
                    self._changed.notify_all()
            interval = self.settings.snapshot_interval_seconds
            if interval > 0 and self._dirty and time.monotonic() - self._last_snapshot >= interval:
                await self.snapshot()

    async def snapshot(self) -> None:
        offsets = dict(self.applied)
        self._dirty = False
        self._last_snapshot = time.monotonic()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.indexes.snapshot, self.snapshot_dir, offsets)
        if self.metrics is not None:
            self.metrics.index_snapshots.inc()
        log.info("index snapshot: %s at offsets %s -> %s", {v: len(i) for v, i in self.indexes.indexes.items()},
                 offsets, self.snapshot_dir)
