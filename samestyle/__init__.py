"""samestyle: same-style product retrieval and duplicate-listing detection over Kafka streams.

The public surface is the names in ``__all__``; everything else is reached through the
sub-packages (``samestyle.models``, ``samestyle.index_store``, ``samestyle.topics``,
``samestyle.streams``). Importing ``samestyle`` is cheap: names load on first use, so a client of
the topic contract never imports torch or faust.

    from samestyle import ListingInput, create_encoder
    encoder = create_encoder("default")
    vectors = encoder.encode([ListingInput("1", "red ceramic mug")]).image_text
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("samestyle")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "BadInputError": "samestyle.topics.errors",
    "ConfigError": "samestyle.topics.errors",
    "DecodeError": "samestyle.topics.errors",
    "Embeddings": "samestyle.models.encoder",
    "Encoder": "samestyle.models.encoder",
    "EncoderConfig": "samestyle.models.encoder",
    "LiveIndex": "samestyle.index_store.live",
    "ListingInput": "samestyle.models.encoder",
    "SamestyleError": "samestyle.topics.errors",
    "Settings": "samestyle.streams.settings",
    "TopicSpec": "samestyle.topics.registry",
    "codec_for_topic": "samestyle.topics.codec",
    "create_encoder": "samestyle.models.factory",
    "encoder_from_spec": "samestyle.models.factory",
    "topic_specs": "samestyle.topics.registry",
}

__all__ = [
    "BadInputError",
    "ConfigError",
    "DecodeError",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "ListingInput",
    "LiveIndex",
    "SamestyleError",
    "Settings",
    "TopicSpec",
    "__version__",
    "codec_for_topic",
    "create_encoder",
    "encoder_from_spec",
    "topic_specs",
]

if TYPE_CHECKING:
    from samestyle.index_store.live import LiveIndex
    from samestyle.models.encoder import Embeddings, Encoder, EncoderConfig, ListingInput
    from samestyle.models.factory import create_encoder, encoder_from_spec
    from samestyle.streams.settings import Settings
    from samestyle.topics.codec import codec_for_topic
    from samestyle.topics.errors import BadInputError, ConfigError, DecodeError, SamestyleError
    from samestyle.topics.registry import TopicSpec, topic_specs


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samestyle' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
