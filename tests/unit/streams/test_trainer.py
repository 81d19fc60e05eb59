"""The trainer's pure parts: dedupe by pair, its state file, when to train, the promote decision,
and the model-updates record (no broker, no model)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from samestyle.models.data import read_pairs
from samestyle.streams.trainer.service import (
    PROMOTED,
    REJECTED,
    TrainerState,
    current_model,
    decide,
    last_pairs_used,
    main,
    pair_of,
    should_train,
    update_record,
    write_pairs_csv,
)
from samestyle.topics import MODEL_UPDATES, codec_for_topic
from samestyle.topics.errors import ConfigError


def mined(a: str, b: str, **extra: Any) -> dict[str, Any]:
    return {"listing_id_a": a, "listing_id_b": b, "category": None, "co_clicks": 5, "sessions": 2,
            "dwell_ms_total": 100_000, "relevance_score": None, "model_version": None, "event_time": 1,
            "emitted_at": 2, **extra}


def update(version: str, decision: str, pairs_used: int = 10) -> dict[str, Any]:
    return update_record(version, Path(f"/m/{version}"), decision, None, "recall_at_1", 0.5, 0.4, pairs_used,
                         "why", created_at=1)


def test_pair_is_unordered() -> None:
    assert pair_of(mined("b", "a")) == pair_of(mined("a", "b")) == ("a", "b")


def test_dedupe_counts_each_pair_once_across_resends_and_order() -> None:
    state = TrainerState()
    assert state.add([mined("a", "b"), mined("c", "d"), mined("a", "b", co_clicks=7)]) == 2
    # A replay after a crash, and the same pair written the other way round: nothing new.
    assert state.add([mined("c", "d"), mined("b", "a")]) == 0
    assert state.add([mined("e", "f")]) == 1
    assert list(state.pairs) == [("a", "b"), ("c", "d"), ("e", "f")]  # first-seen order


def test_state_round_trip_is_atomic_and_keeps_pairs_with_offsets(tmp_path: Path) -> None:
    path = tmp_path / "work" / "state.json"
    assert TrainerState.load(path) == TrainerState()  # no file: start from the beginning
    state = TrainerState(offsets={0: 12, 1: 3}, pairs_at_last_candidate=1, candidates=1)
    state.add([mined("x", "y"), mined("p", "q")])
    state.save(path)
    again = TrainerState.load(path)
    assert again == state and again.new_pairs == 1
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]  # no temp file left behind
    # A restart that re-reads records already in the file (crash between two saves) adds nothing.
    assert again.add([mined("y", "x")]) == 0


def test_the_window_keeps_the_newest_pairs_and_counts_every_new_one(tmp_path: Path) -> None:
    state = TrainerState(max_pairs=3)
    assert state.add([mined(f"a{k}", f"b{k}") for k in range(5)]) == 5
    assert list(state.pairs) == [("a2", "b2"), ("a3", "b3"), ("a4", "b4")]  # the oldest left
    assert state.pairs_seen == 5 and state.new_pairs == 5
    assert state.add([mined("b4", "a4")]) == 0  # still in the window: a re-send, nothing new
    state.pairs_at_last_candidate = state.pairs_seen
    assert state.add([mined("a0", "b0")]) == 1  # left the window, mined again: new
    assert list(state.pairs) == [("a3", "b3"), ("a4", "b4"), ("a0", "b0")] and state.new_pairs == 1
    path = tmp_path / "state.json"
    state.save(path)
    assert TrainerState.load(path, max_pairs=3) == state
    smaller = TrainerState.load(path, max_pairs=2)  # a smaller window trims at load
    assert list(smaller.pairs) == [("a4", "b4"), ("a0", "b0")] and smaller.new_pairs == 1
    assert len(json.loads(path.read_text())["pairs"]) == 3  # the file holds the window only


def test_broken_state_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a trainer state file"):
        TrainerState.load(path)


def test_should_train_counts_pairs_since_the_last_candidate() -> None:
    state = TrainerState()
    assert not should_train(state, 1)  # no pairs at all
    state.add([mined(f"a{k}", f"b{k}") for k in range(5)])
    assert should_train(state, 5) and not should_train(state, 6)
    state.pairs_at_last_candidate = 5
    assert not should_train(state, 1)
    state.add([mined("n", "m")])
    assert should_train(state, 1)


@pytest.mark.parametrize(("score", "previous", "decision", "word"), [
    (0.71, 0.65, PROMOTED, "better"),
    (0.65, 0.65, REJECTED, "tie"),  # strictly better only
    (0.60, 0.65, REJECTED, "worse"),
])
def test_promote_only_when_strictly_better(score: float, previous: float, decision: str, word: str) -> None:
    got, reason = decide("recall_at_1", score, previous, "v0")
    assert got == decision and word in reason and "recall_at_1" in reason and "v0" in reason


def test_current_model_is_the_newest_promoted_record() -> None:
    assert current_model([], "default") == ("default", None)
    history = [update("v1", PROMOTED), update("v2", PROMOTED), update("v3", REJECTED)]
    assert current_model(history, "default") == ("/m/v2", "v2")
    assert current_model([update("v1", REJECTED)], "tiny") == ("tiny", None)


def test_last_pairs_used_is_the_newest_decision_of_either_kind() -> None:
    assert last_pairs_used([]) == 0
    assert last_pairs_used([update("v1", PROMOTED, 10), update("v2", REJECTED, 25)]) == 25


def test_pairs_csv_is_what_train_reads(tmp_path: Path) -> None:
    path = tmp_path / "pairs" / "pairs-2.csv"
    assert write_pairs_csv(path, [("a", "b"), ("c", "d")]) == 2
    assert read_pairs(path) == [("a", "b", 1), ("c", "d", 1)]


def test_update_record_matches_the_schema() -> None:
    codec = codec_for_topic(MODEL_UPDATES)
    record = update_record("m-unified-1", Path("/models/m-unified-1"), PROMOTED, None, "valid_f1", 0.8, 0.7, 42,
                           "better")
    decoded = codec.decode(codec.encode(record))
    assert decoded["decision"] == PROMOTED and decoded["pairs_used"] == 42 and decoded["previous_version"] is None
    assert decoded["score"] == pytest.approx(0.8) and decoded["created_at"] > 1_700_000_000_000
    assert json.loads(json.dumps(decoded, default=str))["model_dir"] == "/models/m-unified-1"


def test_missing_files_and_test_splits_fail_before_any_broker_work(tmp_path: Path) -> None:
    broker = ["--bootstrap", "127.0.0.1:1"]  # nothing listens there: a file error must come first
    with pytest.raises(ConfigError, match="missing.csv"):
        main(["--listings", str(tmp_path / "missing.csv"), "--valid-clusters", str(tmp_path / "c.csv"), *broker])
    with pytest.raises(ConfigError, match="test split"):
        main(["--listings", str(tmp_path / "l.csv"), "--valid-pairs", str(tmp_path / "pairs_test.csv"), *broker])
