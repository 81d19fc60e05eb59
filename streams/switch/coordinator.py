"""The model switch of one worker (blue/green), as one state machine.

States (``ModelSwitch.state``, also on ``/health`` as ``switch_state``)::

    STARTING ──► SERVING ──(a promotion)──► LOADING ──► REEMBEDDING ◄─► AWAITING_INDEX ──► SERVING
                   ▲                          │  (does not load: skipped)      (the replica switched)
                   └──────────────────────────┘

* STARTING: the decision log (``model-updates``) or the replica's start-up log is not read yet.
* SERVING: the served model is the target; nothing to do until the next promotion.
* LOADING: the target's model directory is loading (a directory that does not load is counted,
  skipped, and the worker keeps serving).
* REEMBEDDING: this worker re-embeds the ``listings`` partitions it owns with the target
  (:class:`~samestyle.streams.switch.backfill.Backfill`); meanwhile the embed agent embeds new
  listings with both models (:meth:`ModelSwitch.embedding_encoders`).
* AWAITING_INDEX: its own partitions are done; the replica switches as soon as the target's index
  holds every listing (other workers may still be re-embedding theirs). A ``listings`` partition
  whose log turns out recreated (the broker restarted empty) is planned again, back to REEMBEDDING:
  its re-embedded records may be lost with the old logs (see the Backfill module).

A switch never waits forever. When this worker's partitions are re-embedded, the listings of the
serving index that those partitions' log cannot supply (their records expired) or that the new
model could not embed are counted (``samestyle_model_switch_left_out_total``), logged, and
written out of the catalogue: a re-embedding DELETE on ``listing-embeddings`` removes them from
every index, emits nothing, and leaves the log saying what the new index holds. A listing comes
back with its next update. Whatever the new index still lacks ``deadline_seconds`` after this
worker reached AWAITING_INDEX (a peer that stopped re-embedding, a partition whose keys do not
follow the default partitioner) is left out the same way by switching anyway, on this worker.

A restart resumes a switch through the same states. The index snapshot records the target and the
promoted models' directories (:meth:`ModelSwitch.record`, :mod:`~samestyle.streams.switch.record`);
the registry restores them ahead of the decision log, so a worker whose broker lost ``model-updates``
still has the target it was switching to, and re-embeds towards it again from offset 0. A
promotion on the log supersedes the recorded target; a recorded target whose directory is gone is
abandoned (logged, counted in ``samestyle_model_load_failures_total``) and the served model stays.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from samestyle.models.encoder import Encoder
from samestyle.streams.switch.backfill import AT_DEADLINE, NOT_IN_LOG, REEMBED_FAILED, Backfill, default_partition
from samestyle.streams.switch.record import SwitchRecord
from samestyle.streams.switch.registry import ModelRegistry
from samestyle.streams.worker.metrics import Metrics
from samestyle.streams.worker.pipeline import EmbedStep, Incoming, Outgoing, now_ms
from samestyle.streams.worker.replica import IndexReplica, SharedIndex
from samestyle.topics import LISTINGS, codec_for_topic

log = logging.getLogger(__name__)

#: While serving, how often the loop re-checks the target when no promotion wakes it.
IDLE_CHECK_SECONDS = 0.5
#: While waiting for other workers' vectors, the pause between checks.
AWAITING_INDEX_POLL_SECONDS = 0.2
#: How often the count of listings still missing from the target's index is refreshed.
MISSING_GAUGE_SECONDS = 2.0
#: Listing ids named in a log line about listings left out (the metric has the count).
LOGGED_IDS = 20

_LEFT_OUT_BECAUSE = {
    NOT_IN_LOG: "are not in the listings log any more (expired: is the topic compacted?)",
    REEMBED_FAILED: "could not be embedded by the new model (see the re-embedding warnings)",
}


def _some(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:LOGGED_IDS])
    return shown + (f" and {len(ids) - LOGGED_IDS} more" if len(ids) > LOGGED_IDS else "")


class SwitchState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    LOADING = "loading"
    REEMBEDDING = "reembedding"
    AWAITING_INDEX = "awaiting_index"


class ModelSwitch:
    """Drives one worker from the served model to the target model without a gap.

    ``run_model(fn, *args)`` runs model work on the worker's model thread; ``send`` delivers
    ``listing-embeddings`` records; ``assigned`` names the ``listings`` partitions this worker owns;
    ``deadline_seconds`` bounds the wait in AWAITING_INDEX (see the module docstring).
    """

    def __init__(self, registry: ModelRegistry, replica: IndexReplica | SharedIndex, backfill: Backfill, step: Callable[[], EmbedStep],
                 metrics: Metrics, run_model: Callable[..., Awaitable[Any]],
                 send: Callable[[Sequence[Outgoing]], Awaitable[None]],
                 assigned: Callable[[], Iterable[int]], batch_size: int,
                 fetch_images: Callable[[Sequence[Incoming]], Awaitable[Mapping[str, Any]]] | None = None, *,
                 deadline_seconds: float) -> None:
        self.registry = registry
        self.replica = replica
        self.backfill = backfill
        self._step = step
        self.metrics = metrics
        self.run_model = run_model
        self._send = send
        self._assigned = assigned
        self.batch_size = batch_size
        self.deadline_seconds = deadline_seconds
        #: When this worker last entered AWAITING_INDEX (monotonic seconds).
        self._awaiting_since = 0.0
        #: The target the deadline already forced (once per switch).
        self._forced: str | None = None
        #: Fetches the image URLs of a chunk before it is re-embedded (None: no remote images).
        self._fetch_images = fetch_images
        #: Held while a batch is embedded and sent, by the embed agent and by the re-embedding,
        #: so their records reach listing-embeddings in the order they were decided.
        self.embed_lock = asyncio.Lock()
        self.state = SwitchState.STARTING
        self._prepared: asyncio.Future[None] | None = None
        #: The version samestyle_model_info shows.
        self._reported_version: str | None = None

    def _enter(self, state: SwitchState, target: str | None = None) -> None:
        if state is not self.state:
            log.info("model switch: %s -> %s%s", self.state.value, state.value,
                     f" (target {target})" if target else "")
            self.state = state

    # ------------------------------------------------------------------ what the agents ask

    @property
    def serving_version(self) -> str | None:
        return self.replica.active_version

    def target_version(self) -> str | None:
        return self.registry.target_version()

    async def prepare(self) -> None:
        """Read the decision log, then load the configured and the target model (the replica
        needs the target's version). The first caller starts the work; every caller waits for it."""
        if self._prepared is None:
            self._prepared = asyncio.ensure_future(self._prepare())
        await asyncio.shield(self._prepared)

    async def _prepare(self) -> None:
        await self.registry.watcher.ready.wait()
        await self.run_model(self.registry.configured_encoder)
        await self.run_model(self.registry.target_encoder)

    def _log_restored(self) -> None:
        """Say what became of the switch record of the snapshot this worker started from."""
        record = self.registry.restored
        if record is None:
            return
        chain = self.registry.watcher.chain
        serving, target = self.serving_version, self.target_version()
        if target == record.target and not chain.from_log(target):
            if target != serving:
                log.warning("model switch: model-updates does not hold the promotion of %s that the index "
                            "snapshot's unfinished switch followed (state %s then, serving %s): resuming that "
                            "switch", target, record.state, serving)
            else:
                log.info("model switch: serving %s as the index snapshot records (model-updates does not hold "
                         "its promotion)", target)
        elif target != record.target and chain.promoted:
            log.info("model switch: the index snapshot's target %s is superseded by model-updates (target %s)",
                     record.target, target)
        elif target != record.target:
            log.warning("model switch: the index snapshot's target %s is not restored (see above); serving %s, "
                        "target %s", record.target, serving, target)

    def record(self) -> SwitchRecord | None:
        """What an index snapshot keeps of the switch (None until the target is known)."""
        target = self.target_version()
        if target is None:
            return None
        return SwitchRecord(target, self.state.value, self.registry.recorded_models([self.serving_version, target]))

    def serving_encoder(self) -> Encoder:
        """The encoder of the index being served (loads it on first use: off the event loop)."""
        version = self.serving_version
        encoder = (self.registry.encoder_for(version) if version is not None
                   else self.registry.configured_encoder())
        if encoder.version != self._reported_version:
            self._reported_version = encoder.version
            self.metrics.model.info({"version": encoder.version, "dim": str(encoder.dim),
                                     "device": str(encoder.device)})
        return encoder

    def embedding_encoders(self) -> list[Encoder]:
        """[serving] or, during a switch, [serving, target] (loads them: off the loop)."""
        self.registry.target_encoder()  # a new target that does not load is skipped here
        serving, target = self.serving_version, self.target_version()
        assert serving is not None and target is not None, "embedding before the replica is ready"
        if target == serving:
            return [self.registry.encoder_for(serving)]
        try:
            current = self.registry.encoder_for(serving)
        except Exception as exc:
            # The served model cannot be loaded (its directory is unknown): nothing can embed for
            # its index any more, so serve the target's index, complete or not.
            log.error("%s; switching to %s now", exc, target)
            self.replica.indexes.try_switch(target, force=True)
            return [self.registry.encoder_for(target)]
        return [current, self.registry.encoder_for(target)]

    def note_live(self, batch: Sequence[Incoming]) -> None:
        """The embed agent embedded ``batch`` with both models (see Backfill.note_live)."""
        self.backfill.note_live(batch)

    # ------------------------------------------------------------------ the loop

    async def run(self, should_stop: Callable[[], bool]) -> None:
        """Serve, and switch whenever the target changes, until ``should_stop()``."""
        try:
            await self.prepare()
            await self.replica.wait_ready()
            self._log_restored()
            last_missing = 0.0
            while not should_stop():
                serving, target = self.serving_version, self.target_version()
                if serving is not None and serving != self._reported_version:
                    await self.run_model(self.serving_encoder)  # sets samestyle_model_info
                if serving is None or target is None or serving == target:
                    await self._serve()
                    continue
                if self.state is SwitchState.SERVING:
                    self._enter(SwitchState.LOADING, target)
                encoder = await self.run_model(self.registry.target_encoder)
                if encoder is None or encoder.version != target:
                    continue  # the promoted model did not load: the target fell back
                await self.backfill.plan(target, self._assigned())
                if await self._reembed_next(encoder, target) == 0 and not self.backfill.pending():
                    await self._leave_out_unsupplied(encoder, target)
                    if self.state is not SwitchState.AWAITING_INDEX:
                        self._awaiting_since = time.monotonic()
                    self._enter(SwitchState.AWAITING_INDEX, target)
                    await self._check_deadline(target)
                    await asyncio.sleep(AWAITING_INDEX_POLL_SECONDS)
                if time.monotonic() - last_missing > MISSING_GAUGE_SECONDS and self.replica.index is not None:
                    last_missing = time.monotonic()
                    self.metrics.model_switch_missing.set(await self.replica.missing(target))
        finally:
            await self.backfill.stop()

    async def _serve(self) -> None:
        if self.backfill.active:
            log.info("model switch to %s complete on this worker", self.backfill.version)
            self.backfill.reset()
            self._forced = None
            self.registry.keep_only([self.serving_version, self.target_version()])
        self._enter(SwitchState.SERVING)
        self.metrics.model_switch_missing.set(0)
        try:
            await asyncio.wait_for(self.registry.watcher.changed.wait(), timeout=IDLE_CHECK_SECONDS)
        except asyncio.TimeoutError:
            pass

    async def _reembed_next(self, encoder: Encoder, target: str) -> int:
        """Re-embed the next chunk of this worker's listings with the target; returns its size."""
        chunk = await self.backfill.next_chunk(self.batch_size)
        if not chunk:
            return 0
        self._enter(SwitchState.REEMBEDDING, target)
        # Fetched before the lock, so the embed agent is not held up by slow image hosts.
        images = await self._fetch_images(chunk) if self._fetch_images is not None else None
        async with self.embed_lock:
            if self.target_version() != target:
                return 0
            chunk = self.backfill.unseen(chunk)
            outgoing, failures = await self.run_model(self._embed_for_switch, chunk, encoder, images)
            await self._send(outgoing)
            self.backfill.note_embedded(chunk, failures)
            self.metrics.reembedded.inc(len(outgoing))
        for f in failures:
            log.warning("model switch to %s: re-embedding %s[%d]@%d failed: %s: %s", target, f.incoming.topic,
                        f.incoming.partition, f.incoming.offset, type(f.error).__name__, f.error)
        return len(chunk)

    async def _leave_out_unsupplied(self, encoder: Encoder, target: str) -> None:
        """Once this worker's partitions are re-embedded: write the listings of the serving index
        they cannot supply out of the catalogue (re-embedding DELETEs: every replica drops them
        from every index, nothing is emitted), count and log them."""
        if not self.backfill.done - self.backfill.settled:
            return
        async with self.embed_lock:  # no live batch of these listings in between
            if self.target_version() != target:
                return
            left_out = self.backfill.unsupplied(await self.replica.lacking(target))
            if not left_out:
                return
            listings, at = codec_for_topic(LISTINGS), now_ms()
            deletes = [Incoming(listing_id.encode(), listings.encode({"listing_id": listing_id, "op": "DELETE",
                                                                      "event_time": at}),
                                self.backfill.topic, default_partition(listing_id.encode(), self.backfill.partitions), -1)
                       for ids in left_out.values() for listing_id in ids]
            outgoing, failures = await self.run_model(self._embed_for_switch, deletes, encoder)
            assert not failures, failures  # a DELETE with a listing id always passes
            await self._send(outgoing)
        for reason, ids in left_out.items():
            self.metrics.model_switch_left_out.labels(reason).inc(len(ids))
            log.warning("model switch to %s: %d listing(s) of the serving index %s; they leave the catalogue "
                        "until their next update: %s", target, len(ids), _LEFT_OUT_BECAUSE[reason], _some(ids))

    async def _check_deadline(self, target: str) -> None:
        """Past the deadline in AWAITING_INDEX: switch anyway, leaving out what the new index lacks."""
        if self._forced == target or time.monotonic() - self._awaiting_since < self.deadline_seconds:
            return
        self._forced = target
        lacking = await self.replica.lacking(target)
        if lacking:
            self.metrics.model_switch_left_out.labels(AT_DEADLINE).inc(len(lacking))
            log.warning("model switch to %s: after %.0f s the new index still lacks %d listing(s) of the serving "
                        "index; switching without them (SAMESTYLE_SWITCH_DEADLINE_SECONDS): %s", target,
                        self.deadline_seconds, len(lacking), _some(sorted(lacking)))
        self.replica.force_switch(target)

    def _embed_for_switch(self, chunk: Sequence[Incoming], encoder: Encoder,
                          images: Mapping[str, Any] | None = None) -> Any:
        return self._step()(chunk, [encoder], images, reembed=True)


__all__ = ["ModelSwitch", "SwitchState"]
