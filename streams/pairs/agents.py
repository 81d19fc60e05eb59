"""The pairs agents: click events → positive pairs, a batch at a time, exact across restarts and rebalances.

Two stages (:mod:`samestyle.streams.pairs.mining`), one consumer of the group ``{app_id}-pairs``
subscribed to both sources, and one table partition per source partition:

    click-events (key session) ─► sessionize, table pairs-sessions ─► click-pairs (key pair)
    click-pairs                ─► evidence,   table pairs-evidence ─► positive-pairs (once per pair)

A fetch returns up to ``pairs_batch_max_records`` records. Per source partition the batch is
folded into that partition's :class:`~samestyle.streams.pairs.store.TableStore` in log order and
every key it changed is written to the table's changelog **once** (``{app_id}-pairs-*-changelog``,
partition = source partition), however many of the batch's clicks it got. Records go out through
:class:`Outbox`: one producer batch per topic partition, not one send per record.

Exactness is at-least-once with idempotent stages, as before batching:

* offsets are committed only after every changelog record, forward, dead letter and positive
  pair of the batches before them was acknowledged by the broker; a crash replays from the last
  commit, and replays change nothing: a session window is found again from the session's window
  starts, and a forwarded click carries its origin (click-events partition and offset, in a
  header; its session window in another, the value is the click's own bytes), so the evidence
  recognises the copies a replay re-forwards by the highest origin offset it counted per
  partition (:func:`~samestyle.streams.pairs.mining.add_click`);
* a newly positive pair is sent only after the state naming it (``emitted``, ``sent: false``) was
  acknowledged; once the send is acknowledged ``sent: true`` is written, so a replay re-sends
  (byte-identical, same key) only a pair whose acknowledgement was not recorded;
* a new owner of a partition reads its changelog partition to the **high-water mark of a fetch
  response** (:class:`~samestyle.streams.io.reader.LogReader`) before it processes any record of
  it. That end is right on tansu even when the changelog was written in multi-record batches
  (its listed end offsets are not: BROKER.md trap 1), so no producer needs one-record batches;
* on a rebalance the revoked partitions are committed first; a partition kept through the
  rebalance keeps its table, any other table is dropped and read again when assigned; a batch
  fetched before a rebalance is dropped unprocessed and its partitions are read again from the
  committed offsets.

Pairs and sessions idle for ``pairs_evidence_ttl_seconds`` of event time expire (tombstones on the
changelog). Categories and cosines come from the worker's served index (``index()``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from functools import lru_cache
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from mode import Service

from samestyle.streams.io.reader import reader_for
from samestyle.streams.pairs.mining import (
    Origin,
    PairRules,
    evidence_batch,
    mark_sent,
    pair_key,
    sessionize_batch,
    window_of,
    windowed_session_id,
)
from samestyle.streams.pairs.store import (
    TableStore,
    decode_value,
    encode_value,
    evidence_kind,
    evidence_time,
    session_time,
)
from samestyle.streams.settings import Settings
from samestyle.streams.worker.metrics import Metrics, PartitionLag, partition_lags
from samestyle.streams.worker.pipeline import Failure, Incoming
from samestyle.topics import CLICK_EVENTS, CLICK_PAIRS, DEAD_LETTERS, POSITIVE_PAIRS, codec_for_topic, topic_specs
from samestyle.topics.errors import BadInputError
from samestyle.topics.registry import PAIRS_EVIDENCE_TABLE, PAIRS_SESSIONS_TABLE, changelog_topic

log = logging.getLogger(__name__)

#: Agent labels of ``samestyle_messages_processed_total`` for the two stages.
SESSIONIZE, EVIDENCE = "pairs-sessionize", "pairs-evidence"
#: The header of a click-pairs record naming its session window (the value is the click as it
#: came on click-events; a record without the header carries the window in its ``session_id``).
WINDOW_HEADER = "session-window"
#: The header naming where the sessionize stage read a click: ``<click-events partition>:<offset>``.
ORIGIN_HEADER = "origin"
#: Largest producer batch (bytes): big enough that a fetch's writes to a partition go in one or two.
PRODUCER_BATCH_BYTES = 1 << 20


def consumer_group(settings: Settings) -> str:
    """The pairs agents' consumer group (beside Faust's ``app_id`` group of the embed/index agents)."""
    return f"{settings.app_id}-pairs"


@lru_cache(maxsize=1 << 16)
def _key_hash(key: bytes) -> int:
    return murmur2(key) & 0x7FFFFFFF


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the Java client (and aiokafka, and Faust) picks for ``key``: murmur2."""
    return _key_hash(key) % partitions


class Outbox:
    """Records for one producer, appended into one batch per topic partition and sent as batches.

    :meth:`drain` sends what is open and waits until the broker acknowledged every record added
    so far (a failed delivery raises there, never silently).
    """

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._open: dict[tuple[str, int], Any] = {}
        self._full: list[tuple[tuple[str, int], Any]] = []
        self._pending: list[asyncio.Future[Any]] = []

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
        headers = headers or []  # aiokafka's C batch builder takes a list only
        tp = (topic, partition)
        batch = self._open.get(tp)
        if batch is None:
            batch = self._open[tp] = self._producer.create_batch()
        if batch.append(timestamp=None, key=key, value=value, headers=headers) is None:  # full: the next one
            self._full.append((tp, batch))
            batch = self._open[tp] = self._producer.create_batch()
            batch.append(timestamp=None, key=key, value=value, headers=headers)

    async def submit(self) -> None:
        """Hand every batch to the producer (in order per partition), without waiting for acknowledgements."""
        batches = [*self._full, *self._open.items()]
        self._full, self._open = [], {}
        for (topic, partition), batch in batches:
            self._pending.append(await self._producer.send_batch(batch, topic, partition=partition))

    async def drain(self) -> None:
        await self.submit()
        pending, self._pending = self._pending, []
        if pending:
            await asyncio.gather(*pending)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, agents: PairsAgents) -> None:
        self._agents = agents

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        await self._agents.on_revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._agents.on_assigned(set(assigned))


class PairsAgents(Service):
    """Both stages of the click-pairs agents in one worker service (see the module docstring).

    ``index()`` is the served index (categories, cosines), ``model_version()`` its model,
    ``ready()`` returns once it is caught up (the agents join their group then);
    ``crash(exc)`` takes the worker down (a pairs failure must not leave a worker that no longer
    commits).
    """

    def __init__(self, settings: Settings, metrics: Metrics, *, index: Callable[[], Any],
                 model_version: Callable[[], str | None], ready: Callable[[], Awaitable[None]],
                 crash: Callable[[BaseException], Awaitable[None]], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings, self.metrics = settings, metrics
        self._ready = ready
        self._served_index, self._model_version, self._crash_worker = index, model_version, crash
        self.rules = PairRules.from_settings(settings)
        specs = topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id)
        self.clicks_topic = specs[CLICK_EVENTS].name
        self.pairs_topic = specs[CLICK_PAIRS].name
        self.positive_topic = specs[POSITIVE_PAIRS].name
        self.dead_letters_topic = specs[DEAD_LETTERS].name
        self._partitions = {name: specs[key].partitions for key, name in
                            ((CLICK_PAIRS, self.pairs_topic), (POSITIVE_PAIRS, self.positive_topic),
                             (DEAD_LETTERS, self.dead_letters_topic))}
        self.changelogs = {self.clicks_topic: changelog_topic(settings.app_id, PAIRS_SESSIONS_TABLE),
                           self.pairs_topic: changelog_topic(settings.app_id, PAIRS_EVIDENCE_TABLE)}
        self._ttl_ms = int(settings.pairs_evidence_ttl_seconds * 1000) if settings.pairs_evidence_ttl_seconds else None
        self._codec = codec_for_topic(CLICK_EVENTS)
        self._out_codec = codec_for_topic(POSITIVE_PAIRS)
        self.stores: dict[TopicPartition, TableStore] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int | None] = {}
        self._batch_lock = asyncio.Lock()
        self._generation = 0
        #: Tables of the partitions held when the last rebalance began (kept if assigned again).
        self._kept: set[TopicPartition] = set()
        self._last_commit = time.monotonic()
        self._stopping = False
        #: Set when a batch failed half-way: nothing may be committed after that.
        self._failed = False
        self._group: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._outbox: Outbox | None = None
        for agent in (SESSIONIZE, EVIDENCE):
            metrics.count(agent, 0, 0)

    # --- life cycle -----------------------------------------------------------------------------

    async def on_start(self) -> None:
        s = self.settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=s.bootstrap_servers, client_id=f"{s.worker_id}-pairs", acks="all",
            enable_idempotence=False,  # tansu has no idempotent producers (BROKER.md trap 3)
            linger_ms=5, max_batch_size=PRODUCER_BATCH_BYTES,
            max_request_size=max(s.max_message_bytes, 2 * PRODUCER_BATCH_BYTES))
        await self._producer.start()
        self._outbox = Outbox(self._producer)
        self._group = AIOKafkaConsumer(
            bootstrap_servers=s.bootstrap_servers, group_id=consumer_group(s), client_id=f"{s.worker_id}-pairs",
            enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=int(s.session_timeout_seconds * 1000),
            heartbeat_interval_ms=int(s.heartbeat_interval_seconds * 1000),
            fetch_max_wait_ms=int(s.consumer_fetch_max_wait_seconds * 1000),
            max_partition_fetch_bytes=s.max_message_bytes, fetch_max_bytes=max(s.max_message_bytes, 52_428_800))
        await self._group.start()

    async def on_stop(self) -> None:
        async with self._batch_lock:  # a batch in progress finishes first
            self._stopping = True
            if self._group is not None and self.stores and not self._failed:
                await self._commit()
        if self._group is not None:
            await self._group.stop()  # leaves the group (its revoke commits nothing new)
            self._group = None
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None

    @Service.task
    async def _run(self) -> None:
        try:
            await self._consume()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed = True
            log.exception("pairs agents failed")
            await self._crash_worker(exc)
            raise

    async def _consume(self) -> None:
        assert self._group is not None
        # Categories and cosines come from the served index: join only once it is caught up, or
        # the first pairs after a restart would be decided as if no listing were indexed.
        await self._ready()
        if self.should_stop:
            return
        self._group.subscribe([self.clicks_topic, self.pairs_topic], listener=_Rebalance(self))
        interval = self.settings.pairs_commit_interval_seconds
        wait_ms = int(self.settings.consumer_fetch_max_wait_seconds * 1000) + 100
        busy = False
        while not self.should_stop and not self._stopping:
            # Busy: take what the fetcher already holds without waiting; when that runs dry the
            # agents have caught up with their fetches and commit at once (low end-to-end delay).
            batches = await self._group.getmany(timeout_ms=0 if busy else wait_ms,
                                                max_records=self.settings.pairs_batch_max_records)
            generation = self._generation  # no await since getmany: the assignment these came from
            async with self._batch_lock:
                if self._stopping or self._failed:
                    return
                if generation != self._generation:
                    # A rebalance came in while waiting for the lock: the records may be of the old assignment.
                    await self._refetch(batches)
                    continue
                if batches:
                    await self._process(batches)
                busy = bool(batches)
                if self._uncommitted() and (not busy or time.monotonic() - self._last_commit >= interval):
                    await self._commit()

    # --- one batch ------------------------------------------------------------------------------

    async def _process(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        outbox = self._outbox
        assert outbox is not None
        now = int(time.time() * 1000)
        positives: list[tuple[TopicPartition, str, dict[str, Any]]] = []
        failures: list[Failure] = []
        done: dict[TopicPartition, int] = {}
        for tp, records in batches.items():
            store = self.stores.get(tp)
            if store is None or not records:  # not (or no longer) this worker's partition
                continue
            expired = store.expire()
            if expired:
                self.metrics.pairs_expired.labels(self._table(tp)).inc(expired)
            clicks, kept = [], []
            for r in records:
                try:
                    if r.value is None:
                        raise BadInputError("empty message (null value)")
                    clicks.append(self._codec.decode(r.value))
                    kept.append(r)
                except BadInputError as exc:
                    failures.append(Failure(Incoming(r.key, r.value, tp.topic, tp.partition, r.offset), "pairs", exc))
            if tp.topic == self.clicks_topic:
                n = self._partitions[self.pairs_topic]
                source = str(tp.partition)
                for i, click in sessionize_batch(store, clicks, self.rules):
                    key = pair_key(click["trigger_id"], click["clicked_id"]).encode()
                    # The click's own bytes; its session window and origin in headers (no re-encoding).
                    outbox.add(self.pairs_topic, partition_for(key, n), key, kept[i].value,
                               [(WINDOW_HEADER, window_of(click).encode()),
                                (ORIGIN_HEADER, f"{source}:{kept[i].offset}".encode())])
                agent = SESSIONIZE
            else:
                sent = evidence_batch(store, [self._pair_click(tp, r, c) for r, c in zip(kept, clicks)], self.rules,
                                      self._lookup, self._model_version(), now)
                positives.extend((tp, key, record) for key, record in sent)
                agent = EVIDENCE
            self._write_changes(tp, store)
            done[tp] = records[-1].offset + 1
            self.metrics.count(agent, len(clicks), len(records) - len(clicks))
        if failures:
            self._dead_letter(failures)
        if positives:
            await self._send_positives(positives)
        self._next.update(done)  # only now: committing them needs the positives delivered
        self._update_gauges()

    async def _send_positives(self, positives: list[tuple[TopicPartition, str, dict[str, Any]]]) -> None:
        """Send after the states naming them are acknowledged; record ``sent`` once the sends are."""
        outbox = self._outbox
        assert outbox is not None
        await outbox.drain()
        n = self._partitions[self.positive_topic]
        for _, key, record in positives:
            raw = key.encode()
            outbox.add(self.positive_topic, partition_for(raw, n), raw, self._out_codec.encode(record))
        await outbox.drain()
        self.metrics.pairs_emitted.inc(len(positives))
        by_tp: dict[TopicPartition, list[str]] = {}
        for tp, key, _ in positives:
            by_tp.setdefault(tp, []).append(key)
        for tp, keys in by_tp.items():
            store = self.stores.get(tp)
            if store is not None:
                mark_sent(store, keys)
                self._write_changes(tp, store)
        await outbox.drain()  # keeps the window in which a replay could repeat a pair short

    def _write_changes(self, tp: TopicPartition, store: TableStore) -> None:
        assert self._outbox is not None
        changelog = self.changelogs[tp.topic]
        for key, value in store.changes():
            self._outbox.add(changelog, tp.partition, key.encode(), encode_value(value))

    def _dead_letter(self, failures: list[Failure]) -> None:
        assert self._outbox is not None
        for f in failures:
            m = f.incoming
            log.warning("dead-letter %s[%d]@%d (%s): %s: %s", m.topic, m.partition, m.offset, f.stage,
                        type(f.error).__name__, f.error)
            key = m.key or b""
            self._outbox.add(self.dead_letters_topic, partition_for(key, self._partitions[self.dead_letters_topic]),
                             key, f.dead_letter())
        self.metrics.observe_dead_letters([(f.stage, type(f.error).__name__) for f in failures])

    @staticmethod
    def _pair_click(tp: TopicPartition, record: Any, click: dict[str, Any]) -> tuple[Origin, dict[str, Any]]:
        """``(origin, click with its session window)`` of a click-pairs record, from its headers."""
        headers = dict(record.headers)
        window, origin = headers.get(WINDOW_HEADER), headers.get(ORIGIN_HEADER)
        if window is not None:
            click["session_id"] = windowed_session_id(click["session_id"], window.decode())
        if origin is not None:
            source, _, offset = origin.decode(errors="replace").rpartition(":")
            if source and offset.isdigit():
                return (source, int(offset)), click
        # No origin (not written by these agents): the record is its own origin.
        return (f"{tp.topic}[{tp.partition}]", record.offset), click

    def _lookup(self, listing_id: str) -> Any:
        served = self._served_index()
        return served.get(listing_id) if served is not None else None

    def _table(self, tp: TopicPartition) -> str:
        return "sessions" if tp.topic == self.clicks_topic else "evidence"

    # --- commits and rebalances -----------------------------------------------------------------

    async def _refetch(self, batches: Mapping[TopicPartition, list[Any]]) -> None:
        """Read the partitions of unprocessed ``batches`` that are still assigned again from their
        committed offsets (the position moved past the records when they were returned)."""
        assert self._group is not None
        for tp in batches:
            if tp not in self.stores:
                continue
            committed = self._committed.get(tp)
            if committed is None:
                await self._group.seek_to_beginning(tp)
            else:
                self._group.seek(tp, committed)

    def _uncommitted(self) -> dict[TopicPartition, int]:
        return {tp: o for tp, o in self._next.items() if tp in self.stores and self._committed.get(tp) != o}

    async def _commit(self) -> bool:
        """Every write of the processed records acknowledged (a failed delivery raises: the worker
        goes down and replays), then their offsets committed; False when the group refused the
        commit (a rebalance under way, or this worker is no longer a member: the next commit or
        the revocation tries again)."""
        assert self._group is not None and self._outbox is not None
        if self._failed:
            return False
        await self._outbox.drain()
        self._last_commit = time.monotonic()
        offsets = self._uncommitted()
        if not offsets:
            return True
        try:
            await self._group.commit(offsets)
        except KafkaError as exc:
            log.warning("pairs agents: commit refused (%s)", exc)
            return False
        self._committed.update(offsets)
        return True

    async def on_revoked(self, revoked: set[TopicPartition]) -> None:
        async with self._batch_lock:
            self._generation += 1
            self._kept = set()
            if not self.stores or self._stopping:  # stopping: on_stop committed already
                return
            try:
                committed = not self._failed and await self._commit()
            except Exception as exc:  # a write was not delivered: nothing more may be committed
                self._failed, committed = True, False
                log.exception("pairs agents: delivery failed while partitions were revoked")
                await self._crash_worker(exc)
            if not committed:
                log.warning("pairs agents: tables dropped, read again from the changelogs when assigned")
                self.stores.clear()  # another member may have processed them meanwhile
            self._kept = set(self.stores)

    async def on_assigned(self, assigned: set[TopicPartition]) -> None:
        async with self._batch_lock:
            self._generation += 1
            self.stores = {tp: s for tp, s in self.stores.items() if tp in assigned and tp in self._kept}
            self._next = {tp: o for tp, o in self._next.items() if tp in self.stores}
            fresh = sorted(assigned - set(self.stores))
            if fresh:
                await self._recover(fresh)
            assert self._group is not None
            self._committed = {tp: await self._group.committed(tp) for tp in assigned}
            self._update_gauges()

    async def _recover(self, tps: list[TopicPartition]) -> None:
        """Each table partition from its changelog, read to the high-water mark of a fetch response."""
        started = time.monotonic()
        stores = {tp: self._new_store(tp) for tp in tps}
        by_changelog = {(self.changelogs[tp.topic], tp.partition): stores[tp] for tp in tps}
        records = 0
        async with reader_for(self.settings, "pairs-recovery") as reader:
            await reader.assign(list(by_changelog))
            while not await reader.at_end():
                if self.should_stop:
                    return
                for r in await reader.fetch(timeout=0.5):
                    by_changelog[(r.topic, r.partition)].load(r.key.decode() if r.key else "", decode_value(r.value))
                    records += 1
        self.stores.update(stores)
        log.info("pairs tables recovered for %s: %d changelog records, %d keys in %.2f s",
                 ", ".join(f"{tp.topic}[{tp.partition}]" for tp in tps), records,
                 sum(len(s) for s in stores.values()), time.monotonic() - started)

    def _new_store(self, tp: TopicPartition) -> TableStore:
        if tp.topic == self.clicks_topic:
            return TableStore(self._ttl_ms, session_time)
        return TableStore(self._ttl_ms, evidence_time, evidence_kind)

    # --- metrics --------------------------------------------------------------------------------

    def _update_gauges(self) -> None:
        sizes = {"sessions": 0, "evidence": 0}
        kinds: dict[str, int] = {}
        for tp, store in self.stores.items():
            sizes[self._table(tp)] += len(store)
            for kind, n in store.kinds.items():
                kinds[kind] = kinds.get(kind, 0) + n
        for table, n in sizes.items():
            self.metrics.pairs_table_keys.labels(table).set(n)
        for kind in self.metrics.pairs_held_kinds:
            self.metrics.pairs_held.labels(kind).set(kinds.get(kind, 0))

    def lags(self) -> list[PartitionLag]:
        """Lag rows (consumer ``pairs``): fetch high-water mark − committed offset, per assigned partition."""
        consumer = self._group
        if consumer is None:
            return []
        highwaters: dict[tuple[str, int], int | None] = {}
        for tp in consumer.assignment():
            highwaters[(tp.topic, tp.partition)] = consumer.highwater(tp)
        positions = {(tp.topic, tp.partition): o for tp, o in self._committed.items()}
        return partition_lags("pairs", highwaters, positions)


__all__ = ["EVIDENCE", "SESSIONIZE", "Outbox", "PairsAgents", "consumer_group", "partition_for"]
