"""Compact vector forms (float16, SQ8) and sparse views of the live index: against float32 and
brute force over the decoded vectors, through deletes, replacements and snapshots."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from samestyle.index_store import LiveIndex
from samestyle.index_store.exact import Scratch, top_k_inner_product
from samestyle.index_store.live import ABSENT, SEARCHED
from samestyle.index_store.rows import SQ8_ROTATION_SEED, VectorRows
from samestyle.index_store.snapshot import write_snapshot
from samestyle.topics.errors import IndexStoreError
from tests.unit.index_store.test_index_store import check_against_brute, clustered, ids_of, rand

#: Largest error of one decoded component (unit-norm vectors of dim 32): float16 keeps ~3 digits,
#: sq8 a 255th of the dimension's range.
COMPONENT_TOL = {"float32": 0.0, "float16": 1e-3, "sq8": 0.01}
#: Largest error of a score against the float32 score of the same pair.
SCORE_TOL = {"float32": 1e-5, "float16": 2e-3, "sq8": 0.03}
COMPACT = ["float16", "sq8"]


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rand(rng, n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    centres = rand(rng, 40, 32)
    return clustered(rng, 3000, centres), clustered(rng, 50, centres)


def decoded(index: LiveIndex) -> dict[str, np.ndarray]:
    return {i: index.get(i)[0] for i in index.ids()}


# ------------------------------------------------------------------------ the stores


def test_sq8_codes_decode_as_faiss_decodes_them() -> None:
    rng = np.random.default_rng(0)
    x = unit(rng, 500, 24)
    rows = VectorRows(24, "sq8", train_rows=200)
    rows.append(x[:150])
    assert rows.stored == "float32"  # fewer rows than train_rows: kept as given
    np.testing.assert_array_equal(rows.decode(np.arange(150)), x[:150])
    rows.append(x[150:])
    assert rows.stored == "sq8" and rows.nbytes == 500 * 24
    codes, params = rows.state()
    assert codes.dtype == np.uint8 and params is not None and params.shape == (26, 24)
    # faiss alone: its rotation (seeded), then its quantiser trained on the rows in when the 200th
    # arrived (all 500: they came in one call).
    rotation = faiss.RandomRotationMatrix(24, 24)
    rotation.init(SQ8_ROTATION_SEED)
    reference = faiss.ScalarQuantizer(24, faiss.ScalarQuantizer.QT_8bit)
    reference.train(rotation.apply(x))
    np.testing.assert_allclose(faiss.vector_to_array(reference.trained), params[:2].ravel(), atol=1e-6)
    expected_codes = reference.compute_codes(rotation.apply(x))
    assert np.mean(expected_codes == codes) > 0.999  # rounding at a level boundary may differ by one
    assert np.abs(expected_codes.astype(int) - codes).max() <= 1
    np.testing.assert_allclose(rows.decode(np.arange(500)), rotation.reverse_transform(reference.decode(codes)),
                               atol=1e-5)
    # The search on the codes scores like the decoded vectors, and finds their exact top-k.
    queries = unit(rng, 7, 24)
    scores, found = rows.search(queries, 10, Scratch())
    truth = queries @ rows.decode(np.arange(500)).T  # [7, 500]
    np.testing.assert_allclose(scores, np.take_along_axis(truth, found, 1), atol=1e-5)
    np.testing.assert_allclose(scores, -np.sort(-truth, axis=1)[:, :10], atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.uint8])
@pytest.mark.parametrize("nq", [1, 9])
def test_exact_search_casts_compact_matrices_block_by_block(dtype: type, nq: int,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from samestyle.index_store import exact

    monkeypatch.setattr(exact, "CAST_BLOCK_FLOATS", 16 * 100)  # blocks of 100 rows: many casts
    rng = np.random.default_rng(nq)
    if dtype is np.uint8:
        matrix = rng.integers(0, 256, size=(1234, 16), dtype=np.uint8)
    else:
        matrix = unit(rng, 1234, 16).astype(np.float16)
    queries = unit(rng, nq, 16)
    scores, found = top_k_inner_product(queries, matrix, 20)
    truth = queries.astype(np.float64) @ matrix.astype(np.float64).T
    np.testing.assert_allclose(scores, -np.sort(-truth, axis=1)[:, :20], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(scores, np.take_along_axis(truth, found, 1), rtol=1e-5, atol=1e-4)
    with pytest.raises(TypeError):
        top_k_inner_product(queries, matrix.astype(np.float64), 3)


def test_float16_refuses_what_it_cannot_hold() -> None:
    index = LiveIndex(4, vectors="float16")
    with pytest.raises(IndexStoreError, match="float16"):
        index.upsert(["a"], np.full((1, 4), 1e6, np.float32))
    assert len(index) == 0


def test_constructor_checks_the_form() -> None:
    for bad in (lambda: LiveIndex(4, vectors="int4"), lambda: LiveIndex(4, "hnsw", vectors="sq8"),
                lambda: LiveIndex(4, vectors="sq8", sq8_train_rows=0),
                lambda: LiveIndex(4, sparse_views="yes")):  # type: ignore[arg-type]
        with pytest.raises(IndexStoreError):
            bad()
    assert LiveIndex(4, vectors="sq8").sparse_views and not LiveIndex(4).sparse_views
    assert not LiveIndex(4, vectors="sq8", sparse_views=False).sparse_views


# --------------------------------------------------------------------- the live index


@pytest.mark.parametrize("form", ["float32", *COMPACT])
def test_each_form_searches_like_float32(form: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    ids = ids_of(len(x))
    exact, index = LiveIndex(32), LiveIndex(32, vectors=form, sq8_train_rows=len(x))
    for start in range(0, len(x), 250):  # the sq8 ranges are learnt on the last batch, from every row
        for i in (exact, index):
            i.upsert(ids[start:start + 250], x[start:start + 250])
    assert max(np.abs(index.get(i)[0] - x[n]).max() for n, i in enumerate(ids)) <= COMPONENT_TOL[form]
    got, truth = index.search(queries, 10), exact.search(queries, 10)
    for g, t in zip(got, truth):
        assert {h.listing_id for h in g} == {h.listing_id for h in t} or form != "float32"
        np.testing.assert_allclose([h.score for h in g], [h.score for h in t], atol=SCORE_TOL[form])
        for h in g:  # each score is the float32 score of that pair, within the form's error
            assert abs(h.score - float(queries[got.index(g)] @ x[ids.index(h.listing_id)])) <= SCORE_TOL[form]
    recall = np.mean([len({h.listing_id for h in g} & {h.listing_id for h in t}) / 10 for g, t in zip(got, truth)])
    assert recall >= 0.9
    # Exact over what it stores: brute force over the decoded vectors.
    check_against_brute(index.search(queries, 10), decoded(index), queries, 10)


@pytest.mark.parametrize("form", COMPACT)
def test_compact_upsert_replace_and_delete(form: str, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    ids = ids_of(1500)
    index = LiveIndex(32, vectors=form, n_views=2, sq8_train_rows=500)
    views = np.stack([x[:1500], x[1500:]], axis=1)  # [1500, 2, 32]
    index.upsert(ids, x[:1500], views=views, payloads=[{"n": n} for n in range(1500)])
    index.upsert(ids[:100], x[1500:1600], views=views[:100, ::-1], payloads=[{"n": -n} for n in range(100)])
    assert index.delete(ids[1000:1300] + ["ghost"]) == 300
    assert len(index) == 1200 and "L1100" not in index
    vector, payload, got_views = index.get("L7")
    assert payload == {"n": -7}
    assert np.abs(vector - x[1507]).max() <= COMPONENT_TOL[form]
    assert np.abs(got_views - views[7, ::-1]).max() <= COMPONENT_TOL[form]
    assert np.abs(index.views(["L1400"])[0] - views[1400]).max() <= COMPONENT_TOL[form]
    check_against_brute(index.search(queries, 10, exclude=ids[:50]), decoded(index), queries, 10, ids[:50])


# ------------------------------------------------------------------------ sparse views


def test_sparse_views_store_no_row_for_absent_or_searched_views() -> None:
    rng = np.random.default_rng(3)
    dim = 8
    x = unit(rng, 4, dim)
    image, text = unit(rng, 4, dim), unit(rng, 4, dim)
    image[1] = 0.0  # listing 1 has no image
    views = np.stack([image, text, x], axis=1)  # image / text / image_text = the searched vector
    dense, sparse = LiveIndex(dim, n_views=3), LiveIndex(dim, n_views=3, sparse_views=True)
    for index in (dense, sparse):
        index.upsert(ids_of(4), x, views=views)
    assert sparse._view_of[1].tolist() == [ABSENT, 1, SEARCHED]
    assert [len(rows) for rows in sparse._view_rows] == [3, 4, 0]
    assert sparse.vector_bytes < dense.vector_bytes
    np.testing.assert_array_equal(sparse.views(ids_of(4)), views)  # read back exactly
    np.testing.assert_array_equal(sparse.get("L1")[2], dense.get("L1")[2])
    # The listing gains an image and loses it again; another one is deleted in between.
    image[1] = unit(rng, 1, dim)[0]
    sparse.upsert(["L1"], x[1:2], views=np.stack([image, text, x], axis=1)[1:2])
    assert [len(rows) for rows in sparse._view_rows] == [4, 4, 0]
    sparse.delete(["L0"])
    sparse.upsert(["L1"], x[1:2], views=views[1:2] * np.array([0, 1, 1], np.float32)[:, None])
    assert [len(rows) for rows in sparse._view_rows] == [2, 3, 0]
    np.testing.assert_array_equal(sparse.views(["L1"])[0], np.stack([np.zeros(dim), text[1], x[1]]))
    np.testing.assert_array_equal(sparse.views(["L2", "L3"]), views[2:])


POOL = [f"p{i}" for i in range(10)]
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("upsert"), st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True),
                  st.integers(0, 2**16)),
        st.tuples(st.just("delete"), st.lists(st.sampled_from([*POOL, "ghost"]), max_size=4), st.integers(0, 0)),
    ),
    max_size=25,
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, form=st.sampled_from(["float32", "float16", "sq8"]))
def test_sparse_views_survive_random_interleavings(ops: list, form: str) -> None:
    dim = 6
    index = LiveIndex(dim, n_views=3, vectors=form, sparse_views=True, sq8_train_rows=8)
    ref: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for op, ids, seed in ops:
        rng = np.random.default_rng(seed)
        if op == "upsert":
            x = unit(rng, len(ids), dim)
            views = np.stack([unit(rng, len(ids), dim), unit(rng, len(ids), dim), x], axis=1)
            views[rng.random(len(ids)) < 0.5, 0] = 0.0  # about half without an image
            views[rng.random(len(ids)) < 0.2, 1] = 0.0
            index.upsert(ids, x, views=views)
            ref.update({i: (x[n], views[n]) for n, i in enumerate(ids)})
        else:
            present = {i for i in ids if i in ref}
            assert index.delete(ids) == len(present)
            for i in present:
                del ref[i]
        assert sorted(index.ids()) == sorted(ref)
        for view, rows in enumerate(index._view_rows):  # pools dense, owners and rows agree
            owner = index._view_owner[view][: len(rows)]
            assert sorted(owner.tolist()) == sorted(np.flatnonzero(index._view_of[: len(index), view] >= 0).tolist())
            assert np.array_equal(index._view_of[owner, view], np.arange(len(rows)))
    stores = [index._vectors, *index._view_rows]
    # A component at a level boundary may round either way (the rotation's float error): one level.
    atol = {"float32": 1e-6, "float16": 1e-6, "sq8": 0.01}[form]
    for i, (x, views) in ref.items():
        vector, _, got = index.get(i)
        np.testing.assert_allclose(vector, expected(stores[0], x[None])[0], atol=atol)
        np.testing.assert_array_equal(got[~views.any(axis=1)], 0.0)  # absent views: exactly zeros
        for view in range(2):  # a text view equal to the image+text one reads back as it
            if views[view].any():
                np.testing.assert_allclose(got[view], expected(stores[1 + view], views[view][None])[0], atol=atol)
        np.testing.assert_array_equal(got[2], vector)


def expected(rows: VectorRows, x: np.ndarray) -> np.ndarray:
    """What a store of ``rows``' form and parameters gives back for ``x``: computed by faiss alone."""
    if rows.stored == "float32":
        return x
    if rows.stored == "float16":
        return x.astype(np.float16).astype(np.float32)
    params = rows.state()[1]
    assert params is not None
    rotation = faiss.RandomRotationMatrix(rows.dim, rows.dim)
    rotation.init(SQ8_ROTATION_SEED)
    np.testing.assert_allclose(faiss.vector_to_array(rotation.A).reshape(rows.dim, rows.dim), params[2:], atol=1e-6)
    quantizer = faiss.ScalarQuantizer(rows.dim, faiss.ScalarQuantizer.QT_8bit)
    faiss.copy_array_to_vector(params[:2].ravel(), quantizer.trained)
    return rotation.reverse_transform(quantizer.decode(quantizer.compute_codes(rotation.apply(x))))


# --------------------------------------------------------------------------- snapshots


@pytest.mark.parametrize("form", ["float32", *COMPACT])
def test_snapshot_round_trips_each_form(form: str, tmp_path: Path, data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    ids = ids_of(1200)
    views = np.stack([x[:1200], x[1200:2400], x[:1200]], axis=1)
    views[::3, 0] = 0.0
    index = LiveIndex(32, n_views=3, vectors=form, sq8_train_rows=600)
    index.upsert(ids, x[:1200], views=views, payloads=[{"supplier_id": f"s{n % 5}", "t": "é\u2028"} for n in range(1200)])
    index.delete(ids[:30])
    index.snapshot(tmp_path, {0: 5})
    loaded, offsets = LiveIndex.load(tmp_path)
    assert offsets == {0: 5} and (loaded.vectors, loaded.sparse_views) == (form, form != "float32")
    assert loaded.search(queries, 10) == index.search(queries, 10)
    np.testing.assert_array_equal(loaded.views(ids[30:]), index.views(ids[30:]))
    assert loaded.get("L77")[1] == {"supplier_id": "s2", "t": "é\u2028"}
    assert loaded.vector_bytes == index.vector_bytes
    # It goes on learning and writing like the index it was saved from.
    for i in (index, loaded):
        i.upsert(["new"], x[2500:2501], views=views[:1])
    np.testing.assert_array_equal(loaded.get("new")[0], index.get("new")[0])


def test_untrained_sq8_snapshot_trains_after_loading(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    x = unit(rng, 300, 16)
    index = LiveIndex(16, vectors="sq8", sq8_train_rows=200)
    index.upsert(ids_of(100), x[:100])
    index.snapshot(tmp_path, {})
    loaded, _ = LiveIndex.load(tmp_path)
    assert loaded._vectors.stored == "float32"
    loaded.upsert(ids_of(200, "M"), x[100:])
    assert loaded._vectors.stored == "sq8" and len(loaded) == 300


def test_float32_snapshot_converts_and_compact_refuses_another_form(tmp_path: Path,
                                                                    data: tuple[np.ndarray, np.ndarray]) -> None:
    x, queries = data
    views = np.stack([np.zeros_like(x), x], axis=1)
    index = LiveIndex(32, n_views=2, sq8_train_rows=500)  # a loaded index keeps its parameters
    index.upsert(ids_of(len(x)), x, views=views, payloads=[{"n": n} for n in range(len(x))])
    index.snapshot(tmp_path / "f32", {0: 1})
    converted, offsets = LiveIndex.load_or_create(tmp_path / "f32", 32, "flat", 2, vectors="sq8")
    assert offsets == {0: 1} and converted.vectors == "sq8" and converted.sparse_views
    assert converted._vectors.stored == "sq8" and [len(r) for r in converted._view_rows] == [0, 0]
    assert converted.get("L9")[1] == {"n": 9}
    recall = np.mean([len({h.listing_id for h in a} & {h.listing_id for h in b}) / 10
                      for a, b in zip(converted.search(queries, 10), index.search(queries, 10))])
    assert recall >= 0.9
    converted.snapshot(tmp_path / "sq8", {0: 2})
    for asked in ("float32", "float16"):
        with pytest.raises(IndexStoreError, match="stores sq8 vectors and .* was asked.*cannot be converted"):
            LiveIndex.load(tmp_path / "sq8", vectors=asked)
    assert LiveIndex.load(tmp_path / "sq8", vectors="sq8")[0].vectors == "sq8"


def test_format_1_snapshots_are_still_read(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    x, views = unit(rng, 5, 8), rand(rng, 5, 2, 8)
    meta = {"kind": "flat", "dim": 8, "n_views": 2, "count": 5, "ids": ids_of(5), "offsets": {"0": 9},
            "payloads": [{"n": n} for n in range(5)],
            "params": {"hnsw_m": 32, "ef_construction": 200, "ef_search": 128, "rebuild_fraction": 0.25}}
    path = write_snapshot(tmp_path, meta, {"vectors.npy": x, "views.npy": views})
    full = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps({**full, "version": 1}))
    for asked in (None, "sq8"):
        index, offsets = LiveIndex.load(tmp_path, vectors=asked)
        assert offsets == {0: 9} and index.payload("L3") == {"n": 3}
        tol = 0.0 if asked is None else COMPONENT_TOL["sq8"] * 10  # 5 rows: sq8 still float32 anyway
        assert np.abs(index.views(ids_of(5)) - views).max() <= tol
        assert np.abs(index.get("L2")[0] - x[2]).max() <= tol


# ------------------------------------------------------------------------ the setting


def test_the_setting_reaches_the_replica_indexes(tmp_path: Path) -> None:
    from samestyle.streams.settings import Settings
    from samestyle.streams.switch.indexes import ModelIndexes
    from samestyle.topics.errors import ConfigError

    assert Settings.from_env({"SAMESTYLE_INDEX_VECTORS": "sq8"}).index_vectors == "sq8"
    assert Settings().index_vectors == "float32"
    for bad in ({"SAMESTYLE_INDEX_VECTORS": "int8"},
                {"SAMESTYLE_INDEX_VECTORS": "float16", "SAMESTYLE_INDEX_KIND": "hnsw"}):
        with pytest.raises(ConfigError, match="index_vectors"):
            Settings.from_env(bad)
    plain = ModelIndexes("flat", 3)
    plain.index_for("v1", 8).upsert(["a"], np.ones((1, 8), np.float32), views=np.ones((1, 3, 8), np.float32))
    plain.snapshot(tmp_path, {0: 1})
    loaded, offsets = ModelIndexes.load(tmp_path, "flat", 3, vectors="float16")  # converted on load
    assert offsets == {0: 1} and loaded.indexes["v1"].vectors == "float16"
    assert loaded.index_for("v2", 8).vectors == "float16"
