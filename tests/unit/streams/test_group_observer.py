"""The consumer-group observer's reset of a recreated partition (a fake Faust consumer)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace
from typing import Any, NamedTuple

from samestyle.streams.worker.group import GroupObserver


class TP(NamedTuple):
    topic: str
    partition: int


class FakeConsumer:
    """The parts of Faust's consumer the observer reads and resets."""

    def __init__(self, tp: Any, highwater: int, read: int, committed: int, acked: list[int]) -> None:
        self.tp, self._highwater = tp, highwater
        self._read_offset = {tp: read}
        self._committed_offset = {tp: committed}
        self._acked = defaultdict(list, {tp: list(acked)})
        self._acked_index = defaultdict(set, {tp: set(acked)})
        self._gap = defaultdict(list, {tp: [(acked[-1] + 2, acked[-1] + 4)]})
        self.seeks: list[tuple[Any, int]] = []

    def assignment(self) -> set[Any]:
        return {self.tp}

    def highwater(self, tp: Any) -> int:
        return self._highwater

    async def seek(self, tp: Any, offset: int) -> None:
        self.seeks.append((tp, offset))


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def labels(self, *_: str) -> Counter:
        return self

    def inc(self) -> None:
        self.value += 1


def observer_of(consumer: FakeConsumer) -> tuple[GroupObserver, Counter]:
    resets = Counter()
    return GroupObserver(SimpleNamespace(_consumer=consumer), SimpleNamespace(log_resets=resets)), resets


def test_a_recreated_partition_forgets_the_old_logs_acknowledgements() -> None:
    tp = TP("listing-embeddings", 1)
    consumer = FakeConsumer(tp, highwater=53, read=76, committed=70, acked=[73, 74, 75, 76])
    observer, resets = observer_of(consumer)
    asyncio.run(observer.restart_truncated_partitions())
    assert consumer.seeks == [] and consumer._acked[tp] == [73, 74, 75, 76]  # one sighting may be a race
    asyncio.run(observer.restart_truncated_partitions())
    assert consumer.seeks == [(tp, 0)] and resets.value == 1
    assert consumer._committed_offset[tp] is None
    # Acknowledged old-log offsets left behind would be committed as 77 on the new log.
    assert tp not in consumer._acked and tp not in consumer._acked_index and tp not in consumer._gap


def test_a_partition_that_only_grew_is_left_alone() -> None:
    tp = TP("listing-embeddings", 0)
    consumer = FakeConsumer(tp, highwater=90, read=76, committed=70, acked=[73, 74])
    observer, resets = observer_of(consumer)
    for _ in range(3):
        asyncio.run(observer.restart_truncated_partitions())
    assert consumer.seeks == [] and resets.value == 0 and consumer._acked[tp] == [73, 74]


class FakeMessage:
    """Hashable, like Faust's Message (the consumer keeps unacknowledged ones in a WeakSet)."""

    def __init__(self, tp: TP, offset: int) -> None:
        self.tp, self.offset, self.acked = tp, offset, False


def event_of(tp: TP, offset: int) -> SimpleNamespace:
    return SimpleNamespace(message=FakeMessage(tp, offset))


def test_events_taken_before_their_partition_was_reset_are_released_not_acknowledged() -> None:
    recreated, other = TP("listing-embeddings", 1), TP("listing-embeddings", 0)
    consumer = FakeConsumer(recreated, highwater=53, read=76, committed=70, acked=[73, 74, 75, 76])
    observer, _ = observer_of(consumer)
    # The index agent took a batch from both partitions, then the broker came back empty.
    batch = [event_of(recreated, 77), event_of(other, 12), event_of(recreated, 78)]
    consumer._unacked_messages = {e.message for e in batch}
    then = observer.resets_of(batch)
    assert then == {("listing-embeddings", 1): 0, ("listing-embeddings", 0): 0}
    assert observer.split_by_reset(batch, then) == (batch, [])  # nothing reset yet: all acknowledged
    for _ in range(2):
        asyncio.run(observer.restart_truncated_partitions())
    assert observer.resets("listing-embeddings", 1) == 1 and observer.resets("listing-embeddings", 0) == 0
    # Only the event of the partition that kept its log is acknowledged; the recreated
    # partition's old-log offsets 77 and 78 would otherwise be committed on the new log.
    current, stale = observer.split_by_reset(batch, then)
    assert current == [batch[1]] and stale == [batch[0], batch[2]]
    observer.release(stale)
    # Released: no rebalance waits for them, and no offset of theirs is recorded for a commit.
    assert consumer._unacked_messages == {batch[1].message}
    assert all(e.message.acked for e in stale) and not batch[1].message.acked
    assert recreated not in consumer._acked
    # A batch taken after the reset is current again.
    fresh = [event_of(recreated, 3)]
    assert observer.split_by_reset(fresh, observer.resets_of(fresh)) == (fresh, [])
