"""Fixtures shared by the index store tests."""

from __future__ import annotations

from collections.abc import Iterator

import faiss
import pytest


@pytest.fixture(autouse=True, scope="module")
def one_faiss_thread() -> Iterator[None]:
    # OpenMP threads spin-wait: on a small machine shared with other test processes, FAISS's
    # parallel regions on tiny batches run ~10x slower than one thread. Restored afterwards.
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
