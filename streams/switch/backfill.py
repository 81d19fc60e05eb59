"""Re-embedding the catalogue for a model switch, one listings partition at a time.

When a model is promoted, every listing must get the new model's vectors before the workers can
switch (blue/green). New and changed listings are covered by the embed agent, which embeds each
with both models while the switch is under way. Everything that came before is covered here:
each worker re-reads the ``listings`` partitions its embed agent owns, from offset 0 up to the
end they had when the re-embedding of that partition was planned, and embeds them with the new
model only (``reembed`` records: index replicas apply them, nothing is emitted for them).

Order matters, because ``listing-embeddings`` is a log in which the last record of a listing
wins. Re-embedding chunks and the embed agent's batches run under one lock, and a listing the
agent already handled since the switch began is skipped here, so an old version of a listing
never lands after a newer one. A partition taken away by a rebalance is dropped; its new owner
re-embeds it from the start (the same records again: idempotent).

A log that ends below what was read or planned was recreated (the topic deleted and created again,
or the embedded broker restarted empty): that partition is planned again from offset 0, whether it
was still being re-embedded or done already (every planned partition stays assigned to the reader
for that; a done one is read only to learn its end). A done partition needs it too: its
re-embedded records may have been acknowledged by the old log of ``listing-embeddings`` and lost
with it before any replica applied them, and its judgement (below) counted listings as supplied by
a log that no longer holds them. Planned again, what the new log holds is re-embedded, and what
the target's index lacks and the new log does not hold is judged as below. Keys the embed agent
handled before the recreation are forgotten: their records may be lost with the old log too.

What the log cannot supply: once a partition is re-embedded, :meth:`Backfill.unsupplied` names
the listings of the serving index that belong to it (by Kafka's default partitioner on the
listing id, the co-partitioning the registry requires) but that its log did not hold (expired
under a ``delete`` policy), or whose re-embedding failed. The switch writes them out of the
catalogue (:class:`~samestyle.streams.switch.coordinator.ModelSwitch`). A partition holding a
record whose key is not its listing id, or that the default partitioner puts elsewhere, cannot
be judged this way: it is reported, and the switch's deadline settles it.
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from aiokafka.partitioner import murmur2

from samestyle.streams.io.reader import LogReader, LogRecord, reader_for
from samestyle.streams.settings import Settings
from samestyle.streams.worker.metrics import LEFT_OUT_REASONS
from samestyle.streams.worker.pipeline import Failure, Incoming
from samestyle.topics import LISTINGS, codec_for_topic
from samestyle.topics.errors import DecodeError

log = logging.getLogger(__name__)

#: Why a listing of the serving index is left out of the new model's index (the metric's labels).
NOT_IN_LOG, REEMBED_FAILED, AT_DEADLINE = LEFT_OUT_REASONS


def default_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as the Java client, aiokafka and Faust's
    producer use it) gives a keyed record."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class Backfill:
    """The re-embedding plan of one worker for one target model version (``reader``: the log reader
    to use instead of one of its own, e.g. a test's)."""

    def __init__(self, settings: Settings, topic: str, partitions: int, reader: LogReader | None = None) -> None:
        self.settings = settings
        self.topic = topic
        #: The partition count of ``topic`` (for the default partitioner).
        self.partitions = partitions
        self.version: str | None = None
        #: partition -> end offset (exclusive) the re-embedding of that partition stops at: the
        #: high-water mark of the first fetch after planning (None until then). Not
        #: ``end_offsets``: tansu answers it short (BROKER.md, trap 1).
        self.ends: dict[int, int | None] = {}
        #: partition -> next offset to read.
        self.positions: dict[int, int] = {}
        self.done: set[int] = set()
        #: partition -> keys the embed agent embedded (with both models) since the switch began.
        self.live_seen: dict[int, set[bytes]] = {}
        #: partition -> listing ids its log held up to its end (what the log can supply).
        self.supplied: dict[int, set[str]] = {}
        #: partition -> listing ids whose re-embedding failed (bad input under the new model).
        self.failed: dict[int, set[str]] = {}
        #: partition -> why its log cannot tell which listings it lacks (see the module docstring).
        self.misplaced: dict[int, str] = {}
        #: Re-embedded partitions whose unsupplied listings were already reported.
        self.settled: set[int] = set()
        self._reader: LogReader | None = reader

    @property
    def active(self) -> bool:
        return self.version is not None

    def pending(self) -> list[int]:
        return sorted(p for p in self.ends if p not in self.done)

    async def _ensure_reader(self) -> LogReader:
        if self._reader is None:
            self._reader = await reader_for(self.settings, "reembed").start()
        return self._reader

    async def _assign_planned(self) -> None:
        """Assign every planned partition: a pending one from where its re-embedding is, a done
        one at its end (read only to learn its end: see :meth:`_restart_recreated`)."""
        reader = await self._ensure_reader()
        await reader.assign({(self.topic, p): self.positions[p] for p in sorted(self.ends)})

    async def plan(self, version: str, assigned: Iterable[int]) -> None:
        """Re-embed for ``version`` every partition in ``assigned``; forget partitions not in it."""
        assigned = set(assigned)
        if version != self.version:
            self.reset()
            self.version = version
            log.info("model switch to %s: re-embedding listings partitions %s", version, sorted(assigned))
        new = assigned - set(self.ends)
        gone = set(self.ends) - assigned
        if not new and not gone:
            return
        for p in gone:
            self.ends.pop(p, None)
            self.positions.pop(p, None)
            self.live_seen.pop(p, None)
            self.done.discard(p)
            for by_partition in (self.supplied, self.failed, self.misplaced):
                by_partition.pop(p, None)
            self.settled.discard(p)
        for p in new:
            self.ends[p] = None
            self.positions[p] = 0
            self.live_seen.setdefault(p, set())
        await self._assign_planned()

    def note_live(self, batch: Sequence[Incoming]) -> None:
        """The embed agent embedded ``batch`` with both models: never re-embed those keys after it."""
        if not self.active:
            return
        for msg in batch:
            if msg.key is not None:
                self.live_seen.setdefault(msg.partition, set()).add(msg.key)

    async def next_chunk(self, max_records: int) -> list[Incoming]:
        """The next listings to re-embed (possibly none while fetching); [] when all is done. Each
        call also fetches the partitions re-embedded already, so that one whose log turns out
        recreated is planned again (and :meth:`pending` is no longer empty)."""
        if not self.ends:
            return []
        reader = await self._ensure_reader()
        if self._restart_recreated(reader):
            await self._assign_planned()
        pending = self.pending()
        # With nothing pending the records are only read past (done partitions' new listings,
        # which the embed agent handles): a large fetch keeps their ends current.
        records = await reader.fetch(timeout=0.2, max_records=max_records if pending else 10_000)
        chunk: list[Incoming] = []
        for p in pending:
            if self.ends[p] is None:
                self.ends[p] = reader.highwater((self.topic, p))  # None until a fetch answered for it
            end = self.ends[p]
            for record in records:
                if record.partition != p:
                    continue
                if end is not None and record.offset >= end:
                    break
                chunk.append(Incoming(record.key, record.value, record.topic, p, record.offset))
                self._note_supplied(record)
                self.positions[p] = record.offset + 1
            if end is not None and self.positions[p] >= end:
                self.done.add(p)
                log.info("model switch to %s: listings partition %d re-embedded (%d records)",
                         self.version, p, end)
        return chunk

    def _restart_recreated(self, reader: LogReader) -> bool:
        """Plan a partition again from offset 0 when its log ends below what was read or planned.

        The topic was deleted and created again (or the embedded broker restarted empty). Without
        this the re-embedding of a pending partition would wait for the new log to grow past the
        old end, and the switch would never leave REEMBEDDING; a done partition would keep the
        judgement of a log that is gone (see the module docstring). What the old log held and the
        new one does not is then judged by :meth:`unsupplied` like any listing the log lacks.
        """
        restarted = False
        for p in sorted(self.ends):
            highwater = reader.highwater((self.topic, p))
            read = max(self.positions[p], self.ends[p] or 0)
            if highwater is None or highwater >= read:
                continue
            log.warning("model switch to %s: %s[%d] ends at %d but the re-embedding %s %d: the topic was "
                        "recreated; re-embedding it again from the start", self.version, self.topic, p, highwater,
                        "had re-embedded it up to" if p in self.done else "reached", read)
            self.positions[p], self.ends[p] = 0, None
            self.done.discard(p)
            self.settled.discard(p)
            self.live_seen[p] = set()
            for by_partition in (self.supplied, self.failed, self.misplaced):
                by_partition.pop(p, None)
            restarted = True
        return restarted

    def _note_supplied(self, record: LogRecord) -> None:
        p = record.partition
        supplied = self.supplied.setdefault(p, set())
        if record.value is None:
            return
        try:
            listing_id = codec_for_topic(LISTINGS).decode(record.value)["listing_id"]
        except DecodeError:
            return  # not a listing: the embed agent dead-letters it, and it names no listing
        supplied.add(listing_id)
        if p in self.misplaced:
            return
        if record.key != listing_id.encode():
            self.misplaced[p] = f"offset {record.offset} is keyed {record.key!r}, not by its listing id {listing_id!r}"
        elif default_partition(record.key, self.partitions) != p:
            self.misplaced[p] = (f"offset {record.offset} (listing {listing_id!r}) belongs to partition "
                                 f"{default_partition(record.key, self.partitions)} by the default partitioner")

    def note_embedded(self, chunk: Sequence[Incoming], failures: Sequence[Failure]) -> None:
        """``chunk`` was re-embedded and ``failures`` of it failed: a listing whose latest record
        failed is one the new model cannot index (an earlier failure is repaired by a later record)."""
        failed = {(f.incoming.partition, f.incoming.offset) for f in failures}
        for msg in chunk:
            if msg.key is None:
                continue
            ids = self.failed.setdefault(msg.partition, set())
            listing_id = msg.key.decode("utf-8", "replace")
            if (msg.partition, msg.offset) in failed:
                ids.add(listing_id)
            else:
                ids.discard(listing_id)

    def unsupplied(self, lacking: Iterable[str]) -> dict[str, list[str]]:
        """Of ``lacking`` (listings of the serving index the target's index lacks), those that this
        worker's re-embedded partitions should supply and cannot, by reason (:data:`NOT_IN_LOG`,
        :data:`REEMBED_FAILED`). Call under the embed lock once :meth:`pending` is empty; each
        partition is judged once per plan (its listings that arrive later are embedded live; a
        partition planned again because its log was recreated is judged again)."""
        partitions = self.done - self.settled
        self.settled |= partitions
        for p in sorted(partitions & set(self.misplaced)):
            log.error("model switch to %s: listings partition %d cannot tell which listings it lacks: %s. "
                      "listings must be keyed by listing id with Kafka's default partitioner; the switch "
                      "completes at its deadline (SAMESTYLE_SWITCH_DEADLINE_SECONDS)", self.version, p,
                      self.misplaced[p])
        judged = partitions - set(self.misplaced)
        out: dict[str, list[str]] = {NOT_IN_LOG: [], REEMBED_FAILED: []}
        if not judged:
            return {}
        for listing_id in lacking:
            key = listing_id.encode()
            p = default_partition(key, self.partitions)
            if p not in judged or key in self.live_seen.get(p, ()):
                continue  # another worker's, or embedded live since the switch began
            if listing_id in self.failed.get(p, ()):
                out[REEMBED_FAILED].append(listing_id)
            elif listing_id not in self.supplied.get(p, ()):
                out[NOT_IN_LOG].append(listing_id)
        return {reason: sorted(ids) for reason, ids in out.items() if ids}

    def unseen(self, chunk: Sequence[Incoming]) -> list[Incoming]:
        """``chunk`` less the listings the embed agent handled since the switch began (call under
        the embed lock, right before embedding)."""
        return [m for m in chunk if m.key is None or m.key not in self.live_seen.get(m.partition, ())]

    def reset(self) -> None:
        self.version = None
        self.ends.clear()
        self.positions.clear()
        self.done.clear()
        self.live_seen.clear()
        self.supplied.clear()
        self.failed.clear()
        self.misplaced.clear()
        self.settled.clear()
        if self._reader is not None:
            self._reader.unassign()

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None


__all__ = ["AT_DEADLINE", "NOT_IN_LOG", "REEMBED_FAILED", "Backfill", "default_partition"]
