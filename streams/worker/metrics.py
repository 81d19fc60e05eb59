"""Prometheus metrics of one worker, served on its ``/metrics`` (see :mod:`streams.web`).

Naming follows Prometheus practice: one prefix (``samestyle_``), base units (seconds, bytes),
``_total`` on counters, and no listing ids in labels (labels are agent, stage, topic, partition:
all bounded sets).

Consumer lag is computed at scrape time as *fetch high-water mark − committed offset*. The
high-water mark comes from fetch responses (``AIOKafkaConsumer.highwater(tp)``), never from
``end_offsets``/``list_offsets(LATEST)``: the embedded broker answers those with the first offset
of the last batch + 1 (../shared/BROKER.md, trap 1). The same formula is right on real Kafka.

Each worker builds its own :class:`Metrics` with its own registry, so tests can build many apps
in one process without colliding in the global registry.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence

from mode import Service
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

PREFIX = "samestyle_"
AGENTS = ("embed", "index")
#: The click-pairs agents' stages (label ``agent`` of the message counters; see streams/pairs/agents.py).
PAIRS_AGENTS = ("pairs-sessionize", "pairs-evidence")
#: What holds a pair in the evidence table: the first constraint it fails, or ``emitted``.
PAIRS_HELD_BY = ("co_clicks", "sessions", "category", "cosine", "emitted")
#: The trainer's decisions on ``model-updates``.
DECISIONS = ("PROMOTED", "REJECTED")
#: The dead-letter kinds known in advance (topics.errors' BadInputError subclasses by stage).
DEAD_LETTER_KINDS = tuple((stage, error) for stage in AGENTS
                          for error in ("DecodeError", "InvalidListingError", "ImageError"))

#: Why a model switch left a listing of the serving index out of the new model's index: its
#: record is not in the listings log, the new model could not embed it, or the switch's deadline
#: passed without it (label ``reason`` of ``samestyle_model_switch_left_out_total``).
LEFT_OUT_REASONS = ("not_in_log", "reembed_failed", "deadline")

#: Listings per forward pass; the default batch size is 32.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: One forward pass: milliseconds (tiny models) to seconds (pretrained on CPU).
BATCH_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: Event time to searchable / emitted: sub-second when keeping up, minutes when catching up.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600)


@dataclass(frozen=True)
class PartitionLag:
    """One row of the lag metric: ``consumer`` is ``group`` (the agents) or ``replica``."""

    consumer: str
    topic: str
    partition: int
    highwater: int
    position: int

    @property
    def lag(self) -> int:
        # A position beyond the high-water mark happens for an instant after a commit and
        # before the next fetch response; lag is never negative.
        return max(0, self.highwater - self.position)


def partition_lags(consumer: str, highwaters: Mapping[tuple[str, int], Optional[int]],
                   positions: Mapping[tuple[str, int], Optional[int]]) -> list[PartitionLag]:
    """Lag per ``(topic, partition)`` that has a known high-water mark.

    ``positions`` maps to the committed (group) or applied (replica) *next* offset; a partition
    with none yet counts from 0 (every consumer here starts at the earliest offset). A partition
    without a high-water mark has not been fetched yet and is left out rather than guessed.
    """
    rows = []
    for (topic, partition), highwater in sorted(highwaters.items()):
        if highwater is None:
            continue
        position = positions.get((topic, partition)) or 0
        rows.append(PartitionLag(consumer, topic, partition, int(highwater), int(position)))
    return rows


def freshness_seconds(event_time_ms: int, now_ms: int) -> float:
    """Seconds from a listing's event time to now; clock skew never gives a negative age."""
    return max(0.0, (now_ms - event_time_ms) / 1000.0)


LagSource = Callable[[], Iterable[PartitionLag]]


class _DynamicCollector(Collector):
    """Values read at scrape time: lag per partition, rebalances, broker reachability."""

    def __init__(self, metrics: "Metrics") -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        families = self._families()
        lag, highwater, position, rebalances, decisions = families
        for row in self.metrics.lag_rows():
            labels = [row.consumer, row.topic, str(row.partition)]
            lag.add_metric(labels, row.lag)
            highwater.add_metric(labels, row.highwater)
            position.add_metric(labels, row.position)
        rebalances.add_metric([], self.metrics.rebalance_count())
        counts = self.metrics.trainer_decisions()
        for decision in DECISIONS:
            decisions.add_metric([decision], counts.get(decision, 0))
        return iter(families)

    @staticmethod
    def _families() -> list[Metric]:
        labels = ["consumer", "topic", "partition"]
        return [
            GaugeMetricFamily(PREFIX + "consumer_lag_messages",
                              "Fetch high-water mark minus committed (group) or applied (replica) offset",
                              labels=labels),
            GaugeMetricFamily(PREFIX + "consumer_highwater_offset",
                              "High-water mark of the partition from the last fetch response", labels=labels),
            GaugeMetricFamily(PREFIX + "consumer_position_offset",
                              "Next offset committed (group) or applied (replica)", labels=labels),
            CounterMetricFamily(PREFIX + "rebalances", "Consumer group rebalances seen by this worker"),
            CounterMetricFamily(PREFIX + "trainer_decisions",
                                "The trainer's decisions on model-updates, as this worker read them",
                                labels=["decision"]),
        ]


class Metrics:
    """Every metric of one worker, in its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.messages_processed = Counter(
            PREFIX + "messages_processed", "Messages an agent processed successfully", ["agent"], registry=r)
        self.messages_failed = Counter(
            PREFIX + "messages_failed", "Messages an agent could not process (each is dead-lettered)",
            ["agent"], registry=r)
        self.dead_letters = Counter(
            PREFIX + "dead_letters", "Messages sent to the dead-letter topic", ["stage", "error_type"], registry=r)
        self.embed_batch_size = Histogram(
            PREFIX + "embed_batch_size", "Listings per embed batch", buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.embed_batch_duration = Histogram(
            PREFIX + "embed_batch_duration_seconds", "Wall time of one embed batch (prepare + forward pass)",
            buckets=BATCH_DURATION_BUCKETS, registry=r)
        self.listing_to_searchable = Histogram(
            PREFIX + "listing_to_searchable_seconds",
            "Listing event time to the moment this worker's index holds it", buckets=FRESHNESS_BUCKETS, registry=r)
        self.listing_to_emitted = Histogram(
            PREFIX + "listing_to_emitted_seconds",
            "Listing event time to its similar-products message being acknowledged by the broker",
            buckets=FRESHNESS_BUCKETS, registry=r)
        self.similar_products = Counter(
            PREFIX + "similar_products_emitted", "similar-products messages emitted", registry=r)
        self.duplicate_alerts = Counter(
            PREFIX + "duplicate_alerts_emitted", "duplicate-alerts messages emitted", registry=r)
        self.index_vectors = Gauge(
            PREFIX + "index_vectors", "Listings in this worker's index replica", registry=r)
        self.index_snapshots = Counter(
            PREFIX + "index_snapshots", "Index snapshots written", registry=r)
        self.log_resets = Counter(
            PREFIX + "log_resets", "Partitions read again from 0 because their log ended below the consumed offset "
            "(topic recreated, or an in-memory broker restarted empty)", ["consumer"], registry=r)
        self.model = Info(PREFIX + "model", "Encoder model version of this worker", registry=r)
        self.model_switches = Counter(
            PREFIX + "model_switches", "Times this worker's index switched to a newly promoted model", registry=r)
        self.model_switch_missing = Gauge(
            PREFIX + "model_switch_missing",
            "Listings of the serving index the promoted model's index still lacks (0 when no switch is under way)",
            registry=r)
        self.model_switch_left_out = Counter(
            PREFIX + "model_switch_left_out",
            "Listings of the serving index a model switch left out of the new model's index, by reason",
            ["reason"], registry=r)
        self.model_load_failures = Counter(
            PREFIX + "model_load_failures", "Promoted models whose directory did not load (skipped)", registry=r)
        self.reembedded = Counter(
            PREFIX + "reembedded", "Catalogue records re-embedded by this worker for a model switch", registry=r)
        self.broker_up = Gauge(
            PREFIX + "broker_up", "1 when a bootstrap server accepted a connection at the last probe", registry=r)
        self.broker_down_seconds = Counter(
            PREFIX + "broker_down_seconds", "Seconds during which no bootstrap server accepted a connection",
            registry=r)
        self.pairs_emitted = Counter(
            PREFIX + "pairs_emitted", "Positive pairs the pairs agents sent to positive-pairs", registry=r)
        self.pairs_expired = Counter(
            PREFIX + "pairs_expired", "Table keys dropped after the pairs TTL of idle event time", ["table"],
            registry=r)
        self.pairs_table_keys = Gauge(
            PREFIX + "pairs_table_keys", "Keys in this worker's partitions of a pairs table (sessions, evidence)",
            ["table"], registry=r)
        self.pairs_held = Gauge(
            PREFIX + "pairs_held", "Pairs in this worker's evidence table by what holds them: the first constraint "
            "they fail, or emitted", ["held_by"], registry=r)
        self.pairs_held_kinds = PAIRS_HELD_BY
        # Zero samples from the start, so rate() and alerts see a series before the first event.
        for agent in (*AGENTS, *PAIRS_AGENTS):
            self.messages_processed.labels(agent)
            self.messages_failed.labels(agent)
        for table in ("sessions", "evidence"):
            self.pairs_expired.labels(table)
            self.pairs_table_keys.labels(table)
        for held_by in PAIRS_HELD_BY:
            self.pairs_held.labels(held_by)
        for consumer in ("group", "replica"):
            self.log_resets.labels(consumer)
        for reason in LEFT_OUT_REASONS:
            self.model_switch_left_out.labels(reason)
        for stage, error_type in DEAD_LETTER_KINDS:
            self.dead_letters.labels(stage, error_type)
        self.broker_up.set(1)
        self.lag_sources: list[LagSource] = []
        self.rebalance_count: Callable[[], int] = lambda: 0
        #: Decisions read from model-updates by kind (the worker's model watcher sets it).
        self.trainer_decisions: Callable[[], Mapping[str, int]] = dict
        r.register(_DynamicCollector(self))
        if process:
            # process_resident_memory_bytes etc.: the soak run plots RSS from them.
            ProcessCollector(registry=r)

    def lag_rows(self) -> list[PartitionLag]:
        """Every lag source's rows; a source that fails (a rebalance racing the read) is skipped."""
        rows: list[PartitionLag] = []
        for source in list(self.lag_sources):
            try:
                rows.extend(source())
            except Exception as exc:
                log.debug("lag source failed: %r", exc)
        return rows

    def lag_by_consumer(self) -> dict[str, int]:
        """Total lag per consumer (``group``, ``replica``)."""
        totals: dict[str, int] = {}
        for row in self.lag_rows():
            totals[row.consumer] = totals.get(row.consumer, 0) + row.lag
        return totals

    # --- observations -----------------------------------------------------------------------

    def observe_embed_batch(self, size: int, seconds: float, processed: int, failed: int) -> None:
        self.embed_batch_size.observe(size)
        self.embed_batch_duration.observe(seconds)
        self.count("embed", processed, failed)

    def count(self, agent: str, processed: int, failed: int) -> None:
        if processed:
            self.messages_processed.labels(agent).inc(processed)
        if failed:
            self.messages_failed.labels(agent).inc(failed)

    def observe_dead_letters(self, failures: Sequence[tuple[str, str]]) -> None:
        """``failures``: ``(stage, error_type)`` per dead-lettered message."""
        for stage, error_type in failures:
            self.dead_letters.labels(stage, error_type).inc()

    def observe_freshness(self, histogram: Histogram, event_times_ms: Iterable[int], now_ms: int | None = None) -> None:
        now = int(time.time() * 1000) if now_ms is None else now_ms
        for event_time in event_times_ms:
            histogram.observe(freshness_seconds(event_time, now))


def metric_names(metrics: Metrics) -> set[str]:
    """Every sample name this registry can expose (``_total``, ``_bucket``, ``_info`` … included)."""
    names: set[str] = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        for sample in family.samples:
            names.add(sample.name)
        if family.type == "counter":
            names.update({family.name + "_total", family.name + "_created"})
        if family.type == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count", "_created"))
        if family.type == "info":
            names.add(family.name + "_info")
    return names


async def probe_bootstrap(servers: Sequence[str], timeout: float = 1.0) -> bool:
    """True when any ``host:port`` accepts a TCP connection within ``timeout``."""
    for server in servers:
        host, _, port = server.rpartition(":")
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), timeout)
        except (OSError, asyncio.TimeoutError, ValueError):
            continue
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
        return True
    return False


class BrokerProbe(Service):
    """Probes the bootstrap servers every ``interval`` seconds: ``broker_up`` and the dead time.

    Kafka clients retry silently while the broker is away, so without this an outage would only
    show as a flat throughput line.
    """

    def __init__(self, metrics: Metrics, servers: Sequence[str], interval: float = 1.0, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.metrics = metrics
        self.servers = list(servers)
        self.interval = interval

    @Service.task
    async def _probe(self) -> None:
        last = time.monotonic()
        was_up = True
        while not self.should_stop:
            up = await probe_bootstrap(self.servers, timeout=self.interval)
            now = time.monotonic()
            if not up:
                self.metrics.broker_down_seconds.inc(now - last)
            if up != was_up:
                log.warning("broker %s", "reachable again" if up else f"unreachable at {','.join(self.servers)}")
            was_up = up
            self.metrics.broker_up.set(1 if up else 0)
            last = now
            await self.sleep(self.interval)
            now = time.monotonic()
            if not up:
                self.metrics.broker_down_seconds.inc(now - last)
            last = now



__all__ = ["Metrics", "PartitionLag", "partition_lags", "freshness_seconds", "metric_names", "probe_bootstrap",
           "PREFIX", "BrokerProbe"]
