"""The moderation page's source: ``duplicate-alerts`` and ``moderation-decisions`` followed into a
bounded in-memory :class:`~samestyle.streams.http.moderation.AlertBuffer`.

A buffer, not a read per request: the page polls every few seconds, and a read on request would
start a consumer, fetch metadata and scan every partition each time (hundreds of ms and a broker
connection per moderator per poll), while the newest N alerts cost N small dicts. At start the feed
reads the last ``capacity`` records of each partition (so the newest ``capacity`` overall), then
follows; a record that does not decode is logged and skipped (a reader of an output topic has no
dead letters to write). Each worker has its own feed, so any worker serves the page.
"""

from __future__ import annotations

import logging
from typing import Any

from samestyle.streams.http.moderation import AlertBuffer
from samestyle.streams.io.follower import LogFollower
from samestyle.streams.io.reader import LogReader, LogRecord, every_partition
from samestyle.streams.settings import Settings
from samestyle.topics import DUPLICATE_ALERTS, MODERATION_DECISIONS, TopicSpec, codec_for_topic
from samestyle.topics.errors import BadInputError

log = logging.getLogger(__name__)


class AlertFeed(LogFollower):
    """Follows both topics of ``specs`` into ``buffer``; ``buffer.ready`` once the start-up read is in."""

    def __init__(self, settings: Settings, specs: dict[str, TopicSpec], buffer: AlertBuffer, **kwargs: Any) -> None:
        super().__init__(settings, "moderation", **kwargs)
        self.buffer = buffer
        self._topics = {specs[key].name: key for key in (DUPLICATE_ALERTS, MODERATION_DECISIONS)}
        self._partitions = [p for name, key in self._topics.items()
                            for p in every_partition(name, specs[key].partitions)]
        self._codecs = {key: codec_for_topic(key) for key in self._topics.values()}

    def fold(self, record: LogRecord) -> None:
        key = self._topics[record.topic]
        try:
            if record.value is None:
                raise BadInputError("null value")
            value = self._codecs[key].decode(record.value)
        except BadInputError as exc:
            log.warning("%s[%d]@%d skipped by the moderation feed: %s", record.topic, record.partition,
                        record.offset, exc)
            return
        if key == DUPLICATE_ALERTS:
            self.buffer.add_alert(value)
        else:
            self.buffer.add_decision(value)

    async def position(self, reader: LogReader) -> None:
        await reader.assign(self._partitions)
        # The listed end may lie below the real one (LogReader.listed_bounds): starting early is harmless.
        bounds = await reader.listed_bounds()
        await reader.assign({p: max(first, end - self.buffer.capacity) for p, (first, end) in bounds.items()})

    def caught_up(self) -> None:
        self.buffer.ready = True

__all__ = ["AlertFeed"]
