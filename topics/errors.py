"""The project's exceptions: one root, one level of families, a few leaves.

    SamestyleError
    ├── ConfigError            settings or a model/index config that cannot work
    ├── MissingWeightsError    pretrained weights are not where the config says
    ├── BrokerError            the embedded broker cannot start, or a topic is missing/misshapen
    ├── IndexStoreError        an index boundary check failed, or a snapshot cannot be read
    └── BadInputError          one message or listing cannot be processed; it goes to the
        │                      dead-letter topic with the reason and the stream goes on
        ├── DecodeError        bytes are not a record of the topic's schema
        ├── InvalidListingError  schema-valid but unusable (no title, oversized field, ...)
        └── ImageError         the image cannot be fetched or decoded

They live in ``topics`` because it is the dependency-free contract package that every other
package (models, index_store, streams) may import.
"""

from __future__ import annotations


class SamestyleError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(SamestyleError):
    """A setting or config value that cannot work."""


class MissingWeightsError(SamestyleError):
    """Pretrained weights are missing: never fall back to random weights outside tests."""


class BrokerError(SamestyleError):
    """The broker cannot be started or reached, or its topics do not match the registry."""


class IndexStoreError(SamestyleError):
    """Bad input at the index boundary, or an unreadable snapshot."""


class BadInputError(SamestyleError):
    """One message cannot be processed; it is dead-lettered with ``str(error)`` as the reason."""


class DecodeError(BadInputError):
    """The bytes are not a record of the expected schema (or not in our wire format)."""


class InvalidListingError(BadInputError):
    """A schema-valid listing that cannot be embedded: missing title, oversized field, ..."""


class ImageError(BadInputError):
    """The listing's image cannot be fetched or decoded."""
