"""The index backend contract, and its in-process FAISS implementation.

An :class:`IndexBackend` holds one collection per model version (vectors of two models never mix),
keyed by listing id: idempotent upserts and deletes by id, top-``k`` inner-product search over the
searched vector with an optional supplier filter, per-listing payloads and view vectors, one
*active* version that searches default to (the blue/green switch flips it in one step), and
:meth:`IndexBackend.ready`. :class:`VersionView` reads one version with :class:`LiveIndex`'s
reading methods, so code written against a live index (the search step, the search API) reads a
backend unchanged. Two implementations:

* :class:`FaissBackend` (default): one :class:`~samestyle.index_store.live.LiveIndex` per version
  in this process, exactly the replica's storage.
* :class:`~samestyle.index_store.milvus.MilvusBackend`: Milvus collections through ``pymilvus``
  (Milvus Lite for a local file URI, a Milvus standalone or cluster for ``http://`` URIs).

:func:`~samestyle.index_store.factory.create_backend` builds one by name. Inputs are checked here, at the boundary, the way
:class:`LiveIndex` checks them; bad input is an :class:`~samestyle.topics.errors.IndexStoreError`, and
a server that cannot be reached (Milvus down or restarting) is its subclass
:class:`IndexUnavailableError`: the one a caller may retry.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from samestyle.index_store.live import KINDS, Hit, LiveIndex, _check_ids
from samestyle.topics.errors import IndexStoreError

BACKENDS = ("faiss", "milvus")

#: The payload key the supplier filter reads.
SUPPLIER_KEY = "supplier_id"


class IndexUnavailableError(IndexStoreError):
    """The index server cannot be reached now (down, restarting): the call may be retried."""


@runtime_checkable
class IndexBackend(Protocol):
    """Per-model-version listing indexes behind one interface (see the module docstring)."""

    name: str

    def versions(self) -> list[str]:
        """Every version that has a collection, in no particular order."""

    def ensure(self, version: str, dim: int) -> None:
        """Create ``version``'s collection if it has none; IndexStoreError if its dim differs."""

    def drop(self, version: str) -> None:
        """Remove ``version``'s collection (nothing if absent). The active version cannot be dropped."""

    @property
    def active(self) -> str | None:
        """The version searches default to, None before the first :meth:`switch`."""

    def switch(self, version: str) -> None:
        """Make ``version`` active in one step (its collection must exist)."""

    def ready(self) -> bool:
        """True when a search on the active version would be answered now."""

    def count(self, version: str) -> int:
        """Listings in ``version``'s collection (0 if it has none)."""

    def upsert(self, version: str, ids: Sequence[str], vectors: np.ndarray, *,
               payloads: Sequence[Mapping[str, Any]] | None = None, views: np.ndarray | None = None) -> None:
        """Insert or replace ``ids`` (``vectors [n, dim]``, ``views [n, n_views, dim]``); creates the
        collection on first use. Replaying a batch leaves the collection as applying it once."""

    def flush(self, version: str) -> None:
        """Make written rows cheap to search (Milvus seals a segment; FAISS has nothing to do)."""

    def delete(self, ids: Sequence[str], version: str | None = None) -> int:
        """Remove ``ids`` from ``version``, or from every version when None; returns how many
        distinct ids were present anywhere it looked."""

    def search(self, queries: np.ndarray, k: int, *, version: str | None = None,
               exclude: Sequence[str | None] | None = None,
               suppliers: Sequence[str | None] | None = None) -> list[list[Hit]]:
        """Top-``k`` by inner product per query ``[nq, dim]``, best first, in ``version`` (default:
        the active one). ``exclude[i]`` never appears in query i's hits; ``suppliers[i]``, when not
        None, keeps only listings whose payload names that supplier."""

    def get(self, listing_id: str, version: str | None = None
            ) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None:
        """``(vector [dim], payload, views [n_views, dim] or None)``, or None if absent."""

    def payload(self, listing_id: str, version: str | None = None) -> dict[str, Any] | None:
        """A copy of the payload stored with ``listing_id``, or None if absent."""

    def views(self, ids: Sequence[str], version: str | None = None) -> np.ndarray:
        """Per-view vectors ``[len(ids), n_views, dim]``; IndexStoreError for an unknown id."""

    def payloads(self, ids: Sequence[str], version: str | None = None) -> dict[str, dict[str, Any]]:
        """Copies of the payloads of those ``ids`` that are present (one request on Milvus)."""

    def ids(self, version: str) -> list[str]:
        """Every listing id in ``version``'s collection, in no particular order ([] if it has none)."""

    def close(self) -> None:
        """Release connections (the FAISS backend has none)."""


def check_version(version: Any) -> str:
    if not isinstance(version, str) or not version:
        raise IndexStoreError(f"model version must be a non-empty str, got {version!r}")
    return version


def check_suppliers(suppliers: Sequence[str | None] | None, nq: int) -> list[str | None]:
    if suppliers is None:
        return [None] * nq
    if isinstance(suppliers, str) or len(suppliers) != nq:
        raise IndexStoreError(f"search: suppliers must be a sequence of {nq} str/None or None")
    for s in suppliers:
        if s is not None and not isinstance(s, str):
            raise IndexStoreError(f"search: supplier entries must be str or None, got {s!r}")
    return list(suppliers)


class FaissBackend:
    """One in-process :class:`LiveIndex` per version: the default backend, the replica's storage.

    The supplier filter searches ``k``, then ever more neighbours (doubling) until ``k`` of them
    are the supplier's or the index is exhausted, so on ``kind="flat"`` it is exact.
    """

    name = "faiss"

    def __init__(self, kind: str = "flat", n_views: int = 0, **params: Any) -> None:
        if kind not in KINDS:
            raise IndexStoreError(f"unknown index kind {kind!r}; expected one of {KINDS}")
        self.kind = kind
        self.n_views = n_views
        self.params = params
        self.indexes: dict[str, LiveIndex] = {}
        self._active: str | None = None

    def __repr__(self) -> str:
        return f"FaissBackend(kind={self.kind!r}, versions={ {v: len(i) for v, i in self.indexes.items()} })"

    def versions(self) -> list[str]:
        return list(self.indexes)

    def ensure(self, version: str, dim: int) -> None:
        version = check_version(version)
        index = self.indexes.get(version)
        if index is None:
            self.indexes[version] = LiveIndex(dim, self.kind, n_views=self.n_views, **self.params)
        elif index.dim != dim:
            raise IndexStoreError(f"model {version}: vectors of dim {dim}, its index has dim {index.dim}")

    def drop(self, version: str) -> None:
        if version == self._active:
            raise IndexStoreError(f"cannot drop the active version {version!r}")
        self.indexes.pop(version, None)

    @property
    def active(self) -> str | None:
        return self._active

    def switch(self, version: str) -> None:
        if check_version(version) not in self.indexes:
            raise IndexStoreError(f"switch: no collection for version {version!r}")
        self._active = version

    def ready(self) -> bool:
        return self._active is not None and self._active in self.indexes

    def count(self, version: str) -> int:
        index = self.indexes.get(version)
        return 0 if index is None else len(index)

    def _index(self, version: str | None) -> LiveIndex | None:
        version = self._active if version is None else version
        if version is None:
            raise IndexStoreError("no version given and no active version")
        return self.indexes.get(version)

    def upsert(self, version: str, ids: Sequence[str], vectors: np.ndarray, *,
               payloads: Sequence[Mapping[str, Any]] | None = None, views: np.ndarray | None = None) -> None:
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            raise IndexStoreError("upsert vectors must be a 2-d numpy array [n, dim]")
        self.ensure(version, vectors.shape[1])
        self.indexes[version].upsert(ids, vectors, payloads=payloads, views=views)

    def flush(self, version: str) -> None:
        return None

    def delete(self, ids: Sequence[str], version: str | None = None) -> int:
        ids = _check_ids(ids, "delete")
        targets = list(self.indexes.values()) if version is None else [self.indexes.get(version)]
        present = {i for index in targets if index is not None for i in ids if i in index}
        for index in targets:
            if index is not None:
                index.delete(ids)
        return len(present)

    def search(self, queries: np.ndarray, k: int, *, version: str | None = None,
               exclude: Sequence[str | None] | None = None,
               suppliers: Sequence[str | None] | None = None) -> list[list[Hit]]:
        index = self._index(version)
        if index is None:
            return [[] for _ in range(len(queries))]
        wanted = check_suppliers(suppliers, len(queries))
        if all(s is None for s in wanted):
            return index.search(queries, k, exclude=exclude)
        exclude = [None] * len(queries) if exclude is None else list(exclude)
        out: list[list[Hit]] = []
        for q, supplier in enumerate(wanted):
            fetch = k
            while True:
                hits = index.search(queries[q:q + 1], fetch, exclude=[exclude[q]])[0]
                kept = hits if supplier is None else [
                    h for h in hits if (index.payload(h.listing_id) or {}).get(SUPPLIER_KEY) == supplier]
                if len(kept) >= k or len(hits) < fetch:
                    out.append(kept[:k])
                    break
                fetch *= 2
        return out

    def get(self, listing_id: str, version: str | None = None
            ) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None:
        index = self._index(version)
        return None if index is None else index.get(listing_id)

    def payload(self, listing_id: str, version: str | None = None) -> dict[str, Any] | None:
        index = self._index(version)
        return None if index is None else index.payload(listing_id)

    def views(self, ids: Sequence[str], version: str | None = None) -> np.ndarray:
        index = self._index(version)
        if index is None:
            raise IndexStoreError(f"views: no collection for version {version or self._active!r}")
        return index.views(ids)

    def payloads(self, ids: Sequence[str], version: str | None = None) -> dict[str, dict[str, Any]]:
        index = self._index(version)
        if index is None:
            return {}
        found = {i: index.payload(i) for i in dict.fromkeys(_check_ids(ids, "payloads"))}
        return {i: p for i, p in found.items() if p is not None}

    def ids(self, version: str) -> list[str]:
        index = self.indexes.get(version)
        return [] if index is None else index.ids()

    def close(self) -> None:
        return None


class VersionView:
    """One version of a backend, read through :class:`LiveIndex`'s reading methods (``len``, ``in``,
    ``search``, ``get``, ``payload``, ``views``, ``ids``) plus :meth:`payloads` for many ids in one
    request: what the search step and the search API read, whichever backend holds the index.
    Holds no state of its own (every call reads the backend), so threads may share it.
    """

    def __init__(self, backend: IndexBackend, version: str) -> None:
        self.backend = backend
        self.version = check_version(version)

    def __repr__(self) -> str:
        return f"VersionView({self.backend.name}, {self.version!r})"

    def __len__(self) -> int:
        return self.backend.count(self.version)

    def __contains__(self, listing_id: object) -> bool:
        return (isinstance(listing_id, str) and bool(listing_id)
                and bool(self.backend.payloads([listing_id], self.version)))

    def search(self, queries: np.ndarray, k: int, *, exclude: Sequence[str | None] | None = None,
               suppliers: Sequence[str | None] | None = None) -> list[list[Hit]]:
        return self.backend.search(queries, k, version=self.version, exclude=exclude, suppliers=suppliers)

    def payload(self, listing_id: str) -> dict[str, Any] | None:
        return self.backend.payload(listing_id, self.version)

    def payloads(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return self.backend.payloads(ids, self.version)

    def get(self, listing_id: str) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None:
        return self.backend.get(listing_id, self.version)

    def views(self, ids: Sequence[str]) -> np.ndarray:
        return self.backend.views(ids, self.version)

    def ids(self) -> list[str]:
        return self.backend.ids(self.version)


__all__ = ["BACKENDS", "SUPPLIER_KEY", "FaissBackend", "IndexBackend", "IndexUnavailableError", "VersionView",
           "check_suppliers", "check_version"]
