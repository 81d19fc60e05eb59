"""The Faust application, built by :func:`create_app` from one :class:`~streams.settings.Settings`.

Agents (both in the consumer group ``settings.app_id``, so partitions split across workers):

* ``embed``  — ``listings`` in batches → the model (in an executor) → ``listing-embeddings``.
* ``index``  — ``listing-embeddings`` → wait until this worker's replica has applied the record
  → top-k search → ``similar-products`` for every upsert, ``duplicate-alerts`` for same-supplier
  near copies.

Beside them, :class:`~streams.replica.IndexReplica` keeps this worker's full copy of the index
from *all* partitions of ``listing-embeddings``, one index per model version, and
:class:`~streams.models_live.ModelWatcher` follows ``model-updates``.

Model switch (blue/green), when the trainer promotes a model: the worker loads it; the embed
agent embeds every new listing with both the serving and the promoted model (one record, both
vectors); the ``model_switch`` task re-embeds the listings partitions this worker owns with the
promoted model (:mod:`streams.backfill`). Meanwhile the index agent keeps searching the serving
index and emitting with the serving version; each replica switches to the promoted index the
moment it holds every listing, and from then on outputs carry the new version. No listing goes
unanswered in between: a record carries the vectors of the index its replica serves, or of the
promoted one when that is all it has.

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

from samestyle.index_store import LiveIndex
from samestyle.models import Encoder, encoder_from_spec
from samestyle.topics import (DEAD_LETTERS, DUPLICATE_ALERTS, LISTING_EMBEDDINGS, LISTINGS, MODEL_UPDATES, SIMILAR_PRODUCTS,
                    topic_specs)
from samestyle.topics.errors import BadInputError, ConfigError, SamestyleError

from samestyle.streams.worker.metrics import BrokerProbe, Metrics, PartitionLag, partition_lags
from samestyle.streams.switch.backfill import Backfill
from samestyle.streams.switch.indexes import ModelIndexes
from samestyle.streams.switch.watcher import ModelWatcher
from samestyle.streams.worker.pipeline import (VIEWS, EmbeddingUpdate, EmbedStep, Failure, Incoming, Outgoing, SearchStep, decode_embedding,
                       now_ms)
from samestyle.streams.worker.replica import IndexReplica
from samestyle.streams.settings import Settings
from samestyle.streams.worker.transport import install as install_transport
from samestyle.streams.http.search import search_routes
from samestyle.streams.http.server import WebServer, core_routes

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
        #: The encoder SAMESTYLE_ENCODER names (loaded on first use): the model served until the
        #: trainer promotes another.
        self._configured = encoder
        #: Loaded encoders of promoted models, by version (the serving one and the target).
        self._encoders: dict[str, Encoder] = {}
        self.specs = topic_specs(settings.topic_prefix, settings.partitions)
        # Model work gets one thread: torch already spreads one forward pass over every core.
        self.model_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self.topics = {key: app.topic(spec.name, key_type=bytes, value_type=bytes, key_serializer="raw",
                                      value_serializer="raw", partitions=spec.partitions)
                       for key, spec in self.specs.items()}
        self._embed_step: EmbedStep | None = None
        self.replica: IndexReplica | None = None
        self.watcher = ModelWatcher(settings, self.specs[MODEL_UPDATES].name)
        self.backfill = Backfill(settings, self.specs[LISTINGS].name)
        #: Held while a batch is embedded and sent, by the embed agent and by the re-embedding,
        #: so their records reach listing-embeddings in the order they were decided.
        self.embed_lock = asyncio.Lock()
        self._prepared: asyncio.Future[None] | None = None
        #: Promoted versions whose directory did not load: never the target.
        self.failed_versions: set[str] = set()
        self.metrics = Metrics()
        self.metrics.lag_sources.append(self.group_lags)
        self.metrics.rebalance_count = lambda: int(getattr(app, "rebalancing_count", 0))
        self.web: WebServer | None = None
        self._truncated_suspects: set[Any] = set()
        #: The version samestyle_model_info shows.
        self.reported_version: str | None = None

    # ------------------------------------------------------------------ models

    def configured_encoder(self) -> Encoder:
        """The encoder of ``settings.encoder`` (loads it on first use: call it off the event loop)."""
        if self._configured is None:
            self._configured = encoder_from_spec(self.settings.encoder, device=self.settings.device,
                                                 allow_random_weights=self.settings.allow_random_weights)
            log.info("encoder %s (dim %d) on %s", self._configured.version, self._configured.dim,
                     self._configured.device)
        return self._configured

    def _known_encoder(self, version: str) -> Encoder | None:
        if version in self._encoders:
            return self._encoders[version]
        if self._configured is not None and self._configured.version == version:
            return self._configured
        return None

    def encoder_for(self, version: str) -> Encoder:
        """The encoder of ``version`` (loads a promoted model directory on first use; off the loop).

        Raises ConfigError when the version is neither the configured encoder nor a promoted model.
        """
        known = self._known_encoder(version)
        if known is not None:
            return known
        model_dir = self.watcher.chain.model_dir(version)
        if model_dir is None:
            configured = self.configured_encoder()
            if configured.version == version:
                return configured
            raise ConfigError(f"model {version!r} is neither SAMESTYLE_ENCODER ({configured.version}) nor a "
                              f"promoted model on {self.specs[MODEL_UPDATES].name}")
        encoder = encoder_from_spec(model_dir, device=self.settings.device,
                                    allow_random_weights=self.settings.allow_random_weights)
        if encoder.version != version:
            raise ConfigError(f"{model_dir} holds model {encoder.version}, but {version} was promoted from it")
        log.info("loaded promoted model %s (dim %d) from %s", version, encoder.dim, model_dir)
        self._encoders[version] = encoder
        return encoder

    def target_version(self) -> str | None:
        """The model this worker should serve: the newest promoted, else the configured one
        (None until the decision log and the configured encoder are known)."""
        if not self.watcher.ready.is_set():
            return None
        for promotion in reversed(self.watcher.chain.promotions):
            if promotion.version not in self.failed_versions:
                return promotion.version
        return self._configured.version if self._configured is not None else None

    def target_encoder(self) -> Encoder | None:
        """The target's encoder, loading it if needed (off the loop). A promoted model that does
        not load is logged, counted and skipped: the worker keeps serving what it serves."""
        while True:
            target = self.target_version()
            if target is None:
                return None
            try:
                return self.encoder_for(target)
            except SamestyleError as exc:
                if self._configured is not None and target == self._configured.version:
                    raise
                log.error("promoted model %s does not load, ignored: %s", target, exc)
                self.failed_versions.add(target)
                self.metrics.model_load_failures.inc()

    async def prepare_models(self) -> None:
        """Read the decision log, then load the target model (the replica needs its version).
        The first caller starts the work; every caller waits for it (and gets its error)."""
        if self._prepared is None:
            self._prepared = asyncio.ensure_future(self._prepare_models())
        await asyncio.shield(self._prepared)

    async def _prepare_models(self) -> None:
        await self.watcher.ready.wait()
        await self.run_model(self.configured_encoder)
        await self.run_model(self.target_encoder)

    @property
    def serving_version(self) -> str | None:
        return self.replica.active_version if self.replica is not None else None

    @property
    def encoder(self) -> Encoder:
        """The encoder of the index being served (loads it on first use: call it off the event loop)."""
        version = self.serving_version
        encoder = self.encoder_for(version) if version is not None else self.configured_encoder()
        if encoder.version != self.reported_version:
            self.reported_version = encoder.version
            self.metrics.model.info({"version": encoder.version, "dim": str(encoder.dim),
                                     "device": str(encoder.device)})
        return encoder

    @property
    def index(self) -> LiveIndex | None:
        """The index being served (None until the replica is ready)."""
        return self.replica.index if self.replica is not None else None

    def embedding_encoders(self) -> list[Encoder]:
        """[serving] or, during a switch, [serving, target] (loads them: call it off the loop)."""
        self.target_encoder()  # a new target that does not load is skipped here
        serving, target = self.serving_version, self.target_version()
        assert serving is not None and target is not None, "embedding before the replica is ready"
        if target == serving:
            return [self.encoder_for(serving)]
        try:
            current = self.encoder_for(serving)
        except ConfigError as exc:
            # The served model cannot be loaded (its directory is unknown): nothing can embed for
            # its index any more, so serve the target's index, complete or not.
            log.error("%s; switching to %s now", exc, target)
            assert self.replica is not None
            self.replica.indexes.try_switch(target, force=True)
            return [self.encoder_for(target)]
        return [current, self.encoder_for(target)]

    def drop_unused_encoders(self) -> None:
        keep = {self.serving_version, self.target_version()}
        for version in list(self._encoders):
            if version not in keep:
                del self._encoders[version]

    def embed_step(self) -> EmbedStep:
        if self._embed_step is None:
            self._embed_step = EmbedStep(self.configured_encoder(), self.settings)
        return self._embed_step

    def build_replica(self) -> IndexReplica:
        directory = snapshot_dir(self.settings)
        indexes, offsets = ModelIndexes.load(directory, kind=self.settings.index_kind, n_views=len(VIEWS))
        self.replica = IndexReplica(self.settings, indexes, self.specs[LISTING_EMBEDDINGS].name,
                                    self.specs[LISTING_EMBEDDINGS].partitions, directory, offsets,
                                    metrics=self.metrics, target_version=self.target_version,
                                    version_order=self.watcher.chain.order)
        self.metrics.lag_sources.append(self.replica.lags)
        return self.replica

    def assigned_partitions(self, topic_key: str) -> set[int]:
        """Partitions of ``topic_key`` the group gave this worker."""
        consumer = getattr(self.app, "_consumer", None)
        if consumer is None:
            return set()
        name = self.specs[topic_key].name
        return {tp.partition for tp in consumer.assignment() if tp.topic == name}

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
        index = self.index
        target = self.target_version()
        return {
            "ok": not crashed and replica_running and not self.app.should_stop,
            "worker_id": self.settings.worker_id,
            "replica": self.replica.state if self.replica is not None else None,
            "crashed_agents": crashed,
            "index_vectors": len(index) if index is not None else 0,
            "model_version": self.serving_version,
            "switching_to": target if target is not None and target != self.serving_version else None,
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
    app.service(runtime.watcher)
    app.service(replica)
    app.service(BrokerProbe(runtime.metrics, settings.bootstrap_servers))
    if settings.web_port:
        runtime.web = WebServer(settings, [core_routes(runtime), search_routes(runtime)])
        app.service(runtime.web)
    metrics = runtime.metrics

    @app.timer(1.0, name="restart_truncated_partitions")
    async def restart_truncated_partitions() -> None:
        await runtime.restart_truncated_partitions()

    @app.task
    async def model_switch() -> None:
        """Load the target model; during a switch, re-embed this worker's listings partitions.
        A promoted model that does not load is skipped (``target_encoder``); any other failure
        here takes the worker down, like an agent's crash."""
        try:
            await switch_models()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("model task failed: %s", exc)
            await app.crash(exc)
            raise
        finally:
            await runtime.backfill.stop()

    async def switch_models() -> None:
        await runtime.prepare_models()
        await replica.wait_ready()
        backfill, step = runtime.backfill, runtime.embed_step()
        last_missing_check = 0.0
        while not app.should_stop:
            serving, target = runtime.serving_version, runtime.target_version()
            if serving is not None and serving != runtime.reported_version:
                await runtime.run_model(lambda: runtime.encoder)  # sets samestyle_model_info
            if serving is None or target is None or serving == target:
                if backfill.active:
                    log.info("model switch to %s complete on this worker", backfill.version)
                    backfill.reset()
                    runtime.drop_unused_encoders()
                metrics.model_switch_missing.set(0)
                changed = runtime.watcher.changed
                try:
                    await asyncio.wait_for(changed.wait(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                continue
            encoder = await runtime.run_model(runtime.target_encoder)
            if encoder is None or encoder.version != target:
                continue  # the promoted model did not load: the target fell back
            await backfill.plan(target, runtime.assigned_partitions(LISTINGS))
            chunk = await backfill.next_chunk(settings.batch_size)
            if chunk:
                async with runtime.embed_lock:
                    if runtime.target_version() == target:
                        chunk = backfill.unseen(chunk)
                        outgoing, _ = await runtime.run_model(step, chunk, [encoder], True)
                        await runtime.send_all(LISTING_EMBEDDINGS, outgoing)
                        metrics.reembedded.inc(len(outgoing))
            elif not backfill.pending():
                await asyncio.sleep(0.2)
            if time.monotonic() - last_missing_check > 2.0 and replica.index is not None:
                last_missing_check = time.monotonic()
                metrics.model_switch_missing.set(replica.indexes.missing(target))

    @app.agent(runtime.topics[LISTINGS], name="embed", supervisor_strategy=mode.CrashingSupervisor)
    async def embed(stream: faust.StreamT) -> None:
        step = runtime.embed_step()
        async for events in stream.take_events(settings.batch_size, within=settings.batch_linger_seconds):
            batch = [incoming(e) for e in events]
            await runtime.prepare_models()
            await replica.wait_ready()
            async with runtime.embed_lock:
                started = time.perf_counter()
                encoders = await runtime.run_model(runtime.embedding_encoders)
                if len(encoders) > 1:
                    runtime.backfill.note_live(batch)
                outgoing, failures = await runtime.run_model(step, batch, encoders)
                metrics.observe_embed_batch(len(batch), time.perf_counter() - started, len(outgoing), len(failures))
                await runtime.send_all(LISTING_EMBEDDINGS, outgoing)
            await runtime.dead_letter(failures)

    @app.agent(runtime.topics[LISTING_EMBEDDINGS], name="index", supervisor_strategy=mode.CrashingSupervisor)
    async def index(stream: faust.StreamT) -> None:
        search = SearchStep(None, settings)
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
                if not update.reembed:  # re-embedded for a model switch: the listing did not change
                    updates.append(update)
            similar, alerts = [], []
            for version, group in searchable(updates, replica.indexes).items():
                found = await loop.run_in_executor(None, search, group, replica.indexes.indexes[version])
                similar += found[0]
                alerts += found[1]
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
