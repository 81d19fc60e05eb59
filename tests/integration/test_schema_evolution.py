"""Rolling upgrades of the listings schema on the real broker: a worker on the next version of
``listing.avsc`` (a test-only field with a default) against producers on the current one, a
worker on the current version against a producer on the next one, and a record of a version the
worker does not know dead-lettered with the reason. The test-only versions reach the worker
process through ``SAMESTYLE_SCHEMA_DIR``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from samestyle.topics import LISTINGS, codec_for_topic
from samestyle.topics.codec import Codec
from samestyle.topics.history import SchemaSet
from tests.integration.conftest import Stack, text_listing
from tests.schema_overlay import NEXT_FIELD, next_listing_schema, write_overlay

pytestmark = pytest.mark.integration


def _listings(prefix: str, titles: list[str], **extra: Any) -> list[dict[str, Any]]:
    return [text_listing(f"{prefix}-{i}", title, **extra) for i, title in enumerate(titles)]


def _encoded(codec: Codec, records: list[dict[str, Any]]) -> list[tuple[bytes, bytes]]:
    return [(r["listing_id"].encode(), codec.encode(r)) for r in records]


def test_a_worker_on_the_next_version_reads_producers_on_the_current_one(stack: Stack, tmp_path: Path) -> None:
    # Consumers first: the worker is upgraded to v2 while the producers still write v1.
    upgraded = write_overlay(tmp_path / "v2", current={"listing": next_listing_schema()},
                             history={("listing", 2): next_listing_schema()})
    next_codec = Codec("listing", SchemaSet.load(upgraded))
    old = _listings("old", ["Walnut serving board", "Enamel camping mug", "Linen apron, natural"])
    new = _listings("new", ["Copper watering can 1 l", "Wool throw blanket"], **{NEXT_FIELD: "refurbished"})
    stack.start_worker(schema_dir=upgraded)
    stack.produce(old)  # the current producer: listing v1
    stack.produce_raw(_encoded(next_codec, new))  # an upgraded producer: listing v2
    ids = {r["listing_id"] for r in old + new}
    out = stack.collect(lambda o: ids <= o.indexed_ids)
    assert out.indexed_ids == ids and not out.dead_letters
    assert codec_for_topic(LISTINGS).version == 1 and next_codec.version == 2


def test_a_worker_on_the_current_version_reads_a_producer_on_the_next_one(stack: Stack, tmp_path: Path) -> None:
    # Producers first: the worker (still reading and writing v1) is given v2 to read.
    knows_next = write_overlay(tmp_path / "worker", history={("listing", 2): next_listing_schema()})
    producer = Codec("listing", SchemaSet.load(write_overlay(
        tmp_path / "producer", current={"listing": next_listing_schema()},
        history={("listing", 2): next_listing_schema()})))
    unknown_schema = copy.deepcopy(next_listing_schema())
    unknown_schema["fields"].append({"name": "warranty_months", "type": "int", "default": 0, "doc": "Test only."})
    unknown = Codec("listing", SchemaSet.load(write_overlay(
        tmp_path / "later", current={"listing": unknown_schema},
        history={("listing", 2): next_listing_schema(), ("listing", 3): unknown_schema})))
    new = _listings("new", ["Stoneware teapot 1.2 l", "Bamboo salad servers"], **{NEXT_FIELD: "used"})
    old = _listings("old", ["Cast iron trivet"])
    too_new = text_listing("too-new", "Oak bread bin", **{NEXT_FIELD: "new", "warranty_months": 24})

    stack.start_worker(schema_dir=knows_next)
    stack.produce_raw(_encoded(producer, new) + _encoded(unknown, [too_new]))
    stack.produce(old)
    ids = {r["listing_id"] for r in old + new}
    out = stack.collect(lambda o: ids <= o.indexed_ids and len(o.dead_letters) >= 1)

    assert out.indexed_ids == ids
    [letter] = out.dead_letters
    assert letter["original_key"] == b"too-new" and letter["error_type"] == "DecodeError"
    assert "unknown schema" in letter["error"] and unknown.fingerprint.hex() in letter["error"]
    assert f"v2 {producer.fingerprint.hex()}" in letter["error"]  # the versions it does know
    assert letter["original_value"] == unknown.encode(too_new)
