"""The index backend contract on both implementations, and what only Milvus has to show: its
alias switch seen by another client, and data surviving a killed and restarted Milvus Lite server.

Every Milvus test runs real Milvus Lite (``pymilvus`` + ``milvus-lite``) on a file of its own; the
restart test runs the ``milvus-lite server`` process and kills it with SIGKILL.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from samestyle.index_store.backend import FaissBackend, IndexBackend
from samestyle.index_store.factory import create_backend
from samestyle.topics.errors import IndexStoreError

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from samestyle.index_store.milvus import (
    MilvusBackend,
    collection_name,
    free_port,
    milvus_lite_server,
    version_of,
)

DIM = 16
N_VIEWS = 3
TOL = 1e-5


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def catalogue(rng: np.random.Generator, n: int, suppliers: int = 4) -> tuple[list[str], np.ndarray, list[dict], np.ndarray]:
    ids = [f"L{i:05d}" for i in range(n)]
    views = np.stack([unit(rng, n), unit(rng, n), unit(rng, n)], axis=1)  # [n, 3, dim]
    payloads = [{"supplier_id": f"S{i % suppliers}", "title": f"listing {i}", "event_time": i} for i in range(n)]
    return ids, views[:, -1].copy(), payloads, views


@pytest.fixture(params=["faiss", "milvus"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[IndexBackend]:
    if request.param == "faiss":
        b: IndexBackend = FaissBackend("flat", n_views=N_VIEWS)
    else:
        b = MilvusBackend(str(tmp_path / "index.db"), n_views=N_VIEWS)
    yield b
    b.close()


def exact(ids: list[str], matrix: np.ndarray, query: np.ndarray, k: int, keep=None) -> list[tuple[str, float]]:
    scores = matrix @ query
    order = np.argsort(-scores, kind="stable")
    out = [(ids[i], float(scores[i])) for i in order if keep is None or keep(ids[i])]
    return out[:k]


def assert_same_ranking(hits, expected) -> None:
    """Same ids in the same order, scores equal; ties (equal scores) may swap places."""
    assert len(hits) == len(expected)
    for hit, (want_id, want_score) in zip(hits, expected):
        assert hit.score == pytest.approx(want_score, abs=TOL)
    by_score = lambda pairs: sorted((round(s, 4), i) for i, s in pairs)
    assert by_score([(h.listing_id, h.score) for h in hits]) == by_score(expected)


def test_is_an_index_backend(backend: IndexBackend) -> None:
    assert isinstance(backend, IndexBackend)
    assert not backend.ready() and backend.active is None and backend.versions() == []


def test_search_order_is_exact_search_with_exclude_and_supplier_filter(backend: IndexBackend) -> None:
    rng = np.random.default_rng(1)
    ids, vectors, payloads, views = catalogue(rng, 600)
    backend.upsert("v1", ids, vectors, payloads=payloads, views=views)
    backend.switch("v1")
    assert backend.ready() and backend.count("v1") == 600
    queries = unit(rng, 12)
    queries[:4] = vectors[:4]  # listings searching for their neighbours, themselves excluded
    exclude = [ids[0], ids[1], ids[2], ids[3]] + [None] * 8
    suppliers = [None, "S1", None, "S2", "S3", None, "S0", None, "S1", None, None, "S2"]
    got = backend.search(queries, 10, exclude=exclude, suppliers=suppliers)
    supplier_of = {i: p["supplier_id"] for i, p in zip(ids, payloads)}
    for q in range(12):
        keep = lambda i, q=q: i != exclude[q] and (suppliers[q] is None or supplier_of[i] == suppliers[q])
        assert_same_ranking(got[q], exact(ids, vectors, queries[q], 10, keep))
    assert all(h.listing_id != ids[0] for h in got[0])


def test_upsert_is_idempotent_and_replaces(backend: IndexBackend) -> None:
    rng = np.random.default_rng(2)
    ids, vectors, payloads, views = catalogue(rng, 200)
    for _ in range(3):  # a replayed batch: the same state as applying it once
        backend.upsert("v1", ids, vectors, payloads=payloads, views=views)
    backend.switch("v1")
    assert backend.count("v1") == 200
    moved = unit(rng, 1)
    backend.upsert("v1", [ids[7]], moved, payloads=[{"supplier_id": "S9", "title": "new"}],
                   views=np.stack([moved, moved, moved], axis=1))
    assert backend.count("v1") == 200
    vector, payload, got_views = backend.get(ids[7])
    np.testing.assert_allclose(vector, moved[0], atol=TOL)
    assert payload == {"supplier_id": "S9", "title": "new"}
    assert got_views.shape == (N_VIEWS, DIM)
    hit = backend.search(moved, 1)[0][0]
    assert hit.listing_id == ids[7] and hit.score == pytest.approx(1.0, abs=TOL)
    assert backend.search(moved, 3, suppliers=["S9"])[0] == [hit]
    np.testing.assert_allclose(backend.views([ids[3], ids[0]]), views[[3, 0]], atol=TOL)
    assert backend.payload(ids[3]) == payloads[3]
    with pytest.raises(IndexStoreError):
        backend.upsert("v1", ["a", "a"], unit(rng, 2), views=np.zeros((2, N_VIEWS, DIM), np.float32))
    with pytest.raises(IndexStoreError):
        backend.upsert("v1", ["a"], unit(rng, 1, DIM + 1), views=np.zeros((1, N_VIEWS, DIM + 1), np.float32))
    with pytest.raises(IndexStoreError):
        backend.views(["nobody"])


def test_delete_by_id_in_one_or_every_version(backend: IndexBackend) -> None:
    rng = np.random.default_rng(3)
    ids, vectors, payloads, views = catalogue(rng, 100)
    backend.upsert("v1", ids, vectors, payloads=payloads, views=views)
    backend.upsert("v2", ids[:50], vectors[:50], payloads=payloads[:50], views=views[:50])
    backend.switch("v1")
    assert backend.delete([ids[0], ids[0], "never-there"], version="v2") == 1
    assert backend.count("v2") == 49 and backend.count("v1") == 100
    assert backend.delete([ids[0], ids[1], ids[60]]) == 3  # every version
    assert backend.count("v1") == 97 and backend.count("v2") == 48
    assert backend.get(ids[1]) is None and backend.get(ids[1], version="v2") is None
    found = {h.listing_id for h in backend.search(vectors[:3], 5)[0]}
    assert ids[0] not in found and ids[1] not in found
    assert backend.delete([ids[0]]) == 0


def test_one_collection_per_version_and_switch(backend: IndexBackend) -> None:
    rng = np.random.default_rng(4)
    ids, vectors, payloads, views = catalogue(rng, 80)
    backend.upsert("blue", ids, vectors, payloads=payloads, views=views)
    green = unit(rng, 80, 8)  # another model: another dimension, another collection
    backend.upsert("green", ids[:40], green[:40], payloads=payloads[:40],
                   views=np.stack([green[:40]] * 3, axis=1))
    backend.switch("blue")
    assert sorted(backend.versions()) == ["blue", "green"]
    assert backend.search(vectors[:1], 1)[0][0].listing_id == ids[0]
    assert backend.search(green[:1], 1, version="green")[0][0].listing_id == ids[0]
    with pytest.raises(IndexStoreError):
        backend.upsert("green", ["x"], unit(rng, 1), views=np.zeros((1, N_VIEWS, DIM), np.float32))
    with pytest.raises(IndexStoreError):
        backend.switch("purple")
    backend.upsert("green", ids[40:], green[40:], payloads=payloads[40:], views=np.stack([green[40:]] * 3, axis=1))
    backend.switch("green")
    assert backend.active == "green" and backend.ready()
    assert backend.search(green[5:6], 1)[0][0].listing_id == ids[5]
    with pytest.raises(IndexStoreError):
        backend.drop("green")
    backend.drop("blue")
    assert backend.versions() == ["green"] and backend.count("blue") == 0


def test_collection_names_are_reversible() -> None:
    for version in ("pretrained-concat-v1", "unified/abt buy é", "x"):
        name = collection_name("samestyle", version)
        assert name.replace("_", "").isalnum() and version_of("samestyle", name) == version
    assert version_of("samestyle", "other_collection") is None
    with pytest.raises(IndexStoreError):
        collection_name("samestyle", "v" * 101)


def test_create_backend_by_name(tmp_path: Path) -> None:
    assert isinstance(create_backend("faiss", n_views=3), FaissBackend)
    milvus = create_backend("milvus", n_views=3, milvus_uri=str(tmp_path / "x.db"))
    assert isinstance(milvus, MilvusBackend)
    milvus.close()
    with pytest.raises(IndexStoreError):
        create_backend("milvus")
    with pytest.raises(IndexStoreError):
        create_backend("elastic")


# ------------------------------------------------------------------------------- Milvus only


def test_strong_consistency_upsert_then_search_sees_it(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    backend = MilvusBackend(str(tmp_path / "fresh.db"))
    ids, vectors, payloads, _ = catalogue(rng, 50)
    backend.upsert("v1", ids, vectors, payloads=payloads)
    backend.switch("v1")
    for i in range(20):  # every new listing is found by the very next search
        v = unit(rng, 1)
        backend.upsert("v1", [f"new{i}"], v, payloads=[{"supplier_id": "S0"}])
        assert backend.search(v, 1, suppliers=["S0"])[0][0].listing_id == f"new{i}"
    backend.close()


def test_supplier_filter_quotes_the_literal(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    backend = MilvusBackend(str(tmp_path / "quote.db"))
    odd = 'a "quoted" \\ supplier\' or 1 == 1'
    v = unit(rng, 3)
    backend.upsert("v1", ["x", "y", "z"], v, payloads=[{"supplier_id": odd}, {"supplier_id": "plain"}, {}])
    backend.switch("v1")
    assert [h.listing_id for h in backend.search(v[1:2], 3, suppliers=[odd])[0]] == ["x"]
    assert [h.listing_id for h in backend.search(v[2:3], 3, suppliers=[""])[0]] == ["z"]
    backend.close()


def test_alias_switch_is_seen_by_another_client_and_survives_reopen(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    uri = str(tmp_path / "alias.db")
    writer = MilvusBackend(uri, n_views=N_VIEWS)
    ids, vectors, payloads, views = catalogue(rng, 30)
    writer.upsert("v1", ids, vectors, payloads=payloads, views=views)
    writer.upsert("v2", ids, vectors[::-1].copy(), payloads=payloads, views=views[::-1].copy())
    writer.switch("v1")
    reader = MilvusBackend(uri, n_views=N_VIEWS)
    assert reader.active == "v1" and reader.search(vectors[:1], 1)[0][0].listing_id == ids[0]
    writer.switch("v2")
    assert reader.active == "v2" and reader.search(vectors[:1], 1)[0][0].listing_id == ids[-1]
    writer.close()
    reader.close()


def test_killed_milvus_lite_server_restarts_with_every_acknowledged_upsert(tmp_path: Path) -> None:
    rng = np.random.default_rng(8)
    data_dir, port = tmp_path / "server.db", free_port()
    ids, vectors, payloads, views = catalogue(rng, 300)
    with milvus_lite_server(data_dir, port) as (uri, server):
        backend = MilvusBackend(uri, n_views=N_VIEWS)
        backend.upsert("v1", ids[:200], vectors[:200], payloads=payloads[:200], views=views[:200])
        backend.switch("v1")
        backend.upsert("v1", ids[200:], vectors[200:], payloads=payloads[200:], views=views[200:])
        backend.delete(ids[:10])
        before = backend.search(vectors[50:55], 10)
        backend.close()
        server.kill()  # SIGKILL: no flush, no clean shutdown
        assert server.wait() == -9
    with milvus_lite_server(data_dir, port) as (uri, server):
        backend = MilvusBackend(uri, n_views=N_VIEWS)
        assert backend.ready() and backend.active == "v1"
        assert backend.count("v1") == 290 and backend.get(ids[3]) is None
        assert backend.search(vectors[50:55], 10) == before
        np.testing.assert_allclose(backend.views([ids[299]]), views[299:300], atol=TOL)
        backend.upsert("v1", ids[:10], vectors[:10], payloads=payloads[:10], views=views[:10])
        assert backend.count("v1") == 300
        backend.close()
