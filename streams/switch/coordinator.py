"""The model switch of one worker (blue/green), as one state machine.

States (``ModelSwitch.state``, also on ``/health`` as ``switch_state``)::

    STARTING ──► SERVING ──(a promotion)──► LOADING ──► REEMBEDDING ──► AWAITING_INDEX ──► SERVING
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
  holds every listing (other workers may still be re-embedding theirs).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

from samestyle.models.encoder import Encoder
from samestyle.streams.switch.backfill import Backfill
from samestyle.streams.switch.registry import ModelRegistry
from samestyle.streams.worker.metrics import Metrics
from samestyle.streams.worker.pipeline import EmbedStep, Incoming, Outgoing
from samestyle.streams.worker.replica import IndexReplica

log = logging.getLogger(__name__)

#: While serving, how often the loop re-checks the target when no promotion wakes it.
IDLE_CHECK_SECONDS = 0.5
#: While waiting for other workers' vectors, the pause between checks.
AWAITING_INDEX_POLL_SECONDS = 0.2
#: How often the count of listings still missing from the target's index is refreshed.
MISSING_GAUGE_SECONDS = 2.0


class SwitchState(enum.Enum):
    STARTING = "starting"
    SERVING = "serving"
    LOADING = "loading"
    REEMBEDDING = "reembedding"
    AWAITING_INDEX = "awaiting_index"


class ModelSwitch:
    """Drives one worker from the served model to the target model without a gap.

    ``run_model(fn, *args)`` runs model work on the worker's model thread; ``send`` delivers
    ``listing-embeddings`` records; ``assigned`` names the ``listings`` partitions this worker owns.
    """

    def __init__(self, registry: ModelRegistry, replica: IndexReplica, backfill: Backfill, step: Callable[[], EmbedStep],
                 metrics: Metrics, run_model: Callable[..., Awaitable[Any]],
                 send: Callable[[Sequence[Outgoing]], Awaitable[None]],
                 assigned: Callable[[], Iterable[int]], batch_size: int) -> None:
        self.registry = registry
        self.replica = replica
        self.backfill = backfill
        self._step = step
        self.metrics = metrics
        self.run_model = run_model
        self._send = send
        self._assigned = assigned
        self.batch_size = batch_size
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
                    self._enter(SwitchState.AWAITING_INDEX, target)
                    await asyncio.sleep(AWAITING_INDEX_POLL_SECONDS)
                if time.monotonic() - last_missing > MISSING_GAUGE_SECONDS and self.replica.index is not None:
                    last_missing = time.monotonic()
                    self.metrics.model_switch_missing.set(self.replica.indexes.missing(target))
        finally:
            await self.backfill.stop()

    async def _serve(self) -> None:
        if self.backfill.active:
            log.info("model switch to %s complete on this worker", self.backfill.version)
            self.backfill.reset()
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
        async with self.embed_lock:
            if self.target_version() != target:
                return 0
            chunk = self.backfill.unseen(chunk)
            outgoing, _ = await self.run_model(self._embed_for_switch, chunk, encoder)
            await self._send(outgoing)
            self.metrics.reembedded.inc(len(outgoing))
        return len(chunk)

    def _embed_for_switch(self, chunk: Sequence[Incoming], encoder: Encoder) -> Any:
        return self._step()(chunk, [encoder], reembed=True)


__all__ = ["ModelSwitch", "SwitchState"]
