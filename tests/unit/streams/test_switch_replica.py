"""The replica's wait for a record whose log was recreated (the embedded broker restarted empty).

The real apply loop of :class:`IndexReplica` over a fake ``listing-embeddings`` log: the index agent
waits for a record it read from the old log; once the new log, read to its end, does not reach that
record, the wait ends (the record was lost with the old log). A record that the new log holds is
waited for until it is applied, and a partition whose log was never recreated never ends a wait early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

import pytest

from samestyle.streams.io.reader import LogRecord
from samestyle.streams.settings import Settings
from samestyle.streams.switch.indexes import ModelIndexes
from samestyle.streams.worker import replica as replica_module
from samestyle.streams.worker.replica import IndexReplica
from samestyle.topics import LISTING_EMBEDDINGS, codec_for_topic

TOPIC = "listing-embeddings"


def deleted(listing_id: str) -> bytes:
    """A ``listing-embeddings`` DELETE (the replica only needs records it can decode)."""
    return codec_for_topic(LISTING_EMBEDDINGS).encode({
        "listing_id": listing_id, "supplier_id": "s1", "category": None, "title": None, "op": "DELETE",
        "model_version": "v1", "dim": 0, "has_image": False, "vector_image": None, "vector_text": None,
        "vector_image_text": None, "event_time": 0, "embedded_at": 0})


class FakeEmbeddingsLog:
    """``listing-embeddings`` as the replica's reader sees it: ``per_fetch`` records of each
    partition per fetch, and high-water marks that are the logs' real ends."""

    def __init__(self, lengths: dict[int, int], per_fetch: int = 1000) -> None:
        self.records = {p: self.rows(p, n) for p, n in lengths.items()}
        self.positions = {p: 0 for p in lengths}
        self.per_fetch = per_fetch

    @staticmethod
    def rows(partition: int, n: int) -> list[LogRecord]:
        return [LogRecord(TOPIC, partition, o, b"k", deleted(f"l{partition}-{o}"), 0) for o in range(n)]

    async def fetch(self, timeout: float = 0.2, max_records: int = 10_000) -> list[LogRecord]:
        await asyncio.sleep(0.01)  # a fetch waits on the broker: the loop yields
        out: list[LogRecord] = []
        for p, position in self.positions.items():
            rows = self.records[p][position:position + self.per_fetch]
            out += rows
            self.positions[p] = position + len(rows)
        return out

    def highwater(self, partition: tuple[str, int]) -> int:
        return len(self.records[partition[1]])

    def seek(self, partition: tuple[str, int], offset: int) -> None:
        self.positions[partition[1]] = offset

    async def stop(self) -> None:
        pass


async def _replica(tmp_path: Path, log: FakeEmbeddingsLog) -> tuple[IndexReplica, asyncio.Task[None]]:
    """A replica reading ``log`` with its real apply loop, once it is ready."""
    replica = IndexReplica(Settings(snapshot_interval_seconds=0), ModelIndexes("flat", 3), TOPIC,
                           len(log.records), tmp_path / "snap", {}, target_version=lambda: "v1")
    replica._reader = log  # type: ignore[assignment]
    loop = asyncio.ensure_future(IndexReplica._apply_loop(replica))
    await asyncio.wait_for(replica.wait_ready(), 5)
    return replica, loop


async def _stop(loop: asyncio.Task[None], *waits: asyncio.Future[None]) -> None:
    for task in (loop, *waits):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_wait_for_a_record_beyond_the_end_of_the_recreated_log_ends(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "LOST_RECORD_SECONDS", 0.1)

    async def run() -> None:
        log = FakeEmbeddingsLog({0: 5, 1: 5})
        replica, loop = await _replica(tmp_path, log)
        # The index agent read offset 7 of each partition from the broker, which then stopped
        # before this replica fetched offsets 5-7.
        lost = asyncio.ensure_future(replica.wait_applied(1, 7))
        kept = asyncio.ensure_future(replica.wait_applied(0, 7))
        await asyncio.sleep(0.5)
        assert not lost.done() and not kept.done()  # no log was recreated: both wait
        log.records[1] = log.rows(1, 3)  # the broker restarted empty: partition 1 holds 3 new records
        await asyncio.wait_for(lost, 5)
        assert replica.applied[1] == 3
        # A batch of the old log that the agent only now takes from its buffer ends the same way.
        await asyncio.wait_for(replica.wait_applied(1, 6), 5)
        await asyncio.sleep(0.5)
        assert not kept.done()  # partition 0's log was not recreated: its record may still come
        log.records[0] = log.rows(0, 8)
        await asyncio.wait_for(kept, 5)
        await _stop(loop)

    with caplog.at_level(logging.WARNING, logger="samestyle.streams.worker.replica"):
        asyncio.run(run())
    lost_lines = [r.getMessage() for r in caplog.records if "lost with the old log" in r.getMessage()]
    assert lost_lines == [f"replica: {TOPIC}[1]@{offset} lies beyond the end (3) of the recreated log: the record was "
                          "lost with the old log; searched without waiting for it" for offset in (7, 6)]


def test_a_record_the_recreated_log_holds_is_waited_for_until_applied(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_module, "LOST_RECORD_SECONDS", 0.0)

    async def run() -> None:
        log = FakeEmbeddingsLog({0: 2, 1: 5})
        replica, loop = await _replica(tmp_path, log)
        waiting = asyncio.ensure_future(replica.wait_applied(1, 7))
        await asyncio.sleep(0.1)
        log.per_fetch = 1  # the new log is read slowly, a record a fetch
        log.records[1] = log.rows(1, 9)[:4]  # recreated shorter than what was applied...
        while 1 not in replica._recreated:
            await asyncio.sleep(0)
        log.records[1] = log.rows(1, 9)  # ...and it grows past offset 7 before the replica read it to its end
        await asyncio.wait_for(waiting, 10)
        assert replica.applied[1] >= 8  # applied, not given up
        await _stop(loop)

    with caplog.at_level(logging.WARNING, logger="samestyle.streams.worker.replica"):
        asyncio.run(run())
    assert "the topic was recreated" in caplog.text and "lost with the old log" not in caplog.text


def test_the_start_up_end_of_a_log_recreated_before_the_replica_is_ready_is_read_again(tmp_path: Path) -> None:
    async def run() -> None:
        log = FakeEmbeddingsLog({0: 50}, per_fetch=10)
        replica = IndexReplica(Settings(snapshot_interval_seconds=0), ModelIndexes("flat", 3), TOPIC, 1,
                               tmp_path / "snap", {}, target_version=lambda: "v1")
        replica._reader = log  # type: ignore[assignment]
        loop = asyncio.ensure_future(IndexReplica._apply_loop(replica))
        while replica.applied.get(0, 0) < 20:
            await asyncio.sleep(0.01)
        log.records[0] = log.rows(0, 5)  # recreated while the replica read the start-up log
        await asyncio.wait_for(replica.wait_ready(), 5)  # ready at the new log's end, not the old one's
        assert replica.applied[0] == 5
        await _stop(loop)

    asyncio.run(run())
