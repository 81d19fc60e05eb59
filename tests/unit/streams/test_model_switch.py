"""The pure parts of a model switch: per-version indexes, the switch rule, the decision chain,
the records embedded by two models, which index an update is searched in, and a switch against a
listings log that cannot supply every listing (the coordinator with fake log, replica and registry)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from samestyle.models import create_encoder
from samestyle.models.encoder import Encoder
from samestyle.streams.io.reader import LogRecord
from samestyle.streams.settings import Settings
from samestyle.streams.switch.backfill import Backfill, default_partition
from samestyle.streams.switch.coordinator import ModelSwitch, SwitchState
from samestyle.streams.switch.indexes import ModelIndexes, load_active_snapshot
from samestyle.streams.switch.watcher import ModelChain, ModelWatcher
from samestyle.streams.worker.app import searchable
from samestyle.streams.worker.metrics import LEFT_OUT_REASONS, Metrics
from samestyle.streams.worker.pipeline import EmbeddingUpdate, EmbedStep, Failure, Incoming, Outgoing, decode_embedding
from samestyle.topics import LISTINGS, MODEL_UPDATES, codec_for_topic
from samestyle.topics.errors import InvalidListingError


def _views(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((3, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def upsert(listing_id: str, vectors: dict[str, np.ndarray], reembed: bool = False) -> EmbeddingUpdate:
    first = next(iter(vectors))
    return EmbeddingUpdate(listing_id, "s1", "UPSERT", first, 0, False, vectors[first],
                           {"supplier_id": "s1", "event_time": 0, "has_image": False}, dict(vectors), reembed)


def delete(listing_id: str) -> EmbeddingUpdate:
    return EmbeddingUpdate(listing_id, "s1", "DELETE", "v1", 0, False, None, {})


def test_apply_fills_each_version_and_deletes_everywhere() -> None:
    indexes = ModelIndexes("flat", 3)
    indexes.apply([upsert("a", {"v1": _views(1, 8)}), upsert("b", {"v1": _views(2, 8), "v2": _views(3, 4)})])
    assert sorted(indexes.indexes["v1"].ids()) == ["a", "b"] and indexes.indexes["v2"].ids() == ["b"]
    assert indexes.indexes["v2"].dim == 4
    indexes.apply([upsert("a", {"v2": _views(4, 4)}, reembed=True), delete("b")])
    assert indexes.indexes["v1"].ids() == ["a"] and indexes.indexes["v2"].ids() == ["a"]
    # Per version, the last record of a listing wins, even when a later one lacks that version.
    indexes.apply([delete("a"), upsert("a", {"v2": _views(5, 4)})])
    assert indexes.indexes["v1"].ids() == [] and indexes.indexes["v2"].ids() == ["a"]


def test_each_version_s_index_keeps_its_own_model_s_match_text() -> None:
    from dataclasses import replace

    indexes = ModelIndexes("flat", 3)
    both = upsert("b", {"v1": _views(2, 8), "v2": _views(3, 4)})
    both = replace(both, payload={**both.payload, "match_text": "mug"},
                   match_texts={"v2": "mug | description red stoneware"})
    indexes.apply([both])
    assert indexes.indexes["v1"].payload("b")["match_text"] == "mug"
    assert indexes.indexes["v2"].payload("b")["match_text"] == "mug | description red stoneware"


def test_switch_waits_for_a_complete_index_then_drops_the_old_one() -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert(x, {"v1": _views(i, 8)}) for i, x in enumerate("abc")])
    indexes.apply([upsert("a", {"v2": _views(9, 4)})])
    assert indexes.missing("v2") == 2 and not indexes.try_switch("v2")
    indexes.apply([upsert("b", {"v2": _views(10, 4)}), upsert("c", {"v1": _views(11, 8), "v2": _views(12, 4)})])
    assert indexes.missing("v2") == 0
    assert indexes.try_switch("v2") and indexes.active == "v2" and list(indexes.indexes) == ["v2"]
    assert sorted(indexes.active_index.ids()) == ["a", "b", "c"]
    assert not indexes.try_switch("v2")  # already there
    # A record still carrying the old model's vectors (in flight from a worker that had not
    # switched) does not bring the old index back.
    indexes.apply([upsert("d", {"v1": _views(13, 8), "v2": _views(14, 4)}), upsert("e", {"v1": _views(15, 8)})])
    assert list(indexes.indexes) == ["v2"] and "d" in indexes.active_index and "e" not in indexes.active_index


def test_switch_from_an_empty_index_is_immediate_and_force_skips_the_check() -> None:
    empty = ModelIndexes("flat", 3, active="v1")
    assert empty.try_switch("v2") and empty.active == "v2" and empty.active_index is None
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("a", {"v1": _views(1, 8)})])
    assert not indexes.try_switch("v3")
    assert indexes.try_switch("v3", force=True) and indexes.active == "v3"


def test_choose_active_resumes_an_unfinished_switch() -> None:
    indexes = ModelIndexes("flat", 3)
    indexes.apply([upsert(x, {"v1": _views(i, 8)}) for i, x in enumerate("abc")] + [upsert("a", {"v2": _views(7, 4)})])
    assert indexes.choose_active("v2", {"v2": 0}) == "v1"  # v2 lacks b and c: keep serving v1
    done = ModelIndexes("flat", 3)
    done.apply([upsert(x, {"v1": _views(i, 8), "v2": _views(i + 5, 4)}) for i, x in enumerate("ab")])
    assert done.choose_active("v2", {"v2": 0}) == "v2"
    assert ModelIndexes("flat", 3).choose_active("v7", {}) == "v7"


def test_snapshot_round_trip_keeps_every_version_and_the_active_one(tmp_path: Path) -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("a", {"v1": _views(1, 8), "v2": _views(2, 4)}), upsert("b", {"v1": _views(3, 8)})])
    indexes.snapshot(tmp_path, {0: 5, 1: 7})
    loaded, offsets = ModelIndexes.load(tmp_path, "flat", 3)
    assert offsets == {0: 5, 1: 7} and loaded.active == "v1"
    assert {v: sorted(i.ids()) for v, i in loaded.indexes.items()} == {"v1": ["a", "b"], "v2": ["a"]}
    index, _, version = load_active_snapshot(tmp_path)
    assert version == "v1" and len(index) == 2
    # After a switch the old version's files go with the next snapshot.
    loaded.apply([upsert("b", {"v2": _views(4, 4)})])
    assert loaded.try_switch("v2")
    loaded.snapshot(tmp_path, {0: 9, 1: 9})
    assert len(list(tmp_path.glob("m-*"))) == 1
    assert ModelIndexes.load(tmp_path, "flat", 3)[0].retired == {"v1"}
    assert ModelIndexes.load(tmp_path / "absent", "flat", 3)[1] == {}


def test_model_chain_follows_promotions_only() -> None:
    codec = codec_for_topic(MODEL_UPDATES)

    def record(version: str, decision: str) -> bytes:
        return codec.encode({"version": version, "model_dir": f"/m/{version}", "decision": decision,
                             "previous_version": None, "metric": "valid_f1", "score": 0.5, "previous_score": None,
                             "pairs_used": 3, "reason": "test", "created_at": int(time.time() * 1000)})

    watcher = ModelWatcher(Settings(), "model-updates", records=[
        (0, record("a", "PROMOTED")), (1, record("b", "REJECTED")), (2, b"not avro"), (3, record("c", "PROMOTED"))])
    chain = watcher.chain
    assert chain.latest is not None and chain.latest.version == "c"
    assert chain.model_dir("a") == "/m/a" and chain.model_dir("b") is None
    order = chain.order()
    assert order["c"] > order["a"] and "b" not in order and chain.rejected == 1
    assert ModelChain().latest is None


def test_dual_model_records_carry_both_models_vectors() -> None:
    settings = Settings()
    first = create_encoder("tiny", allow_random_weights=True)
    second = create_encoder("tiny", allow_random_weights=True)
    second.version = "tiny-second"  # type: ignore[misc]
    listing = {"listing_id": "l1", "supplier_id": "s1", "category": None, "title": "red mug", "description": None,
               "attributes": {}, "image_uri": None, "image_bytes": None, "op": "UPSERT", "event_time": 1}
    batch = [Incoming(b"l1", codec_for_topic(LISTINGS).encode(listing), "listings", 0, 0)]
    step = EmbedStep(first, settings)
    [out], failures = step(batch, [first, second])
    assert not failures
    update = decode_embedding(out.value)
    assert set(update.vectors) == {first.version, "tiny-second"} and not update.reembed
    [again], _ = step(batch, [second], reembed=True)
    redone = decode_embedding(again.value)
    assert redone.model_version == "tiny-second" and redone.reembed
    assert np.allclose(redone.views, update.vectors["tiny-second"], atol=1e-6)
    with pytest.raises(ValueError):
        step(batch, [first, second, first])


def test_searchable_prefers_the_serving_index_then_the_newest() -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("x", {"v1": _views(1, 8), "v2": _views(2, 4)})])
    both, only_new, unknown = (upsert("a", {"v1": _views(3, 8), "v2": _views(4, 4)}),
                               upsert("b", {"v2": _views(5, 4)}), upsert("c", {"v9": _views(6, 4)}))
    groups = searchable([both, only_new, unknown, delete("d")], indexes)
    assert {v: [u.listing_id for u in g] for v, g in groups.items()} == {"v1": ["a"], "v2": ["b"]}
    assert groups["v2"][0].model_version == "v2" and groups["v1"][0].views.shape == (3, 8)


def test_backfill_skips_listings_the_embed_agent_already_handled() -> None:
    backfill = Backfill(Settings(), "listings", 2)
    chunk = [Incoming(b"a", b"", "listings", 0, 0), Incoming(b"b", b"", "listings", 0, 1),
             Incoming(b"a", b"", "listings", 1, 0)]
    backfill.note_live(chunk[:1])  # not switching: nothing recorded
    assert backfill.unseen(chunk) == chunk
    backfill.version = "v2"
    backfill.note_live(chunk[:1])
    assert backfill.unseen(chunk) == chunk[1:]  # partition 0's "a" only


# --- a switch against a listings log that cannot supply every listing -------------------------


class FakeLog:
    """The listings topic as a LogReader sees it: assigned partitions read from their positions."""

    def __init__(self, topic: str, partitions: dict[int, list[tuple[bytes, bytes]]]) -> None:
        self.topic = topic
        self.records = {p: [LogRecord(topic, p, offset, key, value, 0) for offset, (key, value) in enumerate(rows)]
                        for p, rows in partitions.items()}
        self.positions: dict[int, int] = {}

    async def assign(self, positions: dict[tuple[str, int], int | None]) -> None:
        self.positions = {p: offset or 0 for (_, p), offset in positions.items()}

    def unassign(self) -> None:
        self.positions = {}

    async def fetch(self, timeout: float = 0.2, max_records: int = 10_000) -> list[LogRecord]:
        out: list[LogRecord] = []
        for p, position in self.positions.items():
            rows = self.records[p][position:position + max_records - len(out)]
            out += rows
            self.positions[p] = position + len(rows)
        return out

    def highwater(self, partition: tuple[str, int]) -> int:
        return len(self.records[partition[1]])

    async def stop(self) -> None:
        pass


class FakeReplica:
    """The replica's part in a switch: apply what is sent, switch when the target is complete."""

    def __init__(self, indexes: ModelIndexes, target: str) -> None:
        self.indexes, self.target = indexes, target
        self.forced = False

    @property
    def index(self) -> object:
        return self.indexes.active_index

    @property
    def active_version(self) -> str | None:
        return self.indexes.active

    async def wait_ready(self) -> None:
        pass

    async def lacking(self, target: str) -> list[str]:
        return self.indexes.lacking(target)

    async def missing(self, target: str) -> int:
        return self.indexes.missing(target)

    def apply(self, out: list[Outgoing]) -> None:
        self.indexes.apply([decode_embedding(o.value) for o in out])
        self.indexes.try_switch(self.target, force=self.forced)

    def force_switch(self, target: str) -> None:
        self.forced = True
        self.indexes.try_switch(target, force=True)


class FakeRegistry:
    #: No index snapshot recorded a switch (streams/switch/record.py; tested in test_switch_resume.py).
    restored = None

    def __init__(self, serving: Encoder, target: Encoder) -> None:
        self.encoders = {serving.version: serving, target.version: target}
        self.serving, self.target = serving, target
        self.watcher = SimpleNamespace(ready=asyncio.Event(), changed=asyncio.Event())
        self.watcher.ready.set()

    def configured_encoder(self) -> Encoder:
        return self.serving

    def target_encoder(self) -> Encoder:
        return self.target

    def target_version(self) -> str:
        return self.target.version

    def encoder_for(self, version: str) -> Encoder:
        return self.encoders[version]

    def keep_only(self, versions: list[str]) -> None:
        pass


def _listing(listing_id: str, **extra: object) -> dict[str, object]:
    return {"listing_id": listing_id, "supplier_id": "s1", "title": f"listing {listing_id}", "event_time": 1, **extra}


def _in_partition(partition: int, count: int, partitions: int = 2) -> list[str]:
    """``count`` listing ids that Kafka's default partitioner puts in ``partition``."""
    ids = (f"listing-{i}" for i in range(1000))
    return [i for i in ids if default_partition(i.encode(), partitions) == partition][:count]


def _switch_setup(log_rows: dict[int, list[dict[str, object]]], serving_ids: list[str], *, deadline: float = 60.0,
                  keys: dict[str, bytes] | None = None) -> tuple[ModelSwitch, FakeReplica, list[Outgoing]]:
    """A worker serving ``serving_ids`` under v1, owning both listings partitions, whose log holds
    ``log_rows``; the target model is another tiny encoder."""
    settings = Settings()
    first = create_encoder("tiny", allow_random_weights=True)
    second = create_encoder("tiny", allow_random_weights=True)
    second.version = "tiny-next"  # type: ignore[misc]
    listings = codec_for_topic(LISTINGS)
    step = EmbedStep(first, settings)
    indexes = ModelIndexes("flat", 3, active=first.version)
    old, _ = step([Incoming(i.encode(), listings.encode(_listing(i)), "listings", 0, 0) for i in serving_ids], [first])
    indexes.apply([decode_embedding(o.value) for o in old])
    keys = keys or {}
    log = FakeLog("listings", {p: [(keys.get(str(r["listing_id"]), str(r["listing_id"]).encode()), listings.encode(r))
                                   for r in rows] for p, rows in log_rows.items()})
    replica = FakeReplica(indexes, second.version)
    sent: list[Outgoing] = []

    async def send(out: list[Outgoing]) -> None:
        sent.extend(out)
        replica.apply(list(out))

    async def run_model(fn: Any, *args: Any) -> Any:
        return fn(*args)

    switch = ModelSwitch(FakeRegistry(first, second), replica,  # type: ignore[arg-type]
                         Backfill(settings, "listings", 2, reader=log),  # type: ignore[arg-type]
                         lambda: step, Metrics(process=False), run_model, send, lambda: [0, 1], 4,
                         deadline_seconds=deadline)
    return switch, replica, sent


async def _run_until_switched(switch: ModelSwitch, replica: FakeReplica, timeout: float = 20.0) -> None:
    await run_switch_until(switch, lambda: replica.indexes.active == replica.target
                           and switch.state is SwitchState.SERVING, timeout)


async def run_switch_until(switch: ModelSwitch, done: Callable[[], bool], timeout: float = 20.0) -> None:
    """Run the switch's loop until ``done()`` (asyncio.TimeoutError after ``timeout`` seconds)."""
    task = asyncio.ensure_future(switch.run(done))
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _left_out(switch: ModelSwitch) -> dict[str, float]:
    registry = switch.metrics.registry
    return {reason: registry.get_sample_value("samestyle_model_switch_left_out_total", {"reason": reason})
            for reason in LEFT_OUT_REASONS}


def test_a_switch_leaves_out_what_the_log_cannot_supply_and_completes() -> None:
    p0, p1 = _in_partition(0, 3), _in_partition(1, 3)
    kept = [p0[0], p1[0]]
    expired = [p0[1], p1[1]]  # in the serving index, their records gone from the log
    broken = p0[2]  # its latest record carries an image the new model cannot decode
    deleted = p1[2]  # deleted: its DELETE is the log's last record of it
    log_rows = {0: [_listing(kept[0]), _listing(broken, image_bytes=b"\x89PNG not an image")],
                1: [_listing(kept[1]), _listing(deleted), _listing(deleted, op="DELETE")]}
    switch, replica, sent = _switch_setup(log_rows, [*kept, *expired, broken])

    asyncio.run(_run_until_switched(switch, replica))

    assert replica.indexes.active == "tiny-next" and not replica.forced  # completed by the rule, not the deadline
    assert sorted(replica.indexes.active_index.ids()) == sorted(kept)
    assert _left_out(switch) == {"not_in_log": 2.0, "reembed_failed": 1.0, "deadline": 0.0}
    records = [decode_embedding(o.value) for o in sent]
    assert all(r.reembed for r in records)  # the index agent emits nothing for any of them
    left_out = {r.listing_id for r in records if r.op == "DELETE"}
    assert left_out == {*expired, broken, deleted}  # the log's own DELETE passes through too
    # Written out of the catalogue: a replica that replays listing-embeddings agrees with this one.
    fresh = ModelIndexes("flat", 3)
    fresh.apply([decode_embedding(o.value) for o in sent])
    assert sorted(fresh.indexes["tiny-next"].ids()) == sorted(kept)


def test_a_partition_keyed_otherwise_is_settled_by_the_deadline() -> None:
    p0, p1 = _in_partition(0, 2), _in_partition(1, 2)
    # Partition 0 holds a record keyed by something other than its listing id: this worker cannot
    # tell which listings that partition lacks, so it writes none out and waits for the deadline.
    log_rows = {0: [_listing(p0[0])], 1: [_listing(p1[0])]}
    switch, replica, sent = _switch_setup(log_rows, [*p0, *p1], deadline=0.5, keys={p0[0]: b"sku-1"})
    started = time.monotonic()

    asyncio.run(_run_until_switched(switch, replica))

    assert replica.forced and time.monotonic() - started >= 0.5
    assert sorted(replica.indexes.active_index.ids()) == sorted([p0[0], p1[0]])
    assert _left_out(switch) == {"not_in_log": 1.0, "reembed_failed": 0.0, "deadline": 1.0}
    assert {decode_embedding(o.value).listing_id for o in sent if decode_embedding(o.value).op == "DELETE"} == {p1[1]}


def test_backfill_reads_a_recreated_partition_again_from_the_start() -> None:
    listings = codec_for_topic(LISTINGS)
    rows = [(i.encode(), listings.encode(_listing(i))) for i in ("a", "b", "c")]
    log = FakeLog("listings", {0: rows, 1: []})
    backfill = Backfill(Settings(), "listings", 2, reader=log)  # type: ignore[arg-type]

    async def run() -> list[list[bytes | None]]:
        await backfill.plan("v2", [0, 1])
        chunks = [[m.key for m in await backfill.next_chunk(2)]]
        # The topic is created again with a shorter log (an empty broker restart, a re-publish).
        log.records[0] = [LogRecord("listings", 0, 0, b"d", listings.encode(_listing("d")), 0)]
        while backfill.pending():
            chunks.append([m.key for m in await backfill.next_chunk(2)])
        return chunks

    chunks = asyncio.run(run())
    assert chunks[0] == [b"a", b"b"] and [k for c in chunks[1:] for k in c] == [b"d"]
    assert backfill.done == {0, 1} and backfill.ends[0] == 1
    assert backfill.supplied[0] == {"d"}  # a, b, c left the log: left out like any expired listing


def test_a_recreated_listings_log_replans_partitions_already_reembedded(caplog: pytest.LogCaptureFixture) -> None:
    a, b, lost, new = _in_partition(0, 4)
    [d] = _in_partition(1, 1)
    switch, replica, sent = _switch_setup({0: [_listing(a), _listing(b), _listing(lost)], 1: [_listing(d)]},
                                          [a, b, lost, d])
    log = switch.backfill._reader
    listings = codec_for_topic(LISTINGS)
    dropped: list[str] = []

    async def send(out: list[Outgoing]) -> None:
        # The re-embedded record of `lost` is acknowledged by the broker, which then restarts empty
        # before the replica applied it: the new index never gets it from the log.
        sent.extend(out)
        kept = []
        for o in out:
            update = decode_embedding(o.value)
            if update.listing_id == lost and update.op != "DELETE":
                dropped.append(lost)
            else:
                kept.append(o)
        replica.apply(kept)

    switch._send = send  # type: ignore[method-assign]

    async def run() -> None:
        done = lambda: replica.indexes.active == replica.target and switch.state is SwitchState.SERVING
        task = asyncio.ensure_future(switch.run(done))
        try:
            async with asyncio.timeout(10):
                while switch.state is not SwitchState.AWAITING_INDEX:
                    await asyncio.sleep(0.01)
            # Every partition is re-embedded, and judged against the old log: `lost` is supplied by
            # it, so nothing is left out, and the new index lacks it.
            assert dropped == [lost] and replica.indexes.lacking(replica.target) == [lost]
            # The broker restarted empty: the listings log is recreated, with one new listing.
            log.records = {0: [LogRecord("listings", 0, 0, new.encode(), listings.encode(_listing(new)), 0)], 1: []}
            await asyncio.wait_for(asyncio.shield(task), 20)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    with caplog.at_level(logging.INFO, logger="samestyle.streams.switch"):
        asyncio.run(run())

    assert replica.indexes.active == "tiny-next" and not replica.forced  # by the rule, long before the deadline
    assert sorted(replica.indexes.active_index.ids()) == sorted([a, b, d, new])
    assert _left_out(switch) == {"not_in_log": 1.0, "reembed_failed": 0.0, "deadline": 0.0}
    assert [r.listing_id for r in map(decode_embedding, (o.value for o in sent)) if r.op == "DELETE"] == [lost]
    assert "had re-embedded it up to 3" in caplog.text and "awaiting_index -> reembedding" in caplog.text


def test_unsupplied_skips_listings_embedded_live_and_other_workers_partitions() -> None:
    backfill = Backfill(Settings(), "listings", 2)
    backfill.version = "v2"
    mine, theirs = _in_partition(0, 3), _in_partition(1, 1)
    backfill.ends, backfill.done = {0: 1}, {0}
    backfill.supplied = {0: {mine[0]}}
    backfill.note_live([Incoming(mine[1].encode(), b"", "listings", 0, 5)])
    assert backfill.unsupplied([*mine, *theirs]) == {"not_in_log": [mine[2]]}
    assert backfill.unsupplied(mine) == {}  # a partition is judged once


def test_a_later_record_repairs_an_earlier_reembedding_failure() -> None:
    backfill = Backfill(Settings(), "listings", 2)
    [listing_id] = _in_partition(0, 1)
    first, later = (Incoming(listing_id.encode(), b"", "listings", 0, offset) for offset in (0, 1))
    backfill.note_embedded([first], [Failure(first, "embed", InvalidListingError("bad"))])
    assert backfill.failed[0] == {listing_id}
    backfill.note_embedded([later], [])
    assert backfill.failed[0] == set()


def test_lacking_names_what_the_target_index_lacks() -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert(x, {"v1": _views(i, 8)}) for i, x in enumerate("abc")] + [upsert("b", {"v2": _views(9, 4)})])
    assert sorted(indexes.lacking("v2")) == ["a", "c"] and indexes.missing("v2") == 2
    assert indexes.lacking("v1") == [] and sorted(indexes.lacking("v3")) == ["a", "b", "c"]
