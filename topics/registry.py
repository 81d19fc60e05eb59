"""Every Kafka topic of the service, in one place: names, partition counts, schemas, configs.

The streaming app, the admin code that creates topics and the start-up check that compares the
broker with this registry all read :func:`topic_specs`; nothing else spells a topic name.

``listings`` and ``listing-embeddings`` are keyed by ``listing_id`` and must keep the same number
of partitions (co-partitioned): the embed agent writes a listing's vectors to the partition the
listing came from, and the compacted embeddings topic then holds the latest vectors per listing.
"""

from __future__ import annotations

from dataclasses import dataclass

from topics.errors import ConfigError

LISTINGS = "listings"
LISTING_EMBEDDINGS = "listing-embeddings"
SIMILAR_PRODUCTS = "similar-products"
DUPLICATE_ALERTS = "duplicate-alerts"
DEAD_LETTERS = "dead-letters"

#: Topics whose partition count follows the ``partitions`` override (they scale with the workers).
PARTITIONED = (LISTINGS, LISTING_EMBEDDINGS, SIMILAR_PRODUCTS)


@dataclass(frozen=True)
class TopicSpec:
    """One topic: logical key, broker name, partitions, Avro schema, retention policy."""

    key: str  # logical name, e.g. "listings"
    name: str  # actual topic name on the broker (prefix + key)
    partitions: int
    schema: str  # schema file stem in topics/schemas, e.g. "listing"
    compacted: bool = False

    def config(self) -> dict[str, str]:
        """Topic configs to pass to the admin client when the topic is created."""
        return {"cleanup.policy": "compact" if self.compacted else "delete"}


# (key, default partitions, schema stem, compacted)
_DEFAULTS: tuple[tuple[str, int, str, bool], ...] = (
    (LISTINGS, 4, "listing", False),
    # Compacted: the latest vectors of every listing stay, so an index replica can rebuild from it.
    (LISTING_EMBEDDINGS, 4, "listing_embedding", True),
    (SIMILAR_PRODUCTS, 4, "similar_products", False),
    (DUPLICATE_ALERTS, 2, "duplicate_alert", False),
    (DEAD_LETTERS, 1, "dead_letter", False),
)


def topic_specs(prefix: str = "", partitions: int | None = None) -> dict[str, TopicSpec]:
    """Return the spec of every topic, keyed by logical name.

    ``prefix`` is prepended to every broker topic name (tests use a unique prefix per test).
    ``partitions`` overrides the partition count of the partitioned topics (listings,
    listing-embeddings, similar-products), keeping listings and listing-embeddings equal.
    """
    if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, int)
                                   or partitions < 1):
        raise ConfigError(f"topic partitions must be a positive integer, got {partitions!r}")
    specs = {}
    for key, default_partitions, schema, compacted in _DEFAULTS:
        count = partitions if partitions is not None and key in PARTITIONED else default_partitions
        specs[key] = TopicSpec(key=key, name=f"{prefix}{key}", partitions=count, schema=schema,
                               compacted=compacted)
    return specs
