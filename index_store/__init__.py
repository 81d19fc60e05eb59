"""The live similarity index of listings, and its snapshots.

:class:`LiveIndex` maps listing ids to a float32 search vector (inner product), a JSON payload and
optional per-view vectors; writes are idempotent upserts by id; ``kind`` is ``"flat"`` (exact, the
default) or ``"hnsw"``; bad input raises :class:`~samestyle.topics.errors.IndexStoreError`; one lock
serialises every public call. ``index.snapshot(dir, offsets)`` writes atomically, and
``LiveIndex.load_or_create`` returns the index and those offsets to replay from.
"""

from __future__ import annotations

from samestyle.index_store.live import KINDS, Hit, LiveIndex
from samestyle.index_store.snapshot import FORMAT_VERSION, has_snapshot

__all__ = ["FORMAT_VERSION", "KINDS", "Hit", "LiveIndex", "has_snapshot"]
