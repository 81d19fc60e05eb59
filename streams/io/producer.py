"""Client-side I/O: send listings to the ``listings`` topic and read what the workers emit.

Used by the CLI (``samestyle produce``, ``samestyle demo``) and by the integration tests; a
service that feeds samestyle from its own catalogue does the same with any Kafka client.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from tqdm import tqdm

from samestyle.models.data import ListingRecord
from samestyle.streams.io.reader import LogReader, every_partition
from samestyle.streams.settings import Settings
from samestyle.topics import DEAD_LETTERS, DUPLICATE_ALERTS, LISTINGS, SIMILAR_PRODUCTS, TopicSpec, codec_for_topic
from samestyle.topics.errors import BadInputError

log = logging.getLogger(__name__)


def listing_message(record: ListingRecord, *, image_mode: str = "uri", event_time: int | None = None) -> dict[str, Any]:
    """A ``listings`` record for one CSV row. ``image_mode`` "uri" sends the path, "bytes" the file."""
    image_uri = image_bytes = None
    if record.image_path:
        if image_mode == "bytes":
            image_bytes = Path(record.image_path).read_bytes()
        else:
            image_uri = str(record.image_path)
    return {
        "listing_id": record.listing_id,
        "supplier_id": record.supplier_id,
        "category": record.category,
        "title": record.title,
        "description": record.description,
        # Every attribute, source included: the encoders keep provenance out of the embedded
        # text (encoder.PROVENANCE_ATTRIBUTES) and the duplicate matcher compares sources.
        "attributes": dict(record.attributes),
        "image_uri": image_uri,
        "image_bytes": image_bytes,
        "op": "UPSERT",
        "event_time": event_time if event_time is not None else int(time.time() * 1000),
    }


def delete_message(listing_id: str, supplier_id: str | None = None) -> dict[str, Any]:
    return {"listing_id": listing_id, "supplier_id": supplier_id, "category": None, "title": None,
            "description": None, "attributes": {}, "image_uri": None, "image_bytes": None,
            "op": "DELETE", "event_time": int(time.time() * 1000)}


def make_producer(settings: Settings) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"samestyle-producer-{settings.worker_id}",
        linger_ms=20,
        max_batch_size=524_288,
        max_request_size=settings.max_message_bytes,
        acks="all",
    )


async def send_records(settings: Settings, topic: str, messages: Iterable[tuple[bytes | None, bytes]],
                       total: int | None = None, progress: bool = False, desc: str = "produce") -> int:
    """Send ``(key, value)`` pairs and wait for every acknowledgement; returns how many were sent."""
    producer = make_producer(settings)
    await producer.start()
    sent = 0
    try:
        futures = []
        with tqdm(total=total, desc=desc, unit="msg", disable=not progress, leave=False) as bar:
            for key, value in messages:
                futures.append(await producer.send(topic, key=key, value=value))
                if len(futures) >= 1000:
                    await asyncio.gather(*futures)
                    bar.update(len(futures))
                    sent += len(futures)
                    futures = []
            await asyncio.gather(*futures)
            bar.update(len(futures))
            sent += len(futures)
    finally:
        await producer.stop()
    return sent


async def produce_listings(settings: Settings, spec: TopicSpec, listings: Sequence[dict[str, Any]],
                           progress: bool = False) -> int:
    """Encode and send ``listings`` records keyed by listing id (so a listing keeps its partition)."""
    if spec.key != LISTINGS:
        raise ValueError(f"produce_listings sends to the listings topic, not {spec.key}")
    codec = codec_for_topic(LISTINGS)

    def encoded() -> Iterable[tuple[bytes, bytes]]:
        for record in listings:
            try:
                yield record["listing_id"].encode(), codec.encode(record)
            except BadInputError as exc:
                raise BadInputError(f"listing {record.get('listing_id')!r} does not fit the listings schema: {exc}") from exc

    return await send_records(settings, spec.name, encoded(), total=len(listings), progress=progress,
                              desc="listings sent")


@dataclass
class Outputs:
    """Everything read back from the output topics so far, decoded."""

    similar: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dead_letters: list[dict[str, Any]] = field(default_factory=list)

    @property
    def indexed_ids(self) -> set[str]:
        return {m["listing_id"] for m in self.similar}

    @property
    def dead_lettered_ids(self) -> set[str]:
        return {m["original_key"].decode(errors="replace") for m in self.dead_letters if m["original_key"]}


class OutputReader:
    """Reads similar-products, duplicate-alerts and dead-letters from the beginning (no group)."""

    def __init__(self, settings: Settings, specs: dict[str, TopicSpec]) -> None:
        self.settings = settings
        self.specs = specs
        self.outputs = Outputs()
        self._by_topic = {specs[k].name: k for k in (SIMILAR_PRODUCTS, DUPLICATE_ALERTS, DEAD_LETTERS)}
        self._reader = LogReader(settings.bootstrap_servers, client_id=f"{settings.worker_id}-outputs",
                                 max_message_bytes=settings.max_message_bytes * 2)

    async def __aenter__(self) -> "OutputReader":
        await self._reader.start()
        await self._reader.assign([p for name, key in self._by_topic.items()
                                   for p in every_partition(name, self.specs[key].partitions)])
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._reader.stop()

    async def poll(self, timeout: float = 0.2) -> int:
        """Read what has arrived; returns the number of new messages."""
        targets = {SIMILAR_PRODUCTS: self.outputs.similar, DUPLICATE_ALERTS: self.outputs.alerts,
                   DEAD_LETTERS: self.outputs.dead_letters}
        records = await self._reader.fetch(timeout)
        for record in records:
            key = self._by_topic[record.topic]
            targets[key].append(codec_for_topic(key).decode(record.value))
        return len(records)

    async def wait_for(self, done: Callable[[Outputs], bool], timeout: float, progress: Any = None,
                       measure: Callable[[Outputs], int] | None = None) -> bool:
        """Poll until ``done(outputs)`` is true or ``timeout`` seconds pass; returns whether it was met."""
        deadline = time.monotonic() + timeout
        while True:
            await self.poll()
            if progress is not None and measure is not None and measure(self.outputs) != progress.n:
                progress.n = measure(self.outputs)
                progress.refresh()
            if done(self.outputs):
                return True
            if time.monotonic() > deadline:
                return False
