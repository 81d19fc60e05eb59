"""The live index: string listing ids -> searched vectors, payloads and per-view vectors.

Storage is a set of parallel "slot" arrays: ``_ids[slot]``, ``_payloads[slot]`` (compact JSON
bytes: a dict per listing cost three times as much memory) and, for kind ``"flat"``, the searched
vectors ``_vectors`` (a :class:`~samestyle.index_store.rows.VectorRows`, row = slot);
``_slot_of`` maps an id to its slot. Slots are dense (``0 .. len-1``): deleting swaps the last
slot into the hole, so every operation is O(dim) per id and an exact search runs on one contiguous
``[len, dim]`` view of the rows without copying it (:func:`~samestyle.index_store.exact.top_k_inner_product`:
numpy GEMMs over blocks of rows and a threshold selection).

Views live in one :class:`VectorRows` pool per view: ``_view_of[slot, view]`` is the view's row in
its pool, or :data:`ABSENT` (an all-zero view: a listing without an image) or :data:`SEARCHED` (the
view equals the searched vector, as the image+text view does) when ``sparse_views`` stores no row
for it; ``_view_owner[view][row]`` is the slot of a pool row. Pools are dense too (a freed row is
filled with the pool's last one).

Kind ``"hnsw"`` keeps the searched vectors in a ``faiss.IndexHNSWFlat`` instead (one copy in
memory, not two); ``_labels[slot]`` is the graph entry of a slot and ``_owner[label]`` the slot of a
graph entry, -1 for a tombstone. See :class:`LiveIndex` for the trade-offs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from samestyle.index_store.exact import Scratch
from samestyle.index_store.rows import FORMS, SQ8_TRAIN_ROWS, VectorRows, check_encodable, grow, shrink
from samestyle.index_store.snapshot import SnapshotReader, has_snapshot, write_snapshot
from samestyle.topics.errors import IndexStoreError

KINDS = ("flat", "hnsw")
#: ``_view_of`` entries that name no pool row: the view is all zeros, or equals the searched vector.
ABSENT = -1
SEARCHED = -2
#: A view within this of the searched vector in every component is stored as SEARCHED: an encoder
#: that normalises the image+text sum of a text-only listing can give its text view back 1 ulp off.
SAME_VIEW_ATOL = 1e-6
_MIN_CAPACITY = 16
#: Listings re-encoded per step when a snapshot is converted to another vector form.
_CONVERT_CHUNK = 65536


@dataclass(frozen=True)
class Hit:
    """One search result: a listing id and its inner-product score with the query."""

    listing_id: str
    score: float


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


def _payload_json(payload: Any, listing_id: str) -> str:
    """The payload as compact JSON text, or IndexStoreError."""
    if not isinstance(payload, Mapping):
        raise IndexStoreError(
            f"payload of {listing_id!r} must be a mapping, got {type(payload).__name__}"
        )
    if not all(isinstance(key, str) for key in payload):
        raise IndexStoreError(f"payload of {listing_id!r} must have str keys")
    try:
        return json.dumps(dict(payload), allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise IndexStoreError(f"payload of {listing_id!r} is not JSON-serialisable: {e}") from e


def _check_payload(payload: Any, listing_id: str) -> dict[str, Any]:
    """A JSON round-trip copy, so what is kept is exactly what a snapshot restores."""
    return json.loads(_payload_json(payload, listing_id))


def _payload_bytes(payload: Any, listing_id: str) -> bytes:
    """The payload as the index keeps it: compact UTF-8 JSON (reads and snapshots return exactly it)."""
    text = _payload_json(payload, listing_id)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: JSON's \u escapes carry it
        return json.dumps(json.loads(text), separators=(",", ":")).encode("ascii")


class LiveIndex:
    """A mutable inner-product index of listings keyed by string listing id.

    ``kind="flat"`` (default) is exact: brute-force inner product over a contiguous matrix,
    correct after any interleaving of upserts and deletes, at about 0.8 of the speed of numpy's
    matrix product of the same shapes for float32 (``index_store/exact.py``); use it up to a few
    million vectors per shard.

    ``vectors`` is the form the flat index stores every vector in (the searched one and the
    views): ``"float32"`` (default, as given), ``"float16"`` (half the memory) or ``"sq8"`` (faiss's
    8-bit scalar quantiser, a quarter; the first ``sq8_train_rows`` vectors of each kind are kept
    in float32 and then set its ranges: ``index_store/rows.py``). The compact forms are lossy:
    searches, scores, :meth:`get` and :meth:`views` see the decoded vectors (recall against float32:
    docs/SCALING.md). ``sparse_views`` (default: on for the compact forms, off for float32) stores
    no vector for an all-zero view (a listing without an image) nor for a view equal to the
    searched vector (within :data:`SAME_VIEW_ATOL`); reads give back zeros and the searched vector.

    ``kind="hnsw"`` is approximate (``faiss.IndexHNSWFlat``, inner product, float32 vectors only)
    for larger catalogues: search is sub-linear, but recall is below 1 and depends on
    ``ef_search``; it works best on L2-normalised vectors (cosine), which is what the encoders
    emit. HNSW cannot remove entries, so a delete or a replacement tombstones the old graph entry;
    searches skip tombstones inside the graph walk (a faiss ``IDSelectorBitmap`` of live entries),
    and once tombstones exceed ``rebuild_fraction`` of the graph it is rebuilt from the live
    vectors. That rebuild runs inside the mutating call and costs a full build (seconds per 100k
    vectors) with, briefly, the old and the new graph in memory. Inserts are also slower than flat
    (graph linking).

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
        vectors: str = "float32",
        sparse_views: bool | None = None,
        sq8_train_rows: int = SQ8_TRAIN_ROWS,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        rebuild_fraction: float = 0.25,
    ) -> None:
        if kind not in KINDS:
            raise IndexStoreError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        if vectors not in FORMS:
            raise IndexStoreError(f"unknown vector form {vectors!r}; expected one of {FORMS}")
        if kind == "hnsw" and vectors != "float32":
            raise IndexStoreError(f"vectors={vectors!r} needs kind='flat': the HNSW graph keeps float32 vectors")
        for name, value, low in (
            ("dim", dim, 1),
            ("n_views", n_views, 0),
            ("sq8_train_rows", sq8_train_rows, 1),
            ("hnsw_m", hnsw_m, 2),
            ("ef_construction", ef_construction, 1),
            ("ef_search", ef_search, 1),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise IndexStoreError(f"{name} must be an int >= {low}, got {value!r}")
        if not 0.0 < rebuild_fraction < 1.0:
            raise IndexStoreError(f"rebuild_fraction must be in (0, 1), got {rebuild_fraction!r}")
        if sparse_views is not None and not isinstance(sparse_views, bool):
            raise IndexStoreError(f"sparse_views must be a bool or None, got {sparse_views!r}")
        self.dim = dim
        self.kind = kind
        self.n_views = n_views
        self.vectors = vectors
        self.sparse_views = vectors != "float32" if sparse_views is None else sparse_views
        self.sq8_train_rows = sq8_train_rows
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.rebuild_fraction = rebuild_fraction
        self._lock = threading.RLock()
        self._size = 0
        self._ids: list[str] = []  # slot -> id
        self._slot_of: dict[str, int] = {}
        self._payloads: list[bytes] = []  # slot -> compact JSON
        self._view_rows = [self._new_rows() for _ in range(n_views)]
        self._view_of = np.empty((0, n_views), dtype=np.int32)  # [capacity, n_views] slot -> pool row
        self._view_owner = [np.empty(0, dtype=np.int32) for _ in range(n_views)]  # pool row -> slot
        if kind == "flat":
            self._vectors = self._new_rows()  # row = slot
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
        return (f"LiveIndex(dim={self.dim}, kind={self.kind!r}, n_views={self.n_views}, "
                f"vectors={self.vectors!r}, len={len(self)})")

    @property
    def tombstones(self) -> int:
        """Dead graph entries awaiting a rebuild (always 0 for ``flat``)."""
        with self._lock:
            return 0 if self.kind == "flat" else self._hnsw.ntotal - self._size

    @property
    def vector_bytes(self) -> int:
        """Bytes of the stored vectors and views in use, with the view maps (not the HNSW graph)."""
        with self._lock:
            total = sum(rows.nbytes for rows in self._view_rows)
            total += self._size * self.n_views * 2 * np.dtype(np.int32).itemsize
            if self.kind == "flat":
                total += self._vectors.nbytes
            return total

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
            slots = np.array([slot], dtype=np.int64)
            views = self._views_of(slots)[0] if self.n_views else None
            return self._vectors_of(slots)[0], json.loads(self._payloads[slot]), views

    def payload(self, listing_id: str) -> dict[str, Any] | None:
        """A copy of the payload stored with ``listing_id``, or None if absent."""
        with self._lock:
            slot = self._slot_of.get(listing_id)
            return None if slot is None else json.loads(self._payloads[slot])

    def views(self, ids: Sequence[str]) -> np.ndarray:
        """Per-view vectors ``[len(ids), n_views, dim]``; IndexStoreError for an unknown id."""
        ids = _check_ids(ids, "views")
        with self._lock:
            missing = [i for i in ids if i not in self._slot_of]
            if missing:
                raise IndexStoreError(f"views: unknown listing ids {missing[:5]}")
            slots = np.fromiter((self._slot_of[i] for i in ids), dtype=np.int64, count=len(ids))
            return self._views_of(slots)

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
        check_encodable(self.vectors, vectors, "upsert vectors")
        if views is not None:
            check_encodable(self.vectors, views, "upsert views")
        if payloads is None:
            kept = [b"{}"] * n
        else:
            if isinstance(payloads, Mapping) or len(payloads) != n:
                raise IndexStoreError(f"upsert: payloads must be a sequence of {n} mappings")
            kept = [_payload_bytes(p, i) for p, i in zip(payloads, ids)]
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
        lock is held while writing, so the snapshot is consistent with ``offsets``. Vectors are
        written in their stored form (layout: docs/INTERNALS.md).
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
                "offsets": clean,
            }
            arrays: dict[str, np.ndarray] = {"view_rows.npy": self._view_of[:n]}
            if self.kind == "flat":
                self._add_rows(arrays, "vectors", self._vectors)
            else:
                arrays["vectors.npy"] = self._all_vectors()
                arrays["hnsw_slots.npy"] = self._owner[: self._hnsw.ntotal]
            for view, rows in enumerate(self._view_rows):
                self._add_rows(arrays, f"views-{view}", rows)
            payloads = self._payloads

            def write_payloads(path: Path) -> None:
                with open(path, "wb") as f:
                    for payload in payloads:
                        f.write(payload)
                        f.write(b"\n")

            writers = {"payloads.jsonl": write_payloads}
            if self.kind == "hnsw":
                graph = self._hnsw
                writers["hnsw.faiss"] = lambda path: faiss.write_index(graph, str(path))
            return write_snapshot(directory, meta, arrays, writers)

    @classmethod
    def load(cls, directory: str | Path, *, vectors: str | None = None) -> tuple[LiveIndex, dict[int, int]]:
        """Read the committed snapshot under ``directory``: ``(index, partition -> next offset)``.

        ``vectors`` (None: as saved) asks for a vector form: a float32 snapshot is converted to a
        compact one (re-encoded here, both in memory meanwhile); a compact snapshot cannot become
        another form (its float32 vectors are gone): IndexStoreError.
        """
        snap = SnapshotReader(directory)
        meta = snap.meta
        try:
            kind, dim, n_views, count = meta["kind"], meta["dim"], meta["n_views"], meta["count"]
            params = dict(meta["params"])
            ids = meta["ids"]
            offsets = {int(p): int(o) for p, o in dict(meta["offsets"]).items()}
        except (KeyError, TypeError, ValueError) as e:
            raise snap.corrupt(f"meta.json lacks or garbles a field: {e!r}") from e
        if not isinstance(count, int) or not isinstance(ids, list):
            raise snap.corrupt("count/ids have the wrong type")
        if len(ids) != count:
            raise snap.corrupt(f"{len(ids)} ids for count {count}")
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != count:
            raise snap.corrupt("ids must be unique non-empty strings")
        try:
            index = cls(dim, kind, n_views=n_views, **params)
        except (IndexStoreError, TypeError) as e:
            raise snap.corrupt(f"bad index parameters: {e}") from e
        index._ids = ids
        index._slot_of = {listing_id: slot for slot, listing_id in enumerate(ids)}
        index._size = count
        if snap.version == 1:
            index._restore_v1(snap, meta)
        else:
            index._restore(snap)
        if kind == "hnsw":
            snap.verified("vectors.npy")
            index._restore_graph(snap)
        if vectors is not None and vectors != index.vectors:
            if index.vectors != "float32":
                raise IndexStoreError(
                    f"index snapshot in {directory} stores {index.vectors} vectors and {vectors} was asked: "
                    f"a compact snapshot cannot be converted (its float32 vectors are gone); set the vector "
                    f"form back to {index.vectors!r}, or remove the snapshot to rebuild the index from the log")
            index = index._converted(vectors)
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
        (re-embed and rebuild rather than mix spaces); one of another vector form is converted or
        refused as :meth:`load` says. ``params`` go to the constructor of a new index; a loaded
        one keeps the other parameters it was saved with.
        """
        if not has_snapshot(directory):
            return cls(dim, kind, n_views=n_views, **params), {}
        index, offsets = cls.load(directory, vectors=params.get("vectors"))
        asked = {"dim": dim, "kind": kind, "n_views": n_views}
        found = {"dim": index.dim, "kind": index.kind, "n_views": index.n_views}
        if asked != found:
            raise IndexStoreError(f"index snapshot in {directory} is {found}, but {asked} was asked")
        return index, offsets

    # ---------------------------------------------------------------- internals

    def _params(self) -> dict[str, Any]:
        return {
            "vectors": self.vectors,
            "sparse_views": self.sparse_views,
            "sq8_train_rows": self.sq8_train_rows,
            "hnsw_m": self.hnsw_m,
            "ef_construction": self.ef_construction,
            "ef_search": self.ef_search,
            "rebuild_fraction": self.rebuild_fraction,
        }

    def _new_rows(self) -> VectorRows:
        return VectorRows(self.dim, self.vectors, train_rows=self.sq8_train_rows)

    def _new_graph(self) -> faiss.IndexHNSWFlat:
        graph = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = self.ef_construction
        graph.hnsw.efSearch = self.ef_search
        return graph

    def _vectors_of(self, slots: np.ndarray) -> np.ndarray:
        """Searched vectors of ``slots``: ``[len(slots), dim]`` float32 copies."""
        if self.kind == "flat":
            return self._vectors.decode(slots)
        if slots.size == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._hnsw.reconstruct_batch(self._labels[slots])

    def _views_of(self, slots: np.ndarray) -> np.ndarray:
        """Views of ``slots``: ``[len(slots), n_views, dim]`` float32 (zeros for absent ones)."""
        out = np.zeros((slots.size, self.n_views, self.dim), dtype=np.float32)
        for view, rows in enumerate(self._view_rows):
            where = self._view_of[slots, view]
            stored = where >= 0
            if stored.any():
                out[stored, view] = rows.decode(where[stored])
            searched = where == SEARCHED
            if searched.any():
                out[searched, view] = self._vectors_of(slots[searched])
        return out

    def _all_vectors(self) -> np.ndarray:
        """Live searched vectors in slot order, ``[len, dim]`` float32."""
        if self.kind == "flat":
            return self._vectors.all()
        return self._vectors_of(np.arange(self._size, dtype=np.int64))

    def _view_states(self, vectors: np.ndarray, views: np.ndarray) -> np.ndarray:
        """``[n, n_views]``: 0 for a view to store, ABSENT / SEARCHED for one stored by no row."""
        states = np.zeros(views.shape[:2], dtype=np.int32)
        if self.sparse_views:
            states[(np.abs(views - vectors[:, None, :]) <= SAME_VIEW_ATOL).all(axis=2)] = SEARCHED
            states[~views.any(axis=2)] = ABSENT
        return states

    def _upsert(
        self,
        ids: list[str],
        vectors: np.ndarray,
        payloads: list[bytes],
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
        replaced = slots < used  # [n]; the fresh rows' slots run used, used+1, ... in row order
        self._view_of = grow(self._view_of, used, self._size)
        self._view_of[used : self._size] = ABSENT
        if views is not None:
            self._upsert_views(slots, self._view_states(vectors, views), views)
        if self.kind == "flat":
            if replaced.any():
                self._vectors.put(slots[replaced], vectors[replaced])
            if fresh:
                self._vectors.append(vectors[~replaced])
            return
        # HNSW: the old entries of replaced ids become tombstones; every row is a new entry.
        self._labels = grow(self._labels, used, self._size)
        self._owner[self._labels[slots[replaced]]] = -1
        first = self._hnsw.ntotal
        self._hnsw.add(vectors)
        self._owner = grow(self._owner, first, first + n)
        self._owner[first : first + n] = slots
        self._labels[slots] = np.arange(first, first + n, dtype=np.int64)
        self._maybe_rebuild()

    def _upsert_views(self, slots: np.ndarray, states: np.ndarray, views: np.ndarray) -> None:
        """Point every view of ``slots`` at its new value: in place where a pool row stays, a new
        row where one is needed, none (and the old one freed) for an absent or searched view."""
        for view, rows in enumerate(self._view_rows):
            store = states[:, view] == 0
            old = self._view_of[slots, view]
            in_place = store & (old >= 0)
            if in_place.any():
                rows.put(old[in_place], views[in_place, view])
            for slot in slots[~store & (old >= 0)].tolist():
                self._free_view_row(view, int(self._view_of[slot, view]))
            self._view_of[slots[~store], view] = states[~store, view]
            added = store & (old < 0)
            if added.any():
                new_rows = rows.append(views[added, view])
                self._view_owner[view] = grow(self._view_owner[view], int(new_rows[0]), len(rows))
                self._view_owner[view][new_rows] = slots[added]
                self._view_of[slots[added], view] = new_rows

    def _free_view_row(self, view: int, row: int) -> None:
        """Drop pool row ``row`` of ``view``, moving the pool's last row into the hole."""
        rows, owner = self._view_rows[view], self._view_owner[view]
        last = len(rows) - 1
        if row != last:
            rows.move(last, row)
            moved = int(owner[last])
            owner[row] = moved
            self._view_of[moved, view] = row
        rows.truncate(last)

    def _remove_slot(self, slot: int) -> None:
        """Drop one slot, moving the last slot into the hole so slots stay dense."""
        last = self._size - 1
        listing_id = self._ids[slot]
        del self._slot_of[listing_id]
        for view in range(self.n_views):
            row = int(self._view_of[slot, view])
            if row >= 0:
                self._free_view_row(view, row)
        if self.kind == "hnsw":
            self._owner[self._labels[slot]] = -1
        if slot != last:
            moved = self._ids[last]
            self._ids[slot] = moved
            self._slot_of[moved] = slot
            self._payloads[slot] = self._payloads[last]
            self._view_of[slot] = self._view_of[last]
            for view in range(self.n_views):
                row = int(self._view_of[slot, view])
                if row >= 0:
                    self._view_owner[view][row] = slot
            if self.kind == "flat":
                self._vectors.move(last, slot)
            else:
                self._labels[slot] = self._labels[last]
                self._owner[self._labels[slot]] = slot
        if self.kind == "flat":
            self._vectors.truncate(last)
        self._ids.pop()
        self._payloads.pop()
        self._size = last

    def _after_delete(self) -> None:
        self._view_of = shrink(self._view_of, self._size)
        for view, rows in enumerate(self._view_rows):
            rows.shrink()
            self._view_owner[view] = shrink(self._view_owner[view], len(rows))
        if self.kind == "flat":
            self._vectors.shrink()
        else:
            self._labels = shrink(self._labels, self._size)
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

    def _converted(self, vectors: str) -> LiveIndex:
        """A copy of this float32 index with every vector re-encoded in ``vectors``."""
        params = {**self._params(), "vectors": vectors, "sparse_views": None}
        other = type(self)(self.dim, self.kind, n_views=self.n_views, **params)
        for start in range(0, self._size, _CONVERT_CHUNK):
            stop = min(self._size, start + _CONVERT_CHUNK)
            slots = np.arange(start, stop, dtype=np.int64)
            views = self._views_of(slots) if self.n_views else None
            other._upsert(self._ids[start:stop], self._vectors_of(slots), self._payloads[start:stop], views)
        return other

    # ------------------------------------------------------------ snapshot I/O

    @staticmethod
    def _add_rows(arrays: dict[str, np.ndarray], name: str, rows: VectorRows) -> None:
        codes, trained = rows.state()
        arrays[f"{name}.npy"] = codes
        if trained is not None:
            arrays[f"{name}.sq8.npy"] = trained

    def _load_rows(self, snap: SnapshotReader, name: str, count: int | None) -> VectorRows:
        codes = snap.load_array(f"{name}.npy")
        trained = snap.load_array(f"{name}.sq8.npy") if f"{name}.sq8.npy" in snap.files else None
        if count is not None and codes.shape[:1] != (count,):
            raise snap.corrupt(f"{name}.npy holds {codes.shape[:1]} rows for {count} listings")
        try:
            return VectorRows.restore(self.dim, self.vectors, codes, trained, train_rows=self.sq8_train_rows)
        except IndexStoreError as e:
            raise snap.corrupt(f"{name}: {e}") from e

    def _restore(self, snap: SnapshotReader) -> None:
        count = self._size
        path = snap.verified("payloads.jsonl")
        try:
            lines = path.read_bytes().split(b"\n")
        except OSError as e:
            raise snap.corrupt(f"cannot read payloads.jsonl: {e}") from e
        if len(lines) != count + 1 or lines[-1] != b"" or any(not line.startswith(b"{") for line in lines[:-1]):
            raise snap.corrupt(f"payloads.jsonl does not hold {count} JSON objects, one a line")
        self._payloads = lines[:-1]
        view_of = snap.array("view_rows.npy", np.dtype(np.int32), (count, self.n_views))
        pools = [self._load_rows(snap, f"views-{view}", None) for view in range(self.n_views)]
        owners = []
        for view, rows in enumerate(pools):
            column = view_of[:, view]
            stored = np.flatnonzero(column >= 0)
            if (np.any((column < 0) & (column != ABSENT) & (column != SEARCHED)) or stored.size != len(rows)
                    or not np.array_equal(np.sort(column[stored]), np.arange(len(rows)))):
                raise snap.corrupt(f"view_rows.npy does not map view {view} onto its {len(rows)} rows")
            owner = np.empty(len(rows), dtype=np.int32)
            owner[column[stored]] = stored
            owners.append(owner)
        self._view_of, self._view_rows, self._view_owner = np.ascontiguousarray(view_of), pools, owners
        if self.kind == "flat":
            self._vectors = self._load_rows(snap, "vectors", count)

    def _restore_v1(self, snap: SnapshotReader, meta: Mapping[str, Any]) -> None:
        """A format-1 snapshot: float32 vectors, dense float32 views, payloads inside meta.json."""
        count = self._size
        payloads = meta.get("payloads")
        if not isinstance(payloads, list) or len(payloads) != count or any(not isinstance(p, dict) for p in payloads):
            raise snap.corrupt(f"payloads must be {count} JSON objects")
        self._payloads = [_payload_bytes(p, i) for p, i in zip(payloads, self._ids)]
        views = snap.array("views.npy", np.dtype(np.float32), (count, self.n_views, self.dim))
        every = np.arange(count, dtype=np.int32)
        self._view_of = np.repeat(every[:, None], self.n_views, axis=1)  # dense: pool row = slot
        self._view_rows = [VectorRows.restore(self.dim, "float32", np.ascontiguousarray(views[:, view]), None)
                           for view in range(self.n_views)]
        self._view_owner = [every.copy() for _ in range(self.n_views)]
        if self.kind == "flat":
            self._vectors = VectorRows.restore(
                self.dim, "float32", snap.array("vectors.npy", np.dtype(np.float32), (count, self.dim)), None)

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

    # ------------------------------------------------------------------ search

    def _search_flat(
        self, queries: np.ndarray, k: int, exclude: Sequence[str | None]
    ) -> list[list[Hit]]:
        extra = any(e is not None and e in self._slot_of for e in exclude)
        want = min(k + extra, self._size)
        scores, slots = self._vectors.search(queries, want, self._scratch)
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
