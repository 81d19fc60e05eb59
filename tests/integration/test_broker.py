"""Topic creation on the real embedded broker: explicit, idempotent, and loud about mismatches."""

from __future__ import annotations

import uuid

import pytest

from samestyle.streams.dev.broker import EmbeddedBroker, admin_client, create_topics
from samestyle.topics import topic_specs
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
