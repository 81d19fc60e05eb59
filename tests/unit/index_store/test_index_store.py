"""LiveIndex against numpy brute force on seeded synthetic vectors (ties may reorder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import samestyle.index_store.snapshot as snapshot_module
from samestyle.index_store import Hit, LiveIndex
from samestyle.topics.errors import IndexStoreError

TOL = 1e-4


def rand(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def clustered(rng: np.random.Generator, n: int, centres: np.ndarray) -> np.ndarray:
    """L2-normalised points around the given centres, like real embeddings."""
    x = centres[rng.integers(0, len(centres), n)] + 1.5 * rand(rng, n, centres.shape[1])
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def ids_of(n: int, prefix: str = "L") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def check_against_brute(
    hits: list[list[Hit]],
    ref: dict[str, np.ndarray],
    queries: np.ndarray,
    k: int,
    exclude: list[str | None] | None = None,
) -> None:
    """Exact top-k: same score list; same id set where the k-th score is not tied."""
    ref_ids = list(ref)
    matrix = (
        np.stack([ref[i] for i in ref_ids]) if ref_ids else np.empty((0, queries.shape[1]), np.float32)
    )
    all_scores = queries.astype(np.float64) @ matrix.astype(np.float64).T  # [nq, n]
    for q, got in enumerate(hits):
        allowed = [j for j, i in enumerate(ref_ids) if exclude is None or i != exclude[q]]
        scores = all_scores[q, allowed]
        order = np.argsort(-scores, kind="stable")
        expect = scores[order[:k]]
        got_ids = [h.listing_id for h in got]
        assert len(got_ids) == len(set(got_ids)) == min(k, len(allowed))
        np.testing.assert_allclose([h.score for h in got], expect, atol=TOL, rtol=TOL)
        for h in got:  # every reported score is that id's true score
            assert h.listing_id in ref and (exclude is None or h.listing_id != exclude[q])
            assert h.score == pytest.approx(float(queries[q] @ ref[h.listing_id]), abs=TOL, rel=TOL)
        if len(order) > k and scores[order[k - 1]] - scores[order[k]] > 10 * TOL:
            assert set(got_ids) == {ref_ids[allowed[j]] for j in order[:k]}


@pytest.fixture(params=["flat", "hnsw"])
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


# ----------------------------------------------------------------------- exact search


def test_flat_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rand(rng, 3000, 32)
    index = LiveIndex(32)
    index.upsert(ids_of(3000), x)
    queries = rand(rng, 40, 32)
    check_against_brute(index.search(queries, 10), dict(zip(ids_of(3000), x)), queries, 10)


@pytest.mark.parametrize("nq", [1, 2, 4, 5, 9])
@pytest.mark.parametrize("k", [1, 7, 600])
def test_flat_small_and_large_query_batches_match_brute_force(nq: int, k: int) -> None:
    rng = np.random.default_rng(nq * 1000 + k)
    x = rand(rng, 500, 16)
    index = LiveIndex(16)
    index.upsert(ids_of(500), x)
    queries = rand(rng, nq, 16)
    exclude = [f"L{i}" for i in range(nq)]
    check_against_brute(index.search(queries, k, exclude=exclude), dict(zip(ids_of(500), x)), queries, k, exclude)


def test_flat_ties_may_reorder_but_scores_match() -> None:
    rng = np.random.default_rng(1)
    base = rand(rng, 5, 8)
    x = np.repeat(base, 4, axis=0)  # every vector four times: scores tie in groups of four
    ids = ids_of(20)
    index = LiveIndex(8)
    index.upsert(ids, x)
    check_against_brute(index.search(base, 6), dict(zip(ids, x)), base, 6)


def test_upsert_replaces_old_vector_and_payload(kind: str) -> None:
    index = LiveIndex(4, kind)
    index.upsert(["a", "b"], np.eye(4, dtype=np.float32)[:2], payloads=[{"supplier_id": "s1"}, {}])
    index.upsert(["a"], np.array([[0, 0, 1, 0]], np.float32))
    assert len(index) == 2 and index.tombstones in (0, 1)
    vector, payload, views = index.get("a")
    np.testing.assert_array_equal(vector, [0, 0, 1, 0])
    assert payload == {} and views is None
    hits = index.search(np.array([[1, 0, 0, 0]], np.float32), 2)[0]
    assert [h.score for h in hits] == [0.0, 0.0]  # the old [1, 0, 0, 0] is gone
    assert index.search(np.array([[0, 0, 1, 0]], np.float32), 1)[0] == [Hit("a", 1.0)]


def test_delete_removes_and_ignores_unknown(kind: str) -> None:
    rng = np.random.default_rng(2)
    x = rand(rng, 50, 8)
    index = LiveIndex(8, kind)
    index.upsert(ids_of(50), x)
    assert index.delete(["L3", "L3", "nope", "L49"]) == 2
    assert index.delete(["nope"]) == 0 and index.delete([]) == 0
    assert len(index) == 48 and "L3" not in index and "L49" not in index and "L4" in index
    assert index.get("L3") is None and index.payload("L3") is None
    assert sorted(index.ids()) == sorted(set(ids_of(50)) - {"L3", "L49"})
    found = {h.listing_id for row in index.search(x, 48) for h in row}
    assert not found & {"L3", "L49"}


def test_exclude_and_k_larger_than_index(kind: str) -> None:
    rng = np.random.default_rng(3)
    x = rand(rng, 6, 8)
    ids = ids_of(6)
    index = LiveIndex(8, kind)
    index.upsert(ids, x)
    exclude = ["L0", None, "unknown"]
    hits = index.search(x[:3], 100, exclude=exclude)
    check_against_brute(hits, dict(zip(ids, x)), x[:3], 100, exclude)
    assert [len(h) for h in hits] == [5, 6, 6]
    assert index.search(x[:1], 1, exclude=["L0"])[0][0].listing_id != "L0"


def test_empty_index_and_empty_query_batch(kind: str) -> None:
    index = LiveIndex(4, kind)
    assert index.search(np.ones((2, 4), np.float32), 3) == [[], []]
    assert index.search(np.empty((0, 4), np.float32), 3) == []
    index.upsert([], np.empty((0, 4), np.float32))
    assert len(index) == 0 and index.ids() == []


def test_float64_and_non_contiguous_inputs_are_converted() -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((10, 16))  # float64
    index = LiveIndex(8)
    index.upsert(ids_of(10), x[:, ::2])  # strided view
    np.testing.assert_allclose(index.get("L1")[0], x[1, ::2].astype(np.float32))
    queries = np.asfortranarray(x[:3, ::2])
    check_against_brute(
        index.search(queries, 4),
        dict(zip(ids_of(10), x[:, ::2].astype(np.float32))),
        queries.astype(np.float32),
        4,
    )


def test_views_and_payloads_are_kept_per_id() -> None:
    rng = np.random.default_rng(5)
    x, v = rand(rng, 5, 8), rand(rng, 5, 3, 8)
    index = LiveIndex(8, n_views=3)
    index.upsert(
        ids_of(5), x, payloads=[{"supplier_id": f"s{i}", "tags": [i]} for i in range(5)], views=v
    )
    np.testing.assert_array_equal(index.views(["L4", "L0"]), v[[4, 0]])
    index.delete(["L0"])  # L4 moves into slot 0: its views move with it
    np.testing.assert_array_equal(index.views(["L4"]), v[[4]])
    assert index.payload("L4") == {"supplier_id": "s4", "tags": [4]}
    index.payload("L4")["tags"].append(99)  # a copy: the index is not changed through it
    assert index.get("L4")[1] == {"supplier_id": "s4", "tags": [4]}
    np.testing.assert_array_equal(index.get("L4")[2], v[4])
    with pytest.raises(IndexStoreError, match="unknown"):
        index.views(["L0"])
    assert LiveIndex(8).views([]).shape == (0, 0, 8)


BAD_UPSERTS = {
    "nan": lambda: (["a"], np.array([[np.nan, 0, 0, 0]], np.float32), {}),
    "inf": lambda: (["a"], np.array([[np.inf, 0, 0, 0]], np.float32), {}),
    "wrong dim": lambda: (["a"], np.zeros((1, 5), np.float32), {}),
    "1-d": lambda: (["a"], np.zeros(4, np.float32), {}),
    "int dtype": lambda: (["a"], np.zeros((1, 4), np.int64), {}),
    "list not array": lambda: (["a"], [[0.0] * 4], {}),
    "row count": lambda: (["a", "b"], np.zeros((1, 4), np.float32), {}),
    "duplicate ids": lambda: (["a", "a"], np.zeros((2, 4), np.float32), {}),
    "empty id": lambda: ([""], np.zeros((1, 4), np.float32), {}),
    "int id": lambda: ([7], np.zeros((1, 4), np.float32), {}),
    "ids as str": lambda: ("a", np.zeros((1, 4), np.float32), {}),
    "payload count": lambda: (["a"], np.zeros((1, 4), np.float32), {"payloads": [{}, {}]}),
    "payload not json": lambda: (["a"], np.zeros((1, 4), np.float32), {"payloads": [{"x": object()}]}),
    "payload nan": lambda: (["a"], np.zeros((1, 4), np.float32), {"payloads": [{"x": float("nan")}]}),
    "payload int key": lambda: (["a"], np.zeros((1, 4), np.float32), {"payloads": [{1: "x"}]}),
    "views without n_views": lambda: (
        ["a"],
        np.zeros((1, 4), np.float32),
        {"views": np.zeros((1, 0, 4))},
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_UPSERTS))
def test_upsert_boundary_errors(case: str) -> None:
    index = LiveIndex(4)
    ids, vectors, kwargs = BAD_UPSERTS[case]()
    with pytest.raises(IndexStoreError):
        index.upsert(ids, vectors, **kwargs)
    assert len(index) == 0


def test_views_boundary_errors() -> None:
    index = LiveIndex(4, n_views=2)
    x = np.zeros((1, 4), np.float32)
    with pytest.raises(IndexStoreError, match="views are required"):
        index.upsert(["a"], x)
    with pytest.raises(IndexStoreError, match="shape"):
        index.upsert(["a"], x, views=np.zeros((1, 3, 4), np.float32))
    with pytest.raises(IndexStoreError, match="NaN"):
        index.upsert(["a"], x, views=np.full((1, 2, 4), np.nan, np.float32))
    assert len(index) == 0


def test_search_and_constructor_boundary_errors() -> None:
    index = LiveIndex(4)
    index.upsert(["a"], np.ones((1, 4), np.float32))
    q = np.ones((1, 4), np.float32)
    for bad in (
        lambda: index.search(q, 0),
        lambda: index.search(q, 2.0),
        lambda: index.search(np.ones((1, 3), np.float32), 1),
        lambda: index.search(np.ones(4, np.float32), 1),
        lambda: index.search(q, 1, exclude=["a", "b"]),
        lambda: index.search(q, 1, exclude=[3]),
        lambda: index.delete("a"),
        lambda: LiveIndex(4, "ivf"),
        lambda: LiveIndex(0),
        lambda: LiveIndex(4, n_views=-1),
        lambda: LiveIndex(4, "hnsw", rebuild_fraction=1.5),
    ):
        with pytest.raises(IndexStoreError):
            bad()


# ------------------------------------------------- random interleavings vs a reference

POOL = [f"p{i}" for i in range(12)]
OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("upsert"),
            st.lists(st.sampled_from(POOL), min_size=1, max_size=6, unique=True),
            st.integers(0, 2**16),
        ),
        st.tuples(
            st.just("delete"), st.lists(st.sampled_from([*POOL, "ghost"]), max_size=5), st.integers(0, 0)
        ),
        st.tuples(st.just("search"), st.lists(st.none(), min_size=1, max_size=1), st.integers(0, 2**16)),
    ),
    max_size=30,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, kind=st.sampled_from(["flat", "hnsw"]))
def test_random_interleavings_match_reference_model(ops: list, kind: str) -> None:
    dim = 6
    # A small rebuild fraction makes the hnsw graph rebuild often in these short runs.
    index = (
        LiveIndex(dim, kind, hnsw_m=8, ef_search=64, rebuild_fraction=0.3)
        if kind == "hnsw"
        else LiveIndex(dim)
    )
    ref: dict[str, np.ndarray] = {}
    payloads: dict[str, dict] = {}
    for op, ids, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "upsert":
            x = rand(rng, len(ids), dim)
            index.upsert(ids, x, payloads=[{"seed": seed, "id": i} for i in ids])
            for i, row in zip(ids, x):
                ref[i] = row
                payloads[i] = {"seed": seed, "id": i}
        elif op == "delete":
            present = {i for i in ids if i in ref}
            assert index.delete(ids) == len(present)
            for i in present:
                del ref[i], payloads[i]
        else:
            queries = rand(rng, 3, dim)
            exclude = [None, next(iter(ref), None), "ghost"]
            check_against_brute(index.search(queries, 4, exclude=exclude), ref, queries, 4, exclude)
        assert len(index) == len(ref) and sorted(index.ids()) == sorted(ref)
        assert index.tombstones <= 0.3 * (len(ref) + index.tombstones)
    for i, row in ref.items():
        vector, payload, _ = index.get(i)
        np.testing.assert_array_equal(vector, row)
        assert payload == payloads[i]


# ------------------------------------------------------------------------- snapshots


def test_snapshot_round_trip(kind: str, tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x, v = rand(rng, 300, 16), rand(rng, 300, 2, 16)
    index = LiveIndex(16, kind, n_views=2, hnsw_m=16, ef_search=50)
    index.upsert(ids_of(300), x, payloads=[{"supplier_id": f"s{i % 7}"} for i in range(300)], views=v)
    index.delete(ids_of(40))  # hnsw: leaves tombstones in the saved graph
    index.upsert(["L50"], x[:1], views=v[:1])
    first = index.snapshot(tmp_path, {0: 120, 3: 7})
    loaded, offsets = LiveIndex.load(tmp_path)
    assert offsets == {0: 120, 3: 7}
    assert (loaded.kind, loaded.dim, loaded.n_views, loaded.ef_search) == (kind, 16, 2, 50)
    assert sorted(loaded.ids()) == sorted(index.ids()) and loaded.tombstones == index.tombstones
    queries = rand(rng, 20, 16)
    assert loaded.search(queries, 10, exclude=["L50"] * 20) == index.search(
        queries, 10, exclude=["L50"] * 20
    )
    for i in ("L50", "L299"):
        a, b = index.get(i), loaded.get(i)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[2], b[2])
        assert a[1] == b[1]
    # The loaded index keeps working and a second snapshot replaces the first.
    loaded.upsert(["new"], x[:1], views=v[:1])
    second = loaded.snapshot(tmp_path, {0: 121})
    assert second != first and not first.exists()
    again, offsets = LiveIndex.load(tmp_path)
    assert offsets == {0: 121} and "new" in again and len(again) == 261


def test_load_or_create(tmp_path: Path) -> None:
    index, offsets = LiveIndex.load_or_create(tmp_path / "absent", 8, "flat", 0)
    assert len(index) == 0 and offsets == {} and index.dim == 8
    index.upsert(["a"], np.ones((1, 8), np.float32))
    index.snapshot(tmp_path / "absent", {1: 2})
    again, offsets = LiveIndex.load_or_create(tmp_path / "absent", 8, "flat", 0)
    assert "a" in again and offsets == {1: 2}
    with pytest.raises(IndexStoreError, match="dim"):
        LiveIndex.load_or_create(tmp_path / "absent", 16, "flat", 0)
    with pytest.raises(IndexStoreError, match="kind"):
        LiveIndex.load_or_create(tmp_path / "absent", 8, "hnsw", 0)
    with pytest.raises(IndexStoreError, match="no index snapshot"):
        LiveIndex.load(tmp_path / "empty")


def _snap_dir(root: Path) -> Path:
    return root / (root / "CURRENT").read_text().strip()


def _truncate(root: Path) -> None:
    path = _snap_dir(root) / "vectors.npy"
    path.write_bytes(path.read_bytes()[:-10])


def _flip_byte(root: Path) -> None:
    path = _snap_dir(root) / "views-0.npy"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_meta(change: dict) -> Callable[[Path], None]:
    def edit(root: Path) -> None:
        path = _snap_dir(root) / "meta.json"
        meta = json.loads(path.read_text())
        meta.update(change)
        path.write_text(json.dumps(meta))

    return edit


CORRUPTIONS = {
    "truncated vectors": _truncate,
    "flipped byte": _flip_byte,
    "garbage meta": lambda root: (_snap_dir(root) / "meta.json").write_text("{not json"),
    "missing meta": lambda root: (_snap_dir(root) / "meta.json").unlink(),
    "future version": _edit_meta({"version": 99}),
    "ids count": _edit_meta({"ids": ["x"]}),
    "dim changed": _edit_meta({"dim": 3}),
    "bad params": _edit_meta({"params": {"hnsw_m": "many"}}),
    "dangling CURRENT": lambda root: (root / "CURRENT").write_text("snapshot-0000000999\n"),
    "CURRENT outside": lambda root: (root / "CURRENT").write_text("../elsewhere\n"),
    "missing graph": lambda root: (_snap_dir(root) / "hnsw.faiss").unlink(),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_snapshot_raises(case: str, tmp_path: Path) -> None:
    index = LiveIndex(4, "hnsw", n_views=1, hnsw_m=4)
    index.upsert(
        ids_of(10), np.arange(40, dtype=np.float32).reshape(10, 4), views=np.ones((10, 1, 4), np.float32)
    )
    index.snapshot(tmp_path, {0: 10})
    CORRUPTIONS[case](tmp_path)
    with pytest.raises(IndexStoreError, match="snapshot"):
        LiveIndex.load(tmp_path)
    with pytest.raises(IndexStoreError):
        LiveIndex.load_or_create(tmp_path, 4, "hnsw", 1)


def test_crash_mid_snapshot_keeps_previous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    index = LiveIndex(4)
    index.upsert(["a"], np.ones((1, 4), np.float32))
    index.snapshot(tmp_path, {0: 1})
    index.upsert(["b"], np.ones((1, 4), np.float32))

    def crash(*args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(snapshot_module.os, "rename", crash)
    with pytest.raises(IndexStoreError, match="disk full"):
        index.snapshot(tmp_path, {0: 2})
    monkeypatch.undo()
    (tmp_path / ".tmp-snapshot-snapshot-0000000009-dead").mkdir()  # debris of a killed writer
    loaded, offsets = LiveIndex.load(tmp_path)
    assert loaded.ids() == ["a"] and offsets == {0: 1}
    index.snapshot(tmp_path, {0: 2})
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    assert sorted(LiveIndex.load(tmp_path)[0].ids()) == ["a", "b"]


def test_snapshot_rejects_bad_offsets(tmp_path: Path) -> None:
    with pytest.raises(IndexStoreError, match="offsets"):
        LiveIndex(4).snapshot(tmp_path, {0: -1})
    assert not os.path.exists(tmp_path / "CURRENT")


# ------------------------------------------------------------------------------ hnsw


@pytest.fixture(scope="module")
def catalogue() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    centres = rand(rng, 500, 64)
    return centres, clustered(rng, 5000, centres), clustered(rng, 200, centres)


def _recall(approx: list[list[Hit]], exact: list[list[Hit]]) -> float:
    found = sum(
        len({h.listing_id for h in a} & {h.listing_id for h in e}) for a, e in zip(approx, exact)
    )
    return found / sum(len(e) for e in exact)


def test_hnsw_recall_deletes_and_rebuild(catalogue: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    centres, x, queries = catalogue
    ids = ids_of(len(x))
    hnsw, flat = LiveIndex(64, "hnsw"), LiveIndex(64)
    for index in (hnsw, flat):
        index.upsert(ids, x)
    assert _recall(hnsw.search(queries, 10), flat.search(queries, 10)) >= 0.95

    # Delete 20 %: below the rebuild threshold, so tombstones stay and must be filtered.
    gone = set(ids[::5])
    for index in (hnsw, flat):
        assert index.delete(sorted(gone)) == len(gone)
    assert hnsw.tombstones == len(gone)
    approx = hnsw.search(np.concatenate([queries, x[::5][:100]]), 10)  # queries at deleted points
    assert not {h.listing_id for row in approx for h in row} & gone
    assert all(len(row) == 10 for row in approx)
    assert _recall(hnsw.search(queries, 10), flat.search(queries, 10)) >= 0.95

    # Replace another 10 %: tombstones pass 25 % and the graph is rebuilt from live vectors.
    moved = ids[1::10]
    new = clustered(np.random.default_rng(8), len(moved), centres)
    for index in (hnsw, flat):
        index.upsert(moved, new)
    assert hnsw.tombstones == 0 and len(hnsw) == len(flat) == 4000
    np.testing.assert_array_equal(hnsw.get(moved[0])[0], new[0])
    assert _recall(hnsw.search(queries, 10), flat.search(queries, 10)) >= 0.95
    assert hnsw.search(new[:1], 1, exclude=[None])[0][0] == Hit(moved[0], pytest.approx(1.0, abs=1e-5))

    # Delete almost everything, then keep using it.
    rest = hnsw.ids()
    assert hnsw.delete(rest[5:]) == len(rest) - 5
    assert hnsw.tombstones <= 0.25 * (5 + hnsw.tombstones)
    assert sorted(h.listing_id for h in hnsw.search(queries[:1], 10)[0]) == sorted(rest[:5])
    hnsw.upsert(["z"], queries[:1])
    assert hnsw.search(queries[:1], 1)[0][0].listing_id == "z"


# ----------------------------------------------------------------------- concurrency


def test_concurrent_upsert_delete_search(kind: str) -> None:
    dim, writers, rounds = 16, 3, 60
    index = LiveIndex(dim, kind, hnsw_m=8, ef_construction=40)
    errors: list[BaseException] = []
    final: dict[str, np.ndarray] = {}
    final_lock = threading.Lock()

    def writer(w: int) -> None:
        rng = np.random.default_rng(100 + w)
        mine: dict[str, np.ndarray] = {}
        try:
            for r in range(rounds):
                ids = [f"w{w}-{i}" for i in rng.choice(40, 8, replace=False)]
                x = rand(rng, 8, dim)
                index.upsert(ids, x, payloads=[{"w": w, "r": r}] * 8)
                mine.update(zip(ids, x))
                gone = [f"w{w}-{i}" for i in rng.choice(40, 3, replace=False)]
                index.delete(gone)
                for g in gone:
                    mine.pop(g, None)
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        with final_lock:
            final.update(mine)

    def reader() -> None:
        rng = np.random.default_rng(99)
        try:
            for _ in range(rounds * 2):
                for row in index.search(rand(rng, 4, dim), 5):
                    assert len({h.listing_id for h in row}) == len(row) <= 5
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    threads += [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(index.ids()) == sorted(final)
    for i, row in final.items():
        np.testing.assert_array_equal(index.get(i)[0], row)
    if kind == "flat":
        queries = rand(np.random.default_rng(5), 10, dim)
        check_against_brute(index.search(queries, 7), final, queries, 7)


def test_imports_without_broker_or_torch() -> None:
    code = (
        "import sys, samestyle.index_store; "
        "print([m for m in ('faust', 'aiokafka', 'kafka', 'torch') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
