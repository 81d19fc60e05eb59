"""The worker's side of the Milvus backend without a broker: the index settings, the collections'
writes and switch rule (:class:`CollectionIndexes`), the search step on a collection's view, and
the alerted-pairs memory. Real Milvus Lite on a file of each test's own; no mocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from samestyle.index_store import LiveIndex
from samestyle.index_store.backend import FaissBackend, VersionView
from samestyle.streams.settings import Settings
from samestyle.streams.switch.indexes import CollectionIndexes, ModelIndexes
from samestyle.streams.worker.pipeline import AlertedPairs, EmbeddingUpdate, SearchStep
from samestyle.topics import DUPLICATE_ALERTS, SIMILAR_PRODUCTS, codec_for_topic
from samestyle.topics.errors import ConfigError, IndexStoreError

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from samestyle.index_store.milvus import MilvusBackend

DIM = 8

# ---------------------------------------------------------------------------------- settings


def test_the_index_backend_settings_default_to_faiss_and_a_lite_file_in_the_state_dir(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path)
    assert s.index_backend == "faiss" and s.milvus_uri is None
    assert s.effective_milvus_uri == str(tmp_path / "milvus.db")
    env = {"SAMESTYLE_INDEX_BACKEND": "milvus", "SAMESTYLE_MILVUS_URI": "http://milvus:19530",
           "SAMESTYLE_MILVUS_TOKEN": "root:Milvus", "SAMESTYLE_MILVUS_PREFIX": "shop_2"}
    s = Settings.from_env(env)
    assert (s.index_backend, s.effective_milvus_uri, s.milvus_prefix) == ("milvus", "http://milvus:19530", "shop_2")
    assert "Milvus" not in repr(s)  # the token is never printed
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize("env, message", [
    ({"SAMESTYLE_INDEX_BACKEND": "elastic"}, "index_backend must be 'faiss' or 'milvus'"),
    ({"SAMESTYLE_INDEX_BACKEND": "milvus", "SAMESTYLE_MILVUS_URI": "tcp://milvus:19530"}, "use http"),
    ({"SAMESTYLE_INDEX_BACKEND": "milvus", "SAMESTYLE_MILVUS_URI": "milvus:19530"}, "needs http://"),
    ({"SAMESTYLE_INDEX_BACKEND": "milvus", "SAMESTYLE_MILVUS_URI": "/data/index"}, "ending in .db"),
    ({"SAMESTYLE_MILVUS_PREFIX": "shop-2"}, "milvus_prefix"),
    ({"SAMESTYLE_MILVUS_RETRY_SECONDS": "-1"}, "milvus_retry_seconds"),
])
def test_bad_index_backend_settings_fail_with_a_clear_message(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


# ---------------------------------------------------------------------------------- collections


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def update(listing_id: str, vec: np.ndarray | None, *, supplier: str = "s1", event_time: int = 0,
           versions: tuple[str, ...] = ("v1",), op: str = "UPSERT", reembed: bool = False) -> EmbeddingUpdate:
    views = None if op == "DELETE" else np.stack([np.zeros(DIM, np.float32), unit(vec), unit(vec)])
    payload = {"supplier_id": supplier, "category": None, "title": listing_id, "event_time": event_time,
               "has_image": False}
    vectors = {} if views is None else {v: views for v in versions}
    return EmbeddingUpdate(listing_id, supplier, op, versions[0], event_time, False, views, payload, vectors, reembed)


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[MilvusBackend]:
    b = MilvusBackend(str(tmp_path / "index.db"), n_views=3)
    yield b
    b.close()


def test_writes_are_idempotent_the_last_op_wins_and_a_delete_reaches_every_version(backend: MilvusBackend) -> None:
    rng = np.random.default_rng(0)
    indexes = CollectionIndexes(backend)
    assert indexes.choose_active("v1", {}) == "v1" and backend.active is None  # no collection yet
    vec = rng.standard_normal((4, DIM))
    batch = [update("a", vec[0]), update("a", vec[1]), update("b", vec[2], versions=("v1", "v2")),
             update("c", vec[3]), update("c", None, op="DELETE")]
    for _ in range(3):  # a replayed batch changes nothing
        indexes.apply(batch, target="v2")
    assert backend.active == "v1"  # the alias followed the chosen version's first write
    assert sorted(indexes.indexes) == ["v1", "v2"]
    assert sorted(backend.ids("v1")) == ["a", "b"] and backend.ids("v2") == ["b"]
    np.testing.assert_allclose(backend.get("a", "v1")[0], unit(vec[1]), atol=1e-6)
    indexes.apply([update("b", None, op="DELETE")])
    assert backend.ids("v1") == ["a"] and backend.ids("v2") == []


def test_the_switch_waits_for_a_complete_target_and_every_worker_follows_the_alias(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    uri = str(tmp_path / "shared.db")
    one, two = MilvusBackend(uri, n_views=3), MilvusBackend(uri, n_views=3)
    order = {"v1": 0, "v2": 1}
    worker1, worker2 = CollectionIndexes(one, lambda: order), CollectionIndexes(two, lambda: order)
    vec = rng.standard_normal((3, DIM))
    worker1.choose_active("v1", order)
    worker1.apply([update(f"L{i}", vec[i]) for i in range(3)], target="v1")
    assert worker2.choose_active("v1", order) == "v1"
    worker2.apply([update("L0", vec[0], versions=("v2",), reembed=True)], target="v2")  # re-embedding under way
    assert worker2.missing("v2") == 2 and sorted(worker2.lacking("v2")) == ["L1", "L2"]
    assert not worker2.try_switch("v2")
    worker1.apply([update(f"L{i}", vec[i], versions=("v2",), reembed=True) for i in (1, 2)], target="v2")
    assert worker2.lacking("v2") == [] and worker2.try_switch("v2")
    worker1.refresh()
    assert worker1.active == "v2" and one.active == "v2"  # another worker's switch, seen at once
    assert worker1.older() == ["v1"]
    # A record still carrying the old version's vectors (in flight, or replayed) after the old
    # collection is dropped never brings it back; and no worker switches back to it unless forced.
    worker1.drop("v1")
    worker1.apply([update("L9", vec[0], versions=("v1", "v2"))], target="v2")
    assert sorted(one.versions()) == ["v2"] and "L9" in one.ids("v2")
    worker1.apply([update("L8", vec[1], versions=("v0",))], target="v2")  # v0: not in the log, below v2
    assert sorted(one.versions()) == ["v2"]
    one.upsert("v0", ["L0"], unit(vec[0])[None, :], views=np.zeros((1, 3, DIM), np.float32))
    assert not worker2.try_switch("v0")
    assert worker2.try_switch("v0", force=True) and one.active == "v0"
    one.close()
    two.close()


def test_a_collection_view_reads_like_a_live_index(backend: MilvusBackend) -> None:
    rng = np.random.default_rng(2)
    vec = rng.standard_normal((20, DIM))
    updates = [update(f"L{i:02d}", vec[i], supplier=f"s{i % 2}") for i in range(20)]
    indexes = CollectionIndexes(backend)
    indexes.choose_active("v1", {})
    indexes.apply(updates, target="v1")
    view, live = indexes.active_index, LiveIndex(DIM, n_views=3)
    ModelIndexes("flat", 3, indexes={"v1": live}).apply(updates)
    assert isinstance(view, VersionView) and len(view) == len(live) == 20 and "L03" in view and "nope" not in view
    queries = np.stack([u.vector for u in updates[:5]])
    exclude = [u.listing_id for u in updates[:5]]
    for got, want in zip(view.search(queries, 4, exclude=exclude), live.search(queries, 4, exclude=exclude)):
        assert [h.listing_id for h in got] == [h.listing_id for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-5)
    assert view.payload("L07") == live.payload("L07")
    assert view.payloads(["L01", "L02", "gone"]) == {i: live.payload(i) for i in ("L01", "L02")}
    np.testing.assert_allclose(view.views(["L05"]), live.views(["L05"]), atol=1e-6)
    assert sorted(view.ids()) == sorted(live.ids())
    with pytest.raises(IndexStoreError):
        view.views(["gone"])


def test_the_search_step_emits_the_same_on_a_collection_as_on_the_replica(backend: MilvusBackend) -> None:
    base = np.eye(DIM)[0]
    updates = [update("old", base, event_time=1), update("new", base + 0.05 * np.eye(DIM)[1], event_time=2),
               update("other", base, supplier="s2", event_time=3), update("far", np.eye(DIM)[2], event_time=4)]
    indexes = CollectionIndexes(backend)
    indexes.choose_active("v1", {})
    indexes.apply(updates, target="v1")
    live = LiveIndex(DIM, n_views=3)
    ModelIndexes("flat", 3, indexes={"v1": live}).apply(updates)
    settings = Settings(duplicate_threshold=0.95, top_k=3)

    def decoded(index: object) -> tuple[list, list]:
        similar, alerts = SearchStep(index, settings)(updates)  # type: ignore[arg-type]
        strip = lambda m: {k: v for k, v in m.items() if k != "emitted_at"}
        return ([strip(codec_for_topic(SIMILAR_PRODUCTS).decode(o.value)) for o in similar],
                [strip(codec_for_topic(DUPLICATE_ALERTS).decode(o.value)) for o in alerts])

    on_milvus, on_faiss = decoded(indexes.indexes["v1"]), decoded(live)
    assert [(a["listing_id"], a["duplicate_of"]) for a in on_milvus[1]] == [("new", "old")]
    for got, want in zip(on_milvus[0], on_faiss[0]):
        assert [n["listing_id"] for n in got["neighbours"]] == [n["listing_id"] for n in want["neighbours"]]
    assert [a["scores"]["text"] for a in on_milvus[1]] == pytest.approx([a["scores"]["text"] for a in on_faiss[1]])


# ---------------------------------------------------------------------------------- alerted pairs


def test_alerted_pairs_are_remembered_either_way_round_and_bounded() -> None:
    pairs = AlertedPairs(capacity=2)
    assert pairs.add("a", "b") and not pairs.add("b", "a") and ("b", "a") in pairs
    pairs.add("c", "d")
    pairs.add("e", "f")  # the oldest is forgotten
    assert ("a", "b") not in pairs and len(pairs) == 2


class FailingViews(LiveIndex):
    def views(self, ids):  # type: ignore[no-untyped-def]
        raise IndexStoreError("the index went away")


def test_a_failed_search_forgets_its_pairs_so_the_retried_batch_alerts_them() -> None:
    base = np.eye(DIM)[0]
    updates = [update("old", base, event_time=1), update("new", base, event_time=2)]
    failing, index = FailingViews(DIM, n_views=3), LiveIndex(DIM, n_views=3)
    for i in (failing, index):
        ModelIndexes("flat", 3, indexes={"v1": i}).apply(updates)
    remembered = AlertedPairs()
    step = SearchStep(failing, Settings(duplicate_threshold=0.9), alerted=remembered)
    with pytest.raises(IndexStoreError):
        step(updates)
    assert len(remembered) == 0
    assert len(SearchStep(index, Settings(duplicate_threshold=0.9), alerted=remembered)(updates)[1]) == 1
    # Seen in duplicate-alerts (another worker, or before a crash): not alerted again here.
    assert SearchStep(index, Settings(duplicate_threshold=0.9), alerted=remembered)(updates)[1] == []


def test_the_faiss_backend_reads_many_payloads_and_every_id() -> None:
    b = FaissBackend(n_views=0)
    b.upsert("v1", ["a", "b"], np.eye(2, dtype=np.float32), payloads=[{"x": 1}, {"x": 2}])
    assert b.payloads(["b", "zz"], "v1") == {"b": {"x": 2}} and sorted(b.ids("v1")) == ["a", "b"]
    assert b.ids("v9") == []


def test_milvus_lite_gets_its_segments_sealed_a_milvus_server_seals_its_own(backend: MilvusBackend) -> None:
    # Milvus Lite scans unsealed rows slowly (docs/SCALING.md); a server rate-limits flush calls.
    assert backend.flush_rows == 5000
    explicit = MilvusBackend(backend.uri, flush_rows=0)
    assert explicit.flush_rows == 0
    explicit.close()


def test_stopping_waits_for_a_check_in_flight_before_closing_the_backend() -> None:
    """A fresh-clone run met it: on_stop closed (and dropped) the backend while the watch task's
    check was still using it, and the worker exited 1 on its way down."""
    import asyncio

    from samestyle.streams.worker.replica import SharedIndex

    events: list[str] = []

    class Backend:
        def close(self) -> None:
            events.append("closed")

    async def run() -> None:
        shared = SharedIndex(Settings(), make_backend=Backend, target_version=lambda: None, version_order=dict)
        shared.backend = Backend()  # type: ignore[assignment]
        started, release = asyncio.Event(), asyncio.Event()

        async def check_in_flight() -> None:
            started.set()
            await release.wait()
            events.append("checked with a backend" if shared.backend is not None else "checked without one")

        shared._check_backend = check_in_flight  # type: ignore[method-assign]
        check = asyncio.ensure_future(shared._check())
        await asyncio.wait_for(started.wait(), 5)  # the check runs under the stop's lock
        stop = asyncio.ensure_future(shared.on_stop())
        await asyncio.sleep(0.05)
        assert events == [] and not stop.done()  # the stop waits for the check
        release.set()
        await asyncio.wait_for(asyncio.gather(check, stop), 5)
        await shared._check()  # after the stop: nothing runs against the closed backend
        assert shared.backend is None

    asyncio.run(run())
    assert events == ["checked with a backend", "closed"]
