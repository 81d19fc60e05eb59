"""topics: the registry, the Avro schemas and the single-object wire codec."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import avro.io
import avro.schema
import fastavro
import numpy as np
import pytest
from fastavro.schema import fingerprint as fastavro_fingerprint
from fastavro.schema import to_parsing_canonical_form
from hypothesis import given, settings
from hypothesis import strategies as st

from samestyle import topics
from samestyle.topics import (
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
    Codec,
    TopicSpec,
    bytes_to_vector,
    changelog_topic,
    codec,
    codec_for_topic,
    topic_specs,
    vector_to_bytes,
)
from samestyle.topics.codec import (
    HEADER_SIZE,
    MARKER,
    _without_logical_types,
    load_schema,
    rabin_fingerprint,
    schema_names,
)
from samestyle.topics.errors import BadInputError, ConfigError, DecodeError

T0 = 1_717_171_717_123  # 2024-05-31T16:08:37.123Z
DIM = 8
SCHEMAS = ["listing", "listing_embedding", "similar_products", "duplicate_alert", "dead_letter",
           "click_event", "positive_pair", "model_update", "moderation_decision"]


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def realistic(schema_name: str) -> dict[str, Any]:
    """A fully populated record of each schema, as the services produce them."""
    records: dict[str, dict[str, Any]] = {
        "listing": {
            "listing_id": "L000123",
            "supplier_id": "S42",
            "category": "home-garden/drinkware",
            "title": "Handmade ceramic frog mug, 350 ml, green glaze",
            "description": "Dishwasher safe. Each piece is unique: glaze varies slightly. ☕🐸",
            "attributes": {"brand": "Acme", "colour": "green", "material": "ceramic"},
            "image_uri": "file:///data/images/L000123.jpg",
            "image_bytes": b"\xff\xd8\xff\xe0fake-jpeg",
            "op": "UPSERT",
            "event_time": T0,
        },
        "listing_embedding": {
            "listing_id": "L000123",
            "supplier_id": "S42",
            "category": "home-garden/drinkware",
            "title": "Handmade ceramic frog mug, 350 ml, green glaze",
            "op": "UPSERT",
            "model_version": "crossbert-v3",
            "dim": DIM,
            "has_image": True,
            "vector_image": vector_to_bytes(_unit(1)),
            "vector_text": vector_to_bytes(_unit(2)),
            "vector_image_text": vector_to_bytes(_unit(3)),
            "image_uri": "file:///srv/images/L000123.jpg",
            "match_text": "Handmade ceramic frog mug, 350 ml, green glaze",
            "reembed": False,
            "next_model": {"model_version": "crossbert-v4", "dim": DIM, "vector_image": None,
                           "vector_text": vector_to_bytes(_unit(4)),
                           "vector_image_text": vector_to_bytes(_unit(5)),
                           "match_text": "Handmade ceramic frog mug, 350 ml, green glaze | description wheel-thrown"},
            "event_time": T0,
            "embedded_at": T0 + 850,
        },
        "similar_products": {
            "listing_id": "L000123",
            "supplier_id": "S42",
            "neighbours": [
                {"listing_id": "L000777", "supplier_id": "S7", "score": 0.9375},
                {"listing_id": "L000999", "supplier_id": "S42", "score": 0.5},
            ],
            "model_version": "crossbert-v3",
            "event_time": T0,
            "emitted_at": T0 + 1200,
        },
        "duplicate_alert": {
            "listing_id": "L000123",
            "duplicate_of": "L000999",
            "supplier_id": "S42",
            "score": 0.96875,
            "scores": {"image": None, "text": 0.875, "image_text": 0.96875},
            "model_version": "crossbert-v3",
            "probability": 0.9375,
            "threshold": 0.5,
            "decided_by": "classifier",
            "reason": "duplicate probability 0.938 >= 0.500 by the model's classifier, image+text cosine 0.969, "
                      "with an older listing of the same supplier",
            "event_time": T0,
            "emitted_at": T0 + 1200,
        },
        "dead_letter": {
            "original_key": b"L000123",
            "original_value": b"\x00garbage",
            "topic": "listings",
            "partition": 3,
            "offset": 2**40,
            "stage": "embed",
            "error_type": "DecodeError",
            "error": "samestyle.Listing: message too short (8 bytes)",
            "failed_at": T0 + 5,
        },
        "click_event": {
            "session_id": "sess-8f2a",
            "user_id": "u-17",
            "query": "frog mug",
            "trigger_id": "L000123",
            "clicked_id": "L000777",
            "position": 2,
            "dwell_ms": 41_250,
            "event_time": T0,
        },
        "positive_pair": {
            "listing_id_a": "L000123",
            "listing_id_b": "L000777",
            "category": "home-garden > drinkware",
            "co_clicks": 5,
            "sessions": 3,
            "dwell_ms_total": 180_500,
            "relevance_score": 0.8125,
            "model_version": "crossbert-v3",
            "event_time": T0,
            "emitted_at": T0 + 40,
        },
        "model_update": {
            "version": "unified-abt-20261124T101500Z-3f9c",
            "model_dir": "/srv/samestyle/models/unified-abt-20261124T101500Z-3f9c",
            "decision": "PROMOTED",
            "previous_version": "pretrained-concat-v1",
            "metric": "valid_f1",
            "score": 0.8125,
            "previous_score": 0.5,
            "pairs_used": 812,
            "reason": "valid_f1 0.8125 > 0.5000 of pretrained-concat-v1",
            "created_at": T0 + 99,
        },
        "moderation_decision": {
            "listing_id": "L000123",
            "duplicate_of": "L000007",
            "decision": "confirmed",
            "moderator_id": "moderator-ana",
            "decided_at": T0 + 120,
            "model_version": "unified-abt-20261124T101500Z-3f9c",
            "probability": 0.9375,
        },
    }
    return records[schema_name]


# --- registry ---------------------------------------------------------------------------------


def test_registry_defaults() -> None:
    specs = topic_specs()
    assert list(specs) == [LISTINGS, LISTING_EMBEDDINGS, SIMILAR_PRODUCTS, DUPLICATE_ALERTS,
                           DEAD_LETTERS, CLICK_EVENTS, CLICK_PAIRS, POSITIVE_PAIRS, MODEL_UPDATES,
                           MODERATION_DECISIONS]
    assert {k: s.partitions for k, s in specs.items()} == {
        "listings": 4, "listing-embeddings": 4, "similar-products": 4,
        "duplicate-alerts": 2, "dead-letters": 1, "click-events": 4, "click-pairs": 4,
        "positive-pairs": 2, "model-updates": 1, "moderation-decisions": 2}
    assert all(isinstance(s, TopicSpec) and s.key == k and s.name == k for k, s in specs.items())
    # The catalogue outlives retention: the latest record of every listing stays (a model switch
    # re-embeds from it); so do the latest vectors and the mined pairs.
    assert [k for k, s in specs.items() if s.compacted] == [LISTINGS, LISTING_EMBEDDINGS, POSITIVE_PAIRS]
    assert specs[LISTINGS].config() == specs[LISTING_EMBEDDINGS].config() == {"cleanup.policy": "compact"}
    assert specs[SIMILAR_PRODUCTS].config() == {"cleanup.policy": "delete"}


def test_registry_prefix_applies_to_every_name() -> None:
    specs = topic_specs(prefix="t-1234-")
    assert {s.name for s in specs.values()} == {f"t-1234-{k}" for k in specs}
    assert set(specs) == set(topic_specs())  # keys stay logical


@pytest.mark.parametrize("partitions", [None, 1, 3, 16])
def test_registry_co_partitioning_and_override(partitions: int | None) -> None:
    specs = topic_specs(partitions=partitions)
    assert specs[LISTINGS].partitions == specs[LISTING_EMBEDDINGS].partitions
    expected = 4 if partitions is None else partitions
    for key in (LISTINGS, LISTING_EMBEDDINGS, SIMILAR_PRODUCTS):
        assert specs[key].partitions == expected
    assert specs[DUPLICATE_ALERTS].partitions == 2
    assert specs[DEAD_LETTERS].partitions == 1


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "4"])
def test_registry_rejects_bad_partition_counts(bad: Any) -> None:
    with pytest.raises(ConfigError):
        topic_specs(partitions=bad)


def test_topic_spec_is_frozen() -> None:
    spec = topic_specs()[LISTINGS]
    with pytest.raises(AttributeError):
        spec.partitions = 8  # type: ignore[misc]


def test_registry_adds_table_changelogs_for_an_app_id() -> None:
    plain = topic_specs("t-1-", partitions=3)
    specs = topic_specs("t-1-", partitions=3, app_id="app-x")
    extra = {k: s for k, s in specs.items() if k not in plain}
    assert {k: s.partitions for k, s in extra.items()} == {
        "app-x-pairs-sessions-changelog": plain[CLICK_EVENTS].partitions,
        "app-x-pairs-evidence-changelog": plain[CLICK_PAIRS].partitions}
    # Faust names changelogs itself: no topic prefix; they are compacted and carry JSON, not Avro.
    assert all(s.name == k and s.compacted and s.schema is None for k, s in extra.items())
    assert changelog_topic("app-x", "pairs-evidence") == "app-x-pairs-evidence-changelog"
    assert {k: s for k, s in specs.items() if k in plain} == plain
    with pytest.raises(ConfigError):
        topic_specs(app_id="")


def test_every_topic_has_a_schema_and_codec() -> None:
    specs = topic_specs()
    # click-events and click-pairs share the click_event schema.
    assert sorted({s.schema for s in specs.values()}) == sorted(schema_names()) == sorted(SCHEMAS)
    for key, spec in specs.items():
        assert codec_for_topic(key) is codec(spec.schema)
    with pytest.raises(ConfigError):
        codec_for_topic("no-such-topic")
    with pytest.raises(ConfigError):
        codec("no_such_schema")


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_schema_files_are_documented(name: str) -> None:
    schema = load_schema(name)
    assert schema["namespace"] == "samestyle"
    assert schema["type"] == "record"
    for field in schema["fields"]:
        assert field.get("doc"), f"{name}.{field['name']} has no doc"
    fastavro.parse_schema(schema)
    avro.schema.parse(json.dumps(schema))


def test_listing_title_is_nullable_and_defaults_fill_in() -> None:
    c = codec("listing")
    decoded = c.decode(c.encode({"listing_id": "L1", "event_time": T0}))
    assert decoded == {
        "listing_id": "L1", "supplier_id": None, "category": None, "title": None,
        "description": None, "attributes": {}, "image_uri": None, "image_bytes": None,
        "op": "UPSERT", "event_time": T0}


# --- codec: round trips and wire format -------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_round_trip(name: str) -> None:
    c = codec(name)
    record = realistic(name)
    assert c.decode(c.encode(record)) == record


def test_round_trip_delete_embedding() -> None:
    c = codec("listing_embedding")
    record = {**realistic("listing_embedding"), "op": "DELETE", "title": None,
              "has_image": False, "vector_image": None, "vector_text": None,
              "vector_image_text": None, "image_uri": None, "match_text": None}
    assert c.decode(c.encode(record)) == record


def test_timestamps_accept_aware_datetimes_and_decode_as_int_millis() -> None:
    c = codec("listing_embedding")
    when = datetime.fromtimestamp(T0 / 1000, tz=timezone(timedelta(hours=2)))
    record = {**realistic("listing_embedding"), "event_time": when}
    decoded = c.decode(c.encode(record))
    assert decoded["event_time"] == T0 and type(decoded["event_time"]) is int
    assert decoded["embedded_at"] == T0 + 850
    assert record["event_time"] is when  # the caller's record is not modified


def test_naive_datetime_is_rejected() -> None:
    c = codec("listing")
    with pytest.raises(BadInputError, match="naive"):
        c.encode({"listing_id": "L1", "event_time": datetime(2024, 1, 1)})


def test_numpy_scalars_encode() -> None:
    c = codec("similar_products")
    record = realistic("similar_products")
    record["neighbours"][0]["score"] = np.float32(0.25)
    record["event_time"] = np.int64(T0)
    decoded = c.decode(c.encode(record))
    assert decoded["neighbours"][0]["score"] == 0.25 and decoded["event_time"] == T0


@pytest.mark.parametrize("name", SCHEMAS)
def test_wire_format_header(name: str) -> None:
    c = codec(name)
    data = c.encode(realistic(name))
    assert data[:2] == b"\xc3\x01" == MARKER
    assert data[2:HEADER_SIZE] == c.fingerprint and len(c.fingerprint) == 8
    canonical = to_parsing_canonical_form(load_schema(name))
    assert c.fingerprint == rabin_fingerprint(canonical.encode())
    # fastavro's CRC-64-AVRO, and the avro package on the logical-type-free schema (whose
    # canonical form it gets right), agree with ours.
    assert fastavro_fingerprint(canonical, "CRC-64-AVRO") == c.fingerprint.hex()
    stripped = avro.schema.parse(json.dumps(_without_logical_types(load_schema(name))))
    assert stripped.fingerprint("CRC-64-AVRO") == c.fingerprint


def test_rabin_fingerprint_matches_the_spec_value_for_int() -> None:
    # Java: SchemaNormalization.parsingFingerprint64("int") == 8247732601305521295 (0x7275d5...)
    assert rabin_fingerprint(b'"int"') == struct.pack("<q", 8247732601305521295)


def test_fingerprints_are_distinct() -> None:
    assert len({codec(n).fingerprint for n in SCHEMAS}) == len(SCHEMAS)


def test_body_is_plain_avro_binary_readable_by_the_avro_package() -> None:
    c = codec("listing")
    record = realistic("listing")
    data = c.encode(record)
    schema = avro.schema.parse(json.dumps(_without_logical_types(load_schema("listing"))))
    reader = avro.io.DatumReader(schema)
    assert reader.read(avro.io.BinaryDecoder(io.BytesIO(data[HEADER_SIZE:]))) == record


def test_codec_is_cached() -> None:
    assert codec("listing") is codec("listing")
    assert isinstance(codec("listing"), Codec)
    assert codec_for_topic(LISTINGS).schema_name == "listing"


# --- codec: encode errors ---------------------------------------------------------------------


@pytest.mark.parametrize(("name", "change", "match"), [
    ("listing", {"listing_id": None}, "listing_id"),
    ("listing", {"titel": "typo"}, "unknown field"),
    ("listing", {"op": "MERGE"}, "op"),
    ("listing", {"attributes": {"size": 3}}, "attributes"),
    ("listing", {"image_bytes": "not bytes"}, "image_bytes"),
    ("listing", {"event_time": 1.5}, "event_time"),
    ("listing_embedding", {"dim": 3.7}, "dim"),
    ("listing_embedding", {"dim": 2**31}, "out of the int range"),
    ("listing_embedding", {"dim": True}, "dim"),
    ("listing_embedding", {"has_image": 1}, "has_image"),
    ("similar_products", {"neighbours": [{"listing_id": "x", "supplier_id": "y"}]}, "score"),
    ("similar_products", {"neighbours": "L1"}, "neighbours"),
    ("duplicate_alert", {"scores": {"image": 0.5, "text": "high", "image_text": 0.9}}, "text"),
    ("duplicate_alert", {"score": 1e39}, "float32 range"),
    ("moderation_decision", {"decision": "maybe"}, "decision"),
    ("dead_letter", {"offset": 2**63}, "offset"),
])
def test_encode_rejects_records_that_do_not_fit(name: str, change: dict[str, Any],
                                                match: str) -> None:
    record = {**realistic(name), **change}
    with pytest.raises(BadInputError, match=match):
        codec(name).encode(record)


def test_encode_rejects_missing_required_field_and_non_mappings() -> None:
    c = codec("listing")
    with pytest.raises(BadInputError, match="event_time: missing required field"):
        c.encode({"listing_id": "L1"})
    with pytest.raises(BadInputError, match="mapping"):
        c.encode(["L1", T0])  # type: ignore[arg-type]
    # BadInputError, not DecodeError: a producer bug, not a bad message on the wire.
    with pytest.raises(BadInputError) as info:
        c.encode({"listing_id": "L1"})
    assert not isinstance(info.value, DecodeError)


# --- codec: decode errors ---------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_truncation_is_a_decode_error(name: str) -> None:
    c = codec(name)
    data = c.encode(realistic(name))
    for end in range(len(data)):
        with pytest.raises(DecodeError):
            c.decode(data[:end])


@pytest.mark.parametrize("name", SCHEMAS)
def test_trailing_bytes_are_a_decode_error(name: str) -> None:
    c = codec(name)
    with pytest.raises(DecodeError, match="trailing"):
        c.decode(c.encode(realistic(name)) + b"\x00")


def test_other_schemas_bytes_are_a_decode_error_naming_it() -> None:
    data = codec("dead_letter").encode(realistic("dead_letter"))
    with pytest.raises(DecodeError, match="'dead_letter'"):
        codec("listing").decode(data)


def test_unknown_fingerprint_marker_and_short_input() -> None:
    c = codec("listing")
    data = c.encode(realistic("listing"))
    with pytest.raises(DecodeError, match="unknown schema"):
        c.decode(data[:2] + b"\x00" * 8 + data[HEADER_SIZE:])
    with pytest.raises(DecodeError, match="marker"):
        c.decode(b"\x00\x01" + data[2:])
    with pytest.raises(DecodeError, match="too short"):
        c.decode(MARKER)
    with pytest.raises(DecodeError, match="expected bytes"):
        c.decode(None)  # type: ignore[arg-type]


def _zigzag_varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@pytest.mark.parametrize("length", [2**62, 2**31, -(2**62), -1])
def test_absurd_lengths_fail_fast(length: int) -> None:
    # A string length / map block count claiming exabytes must neither allocate nor loop.
    for name, body in [("listing", _zigzag_varint(length)),
                       ("listing", b"\x02a" + b"\x00" * 4 + _zigzag_varint(length)),
                       ("similar_products", b"\x02a\x02b" + _zigzag_varint(length))]:
        c = codec(name)
        start = time.perf_counter()
        with pytest.raises(DecodeError):
            c.decode(MARKER + c.fingerprint + body)
        assert time.perf_counter() - start < 0.5


@settings(max_examples=300, deadline=None, database=None)
@given(data=st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(data: bytes) -> None:
    for name in SCHEMAS:
        with pytest.raises(DecodeError):
            codec(name).decode(data)


@settings(max_examples=300, deadline=None, database=None)
@given(name=st.sampled_from(SCHEMAS), body=st.binary(max_size=512))
def test_random_bodies_behind_a_valid_header_decode_or_raise_decode_error(
        name: str, body: bytes) -> None:
    c = codec(name)
    try:
        record = c.decode(MARKER + c.fingerprint + body)
    except DecodeError:
        return
    # Whatever does decode is a record of the schema (varints may be non-minimal, so the bytes
    # need not come back identical).
    c.encode(record)


@settings(max_examples=200, deadline=None, database=None)
@given(name=st.sampled_from(SCHEMAS), data=st.data())
def test_mutated_messages_decode_or_raise_decode_error(name: str, data: st.DataObject) -> None:
    c = codec(name)
    message = bytearray(c.encode(realistic(name)))
    pos = data.draw(st.integers(HEADER_SIZE, len(message) - 1))
    message[pos] = data.draw(st.integers(0, 255))
    try:
        c.decode(bytes(message))
    except DecodeError:
        pass


# --- vector helpers ---------------------------------------------------------------------------


def test_vector_round_trip_is_float32_little_endian() -> None:
    v = np.array([1.0, -0.5, 0.25, 3.0e-8], dtype=np.float64)
    b = vector_to_bytes(v)
    assert b == struct.pack("<4f", *v)
    out = bytes_to_vector(b, 4)
    assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
    np.testing.assert_array_equal(out, v.astype(np.float32))
    assert bytes_to_vector(b, np.int64(4)).shape == (4,)
    big_endian = np.array([1.0, 2.0], dtype=">f4")
    assert vector_to_bytes(big_endian) == struct.pack("<2f", 1.0, 2.0)


def test_vector_dimension_checks() -> None:
    b = vector_to_bytes(_unit(0))
    with pytest.raises(DecodeError, match="do not hold"):
        bytes_to_vector(b, DIM + 1)
    with pytest.raises(DecodeError, match="do not hold"):
        bytes_to_vector(b[:-1], DIM)
    for bad_dim in (0, -1, True, 2.0):
        with pytest.raises(DecodeError):
            bytes_to_vector(b, bad_dim)  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="NaN"):
        bytes_to_vector(struct.pack("<2f", 1.0, float("nan")), 2)
    with pytest.raises(DecodeError):
        bytes_to_vector(None, 2)  # type: ignore[arg-type]


def test_vector_to_bytes_rejects_bad_vectors() -> None:
    for bad in (np.zeros((2, 4), np.float32), np.zeros(0, np.float32),
                np.array([1.0, np.inf]), ["a", "b"]):
        with pytest.raises(BadInputError):
            vector_to_bytes(bad)  # type: ignore[arg-type]


# --- packaging --------------------------------------------------------------------------------


def test_topics_imports_without_broker_or_torch() -> None:
    code = ("import sys, samestyle.topics; heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('faust', 'kafka', 'aiokafka', 'torch', 'mode')]; print(heavy); "
            "sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(topics.__all__) >= {"TopicSpec", "topic_specs", "Codec", "codec",
                                   "codec_for_topic", "vector_to_bytes", "bytes_to_vector",
                                   "LISTINGS", "LISTING_EMBEDDINGS", "SIMILAR_PRODUCTS",
                                   "DUPLICATE_ALERTS", "DEAD_LETTERS"}


def test_int_field_past_32_bits_is_a_decode_error() -> None:
    # int and long share the zigzag varint layout: write partition as a long no int can hold.
    schema = _without_logical_types(load_schema("dead_letter"))
    for field in schema["fields"]:
        if field["name"] == "partition":
            field["type"] = "long"
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(schema),
                               {**realistic("dead_letter"), "partition": 2**40})
    c = codec("dead_letter")
    with pytest.raises(DecodeError, match="overflows an Avro int"):
        c.decode(MARKER + c.fingerprint + buf.getvalue())
