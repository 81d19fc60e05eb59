"""The contract between the services: topic names, partitions, Avro schemas and the wire codec.

Imports nothing heavy (no faust, kafka or torch), so every package may depend on it.
"""

from samestyle.topics.codec import Codec, bytes_to_vector, codec, codec_for_topic, vector_to_bytes
from samestyle.topics.registry import (
    CLICK_EVENTS,
    CLICK_PAIRS,
    DEAD_LETTERS,
    DUPLICATE_ALERTS,
    LISTING_EMBEDDINGS,
    LISTINGS,
    MODEL_UPDATES,
    MODERATION_DECISIONS,
    POSITIVE_PAIRS,
    SIMILAR_PRODUCTS,
    TopicSpec,
    changelog_topic,
    topic_specs,
)

__all__ = [
    "CLICK_EVENTS",
    "CLICK_PAIRS",
    "DEAD_LETTERS",
    "DUPLICATE_ALERTS",
    "LISTINGS",
    "LISTING_EMBEDDINGS",
    "MODEL_UPDATES",
    "MODERATION_DECISIONS",
    "POSITIVE_PAIRS",
    "SIMILAR_PRODUCTS",
    "Codec",
    "TopicSpec",
    "bytes_to_vector",
    "changelog_topic",
    "codec",
    "codec_for_topic",
    "topic_specs",
    "vector_to_bytes",
]
