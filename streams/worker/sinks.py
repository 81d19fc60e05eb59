"""The worker's output topics: send and wait for delivery; dead-letter failures with their reason."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from samestyle.streams.worker.metrics import Metrics
from samestyle.streams.worker.pipeline import Failure, Outgoing
from samestyle.topics import DEAD_LETTERS

log = logging.getLogger(__name__)


class Sinks:
    """Faust topics by registry key; every send is awaited before the batch is acknowledged."""

    def __init__(self, topics: Mapping[str, Any], metrics: Metrics) -> None:
        self.topics = topics
        self.metrics = metrics

    async def send_all(self, topic_key: str, messages: Iterable[Outgoing]) -> None:
        """Send and wait for every delivery (at-least-once: the batch is committed after this)."""
        await (await self.enqueue(topic_key, messages))

    async def enqueue(self, topic_key: str, messages: Iterable[Outgoing]) -> asyncio.Future[Any]:
        """Hand every message to the producer, in this order, and return the future of their
        deliveries: records enqueued before another call's are written before them, so a caller
        may go on (embed the next batch) while the broker acknowledges these."""
        topic = self.topics[topic_key]
        futures = [await topic.send(key=m.key, value=m.value) for m in messages]
        if not futures:
            done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        return asyncio.gather(*futures)

    async def dead_letter(self, failures: Sequence[Failure]) -> None:
        """Log each failure with topic/partition/offset and send it, original bytes and reason, to dead-letters."""
        for f in failures:
            m = f.incoming
            log.warning("dead-letter %s[%d]@%d (%s): %s: %s", m.topic, m.partition, m.offset, f.stage,
                        type(f.error).__name__, f.error)
        await self.send_all(DEAD_LETTERS, [Outgoing(f.incoming.key or b"", f.dead_letter()) for f in failures])
        self.metrics.observe_dead_letters([(f.stage, type(f.error).__name__) for f in failures])


__all__ = ["Sinks"]
