"""Which model a worker should serve: it follows the trainer's decisions on ``model-updates``.

The topic has one partition, so every worker reads the same decisions in the same order. The
newest ``PROMOTED`` record names the *target* model; before any promotion the target is the
worker's configured encoder (``SAMESTYLE_ENCODER``). The worker keeps serving its current model
until its index replica holds a complete index of the target's vectors (see
:mod:`streams.replica` and :mod:`streams.backfill`), then switches.

:class:`ModelChain` is the pure part (decisions in, target out); :class:`ModelWatcher` is the
service that feeds it from the broker with a plain consumer outside any consumer group (every
worker must see every record).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Iterable

from samestyle.streams.io.follower import LogFollower
from samestyle.streams.io.reader import LogReader, LogRecord
from samestyle.streams.settings import Settings
from samestyle.topics import codec_for_topic
from samestyle.topics.errors import BadInputError
from samestyle.topics.registry import MODEL_UPDATES

log = logging.getLogger(__name__)

#: How long one fetch waits for new decisions before the loop checks whether to stop.
FETCH_WAIT_SECONDS = 0.2


@dataclass(frozen=True)
class Promotion:
    """A model the trainer promoted: its version and where its directory is."""

    version: str
    model_dir: str
    offset: int


class ModelChain:
    """The promoted models, in the order of the decision log; promotions restored from an index
    snapshot (``offset`` -1: the log no longer holds them, or not yet) come before the log's."""

    def __init__(self) -> None:
        self.promotions: list[Promotion] = []
        self.rejected = 0
        #: How many of ``promotions`` (the first ones) were restored rather than read.
        self.restored = 0

    def restore(self, promotions: Iterable[Promotion]) -> None:
        """Put ``promotions`` (oldest first) before every promotion of the log: any promotion the
        log holds is newer, so it supersedes them as the target."""
        restored = list(promotions)
        self.promotions[self.restored:self.restored] = restored
        self.restored += len(restored)

    @property
    def promoted(self) -> int:
        """Promotions read from the log (the restored ones are not decisions seen)."""
        return len(self.promotions) - self.restored

    def from_log(self, version: str) -> bool:
        """True when the log holds a promotion of ``version``."""
        return any(p.version == version for p in self.promotions[self.restored:])

    def add(self, record: dict[str, Any], offset: int) -> Promotion | None:
        """Fold one decoded ModelUpdate in; return it as a :class:`Promotion` if it promotes."""
        if record["decision"] != "PROMOTED":
            self.rejected += 1
            return None
        promotion = Promotion(record["version"], record["model_dir"], offset)
        self.promotions.append(promotion)
        return promotion

    @property
    def latest(self) -> Promotion | None:
        return self.promotions[-1] if self.promotions else None

    def model_dir(self, version: str) -> str | None:
        """The directory of a promoted ``version`` (the newest record wins), or None."""
        for promotion in reversed(self.promotions):
            if promotion.version == version:
                return promotion.model_dir
        return None

    def order(self) -> dict[str, int]:
        """Position of every promoted version in the chain (its newest promotion): newer is larger."""
        return {p.version: i for i, p in enumerate(self.promotions)}


class ModelWatcher(LogFollower):
    """Follows ``model-updates`` from the start; ``ready`` is set once the log read at start-up is in."""

    fetch_wait_seconds = FETCH_WAIT_SECONDS

    def __init__(self, settings: Settings, topic: str, records: Iterable[tuple[int, bytes | None]] = (),
                 **kwargs: Any) -> None:
        super().__init__(settings, "models", **kwargs)
        self.topic = topic
        self.chain = ModelChain()
        self.ready = asyncio.Event()
        #: Set (and replaced) whenever a promotion arrives, so waiters can re-check the target.
        self.changed = asyncio.Event()
        self._codec = codec_for_topic(MODEL_UPDATES)
        for offset, value in records:  # tests: a chain without a broker
            self._fold(offset, value)

    def _fold(self, offset: int, value: bytes | None) -> None:
        try:
            record = self._codec.decode(value) if value is not None else None
        except BadInputError as exc:
            log.warning("model-updates@%d is not a ModelUpdate, skipped: %s", offset, exc)
            return
        if record is None:
            return
        promotion = self.chain.add(record, offset)
        if promotion is not None:
            log.info("model %s promoted (model-updates@%d): %s", promotion.version, offset, promotion.model_dir)
            self.changed.set()
            self.changed = asyncio.Event()

    def fold(self, record: LogRecord) -> None:
        self._fold(record.offset, record.value)

    async def position(self, reader: LogReader) -> None:
        await reader.assign([(self.topic, 0)])

    def caught_up(self) -> None:
        self.ready.set()

__all__ = ["ModelChain", "ModelWatcher", "Promotion"]
