"""Integration fixtures: the real embedded broker (tansu) and real worker processes over loopback.

Every test gets its own topic prefix, consumer group and state directory, so tests sharing one
broker never see each other's messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from samestyle.streams.dev.broker import EmbeddedBroker, create_topics
from samestyle.streams.io.producer import OutputReader, Outputs, produce_listings, send_records
from samestyle.streams.settings import Settings
from samestyle.streams.worker.process import WorkerProcess
from samestyle.topics import LISTINGS, TopicSpec, topic_specs

pytestmark = pytest.mark.integration


@contextlib.contextmanager
def frozen(pid: int) -> Iterator[None]:
    """SIGSTOP ``pid`` for the block's duration, SIGCONT after it whatever happens.

    For restarting the in-memory broker under a live worker: a real Kafka comes back with its
    topics, this one comes back empty and would auto-create any topic a reconnecting client asks
    metadata for with 4 partitions (BROKER.md, trap 2). Frozen, the worker cannot win that race
    against ``create_topics``.
    """
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    with EmbeddedBroker(log_path=log) as b:
        yield b


@dataclass
class Stack:
    """One isolated samestyle deployment on the shared broker."""

    settings: Settings
    specs: dict[str, TopicSpec]
    tmp: Path
    workers: list[WorkerProcess] = field(default_factory=list)

    def start_worker(self, name: str = "w1", **overrides: Any) -> WorkerProcess:
        settings = self.settings.replace(worker_id=name, **overrides)
        worker = WorkerProcess(settings, self.tmp / f"{name}.log").start()
        self.workers.append(worker)
        return worker

    def produce(self, messages: list[dict[str, Any]]) -> None:
        asyncio.run(produce_listings(self.settings, self.specs[LISTINGS], messages))

    def produce_raw(self, pairs: list[tuple[bytes | None, bytes]]) -> None:
        asyncio.run(send_records(self.settings, self.specs[LISTINGS].name, pairs))

    def collect(self, done: Callable[[Outputs], bool], timeout: float = 90.0) -> Outputs:
        """Read the output topics from the beginning until ``done`` holds; fail with the worker logs if not."""

        async def run() -> tuple[bool, Outputs]:
            async with OutputReader(self.settings, self.specs) as reader:
                deadline = time.monotonic() + timeout
                while time.monotonic() < deadline:
                    if await reader.wait_for(done, timeout=1.0):
                        return True, reader.outputs
                    for w in self.workers:
                        if w.proc is not None and w.proc.returncode is None:
                            w.check_alive()
                return False, reader.outputs

        ok, outputs = asyncio.run(run())
        if not ok:
            logs = "\n".join(f"--- {w.log_path.name}\n{w.log_tail(40)}" for w in self.workers)
            pytest.fail(f"condition not met in {timeout:.0f} s: {len(outputs.similar)} similar, "
                        f"{len(outputs.alerts)} alerts, {len(outputs.dead_letters)} dead letters\n{logs}")
        return outputs

    def stop(self) -> None:
        for w in self.workers:
            w.stop()


@pytest.fixture
def stack(broker: EmbeddedBroker, tmp_path: Path) -> Iterator[Stack]:
    run = uuid.uuid4().hex[:8]
    settings = Settings(
        bootstrap=broker.bootstrap,
        topic_prefix=f"t{run}-",
        app_id=f"samestyle-test-{run}",
        encoder="tiny",
        allow_random_weights=True,
        state_dir=tmp_path / "state",
        snapshot_interval_seconds=1.0,
        batch_linger_seconds=0.05,
        web_port=0,
    )
    specs = topic_specs(settings.topic_prefix)
    # app_id: the pairs agents' changelogs too (every worker runs them, SAMESTYLE_PAIRS_ENABLED).
    create_topics(broker.bootstrap, topic_specs(settings.topic_prefix, app_id=settings.app_id).values())
    s = Stack(settings, specs, tmp_path)
    try:
        yield s
    finally:
        s.stop()


def text_listing(listing_id: str, title: str, supplier: str = "s1", **extra: Any) -> dict[str, Any]:
    """A text-only ``listings`` record; ``extra`` overrides any field."""
    record = {"listing_id": listing_id, "supplier_id": supplier, "category": "mugs", "title": title,
              "description": f"{title} for everyday use", "attributes": {"colour": "red"}, "image_uri": None,
              "image_bytes": None, "op": "UPSERT", "event_time": int(time.time() * 1000)}
    record.update(extra)
    return record
