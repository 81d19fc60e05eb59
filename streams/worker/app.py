"""The Faust application, built by :func:`create_app` from one :class:`Settings`.

Agents ``embed`` (``listings`` → ``listing-embeddings``) and ``index`` (``listing-embeddings`` →
``similar-products`` and ``duplicate-alerts``) share the consumer group ``settings.app_id``; beside
them run the worker's index (its own replica with ``SAMESTYLE_INDEX_BACKEND=faiss``, the shared
Milvus collections with ``milvus``: streams/worker/replica.py), the model watcher and the blue/green
model switch. A message
that does not decode is dead-lettered with its original bytes. Outputs are awaited before a batch
is acknowledged: delivery is at-least-once and every write downstream is idempotent by listing id.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import faust
import mode

from samestyle.index_store import IndexBackend, create_backend
from samestyle.models.encoder import DuplicateScorer, Encoder
from samestyle.streams.http.auth import token_auth
from samestyle.streams.http.moderation import AlertBuffer, moderation_routes
from samestyle.streams.http.search import search_body_limit, search_routes
from samestyle.streams.http.server import WebServer, core_routes
from samestyle.streams.io.images import FetchPolicy, ImageFetcher
from samestyle.streams.settings import Settings
from samestyle.streams.switch.backfill import Backfill
from samestyle.streams.switch.coordinator import ModelSwitch
from samestyle.streams.switch.indexes import ModelIndexes
from samestyle.streams.switch.registry import ModelRegistry
from samestyle.streams.switch.watcher import ModelWatcher
from samestyle.streams.worker.alerts import AlertFeed
from samestyle.streams.worker.embedding import EmbedPipeline
from samestyle.streams.worker.group import GroupObserver
from samestyle.streams.worker.metrics import BrokerProbe, Metrics
from samestyle.streams.worker.pipeline import (
    VIEWS,
    AlertedPairs,
    EmbeddingUpdate,
    EmbedStep,
    Failure,
    Incoming,
    Outgoing,
    SearchStep,
    decode_embedding,
    now_ms,
    remote_image_uris,
)
from samestyle.streams.worker.replica import AlertedPairsFollower, IndexReplica, SharedIndex
from samestyle.streams.worker.sinks import Sinks
from samestyle.streams.worker.transport import install as install_transport
from samestyle.topics import (
    DUPLICATE_ALERTS,
    LISTING_EMBEDDINGS,
    LISTINGS,
    MODEL_UPDATES,
    MODERATION_DECISIONS,
    SIMILAR_PRODUCTS,
    topic_specs,
)
from samestyle.topics.errors import BadInputError, ConfigError, SamestyleError

log = logging.getLogger(__name__)


#: How long the worker's producer waits for more records before a produce request.
PRODUCER_LINGER_SECONDS = 0.005
#: The producer's batch size per partition (at most ``max_message_bytes``).
PRODUCER_BATCH_BYTES = 262_144


def snapshot_dir(settings: Settings) -> Path:
    return settings.state_dir / f"index-{settings.topic_prefix}{LISTING_EMBEDDINGS}"


class ModelThread:
    """The worker's one thread for model work: torch already spreads one forward pass over every core."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class ImageFetcherService(mode.Service):
    """Owns the worker's :class:`ImageFetcher` (one per worker: its concurrency bound is the
    worker's) and closes its HTTP session when the worker stops."""

    def __init__(self, fetcher: ImageFetcher, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fetcher = fetcher

    async def fetch_for(self, batch: Sequence[Incoming]) -> dict[str, Any]:
        """The images the ``http(s)://`` URIs of ``batch`` name (bytes, or the ImageError why not)."""
        return await self.fetcher.fetch_many(remote_image_uris(batch))

    async def on_stop(self) -> None:
        await self.fetcher.close()


class WorkerSearch:
    """The search API's view of a worker (:class:`~samestyle.streams.http.search.SearchBackend`)."""

    def __init__(self, replica: IndexReplica | SharedIndex, registry: ModelRegistry, model_thread: ModelThread,
                 metrics: Metrics) -> None:
        self._replica, self._registry, self._thread, self._metrics = replica, registry, model_thread, metrics

    @property
    def index(self) -> Any:
        """The served index: a LiveIndex, or a view of the active Milvus collection."""
        return self._replica.index

    @property
    def serving_version(self) -> str | None:
        return self._replica.active_version

    async def encoder_for(self, version: str) -> Encoder:
        return await self._thread.run(self._registry.encoder_for, version)

    async def run_model(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._thread.run(fn, *args)

    def lag_by_consumer(self) -> dict[str, int]:
        return self._metrics.lag_by_consumer()


def worker_health(app: faust.App, settings: Settings, replica: IndexReplica | SharedIndex,
                  switch: ModelSwitch) -> dict[str, Any]:
    """What /health answers: ok while the app runs, the index service runs and no agent has crashed."""
    crashed = [str(getattr(a, "name", a)) for a in app.agents.values()
               if any(getattr(actor, "crash_reason", None) for actor in getattr(a, "_actors", []))]
    serving, target = replica.active_version, switch.target_version()
    return {
        "ok": not crashed and replica.state == "running" and not app.should_stop,
        "worker_id": settings.worker_id,
        "replica": replica.state,
        "index_backend": settings.index_backend,
        "crashed_agents": crashed,
        "index_vectors": replica.listings(),
        "model_version": serving,
        "switching_to": target if target is not None and target != serving else None,
        "switch_state": switch.state.value,
        "rebalancing": bool(getattr(app, "rebalancing", False)),
    }


def build_replica(settings: Settings, metrics: Metrics, registry: ModelRegistry) -> IndexReplica:
    """The worker's index replica, from its snapshot when there is one (whose switch record the
    registry restores: a decision log that lost it still names the snapshot's target)."""
    spec = topic_specs(settings.topic_prefix, settings.partitions)[LISTING_EMBEDDINGS]
    directory = snapshot_dir(settings)
    indexes, offsets = ModelIndexes.load(directory, kind=settings.index_kind, n_views=len(VIEWS),
                                          vectors=settings.index_vectors)
    registry.restore(indexes.switch_record, indexes.active)
    replica = IndexReplica(settings, indexes, spec.name, spec.partitions, directory, offsets, metrics=metrics,
                           target_version=registry.target_version, version_order=registry.watcher.chain.order)
    metrics.lag_sources.append(replica.lags)
    return replica


def milvus_backend(settings: Settings) -> IndexBackend:
    """The Milvus backend ``settings`` name (blocking: it connects)."""
    return create_backend("milvus", n_views=len(VIEWS), milvus_uri=settings.effective_milvus_uri,
                          milvus_prefix=settings.milvus_prefix, milvus_token=settings.milvus_token)


def build_index(settings: Settings, metrics: Metrics, registry: ModelRegistry,
                crash: Callable[[BaseException], Any]) -> IndexReplica | SharedIndex:
    """The worker's index: its own replica (faiss), or the shared Milvus collections (milvus)."""
    if settings.index_backend == "faiss":
        return build_replica(settings, metrics, registry)
    if settings.index_backend == "milvus":
        try:
            import pymilvus  # noqa: F401  (fail at start, with the fix, not at the first batch)
        except ImportError:
            raise ConfigError("SAMESTYLE_INDEX_BACKEND=milvus needs pymilvus (and milvus-lite for a local "
                              ".db file): pip install 'samestyle[milvus]'") from None
        shared = SharedIndex(settings, lambda: milvus_backend(settings), registry.target_version,
                             registry.watcher.chain.order, metrics=metrics, crash=crash)
        metrics.lag_sources.append(shared.lags)
        return shared
    raise AssertionError(settings.index_backend)  # Settings rejects any other


def searchable(updates: Sequence[EmbeddingUpdate], indexes: ModelIndexes) -> dict[str, list[EmbeddingUpdate]]:
    """Group the upserts by the index each is searched in: the serving one when the record has
    its vectors, else the newest index the record has vectors for (a worker that switched earlier
    embedded it with the promoted model only). Deletes need no search."""
    groups: dict[str, list[EmbeddingUpdate]] = {}
    for update in updates:
        if update.op == "DELETE":
            continue
        if indexes.active in update.vectors:
            version = indexes.active
        else:
            candidates = [v for v in update.vectors if v in indexes.indexes]
            if not candidates:
                log.warning("listing %s: no index for its model(s) %s; not searched", update.listing_id,
                            sorted(update.vectors))
                continue
            version = candidates[-1]
        assert version is not None
        groups.setdefault(version, []).append(update.for_version(version))
    return groups


class Scorers:
    """The duplicate scorer of each model version the index agent searches, from the registry.

    Looking one up may load a promoted model (seconds), so it runs on the model thread; a found
    scorer is kept (a version's model never changes). A version whose encoder does not load here
    is searched with the cosine rule (and retried on the next batch).
    """

    def __init__(self, registry: ModelRegistry, model_thread: ModelThread) -> None:
        self._registry, self._thread = registry, model_thread
        self._scorers: dict[str, DuplicateScorer | None] = {}
        self._warned: set[str] = set()

    def _lookup(self, version: str) -> DuplicateScorer | None:
        return self._registry.encoder_for(version).duplicate_scorer

    async def scorer_for(self, version: str) -> DuplicateScorer | None:
        if version not in self._scorers:
            try:
                self._scorers[version] = await self._thread.run(self._lookup, version)
            except SamestyleError as exc:
                if version not in self._warned:
                    self._warned.add(version)
                    log.warning("no encoder for model %s on this worker (%s): its duplicates are "
                                "decided by the cosine rule", version, exc)
                return None
        return self._scorers[version]

    def keep_only(self, versions: Sequence[str]) -> None:
        """Forget the scorers of versions no longer indexed."""
        for version in [v for v in self._scorers if v not in versions]:
            del self._scorers[version]


def create_app(settings: Settings, *, encoder: Encoder | None = None, pairs: bool = False) -> faust.App:
    """Build the worker application. ``encoder`` overrides ``settings.encoder`` (tests); ``pairs``
    adds the click-pairs agents (streams/pairs/agents.py; ``samestyle worker`` passes
    ``settings.pairs_enabled``)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.broker_url,
        autodiscover=False,
        # Topics are created explicitly (create_topics) before any worker starts: tansu would
        # auto-create missing ones with 4 partitions.
        topic_allow_declare=False,
        topic_disable_leader=True,
        broker_session_timeout=settings.session_timeout_seconds,
        broker_heartbeat_interval=settings.heartbeat_interval_seconds,
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        producer_max_request_size=settings.max_message_bytes,
        # Faust's defaults (no linger, 16 KiB batches) send whatever is there the moment the
        # previous request returns; a few ms of linger lets the embed and index agents' records
        # share produce requests (tiny-encoder pipeline ratio: median 0.33 over 5 runs against 0.27
        # over 11 without, alternated: bench/results/pipeline_tiny_ab_2026-12-01.json). The worker
        # has no Faust tables, so no changelog needs one record per batch (BROKER.md, trap 1).
        producer_linger=PRODUCER_LINGER_SECONDS,
        producer_max_batch_size=min(PRODUCER_BATCH_BYTES, settings.max_message_bytes),
        consumer_max_fetch_size=settings.max_message_bytes,
        datadir=str(settings.state_dir / "faust"),
        web_enabled=False,
        # A dead agent must take the worker down, not leave it running without committing.
        agent_supervisor=mode.CrashingSupervisor,
    )
    install_transport(app, settings.consumer_fetch_max_wait_seconds)
    specs = topic_specs(settings.topic_prefix, settings.partitions)
    topics = {key: app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                             value_serializer="raw", partitions=spec.partitions)
              for key, spec in specs.items()}
    metrics = Metrics()
    metrics.rebalance_count = lambda: int(getattr(app, "rebalancing_count", 0))
    sinks = Sinks(topics, metrics)
    group = GroupObserver(app, metrics)
    metrics.lag_sources.append(group.lags)
    model_thread = ModelThread()
    images = ImageFetcherService(ImageFetcher(FetchPolicy.of(settings)))
    watcher = ModelWatcher(settings, specs[MODEL_UPDATES].name)
    registry = ModelRegistry(settings, watcher, encoder, on_load_failure=metrics.model_load_failures.inc)
    replica = build_index(settings, metrics, registry, lambda exc: app.crash(exc))
    # Milvus: every worker writes and reads one index, so a batch replayed here after a crash (or
    # taken over from a worker that died) must know the alerts every worker already sent.
    alerted = AlertedPairs()
    alerted_follower = (AlertedPairsFollower(settings, specs[DUPLICATE_ALERTS], alerted)
                        if settings.index_backend == "milvus" else None)
    embed_step: list[EmbedStep] = []

    def step() -> EmbedStep:
        if not embed_step:
            embed_step.append(EmbedStep(registry.configured_encoder(), settings))
        return embed_step[0]

    switch = ModelSwitch(registry, replica, Backfill(settings, specs[LISTINGS].name, specs[LISTINGS].partitions),
                         step, metrics, model_thread.run, lambda out: sinks.send_all(LISTING_EMBEDDINGS, out),
                         lambda: group.assigned(specs[LISTINGS].name), settings.batch_size,
                         fetch_images=images.fetch_for, deadline_seconds=settings.switch_deadline_seconds)
    if isinstance(replica, IndexReplica):
        replica.switch_record = switch.record

    def health() -> dict[str, Any]:
        return worker_health(app, settings, replica, switch)

    app.service(watcher)
    app.service(images)
    app.service(replica)
    if alerted_follower is not None:
        app.service(alerted_follower)
    app.service(BrokerProbe(metrics, settings.bootstrap_servers))
    if settings.web_port:
        search = WorkerSearch(replica, registry, model_thread, metrics)
        alerts = AlertBuffer(settings.moderation_alerts_buffer)
        app.service(AlertFeed(settings, specs, alerts))

        def payload_of(listing_id: str) -> dict[str, Any] | None:
            index = replica.index
            return None if index is None else index.payload(listing_id)

        async def send_decision(key: bytes, value: bytes) -> None:
            await sinks.send_all(MODERATION_DECISIONS, [Outgoing(key, value)])

        app.service(WebServer(settings, [token_auth(settings.api_token_value()),
                                         core_routes(metrics.registry, health),
                                         search_routes(settings, search, health, fetcher=images.fetcher),
                                         moderation_routes(alerts, payload_of, send_decision)],
                              client_max_size=search_body_limit(settings.max_image_bytes)))
    metrics.trainer_decisions = lambda: {"PROMOTED": watcher.chain.promoted, "REJECTED": watcher.chain.rejected}
    if pairs:
        from samestyle.streams.pairs.agents import PairsAgents

        pairs_agents = PairsAgents(settings, metrics, index=lambda: replica.index,
                                   model_version=lambda: replica.active_version, ready=replica.wait_ready,
                                   crash=app.crash)
        metrics.lag_sources.append(pairs_agents.lags)
        app.service(pairs_agents)

    @app.timer(1.0, name="restart_truncated_partitions")
    async def restart_truncated_partitions() -> None:
        await group.restart_truncated_partitions()

    @app.task
    async def model_switch() -> None:
        """The model switch; any failure in it takes the worker down, like an agent's crash (a
        promoted model that does not load is skipped, not a failure)."""
        try:
            await switch.run(lambda: app.should_stop)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("model task failed: %s", exc)
            await app.crash(exc)
            raise

    @app.agent(topics[LISTINGS], name="embed", supervisor_strategy=mode.CrashingSupervisor)
    async def embed(stream: faust.StreamT) -> None:
        async def ack(events: Sequence[Any]) -> None:
            for event in events:
                await stream.ack(event)

        # With SAMESTYLE_EMBED_OVERLAP the next batch is prepared while this one is embedded, and
        # embedded while the one before is delivered; either way events are acknowledged by hand,
        # in order, once their outputs are written.
        pipeline = EmbedPipeline(step, model_thread.run, switch.embedding_encoders, switch.embed_lock,
                                 lambda out: sinks.enqueue(LISTING_EMBEDDINGS, out), sinks.dead_letter, ack,
                                 note_live=switch.note_live, observe=metrics.observe_embed_batch,
                                 on_error=lambda exc: asyncio.ensure_future(app.crash(exc)),
                                 overlap=settings.embed_overlap)
        try:
            async for events in stream.noack_take(settings.batch_size, within=settings.batch_linger_seconds):
                batch = [Incoming.of_event(e) for e in events]
                # Image URLs are fetched on the event loop, concurrently, before the batch is prepared.
                fetched = await images.fetch_for(batch)
                await switch.prepare()
                await replica.wait_ready()
                await pipeline.submit(events, batch, fetched)
        finally:
            pipeline.close()

    @app.agent(topics[LISTING_EMBEDDINGS], name="index", supervisor_strategy=mode.CrashingSupervisor)
    async def index(stream: faust.StreamT) -> None:
        search = SearchStep(None, settings, alerted=alerted)
        scorers = Scorers(registry, model_thread)
        if alerted_follower is not None:
            await alerted_follower.wait_ready()
        async for events in stream.noack_take(settings.batch_size, within=settings.batch_linger_seconds):
            # Acknowledged by hand at the end, except events of a partition whose log was
            # recreated meanwhile (the replica releases them as lost; GroupObserver.split_by_reset).
            resets_then = group.resets_of(events)
            decoded, messages, failures = [], [], []
            for event in events:
                msg = Incoming.of_event(event)
                try:
                    decoded.append(decode_embedding(msg.value))
                    messages.append(msg)
                except BadInputError as exc:
                    failures.append(Failure(msg, "index", exc))
            # The replica: wait until it applied them. Milvus: write them (re-embedded ones too).
            await replica.make_searchable(messages, decoded)
            # Re-embedded for a model switch: the listing did not change, nothing is emitted.
            updates = [u for u in decoded if not u.reembed]
            similar, alerts = [], []
            groups = searchable(updates, replica.indexes)
            # Taken before any await: the replica may drop an index at a switch meanwhile.
            searched = {version: replica.indexes.indexes[version] for version in groups}
            scorers.keep_only(list(replica.indexes.indexes))
            for version, group_ in groups.items():
                # The duplicate decision of the model whose index is searched (None: cosine rule).
                scorer = await scorers.scorer_for(version)
                found = await replica.run(search, group_, searched[version], scorer)
                similar += found[0]
                alerts += found[1]
            # Alerts first: once a listing's similar-products message is visible, its alerts are
            # too (moderation is the more urgent reader, and "indexed" then means "fully handled").
            await sinks.send_all(DUPLICATE_ALERTS, alerts)
            await sinks.send_all(SIMILAR_PRODUCTS, similar)
            # Acknowledged by the broker: this is when consumers downstream can see them.
            metrics.observe_freshness(metrics.listing_to_emitted,
                                      [u.event_time for u in updates if u.op != "DELETE"], now_ms())
            metrics.similar_products.inc(len(similar))
            metrics.duplicate_alerts.inc(len(alerts))
            metrics.count("index", len(updates), len(failures))
            await sinks.dead_letter(failures)
            current, stale = group.split_by_reset(events, resets_then)
            for event in current:
                await stream.ack(event)
            group.release(stale)

    return app


__all__ = ["ImageFetcherService", "ModelThread", "Scorers", "WorkerSearch", "build_index", "build_replica", "create_app",
           "milvus_backend", "snapshot_dir", "worker_health"]
