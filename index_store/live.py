"""The live index: string listing ids -> float32 vectors, payloads and per-view vectors.

Storage is a set of parallel, capacity-doubling "slot" arrays: ``_ids[slot]``, ``_payloads[slot]``,
``_views[slot]`` and, for kind ``"flat"``, ``_vectors[slot]``; ``_slot_of`` maps an id to its slot.
Slots are dense (``0 .. len-1``): deleting swaps the last slot into the hole, so every operation is
O(dim) per id and an exact search runs on one contiguous ``[len, dim]`` view of the matrix without
copying it (:func:`~samestyle.index_store.exact.top_k_inner_product` over ``_vectors[:len]``: numpy
GEMMs over blocks of rows and a threshold selection).

Kind ``"hnsw"`` keeps the vectors in a ``faiss.IndexHNSWFlat`` instead (one copy in memory, not
two); ``_labels[slot]`` is the graph entry of a slot and ``_owner[label]`` the slot of a graph entry,
-1 for a tombstone. See :class:`LiveIndex` for the trade-off.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from samestyle.index_store.exact import Scratch, top_k_inner_product
from samestyle.index_store.snapshot import SnapshotReader, has_snapshot, write_snapshot
from samestyle.topics.errors import IndexStoreError

KINDS = ("flat", "hnsw")
_MIN_CAPACITY = 16


@dataclass(frozen=True)
class Hit:
    """One search result: a listing id and its inner-product score with the query."""

    listing_id: str
    score: float


def _grow(array: np.ndarray, used: int, needed: int) -> np.ndarray:
    """Return ``array`` or a copy with room for ``needed`` rows (capacity doubles)."""
    if needed <= array.shape[0]:
        return array
    capacity = max(needed, 2 * array.shape[0], _MIN_CAPACITY)
    grown = np.empty((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:used] = array[:used]
    return grown


def _shrink(array: np.ndarray, used: int) -> np.ndarray:
    """Give memory back after mass deletes: halve capacity while a quarter or less is used."""
    capacity = array.shape[0]
    if capacity <= 4 * _MIN_CAPACITY or used > capacity // 4:
        return array
    return array[: max(2 * used, _MIN_CAPACITY)].copy()


def _check_ids(ids: Sequence[str], what: str) -> list[str]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise IndexStoreError(f"{what}: ids must be a sequence of str, got {type(ids).__name__}")
    out = list(ids)
    for listing_id in out:
        if not isinstance(listing_id, str) or not listing_id:
            raise IndexStoreError(f"{what}: every id must be a non-empty str, got {listing_id!r}")
    return out


def _check_float(array: Any, shape: tuple[int, ...], what: str) -> np.ndarray:
    """Contiguous finite float32 array of exactly ``shape`` (-1 = any length), or IndexStoreError."""
    if not isinstance(array, np.ndarray):
        raise IndexStoreError(f"{what} must be a numpy array, got {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.floating):
        raise IndexStoreError(f"{what} must have a float dtype, got {array.dtype}")
    if array.ndim != len(shape) or any(w != -1 and w != s for w, s in zip(shape, array.shape)):
        expected = "[" + ", ".join("n" if w == -1 else str(w) for w in shape) + "]"
        raise IndexStoreError(f"{what} has shape {list(array.shape)}, expected {expected}")
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(array).all():
        raise IndexStoreError(f"{what} contains NaN or inf")
    return array


def _check_payload(payload: Any, listing_id: str) -> dict[str, Any]:
    """A JSON round-trip copy, so what is kept is exactly what a snapshot restores."""
    if not isinstance(payload, Mapping):
        raise IndexStoreError(
            f"payload of {listing_id!r} must be a mapping, got {type(payload).__name__}"
        )
    if not all(isinstance(key, str) for key in payload):
        raise IndexStoreError(f"payload of {listing_id!r} must have str keys")
    try:
        return json.loads(json.dumps(dict(payload), allow_nan=False))
    except (TypeError, ValueError) as e:
        raise IndexStoreError(f"payload of {listing_id!r} is not JSON-serialisable: {e}") from e


class LiveIndex:
    """A mutable inner-product index of listings keyed by string listing id.

    ``kind="flat"`` (default) is exact: brute-force inner product over a contiguous float32
    matrix, correct after any interleaving of upserts and deletes, at about 0.8 of the speed of
    numpy's matrix product of the same shapes (``index_store/exact.py``); use it up to a few
    million vectors per shard.

    ``kind="hnsw"`` is approximate (``faiss.IndexHNSWFlat``, inner product) for larger
    catalogues: search is sub-linear, but recall is below 1 and depends on ``ef_search``; it
    works best on L2-normalised vectors (cosine), which is what the encoders emit. HNSW cannot
    remove entries, so a delete or a replacement tombstones the old graph entry; searches skip
    tombstones inside the graph walk (a faiss ``IDSelectorBitmap`` of live entries), and once tombstones exceed
    ``rebuild_fraction`` of the graph it is rebuilt from the live vectors. That rebuild runs
    inside the mutating call and costs a full build (seconds per 100k vectors) with, briefly,
    the old and the new graph in memory. Inserts are also slower than flat (graph linking).

    ``n_views`` > 0 stores, per id, that many extra vectors (e.g. the listing's image, text and
    image+text embeddings) to score a candidate pair per view; they are not searched.

    Thread safety: every public method holds one re-entrant lock, so one call runs at a time
    (FAISS is not safe under concurrent add/remove/search). Batch queries to amortise it.
    The flat search runs on numpy's BLAS, HNSW on FAISS's OpenMP threads; this class leaves both
    thread counts alone: a process that shares cores with other CPU work should set them at its
    entry point (``OPENBLAS_NUM_THREADS`` / ``OMP_NUM_THREADS`` or ``faiss.omp_set_num_threads``);
    spinning OpenMP threads on busy cores slow small batches ~10x.
    """

    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        *,
        n_views: int = 0,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        rebuild_fraction: float = 0.25,
    ) -> None:
        if kind not in KINDS:
            raise IndexStoreError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        for name, value, low in (
            ("dim", dim, 1),
            ("n_views", n_views, 0),
            ("hnsw_m", hnsw_m, 2),
            ("ef_construction", ef_construction, 1),
            ("ef_search", ef_search, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise IndexStoreError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 < rebuild_fraction < 1.0:
            raise IndexStoreError(f"rebuild_fraction must be in (0, 1), got {rebuild_fraction!r}")
        self.dim = dim
        self.kind = kind
        self.n_views = n_views
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.rebuild_fraction = rebuild_fraction
        self._lock = threading.RLock()
        self._size = 0
        self._ids: list[str] = []  # slot -> id
        self._slot_of: dict[str, int] = {}
        self._payloads: list[dict[str, Any]] = []  # slot -> payload
        self._views = np.empty((0, n_views, dim), dtype=np.float32)  # [capacity, n_views, dim]
        if kind == "flat":
            self._vectors = np.empty((0, dim), dtype=np.float32)  # [capacity, dim]
            self._scratch = Scratch()  # score buffers of the exact search, reused under the lock
        else:
            self._hnsw = self._new_graph()
            self._labels = np.empty(0, dtype=np.int64)  # slot -> graph entry
            self._owner = np.empty(0, dtype=np.int64)  # graph entry -> slot, -1 = tombstone

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._lock:
            return self._size

    def __contains__(self, listing_id: object) -> bool:
        with self._lock:
            return isinstance(listing_id, str) and listing_id in self._slot_of

    def __repr__(self) -> str:
        return f"LiveIndex(dim={self.dim}, kind={self.kind!r}, n_views={self.n_views}, len={len(self)})"

    @property
    def tombstones(self) -> int:
        """Dead graph entries awaiting a rebuild (always 0 for ``flat``)."""
        with self._lock:
            return 0 if self.kind == "flat" else self._hnsw.ntotal - self._size

    def ids(self) -> list[str]:
        """Every listing id in the index, in no particular order."""
        with self._lock:
            return list(self._ids)

    def get(self, listing_id: str) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None:
        """``(vector [dim], payload, views [n_views, dim] or None)`` copies, or None if absent."""
        with self._lock:
            slot = self._slot_of.get(listing_id)
            if slot is None:
                return None
            views = self._views[slot].copy() if self.n_views else None
            return self._vector(slot), copy.deepcopy(self._payloads[slot]), views

    def payload(self, listing_id: str) -> dict[str, Any] | None:
        """A copy of the payload stored with ``listing_id``, or None if absent."""
        with self._lock:
            slot = self._slot_of.get(listing_id)
            return None if slot is None else copy.deepcopy(self._payloads[slot])

    def views(self, ids: Sequence[str]) -> np.ndarray:
        """Per-view vectors ``[len(ids), n_views, dim]``; IndexStoreError for an unknown id."""
        ids = _check_ids(ids, "views")
        with self._lock:
            missing = [i for i in ids if i not in self._slot_of]
            if missing:
                raise IndexStoreError(f"views: unknown listing ids {missing[:5]}")
            slots = np.fromiter((self._slot_of[i] for i in ids), dtype=np.int64, count=len(ids))
            return self._views[slots]

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[str | None] | None = None,
    ) -> list[list[Hit]]:
        """Top-``k`` ids by inner product for each query ``[nq, dim]``, best first.

        ``exclude[i]`` (usually the query listing itself) never appears in query i's hits. A
        query gets fewer than ``k`` hits when the index holds fewer listings.
        """
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise IndexStoreError(f"search: k must be an int >= 1, got {k!r}")
        queries = _check_float(queries, (-1, self.dim), "search queries")
        nq = queries.shape[0]
        if exclude is None:
            exclude = [None] * nq
        elif isinstance(exclude, str) or len(exclude) != nq:
            raise IndexStoreError(f"search: exclude must be a sequence of {nq} ids or None")
        for e in exclude:
            if e is not None and not isinstance(e, str):
                raise IndexStoreError(f"search: exclude entries must be str or None, got {e!r}")
        with self._lock:
            if nq == 0:
                return []
            if self._size == 0:
                return [[] for _ in range(nq)]
            if self.kind == "flat":
                return self._search_flat(queries, k, exclude)
            return self._search_hnsw(queries, k, exclude)

    # ----------------------------------------------------------------- mutating

    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        payloads: Sequence[Mapping[str, Any]] | None = None,
        views: np.ndarray | None = None,
    ) -> None:
        """Insert or replace listings: ``vectors [n, dim]``, ``views [n, n_views, dim]``.

        A replaced id keeps nothing of its old entry (a missing payload becomes ``{}``), so
        applying the same record twice leaves the index as applying it once.
        """
        ids = _check_ids(ids, "upsert")
        n = len(ids)
        if len(set(ids)) != n:
            raise IndexStoreError("upsert: duplicate ids in one call")
        vectors = _check_float(vectors, (n, self.dim), "upsert vectors")
        if self.n_views:
            if views is None:
                raise IndexStoreError(
                    f"upsert: this index keeps {self.n_views} views per id; views are required"
                )
            views = _check_float(views, (n, self.n_views, self.dim), "upsert views")
        elif views is not None:
            raise IndexStoreError("upsert: views given, but the index was created with n_views=0")
        if payloads is None:
            kept = [{} for _ in range(n)]
        else:
            if isinstance(payloads, Mapping) or len(payloads) != n:
                raise IndexStoreError(f"upsert: payloads must be a sequence of {n} mappings")
            kept = [_check_payload(p, i) for p, i in zip(payloads, ids)]
        if n == 0:
            return
        with self._lock:
            self._upsert(ids, vectors, kept, views)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove listings; returns how many were present. Unknown ids are ignored."""
        ids = _check_ids(ids, "delete")
        with self._lock:
            removed = 0
            for listing_id in dict.fromkeys(ids):
                slot = self._slot_of.get(listing_id)
                if slot is not None:
                    self._remove_slot(slot)
                    removed += 1
            if removed:
                self._after_delete()
            return removed

    # ---------------------------------------------------------------- snapshots

    def snapshot(self, directory: str | Path, offsets: Mapping[int, int]) -> Path:
        """Atomically write the whole index and the topic ``offsets`` it reflects.

        ``offsets`` maps partition -> next offset to apply. Returns the snapshot directory. The
        lock is held while writing, so the snapshot is consistent with ``offsets``.
        """
        clean: dict[str, int] = {}
        for partition, offset in offsets.items():
            for value in (partition, offset):
                if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                    raise IndexStoreError(
                        f"snapshot: offsets must map int >= 0 to int >= 0, got {partition!r}: {offset!r}"
                    )
            clean[str(int(partition))] = int(offset)
        with self._lock:
            n = self._size
            meta: dict[str, Any] = {
                "kind": self.kind,
                "dim": self.dim,
                "n_views": self.n_views,
                "params": self._params(),
                "count": n,
                "ids": self._ids,
                "payloads": self._payloads,
                "offsets": clean,
            }
            arrays = {"vectors.npy": self._all_vectors(), "views.npy": self._views[:n]}
            writers = {}
            if self.kind == "hnsw":
                arrays["hnsw_slots.npy"] = self._owner[: self._hnsw.ntotal]
                graph = self._hnsw
                writers["hnsw.faiss"] = lambda path: faiss.write_index(graph, str(path))
            return write_snapshot(directory, meta, arrays, writers)

    @classmethod
    def load(cls, directory: str | Path) -> tuple[LiveIndex, dict[int, int]]:
        """Read the committed snapshot under ``directory``: ``(index, partition -> next offset)``."""
        snap = SnapshotReader(directory)
        meta = snap.meta
        try:
            kind, dim, n_views, count = meta["kind"], meta["dim"], meta["n_views"], meta["count"]
            params = dict(meta["params"])
            ids, payloads = meta["ids"], meta["payloads"]
            offsets = {int(p): int(o) for p, o in dict(meta["offsets"]).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise snap.corrupt(f"meta.json lacks or garbles a field: {e!r}") from e
        if not isinstance(count, int) or not isinstance(ids, list) or not isinstance(payloads, list):
            raise snap.corrupt("count/ids/payloads have the wrong type")
        if len(ids) != count or len(payloads) != count:
            raise snap.corrupt(f"{len(ids)} ids and {len(payloads)} payloads for count {count}")
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != count:
            raise snap.corrupt("ids must be unique non-empty strings")
        if any(not isinstance(p, dict) for p in payloads):
            raise snap.corrupt("payloads must be JSON objects")
        try:
            index = cls(dim, kind, n_views=n_views, **params)
        except (IndexStoreError, TypeError) as e:
            raise snap.corrupt(f"bad index parameters: {e}") from e
        views = snap.array("views.npy", np.dtype(np.float32), (count, n_views, dim))
        index._ids = ids
        index._slot_of = {listing_id: slot for slot, listing_id in enumerate(ids)}
        index._payloads = payloads
        index._views = views
        index._size = count
        if kind == "flat":
            index._vectors = snap.array("vectors.npy", np.dtype(np.float32), (count, dim))
        else:
            snap.verified("vectors.npy")
            index._restore_graph(snap)
        return index, offsets

    @classmethod
    def load_or_create(
        cls,
        directory: str | Path,
        dim: int,
        kind: str = "flat",
        n_views: int = 0,
        **params: Any,
    ) -> tuple[LiveIndex, dict[int, int]]:
        """Load the snapshot under ``directory``, or a new empty index and ``{}`` if there is none.

        A snapshot whose dim, kind or n_views differ from what is asked is an IndexStoreError
        (re-embed and rebuild rather than mix spaces). ``params`` go to the constructor of a new
        index; a loaded one keeps the parameters it was saved with.
        """
        if not has_snapshot(directory):
            return cls(dim, kind, n_views=n_views, **params), {}
        index, offsets = cls.load(directory)
        asked = {"dim": dim, "kind": kind, "n_views": n_views}
        found = {"dim": index.dim, "kind": index.kind, "n_views": index.n_views}
        if asked != found:
            raise IndexStoreError(f"index snapshot in {directory} is {found}, but {asked} was asked")
        return index, offsets

    # ---------------------------------------------------------------- internals

    def _params(self) -> dict[str, Any]:
        return {
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "rebuild_fraction": self.rebuild_fraction,
        }

    def _new_graph(self) -> faiss.IndexHNSWFlat:
        graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.ef_construction
        graph.hnsw.efSearch = self.ef_search
        return graph

    def _vector(self, slot: int) -> np.ndarray:
        if self.kind == "flat":
            return self._vectors[slot].copy()
        return self._hnsw.reconstruct(int(self._labels[slot]))

    def _all_vectors(self) -> np.ndarray:
        """Live vectors in slot order, ``[len, dim]`` (a view for flat, a copy for hnsw)."""
        if self.kind == "flat":
            return self._vectors[: self._size]
        if self._size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._hnsw.reconstruct_batch(self._labels[: self._size])

    def _upsert(
        self,
        ids: list[str],
        vectors: np.ndarray,
        payloads: list[dict[str, Any]],
        views: np.ndarray | None,
    ) -> None:
        n = len(ids)
        slots = np.empty(n, dtype=np.int64)
        fresh = 0
        for row, listing_id in enumerate(ids):
            slot = self._slot_of.get(listing_id)
            if slot is None:
                slot = self._size + fresh
                fresh += 1
                self._slot_of[listing_id] = slot
                self._ids.append(listing_id)
                self._payloads.append(payloads[row])
            else:
                self._payloads[slot] = payloads[row]
            slots[row] = slot
        used, self._size = self._size, self._size + fresh
        self._views = _grow(self._views, used, self._size)
        if views is not None:
            self._views[slots] = views
        if self.kind == "flat":
            self._vectors = _grow(self._vectors, used, self._size)
            self._vectors[slots] = vectors
            return
        # HNSW: the old entries of replaced ids become tombstones; every row is a new entry.
        self._labels = _grow(self._labels, used, self._size)
        replaced = slots[slots < used]
        self._owner[self._labels[replaced]] = -1
        first = self._hnsw.ntotal
        self._hnsw.add(vectors)
        self._owner = _grow(self._owner, first, first + n)
        self._owner[first : first + n] = slots
        self._labels[slots] = np.arange(first, first + n, dtype=np.int64)
        self._maybe_rebuild()

    def _remove_slot(self, slot: int) -> None:
        """Drop one slot, moving the last slot into the hole so slots stay dense."""
        last = self._size - 1
        listing_id = self._ids[slot]
        del self._slot_of[listing_id]
        if self.kind == "hnsw":
            self._owner[self._labels[slot]] = -1
        if slot != last:
            moved = self._ids[last]
            self._ids[slot] = moved
            self._slot_of[moved] = slot
            self._payloads[slot] = self._payloads[last]
            self._views[slot] = self._views[last]
            if self.kind == "flat":
                self._vectors[slot] = self._vectors[last]
            else:
                self._labels[slot] = self._labels[last]
                self._owner[self._labels[slot]] = slot
        self._ids.pop()
        self._payloads.pop()
        self._size = last

    def _after_delete(self) -> None:
        self._views = _shrink(self._views, self._size)
        if self.kind == "flat":
            self._vectors = _shrink(self._vectors, self._size)
        else:
            self._labels = _shrink(self._labels, self._size)
            self._maybe_rebuild()

    def _maybe_rebuild(self) -> None:
        total = self._hnsw.ntotal
        if total - self._size <= self.rebuild_fraction * total:
            return
        live = self._all_vectors()  # [len, dim], slot order
        graph = self._new_graph()
        if self._size:
            graph.add(live)
        self._hnsw = graph
        self._labels = np.arange(max(self._size, _MIN_CAPACITY), dtype=np.int64)
        self._owner = np.arange(max(self._size, _MIN_CAPACITY), dtype=np.int64)

    def _restore_graph(self, snap: SnapshotReader) -> None:
        path = snap.verified("hnsw_slots.npy")
        try:
            owner = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise snap.corrupt(f"cannot load hnsw_slots.npy: {e}") from e
        graph_path = snap.verified("hnsw.faiss")
        try:
            graph = faiss.read_index(str(graph_path))
        except RuntimeError as e:
            raise snap.corrupt(f"cannot read hnsw.faiss: {e}") from e
        if (
            not isinstance(graph, faiss.IndexHNSWFlat)
            or graph.d != self.dim
            or graph.metric_type != faiss.METRIC_INNER_PRODUCT
        ):
            raise snap.corrupt("hnsw.faiss is not an inner-product HNSW graph of this dim")
        if owner.dtype != np.int64 or owner.shape != (graph.ntotal,):
            raise snap.corrupt(
                f"hnsw_slots.npy is {owner.dtype}{list(owner.shape)} for a graph of {graph.ntotal}"
            )
        live = np.flatnonzero(owner >= 0)
        if live.size != self._size or not np.array_equal(np.sort(owner[live]), np.arange(self._size)):
            raise snap.corrupt("hnsw_slots.npy does not map the graph onto the listing ids")
        labels = np.empty(self._size, dtype=np.int64)
        labels[owner[live]] = live
        graph.hnsw.efSearch = self.ef_search
        self._hnsw = graph
        self._owner = np.ascontiguousarray(owner)
        self._labels = labels

    def _search_flat(
        self, queries: np.ndarray, k: int, exclude: Sequence[str | None]
    ) -> list[list[Hit]]:
        extra = any(e is not None and e in self._slot_of for e in exclude)
        want = min(k + extra, self._size)
        matrix = self._vectors[: self._size]  # a contiguous view: read in place, no copy per batch
        scores, slots = top_k_inner_product(queries, matrix, want, scratch=self._scratch)
        return [self._hits(scores[q], slots[q], k, exclude[q]) for q in range(len(queries))]

    def _hits(self, scores: np.ndarray, slots: np.ndarray, k: int, exclude: str | None) -> list[Hit]:
        hits: list[Hit] = []
        for score, slot in zip(scores.tolist(), slots.tolist()):
            if slot < 0:
                continue
            listing_id = self._ids[slot]
            if listing_id == exclude:
                continue
            hits.append(Hit(listing_id, score))
            if len(hits) == k:
                break
        return hits

    def _search_hnsw(
        self, queries: np.ndarray, k: int, exclude: Sequence[str | None]
    ) -> list[list[Hit]]:
        # Tombstoned graph entries are filtered inside the graph walk by faiss's ID selector, so
        # every query gets up to k live neighbours (one more when it excludes a listing).
        live = np.packbits(self._owner >= 0, bitorder="little")  # kept alive through the search
        selector = faiss.IDSelectorBitmap(len(self._owner), faiss.swig_ptr(live))
        params = faiss.SearchParametersHNSW(sel=selector, efSearch=self.ef_search)
        extra = any(e is not None and e in self._slot_of for e in exclude)
        fetch = min(self._size, k + extra)
        scores, labels = self._hnsw.search(queries, fetch, params=params)
        slots = np.where(labels >= 0, self._owner[np.maximum(labels, 0)], -1)
        return [self._hits(scores[q], slots[q], k, exclude[q]) for q in range(len(queries))]
