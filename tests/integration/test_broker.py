"""Topic creation on the real embedded broker: explicit, idempotent, and loud about mismatches."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid

import pytest

from samestyle.streams.dev.broker import (
    EmbeddedBroker,
    admin_client,
    create_topics,
    describe_cleanup_policies,
    warn_about_cleanup_policies,
)
from samestyle.topics import LISTING_EMBEDDINGS, LISTINGS, topic_specs
from samestyle.topics.errors import BrokerError

pytestmark = pytest.mark.integration


def test_create_topics_is_idempotent_and_checks_partition_counts(broker: EmbeddedBroker) -> None:
    prefix = f"b{uuid.uuid4().hex[:6]}-"
    specs = topic_specs(prefix)
    create_topics(broker.bootstrap, list(specs.values())[:2])  # some exist already ...
    create_topics(broker.bootstrap, specs.values())  # ... and the rest are created
    with admin_client(broker.bootstrap) as admin:
        described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics([s.name for s in specs.values()])}
    assert described == {s.name: s.partitions for s in specs.values()}
    with pytest.raises(BrokerError, match="partitions"):
        create_topics(broker.bootstrap, topic_specs(prefix, partitions=2).values())


def test_a_worker_refuses_to_start_without_its_topics(broker: EmbeddedBroker, tmp_path) -> None:
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.process import WorkerProcess

    settings = Settings(bootstrap=broker.bootstrap, topic_prefix=f"none{uuid.uuid4().hex[:6]}-", encoder="tiny",
                        allow_random_weights=True, state_dir=tmp_path / "state", web_port=0)
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    assert worker.proc is not None
    code = worker.proc.wait(60)
    log = (tmp_path / "worker.log").read_text()
    assert code == 2 and "samestyle create-topics" in log
    with admin_client(broker.bootstrap) as admin:  # and it asked no metadata that auto-creates them
        assert not [t for t in admin.list_topics() if t.startswith(settings.topic_prefix)]


def test_listings_is_created_compacted(broker: EmbeddedBroker) -> None:
    specs = topic_specs(f"c{uuid.uuid4().hex[:6]}-")
    create_topics(broker.bootstrap, specs.values())
    policies = asyncio.run(describe_cleanup_policies(broker.bootstrap, [s.name for s in specs.values()]))
    assert policies[specs[LISTINGS].name] == policies[specs[LISTING_EMBEDDINGS].name] == "compact"
    assert {name for name, policy in policies.items() if policy == "compact"} == {
        s.name for s in specs.values() if s.compacted}
    assert warn_about_cleanup_policies(broker.bootstrap, specs.values()) == []


def test_an_existing_listings_topic_that_expires_is_reported_loudly(broker: EmbeddedBroker, tmp_path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    # A deployment from before listings was compacted: create-topics leaves an existing topic's
    # configs alone, and both it and a worker starting against it say what is wrong and how to fix it.
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.process import WorkerProcess

    prefix = f"old{uuid.uuid4().hex[:6]}-"
    specs = topic_specs(prefix)
    create_topics(broker.bootstrap, [dataclasses.replace(specs[LISTINGS], compacted=False)])
    with caplog.at_level(logging.WARNING, logger="samestyle.streams.dev.broker"):
        create_topics(broker.bootstrap, specs.values())
    [warning] = [r.getMessage() for r in caplog.records if "cleanup.policy" in r.getMessage()]
    assert f"topic {prefix}listings has cleanup.policy=delete, but samestyle needs compact" in warning
    assert "model switch" in warning and "--add-config cleanup.policy=compact" in warning

    settings = Settings(bootstrap=broker.bootstrap, topic_prefix=prefix, encoder="tiny", allow_random_weights=True,
                        state_dir=tmp_path / "state", web_port=0, app_id=f"old-{prefix}")
    create_topics(broker.bootstrap, topic_specs(prefix, app_id=settings.app_id).values())  # + the pairs changelogs
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        worker.wait_for_log(f"!!! topic {prefix}listings has cleanup.policy=delete", timeout=60)
    finally:
        worker.stop()
