"""Encoders, fusion, losses, training and evaluation for same-style product retrieval.

Imports without Kafka or Faust. The encoder API is re-exported lazily, so that importing a
light submodule (``models.data``) does not pay for importing torch and transformers.

    from samestyle.models import ListingInput, create_encoder
    encoder = create_encoder("default")          # CUDA when available
    vectors = encoder.encode([ListingInput("1", "red ceramic mug")]).image_text  # [1, 1664]
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ConcatEncoder": "samestyle.models.pretrained",
    "Embeddings": "samestyle.models.encoder",
    "Encoder": "samestyle.models.encoder",
    "EncoderConfig": "samestyle.models.encoder",
    "ListingInput": "samestyle.models.encoder",
    "NAMED_CONFIGS": "samestyle.models.encoder",
    "PreparedListing": "samestyle.models.encoder",
    "create_encoder": "samestyle.models.factory",
    "encoder_from_spec": "samestyle.models.factory",
    "load_config": "samestyle.models.encoder",
    "ImagePreprocessing": "samestyle.models.images",
    "decode_image": "samestyle.models.images",
    "load_image_bytes": "samestyle.models.images",
}

__all__ = [
    "NAMED_CONFIGS",
    "ConcatEncoder",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "ImagePreprocessing",
    "ListingInput",
    "PreparedListing",
    "create_encoder",
    "decode_image",
    "encoder_from_spec",
    "load_config",
    "load_image_bytes",
]

if TYPE_CHECKING:
    from samestyle.models.encoder import (
        NAMED_CONFIGS,
        Embeddings,
        Encoder,
        EncoderConfig,
        ListingInput,
        PreparedListing,
        load_config,
    )
    from samestyle.models.factory import create_encoder, encoder_from_spec
    from samestyle.models.images import ImagePreprocessing, decode_image, load_image_bytes
    from samestyle.models.pretrained import ConcatEncoder


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
