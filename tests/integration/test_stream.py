"""The streaming spine against the real broker and real worker processes."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from samestyle.models.data import read_listings
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.io.producer import Outputs, delete_message, listing_message
from samestyle.streams.switch.indexes import load_active_snapshot
from samestyle.streams.worker.app import snapshot_dir
from samestyle.topics import LISTINGS, codec_for_topic
from tests.integration.conftest import Stack, text_listing

pytestmark = pytest.mark.integration


def sample_messages(tmp: Path, n_products: int = 12, seed: int = 0) -> list[dict]:
    listings_csv, _ = generate_sample(tmp / f"sample-{seed}", n_products=n_products, seed=seed)
    return [listing_message(r, image_mode="bytes") for r in read_listings(listings_csv)]


def all_indexed(ids: set[str]) -> Callable[[Outputs], bool]:
    return lambda o: ids <= o.indexed_ids


def test_every_listing_is_indexed_and_gets_similar_products(stack: Stack) -> None:
    messages = sample_messages(stack.tmp)
    ids = {m["listing_id"] for m in messages}
    stack.start_worker()
    stack.produce(messages)
    out = stack.collect(all_indexed(ids))

    assert out.indexed_ids == ids
    assert len(out.similar) == len(ids)  # one similar-products message per upsert, none twice
    for msg in out.similar:
        neighbour_ids = [n["listing_id"] for n in msg["neighbours"]]
        assert msg["listing_id"] not in neighbour_ids
        assert len(neighbour_ids) == len(set(neighbour_ids))
        scores = [n["score"] for n in msg["neighbours"]]
        assert scores == sorted(scores, reverse=True)
        assert msg["model_version"].startswith("tiny")
    assert not out.dead_letters
    # The last listing in sees (almost) the whole catalogue: top-k is full.
    assert max(len(m["neighbours"]) for m in out.similar) == min(stack.settings.top_k, len(ids) - 1)


def test_planted_duplicates_are_alerted_only_within_a_supplier(stack: Stack) -> None:
    png = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(png, format="PNG")
    original = text_listing("orig", "Red ceramic coffee mug 350 ml", image_bytes=png.getvalue())
    others = [text_listing(f"other-{i}", title) for i, title in enumerate(
        ["Bamboo cutting board large", "Stainless steel water bottle 1 l", "LED desk lamp with USB port"])]
    copy_same_supplier = dict(original, listing_id="copy-s1", event_time=original["event_time"] + 1)
    copy_other_supplier = dict(original, listing_id="copy-s2", supplier_id="s2", event_time=original["event_time"] + 2)
    stack.start_worker(duplicate_threshold=0.999)
    stack.produce([original, *others])
    stack.collect(all_indexed({"orig"}))
    stack.produce([copy_same_supplier, copy_other_supplier])
    out = stack.collect(all_indexed({"copy-s1", "copy-s2"}) )

    pairs = {(a["listing_id"], a["duplicate_of"]) for a in out.alerts}
    assert pairs == {("copy-s1", "orig")}
    alert = out.alerts[0]
    assert alert["supplier_id"] == "s1"
    assert alert["score"] >= 0.999
    assert alert["scores"]["image"] == pytest.approx(1.0, abs=1e-4)
    assert alert["scores"]["text"] == pytest.approx(1.0, abs=1e-4)
    assert "same supplier" in alert["reason"]
    # The cross-supplier copy is a same-style product, not a duplicate: it is a neighbour, not an alert.
    similar = {m["listing_id"]: m for m in out.similar}
    assert similar["copy-s2"]["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_without_a_model_classifier_the_default_cosine_rule_decides_and_says_so(stack: Stack) -> None:
    # No SAMESTYLE_DUPLICATE_THRESHOLD: the tiny encoder has no duplicate classifier, so the
    # worker falls back to the 0.82 image+text cosine, and every alert says what decided it.
    assert stack.settings.duplicate_threshold is None
    original = text_listing("orig", "Green glass vase 30 cm")
    copy = dict(original, listing_id="copy", event_time=original["event_time"] + 1)
    stack.start_worker()
    stack.produce([original])
    stack.collect(all_indexed({"orig"}))
    stack.produce([copy])
    out = stack.collect(lambda o: "copy" in o.indexed_ids and any(a["listing_id"] == "copy" for a in o.alerts))
    [alert] = [a for a in out.alerts if (a["listing_id"], a["duplicate_of"]) == ("copy", "orig")]
    assert alert["decided_by"] == "cosine" and alert["probability"] is None
    assert alert["threshold"] == pytest.approx(0.82)
    assert alert["score"] == pytest.approx(1.0, abs=1e-4)
    assert alert["reason"].startswith("image+text cosine 1.000 >= 0.820")


def test_a_delete_removes_the_listing_from_the_index(stack: Stack) -> None:
    target = text_listing("target", "Blue linen table cloth 140 x 200 cm")
    filler = [text_listing(f"f{i}", t) for i, t in enumerate(["Garden hose 20 m", "Cast iron skillet 28 cm"])]
    stack.start_worker()
    stack.produce([target, *filler])
    stack.collect(all_indexed({"target", "f0", "f1"}))

    # Control: an identical probe finds the target before the delete ...
    stack.produce([dict(target, listing_id="probe-before")])
    before = stack.collect(all_indexed({"probe-before"}))
    similar = {m["listing_id"]: m for m in before.similar}
    assert similar["probe-before"]["neighbours"][0]["listing_id"] == "target"

    # ... and not after it.
    stack.produce([delete_message("target", "s1")])
    stack.produce([dict(target, listing_id="probe-after")])
    after = stack.collect(all_indexed({"probe-after"}))
    similar = {m["listing_id"]: m for m in after.similar}
    assert "target" not in [n["listing_id"] for n in similar["probe-after"]["neighbours"]]
    assert "probe-before" == similar["probe-after"]["neighbours"][0]["listing_id"]


def _snapshot_ids(stack: Stack) -> list[str]:
    index, _, _ = load_active_snapshot(snapshot_dir(stack.settings))
    return index.ids()


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_a_restarted_worker_neither_loses_nor_duplicates_listings(stack: Stack, how: str) -> None:
    messages = sample_messages(stack.tmp, n_products=16, seed=3)
    first, second = messages[: len(messages) // 2], messages[len(messages) // 2:]
    worker = stack.start_worker("w1")
    stack.produce(first)
    stack.collect(all_indexed({m["listing_id"] for m in first}))
    time.sleep(1.5)  # let a periodic snapshot happen (interval 1 s)
    if how == "sigterm":
        assert worker.stop() == 0
    else:
        worker.kill()

    stack.produce(second)  # while no worker runs
    stack.start_worker("w2")
    ids = {m["listing_id"] for m in messages}
    out = stack.collect(all_indexed(ids))
    assert out.indexed_ids == ids
    # Listings that arrived after the restart see the ones from before it.
    by_id = {m["listing_id"]: m for m in out.similar}
    later_neighbours = {n["listing_id"] for m in second for n in by_id[m["listing_id"]]["neighbours"]}
    assert later_neighbours & {m["listing_id"] for m in first}

    assert stack.workers[-1].stop() == 0  # graceful stop writes the final snapshot
    snapshot = _snapshot_ids(stack)
    assert sorted(snapshot) == sorted(ids)  # every listing exactly once


def test_bad_input_is_dead_lettered_and_the_stream_goes_on(stack: Stack) -> None:
    listings = codec_for_topic(LISTINGS)
    garbage = b"\x00\x01 this is not avro"
    broken_image = text_listing("bad-image", "Mug with a broken photo", image_bytes=b"\x89PNG\r\n\x1a\n broken")
    no_title = dict(text_listing("no-title", "x"), title=None)
    huge = dict(text_listing("huge", "Mug with a novel"), description="x" * 1_000_000)
    good = text_listing("good", "Green glass vase 30 cm")
    stack.start_worker()
    stack.produce_raw([(b"garbage", garbage)] + [
        (m["listing_id"].encode(), listings.encode(m)) for m in (broken_image, no_title, huge, good)])
    out = stack.collect(lambda o: "good" in o.indexed_ids and len(o.dead_letters) >= 4)

    assert out.indexed_ids == {"good"}
    letters = {m["original_key"]: m for m in out.dead_letters}
    assert set(letters) == {b"garbage", b"bad-image", b"no-title", b"huge"}
    assert letters[b"garbage"]["error_type"] == "DecodeError"
    assert letters[b"garbage"]["original_value"] == garbage
    assert letters[b"bad-image"]["error_type"] == "ImageError"
    assert letters[b"no-title"]["error_type"] == "InvalidListingError"
    assert "no title" in letters[b"no-title"]["error"]
    assert letters[b"huge"]["error_type"] == "InvalidListingError"
    assert len(letters[b"huge"]["original_value"]) > 1_000_000  # nothing lost: the original bytes travel
    for letter in out.dead_letters:
        assert letter["topic"] == stack.specs[LISTINGS].name
        assert letter["stage"] == "embed"
        assert letter["offset"] >= 0


@pytest.mark.faults
def test_kill_9_mid_stream_then_restart_loses_nothing(stack: Stack) -> None:
    messages = sample_messages(stack.tmp, n_products=30, seed=5)
    ids = {m["listing_id"] for m in messages}
    worker = stack.start_worker("w1", batch_size=4)  # small batches: the kill lands between many of them
    stack.produce(messages)
    partial = stack.collect(lambda o: len(o.indexed_ids) >= len(ids) // 4)
    worker.kill()  # mid-stream: no snapshot, no commit, batches in flight
    assert len(partial.indexed_ids) < len(ids), "the whole stream was done before the kill"

    stack.start_worker("w2", batch_size=4)
    out = stack.collect(all_indexed(ids))
    assert out.indexed_ids == ids  # every listing's similar-products message was emitted (repeats allowed)
    assert stack.workers[-1].stop() == 0
    assert sorted(_snapshot_ids(stack)) == sorted(ids)  # every listing in the index exactly once
