"""One live index per model version, and the rule that switches a worker from one to the next.

Vectors of different models never mix: :class:`ModelIndexes` keeps one :class:`LiveIndex` per model
version (the FAISS replica); :class:`CollectionIndexes` is the same over the collections of a shared
backend (Milvus), where the alias is the active version. Exactly one is *active* (searches, the search API and the pairs agent use it);
:meth:`ModelIndexes.try_switch` makes the target active once it holds every listing the active one
holds, then drops the old index. Deletes apply to every index. Snapshots are crash-consistent:
``MODELS.json`` is replaced atomically after every index is written (layout: docs/INTERNALS.md).
Format 2 of ``MODELS.json`` adds the model switch's record (:mod:`~samestyle.streams.switch.record`);
format 1 (no ``format`` key, no record) is still read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from samestyle.index_store import IndexBackend, LiveIndex
from samestyle.index_store.backend import VersionView
from samestyle.streams.switch.record import SwitchRecord
from samestyle.topics.errors import IndexStoreError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.streams.worker.pipeline import EmbeddingUpdate

log = logging.getLogger(__name__)

MODELS_FILE = "MODELS.json"
#: The format ``MODELS.json`` is written in (2: with the switch record); a file without a
#: ``format`` key is format 1.
MODELS_FORMAT = 2
#: The formats of ``MODELS.json`` this code reads.
MODELS_READ_FORMATS = (1, 2)


def _subdir(version: str) -> str:
    return "m-" + hashlib.sha1(version.encode()).hexdigest()[:16]



def last_ops(updates: Sequence[EmbeddingUpdate], versions: set[str]) -> dict[str, dict[str, EmbeddingUpdate | None]]:
    """Per version of ``versions`` and listing, the last record of ``updates`` (None: deleted).
    A delete applies to every version; an upsert to each version it carries vectors of."""
    final: dict[str, dict[str, EmbeddingUpdate | None]] = {v: {} for v in versions}
    for update in updates:
        if update.op == "DELETE":
            for ops in final.values():
                ops[update.listing_id] = None
        else:
            for version in update.vectors:
                if version in final:
                    final[version][update.listing_id] = update
    return final

class ModelIndexes:
    """The per-version indexes of one replica. Not thread-safe across writers: one applier."""

    def __init__(self, kind: str, n_views: int, indexes: dict[str, LiveIndex] | None = None,
                 active: str | None = None, retired: set[str] | None = None, vectors: str = "float32") -> None:
        self.kind = kind
        self.n_views = n_views
        #: The vector form of new indexes (``LiveIndex(vectors=...)``, ``SAMESTYLE_INDEX_VECTORS``).
        self.vectors = vectors
        self.indexes: dict[str, LiveIndex] = dict(indexes or {})
        #: The version searches use; None until the replica has read the log at start-up once.
        self.active = active
        #: Versions switched away from: their vectors (records still in flight from workers that
        #: had not switched yet, or a replay) are ignored, never a new index.
        self.retired: set[str] = set(retired or ())
        #: The model switch's record read from the snapshot (None: none, or a format 1 snapshot).
        self.switch_record: SwitchRecord | None = None

    @property
    def active_index(self) -> LiveIndex | None:
        return self.indexes.get(self.active) if self.active is not None else None

    def index_for(self, version: str, dim: int) -> LiveIndex:
        index = self.indexes.get(version)
        if index is None:
            index = LiveIndex(dim, self.kind, n_views=self.n_views, vectors=self.vectors)
            self.indexes[version] = index
            log.info("new index for model %s (dim %d)", version, dim)
        elif index.dim != dim:
            raise IndexStoreError(f"model {version}: vectors of dim {dim}, its index has dim {index.dim}")
        return index

    def apply(self, updates: Sequence[EmbeddingUpdate]) -> None:
        """Bring every index to the state the updates describe (idempotent, like a replay).

        A delete applies to every version; an upsert to each version it carries vectors of. Per
        version and listing, the last record wins (a key's records are in order within a
        partition).
        """
        versions = set(self.indexes) | {v for u in updates for v in u.vectors if v not in self.retired}
        for version, ops in last_ops(updates, versions).items():
            deletes = [listing_id for listing_id, u in ops.items() if u is None]
            upserts = [u for u in ops.values() if u is not None]
            if deletes and version in self.indexes:
                self.indexes[version].delete(deletes)
            if upserts:
                views = np.stack([u.vectors[version] for u in upserts])  # [n, 3, dim]
                self.index_for(version, views.shape[2]).upsert(
                    [u.listing_id for u in upserts], views[:, -1], payloads=[u.payload_for(version) for u in upserts],
                    views=views)

    def lacking(self, target: str) -> list[str]:
        """The listings of the active index the ``target`` index does not hold (yet)."""
        active = self.active_index
        if active is None or target == self.active:
            return []
        index = self.indexes.get(target)
        if index is None:
            return active.ids()
        return [listing_id for listing_id in active.ids() if listing_id not in index]

    def missing(self, target: str) -> int:
        """How many listings of the active index the ``target`` index still lacks."""
        return len(self.lacking(target))

    def try_switch(self, target: str, force: bool = False) -> bool:
        """Make ``target`` active if its index is complete (or ``force``); drop the other indexes.
        True if switched."""
        if target == self.active:
            return False
        active = self.active_index
        if not force and active is not None and len(active) > 0:
            index = self.indexes.get(target)
            if index is None or len(index) < len(active) or self.missing(target):
                return False
        previous = self.active
        self.active = target
        self.retired |= set(self.indexes) - {target}
        if previous is not None:
            self.retired.add(previous)
        self.retired.discard(target)
        self.indexes = {target: self.indexes[target]} if target in self.indexes else {}
        log.info("switched the index from model %s to %s (%d listings)", previous, target,
                 len(self.indexes.get(target, ())))
        return True

    def choose_active(self, target: str, order: Mapping[str, int]) -> str:
        """After the first read of the log: which index to serve from.

        The target when its index holds every listing any index holds (or no index exists);
        otherwise (a switch was under way when this worker started) the version with the most
        listings, newest first on a tie, and the switch resumes from there.
        """
        everything: set[str] = set()
        for index in self.indexes.values():
            everything.update(index.ids())
        target_index = self.indexes.get(target)
        if not everything or (target_index is not None and everything <= set(target_index.ids())):
            self.active = target
        else:
            self.active = max(self.indexes, key=lambda v: (len(self.indexes[v]), order.get(v, -1)))
        return self.active

    # ---------------------------------------------------------------- snapshots

    def snapshot(self, root: Path, offsets: Mapping[int, int], switch: SwitchRecord | None = None) -> None:
        """Write every index, then ``MODELS.json`` (with ``switch``, the switch's record) atomically."""
        root.mkdir(parents=True, exist_ok=True)
        written = {}
        for version, index in list(self.indexes.items()):
            index.snapshot(root / _subdir(version), offsets)
            written[version] = _subdir(version)
        meta: dict[str, object] = {"format": MODELS_FORMAT, "active": self.active, "indexes": written,
                                   "retired": sorted(self.retired)}
        if switch is not None:
            meta["switch"] = switch.to_json()
        tmp = root / f".{MODELS_FILE}.tmp"
        tmp.write_text(json.dumps(meta, indent=1))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, root / MODELS_FILE)
        for stale in root.glob("m-*"):
            if stale.is_dir() and stale.name not in written.values():
                shutil.rmtree(stale, ignore_errors=True)

    @classmethod
    def load(cls, root: Path, kind: str, n_views: int,
             vectors: str = "float32") -> tuple[ModelIndexes, dict[int, int]]:
        """The snapshot set under ``root`` (empty and ``{}`` if there is none), with the switch's
        record in ``switch_record``.

        The offsets returned are the smallest per partition over the indexes: replaying from
        there is harmless (the last record per listing wins) and loses nothing. A switch record
        that does not parse is logged and ignored (the indexes are intact; the decision log decides).
        """
        path = root / MODELS_FILE
        if not path.is_file():
            return cls(kind, n_views, vectors=vectors), {}
        try:
            meta = json.loads(path.read_text())
            active, subdirs, retired = meta["active"], dict(meta["indexes"]), set(meta.get("retired", ()))
            form = meta.get("format", 1)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise IndexStoreError(f"{path} is not a model index set: {e!r}") from e
        if form not in MODELS_READ_FORMATS or isinstance(form, bool):
            raise IndexStoreError(f"{path} has format {form!r}; this code reads formats "
                                  f"{', '.join(map(str, MODELS_READ_FORMATS))}")
        switch = None
        if meta.get("switch") is not None:
            try:
                switch = SwitchRecord.from_json(meta["switch"])
            except (TypeError, ValueError) as e:
                log.error("%s: the model switch record is ignored: %s", path, e)
        indexes: dict[str, LiveIndex] = {}
        offsets: dict[int, int] = {}
        for version, subdir in subdirs.items():
            index, index_offsets = LiveIndex.load(root / subdir, vectors=vectors)  # converts float32
            if index.kind != kind or index.n_views != n_views:
                raise IndexStoreError(f"index snapshot {root / subdir} is {index.kind}/{index.n_views} views, "
                                      f"but {kind}/{n_views} was asked")
            indexes[version] = index
            for p, o in index_offsets.items():
                offsets[p] = min(o, offsets.get(p, o))
        loaded = cls(kind, n_views, indexes, active, retired, vectors=vectors)
        loaded.switch_record = switch
        return loaded, offsets


def load_active_snapshot(root: Path) -> tuple[LiveIndex, dict[int, int], str]:
    """The active index of a snapshot set, its offsets and its model version (tests, tools)."""
    meta = json.loads((root / MODELS_FILE).read_text())
    index, offsets = LiveIndex.load(root / meta["indexes"][meta["active"]])
    return index, offsets, meta["active"]




class CollectionIndexes:
    """The per-version collections of a shared index backend (Milvus), with :class:`ModelIndexes`'
    surface and switch rule, for workers that hold no replica.

    Every worker writes the records its index agent consumes and reads what every worker wrote, so
    nothing here is this worker's alone: ``active`` follows the backend's alias (:meth:`refresh`
    reads it again: another worker may have switched), and ``indexes`` maps each version that has a
    collection to a :class:`~samestyle.index_store.backend.VersionView` of it. A version is written
    when it has a collection, is the active one or the ``target``, or is newer than the active one
    in the decision log's ``order``, so a record of a version switched away from (and dropped) never brings its
    collection back; a switch never goes to an older version unless forced. Every call is blocking
    I/O: callers run it off the event loop, one writer at a time.
    """

    def __init__(self, backend: IndexBackend, order: Callable[[], Mapping[str, int]] | None = None) -> None:
        self.backend = backend
        self._order = order or dict
        self.indexes: dict[str, VersionView] = {}
        #: The version searches use: the alias's, or one chosen before its collection exists.
        self.active: str | None = None
        #: Chosen as active while it had no collection: the alias moves there with its first write.
        self._pending: str | None = None

    @property
    def active_index(self) -> VersionView | None:
        return self.indexes.get(self.active) if self.active is not None else None

    def refresh(self) -> None:
        """Read the collections and the alias again (and point the alias at a pending choice
        whose collection now exists)."""
        self.indexes = {v: self.indexes.get(v) or VersionView(self.backend, v) for v in self.backend.versions()}
        if self._pending is not None and self._pending in self.indexes:
            self.backend.switch(self._pending)
            self._pending = None
        if self._pending is None:
            alias = self.backend.active
            if alias is not None:
                self.active = alias

    def _rank(self, version: str | None) -> int:
        return -1 if version is None else self._order().get(version, -1)

    def writable(self, version: str, target: str | None) -> bool:
        return version in self.indexes or version in (target, self.active) or (
            self.active is not None and self._rank(version) > self._rank(self.active))

    def apply(self, updates: Sequence[EmbeddingUpdate], target: str | None = None) -> None:
        """Bring the collections to the state the updates describe (idempotent, like a replay): a
        delete removes the listing from every version, an upsert writes each writable version it
        carries vectors of; per version and listing the last record wins."""
        self.refresh()
        versions = set(self.indexes) | {v for u in updates for v in u.vectors if self.writable(v, target)}
        for version, ops in last_ops(updates, versions).items():
            deletes = [listing_id for listing_id, u in ops.items() if u is None]
            upserts = [u for u in ops.values() if u is not None]
            if deletes and version in self.indexes:
                self.backend.delete(deletes, version)
            if upserts:
                views = np.stack([u.vectors[version] for u in upserts])  # [n, 3, dim]
                self.backend.upsert(version, [u.listing_id for u in upserts], views[:, -1],
                                    payloads=[u.payload_for(version) for u in upserts], views=views)
                if version not in self.indexes:
                    self.indexes[version] = VersionView(self.backend, version)
        if self._pending is not None and self._pending in self.indexes:
            self.refresh()

    def _held_by(self, target: str, version: str) -> list[str]:
        """The listings of ``version`` that ``target``'s collection does not hold."""
        held = set(self.backend.ids(target)) if target in self.indexes else set()
        return [i for i in self.backend.ids(version) if i not in held]

    def lacking(self, target: str) -> list[str]:
        """The listings of the active collection the ``target`` collection does not hold (yet)."""
        if self.active is None or target == self.active or self.active not in self.indexes:
            return []
        return self._held_by(target, self.active)

    def missing(self, target: str) -> int:
        """How many listings the target collection holds fewer than the active one (counts, not the
        id comparison of :meth:`lacking`: this runs every few seconds during a switch)."""
        if self.active is None or target == self.active or self.active not in self.indexes:
            return 0
        return max(0, self.backend.count(self.active) - self.backend.count(target))

    def try_switch(self, target: str, force: bool = False) -> bool:
        """Point the alias at ``target`` if its collection holds every listing of the active one and
        it is not older than the active version (or ``force``). True if switched. The collection
        switched away from stays until it is dropped (:meth:`older`)."""
        self.refresh()
        if target == self.active:
            return False
        if not force:
            if target not in self.indexes or self._rank(target) < self._rank(self.active):
                return False
            if self.active in self.indexes and self.backend.count(self.active) > 0 and (
                    self.backend.count(target) < self.backend.count(self.active) or self.lacking(target)):
                return False
        previous, self.active = self.active, target
        if target in self.indexes:
            self.backend.switch(target)
            self._pending = None
        else:
            self._pending = target
        log.info("switched the index from model %s to %s (%d listings)", previous, target,
                 self.backend.count(target))
        return True

    def choose_active(self, target: str, order: Mapping[str, int]) -> str:
        """At start-up: the alias's version when there is one; else :meth:`ModelIndexes.choose_active`'s
        rule over the collections (the target when none exists yet: the alias follows its first write)."""
        self.refresh()
        if self.active is not None:
            return self.active
        others = [v for v in self.indexes if v != target]
        if target in self.indexes and not any(self._held_by(target, v) for v in others) or not self.indexes:
            chosen = target
        else:
            counts = {v: self.backend.count(v) for v in self.indexes}
            chosen = max(counts, key=lambda v: (counts[v], order.get(v, -1)))
        self.active = chosen
        if chosen in self.indexes:
            self.backend.switch(chosen)
        else:
            self._pending = chosen
        return chosen

    def older(self) -> list[str]:
        """Versions with a collection ranked below the active one in the decision log: switched
        away from, never written again (safe to drop once no batch in flight still reads them)."""
        if self.active is None or self._pending is not None:
            return []
        rank = self._rank(self.active)
        return [v for v in self.indexes if v != self.active and self._rank(v) < rank]

    def drop(self, version: str) -> None:
        self.backend.drop(version)
        self.indexes.pop(version, None)
        log.info("dropped the collection of model %s", version)


__all__ = ["MODELS_FILE", "MODELS_FORMAT", "CollectionIndexes", "ModelIndexes", "load_active_snapshot"]
