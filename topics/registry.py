"""Every Kafka topic of the service, in one place: names, partition counts, schemas, configs.

The streaming app, the admin code that creates topics and the start-up check all read
:func:`topic_specs`; nothing else spells a topic name. ``listings`` and ``listing-embeddings`` must
keep the same number of partitions (co-partitioned by ``listing_id``). ``topic_specs(app_id=...)``
also lists the Faust table changelogs, so ``create_topics`` creates them before any worker starts.
Keys and the reasons behind them: docs/INTERNALS.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from samestyle.topics.errors import ConfigError

LISTINGS = "listings"
LISTING_EMBEDDINGS = "listing-embeddings"
SIMILAR_PRODUCTS = "similar-products"
DUPLICATE_ALERTS = "duplicate-alerts"
DEAD_LETTERS = "dead-letters"
CLICK_EVENTS = "click-events"
CLICK_PAIRS = "click-pairs"
POSITIVE_PAIRS = "positive-pairs"
MODEL_UPDATES = "model-updates"
MODERATION_DECISIONS = "moderation-decisions"

#: Faust tables of the pairs agent and the topic that feeds each (its changelog is
#: co-partitioned with that topic).
PAIRS_SESSIONS_TABLE = "pairs-sessions"
PAIRS_EVIDENCE_TABLE = "pairs-evidence"
TABLE_SOURCES: tuple[tuple[str, str], ...] = (
    (PAIRS_SESSIONS_TABLE, CLICK_EVENTS),
    (PAIRS_EVIDENCE_TABLE, CLICK_PAIRS),
)

#: Topics whose partition count follows the ``partitions`` override (they scale with the workers).
PARTITIONED = (LISTINGS, LISTING_EMBEDDINGS, SIMILAR_PRODUCTS)


@dataclass(frozen=True)
class TopicSpec:
    """One topic: logical key, broker name, partitions, Avro schema, retention policy."""

    key: str  # logical name, e.g. "listings"
    name: str  # actual topic name on the broker (prefix + key)
    partitions: int
    schema: str | None  # schema file stem in topics/schemas, e.g. "listing"; None: Faust changelog
    compacted: bool = False

    def config(self) -> dict[str, str]:
        """Topic configs to pass to the admin client when the topic is created."""
        return {"cleanup.policy": "compact" if self.compacted else "delete"}


# (key, default partitions, schema stem, compacted)
_DEFAULTS: tuple[tuple[str, int, str, bool], ...] = (
    # Compacted: the latest record of every listing survives, so a model switch can re-embed the
    # whole catalogue from it however old a listing is. A DELETE is an ordinary record (op DELETE),
    # not a null-value tombstone: it stays as the listing's last record, so a reader that starts
    # late or reads from offset 0 still learns the listing is gone.
    (LISTINGS, 4, "listing", True),
    # Compacted: the latest vectors of every listing stay, so an index replica can rebuild from it.
    (LISTING_EMBEDDINGS, 4, "listing_embedding", True),
    (SIMILAR_PRODUCTS, 4, "similar_products", False),
    (DUPLICATE_ALERTS, 2, "duplicate_alert", False),
    (DEAD_LETTERS, 1, "dead_letter", False),
    (CLICK_EVENTS, 4, "click_event", False),
    # Internal: clicks re-keyed by unordered pair (the click-events record; its session window and
    # origin in headers, streams/pairs/agents.py).
    (CLICK_PAIRS, 4, "click_event", False),
    # Compacted: one record per pair survives a re-send after a crash.
    (POSITIVE_PAIRS, 2, "positive_pair", True),
    # One partition: the order of decisions is the order workers apply them. Not compacted: the
    # whole history (promoted and rejected) stays, and a worker reads it from the start.
    (MODEL_UPDATES, 1, "model_update", False),
    # Keyed by the alert's listing id, like duplicate-alerts. Not compacted: every decision stays
    # (the audit trail; a later decision on a pair supersedes an earlier one).
    (MODERATION_DECISIONS, 2, "moderation_decision", False),
)


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for the changelog topic of ``table`` in application ``app_id``."""
    return f"{app_id}-{table}-changelog"


def topic_specs(prefix: str = "", partitions: int | None = None,
                app_id: str | None = None) -> dict[str, TopicSpec]:
    """Return the spec of every topic, keyed by logical name.

    ``prefix`` is prepended to every broker topic name (tests use a unique prefix per test).
    ``partitions`` overrides the partition count of the partitioned topics (listings,
    listing-embeddings, similar-products), keeping listings and listing-embeddings equal.
    ``app_id`` adds the changelog topic of every Faust table (key and name
    ``{app_id}-{table}-changelog``, no prefix: Faust names them itself; compacted, no schema),
    with the partition count of the topic that feeds the table.
    """
    if partitions is not None and (isinstance(partitions, bool) or not isinstance(partitions, int)
                                   or partitions < 1):
        raise ConfigError(f"topic partitions must be a positive integer, got {partitions!r}")
    specs = {}
    for key, default_partitions, schema, compacted in _DEFAULTS:
        count = partitions if partitions is not None and key in PARTITIONED else default_partitions
        specs[key] = TopicSpec(key=key, name=f"{prefix}{key}", partitions=count, schema=schema,
                               compacted=compacted)
    if app_id is not None:
        if not app_id:
            raise ConfigError("app_id must be a non-empty string")
        for table, source in TABLE_SOURCES:
            name = changelog_topic(app_id, table)
            specs[name] = TopicSpec(key=name, name=name, partitions=specs[source].partitions,
                                    schema=None, compacted=True)
    return specs
