"""The one wire format of every samestyle topic: Avro single-object encoding, via fastavro.

A message is the marker 0xC3 0x01, the writer schema's 8-byte CRC-64-AVRO fingerprint
(little-endian) and the Avro binary body. ``encode`` writes the schema's current version;
``decode`` reads a record written with any known version of it (:mod:`samestyle.topics.history`),
found by its fingerprint, and resolves it to the current version (Avro schema resolution: a field
the writer lacked gets its default, a field the reader lacks is skipped), so producers and
consumers can be upgraded one at a time. A message of another schema, or of a version this
reader does not know, fails loudly. Decoded
``timestamp-millis`` fields are ``int`` milliseconds since the Unix epoch (UTC); ``encode`` also takes
a timezone-aware ``datetime``. ``encode`` raises :class:`~samestyle.topics.errors.BadInputError` for a
record that does not fit the schema; ``decode`` raises only :class:`~samestyle.topics.errors.DecodeError`.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import fastavro
import numpy as np
from fastavro.read import SchemaResolutionError

from samestyle.topics.errors import BadInputError, ConfigError, DecodeError
from samestyle.topics.history import SchemaSet, SchemaVersion, rabin_fingerprint
from samestyle.topics.registry import topic_specs

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)

_schemas: SchemaSet | None = None


def schemas() -> SchemaSet:
    """The schema set codecs are built from: the packaged ``topics/schemas`` unless
    :func:`use_schemas` (the entry point, from ``SAMESTYLE_SCHEMA_DIR``) chose another."""
    global _schemas
    if _schemas is None:
        _schemas = SchemaSet.load()
    return _schemas


def use_schemas(schema_set: SchemaSet | None) -> None:
    """Build every codec from now on from ``schema_set`` (None: the packaged folder again).

    Called once by a process's entry point before any codec is used; tests swap sets with it."""
    global _schemas
    _schemas = schema_set
    codec.cache_clear()


def use_schema_dir(overlay: Path | None) -> None:
    """:func:`use_schemas` with the packaged folder overlaid by ``overlay`` (``SAMESTYLE_SCHEMA_DIR``)."""
    use_schemas(SchemaSet.load(overlay) if overlay is not None else None)


def schema_names() -> list[str]:
    """Every schema name (the current ``.avsc`` files of the schema folder)."""
    return schemas().names()


def load_schema(schema_name: str) -> dict[str, Any]:
    """The current version of ``schema_name`` as a JSON object (a copy)."""
    return copy.deepcopy(schemas().current(schema_name).schema)


def _without_logical_types(schema: Any) -> Any:
    """A copy of a schema JSON with every ``logicalType`` annotation removed."""
    if isinstance(schema, list):
        return [_without_logical_types(s) for s in schema]
    if isinstance(schema, dict):
        return {k: _without_logical_types(v) for k, v in schema.items() if k != "logicalType"}
    return schema


def _is_timestamp(field_type: Any) -> bool:
    return isinstance(field_type, dict) and field_type.get("logicalType") == "timestamp-millis"


def _millis(value: datetime, field: str) -> int:
    if value.tzinfo is None or value.utcoffset() is None:
        raise BadInputError(f"field {field!r}: naive datetime {value.isoformat()}; "
                            "give a timezone-aware datetime or int milliseconds since the epoch")
    return (value - _EPOCH) // _MILLISECOND


_INT_RANGE = (-(2**31), 2**31 - 1)
_LONG_RANGE = (-(2**63), 2**63 - 1)
_FLOAT_MAX = 3.4028234663852886e38


def _short(value: Any) -> str:
    if isinstance(value, (str, bytes, bytearray)) and len(value) > 60:
        value = value[:60]  # a repr of a 2 KB vector is slow and useless in a message
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


#: Why a value does not fit: where below it (``.field``, ``[index]``) and what is wrong there.
_Why = tuple[str, str]


def _record_problem(value: Any, schema: Mapping[str, Any], named: Mapping[str, Any],
                    path: str) -> str | None:
    """Why ``value`` does not fit the (parsed) record ``schema``, or None when it fits; the
    message starts with where (``path``, then ``.field`` and ``[index]`` below it).

    fastavro's own validator is not used: its writer does not call it, and it formats an error
    message (JSON of the whole value) for every union branch it tries, which made encoding
    vectors slower than the pure-Python ``avro`` package.
    """
    why = _record_why(value, schema, named)
    return None if why is None else f"{path}{why[0]}: {why[1]}"


def _why(value: Any, schema: Any, named: Mapping[str, Any]) -> _Why | None:
    """Why ``value`` does not fit the (parsed) ``schema``, or None when it fits. The path is left
    to the caller, so nothing is formatted for a value that fits (every record encoded) nor for a
    union branch it does not."""
    if isinstance(schema, list):  # union: the first branch that fits is the one fastavro writes
        for branch in schema:
            if branch == "null":  # cheap
                if value is None:
                    return None
            elif _why(value, branch, named) is None:
                return None
        return "", f"{_short(value)} fits none of {_type_names(schema)}"
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    kind = schema["type"] if isinstance(schema, dict) else schema
    if isinstance(kind, (dict, list)) or (isinstance(schema, dict) and kind in named):
        return _why(value, kind, named)
    if kind == "null":
        ok = value is None
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind in ("int", "long"):
        low, high = _INT_RANGE if kind == "int" else _LONG_RANGE
        # numbers.Integral lets numpy ints through (FAISS returns them); bool is not a number here.
        if type(value) is int or (isinstance(value, numbers.Integral)
                                  and not isinstance(value, bool)):
            if low <= value <= high:
                return None
            return "", f"{value} is out of the {kind} range"
        ok = False
    elif kind in ("float", "double"):
        if type(value) is float or (isinstance(value, numbers.Real)
                                    and not isinstance(value, bool)):
            if kind == "float" and math.isfinite(value) and abs(value) > _FLOAT_MAX:
                return "", f"{value} is out of the float32 range"
            return None
        ok = False
    elif kind == "string":
        ok = isinstance(value, str)
    elif kind == "bytes":
        ok = isinstance(value, (bytes, bytearray))
    elif kind == "enum":
        if isinstance(value, str) and value in schema["symbols"]:
            return None
        return "", f"{_short(value)} is not one of {schema['symbols']}"
    elif kind == "array":
        if type(value) is not list and (not isinstance(value, Sequence)
                                        or isinstance(value, (str, bytes, bytearray))):
            return "", f"expected a list, got {type(value).__name__}"
        items = schema["items"]
        for i, item in enumerate(value):
            if (why := _why(item, items, named)) is not None:
                return f"[{i}]{why[0]}", why[1]
        return None
    elif kind == "map":
        if type(value) is not dict and not isinstance(value, Mapping):
            return "", f"expected a mapping, got {type(value).__name__}"
        values = schema["values"]
        for key, item in value.items():
            if not isinstance(key, str):
                return "", f"map key {_short(key)} is not a string"
            if (why := _why(item, values, named)) is not None:
                return f"[{key!r}]{why[0]}", why[1]
        return None
    elif kind == "record":
        return _record_why(value, schema, named)
    else:  # fixed and anything else: not used by our schemas
        return "", f"schema type {kind!r} is not supported by topics.codec"
    return None if ok else ("", f"expected {kind}, got {type(value).__name__} {_short(value)}")


#: id(record schema) -> (that schema, its field names); the schema is kept so the id stays its own.
_field_names: dict[int, tuple[Mapping[str, Any], frozenset[str]]] = {}


def _names_of(schema: Mapping[str, Any]) -> frozenset[str]:
    entry = _field_names.get(id(schema))
    if entry is None or entry[0] is not schema:
        entry = _field_names[id(schema)] = (schema, frozenset(f["name"] for f in schema["fields"]))
    return entry[1]


def _record_why(value: Any, schema: Mapping[str, Any], named: Mapping[str, Any]) -> _Why | None:
    if type(value) is not dict and not isinstance(value, Mapping):  # the ABC check is slow
        return "", f"expected a record (mapping), got {type(value).__name__}"
    unknown = value.keys() - _names_of(schema)
    if unknown:
        return "", f"unknown field(s) {sorted(map(str, unknown))}"
    for field in schema["fields"]:
        name = field["name"]
        if name not in value:
            if "default" in field:
                continue  # the writer fills it in
            return f".{name}", "missing required field"
        if (why := _why(value[name], field["type"], named)) is not None:
            return f".{name}{why[0]}", why[1]
    return None


def _type_names(union: list[Any]) -> list[str]:
    return [b if isinstance(b, str) else str(b.get("name", b.get("type"))) for b in union]


def _parse(schema: Mapping[str, Any], named: dict[str, Any]) -> Any:
    # Timestamps stay ints in both directions: see the module docstring.
    return fastavro.parse_schema(_without_logical_types(schema), named)


class Codec:
    """Encodes records with the current version of one Avro schema, in single-object encoding, and
    decodes records written with any known version of it into the current version."""

    schema_name: str
    fingerprint: bytes
    version: int

    def __init__(self, schema_name: str, schema_set: SchemaSet | None = None) -> None:
        schema_set = schema_set if schema_set is not None else schemas()
        current = schema_set.current(schema_name)
        raw = current.schema
        self.schema_name = schema_name
        self.schema = raw
        self.version = current.number
        self.record_name = f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")
        self.fingerprint = current.fingerprint
        self._header = MARKER + self.fingerprint
        self._schema_set = schema_set
        self._named: dict[str, Any] = {}
        self._parsed = _parse(raw, self._named)
        #: fingerprint -> the other versions of this schema a record may have been written with.
        self._writers: dict[bytes, SchemaVersion] = {
            v.fingerprint: v for v in schema_set.versions(schema_name) if v.fingerprint != self.fingerprint}
        self._parsed_writers: dict[bytes, Any] = {}
        self._timestamps = frozenset(f["name"] for f in raw["fields"] if _is_timestamp(f["type"]))
        # fastavro reads an Avro int as a 64-bit varint; Java rejects one past 32 bits, so do we.
        self._ints = tuple(f["name"] for f in raw["fields"] if f["type"] == "int")

    def __repr__(self) -> str:
        return f"Codec({self.schema_name!r}, v{self.version}, fingerprint={self.fingerprint.hex()})"

    def _writer_schema(self, fingerprint: bytes) -> Any:
        """The parsed writer schema of ``fingerprint`` (another version of this schema), or DecodeError."""
        parsed = self._parsed_writers.get(fingerprint)
        if parsed is not None:
            return parsed
        version = self._writers.get(fingerprint)
        if version is None:
            other = self._schema_set.version_of(fingerprint)
            if other is not None:
                raise DecodeError(f"{self.record_name}: message was written with schema {other.name!r} "
                                  f"(v{other.number}), expected {self.schema_name!r} ({self.fingerprint.hex()})")
            known = ", ".join(f"v{v.number} {v.fingerprint.hex()}" for v in self._schema_set.versions(self.schema_name))
            raise DecodeError(f"{self.record_name}: message was written with an unknown schema (fingerprint "
                              f"{fingerprint.hex()}): no version of {self.schema_name!r} this reader knows "
                              f"({known}); a producer on a newer version? Give this reader that version "
                              "(topics/schemas/history, or SAMESTYLE_SCHEMA_DIR) or upgrade it")
        parsed = self._parsed_writers[fingerprint] = _parse(version.schema, {})
        return parsed

    def _prepare(self, record: Mapping) -> Mapping:
        """Convert datetimes to millis and reject records that do not fit the schema."""
        if not isinstance(record, Mapping):
            raise BadInputError(f"{self.record_name}: expected a mapping, got "
                                f"{type(record).__name__}")
        if any(isinstance(record.get(name), datetime) for name in self._timestamps):
            record = dict(record)
            for name in self._timestamps:
                if isinstance(record.get(name), datetime):
                    record[name] = _millis(record[name], name)
        why = _record_problem(record, self._parsed, self._named, self.record_name)
        if why is not None:
            raise BadInputError(f"record does not fit schema {self.schema_name!r}: {why}")
        return record

    def encode(self, record: Mapping) -> bytes:
        """Single-object encoding of ``record``; raises BadInputError if it does not fit."""
        prepared = self._prepare(record)
        buf = io.BytesIO()
        buf.write(self._header)
        try:
            fastavro.schemaless_writer(buf, self._parsed, prepared)
        except Exception as err:  # validated above; anything left is still the caller's data
            raise BadInputError(f"{self.record_name} cannot be encoded: "
                                f"{type(err).__name__}: {err}") from err
        return buf.getvalue()

    def decode(self, data: bytes) -> dict:
        """Decode one single-object encoded record; raises DecodeError on anything else."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise DecodeError(f"{self.record_name}: expected bytes, got {type(data).__name__}")
        data = bytes(data)
        if len(data) < HEADER_SIZE:
            raise DecodeError(f"{self.record_name}: message too short ({len(data)} bytes); "
                              f"the single-object header alone is {HEADER_SIZE}")
        if data[:2] != MARKER:
            raise DecodeError(f"{self.record_name}: not Avro single-object encoding (marker "
                              f"{data[:2].hex()}, expected {MARKER.hex()})")
        fingerprint = data[2:HEADER_SIZE]
        writer = None if fingerprint == self.fingerprint else self._writer_schema(fingerprint)
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            # fastavro reads from an in-memory buffer: an absurd length prefix reads short and
            # fails with EOFError instead of allocating, and every array/map item consumes bytes,
            # so random input cannot loop for long. Whatever it raises is wrapped.
            if writer is None:
                record = fastavro.schemaless_reader(buf, self._parsed)
            else:  # another version: resolved into the current one
                record = fastavro.schemaless_reader(buf, writer, self._parsed)
        except SchemaResolutionError as err:  # a test enforces compatibility; a foreign version may not be
            raise DecodeError(f"{self.record_name}: a record of {self._writers[fingerprint].label} cannot be "
                              f"read as v{self.version}: {err}") from err
        except Exception as err:
            raise DecodeError(f"{self.record_name}: body is truncated or not Avro binary "
                              f"({type(err).__name__}: {err})") from err
        if buf.tell() != len(data):
            raise DecodeError(f"{self.record_name}: {len(data) - buf.tell()} trailing byte(s) "
                              "after the record")
        if not isinstance(record, dict):
            raise DecodeError(f"{self.record_name}: body did not decode to a record")
        for name in self._ints:
            if not _INT_RANGE[0] <= record[name] <= _INT_RANGE[1]:
                raise DecodeError(f"{self.record_name}.{name}: {record[name]} overflows "
                                  "an Avro int")
        return record


@functools.cache
def codec(schema_name: str) -> Codec:
    """The (cached) codec of the current version of ``schema_name``, e.g. ``codec("listing")``."""
    return Codec(schema_name)


@functools.cache
def _topic_schemas() -> dict[str, str | None]:
    """Logical topic key -> schema name (prefix and partitions do not change it)."""
    return {key: spec.schema for key, spec in topic_specs().items()}


def codec_for_topic(key: str) -> Codec:
    """The codec of a topic by its logical key, e.g. ``codec_for_topic("listings")``."""
    # Called once per decoded record on the worker's hot paths: two dict lookups, no spec building.
    schemas_by_key = _topic_schemas()
    if key not in schemas_by_key:
        raise ConfigError(f"unknown topic key {key!r}; known: {', '.join(schemas_by_key)}")
    return codec(schemas_by_key[key])


def vector_to_bytes(v: np.ndarray) -> bytes:
    """A 1-d vector as float32 little-endian bytes (the vector fields of listing_embedding)."""
    try:
        arr = np.asarray(v, dtype="<f4")
    except (TypeError, ValueError) as err:
        raise BadInputError(f"vector cannot be converted to float32: {err}") from err
    if arr.ndim != 1 or arr.size == 0:
        raise BadInputError(f"vector must be 1-d and non-empty, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise BadInputError("vector has NaN or infinite values")
    return arr.tobytes()


def bytes_to_vector(b: bytes, dim: int) -> np.ndarray:
    """float32 little-endian bytes back to a writable, contiguous float32 vector of ``dim``."""
    if not isinstance(b, (bytes, bytearray, memoryview)):
        raise DecodeError(f"vector: expected bytes, got {type(b).__name__}")
    try:
        dim = operator.index(dim)
    except TypeError:
        raise DecodeError(f"vector: dimension must be an int, got {dim!r}") from None
    if isinstance(dim, bool) or dim < 1:
        raise DecodeError(f"vector: dimension must be positive, got {dim!r}")
    if len(b) != 4 * dim:
        raise DecodeError(f"vector: {len(b)} bytes do not hold {dim} float32 values "
                          f"({4 * dim} bytes expected)")
    vec = np.frombuffer(b, dtype="<f4").astype(np.float32)  # copy: native order, writable
    if not np.isfinite(vec).all():
        raise DecodeError("vector has NaN or infinite values")
    return vec


__all__ = ["HEADER_SIZE", "MARKER", "Codec", "bytes_to_vector", "codec", "codec_for_topic", "load_schema",
           "rabin_fingerprint", "schema_names", "schemas", "use_schema_dir", "use_schemas", "vector_to_bytes"]
