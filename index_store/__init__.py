"""The live similarity index of listings, and its snapshots.

Design
------
:class:`LiveIndex` maps string listing ids to one float32 search vector (inner product; the
encoders emit L2-normalised vectors, so this is cosine), a small JSON payload (supplier id,
category, title...) and optionally ``n_views`` extra vectors per listing (image / text /
image+text) used to score a candidate pair view by view. Every write is an idempotent upsert
keyed by listing id, so replaying a topic from an older offset never duplicates a vector.

* ``kind="flat"`` (default): exact search. Vectors sit in one contiguous capacity-doubling
  matrix; deletes swap the last row into the hole; ``faiss.knn`` reads ``matrix[:n]`` in place.
* ``kind="hnsw"``: approximate search for large catalogues (``faiss.IndexHNSWFlat``). Deletes
  and replacements tombstone graph entries, searches skip them with a faiss ID selector, and the graph is
  rebuilt from the live vectors when tombstones pass ``rebuild_fraction`` (25 %).

The index checks its inputs at the boundary (float arrays of the right shape, finite, converted
to contiguous float32; non-empty str ids) and raises :class:`topics.errors.IndexStoreError`.
One re-entrant lock serialises every public call: FAISS is not safe under concurrent
add/remove/search, and the index agent is its single owner anyway.

Snapshots and restarts
----------------------
``index.snapshot(dir, offsets)`` atomically writes the vectors, views, ids, payloads, parameters
and the ``partition -> next offset`` map of the ``listing-embeddings`` topic it has applied (see
:mod:`index_store.snapshot` for the layout). On restart ``LiveIndex.load_or_create`` returns the
index and those offsets; the consumer seeks there and replays. Upserts are idempotent, so nothing
is lost and nothing counts twice.

Sharding past one machine
-------------------------
Each replica holds the whole catalogue by default (it consumes every partition). When the vectors
no longer fit one machine's memory (flat: ``4 * dim`` bytes per listing plus ``4 * n_views * dim``
for views), split the index into S shards by ``stable_hash(listing_id) % S`` (a stable hash such
as crc32 or the Kafka murmur2 partitioner, never Python's salted ``hash``); keying the
``listing-embeddings`` topic by listing id with a partition count that is a multiple of S lets
each shard consume only its own partitions. A query is scattered to one replica of every shard,
each returns its local top-k (with ``exclude`` applied), and the gatherer merges the S lists by
score and keeps the best k: exact top-k for flat shards, since every true neighbour is in the
local top-k of its own shard. Per-view scores of a candidate pair are fetched from the shard that
owns the candidate. Each shard snapshots its own offsets.
"""

from __future__ import annotations

from samestyle.index_store.live import KINDS, Hit, LiveIndex
from samestyle.index_store.snapshot import FORMAT_VERSION, has_snapshot

__all__ = ["FORMAT_VERSION", "KINDS", "Hit", "LiveIndex", "has_snapshot"]
