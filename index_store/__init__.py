"""The live similarity index of listings, and its snapshots.

:class:`LiveIndex` maps listing ids to a float32 search vector (inner product), a JSON payload and
optional per-view vectors; writes are idempotent upserts by id; ``kind`` is ``"flat"`` (exact, the
default) or ``"hnsw"``; bad input raises :class:`~samestyle.topics.errors.IndexStoreError`; one lock
serialises every public call. ``index.snapshot(dir, offsets)`` writes atomically, and
``LiveIndex.load_or_create`` returns the index and those offsets to replay from.

:class:`IndexBackend` is the same per model version behind one interface, in this process
(:class:`FaissBackend`) or in Milvus (``samestyle.index_store.milvus``, the extra
``samestyle[milvus]``); :func:`create_backend` builds one by name (docs/SCALING.md).
"""

from __future__ import annotations

from samestyle.index_store.backend import BACKENDS, FaissBackend, IndexBackend
from samestyle.index_store.factory import create_backend
from samestyle.index_store.live import KINDS, Hit, LiveIndex
from samestyle.index_store.snapshot import FORMAT_VERSION, has_snapshot

__all__ = ["BACKENDS", "FORMAT_VERSION", "KINDS", "FaissBackend", "Hit", "IndexBackend", "LiveIndex", "create_backend",
           "has_snapshot"]
