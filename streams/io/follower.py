"""A service that follows topic partitions with its own :class:`LogReader` and folds every record."""

from __future__ import annotations

from typing import Any

from mode import Service

from samestyle.streams.io.reader import LogReader, LogRecord, reader_for


class LogFollower(Service):
    """Reads with a reader of ``role`` from where :meth:`position` puts it, calls :meth:`fold` for
    every record and :meth:`caught_up` once, when the first read reaches the end of the log."""

    #: Longest wait of one fetch: how soon a stop is noticed, and the latency of an idle log.
    fetch_wait_seconds = 0.5

    def __init__(self, settings: Any, role: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self._role = role
        self._reader: LogReader | None = None
        self._caught_up = False

    async def position(self, reader: LogReader) -> None:
        """Assign the partitions to follow (and where to start) on the started ``reader``."""
        raise NotImplementedError

    def fold(self, record: LogRecord) -> None:
        raise NotImplementedError

    def caught_up(self) -> None:
        """Called once, when the first read has reached the end of every followed partition."""

    async def on_start(self) -> None:
        self._reader = await reader_for(self.settings, self._role).start()
        await self.position(self._reader)

    async def on_stop(self) -> None:
        if self._reader is not None:
            await self._reader.stop()
            self._reader = None

    @Service.task
    async def _follow(self) -> None:
        assert self._reader is not None
        while not self.should_stop:
            for record in await self._reader.fetch(timeout=self.fetch_wait_seconds):
                self.fold(record)
            if not self._caught_up and await self._reader.at_end():
                self._caught_up = True
                self.caught_up()


__all__ = ["LogFollower"]
