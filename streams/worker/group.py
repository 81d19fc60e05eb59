"""What the worker observes of its consumer group: assigned partitions, lag, recreated topics.

Faust's consumer runs in its own thread; these are plain reads of its state (a rebalance racing
a scrape makes the lag metric skip one scrape). Faust exposes no public committed or read
offsets, so this module is the one place that reads its consumer's ``_committed_offset`` and
``_read_offset`` (and, on a recreated topic, clears its acknowledgement bookkeeping and releases
the old log's messages still in flight).
"""

from __future__ import annotations

import logging
from typing import Any

from samestyle.streams.worker.metrics import Metrics, PartitionLag, partition_lags

log = logging.getLogger(__name__)


class GroupObserver:
    """Reads the Faust consumer of ``app`` once it exists (never creates it)."""

    def __init__(self, app: Any, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self._truncated_suspects: set[Any] = set()
        #: Resets per (topic, partition) so far (:meth:`restart_truncated_partitions`).
        self._resets: dict[tuple[str, int], int] = {}

    def resets(self, topic: str, partition: int) -> int:
        """How many times ``topic``'s ``partition`` was read again from 0 (its log recreated)."""
        return self._resets.get((topic, partition), 0)

    def resets_of(self, events: Any) -> dict[tuple[str, int], int]:
        """The reset counts of the partitions the Faust ``events`` came from, now."""
        return {key: self.resets(*key) for key in {(e.message.tp.topic, e.message.tp.partition) for e in events}}

    def split_by_reset(self, events: Any, resets_then: dict[tuple[str, int], int]) -> tuple[list[Any], list[Any]]:
        """``(current, stale)`` Faust ``events``: stale ones come from a partition reset since
        ``resets_then`` (:meth:`resets_of` when they were taken), i.e. from the log that is gone.
        Acknowledging a stale event would let Faust commit its offset on the new log, past new
        records never read: :meth:`release` it instead."""
        now = self.resets_of(events)
        current, stale = [], []
        for event in events:
            key = (event.message.tp.topic, event.message.tp.partition)
            (current if now[key] == resets_then.get(key, 0) else stale).append(event)
        return current, stale

    def release(self, events: Any) -> None:
        """Mark the Faust ``events`` handled without recording their offsets for a commit (what
        ``Consumer.ack`` does, less the offset bookkeeping), so the next rebalance's wait for
        unacknowledged messages does not wait for them."""
        from faust.types.tuples import ack_lock

        consumer = self._consumer()
        with ack_lock:
            for event in events:
                event.message.acked = True
                if consumer is not None:
                    consumer._unacked_messages.discard(event.message)

    def _consumer(self) -> Any:
        return getattr(self.app, "_consumer", None)  # app.consumer would create it

    def assigned(self, topic: str) -> set[int]:
        """Partitions of ``topic`` the group gave this worker."""
        consumer = self._consumer()
        if consumer is None:
            return set()
        return {tp.partition for tp in consumer.assignment() if tp.topic == topic}

    def lags(self) -> list[PartitionLag]:
        """Fetch high-water mark minus committed offset, per assigned partition."""
        consumer = self._consumer()
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
        """Read a partition again from 0 when its log is shorter than what was consumed.

        That means the topic was deleted and created again (or the embedded broker restarted
        empty). Faust drops any message below the last offset it read and commits only above the
        last commit, so both must be forgotten for that partition; so must the old log's offsets
        acknowledged and not committed yet (and its gaps), which Faust would otherwise commit on
        the new log, skipping the new records below them, as it forgets them on a revocation.
        """
        consumer = self._consumer()
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
            # The consumer thread updates the high-water mark and the read offset at different
            # moments, so one sighting can be a race: act only when two checks in a row agree.
            was_suspect = tp in self._truncated_suspects
            self._truncated_suspects.discard(tp)
            if suspect and not was_suspect:
                self._truncated_suspects.add(tp)
            elif suspect:
                log.warning("%s[%d] ends at %d but %d were consumed: the topic was recreated; "
                            "reading it again from the start", tp.topic, tp.partition, highwater, consumed)
                consumer._committed_offset[tp] = None
                for stale in ("_acked", "_acked_index", "_gap"):
                    getattr(consumer, stale, {}).pop(tp, None)
                await consumer.seek(tp, 0)
                key = (tp.topic, tp.partition)
                self._resets[key] = self._resets.get(key, 0) + 1
                self.metrics.log_resets.labels("group").inc()


__all__ = ["GroupObserver"]
