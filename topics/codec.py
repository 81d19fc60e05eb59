"""The one wire format of every samestyle topic: Avro single-object encoding, via fastavro.

A message is the marker 0xC3 0x01, the writer schema's 8-byte CRC-64-AVRO fingerprint
(little-endian) and the Avro binary body, so a message of the wrong schema fails loudly. Decoded
``timestamp-millis`` fields are ``int`` milliseconds since the Unix epoch (UTC); ``encode`` also takes
a timezone-aware ``datetime``. ``encode`` raises :class:`~samestyle.topics.errors.BadInputError` for a
record that does not fit the schema; ``decode`` raises only :class:`~samestyle.topics.errors.DecodeError`.
"""

from __future__ import annotations

import functools
import io
import json
import math
import numbers
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any

import fastavro
import numpy as np
from fastavro.schema import fingerprint, to_parsing_canonical_form

from samestyle.topics.errors import BadInputError, ConfigError, DecodeError
from samestyle.topics.registry import topic_specs

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MILLISECOND = timedelta(milliseconds=1)

def rabin_fingerprint(data: bytes) -> bytes:
    """CRC-64-AVRO fingerprint of ``data`` (a schema's Parsing Canonical Form), as 8 little-endian bytes."""
    return bytes.fromhex(fingerprint(data.decode("utf-8"), "CRC-64-AVRO"))


def schema_names() -> list[str]:
    """Stems of every ``.avsc`` file in ``topics/schemas``."""
    folder = resources.files("samestyle.topics") / "schemas"
    return sorted(p.name[: -len(".avsc")] for p in folder.iterdir() if p.name.endswith(".avsc"))


def load_schema(schema_name: str) -> dict[str, Any]:
    """The schema ``topics/schemas/<schema_name>.avsc`` as a JSON object."""
    if schema_name not in schema_names():
        raise ConfigError(f"no Avro schema {schema_name!r}; known: {', '.join(schema_names())}")
    text = (resources.files("samestyle.topics") / "schemas" / f"{schema_name}.avsc").read_text("utf-8")
    return json.loads(text)


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


def _problem(value: Any, schema: Any, named: Mapping[str, Any], path: str) -> str | None:
    """Why ``value`` does not fit the (parsed) ``schema``, or None when it fits.

    fastavro's own validator is not used: its writer does not call it, and it formats an error
    message (JSON of the whole value) for every union branch it tries, which made encoding
    vectors slower than the pure-Python ``avro`` package.
    """
    if isinstance(schema, list):  # union: the first branch that fits is the one fastavro writes
        for branch in schema:
            if branch == "null":  # cheap, and spares building a message for every non-null value
                if value is None:
                    return None
            elif _problem(value, branch, named, path) is None:
                return None
        return f"{path}: {_short(value)} fits none of {_type_names(schema)}"
    if isinstance(schema, str) and schema in named:
        schema = named[schema]
    kind = schema["type"] if isinstance(schema, dict) else schema
    if isinstance(kind, (dict, list)) or (isinstance(schema, dict) and kind in named):
        return _problem(value, kind, named, path)
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
            return f"{path}: {value} is out of the {kind} range"
        ok = False
    elif kind in ("float", "double"):
        if type(value) is float or (isinstance(value, numbers.Real)
                                    and not isinstance(value, bool)):
            if kind == "float" and math.isfinite(value) and abs(value) > _FLOAT_MAX:
                return f"{path}: {value} is out of the float32 range"
            return None
        ok = False
    elif kind == "string":
        ok = isinstance(value, str)
    elif kind == "bytes":
        ok = isinstance(value, (bytes, bytearray))
    elif kind == "enum":
        if isinstance(value, str) and value in schema["symbols"]:
            return None
        return f"{path}: {_short(value)} is not one of {schema['symbols']}"
    elif kind == "array":
        if not isinstance(value, Sequence) or isinstance(value, (str, bytes, bytearray)):
            return f"{path}: expected a list, got {type(value).__name__}"
        for i, item in enumerate(value):
            if (why := _problem(item, schema["items"], named, f"{path}[{i}]")) is not None:
                return why
        return None
    elif kind == "map":
        if not isinstance(value, Mapping):
            return f"{path}: expected a mapping, got {type(value).__name__}"
        for key, item in value.items():
            if not isinstance(key, str):
                return f"{path}: map key {_short(key)} is not a string"
            if (why := _problem(item, schema["values"], named, f"{path}[{key!r}]")) is not None:
                return why
        return None
    elif kind == "record":
        return _record_problem(value, schema, named, path)
    else:  # fixed and anything else: not used by our schemas
        return f"{path}: schema type {kind!r} is not supported by topics.codec"
    return None if ok else f"{path}: expected {kind}, got {type(value).__name__} {_short(value)}"


def _record_problem(value: Any, schema: Mapping[str, Any], named: Mapping[str, Any],
                    path: str) -> str | None:
    if not isinstance(value, Mapping):
        return f"{path}: expected a record (mapping), got {type(value).__name__}"
    fields = schema["fields"]
    unknown = value.keys() - {f["name"] for f in fields}
    if unknown:
        return f"{path}: unknown field(s) {sorted(map(str, unknown))}"
    for field in fields:
        name = field["name"]
        if name not in value:
            if "default" in field:
                continue  # the writer fills it in
            return f"{path}.{name}: missing required field"
        if (why := _problem(value[name], field["type"], named, f"{path}.{name}")) is not None:
            return why
    return None


def _type_names(union: list[Any]) -> list[str]:
    return [b if isinstance(b, str) else str(b.get("name", b.get("type"))) for b in union]


class Codec:
    """Encodes and decodes the records of one Avro schema in single-object encoding."""

    schema_name: str
    fingerprint: bytes

    def __init__(self, schema_name: str) -> None:
        raw = load_schema(schema_name)
        self.schema_name = schema_name
        self.schema = raw
        self.record_name = f"{raw.get('namespace', '')}.{raw['name']}".lstrip(".")
        canonical = to_parsing_canonical_form(raw)
        self.fingerprint = rabin_fingerprint(canonical.encode("utf-8"))
        self._header = MARKER + self.fingerprint
        # Timestamps stay ints in both directions: see the module docstring.
        self._named: dict[str, Any] = {}
        self._parsed = fastavro.parse_schema(_without_logical_types(raw), self._named)
        self._timestamps = frozenset(f["name"] for f in raw["fields"] if _is_timestamp(f["type"]))
        # fastavro reads an Avro int as a 64-bit varint; Java rejects one past 32 bits, so do we.
        self._ints = tuple(f["name"] for f in raw["fields"] if f["type"] == "int")

    def __repr__(self) -> str:
        return f"Codec({self.schema_name!r}, fingerprint={self.fingerprint.hex()})"

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
        if fingerprint != self.fingerprint:
            other = _schema_by_fingerprint().get(fingerprint)
            written_by = (f"schema {other!r}" if other is not None
                          else f"an unknown schema (fingerprint {fingerprint.hex()})")
            raise DecodeError(f"{self.record_name}: message was written with {written_by}, "
                              f"expected {self.schema_name!r} ({self.fingerprint.hex()})")
        buf = io.BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            # fastavro reads from an in-memory buffer: an absurd length prefix reads short and
            # fails with EOFError instead of allocating, and every array/map item consumes bytes,
            # so random input cannot loop for long. Whatever it raises is wrapped.
            record = fastavro.schemaless_reader(buf, self._parsed)
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
    """The (cached) codec of ``topics/schemas/<schema_name>.avsc``, e.g. ``codec("listing")``."""
    return Codec(schema_name)


def codec_for_topic(key: str) -> Codec:
    """The codec of a topic by its logical key, e.g. ``codec_for_topic("listings")``."""
    specs = topic_specs()
    if key not in specs:
        raise ConfigError(f"unknown topic key {key!r}; known: {', '.join(specs)}")
    return codec(specs[key].schema)


@functools.cache
def _schema_by_fingerprint() -> dict[bytes, str]:
    return {codec(name).fingerprint: name for name in schema_names()}


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
