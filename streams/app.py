"""The Faust application, built by :func:`create_app` from one :class:`~streams.settings.Settings`.

Agents (both in the consumer group ``settings.app_id``, so partitions split across workers):

* ``embed``  — ``listings`` in batches → the model (in an executor) → ``listing-embeddings``.
* ``index``  — ``listing-embeddings`` → wait until this worker's replica has applied the record
  → top-k search → ``similar-products`` for every upsert, ``duplicate-alerts`` for same-supplier
  near copies.

Beside them, :class:`~streams.replica.IndexReplica` keeps this worker's full copy of the index
from *all* partitions of ``listing-embeddings``.

Messages travel as raw bytes through Faust and are decoded by the steps in
:mod:`streams.pipeline`, so a message that does not decode is dead-lettered with its original
bytes instead of killing the agent. Outputs are awaited before a batch is acknowledged: delivery
is at-least-once and every write downstream is idempotent by listing id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Sequence

import faust
import mode
from faust.types import EventT

from index_store import LiveIndex
from models import Encoder, encoder_from_spec
from topics import DEAD_LETTERS, DUPLICATE_ALERTS, LISTING_EMBEDDINGS, LISTINGS, SIMILAR_PRODUCTS, topic_specs
from topics.errors import BadInputError

from .metrics import BrokerProbe, Metrics, PartitionLag, partition_lags
from .pipeline import VIEWS, EmbedStep, Failure, Incoming, Outgoing, SearchStep, decode_embedding, now_ms
from .replica import IndexReplica
from .settings import Settings
from .transport import install as install_transport
from .search_api import search_routes
from .web import WebServer, core_routes

log = logging.getLogger(__name__)


def incoming(event: EventT) -> Incoming:
    msg = event.message
    return Incoming(key=msg.key, value=msg.value, topic=msg.topic, partition=msg.partition, offset=msg.offset)


def snapshot_dir(settings: Settings) -> Path:
    return settings.state_dir / f"index-{settings.topic_prefix}{LISTING_EMBEDDINGS}"


class Runtime:
    """What the agents share in one worker: the encoder, the index, its replica and the sinks."""

    def __init__(self, app: faust.App, settings: Settings, encoder: Encoder | None) -> None:
        self.app = app
        self.settings = settings
        self._encoder = encoder
        self.specs = topic_specs(settings.topic_prefix, settings.partitions)
        # Model work gets one thread: torch already spreads one forward pass over every core.
        self.model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.topics = {key: app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                                      value_serializer="raw", partitions=spec.partitions)
                       for key, spec in self.specs.items()}
        self._embed_step: EmbedStep | None = None
        self.index: LiveIndex | None = None
        self.replica: IndexReplica | None = None
        self.metrics = Metrics()
        self.metrics.lag_sources.append(self.group_lags)
        self.metrics.rebalance_count = lambda: int(getattr(app, "rebalancing_count", 0))
        self.web: WebServer | None = None
        self._truncated_suspects: set[Any] = set()

    @property
    def encoder(self) -> Encoder:
        if self._encoder is None:
            self._encoder = encoder_from_spec(self.settings.encoder, device=self.settings.device,
                                              allow_random_weights=self.settings.allow_random_weights)
            log.info("encoder %s (dim %d) on %s", self._encoder.version, self._encoder.dim, self._encoder.device)
            self.metrics.model.info({"version": self._encoder.version, "dim": str(self._encoder.dim),
                                     "device": str(self._encoder.device)})
        return self._encoder

    def embed_step(self) -> EmbedStep:
        if self._embed_step is None:
            self._embed_step = EmbedStep(self.encoder, self.settings)
        return self._embed_step

    def build_replica(self) -> IndexReplica:
        directory = snapshot_dir(self.settings)
        index, offsets = LiveIndex.load_or_create(directory, dim=self.encoder.dim, kind=self.settings.index_kind,
                                                  n_views=len(VIEWS))
        self.index = index
        self.replica = IndexReplica(self.settings, index, self.specs[LISTING_EMBEDDINGS].name,
                                    self.specs[LISTING_EMBEDDINGS].partitions, directory, offsets,
                                    metrics=self.metrics)
        self.metrics.lag_sources.append(self.replica.lags)
        return self.replica

    def group_lags(self) -> list[PartitionLag]:
        """Lag of the agents' consumer group on this worker's assigned partitions.

        Faust's consumer runs in its own thread; these are plain reads of its state (a rebalance
        racing a scrape makes the metric skip one scrape, see Metrics).
        """
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return []
        highwaters: dict[tuple[str, int], int | None] = {}
        for tp in list(consumer.assignment()):
            try:
                highwaters[(tp.topic, tp.partition)] = consumer.highwater(tp)
            except Exception:  # not assigned any more (rebalance) or not fetched yet
                continue
        committed = dict(getattr(consumer, "_committed_offset", {}))
        positions = {(tp.topic, tp.partition): offset for tp, offset in committed.items()}
        return partition_lags("group", highwaters, positions)

    async def restart_truncated_partitions(self) -> None:
        """The group consumer's side of :meth:`IndexReplica._restart_truncated_partitions`.

        Faust drops any message below the last offset it read and commits only above the last
        commit, so after a topic is recreated both must be forgotten for that partition.
        """
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return
        for tp in list(consumer.assignment()):
            try:
                highwater = consumer.highwater(tp)
            except Exception:
                continue
            read = consumer._read_offset.get(tp)
            committed = consumer._committed_offset.get(tp)
            consumed = max((read + 1) if read is not None else 0, committed or 0)
            suspect = highwater is not None and highwater < consumed
            # Faust's consumer thread updates the high-water mark and the read offset at different
            # moments, so one sighting can be a race: act only when two checks in a row agree.
            was_suspect = tp in self._truncated_suspects
            self._truncated_suspects.discard(tp)
            if suspect and not was_suspect:
                self._truncated_suspects.add(tp)
            elif suspect:
                log.warning("%s[%d] ends at %d but %d were consumed: the topic was recreated; "
                            "reading it again from the start", tp.topic, tp.partition, highwater, consumed)
                consumer._committed_offset[tp] = None
                await consumer.seek(tp, 0)
                self.metrics.log_resets.labels("group").inc()

    def health(self) -> dict[str, Any]:
        """What /health answers: ok while the app runs and no agent has crashed."""
        crashed = [str(getattr(a, "name", a)) for a in self.app.agents.values()
                   if any(getattr(actor, "crash_reason", None) for actor in getattr(a, "_actors", []))]
        replica_running = self.replica is not None and self.replica.state == "running"
        return {
            "ok": not crashed and replica_running and not self.app.should_stop,
            "worker_id": self.settings.worker_id,
            "replica": self.replica.state if self.replica is not None else None,
            "crashed_agents": crashed,
            "index_vectors": len(self.index) if self.index is not None else 0,
            "model_version": self._encoder.version if self._encoder is not None else None,
            "rebalancing": bool(getattr(self.app, "rebalancing", False)),
        }

    async def run_model(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self.model_executor, fn, *args)

    async def send_all(self, topic_key: str, messages: Iterable[Outgoing]) -> None:
        """Send and wait for every delivery (the batch is acknowledged only after this returns)."""
        topic = self.topics[topic_key]
        futures = [await topic.send(key=m.key, value=m.value) for m in messages]
        if futures:
            await asyncio.gather(*futures)

    async def dead_letter(self, failures: Sequence[Failure]) -> None:
        for f in failures:
            m = f.incoming
            log.warning("dead-letter %s[%d]@%d (%s): %s: %s", m.topic, m.partition, m.offset, f.stage,
                        type(f.error).__name__, f.error)
        await self.send_all(DEAD_LETTERS, [Outgoing(f.incoming.key or b"", f.dead_letter()) for f in failures])
        self.metrics.observe_dead_letters([(f.stage, type(f.error).__name__) for f in failures])


def create_app(settings: Settings, *, encoder: Encoder | None = None) -> faust.App:
    """Build the worker application. ``encoder`` overrides ``settings.encoder`` (tests)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        autodiscover=False,
        # Topics are created explicitly (streams.broker.create_topics) before any worker starts:
        # tansu would auto-create missing ones with 4 partitions.
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.heartbeat_interval_seconds,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes,
        consumer_max_fetch_size=settings.max_message_bytes,
        datadir=str(settings.state_dir / "faust"),
        web_enabled=False,
        # A dead agent must take the worker down, not leave it running without committing.
        agent_supervisor=mode.CrashingSupervisor,
    )
    install_transport(app, settings.consumer_fetch_max_wait_seconds)
    runtime = Runtime(app, settings, encoder)
    app.samestyle = runtime  # type: ignore[attr-defined]  # handy for tests and the web layer

    replica = runtime.build_replica()
    app.service(replica)
    app.service(BrokerProbe(runtime.metrics, settings.bootstrap_servers))
    if settings.web_port:
        runtime.web = WebServer(settings, [core_routes(runtime), search_routes(runtime)])
        app.service(runtime.web)
    metrics = runtime.metrics

    @app.timer(1.0, name="restart_truncated_partitions")
    async def restart_truncated_partitions() -> None:
        await runtime.restart_truncated_partitions()

    @app.agent(runtime.topics[LISTINGS], name="embed", supervisor_strategy=mode.CrashingSupervisor)
    async def embed(stream: faust.StreamT) -> None:
        step = runtime.embed_step()
        async for events in stream.take_events(settings.batch_size, within=settings.batch_linger_seconds):
            batch = [incoming(e) for e in events]
            started = time.perf_counter()
            outgoing, failures = await runtime.run_model(step, batch)
            metrics.observe_embed_batch(len(batch), time.perf_counter() - started, len(outgoing), len(failures))
            await runtime.send_all(LISTING_EMBEDDINGS, outgoing)
            await runtime.dead_letter(failures)

    @app.agent(runtime.topics[LISTING_EMBEDDINGS], name="index", supervisor_strategy=mode.CrashingSupervisor)
    async def index(stream: faust.StreamT) -> None:
        assert runtime.index is not None
        search = SearchStep(runtime.index, settings)
        loop = asyncio.get_running_loop()
        async for events in stream.take_events(settings.batch_size, within=settings.batch_linger_seconds):
            updates, failures = [], []
            for event in events:
                msg = incoming(event)
                try:
                    update = decode_embedding(msg.value)
                except BadInputError as exc:
                    failures.append(Failure(msg, "index", exc))
                    continue
                await replica.wait_applied(msg.partition, msg.offset)
                updates.append(update)
            similar, alerts = await loop.run_in_executor(None, search, updates)
            # Alerts first: once a listing's similar-products message is visible, its alerts are
            # too (moderation is the more urgent reader, and "indexed" then means "fully handled").
            await runtime.send_all(DUPLICATE_ALERTS, alerts)
            await runtime.send_all(SIMILAR_PRODUCTS, similar)
            # Acknowledged by the broker: this is when consumers downstream can see them.
            metrics.observe_freshness(metrics.listing_to_emitted,
                                      [u.event_time for u in updates if u.op != "DELETE"], now_ms())
            metrics.similar_products.inc(len(similar))
            metrics.duplicate_alerts.inc(len(alerts))
            metrics.count("index", len(updates), len(failures))
            await runtime.dead_letter(failures)

    return app


__all__ = ["create_app", "snapshot_dir", "Runtime"]
