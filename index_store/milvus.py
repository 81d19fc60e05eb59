"""The Milvus index backend: one Milvus collection per model version, an alias for the active one.

``uri`` is a local ``*.db`` path for Milvus Lite (embedded: ``pymilvus`` runs a Milvus Lite
server in threads of this process, on that directory; the tests) or an ``http://host:port``
address: a ``milvus-lite server`` process (:func:`milvus_lite_server`; the benches), a Milvus
standalone or a cluster. ``pymilvus`` and ``milvus-lite`` are the optional
extra ``samestyle[milvus]``; this module imports them, ``samestyle.index_store`` does not.

Collection layout (per version, name ``{prefix}_m{hex of the version's UTF-8}``, so the version
is read back from the name; Milvus Lite keeps no collection description)::

    listing_id   VARCHAR primary key       upserts replace by id: a replay changes nothing
    supplier_id  VARCHAR                   the supplier filter (payload["supplier_id"])
    vector       FLOAT_VECTOR [dim]        the searched vector, index FLAT / metric IP (exact)
    views        FLOAT_VECTOR [n_views*dim] the per-view vectors, concatenated (never searched)
    payload      JSON

The active version is the alias ``{prefix}_active``: :meth:`MilvusBackend.switch` creates or
alters it, one metadata operation, so every searcher moves from one collection to the next at
once. Reads use ``consistency`` (default ``"Strong"``: a search sees every upsert acknowledged
before it; measured against ``"Bounded"`` in docs/SCALING.md).

Errors: a server that cannot be reached is :class:`~samestyle.index_store.backend.IndexUnavailableError`
(retry), any other Milvus error an :class:`~samestyle.topics.errors.IndexStoreError`. A collection
found released (the server restarted) is loaded again and the read retried, whichever client
restarted it. Several clients may create the same collection or alias at once (workers starting
together): the loser of the race uses the winner's.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pymilvus import DataType, MilvusClient, MilvusException

from samestyle.index_store.backend import SUPPLIER_KEY, IndexUnavailableError, check_suppliers, check_version
from samestyle.index_store.live import Hit, _check_float, _check_ids, _check_payload
from samestyle.topics.errors import IndexStoreError

log = logging.getLogger(__name__)

CONSISTENCY_LEVELS = ("Strong", "Bounded", "Session", "Eventually")
#: Longest listing or supplier id a collection accepts (VARCHAR max_length).
MAX_ID_LENGTH = 512
#: Upserts are sent in requests of about this many bytes (gRPC's default limit is 64 MiB).
_REQUEST_BYTES = 8 << 20
#: Milvus's largest ``limit`` for one search.
_MAX_LIMIT = 16384
#: Ids per read by id (``ids=`` becomes one ``in`` expression), and per page of :meth:`MilvusBackend.ids`.
_IDS_PER_READ = 1000
_IDS_PER_PAGE = 5000


#: Longest model version (UTF-8 bytes): its hex form must fit Milvus's 255-character names.
MAX_VERSION_BYTES = 100


#: Milvus Lite file path -> open backends on it: pymilvus starts one in-process server per file
#: and never stops it before exit; the last backend to close stops it.
_LITE_USERS: dict[str, int] = {}


def _lite_path(uri: str) -> str | None:
    return str(Path(uri).resolve()) if uri.endswith(".db") and "://" not in uri else None


class _Quiet(logging.Filter):
    """Drops what others log for conditions this module handles itself: pymilvus's ERROR with a
    traceback for every failed call (the error is raised here, translated, and its caller logs
    what it decides: retry, reload, give up), its warning that Milvus Lite has no timestamp
    service, and the in-process Milvus Lite server's traceback for ``AllocTimestamp`` (a call it
    does not implement; pymilvus falls back and results are right)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], NotImplementedError):
            return "AllocTimestamp" not in "".join(traceback.format_tb(record.exc_info[2]))
        message = record.getMessage()
        return not (message.startswith("RPC error:") or "failed to get mvccTs" in message)


_QUIET = _Quiet()


def collection_name(prefix: str, version: str) -> str:
    """The collection of ``version``: reversible (:func:`version_of`), letters and digits only."""
    raw = check_version(version).encode()
    if len(raw) > MAX_VERSION_BYTES:
        raise IndexStoreError(f"model version longer than {MAX_VERSION_BYTES} bytes: {version[:40]!r}")
    return f"{prefix}_m{raw.hex()}"


def version_of(prefix: str, name: str) -> str | None:
    """The version whose collection is ``name``, None for a collection not of this prefix."""
    head = f"{prefix}_m"
    if not name.startswith(head):
        return None
    try:
        return bytes.fromhex(name[len(head):]).decode()
    except ValueError:
        return None


def _literal(text: str) -> str:
    """A Milvus expression string literal (double-quoted, backslash escapes)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _message(e: MilvusException) -> str:
    return str(getattr(e, "message", None) or e)


def _unavailable(e: MilvusException) -> bool:
    """The server could not be reached (not: it answered with an error)."""
    code = getattr(e, "code", None)
    # 2: pymilvus's CONNECT_FAILED; a grpc.StatusCode when its retries ran out.
    if code == 2 or getattr(code, "name", None) in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return True
    text = _message(e).lower()
    return "server unavailable" in text or "failed to connect" in text or "connection refused" in text


def _released(e: MilvusException) -> bool:
    """A read on a collection that is not loaded (after a server restart)."""
    text = _message(e).lower()
    return getattr(e, "code", None) == 101 or "released" in text or "not loaded" in text


def _translated(e: MilvusException, what: str) -> IndexStoreError:
    if _unavailable(e):
        return IndexUnavailableError(f"milvus unavailable ({what}): {_message(e)}")
    return IndexStoreError(f"milvus ({what}): {_message(e)}")


class MilvusBackend:
    """:class:`~samestyle.index_store.backend.IndexBackend` on Milvus (see the module docstring).

    Reads (``search``, ``get``, ``views``, ``count``) may come from several threads at once (the
    gRPC channel is shared; the benches search from 32); writes and collection changes belong to
    one writer, as the replica's writes do.
    """

    name = "milvus"

    def __init__(self, uri: str, *, n_views: int = 0, prefix: str = "samestyle",
                 consistency: str = "Strong", token: str = "", flush_rows: int | None = None) -> None:
        if consistency not in CONSISTENCY_LEVELS:
            raise IndexStoreError(f"consistency must be one of {CONSISTENCY_LEVELS}, got {consistency!r}")
        if not prefix.replace("_", "").isalnum() or not prefix[0].isalpha():
            raise IndexStoreError(f"prefix must be letters, digits and _, starting with a letter: {prefix!r}")
        self.uri = uri
        self.n_views = n_views
        self.prefix = prefix
        self.consistency = consistency
        self.alias = f"{prefix}_active"
        self._token = token
        self._lite = _lite_path(uri)
        try:
            self._client = MilvusClient(uri=uri, token=token)
        except MilvusException as e:
            if self._lite is not None and (Path(self._lite) / "LOCK").exists():
                raise IndexStoreError(
                    f"Milvus Lite could not open {self._lite}: {_message(e)}. Milvus Lite is one process per "
                    "file; several workers share a `milvus-lite server --data-dir DIR --port PORT` (or a Milvus "
                    "standalone) through SAMESTYLE_MILVUS_URI=http://host:port") from e
            raise _translated(e, f"connecting to {uri}") from e
        if self._lite is not None:
            _LITE_USERS[self._lite] = _LITE_USERS.get(self._lite, 0) + 1
            logging.getLogger("grpc._server").addFilter(_QUIET)
        for name in ("pymilvus.decorators", "pymilvus.client.iterator.query_iterator"):
            logging.getLogger(name).addFilter(_QUIET)
        self._dims: dict[str, int] = {}  # version -> dim, of collections this instance has seen
        self._loaded: set[str] = set()
        #: Seal a collection's written rows into a segment after this many upserts (0: never).
        #: Milvus Lite searches unsealed rows by a slow scan (593 ms per query at 20k rows against
        #: 19-24 ms sealed, docs/SCALING.md): 5000 there. A Milvus server seals segments by itself
        #: and rate-limits flushes (a few per minute per collection by default): never there.
        if flush_rows is None:
            lite = str(self._rpc(self._client.get_server_version)).startswith("milvus_lite")
            flush_rows = 5000 if lite else 0
        self.flush_rows = flush_rows
        self._unflushed: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"MilvusBackend(uri={self.uri!r}, prefix={self.prefix!r}, consistency={self.consistency!r})"

    def _rpc(self, method: Any, *args: Any, **kwargs: Any) -> Any:
        """``method(*args, **kwargs)`` on the client, Milvus errors translated (module docstring)."""
        try:
            return method(*args, **kwargs)
        except MilvusException as e:
            raise _translated(e, getattr(method, "__name__", "call")) from e

    # ---------------------------------------------------------------- collections

    def _collections(self) -> dict[str, str]:
        """version -> collection name, for this prefix's collections."""
        out = {}
        for name in self._rpc(self._client.list_collections):
            version = version_of(self.prefix, name)
            if version:
                out[version] = name
        return out

    def versions(self) -> list[str]:
        """Every version with a collection; forgets what this instance knew of collections that
        another client dropped meanwhile."""
        found = self._collections()
        for version in [v for v in self._dims if v not in found]:
            del self._dims[version]
            self._loaded.discard(collection_name(self.prefix, version))
        return list(found)

    def _dim(self, version: str) -> int | None:
        if version in self._dims:
            return self._dims[version]
        name = collection_name(self.prefix, version)
        if not self._rpc(self._client.has_collection, name):
            return None
        for field in self._rpc(self._client.describe_collection, name)["fields"]:
            if field["name"] == "vector":
                self._dims[version] = int(field["params"]["dim"])
                return self._dims[version]
        raise IndexStoreError(f"collection {name} has no vector field")

    def ensure(self, version: str, dim: int) -> None:
        version = check_version(version)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise IndexStoreError(f"dim must be an int >= 1, got {dim!r}")
        found = self._dim(version)
        if found is not None:
            if found != dim:
                raise IndexStoreError(f"model {version}: vectors of dim {dim}, its collection has dim {found}")
            return
        schema = self._client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("listing_id", DataType.VARCHAR, is_primary=True, max_length=MAX_ID_LENGTH)
        schema.add_field(SUPPLIER_KEY, DataType.VARCHAR, max_length=MAX_ID_LENGTH)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        if self.n_views:
            schema.add_field("views", DataType.FLOAT_VECTOR, dim=self.n_views * dim)
        schema.add_field("payload", DataType.JSON)
        params = self._client.prepare_index_params()
        params.add_index(field_name="vector", index_type="FLAT", metric_type="IP")
        if self.n_views:
            # Milvus loads only indexed vector fields; FLAT stores them as they are.
            params.add_index(field_name="views", index_type="FLAT", metric_type="IP")
        name = collection_name(self.prefix, version)
        try:
            self._client.create_collection(name, schema=schema, index_params=params,
                                           consistency_level=self.consistency)
        except MilvusException as e:
            if _unavailable(e) or self._dim(version) is None:
                raise _translated(e, "create_collection") from e
            self.ensure(version, dim)  # another client created it first: check its dim
            return
        self._dims[version] = dim
        self._loaded.add(name)
        log.info("milvus: new collection %s for model %s (dim %d)", name, version, dim)

    def _name(self, version: str | None) -> str | None:
        """The collection of ``version`` (default: the active one), loaded; None if it has none."""
        if version is None:
            version = self.active
            if version is None:
                raise IndexStoreError("no version given and no active version")
        if self._dim(version) is None:
            return None
        name = collection_name(self.prefix, version)
        if name not in self._loaded:
            # A collection is released after the server restarts; searches need it in memory.
            self._rpc(self._client.load_collection, name)
            self._loaded.add(name)
        return name

    def drop(self, version: str) -> None:
        if version == self.active:
            raise IndexStoreError(f"cannot drop the active version {version!r}")
        name = collection_name(self.prefix, version)
        self._rpc(self._client.drop_collection, name)
        self._dims.pop(version, None)
        self._loaded.discard(name)

    def _aliases(self) -> list[str]:
        return list(self._rpc(self._client.list_aliases).get("aliases", []))

    @property
    def active(self) -> str | None:
        if self.alias not in self._aliases():
            return None
        return version_of(self.prefix, self._rpc(self._client.describe_alias, self.alias)["collection_name"])

    def switch(self, version: str) -> None:
        version = check_version(version)
        if self._dim(version) is None:
            raise IndexStoreError(f"switch: no collection for version {version!r}")
        name = collection_name(self.prefix, version)
        if self.alias in self._aliases():
            self._rpc(self._client.alter_alias, name, self.alias)
        else:
            try:
                self._client.create_alias(name, self.alias)
            except MilvusException as e:
                if _unavailable(e) or self.alias not in self._aliases():
                    raise _translated(e, "create_alias") from e
                self._rpc(self._client.alter_alias, name, self.alias)  # another client created it first
        log.info("milvus: alias %s -> %s (model %s)", self.alias, name, version)

    def release_active(self) -> None:
        """Remove the active alias (searches without a version then fail until the next switch)."""
        if self.alias in self._aliases():
            self._rpc(self._client.drop_alias, self.alias)

    def ready(self) -> bool:
        try:
            version = self.active
            if version is None:
                return False
            name = self._name(version)
            return name is not None and "Loaded" in str(self._rpc(self._client.get_load_state, name).get("state"))
        except IndexStoreError:
            return False

    def count(self, version: str) -> int:
        name = self._name(version)
        if name is None:
            return 0
        rows = self._call(self._client.query, name, filter="", output_fields=["count(*)"],
                          consistency_level=self.consistency)
        return int(rows[0]["count(*)"])

    def ids(self, version: str) -> list[str]:
        name = self._name(version)
        if name is None:
            return []
        pages = self._call(self._client.query_iterator, name, batch_size=_IDS_PER_PAGE, filter="",
                           output_fields=["listing_id"], consistency_level=self.consistency)
        out: list[str] = []
        try:
            while True:
                page = self._rpc(pages.next)
                if not page:
                    return out
                out.extend(r["listing_id"] for r in page)
        finally:
            pages.close()

    # ---------------------------------------------------------------- mutating

    def upsert(self, version: str, ids: Sequence[str], vectors: np.ndarray, *,
               payloads: Sequence[Mapping[str, Any]] | None = None, views: np.ndarray | None = None) -> None:
        ids = _check_ids(ids, "upsert")
        n = len(ids)
        if len(set(ids)) != n:
            raise IndexStoreError("upsert: duplicate ids in one call")
        if not isinstance(vectors, np.ndarray) or vectors.ndim != 2:
            raise IndexStoreError("upsert vectors must be a 2-d numpy array [n, dim]")
        dim = vectors.shape[1]
        vectors = _check_float(vectors, (n, dim), "upsert vectors")
        if self.n_views:
            if views is None:
                raise IndexStoreError(f"upsert: this backend keeps {self.n_views} views per id; views are required")
            views = _check_float(views, (n, self.n_views, dim), "upsert views").reshape(n, self.n_views * dim)
        elif views is not None:
            raise IndexStoreError("upsert: views given, but the backend was created with n_views=0")
        if payloads is None:
            kept: list[dict[str, Any]] = [{} for _ in range(n)]
        else:
            if isinstance(payloads, Mapping) or len(payloads) != n:
                raise IndexStoreError(f"upsert: payloads must be a sequence of {n} mappings")
            kept = [_check_payload(p, i) for p, i in zip(payloads, ids)]
        for listing_id, payload in zip(ids, kept):
            supplier = payload.get(SUPPLIER_KEY)
            if len(listing_id) > MAX_ID_LENGTH or (isinstance(supplier, str) and len(supplier) > MAX_ID_LENGTH):
                raise IndexStoreError(f"upsert: ids longer than {MAX_ID_LENGTH} characters: {listing_id[:40]!r}")
        if n == 0:
            return
        self.ensure(version, dim)
        name = self._name(version)
        assert name is not None
        per_request = max(1, _REQUEST_BYTES // (4 * dim * (1 + self.n_views) + 256))
        for start in range(0, n, per_request):
            rows = []
            for row in range(start, min(n, start + per_request)):
                supplier = kept[row].get(SUPPLIER_KEY)
                entry = {"listing_id": ids[row], SUPPLIER_KEY: supplier if isinstance(supplier, str) else "",
                         "vector": vectors[row], "payload": kept[row]}
                if self.n_views:
                    entry["views"] = views[row]  # type: ignore[index]
                rows.append(entry)
            self._rpc(self._client.upsert, name, rows)
        self._unflushed[name] = self._unflushed.get(name, 0) + n
        if self.flush_rows and self._unflushed[name] >= self.flush_rows:
            self.flush(version)

    def flush(self, version: str) -> None:
        """Seal ``version``'s written rows (searches get faster; nothing changes in what they see)."""
        name = collection_name(self.prefix, version)
        if self._dim(version) is not None:
            self._rpc(self._client.flush, name)
        self._unflushed[name] = 0

    def delete(self, ids: Sequence[str], version: str | None = None) -> int:
        ids = list(dict.fromkeys(_check_ids(ids, "delete")))
        if not ids:
            return 0
        versions = self.versions() if version is None else [version]
        present: set[str] = set()
        for v in versions:
            name = self._name(v)
            if name is None:
                continue
            for start in range(0, len(ids), _IDS_PER_READ):
                chunk = ids[start:start + _IDS_PER_READ]
                found = self._call(self._client.query, name, ids=chunk, output_fields=["listing_id"],
                                   consistency_level=self.consistency)
                present.update(r["listing_id"] for r in found)
                self._rpc(self._client.delete, name, ids=chunk)
        return len(present)

    # ---------------------------------------------------------------- reading

    def search(self, queries: np.ndarray, k: int, *, version: str | None = None,
               exclude: Sequence[str | None] | None = None,
               suppliers: Sequence[str | None] | None = None) -> list[list[Hit]]:
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise IndexStoreError(f"search: k must be an int >= 1, got {k!r}")
        if not isinstance(queries, np.ndarray) or queries.ndim != 2:
            raise IndexStoreError("search queries must be a 2-d numpy array [nq, dim]")
        nq = queries.shape[0]
        wanted = check_suppliers(suppliers, nq)
        if exclude is None:
            exclude = [None] * nq
        elif isinstance(exclude, str) or len(exclude) != nq:
            raise IndexStoreError(f"search: exclude must be a sequence of {nq} ids or None")
        name = self._target(version)
        if nq == 0:
            return []
        if name is None:
            return [[] for _ in range(nq)]
        dim = self._dims[version] if version is not None else queries.shape[1]
        queries = _check_float(queries, (nq, dim), "search queries")
        limit = min(k + (1 if any(e is not None for e in exclude) else 0), _MAX_LIMIT)
        out: list[list[Hit]] = [[] for _ in range(nq)]
        groups: dict[str | None, list[int]] = {}
        for q, supplier in enumerate(wanted):
            groups.setdefault(supplier, []).append(q)
        for supplier, rows in groups.items():
            expr = "" if supplier is None else f"{SUPPLIER_KEY} == {_literal(supplier)}"
            found = self._call(self._client.search, name, data=[queries[q] for q in rows], limit=limit,
                               filter=expr, anns_field="vector", search_params={"metric_type": "IP"},
                               output_fields=[], consistency_level=self.consistency)
            for q, hits in zip(rows, found):
                kept = [Hit(h["listing_id"] if "listing_id" in h else h["id"], float(h["distance"]))
                        for h in hits]
                out[q] = [h for h in kept if h.listing_id != exclude[q]][:k]
        return out

    def _target(self, version: str | None) -> str | None:
        """What to read: the alias for the active version (the server resolves it, so a switch by
        another client is seen at once), else ``version``'s collection (None if it has none)."""
        return self.alias if version is None else self._name(version)

    def _call(self, method: Any, name: str, **kwargs: Any) -> Any:
        """A read ``method(name, **kwargs)`` of a collection or the alias: a collection found
        released (the server restarted) is loaded and the read tried once more; Milvus errors are
        translated (module docstring)."""
        try:
            return method(name, **kwargs)
        except MilvusException as e:
            if _unavailable(e) or not _released(e):
                suffix = " (no active version?)" if name == self.alias and not _unavailable(e) else ""
                raise _translated(e, getattr(method, "__name__", "read") + suffix) from e
        if name == self.alias:
            version = self.active
            if version is None:
                raise IndexStoreError("milvus: no active version")
            loaded = collection_name(self.prefix, version)
        else:
            loaded = name
        self._rpc(self._client.load_collection, loaded)
        self._loaded.add(loaded)
        return self._rpc(method, name, **kwargs)

    def _rows(self, ids: list[str], version: str | None, fields: list[str]) -> dict[str, dict[str, Any]]:
        name = self._target(version)
        if name is None:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for start in range(0, len(ids), _IDS_PER_READ):
            rows = self._call(self._client.query, name, ids=ids[start:start + _IDS_PER_READ],
                              output_fields=["listing_id", *fields], consistency_level=self.consistency)
            out.update((r["listing_id"], r) for r in rows)
        return out

    def get(self, listing_id: str, version: str | None = None
            ) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None] | None:
        _check_ids([listing_id], "get")
        fields = ["vector", "payload"] + (["views"] if self.n_views else [])
        row = self._rows([listing_id], version, fields).get(listing_id)
        if row is None:
            return None
        vector = np.asarray(row["vector"], dtype=np.float32)
        views = np.asarray(row["views"], dtype=np.float32).reshape(self.n_views, -1) if self.n_views else None
        return vector, dict(row["payload"]), views

    def payload(self, listing_id: str, version: str | None = None) -> dict[str, Any] | None:
        row = self._rows(_check_ids([listing_id], "payload"), version, ["payload"]).get(listing_id)
        return None if row is None else dict(row["payload"])

    def payloads(self, ids: Sequence[str], version: str | None = None) -> dict[str, dict[str, Any]]:
        ids = list(dict.fromkeys(_check_ids(ids, "payloads")))
        if not ids:
            return {}
        return {i: dict(row["payload"]) for i, row in self._rows(ids, version, ["payload"]).items()}

    def views(self, ids: Sequence[str], version: str | None = None) -> np.ndarray:
        ids = _check_ids(ids, "views")
        if not self.n_views:
            raise IndexStoreError("views: the backend was created with n_views=0")
        rows = self._rows(list(dict.fromkeys(ids)), version, ["views"])
        missing = [i for i in ids if i not in rows]
        if missing:
            raise IndexStoreError(f"views: unknown listing ids {missing[:5]}")
        flat = np.stack([np.asarray(rows[i]["views"], dtype=np.float32) for i in ids])  # [n, n_views*dim]
        return flat.reshape(len(ids), self.n_views, -1)

    def close(self) -> None:
        try:
            self._client.close()
        except MilvusException as e:  # closing a channel to a server that is gone
            log.debug("milvus: close: %s", e)
        if self._lite is not None:
            users = _LITE_USERS.get(self._lite, 1) - 1
            if users > 0:
                _LITE_USERS[self._lite] = users
            else:
                _LITE_USERS.pop(self._lite, None)
                from milvus_lite.server_manager import server_manager_instance

                server_manager_instance.release_server(self._lite)
            self._lite = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def milvus_lite_server(data_dir: str | Path, port: int | None = None,
                       timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Run ``milvus-lite server`` on ``data_dir`` as its own process: ``(uri, process)``.

    A file URI runs Milvus Lite inside the process that opens it (its data then counts in that
    process's memory, and a second process must not open the same file); a server process is
    what several workers share, as they would share a Milvus standalone. Killed on exit.
    """
    port = free_port() if port is None else port
    proc = subprocess.Popen([sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir),
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise IndexStoreError(f"milvus-lite server exited with {proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise IndexStoreError(f"milvus-lite server did not listen within {timeout} s") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        proc.kill()
        proc.wait()


__all__ = ["CONSISTENCY_LEVELS", "MAX_ID_LENGTH", "MAX_VERSION_BYTES", "MilvusBackend", "collection_name", "free_port", "milvus_lite_server", "version_of"]
