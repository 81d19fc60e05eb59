"""The pure parts of a model switch: per-version indexes, the switch rule, the decision chain,
the records embedded by two models, and which index an update is searched in."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from samestyle.models import create_encoder
from samestyle.streams.settings import Settings
from samestyle.streams.switch.backfill import Backfill
from samestyle.streams.switch.indexes import ModelIndexes, load_active_snapshot
from samestyle.streams.switch.watcher import ModelChain, ModelWatcher
from samestyle.streams.worker.app import searchable
from samestyle.streams.worker.pipeline import EmbeddingUpdate, EmbedStep, Incoming, decode_embedding
from samestyle.topics import LISTINGS, MODEL_UPDATES, codec_for_topic


def _views(seed: int, dim: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((3, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def upsert(listing_id: str, vectors: dict[str, np.ndarray], reembed: bool = False) -> EmbeddingUpdate:
    first = next(iter(vectors))
    return EmbeddingUpdate(listing_id, "s1", "UPSERT", first, 0, False, vectors[first],
                           {"supplier_id": "s1", "event_time": 0, "has_image": False}, dict(vectors), reembed)


def delete(listing_id: str) -> EmbeddingUpdate:
    return EmbeddingUpdate(listing_id, "s1", "DELETE", "v1", 0, False, None, {})


def test_apply_fills_each_version_and_deletes_everywhere() -> None:
    indexes = ModelIndexes("flat", 3)
    indexes.apply([upsert("a", {"v1": _views(1, 8)}), upsert("b", {"v1": _views(2, 8), "v2": _views(3, 4)})])
    assert sorted(indexes.indexes["v1"].ids()) == ["a", "b"] and indexes.indexes["v2"].ids() == ["b"]
    assert indexes.indexes["v2"].dim == 4
    indexes.apply([upsert("a", {"v2": _views(4, 4)}, reembed=True), delete("b")])
    assert indexes.indexes["v1"].ids() == ["a"] and indexes.indexes["v2"].ids() == ["a"]
    # Per version, the last record of a listing wins, even when a later one lacks that version.
    indexes.apply([delete("a"), upsert("a", {"v2": _views(5, 4)})])
    assert indexes.indexes["v1"].ids() == [] and indexes.indexes["v2"].ids() == ["a"]


def test_switch_waits_for_a_complete_index_then_drops_the_old_one() -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert(x, {"v1": _views(i, 8)}) for i, x in enumerate("abc")])
    indexes.apply([upsert("a", {"v2": _views(9, 4)})])
    assert indexes.missing("v2") == 2 and not indexes.try_switch("v2")
    indexes.apply([upsert("b", {"v2": _views(10, 4)}), upsert("c", {"v1": _views(11, 8), "v2": _views(12, 4)})])
    assert indexes.missing("v2") == 0
    assert indexes.try_switch("v2") and indexes.active == "v2" and list(indexes.indexes) == ["v2"]
    assert sorted(indexes.active_index.ids()) == ["a", "b", "c"]
    assert not indexes.try_switch("v2")  # already there
    # A record still carrying the old model's vectors (in flight from a worker that had not
    # switched) does not bring the old index back.
    indexes.apply([upsert("d", {"v1": _views(13, 8), "v2": _views(14, 4)}), upsert("e", {"v1": _views(15, 8)})])
    assert list(indexes.indexes) == ["v2"] and "d" in indexes.active_index and "e" not in indexes.active_index


def test_switch_from_an_empty_index_is_immediate_and_force_skips_the_check() -> None:
    empty = ModelIndexes("flat", 3, active="v1")
    assert empty.try_switch("v2") and empty.active == "v2" and empty.active_index is None
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("a", {"v1": _views(1, 8)})])
    assert not indexes.try_switch("v3")
    assert indexes.try_switch("v3", force=True) and indexes.active == "v3"


def test_choose_active_resumes_an_unfinished_switch() -> None:
    indexes = ModelIndexes("flat", 3)
    indexes.apply([upsert(x, {"v1": _views(i, 8)}) for i, x in enumerate("abc")] + [upsert("a", {"v2": _views(7, 4)})])
    assert indexes.choose_active("v2", {"v2": 0}) == "v1"  # v2 lacks b and c: keep serving v1
    done = ModelIndexes("flat", 3)
    done.apply([upsert(x, {"v1": _views(i, 8), "v2": _views(i + 5, 4)}) for i, x in enumerate("ab")])
    assert done.choose_active("v2", {"v2": 0}) == "v2"
    assert ModelIndexes("flat", 3).choose_active("v7", {}) == "v7"


def test_snapshot_round_trip_keeps_every_version_and_the_active_one(tmp_path: Path) -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("a", {"v1": _views(1, 8), "v2": _views(2, 4)}), upsert("b", {"v1": _views(3, 8)})])
    indexes.snapshot(tmp_path, {0: 5, 1: 7})
    loaded, offsets = ModelIndexes.load(tmp_path, "flat", 3)
    assert offsets == {0: 5, 1: 7} and loaded.active == "v1"
    assert {v: sorted(i.ids()) for v, i in loaded.indexes.items()} == {"v1": ["a", "b"], "v2": ["a"]}
    index, _, version = load_active_snapshot(tmp_path)
    assert version == "v1" and len(index) == 2
    # After a switch the old version's files go with the next snapshot.
    loaded.apply([upsert("b", {"v2": _views(4, 4)})])
    assert loaded.try_switch("v2")
    loaded.snapshot(tmp_path, {0: 9, 1: 9})
    assert len(list(tmp_path.glob("m-*"))) == 1
    assert ModelIndexes.load(tmp_path, "flat", 3)[0].retired == {"v1"}
    assert ModelIndexes.load(tmp_path / "absent", "flat", 3)[1] == {}


def test_model_chain_follows_promotions_only() -> None:
    codec = codec_for_topic(MODEL_UPDATES)

    def record(version: str, decision: str) -> bytes:
        return codec.encode({"version": version, "model_dir": f"/m/{version}", "decision": decision,
                             "previous_version": None, "metric": "valid_f1", "score": 0.5, "previous_score": None,
                             "pairs_used": 3, "reason": "test", "created_at": int(time.time() * 1000)})

    watcher = ModelWatcher(Settings(), "model-updates", records=[
        (0, record("a", "PROMOTED")), (1, record("b", "REJECTED")), (2, b"not avro"), (3, record("c", "PROMOTED"))])
    chain = watcher.chain
    assert chain.latest is not None and chain.latest.version == "c"
    assert chain.model_dir("a") == "/m/a" and chain.model_dir("b") is None
    order = chain.order()
    assert order["c"] > order["a"] and "b" not in order and chain.rejected == 1
    assert ModelChain().latest is None


def test_dual_model_records_carry_both_models_vectors() -> None:
    settings = Settings()
    first = create_encoder("tiny", allow_random_weights=True)
    second = create_encoder("tiny", allow_random_weights=True)
    second.version = "tiny-second"  # type: ignore[misc]
    listing = {"listing_id": "l1", "supplier_id": "s1", "category": None, "title": "red mug", "description": None,
               "attributes": {}, "image_uri": None, "image_bytes": None, "op": "UPSERT", "event_time": 1}
    batch = [Incoming(b"l1", codec_for_topic(LISTINGS).encode(listing), "listings", 0, 0)]
    step = EmbedStep(first, settings)
    [out], failures = step(batch, [first, second])
    assert not failures
    update = decode_embedding(out.value)
    assert set(update.vectors) == {first.version, "tiny-second"} and not update.reembed
    [again], _ = step(batch, [second], reembed=True)
    redone = decode_embedding(again.value)
    assert redone.model_version == "tiny-second" and redone.reembed
    assert np.allclose(redone.views, update.vectors["tiny-second"], atol=1e-6)
    with pytest.raises(ValueError):
        step(batch, [first, second, first])


def test_searchable_prefers_the_serving_index_then_the_newest() -> None:
    indexes = ModelIndexes("flat", 3, active="v1")
    indexes.apply([upsert("x", {"v1": _views(1, 8), "v2": _views(2, 4)})])
    both, only_new, unknown = (upsert("a", {"v1": _views(3, 8), "v2": _views(4, 4)}),
                               upsert("b", {"v2": _views(5, 4)}), upsert("c", {"v9": _views(6, 4)}))
    groups = searchable([both, only_new, unknown, delete("d")], indexes)
    assert {v: [u.listing_id for u in g] for v, g in groups.items()} == {"v1": ["a"], "v2": ["b"]}
    assert groups["v2"][0].model_version == "v2" and groups["v1"][0].views.shape == (3, 8)


def test_backfill_skips_listings_the_embed_agent_already_handled() -> None:
    backfill = Backfill(Settings(), "listings")
    chunk = [Incoming(b"a", b"", "listings", 0, 0), Incoming(b"b", b"", "listings", 0, 1),
             Incoming(b"a", b"", "listings", 1, 0)]
    backfill.note_live(chunk[:1])  # not switching: nothing recorded
    assert backfill.unseen(chunk) == chunk
    backfill.version = "v2"
    backfill.note_live(chunk[:1])
    assert backfill.unseen(chunk) == chunk[1:]  # partition 0's "a" only
