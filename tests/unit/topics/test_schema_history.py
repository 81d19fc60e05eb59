"""Schema evolution: every released version stays readable, consecutive (indeed all) versions of a
topic schema are BACKWARD and FORWARD compatible, and a record of an unknown version is a clear
DecodeError."""

from __future__ import annotations

import copy
import io
import itertools
import json
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.utils import generate_many

from samestyle.topics import codec
from samestyle.topics.codec import MARKER, Codec, _without_logical_types, schemas, use_schema_dir, use_schemas
from samestyle.topics.compat import backward_problems, default_problems, forward_problems, resolution_problems
from samestyle.topics.errors import ConfigError, DecodeError
from samestyle.topics.history import SchemaSet
from tests.schema_overlay import NEXT_FIELD, next_listing_schema, write_overlay
from tests.unit.topics.test_topics import T0, realistic

#: Every version ever released, by fingerprint. Records written with them sit on brokers: a
#: version is never edited or removed, only added (and then listed here).
RELEASED = {
    ("click_event", 1): "266d8102e9c9feaf",
    ("dead_letter", 1): "14b7f791d639aa15",
    ("duplicate_alert", 1): "aa97741e5a35270a",  # before the classifier fields
    ("duplicate_alert", 2): "f99db2e96f40550c",  # + probability, threshold, decided_by
    ("listing", 1): "db4f7b1404e02b39",
    ("listing_embedding", 1): "80fa2b7f4300dfef",
    ("listing_embedding", 2): "97a1392e80e43945",  # + image_uri
    ("listing_embedding", 3): "54dc615ed304c28c",  # + reembed, next_model
    ("listing_embedding", 4): "b6a68b15d00b4baa",  # + match_text
    ("listing_embedding", 5): "f2e83e5a421d766b",  # + next_model.match_text
    ("model_update", 1): "e97b21bacff2c6e8",
    ("moderation_decision", 1): "8a051d291f8d5d3e",
    ("positive_pair", 1): "92ff14dae254b491",
    ("similar_products", 1): "2b4323302772b8ed",
}

PACKAGED = SchemaSet.load()
VERSION_PAIRS = [(name, old, new) for name in PACKAGED.names()
                 for old, new in itertools.combinations(PACKAGED.versions(name), 2)]


def _ids(pairs: list[Any]) -> list[str]:
    return [f"{name}-v{old.number}-v{new.number}" for name, old, new in pairs]


@pytest.fixture
def restore_schemas() -> Any:
    yield
    use_schemas(None)


def _parsed(schema: dict[str, Any]) -> Any:
    return fastavro.parse_schema(_without_logical_types(schema), {})


def _write(schema: dict[str, Any], record: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, _parsed(schema), record)
    return buf.getvalue()


def _read(body: bytes, writer: dict[str, Any], reader: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO(body)
    record = fastavro.schemaless_reader(buf, _parsed(writer), _parsed(reader))
    assert buf.tell() == len(body)
    return record


def _record_type(field_type: Any) -> dict[str, Any] | None:
    """The record schema a field holds (alone or in a union), if any."""
    for t in field_type if isinstance(field_type, list) else [field_type]:
        if isinstance(t, dict) and t.get("type") == "record":
            return t
    return None


def _assert_resolved(resolved: dict[str, Any], written: dict[str, Any], reader: dict[str, Any]) -> None:
    """Fields both versions have keep the written value (nested records field by field); fields
    only the reader has get their default."""
    for field in reader["fields"]:
        name = field["name"]
        nested = _record_type(field["type"])
        if name in written and nested is not None and isinstance(written[name], dict):
            _assert_resolved(resolved[name], written[name], nested)
            continue
        expected = written[name] if name in written else field["default"]
        assert resolved[name] == expected, name
    assert set(resolved) == {f["name"] for f in reader["fields"]}


# --- the history itself -----------------------------------------------------------------------


def test_released_versions_are_never_edited_or_removed() -> None:
    found = {(v.name, v.number): v.fingerprint.hex() for name in PACKAGED.names() for v in PACKAGED.versions(name)}
    assert found == RELEASED, ("a released version was edited or removed, or a new one is not listed in RELEASED "
                               "(a changed schema is a new history/<name>/v<N>.avsc)")


def test_each_current_file_is_its_latest_version() -> None:
    for name in PACKAGED.names():
        assert PACKAGED.current(name).number == PACKAGED.versions(name)[-1].number, name
        assert codec(name).version == PACKAGED.current(name).number


@pytest.mark.parametrize(("name", "old", "new"), VERSION_PAIRS, ids=_ids(VERSION_PAIRS))
def test_versions_are_backward_and_forward_compatible_by_the_rules(name: str, old: Any, new: Any) -> None:
    assert backward_problems(new.schema, old.schema) == []  # a reader on the new version reads the old
    assert forward_problems(new.schema, old.schema) == []  # a reader on the old version reads the new


@pytest.mark.parametrize(("name", "old", "new"), VERSION_PAIRS, ids=_ids(VERSION_PAIRS))
def test_records_written_with_one_version_read_with_the_other(name: str, old: Any, new: Any) -> None:
    for writer, reader in ((old, new), (new, old)):
        plain = _without_logical_types(writer.schema)
        for record in generate_many(plain, 20):
            body = _write(writer.schema, record)
            written = _read(body, writer.schema, writer.schema)  # float32 rounding, as stored
            _assert_resolved(_read(body, writer.schema, reader.schema), written, reader.schema)


@pytest.mark.parametrize("name", PACKAGED.names())
def test_the_codec_reads_every_known_version_into_the_current_one(name: str) -> None:
    current = PACKAGED.current(name)
    for version in PACKAGED.versions(name):
        for record in generate_many(_without_logical_types(version.schema), 10):
            body = _write(version.schema, record)
            decoded = codec(name).decode(MARKER + version.fingerprint + body)
            _assert_resolved(decoded, _read(body, version.schema, version.schema), current.schema)


def test_old_alerts_and_embeddings_read_with_their_documented_defaults() -> None:
    [alert_v1, _] = PACKAGED.versions("duplicate_alert")
    old = {k: v for k, v in realistic("duplicate_alert").items() if k not in ("probability", "threshold", "decided_by")}
    alert = codec("duplicate_alert").decode(MARKER + alert_v1.fingerprint + _write(alert_v1.schema, old))
    assert (alert["probability"], alert["threshold"], alert["decided_by"]) == (None, 0.0, None)
    embedding_v1 = PACKAGED.versions("listing_embedding")[0]
    new_fields = ("image_uri", "match_text", "reembed", "next_model")
    old = {k: v for k, v in realistic("listing_embedding").items() if k not in new_fields}
    record = codec("listing_embedding").decode(MARKER + embedding_v1.fingerprint + _write(embedding_v1.schema, old))
    assert {k: record[k] for k in new_fields} == {"image_uri": None, "match_text": None, "reembed": False,
                                                  "next_model": None}
    assert record["vector_text"] == old["vector_text"]


# --- the rules check itself --------------------------------------------------------------------


def _listing() -> dict[str, Any]:
    return copy.deepcopy(PACKAGED.current("listing").schema)


def _field(schema: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in schema["fields"] if f["name"] == name)


def test_a_field_added_without_a_default_breaks_backward_only() -> None:
    new = _listing()
    new["fields"].append({"name": "price", "type": "double"})
    assert backward_problems(new, _listing()) == [
        "price: the reader's field has no default and the writer does not write it"]
    assert forward_problems(new, _listing()) == []  # the old reader skips it


def test_a_field_removed_that_had_no_default_breaks_forward_only() -> None:
    new = _listing()
    new["fields"] = [f for f in new["fields"] if f["name"] != "event_time"]
    assert forward_problems(new, _listing()) == [
        "event_time: the reader's field has no default and the writer does not write it"]
    assert backward_problems(new, _listing()) == []


def test_type_changes_widen_but_never_narrow() -> None:
    old = {"type": "record", "name": "R", "fields": [{"name": "n", "type": "int"}, {"name": "s", "type": "string"}]}
    wider = copy.deepcopy(old)
    wider["fields"][0]["type"] = "long"
    wider["fields"][1]["type"] = "bytes"
    assert backward_problems(wider, old) == []
    assert forward_problems(wider, old) == ["n: the writer's long cannot be read as int"]
    other = copy.deepcopy(old)
    other["fields"][1]["type"] = "int"
    assert backward_problems(other, old) == ["s: the writer's string cannot be read as int"]


def test_unions_and_nullability() -> None:
    old = {"type": "record", "name": "R", "fields": [{"name": "t", "type": "string"}]}
    nullable = {"type": "record", "name": "R", "fields": [{"name": "t", "type": ["null", "string"], "default": None}]}
    assert backward_problems(nullable, old) == []  # a string fits the reader's union
    assert forward_problems(nullable, old) == ["t<null>: the writer's null cannot be read as string"]


def test_enums_need_a_default_for_new_symbols_and_names_must_match() -> None:
    def enum_record(symbols: list[str], **extra: Any) -> dict[str, Any]:
        return {"type": "record", "name": "R", "fields": [
            {"name": "op", "type": {"type": "enum", "name": "Op", "symbols": symbols, **extra}}]}
    grown = enum_record(["A", "B", "C"])
    assert forward_problems(grown, enum_record(["A", "B"])) == [
        "op: the reader's enum lacks the writer's symbol(s) ['C'] and has no default"]
    assert forward_problems(grown, enum_record(["A", "B"], default="A")) == []
    renamed = {"type": "record", "name": "Other", "fields": []}
    assert resolution_problems(renamed, {"type": "record", "name": "R", "fields": []}) == [
        "the writer's record Other is not the reader's R (nor one of its aliases)"]
    assert resolution_problems(renamed, {"type": "record", "name": "R", "aliases": ["Other"], "fields": []}) == []


def test_a_default_must_fit_its_type() -> None:
    schema = _listing()
    _field(schema, "supplier_id")["default"] = "S1"  # a union's default fits its first branch (null)
    _field(schema, "attributes")["default"] = []
    assert default_problems(schema) == [
        ("samestyle.Listing.supplier_id: default 'S1' does not fit the field's type (a union's default must fit "
        "its first branch)"),
        ("samestyle.Listing.attributes: default [] does not fit the field's type (a union's default must fit its "
        "first branch)")]
    assert default_problems(_listing()) == []


def test_the_unfixed_duplicate_alert_v2_would_have_broken_old_alerts() -> None:
    # As first written, v2 added a required `threshold`: a v2 reader could not read v1 alerts. The
    # history's v2 carries a default for it (not part of the fingerprint), which this test guards.
    v1, v2 = (v.schema for v in PACKAGED.versions("duplicate_alert"))
    without_default = copy.deepcopy(v2)
    del _field(without_default, "threshold")["default"]
    assert backward_problems(without_default, v1) == [
        "threshold: the reader's field has no default and the writer does not write it"]
    assert backward_problems(v2, v1) == []


# --- schema folders: the overlay, the checks at load, unknown versions ---------------------------


def test_a_reader_on_the_next_version_reads_records_of_the_current_one(tmp_path: Path) -> None:
    overlay = write_overlay(tmp_path, current={"listing": next_listing_schema()},
                            history={("listing", 2): next_listing_schema()})
    upgraded = Codec("listing", SchemaSet.load(overlay))
    assert upgraded.version == 2 and upgraded.fingerprint != codec("listing").fingerprint
    old_record = realistic("listing")
    decoded = upgraded.decode(codec("listing").encode(old_record))
    assert decoded == {**old_record, NEXT_FIELD: None}


def test_a_reader_that_knows_the_next_version_reads_it_into_its_own(tmp_path: Path) -> None:
    writer = Codec("listing", SchemaSet.load(write_overlay(
        tmp_path / "producer", current={"listing": next_listing_schema()}, history={("listing", 2): next_listing_schema()})))
    announced = SchemaSet.load(write_overlay(tmp_path / "worker", history={("listing", 2): next_listing_schema()}))
    reader = Codec("listing", announced)
    assert reader.version == 1  # still reads and writes v1
    data = writer.encode({**realistic("listing"), NEXT_FIELD: "used"})
    assert reader.decode(data) == realistic("listing")
    # Without that version the record is an unknown schema, and the reason says what to do.
    with pytest.raises(DecodeError) as info:
        codec("listing").decode(data)
    message = str(info.value)
    assert "unknown schema" in message and writer.fingerprint.hex() in message
    assert "v1 db4f7b1404e02b39" in message and "SAMESTYLE_SCHEMA_DIR" in message


def test_the_schema_dir_setting_swaps_every_codec(tmp_path: Path, restore_schemas: None) -> None:
    overlay = write_overlay(tmp_path, current={"listing": next_listing_schema()},
                            history={("listing", 2): next_listing_schema()})
    before = codec("listing")
    use_schema_dir(overlay)
    assert codec("listing") is not before and codec("listing").version == 2
    assert schemas().current("listing").source == "listing.avsc"
    use_schema_dir(None)
    assert codec("listing").fingerprint == before.fingerprint


@pytest.mark.parametrize(("files", "match"), [
    ({"current": {"listing": "next"}}, (r"listing.avsc is none of the versions in history/listing/: .* "
                                       r"add it as history/listing/v2.avsc")),
    ({"history": {("listing", 3): "next"}}, r"versions \[1, 3\]: a version is missing"),
    ({"history": {("listing", 2): "current"}}, "the same schema"),
    ({"history": {("brand_new", 1): "current"}}, "no current version brand_new.avsc"),
    ({"current": {"brand_new": "renamed"}}, "brand_new.avsc has no history"),
    ({"history": {("listing", 2): "renamed"}}, "is the record 'samestyle.Renamed'"),
])
def test_inconsistent_schema_folders_fail_at_load(tmp_path: Path, files: dict[str, Any], match: str) -> None:
    renamed = {**next_listing_schema(), "name": "Renamed"}
    pick = {"next": next_listing_schema(), "current": PACKAGED.current("listing").schema, "renamed": renamed}
    write_overlay(tmp_path, current={k: pick[v] for k, v in files.get("current", {}).items()},
                  history={k: pick[v] for k, v in files.get("history", {}).items()})
    with pytest.raises(ConfigError, match=match):
        SchemaSet.load(tmp_path)


def test_badly_named_or_unparsable_files_fail_at_load(tmp_path: Path) -> None:
    (tmp_path / "history" / "listing").mkdir(parents=True)
    (tmp_path / "history" / "listing" / "2.avsc").write_text(json.dumps(next_listing_schema()))
    with pytest.raises(ConfigError, match="named v1.avsc, v2.avsc"):
        SchemaSet.load(tmp_path)
    (tmp_path / "history" / "listing" / "2.avsc").unlink()
    (tmp_path / "history" / "listing" / "v2.avsc").write_text("{not json")
    with pytest.raises(ConfigError, match="history/listing/v2.avsc"):
        SchemaSet.load(tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        SchemaSet.load(tmp_path / "absent")


def test_a_record_that_cannot_be_resolved_is_a_decode_error(tmp_path: Path) -> None:
    # A foreign "version" with a required field the current one lacks... and vice versa: a version
    # the compatibility test would have refused still fails as a DecodeError, never anything else.
    incompatible = next_listing_schema()
    _field(incompatible, "title")["type"] = "int"
    del _field(incompatible, "title")["default"]
    producer = Codec("listing", SchemaSet.load(write_overlay(
        tmp_path / "p", current={"listing": incompatible}, history={("listing", 2): incompatible})))
    reader = Codec("listing", SchemaSet.load(write_overlay(tmp_path / "r", history={("listing", 2): incompatible})))
    data = producer.encode({**realistic("listing"), "title": 7, "event_time": T0})
    with pytest.raises(DecodeError, match="listing v2 cannot be read as v1"):
        reader.decode(data)
