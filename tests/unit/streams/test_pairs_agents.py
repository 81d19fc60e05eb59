"""The batched pairs agents without a broker: what a batch writes, copies after a replay, and what
a rebalance keeps, drops and commits (fake consumer and outbox; the real broker is in
tests/integration/test_clicks.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import TopicPartition

from samestyle.streams.pairs.agents import ORIGIN_HEADER, WINDOW_HEADER, PairsAgents
from samestyle.streams.pairs.mining import pair_key
from samestyle.streams.pairs.store import decode_value
from samestyle.streams.settings import Settings
from samestyle.streams.worker.metrics import Metrics
from samestyle.topics import codec_for_topic

T0 = 1_717_200_000_000
CODEC = codec_for_topic("click-events")


@dataclass
class Record:
    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]] = field(default_factory=list)


class FakeOutbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, int, bytes | None, bytes | None, list[tuple[str, bytes]]]] = []
        self.drains = 0

    def add(self, topic: str, partition: int, key: bytes | None, value: bytes | None,
            headers: list[tuple[str, bytes]] | None = None) -> None:
        self.sent.append((topic, partition, key, value, headers or []))

    async def drain(self) -> None:
        self.drains += 1

    def to(self, topic: str) -> list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes]]]]:
        return [(p, k, v, h) for t, p, k, v, h in self.sent if t == topic]


class FakeGroup:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []
        self.offsets: dict[TopicPartition, int] = {}
        self.seeks: list[tuple[TopicPartition, int | None]] = []
        self.refuse = False

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        from aiokafka.errors import CommitFailedError

        if self.refuse:
            raise CommitFailedError("rebalanced")
        self.commits.append(dict(offsets))
        self.offsets.update(offsets)

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.offsets.get(tp)

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))

    async def seek_to_beginning(self, tp: TopicPartition) -> None:
        self.seeks.append((tp, None))


def agents(tmp_path: Path) -> tuple[PairsAgents, FakeGroup, FakeOutbox, list[list[TopicPartition]]]:
    settings = Settings(bootstrap="127.0.0.1:9", topic_prefix="t-", app_id="app", state_dir=tmp_path,
                        pairs_min_co_clicks=2, pairs_min_sessions=2, pairs_min_dwell_ms=1_000)

    async def ready() -> None:
        return None

    async def crash(exc: BaseException) -> None:
        raise AssertionError(f"crashed: {exc!r}")

    a = PairsAgents(settings, Metrics(process=False), index=lambda: None, model_version=lambda: None, ready=ready,
                    crash=crash)
    group, outbox = FakeGroup(), FakeOutbox()
    a._group, a._outbox = group, outbox  # type: ignore[assignment]
    recovered: list[list[TopicPartition]] = []

    async def recover(tps: list[TopicPartition]) -> None:  # empty changelogs
        recovered.append(tps)
        a.stores.update({tp: a._new_store(tp) for tp in tps})

    a._recover = recover  # type: ignore[method-assign]
    return a, group, outbox, recovered


def click(session: str, a: str, b: str, t: int, dwell: int = 5_000) -> dict[str, Any]:
    return {"session_id": session, "user_id": None, "query": None, "trigger_id": a, "clicked_id": b,
            "position": 1, "dwell_ms": dwell, "event_time": t}


def test_a_batch_writes_each_key_once_and_replayed_copies_count_nothing(tmp_path: Path) -> None:
    a, group, outbox, _ = agents(tmp_path)
    ce, cp = TopicPartition("t-click-events", 0), TopicPartition("t-click-pairs", 0)

    async def run() -> None:
        await a.on_assigned({ce, cp})
        clicks = [click("s1", "x", "y", T0), click("s1", "y", "x", T0 + 1), click("s2", "x", "y", T0 + 2),
                  click("s2", "x", "x", T0 + 3), click("s3", "x", "y", T0 + 4, dwell=10)]  # self-click, bounce
        await a._process({ce: [Record(i, c["session_id"].encode(), CODEC.encode(c)) for i, c in enumerate(clicks)]})
        forwards = outbox.to("t-click-pairs")
        assert len(forwards) == 3  # the self-click and the bounce stop here
        assert [dict(h)[ORIGIN_HEADER] for _, _, _, h in forwards] == [b"0:0", b"0:1", b"0:2"]
        assert forwards[0][2] == CODEC.encode(clicks[0])  # the click's own bytes, its window in a header
        assert dict(forwards[0][3])[WINDOW_HEADER] == b"0"
        assert [k for _, k, _, _ in outbox.to("app-pairs-sessions-changelog")] == [b"s1", b"s2"]  # once each
        # Stage 2 gets the forwards, then the same copies again (a replay of stage 1).
        records = [Record(i, k, v, h) for i, (_, k, v, h) in enumerate(forwards + forwards)]
        await a._process({cp: records})
        key = pair_key("x", "y")
        [(_, k, v, _)] = outbox.to("t-positive-pairs")
        positive = codec_for_topic("positive-pairs").decode(v)
        assert k == key.encode() and (positive["co_clicks"], positive["sessions"]) == (3, 2)
        state = a.stores[cp][key]
        assert state["co_clicks"] == 3 and state["sent"] and state["origins"] == {"0": 2}  # copies not counted
        writes = [decode_value(v) for _, k, v, _ in outbox.to("app-pairs-evidence-changelog") if k == key.encode()]
        assert [w["sent"] for w in writes] == [False, True]  # the state, then the acknowledged send
        assert a._next == {ce: 5, cp: 6} and await a._commit()
        assert group.commits == [{ce: 5, cp: 6}]

    asyncio.run(run())


def test_a_rebalance_commits_first_keeps_what_stays_and_reads_the_rest_again(tmp_path: Path) -> None:
    a, group, _, recovered = agents(tmp_path)
    p0, p1 = TopicPartition("t-click-events", 0), TopicPartition("t-click-events", 1)

    async def run() -> None:
        await a.on_assigned({p0, p1})
        assert recovered == [[p0, p1]]
        store = a.stores[p0]
        a._next = {p0: 7}
        await a.on_revoked({p0, p1})
        assert group.commits == [{p0: 7}]  # revoked partitions are committed before they go
        await a.on_assigned({p0})
        assert a.stores[p0] is store and recovered == [[p0, p1]]  # kept through the rebalance: not read again
        assert a._committed == {p0: 7}
        # A batch fetched before a rebalance is not processed: read again from the committed offset.
        await a._refetch({p0: [], p1: []})
        assert group.seeks == [(p0, 7)]
        # A refused commit: this worker may have lost the group, so its tables are not trusted.
        group.refuse = True
        a._next = {p0: 9}
        await a.on_revoked({p0})
        await a.on_assigned({p0})
        assert a.stores[p0] is not store and recovered[-1] == [p0]

    asyncio.run(run())


def test_after_a_failed_batch_nothing_is_committed(tmp_path: Path) -> None:
    a, group, _, _ = agents(tmp_path)
    p0 = TopicPartition("t-click-events", 0)

    async def run() -> None:
        await a.on_assigned({p0})
        a._next = {p0: 3}
        a._failed = True
        assert not await a._commit()
        await a.on_revoked({p0})
        assert group.commits == [] and a.stores == {}

    asyncio.run(run())
