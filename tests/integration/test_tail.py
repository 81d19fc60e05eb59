"""``samestyle tail`` against the real embedded broker: records written to a test's own topics, read
back through the CLI as JSON lines."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import numpy as np
import pytest

from samestyle.streams.cli.main import main
from samestyle.streams.dev.broker import admin_client
from samestyle.streams.io.producer import send_records
from samestyle.streams.io.tail import TailRequest, tail
from samestyle.streams.worker.pipeline import EmbedStep, Failure, Incoming
from samestyle.topics import DEAD_LETTERS, LISTING_EMBEDDINGS, LISTINGS, codec_for_topic
from samestyle.topics.errors import DecodeError
from tests.integration.conftest import Stack, text_listing

pytestmark = pytest.mark.integration


def send(stack: Stack, topic_key: str, pairs: list[tuple[bytes | None, bytes]]) -> None:
    """Send records one at a time, a few ms apart, so that their timestamps order them."""
    for pair in pairs:
        asyncio.run(send_records(stack.settings, stack.specs[topic_key].name, [pair]))
        time.sleep(0.01)


def run_tail(stack: Stack, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[dict[str, Any]], str]:
    code = main(["tail", *args, "--bootstrap", stack.settings.bootstrap or "",
                 "--topic-prefix", stack.settings.topic_prefix])
    out, err = capsys.readouterr()
    return code, [json.loads(line) for line in out.splitlines()], err


def listings(n: int) -> list[dict[str, Any]]:
    return [text_listing(f"L{i}", f"Blue mug number {i}", supplier=f"s{i % 2}") for i in range(n)]


def test_tail_prints_the_last_records_then_from_the_beginning_then_by_key(stack: Stack, capsys) -> None:
    codec = codec_for_topic(LISTINGS)
    records = listings(6)
    records[2]["image_bytes"] = b"\x89PNG" + b"\0" * 500
    send(stack, LISTINGS, [(r["listing_id"].encode(), codec.encode(r)) for r in records])
    again = dict(records[1], title="Blue mug number 1, repriced")
    send(stack, LISTINGS, [(b"L1", codec.encode(again))])

    code, lines, _ = run_tail(stack, capsys, "listings")  # default: the last 10, oldest first
    assert code == 0 and [line["key"] for line in lines] == ["L0", "L1", "L2", "L3", "L4", "L5", "L1"]
    code, lines, _ = run_tail(stack, capsys, "listings", "--limit", "2")
    assert [line["value"]["title"] for line in lines] == ["Blue mug number 5", "Blue mug number 1, repriced"]

    code, lines, _ = run_tail(stack, capsys, "listings", "--from-beginning", "--limit", "3")
    assert [line["key"] for line in lines] == ["L0", "L1", "L2"]
    first = lines[0]
    assert first["topic"] == stack.specs[LISTINGS].name and isinstance(first["offset"], int)
    assert first["value"]["listing_id"] == "L0" and first["value"]["attributes"] == {"colour": "red"}
    assert lines[2]["value"]["image_bytes"] == {"bytes": 504}  # bytes by length, never raw

    code, lines, _ = run_tail(stack, capsys, "listings", "--key", "L1")
    assert [line["value"]["title"] for line in lines] == ["Blue mug number 1", "Blue mug number 1, repriced"]
    code, lines, _ = run_tail(stack, capsys, stack.specs[LISTINGS].name, "--key", "L1", "--limit", "1")
    assert [line["value"]["title"] for line in lines] == ["Blue mug number 1, repriced"]  # full name works too


def test_vectors_show_as_dimension_and_norm_and_dead_letters_decode_their_original(stack: Stack, capsys) -> None:
    from samestyle.models import create_encoder

    encoder = create_encoder("tiny", "cpu", allow_random_weights=True)
    codec = codec_for_topic(LISTINGS)
    incoming = [Incoming(r["listing_id"].encode(), codec.encode(r), stack.specs[LISTINGS].name, 0, i)
                for i, r in enumerate(listings(2))]
    out, _ = EmbedStep(encoder, stack.settings)(incoming)
    send(stack, LISTING_EMBEDDINGS, [(o.key, o.value) for o in out])
    code, lines, _ = run_tail(stack, capsys, "listing-embeddings", "--from-beginning")
    assert code == 0 and len(lines) == 2
    value = lines[0]["value"]
    assert value["vector_text"]["dim"] == encoder.dim == value["dim"]
    assert value["vector_text"]["norm"] == pytest.approx(1.0, abs=1e-4)
    assert value["vector_image"] is None  # a text-only listing has no image vector
    assert set(value["vector_image_text"]) == {"dim", "norm"}

    letter = Failure(incoming[0], "embed", DecodeError("example reason")).dead_letter()
    junk = Failure(Incoming(b"junk", b"\x00 not avro", stack.specs[LISTINGS].name, 0, 9), "embed",
                   DecodeError("not Avro")).dead_letter()
    send(stack, DEAD_LETTERS, [(b"L0", letter), (b"junk", junk), (b"bad", b"not a dead letter")])
    code, lines, _ = run_tail(stack, capsys, "dead-letters", "--from-beginning")
    assert [line["key"] for line in lines] == ["L0", "junk", "bad"]
    original = lines[0]["value"]["original_value"]
    assert original["decoded"]["listing_id"] == "L0" and original["bytes"] == len(incoming[0].value or b"")
    assert lines[0]["value"]["original_key"] == {"bytes": 2, "text": "L0"}
    assert lines[0]["value"]["error"] == "example reason"
    assert "decode_error" in lines[1]["value"]["original_value"]
    assert lines[2]["error"].startswith("DecodeError:") and lines[2]["value_bytes"] == len(b"not a dead letter")


def test_follow_prints_records_as_they_arrive(stack: Stack) -> None:
    codec = codec_for_topic(LISTINGS)
    records = listings(4)
    send(stack, LISTINGS, [(r["listing_id"].encode(), codec.encode(r)) for r in records[:2]])
    lines: list[str] = []
    result: list[int] = []
    request = TailRequest("listings", from_beginning=True, follow=True, limit=4)
    thread = threading.Thread(target=lambda: result.append(asyncio.run(tail(stack.settings, request, lines.append))))
    thread.start()
    deadline = time.monotonic() + 30
    while len(lines) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(lines) == 2 and thread.is_alive()  # the backlog is out; it waits for more
    send(stack, LISTINGS, [(r["listing_id"].encode(), codec.encode(r)) for r in records[2:]])
    thread.join(30)
    assert not thread.is_alive() and result == [4]  # stopped at the limit
    assert [json.loads(line)["key"] for line in lines] == ["L0", "L1", "L2", "L3"]


def test_tail_refuses_unknown_and_missing_topics_and_creates_none(stack: Stack, capsys) -> None:
    code, lines, err = run_tail(stack, capsys, "no-such-topic")
    assert code == 2 and not lines and "unknown topic 'no-such-topic'" in err and "duplicate-alerts" in err
    code, lines, err = run_tail(stack, capsys, "listings", "--limit", "0")
    assert code == 2 and "--limit must be >= 1" in err
    prefix = stack.settings.topic_prefix + "absent-"
    code = main(["tail", "listings", "--bootstrap", stack.settings.bootstrap or "", "--topic-prefix", prefix])
    _, err = capsys.readouterr()
    assert code == 2 and f"topic '{prefix}listings' does not exist" in err
    with admin_client(stack.settings.bootstrap or "") as admin:
        assert not [t for t in admin.list_topics() if t.startswith(prefix)]  # tail did not auto-create it
    code, lines, _ = run_tail(stack, capsys, "duplicate-alerts")  # an empty topic: nothing, and no error
    assert code == 0 and lines == []


def test_records_are_rendered_without_raw_bytes() -> None:
    from samestyle.streams.io.tail import render

    vector = np.asarray([3.0, 4.0], dtype="<f4").tobytes()
    assert render({"vector_x": vector, "blob": b"\xff\xfe", "name": b"L1", "nested": [{"vector_y": b"abc"}]}) == {
        "vector_x": {"dim": 2, "norm": 5.0}, "blob": {"bytes": 2}, "name": {"bytes": 2, "text": "L1"},
        "nested": [{"vector_y": {"bytes": 3}}]}
    assert render(float("nan")) is None and render(float("inf")) == "Infinity"
