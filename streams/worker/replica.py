"""The index a worker's agents search, and what it remembers of the alerts already sent.

Two kinds of index, one surface (what the index agent, the model switch, the search API and
``/health`` use: ``index``, ``active_version``, ``indexes``, ``wait_ready``, ``make_searchable``,
``run``, ``lacking``/``missing``, ``force_switch``, ``lags``, ``listings``):

* :class:`IndexReplica` (``SAMESTYLE_INDEX_BACKEND=faiss``): a worker's own full copy of the live
  index, built from every partition of ``listing-embeddings`` by a manually assigned consumer outside
  the consumer group. Snapshots store the index with the next offset per partition; a restart
  replays from there, and idempotent upserts make that exact. The index agent waits on
  :meth:`IndexReplica.is_caught_up_to` before it searches (or until the record turns out lost with
  a recreated log: :meth:`IndexReplica.wait_applied`). One index per model version
  (:class:`ModelIndexes`); ``ready`` once the log as of start-up is applied, then it switches to the
  target model as soon as the target's index is complete. Each snapshot also records the model
  switch (``switch_record``: the target and the promoted models' directories), so a restart whose
  decision log was lost resumes the switch (streams/switch/record.py).
* :class:`SharedIndex` (``milvus``): no copy at all. The index agent writes the records it consumes
  into the backend's collections (idempotent upserts by listing id) before it searches them, so
  each record is written by the one worker that owns its partition and read by every worker.
  The switch rule is the same, over collections (:class:`CollectionIndexes`); the alias is shared.

:class:`AlertedPairsFollower` follows ``duplicate-alerts`` into the pairs the search step must not
alert again, so a batch replayed after a crash (or taken over by another worker) does not alert a
pair that was already sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from mode import Service

from samestyle.index_store import IndexBackend, LiveIndex
from samestyle.index_store.backend import IndexUnavailableError, VersionView
from samestyle.streams.io.follower import LogFollower
from samestyle.streams.io.reader import LogReader, LogRecord, every_partition, reader_for
from samestyle.streams.settings import Settings
from samestyle.streams.switch.indexes import CollectionIndexes, ModelIndexes
from samestyle.streams.switch.record import SwitchRecord
from samestyle.streams.worker.metrics import PartitionLag, partition_lags
from samestyle.streams.worker.pipeline import AlertedPairs, EmbeddingUpdate, Incoming, decode_embedding, now_ms
from samestyle.topics import DUPLICATE_ALERTS, TopicSpec, codec_for_topic
from samestyle.topics.errors import BadInputError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.streams.worker.metrics import Metrics

log = logging.getLogger(__name__)

#: How long a record the index agent waits for must lie at or beyond the end of its recreated
#: partition, read to that end, before it counts as lost with the old log (IndexReplica.wait_applied).
LOST_RECORD_SECONDS = 1.0
#: Fetches of the replica (each one after the wait began) that must confirm that end first.
LOST_RECORD_FETCHES = 2


class _Readiness:
    """``wait_ready`` for a service that sets ``ready`` and notifies ``_changed`` when it does."""

    ready: asyncio.Event
    _changed: asyncio.Condition
    should_stop: bool

    async def wait_ready(self) -> None:
        """Return once the index serves from a chosen version (or the worker stops)."""
        if self.ready.is_set():
            return
        async with self._changed:
            await self._changed.wait_for(lambda: self.ready.is_set() or self.should_stop)


class IndexReplica(_Readiness, Service):
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
        #: Partitions whose log was found recreated (shorter than what was applied) since start-up.
        self._recreated: set[int] = set()
        #: Fetches the apply loop completed (a wait counts the ones after it began).
        self._fetches = 0
        self._last_snapshot = time.monotonic()
        #: A target version to switch to even though its index is incomplete (a switch's deadline).
        self._forced: str | None = None
        #: What the model switch wants recorded with each snapshot (None: nothing new to record;
        #: set by the worker once the switch exists: ``ModelSwitch.record``).
        self.switch_record: Callable[[], SwitchRecord | None] | None = None
        #: The record the next snapshot writes: the loaded one until the switch knows its target,
        #: so a snapshot taken before that does not forget an unfinished switch.
        self._record: SwitchRecord | None = indexes.switch_record

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
        if self._dirty or self._record_changed():
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
        the new log to grow past the old offset and silently skip everything before it. Before the
        replica is ready, the start-up end of that partition is read again from the new log.
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
                self._recreated.add(p)
                if not self.ready.is_set():
                    self._start_ends.pop(p, None)
                if self.metrics is not None:
                    self.metrics.log_resets.labels("replica").inc()

    def force_switch(self, target: str) -> None:
        """Switch to ``target`` at the next check even if its index lacks listings of the active one
        (applied by the apply loop, the indexes' one writer)."""
        self._forced = target

    def is_caught_up_to(self, partition: int, offset: int) -> bool:
        return self.applied.get(partition, 0) > offset

    async def make_searchable(self, messages: Sequence[Incoming], updates: Sequence[EmbeddingUpdate]) -> None:
        """Return once every message of the index agent's batch is in the replica."""
        for msg in messages:
            await self.wait_applied(msg.partition, msg.offset)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run blocking index work (a search) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def lacking(self, target: str) -> list[str]:
        return self.indexes.lacking(target)

    async def missing(self, target: str) -> int:
        return self.indexes.missing(target)

    def listings(self) -> int:
        """Listings in the active index."""
        index = self.indexes.active_index
        return len(index) if index is not None else 0

    async def wait_applied(self, partition: int, offset: int) -> None:
        """Return once the record at ``offset`` of ``partition`` is in the index, or once it is lost
        with a recreated log (:meth:`_lost`): then it is searched without being in the index, and a
        warning names it."""
        if self.is_caught_up_to(partition, offset) and self.ready.is_set():
            return
        since = (self._fetches, time.monotonic())
        async with self._changed:
            await self._changed.wait_for(
                lambda: (self.ready.is_set() and (self.is_caught_up_to(partition, offset)
                                                  or self._lost(partition, offset, since))) or self.should_stop)
        if not self.should_stop and not self.is_caught_up_to(partition, offset):
            log.warning("replica: %s[%d]@%d lies beyond the end (%s) of the recreated log: the record was lost "
                        "with the old log; searched without waiting for it", self.topic, partition, offset,
                        self._reader.highwater((self.topic, partition)) if self._reader is not None else None)

    def _lost(self, partition: int, offset: int, since: tuple[int, float]) -> bool:
        """Whether the record at ``offset`` of ``partition``, read by the index agent before ``since``
        (this replica's fetch count and the monotonic time then), belongs to a log that is gone.

        True once ``partition``'s log was found recreated, this replica has read it to its end, that
        end lies at or below ``offset``, and at least :data:`LOST_RECORD_SECONDS` and
        :data:`LOST_RECORD_FETCHES` of its fetches have passed since ``since``. A log never ends
        below a record once read from it, so the record came from the old log (read before the
        broker restarted empty, or the topic was created again), and the new log, which does not
        reach it, will never bring it; waiting would hold the index agent, and with it the next
        rebalance, until the new log grows past it, possibly forever. What the new log does hold is never skipped: a record below its end is
        waited for as usual. The delays cover a record of the new log that the agent read before
        this replica's reader heard of the end that holds it.
        """
        if partition not in self._recreated or self._reader is None:
            return False
        end = self._reader.highwater((self.topic, partition))
        fetches, began = since
        return (end is not None and end <= offset and self.applied.get(partition, 0) >= end
                and self._fetches >= fetches + LOST_RECORD_FETCHES
                and time.monotonic() - began >= LOST_RECORD_SECONDS)

    @Service.task
    async def _apply_loop(self) -> None:
        assert self._reader is not None
        loop = asyncio.get_running_loop()
        while not self.should_stop:
            self._restart_truncated_partitions()
            records = await self._reader.fetch(timeout=0.2, max_records=2000)
            self._fetches += 1
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
            else:
                async with self._changed:
                    if not self.ready.is_set() or (self.target_version is not None
                                                   and self.target_version() != self.indexes.active):
                        self._check_models()
                    self._changed.notify_all()  # a wait for a record lost with its log may end now
            interval = self.settings.snapshot_interval_seconds
            if (interval > 0 and (self._dirty or self._record_changed())
                    and time.monotonic() - self._last_snapshot >= interval):
                await self.snapshot()

    def _record_changed(self) -> bool:
        """True when the switch's record differs from the one last written (a promotion, a new state)."""
        current = self.switch_record() if self.switch_record is not None else None
        return current is not None and current != self._record

    async def snapshot(self) -> None:
        offsets = dict(self.applied)
        self._dirty = False
        self._last_snapshot = time.monotonic()
        current = self.switch_record() if self.switch_record is not None else None
        if current is not None:
            self._record = current
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.indexes.snapshot, self.snapshot_dir, offsets, self._record)
        if self.metrics is not None:
            self.metrics.index_snapshots.inc()
        log.info("index snapshot: %s at offsets %s -> %s", {v: len(i) for v, i in self.indexes.indexes.items()},
                 offsets, self.snapshot_dir)


#: How often the shared index re-reads the alias, checks the switch rule and counts the active collection.
SHARED_CHECK_SECONDS = 1.0
#: How long a collection switched away from is kept before it is dropped: batches in flight
#: on other workers may still be searching it.
RETIRED_DROP_SECONDS = 60.0
#: Longest pause between two attempts at an unreachable index server.
RETRY_MAX_PAUSE_SECONDS = 5.0


class SharedIndex(_Readiness, Service):
    """The index of a worker that holds no replica: the per-version collections of a shared backend.

    ``make_backend`` opens the backend (``create_backend`` for Milvus). Everything that talks to it
    runs on one thread of its own, in order: the index agent's writes and searches, and this
    service's checks (the alias another worker may have moved, the switch rule, the count of the
    active collection, dropping collections switched away from). A backend that cannot be reached
    is retried for ``settings.milvus_retry_seconds`` (nothing is committed meanwhile); then the
    error propagates and takes the worker down, to be restarted.
    """

    def __init__(self, settings: Settings, make_backend: Callable[[], IndexBackend],
                 target_version: Callable[[], str | None], version_order: Callable[[], Mapping[str, int]],
                 metrics: "Metrics | None" = None, crash: Callable[[BaseException], Awaitable[None]] | None = None,
                 **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.settings = settings
        self.metrics = metrics
        self._make_backend = make_backend
        self.target_version = target_version
        self.version_order = version_order
        self._crash = crash
        self.ready = asyncio.Event()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index")
        self.backend: IndexBackend | None = None
        self.indexes: CollectionIndexes | None = None  # type: ignore[assignment]
        self._forced: str | None = None
        self._count = 0
        #: version -> when it was first seen ranked below the active one (for RETIRED_DROP_SECONDS).
        self._older_since: dict[str, float] = {}
        self._changed = asyncio.Condition()
        # Held by each check and by on_stop: the backend is never closed under a check in flight.
        self._checking = asyncio.Lock()

    # ------------------------------------------------------------------ the surface

    @property
    def index(self) -> VersionView | None:
        """The active collection (None before the service is ready, or before its first write)."""
        return self.indexes.active_index if self.indexes is not None else None

    @property
    def active_version(self) -> str | None:
        return self.indexes.active if self.indexes is not None else None

    def listings(self) -> int:
        """Listings in the active collection, as last counted (every SHARED_CHECK_SECONDS)."""
        return self._count

    def lags(self) -> list[PartitionLag]:
        return []  # no replica consumer: the index agent's group lag is the index's lag

    def force_switch(self, target: str) -> None:
        """Switch to ``target`` at the next check even if its collection lacks listings of the active one."""
        self._forced = target

    async def make_searchable(self, messages: Sequence[Incoming], updates: Sequence[EmbeddingUpdate]) -> None:
        """Write the index agent's batch into the collections (the re-embedding's records too), so
        that its searches, and every later one on any worker, find it (reads are Strong)."""
        await self.wait_ready()
        assert self.indexes is not None
        if updates:
            await self.run(self.indexes.apply, list(updates), self.target_version())
            if self.metrics is not None:
                self.metrics.observe_freshness(self.metrics.listing_to_searchable,
                                               [u.event_time for u in updates if u.op != "DELETE"], now_ms())

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` on the index thread, retried while the backend is unreachable (see the class)."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self.settings.milvus_retry_seconds
        pause, warned = 0.2, 0.0
        while True:
            try:
                return await loop.run_in_executor(self._thread, fn, *args)
            except IndexUnavailableError as exc:
                now = time.monotonic()
                if now >= deadline or self.should_stop:
                    log.error("index backend unreachable for %.0f s (SAMESTYLE_MILVUS_RETRY_SECONDS): %s",
                              self.settings.milvus_retry_seconds, exc)
                    raise
                if now - warned > 10:
                    warned = now
                    log.warning("index backend unreachable, retrying: %s", exc)
                await asyncio.sleep(pause)
                pause = min(2 * pause, RETRY_MAX_PAUSE_SECONDS)

    async def lacking(self, target: str) -> list[str]:
        assert self.indexes is not None
        return await self.run(self.indexes.lacking, target)

    async def missing(self, target: str) -> int:
        assert self.indexes is not None
        return await self.run(self.indexes.missing, target)

    # ------------------------------------------------------------------ the service

    async def on_start(self) -> None:
        self.backend = await self.run(self._make_backend)
        self.indexes = CollectionIndexes(self.backend, self.version_order)
        log.info("shared index on %r (no replica in this worker)", self.backend)

    async def on_stop(self) -> None:
        async with self._checking:
            backend, self.backend = self.backend, None
        if backend is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, backend.close)
        self._thread.shutdown(wait=False)

    @Service.task
    async def _watch(self) -> None:
        try:
            while not self.should_stop:
                await self._check()
                await self.sleep(SHARED_CHECK_SECONDS)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("shared index failed")
            if self._crash is not None:
                await self._crash(exc)
            raise

    async def _check(self) -> None:
        async with self._checking:
            if self.backend is not None:  # None: stopped, its backend closed
                await self._check_backend()

    async def _check_backend(self) -> None:
        assert self.indexes is not None
        target = self.target_version()
        if not self.ready.is_set():
            if target is None:
                return
            chosen = await self.run(self.indexes.choose_active, target, self.version_order())
            log.info("shared index ready: serving model %s (%d listings)", chosen,
                     await self.run(self.backend.count, chosen))  # type: ignore[union-attr]
            async with self._changed:
                self.ready.set()
                self._changed.notify_all()
        before = self.indexes.active
        if target is not None and target != before:
            await self.run(self.indexes.try_switch, target, self._forced == target)
        else:
            await self.run(self.indexes.refresh)
        if self.indexes.active != before and self.metrics is not None:
            self.metrics.model_switches.inc()
        await self._drop_older()
        active = self.indexes.active
        self._count = await self.run(self.backend.count, active) if active is not None else 0  # type: ignore[union-attr]
        if self.metrics is not None:
            self.metrics.index_vectors.set(self._count)

    async def _drop_older(self) -> None:
        assert self.indexes is not None
        now, older = time.monotonic(), set(self.indexes.older()) - {self.target_version()}
        self._older_since = {v: self._older_since.get(v, now) for v in older}
        for version, since in list(self._older_since.items()):
            if now - since >= RETIRED_DROP_SECONDS:
                await self.run(self.indexes.drop, version)
                del self._older_since[version]


class AlertedPairsFollower(LogFollower):
    """Follows ``duplicate-alerts`` (its newest ``pairs.capacity`` records per partition, then
    everything new) into ``pairs``; ``ready`` once the start-up read is in. The index agent waits
    for it before its first batch: a batch replayed after a crash then finds its alerts remembered."""

    fetch_wait_seconds = 0.2

    def __init__(self, settings: Settings, spec: TopicSpec, pairs: AlertedPairs, **kwargs: Any) -> None:
        super().__init__(settings, "alerted", **kwargs)
        self.pairs = pairs
        self.ready = asyncio.Event()
        self._partitions = every_partition(spec.name, spec.partitions)
        self._codec = codec_for_topic(DUPLICATE_ALERTS)

    async def position(self, reader: LogReader) -> None:
        await reader.assign(self._partitions)
        # The listed end may lie below the real one (LogReader.listed_bounds): starting early is harmless.
        bounds = await reader.listed_bounds()
        await reader.assign({p: max(first, end - self.pairs.capacity) for p, (first, end) in bounds.items()})

    def fold(self, record: LogRecord) -> None:
        try:
            if record.value is None:
                raise BadInputError("null value")
            alert = self._codec.decode(record.value)
        except BadInputError as exc:
            log.warning("%s[%d]@%d skipped by the alerted-pairs memory: %s", record.topic, record.partition,
                        record.offset, exc)
            return
        self.pairs.add(alert["listing_id"], alert["duplicate_of"])

    def caught_up(self) -> None:
        log.info("alerted pairs: %d remembered from %s", len(self.pairs), self._partitions[0][0])
        self.ready.set()

    async def wait_ready(self) -> None:
        while not self.ready.is_set() and not self.should_stop:
            await asyncio.sleep(0.05)
