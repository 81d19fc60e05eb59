"""The embed agent's batches in three overlapping stages, with at-least-once acknowledgement kept.

    prepare  (prepare thread + decode pool)   batch N+1: decode, check, build listings, decode images
    embed    (the model thread, under the      batch N:   forward pass, output records, handed to the
              switch's embed lock)                        producer in order
    deliver  (event loop)                      batch N-1: broker acknowledgements, dead letters, then
                                                          the batch's events are acknowledged

Without ``overlap`` (``SAMESTYLE_EMBED_OVERLAP=0``, the default), and while a model switch is
under way (the last batch was embedded with two models), the agent runs one batch at a time
instead, everything under the embed lock. The overlap is off by default because it bought no
throughput on the 2-core machine it was measured on (the worker is GIL-bound, not waiting:
README, Performance) and, with it, the embedded broker restarted in the middle of a switch
answered UnknownError to the re-embedding's writes, so the worker restarted and, with the broker's
logs lost, did not resume the switch (tests/integration/test_switch_faults.py, ``lost``, in 4
of 8 runs; none of 9 one batch at a time).

A batch's events are acknowledged (and so become committable) only after its records and its
dead letters are acknowledged by the broker, and batches are acknowledged in the order they were
taken: a batch never overtakes the one before it, so the committed offset of a partition never
passes a message whose output is not written. Records reach ``listing-embeddings`` in the order
their batches were embedded, because each batch hands its records to the producer under the
embed lock before the next batch (or a model switch's re-embedding) can take it.

Nothing here knows Faust: the agent passes in how to run the model, send, dead-letter and ack.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from samestyle.models.encoder import Encoder
from samestyle.streams.worker.pipeline import EmbedStep, Failure, Incoming, Outgoing, PreparedBatch

log = logging.getLogger(__name__)

__all__ = ["DECODE_THREADS", "MAX_DELIVERING", "EmbedPipeline"]

#: Threads that decode a batch's images. Small on purpose: the model thread and the event loop
#: need the cores too (PIL releases the GIL while it decodes and resizes).
DECODE_THREADS = 2
#: Batches whose records may await the broker's acknowledgement at once (the rest wait).
MAX_DELIVERING = 2


class EmbedPipeline:
    """Prepares a batch while the previous one is embedded, and embeds it while the one before is
    delivered. :meth:`submit` returns once the batch's embedding has started, so the agent can
    take the next batch; every stage's failure is raised by the next :meth:`submit` or
    :meth:`drain`, and reported to ``on_error`` at once (the worker crashes on it)."""

    def __init__(
        self,
        step: Callable[[], EmbedStep],
        run_model: Callable[..., Awaitable[Any]],
        encoders: Callable[[], list[Encoder]],
        lock: asyncio.Lock,
        enqueue: Callable[[Sequence[Outgoing]], Awaitable[asyncio.Future[Any]]],
        dead_letter: Callable[[Sequence[Failure]], Awaitable[None]],
        ack: Callable[[Sequence[Any]], Awaitable[None]],
        *,
        note_live: Callable[[Sequence[Incoming]], None] = lambda batch: None,
        observe: Callable[[int, float, int, int], None] = lambda size, seconds, out, failed: None,
        on_error: Callable[[BaseException], Any] = lambda exc: None,
        overlap: bool = True,
        decode_threads: int = DECODE_THREADS,
        max_delivering: int = MAX_DELIVERING,
    ) -> None:
        self._step, self._run_model, self._encoders, self._lock = step, run_model, encoders, lock
        self._enqueue, self._dead_letter, self._ack = enqueue, dead_letter, ack
        self._note_live, self._observe, self._on_error = note_live, observe, on_error
        self._overlap = overlap
        self._max_delivering = max(1, max_delivering)
        self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare")
        self._decode_pool = ThreadPoolExecutor(max_workers=max(1, decode_threads), thread_name_prefix="decode")
        #: The encoders of the last embedded batch: the next batch is prepared for them.
        self._last_encoders: list[Encoder] = []
        self._embedding: asyncio.Task[None] | None = None
        self._delivering: collections.deque[asyncio.Task[None]] = collections.deque()

    async def submit(self, events: Sequence[Any], batch: Sequence[Incoming], images: Any = None) -> None:
        """Prepare ``batch`` (``events`` are what ``ack`` acknowledges once it is delivered), then
        start embedding it as soon as the previous batch is embedded and handed to the producer."""
        self._raise_failed()
        if not self._overlap or len(self._last_encoders) > 1:
            await self._submit_serially(events, batch, images)
            return
        started = time.perf_counter()
        prepare = functools.partial(self._step().prepare, batch, list(self._last_encoders), images,
                                    map_=self._decode_pool.map)
        prepared = await asyncio.get_running_loop().run_in_executor(self._prepare_thread, prepare)
        prepare_seconds = time.perf_counter() - started
        if self._embedding is not None:
            await self._embedding  # raises what failed there
        while len(self._delivering) >= self._max_delivering:
            await self._delivering[0]
            self._raise_failed()
        self._embedding = self._task(self._embed(events, batch, prepared, prepare_seconds))

    async def _submit_serially(self, events: Sequence[Any], batch: Sequence[Incoming], images: Any) -> None:
        """One batch at a time, prepared, embedded and written under the embed lock, as the
        re-embedding's batches are: always without ``overlap``, and during a model switch."""
        await self.drain()
        started = time.perf_counter()
        async with self._lock:
            def run() -> tuple[list[Encoder], list[Outgoing], list[Failure]]:
                encoders = self._encoders()
                return (encoders, *self._step()(batch, encoders, images))

            encoders, outgoing, failures = await self._run_model(run)
            if len(encoders) > 1:
                self._note_live(batch)
            self._last_encoders = list(encoders)
            self._observe(len(batch), time.perf_counter() - started, len(outgoing), len(failures))
            await (await self._enqueue(outgoing))
        await self._dead_letter(failures)
        await self._ack(events)

    async def drain(self) -> None:
        """Wait until every submitted batch is delivered and acknowledged (raises what failed)."""
        if self._embedding is not None:
            await self._embedding
        while self._delivering:
            await self._delivering[0]
            self._raise_failed()

    def close(self) -> None:
        """Cancel what is still under way (its events stay unacknowledged: they are consumed
        again) and stop the threads."""
        for task in [self._embedding, *self._delivering]:
            if task is not None and not task.done():
                task.cancel()
        self._prepare_thread.shutdown(wait=False, cancel_futures=True)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)

    async def _embed(self, events: Sequence[Any], batch: Sequence[Incoming], prepared: PreparedBatch,
                     prepare_seconds: float) -> None:
        async with self._lock:
            started = time.perf_counter()
            # One trip to the model thread: which encoders (a switch may have begun), then the pass.
            encoders, outgoing, failures = await self._run_model(self._embed_now, prepared)
            if len(encoders) > 1:
                self._note_live(batch)  # still under the lock: before any re-embedding sees these keys
            self._last_encoders = list(encoders)
            self._observe(len(batch), prepare_seconds + time.perf_counter() - started, len(outgoing), len(failures))
            delivered = await self._enqueue(outgoing)
        previous = self._delivering[-1] if self._delivering else None
        self._delivering.append(self._task(self._deliver(events, delivered, failures, previous)))

    def _embed_now(self, prepared: PreparedBatch) -> tuple[list[Encoder], list[Outgoing], list[Failure]]:
        encoders = self._encoders()
        outgoing, failures = self._step().embed(prepared, encoders)
        return encoders, outgoing, failures

    async def _deliver(self, events: Sequence[Any], delivered: asyncio.Future[Any], failures: Sequence[Failure],
                       previous: asyncio.Task[None] | None) -> None:
        await delivered
        await self._dead_letter(failures)
        if previous is not None:
            await previous  # acknowledgements keep batch order
        await self._ack(events)

    def _task(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._check)
        return task

    def _check(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("embed pipeline failed: %s: %s", type(exc).__name__, exc)
            self._on_error(exc)

    def _raise_failed(self) -> None:
        """Forget the delivered batches; raise the error of a stage that failed."""
        if self._embedding is not None and self._embedding.done():
            self._embedding.result()
        while self._delivering and self._delivering[0].done():
            self._delivering.popleft().result()
