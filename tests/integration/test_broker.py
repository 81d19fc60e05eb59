"""Topic creation on the real embedded broker: explicit, idempotent, and loud about mismatches."""

from __future__ import annotations

import uuid

import pytest

from streams.broker import EmbeddedBroker, admin_client, create_topics
from topics import topic_specs
from topics.errors import BrokerError

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
