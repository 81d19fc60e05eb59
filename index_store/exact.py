"""Exact top-k by inner product: one GEMM per block of gallery rows, then a threshold selection.

The flat index's search. Per block of rows, numpy's sgemm writes the scores ``[nq, rows]``; one
comparison with each query's current k-th best score (``>``, so equal scores are not kept) and a
``flatnonzero`` leave the few candidates that can enter a top-k, which are merged with the kept
top-k. The first block is small (``FIRST_BLOCK_ROWS``) and selected with ``argpartition``, so the
later, large blocks start from real thresholds (a batch of at most ``SMALL_QUERY_BATCH`` queries
starts with a large block); a block in which more than 1/32 of the scores pass (a gallery
ordered against the queries) is selected with ``argpartition`` too. Each block's scores are at
most ``GALLERY_BLOCK_FLOATS`` float32 (32 MB; ``nq * k`` if more), whatever the gallery size.

Why not ``faiss.knn``: faiss 1.15 takes its BLAS path only when ``nq * dim >=
faiss.cvar.distance_compute_blas_threshold`` (default 128,000: 500 queries at dim 256). The index
agent's 32 queries went to the other path, every query scanning the gallery on its own with SIMD
dot products, at 0.15 of numpy's sgemm of the same shapes. Forced onto its BLAS path (process-wide
globals, so a lock around every search), faiss makes one sgemm and one OpenMP region per block of
gallery rows; with its 1,024-row blocks (~200 regions per search) it fell to 0.2-0.4 of the sgemm
whenever other processes loaded the cores, as the worker's own encoder does. With large blocks it
came close to this module but swung with the load and with what ran just before it (0.66-0.92;
its OpenMP threads still spinning from a previous faiss call helped it), where this module held
0.74-0.82 on numpy's BLAS, the same library as the reference sgemm.

``samestyle bench index --n 200000 --dim 256 --skip-approx --json --repeat 15`` on this project's
2-core machine with two training processes running (load 5-6), 32 queries, k=10 (+1 excluded),
15 rounds in random order with the sgemm (the faster of ``q @ x.T`` and ``x @ q.T`` into
preallocated outputs), ratio = sgemm seconds / search seconds, medians, two runs:

    this module (``sgemm_ratio``)                          0.77, 0.75   (109, 125 ms per batch)
    faiss.knn, faiss's settings (the flat search before)    0.15, 0.15   (564, 636 ms)
    faiss.knn, BLAS, blocks of 2**23 / nq rows              0.70, 0.66
    this module, 16,384 / 65,536 / 262,144 / 1M rows per GEMM   0.50-0.59 / 0.70-0.74 / 0.72-0.82 / 0.74-0.80
    at --n 1000000: this module 0.74 (555 ms), faiss defaults 0.14 (2,964 ms), faiss BLAS 0.82

Selection details measured on the same shapes: ``np.nonzero`` of the 2-d mask took 45 ms where
``flatnonzero`` of the same mask took 1.5 ms; the ``[nq, rows]`` score layout compared 30 %
faster than ``[rows, nq]``; a first block of 2,048 / 4,096 / 16,384 / 65,536 rows gave 0.72 /
0.74 / 0.75 / 0.65 of the sgemm.

A float16 or uint8 matrix (the compact forms of ``index_store/rows.py``) goes through the same
loop, each block first cast to float32 into a reused buffer of ``CAST_BLOCK_FLOATS`` (64 MB):
sgemm needs float32, and the float32 path casts nothing. 200k x 256, 32 queries, load 12-14 on the
2 cores, medians of 9 rounds in random order: blocks of 4,096 rows (a 4 MB buffer, in L2) ran the
compact forms at 0.15-0.17 of float32's speed, 16,384 rows at 0.34-0.50, 65,536 rows at 0.46-0.68,
and 131,072 or 262,144 rows no faster. faiss's own ``IndexScalarQuantizer`` search (a SIMD decode
per query, no GEMM) was slower still: in one run of 9 rounds, sq8 1.78 s and fp16 1.99 s per batch
against this loop's 0.87 s (sq8) and 1.16 s (float16), float32 0.55 s. More: docs/SCALING.md.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np

#: Scores computed per GEMM call, ``nq * rows`` (float32: 32 MB). Fewer, larger calls were faster
#: on loaded cores; see the module docstring.
GALLERY_BLOCK_FLOATS = 1 << 23
#: Rows of the first block, whose exact top-k gives the later blocks their thresholds.
FIRST_BLOCK_ROWS = 16384
#: Up to this many queries there is no small first block: the scores of a few queries are cheap to
#: argpartition whole, and the extra GEMM call cost more (1 query, 200k x 256, loaded cores:
#: 16.7 ms in one block against 22.7 ms seeded, one sgemm 15.7 ms; equal at 2 and 4 queries; at 8
#: seeded 63 ms against 70 ms, the sgemm 59 ms; medians of 21 rounds in random order).
SMALL_QUERY_BATCH = 4
#: A block in which more than 1 / DENSE_FRACTION of the scores pass the thresholds is selected
#: with argpartition instead of gathering every passing score.
DENSE_FRACTION = 32
#: Rows of a float16 or uint8 matrix cast to float32 per GEMM call: ``CAST_BLOCK_FLOATS / dim``.
CAST_BLOCK_FLOATS = 1 << 24
#: Matrix dtypes the search reads: float32 in place, the others cast block by block.
MATRIX_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.uint8))


class Scratch:
    """Score and mask buffers reused across searches; one search at a time (the caller's lock)."""

    def __init__(self) -> None:
        self._scores = np.empty(0, dtype=np.float32)
        self._mask = np.empty(0, dtype=np.bool_)
        self._cast = np.empty(0, dtype=np.float32)

    def buffers(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Flat float32 and bool buffers of at least ``size`` elements (grown, never shrunk)."""
        if self._scores.size < size:
            self._scores = np.empty(size, dtype=np.float32)
            self._mask = np.empty(size, dtype=np.bool_)
        return self._scores, self._mask

    def cast_buffer(self, size: int) -> np.ndarray:
        """A flat float32 buffer of at least ``size`` elements for cast matrix blocks."""
        if self._cast.size < size:
            self._cast = np.empty(size, dtype=np.float32)
        return self._cast


def _blocks(n: int, first: int, rows: int) -> list[tuple[int, int]]:
    bounds = [0, *range(min(first, n), n, rows), n]
    return list(pairwise(bounds))


def top_k_inner_product(
    queries: np.ndarray,
    matrix: np.ndarray,
    k: int,
    *,
    scratch: Scratch | None = None,
    block_floats: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``min(k, n)`` rows of ``matrix [n, dim]`` with the largest inner product with each of
    ``queries [nq, dim]`` (both C-contiguous; queries float32, the matrix float32, float16 or uint8,
    whose values are taken as they are), best first: ``(scores [nq, k'] float32, rows [nq, k']
    int64)``. Among equal scores the lower row comes first; which of several rows tied at the
    k-th score is kept is not specified.
    """
    nq, n = queries.shape[0], matrix.shape[0]
    k = min(k, n)
    if nq == 0 or k == 0:
        return np.empty((nq, k), dtype=np.float32), np.empty((nq, k), dtype=np.int64)
    if matrix.dtype not in MATRIX_DTYPES:
        raise TypeError(f"top_k_inner_product reads a float32, float16 or uint8 matrix, not {matrix.dtype}")
    scratch = scratch or Scratch()
    rows_per_block = max(k, (block_floats or GALLERY_BLOCK_FLOATS) // nq)
    cast = matrix.dtype != np.float32
    if cast:
        dim = matrix.shape[1]
        rows_per_block = max(k, min(rows_per_block, CAST_BLOCK_FLOATS // max(dim, 1)))
        cast_buf = scratch.cast_buffer(min(n, rows_per_block) * dim)
    first = rows_per_block if nq <= SMALL_QUERY_BATCH else max(k, min(FIRST_BLOCK_ROWS, rows_per_block))
    scores_buf, mask_buf = scratch.buffers(nq * min(n, rows_per_block))
    best_scores = np.full((nq, k), -np.inf, dtype=np.float32)
    best_rows = np.full((nq, k), -1, dtype=np.int64)
    threshold = np.full((nq, 1), -np.inf, dtype=np.float32)  # each query's k-th best so far
    query_of_kept = np.repeat(np.arange(nq), k)  # [nq * k]
    for start, stop in _blocks(n, first, rows_per_block):
        rows = stop - start
        block = matrix[start:stop]
        if cast:
            as_float = cast_buf[: rows * dim].reshape(rows, dim)
            np.copyto(as_float, block)
            block = as_float
        scores = np.matmul(queries, block.T, out=scores_buf[: nq * rows].reshape(nq, rows))
        passing = np.greater(scores, threshold, out=mask_buf[: nq * rows].reshape(nq, rows))
        count = np.count_nonzero(passing)
        if count == 0:
            continue
        if rows > k and count * DENSE_FRACTION > nq * rows:
            block_rows = np.argpartition(scores, rows - k, axis=1)[:, rows - k :].ravel()  # [nq * k]
            block_queries = query_of_kept
        else:
            block_queries, block_rows = np.divmod(np.flatnonzero(passing), rows)
        # Merge: sort kept + candidates by (query, score descending, row), keep k per query.
        q = np.concatenate([query_of_kept, block_queries])
        s = np.concatenate([best_scores.ravel(), scores[block_queries, block_rows]])
        r = np.concatenate([best_rows.ravel(), block_rows + start])
        order = np.lexsort((r, -s, q))
        q, s, r = q[order], s[order], r[order]
        rank = np.arange(q.size) - np.searchsorted(q, np.arange(nq))[q]
        keep = rank < k
        best_scores[q[keep], rank[keep]] = s[keep]
        best_rows[q[keep], rank[keep]] = r[keep]
        threshold = best_scores[:, k - 1 :].copy()
    return best_scores, best_rows
