"""The trainer's pure parts: dedupe by pair, moderators' decisions (latest per pair, bounded), its
state file, when to train, the training set and its weights, the promote decision, and the
model-updates record (no broker; tiny random models where weights reach a training run)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from samestyle.models.data import read_pairs
from samestyle.streams.io.reader import LogRecord
from samestyle.streams.settings import Settings
from samestyle.streams.trainer.service import (
    LABEL_CONFIRMED,
    LABEL_REJECTED,
    PROMOTED,
    REJECTED,
    Label,
    TrainerState,
    TrainingRow,
    current_model,
    decide,
    decode_records,
    last_pairs_used,
    main,
    pair_of,
    should_train,
    training_set,
    update_record,
    write_pairs_csv,
    write_training_csv,
)
from samestyle.topics import MODEL_UPDATES, MODERATION_DECISIONS, codec_for_topic
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


# ------------------------------------------------------------------------ moderators' decisions


def decision(listing: str, original: str, verdict: str, at: int, moderator: str = "mod-1") -> dict[str, Any]:
    return {"listing_id": listing, "duplicate_of": original, "decision": verdict, "moderator_id": moderator,
            "decided_at": at, "model_version": "v1", "probability": 0.9}


def test_the_latest_decision_per_unordered_pair_wins() -> None:
    state = TrainerState()
    assert state.add_decisions([decision("b", "a", LABEL_CONFIRMED, 10), decision("c", "d", LABEL_REJECTED, 10)]) == 2
    # A later verdict on the same pair, written the other way round, supersedes the first.
    assert state.add_decisions([decision("a", "b", LABEL_REJECTED, 20, "mod-2")]) == 1
    assert state.labels[("a", "b")] == Label(False, 20, "mod-2")
    # An older decision read late (another partition) changes nothing; nor does a replay.
    assert state.add_decisions([decision("b", "a", LABEL_CONFIRMED, 15), decision("a", "b", LABEL_REJECTED, 20,
                                                                                   "mod-2")]) == 0
    assert state.labels[("a", "b")] == Label(False, 20, "mod-2")
    # The same verdict again, later: kept (newest time), but no label changed.
    assert state.add_decisions([decision("d", "c", LABEL_REJECTED, 30)]) == 0
    assert state.labels[("c", "d")].decided_at == 30
    assert list(state.labels) == [("a", "b"), ("c", "d")]  # the newest decision last
    # A tie on decided_at goes to the one read later.
    assert state.add_decisions([decision("c", "d", LABEL_CONFIRMED, 30)]) == 1 and state.labels[("c", "d")].confirmed
    assert state.add_decisions([decision("e", "e", LABEL_CONFIRMED, 40)]) == 0 and ("e", "e") not in state.labels
    assert state.labels_seen == 4 and state.new_labels == 4


def test_the_decisions_window_keeps_the_most_recently_decided_pairs(tmp_path: Path) -> None:
    state = TrainerState(max_labels=2)
    state.add_decisions([decision(f"x{k}", f"y{k}", LABEL_CONFIRMED, k) for k in range(3)])
    assert list(state.labels) == [("x1", "y1"), ("x2", "y2")]
    state.add_decisions([decision("x1", "y1", LABEL_REJECTED, 9)])  # decided again: the newest now
    state.add_decisions([decision("x3", "y3", LABEL_CONFIRMED, 10)])
    assert list(state.labels) == [("x1", "y1"), ("x3", "y3")]
    path = tmp_path / "state.json"
    state.save(path)
    assert TrainerState.load(path, max_labels=2) == state
    assert list(TrainerState.load(path, max_labels=1).labels) == [("x3", "y3")]  # a smaller window trims at load


def test_state_keeps_decisions_and_their_offsets_and_reads_an_older_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    state = TrainerState(offsets={0: 4}, label_offsets={0: 7, 1: 2})
    state.add([mined("a", "b")])
    state.add_decisions([decision("a", "b", LABEL_REJECTED, 5), decision("p", "q", LABEL_CONFIRMED, 6)])
    state.mark_candidate()
    state.add_decisions([decision("r", "s", LABEL_CONFIRMED, 7)])
    state.save(path)
    again = TrainerState.load(path)
    assert again == state and again.label_offsets == {0: 7, 1: 2} and again.new_labels == 1
    assert again.labels[("a", "b")] == Label(False, 5, "mod-1")
    # A state file written before decisions were kept: no labels, read moderation-decisions from the start.
    path.write_text(json.dumps({"offsets": {"0": 3}, "pairs": [["a", "b"]], "pairs_at_last_candidate": 1,
                                "candidates": 1, "pairs_seen": 1}))
    old = TrainerState.load(path)
    assert old.offsets == {0: 3} and old.label_offsets == {} and old.labels == {} and old.new_labels == 0
    path.write_text(json.dumps({"labels": [["a", "b", "maybe", 1, "m"]]}))
    with pytest.raises(ConfigError, match="not a trainer state file"):
        TrainerState.load(path)


def test_new_decisions_count_toward_a_candidate() -> None:
    state = TrainerState()
    state.add_decisions([decision("a", "b", LABEL_REJECTED, 1)])
    assert not should_train(state, 1)  # a rejection alone: no positive to train on
    state.add_decisions([decision("c", "d", LABEL_CONFIRMED, 2)])
    assert should_train(state, 2) and not should_train(state, 3)
    state.add([mined("e", "f")])
    assert should_train(state, 3)  # one new pair + two changed labels
    state.mark_candidate()
    assert not should_train(state, 1)
    state.add_decisions([decision("c", "d", LABEL_REJECTED, 3)])  # a verdict changed: new information
    assert should_train(state, 1)


def test_training_set_lets_the_label_win_and_weighs_decisions() -> None:
    pairs = [("a", "b"), ("c", "d"), ("e", "f"), ("g", "zz")]
    labels = {("a", "b"): Label(True, 1, "m"),      # confirmed and mined: one row, the label's
              ("c", "d"): Label(False, 2, "m"),     # rejected and mined: no positive any more
              ("h", "i"): Label(False, 3, "m"),     # a rejected alert the clicks never mined
              ("j", "k"): Label(True, 4, "m"),
              ("j", "gone"): Label(True, 5, "m")}   # a listing not in the catalogue
    catalogue = {"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k"}
    got = training_set(pairs, labels, catalogue, label_weight=2.5)
    assert got.rows == [TrainingRow("e", "f", 1, 1.0, "clicks"), TrainingRow("a", "b", 1, 2.5, LABEL_CONFIRMED),
                        TrainingRow("c", "d", 0, 2.5, LABEL_REJECTED), TrainingRow("h", "i", 0, 2.5, LABEL_REJECTED),
                        TrainingRow("j", "k", 1, 2.5, LABEL_CONFIRMED)]
    assert (got.replaced, got.pairs_left_out, got.labels_left_out) == (2, 1, 1)
    assert got.count("clicks") == 1 and "2 confirmed and 2 rejected" in got.summary()
    # Without decisions the rows are the mined pairs, as before.
    assert [r[:3] for r in training_set(pairs[:2], {}, catalogue, 3.0).rows] == [("a", "b", 1), ("c", "d", 1)]


def test_weights_and_labels_reach_the_training_set(tmp_path: Path) -> None:
    from samestyle.models.train.finetune import TrainConfig, load_products, read_pair_weights

    listings = tmp_path / "listings.csv"
    listings.write_text("listing_id,title\n" + "".join(f"{i},item {i}\n" for i in "abcdefhi"))
    rows = training_set([("a", "b"), ("c", "d"), ("e", "f")],
                        {("c", "d"): Label(False, 1, "m"), ("h", "i"): Label(True, 2, "m")},
                        set("abcdefhi"), label_weight=3.0).rows
    path = tmp_path / "pairs.csv"
    assert write_training_csv(path, rows) == 4
    assert read_pairs(path) == [("a", "b", 1), ("e", "f", 1), ("c", "d", 0), ("h", "i", 1)]
    assert read_pair_weights(path) == {("a", "b"): 1.0, ("e", "f"): 1.0, ("c", "d"): 3.0, ("h", "i"): 3.0}
    data = load_products(TrainConfig(listings=listings, out=tmp_path / "m", pairs=path))
    assert data.positives == [("a", "b"), ("e", "f"), ("h", "i")]
    assert data.negatives == {"c": ["d"], "d": ["c"]}  # the rejected alert: a hard negative
    assert data.weighted and data.weights == {("c", "d"): 3.0, ("h", "i"): 3.0}  # weight 1 is the default
    assert data.weight("i", "h") == 3.0 and data.weight("b", "a") == 1.0
    # A pairs file without the column: no weights at all, as before.
    plain = tmp_path / "plain.csv"
    write_pairs_csv(plain, [("a", "b")])
    assert read_pair_weights(plain) is None
    data = load_products(TrainConfig(listings=listings, out=tmp_path / "m", pairs=plain))
    assert not data.weighted and data.weights == {}
    bad = tmp_path / "bad.csv"
    bad.write_text("listing_id_a,listing_id_b,label,weight\na,b,1,-1\n")
    with pytest.raises(ConfigError, match="bad.csv:2: weight must be finite and > 0"):
        read_pair_weights(bad)


def test_weighted_info_nce_is_a_weighted_mean_and_weight_one_is_the_plain_loss() -> None:
    import torch

    from samestyle.models.train.finetune import _info_nce

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    masked = torch.zeros(4, 6, dtype=torch.bool)
    targets = torch.arange(4)
    plain = _info_nce(q, k, masked, targets, 0.05)
    assert torch.allclose(_info_nce(q, k, masked, targets, 0.05, torch.ones(4)), plain)
    per_row = torch.nn.functional.cross_entropy(q @ k.T / 0.05, targets, reduction="none")
    weighted = _info_nce(q, k, masked, targets, 0.05, torch.tensor([3.0, 1.0, 1.0, 1.0]))
    assert torch.allclose(weighted, (3 * per_row[0] + per_row[1:].sum()) / 6)


def test_a_weighted_pairs_file_with_rejections_trains_without_a_valid_set(tmp_path: Path) -> None:
    """What the trainer writes (mined pairs, confirmed and rejected decisions, weights) trains a
    model, the matcher fitting on mined pairs plus the rejected pairs, without --valid-pairs; and a
    weight column of ones trains exactly what the plain file does."""
    import torch

    from samestyle.models.finetuned import TEXT_DIR, TOWERS_WEIGHTS
    from samestyle.models.train.finetune import TrainConfig, train
    from samestyle.streams.dev.sample import generate_sample

    listings, clusters = generate_sample(tmp_path / "data", n_products=12, seed=1)
    members: dict[str, list[str]] = {}
    for line in clusters.read_text().splitlines()[1:]:
        listing, cluster = line.split(",")[:2]
        members.setdefault(cluster, []).append(listing)
    same = [tuple(sorted(m[:2])) for m in members.values() if len(m) >= 2]
    singles = sorted(m[0] for m in members.values() if len(m) == 1)
    assert len(same) >= 4 and len(singles) >= 4

    def config(pairs: Path, out: str) -> TrainConfig:
        return TrainConfig(listings=listings, out=tmp_path / out, pairs=pairs, base="tiny", epochs=1, batch_size=4,
                           allow_random_weights=True, progress=False, mined_k=3, images=False, folds=2)

    labels = {same[0]: Label(True, 1, "m"), (singles[0], singles[1]): Label(False, 2, "m"),
              tuple(sorted((same[1][0], same[2][0]))): Label(False, 3, "m")}
    rows = training_set(same[1:], labels, set(members_of(members)), label_weight=3.0).rows
    weighted = tmp_path / "weighted.csv"
    write_training_csv(weighted, rows)
    out = train(config(weighted, "weighted"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["matcher_valid"]["source"] == "mined pairs of held-back training products"

    ones = tmp_path / "ones.csv"
    write_training_csv(ones, [TrainingRow(a, b, 1, 1.0, "clicks") for a, b in same])
    plain = tmp_path / "plain.csv"
    write_pairs_csv(plain, same)
    a, b = train(config(ones, "ones")), train(config(plain, "plain"))
    sa, sb = (torch.load(d / TOWERS_WEIGHTS, map_location="cpu", weights_only=True) for d in (a, b))
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[part][key], sb[part][key]) for part in sa for key in sa[part])
    text_a, text_b = (sorted((d / TEXT_DIR).glob("*.safetensors")) for d in (a, b))
    assert text_a and [f.read_bytes() for f in text_a] == [f.read_bytes() for f in text_b]
    ma, mb = (json.loads((d / "matcher.json").read_text()) for d in (a, b))
    assert ma["threshold"] == mb["threshold"] and ma["valid"] == mb["valid"]


def members_of(members: dict[str, list[str]]) -> list[str]:
    return [i for m in members.values() for i in m]


def test_undecodable_records_are_skipped_with_their_position(caplog: pytest.LogCaptureFixture) -> None:
    codec = codec_for_topic(MODERATION_DECISIONS)
    good = codec.encode(decision("a", "b", LABEL_CONFIRMED, 1))
    records = [LogRecord("md", 0, 0, b"a", good, 1), LogRecord("md", 1, 5, b"x", b"\xff\x00", 1),
               LogRecord("md", 1, 6, b"y", None, 1)]
    with caplog.at_level("WARNING"):
        assert decode_records(records, MODERATION_DECISIONS) == [codec.decode(good)]
    assert "md[1]@5 skipped" in caplog.text and "md[1]@6 skipped" in caplog.text


def test_label_settings_and_flags() -> None:
    assert (Settings().trainer_label_weight, Settings().trainer_max_labels) == (3.0, 100_000)
    assert Settings.from_env({"SAMESTYLE_TRAINER_LABEL_WEIGHT": "5"}).trainer_label_weight == 5.0
    for bad in ({"trainer_label_weight": 0.0}, {"trainer_label_weight": float("nan")}, {"trainer_max_labels": 0}):
        with pytest.raises(ConfigError):
            Settings(**bad)  # type: ignore[arg-type]
