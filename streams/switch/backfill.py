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
"""

from __future__ import annotations

import logging
from typing import Iterable, Sequence

from samestyle.streams.io.reader import LogReader, reader_for
from samestyle.streams.settings import Settings
from samestyle.streams.worker.pipeline import Incoming

log = logging.getLogger(__name__)


class Backfill:
    """The re-embedding plan of one worker for one target model version."""

    def __init__(self, settings: Settings, topic: str) -> None:
        self.settings = settings
        self.topic = topic
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
        self._reader: LogReader | None = None

    @property
    def active(self) -> bool:
        return self.version is not None

    def pending(self) -> list[int]:
        return sorted(p for p in self.ends if p not in self.done)

    async def _ensure_reader(self) -> LogReader:
        if self._reader is None:
            self._reader = await reader_for(self.settings, "reembed").start()
        return self._reader

    async def _assign_pending(self) -> None:
        reader = await self._ensure_reader()
        await reader.assign({(self.topic, p): self.positions[p] for p in self.pending()})

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
        for p in new:
            self.ends[p] = None
            self.positions[p] = 0
            self.live_seen.setdefault(p, set())
        await self._assign_pending()

    def note_live(self, batch: Sequence[Incoming]) -> None:
        """The embed agent embedded ``batch`` with both models: never re-embed those keys after it."""
        if not self.active:
            return
        for msg in batch:
            if msg.key is not None:
                self.live_seen.setdefault(msg.partition, set()).add(msg.key)

    async def next_chunk(self, max_records: int) -> list[Incoming]:
        """The next listings to re-embed (possibly none while fetching); [] when all is done."""
        pending = self.pending()
        if not pending:
            return []
        reader = await self._ensure_reader()
        records = await reader.fetch(timeout=0.2, max_records=max_records)
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
                self.positions[p] = record.offset + 1
            if end is not None and self.positions[p] >= end:
                self.done.add(p)
                log.info("model switch to %s: listings partition %d re-embedded (%d records)",
                         self.version, p, end)
        if self.pending() != pending:
            await self._assign_pending()
        return chunk

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
        if self._reader is not None:
            self._reader.unassign()

    async def stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None


__all__ = ["Backfill"]
