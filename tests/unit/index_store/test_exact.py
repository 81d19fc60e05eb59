"""The exact search (blocked GEMM + threshold selection) against faiss.knn as the flat index used it
before (faiss's SIMD path), and against numpy brute force on adversarial orderings and ties."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from samestyle.index_store import LiveIndex, exact
from samestyle.index_store.exact import Scratch, top_k_inner_product

TOL = 1e-5


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def faiss_before(queries: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """faiss.knn on the path the flat index took before: per-query SIMD scans, not BLAS."""
    saved = faiss.cvar.distance_compute_blas_threshold
    faiss.cvar.distance_compute_blas_threshold = 2**31 - 1
    try:
        return faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        faiss.cvar.distance_compute_blas_threshold = saved


def assert_same_top_k(scores: np.ndarray, rows: np.ndarray, ref_scores: np.ndarray, ref_rows: np.ndarray) -> None:
    """Same scores; same row at every position whose score is not tied with a neighbour's."""
    assert scores.shape == rows.shape == ref_scores.shape == ref_rows.shape
    np.testing.assert_allclose(scores, ref_scores, atol=TOL, rtol=TOL)
    for q in range(scores.shape[0]):
        s = ref_scores[q].astype(np.float64)
        gap = np.diff(s, prepend=np.inf, append=-np.inf)  # [k + 1]: s[i-1] - s[i] negated
        apart = (np.abs(gap[:-1]) > 10 * TOL) & (np.abs(gap[1:]) > 10 * TOL)
        np.testing.assert_array_equal(rows[q][apart], ref_rows[q][apart])
        assert len(set(rows[q].tolist())) == rows.shape[1]


def brute(queries: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    s = queries.astype(np.float64) @ matrix.astype(np.float64).T  # [nq, n]
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1).astype(np.float32), order


@pytest.mark.parametrize("nq", [1, 5, 32, 70])
@pytest.mark.parametrize("k", [1, 11, 600, 5000])
def test_matches_faiss_as_before(nq: int, k: int) -> None:
    rng = np.random.default_rng(nq * 7919 + k)
    matrix, queries = unit(rng, 3000, 24), unit(rng, nq, 24)
    want = min(k, len(matrix))
    got = top_k_inner_product(queries, matrix, k)
    assert_same_top_k(*got, *faiss_before(queries, matrix, want))


@pytest.mark.parametrize("nq", [1, 40])  # without and with the small first block
@pytest.mark.parametrize("block_floats", [1, 40 * 64, 1 << 23])
def test_many_blocks_and_partial_last_block(nq: int, block_floats: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small first and later blocks: thresholds carried across up to 200 blocks, a short last block.
    monkeypatch.setattr(exact, "FIRST_BLOCK_ROWS", 50)
    rng = np.random.default_rng(1)
    matrix, queries = unit(rng, 2021, 16), unit(rng, nq, 16)
    scratch = Scratch()
    got = top_k_inner_product(queries, matrix, 10, block_floats=block_floats, scratch=scratch)
    assert_same_top_k(*got, *faiss_before(queries, matrix, 10))
    assert scratch.buffers(0)[0].size <= max(block_floats, nq * 10)  # memory bounded by the block


def test_gallery_ordered_against_the_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rows in increasing score order: every block beats the kept top-k, so blocks are selected
    # by argpartition (dense) instead of gathering candidates; still exact.
    monkeypatch.setattr(exact, "FIRST_BLOCK_ROWS", 64)
    rng = np.random.default_rng(2)
    query = unit(rng, 1, 32)
    matrix = unit(rng, 5000, 32)
    matrix = np.ascontiguousarray(matrix[np.argsort(matrix @ query[0])])
    queries = np.concatenate([query, unit(rng, 3, 32)])
    got = top_k_inner_product(queries, matrix, 25, block_floats=4 * 256)
    assert_same_top_k(*got, *brute(queries, matrix, 25))
    np.testing.assert_array_equal(got[1][0], np.arange(4999, 4974, -1))


def test_ties_sort_by_row_and_scores_are_exact() -> None:
    rng = np.random.default_rng(3)
    base = unit(rng, 7, 8)
    matrix = np.ascontiguousarray(np.tile(base, (300, 1)))  # row r repeats row r % 7: 300-way ties
    scores, rows = top_k_inner_product(base, matrix, 12)
    for q in range(7):
        np.testing.assert_allclose(scores[q], np.float32(base[q] @ base[q]), atol=TOL)
        assert all(r % 7 == q for r in rows[q])  # copies of the query, whichever of the tie
        assert rows[q].tolist() == sorted(set(rows[q].tolist()))  # equal scores: lower row first


def test_empty_and_reusable_scratch() -> None:
    rng = np.random.default_rng(4)
    matrix = unit(rng, 100, 8)
    s, r = top_k_inner_product(np.empty((0, 8), np.float32), matrix, 5)
    assert s.shape == r.shape == (0, 5)
    scratch = Scratch()
    for nq in (3, 40, 2):  # the buffers grow once and serve smaller batches after
        queries = unit(rng, nq, 8)
        assert_same_top_k(*top_k_inner_product(queries, matrix, 5, scratch=scratch),
                          *faiss_before(queries, matrix, 5))


def test_live_index_search_matches_faiss_as_before_after_deletes_and_upserts() -> None:
    """LiveIndex.search (the index agent's call) against faiss.knn on the same live vectors as the
    flat index searched before: deleted ids gone, replaced vectors new, exclusions, k > live count."""
    rng = np.random.default_rng(5)
    dim = 32
    index = LiveIndex(dim)
    ref: dict[str, np.ndarray] = {}
    x = unit(rng, 4000, dim)
    ids = [f"L{i}" for i in range(4000)]
    index.upsert(ids, x)
    ref.update(zip(ids, x))
    deleted = [f"L{i}" for i in rng.choice(4000, 900, replace=False)]
    assert index.delete(deleted) == 900
    for i in deleted:
        del ref[i]
    replaced = [i for i in ids if i in ref][:300]
    y = unit(rng, 300, dim)
    index.upsert(replaced, y)
    ref.update(zip(replaced, y))
    live_ids = list(ref)
    row_of = {listing_id: r for r, listing_id in enumerate(live_ids)}
    matrix = np.stack([ref[i] for i in live_ids])
    queries = unit(rng, 32, dim)
    exclude = [live_ids[j] for j in rng.choice(len(live_ids), 16, replace=False)] + [None] * 8 + deleted[:8]
    for k in (10, 3500):  # 3500 > the 3,100 live listings
        hits = index.search(queries, k, exclude=exclude)
        ref_scores, ref_rows = faiss_before(queries, matrix, min(k + 1, len(live_ids)))
        for q, row in enumerate(hits):
            keep = [j for j, r in enumerate(ref_rows[q]) if live_ids[r] != exclude[q]][:k]
            assert len(row) == len(keep) == min(k, len(live_ids) - (exclude[q] in ref))
            assert not {h.listing_id for h in row} & (set(deleted) | {exclude[q]})
            got_scores = np.array([[h.score for h in row]], dtype=np.float32)
            got_rows = np.array([[row_of[h.listing_id] for h in row]])
            assert_same_top_k(got_scores, got_rows, ref_scores[q][keep][None], ref_rows[q][keep][None])
