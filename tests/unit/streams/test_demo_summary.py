"""The demo's summary scores alerts on the products a trained model never saw."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samestyle.streams.dev.demo import format_summary, summarize
from samestyle.streams.io.producer import Outputs
from samestyle.streams.settings import Settings


def test_held_out_products_are_scored_apart(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text(json.dumps({"held_out_clusters": ["c2", "c3"]}))
    clusters = {"a1": "c1", "a2": "c1", "b1": "c2", "b2": "c2", "d1": "c3", "d2": "c3"}
    ids = set(clusters)
    outputs = Outputs(similar=[{"listing_id": i, "model_version": "m"} for i in sorted(ids)],
                      alerts=[{"listing_id": "a2", "duplicate_of": "a1"},   # trained product, right
                              {"listing_id": "b2", "duplicate_of": "b1"},   # held out, right
                              {"listing_id": "d1", "duplicate_of": "a1"}])  # held out, wrong
    summary = summarize(outputs, ids, clusters, {i: "s" for i in ids}, 1.0,
                        Settings(encoder=str(model), state_dir=tmp_path), tmp_path)
    assert summary["alert_precision"] == 2 / 3
    held = summary["held_out"]
    assert (held["clusters"], held["listings"], held["true_duplicate_pairs"]) == (2, 4, 2)
    assert held["alert_precision"] == 0.5 and held["alert_recall"] == 0.5
    assert "held-out products" in format_summary(summary)


def test_no_manifest_no_held_out_section(tmp_path: Path) -> None:
    outputs = Outputs(similar=[{"listing_id": "a", "model_version": "m"}])
    summary = summarize(outputs, {"a"}, {"a": "c"}, {"a": "s"}, 1.0, Settings(encoder="tiny", state_dir=tmp_path), tmp_path)
    assert "held_out" not in summary


def test_similar_products_quality_counts_only_listings_with_an_earlier_match() -> None:
    from samestyle.streams.dev.demo import similar_quality

    clusters = {"a1": "c1", "a2": "c1", "b1": "c2", "b2": "c2", "e1": "c3"}
    order = ["a1", "b1", "e1", "a2", "b2"]
    similar = [
        {"listing_id": "a1", "neighbours": []},                                          # first of c1: not counted
        {"listing_id": "a2", "neighbours": [{"listing_id": "a1"}, {"listing_id": "b1"}]},  # first is a match
        {"listing_id": "b2", "neighbours": [{"listing_id": "a1"}, {"listing_id": "b1"}]},  # listed, not first
        {"listing_id": "e1", "neighbours": [{"listing_id": "a1"}]},                        # nothing of c3 before it
    ]
    quality = similar_quality(similar, clusters, order)
    assert quality == {"listings": 2, "match_listed": 1.0, "match_first": 0.5, "recall_at_1": 0.5}
    assert similar_quality(similar, clusters, order, only={"b1", "b2"}) == {
        "listings": 1, "match_listed": 1.0, "match_first": 0.0, "recall_at_1": 0.0}


def test_listings_produced_again_are_judged_at_their_last_place() -> None:
    """demo --learn sends held-out listings again after the whole catalogue: both listings of a
    product then have the other one before them."""
    from samestyle.streams.dev.demo import similar_quality

    clusters = {"a1": "c1", "a2": "c1", "b1": "c2", "b2": "c2"}
    order = ["a1", "b1", "a2", "b2", "a1", "a2"]
    similar = [
        {"listing_id": "a1", "neighbours": [{"listing_id": "b1"}, {"listing_id": "a2"}]},  # listed, not first
        {"listing_id": "a2", "neighbours": [{"listing_id": "a1"}]},                        # first
    ]
    assert similar_quality(similar, clusters, order, only={"a1", "a2"}) == {
        "listings": 2, "match_listed": 1.0, "match_first": 0.5, "recall_at_1": 0.5}


def test_learn_split_holds_products_out_of_the_clicks() -> None:
    from samestyle.streams.dev.learn import split_products

    # 20 products of two listings, one of three, and a listing alone (not a product: always clickable).
    clusters = {f"{p}-{k}": p for p in (f"c{n:02d}" for n in range(20)) for k in range(2)}
    clusters.update({"big-0": "big", "big-1": "big", "big-2": "big", "alone": "solo"})
    split = split_products(clusters, clusters, 0.3, seed=1)
    assert (len(split.valid), len(split.held_out), len(split.clicked)) == (3, 3, 15)
    assert not (split.valid & split.held_out) and not (split.clicked & (split.valid | split.held_out))
    assert split.clicked | split.valid | split.held_out == set(clusters.values()) - {"solo"}
    assert split_products(clusters, clusters, 0.3, seed=1) == split  # seeded
    assert split_products(clusters, clusters, 0.3, seed=2) != split


def test_learn_refuses_the_generated_sample_with_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from samestyle.streams.cli.main import main

    assert main(["demo", "--learn"]) == 2
    err = capsys.readouterr().err
    assert "the generated sample is too small to learn from" in err
    assert "--listings ../shared/data/abt_buy/full_gt/listings.csv" in err


def test_learn_needs_clusters_with_listings(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from samestyle.streams.cli.main import main

    listings = tmp_path / "listings.csv"
    listings.write_text("listing_id,title\na,red chair\n")
    assert main(["demo", "--learn", "--listings", str(listings)]) == 2
    assert "needs --clusters" in capsys.readouterr().err


def test_learn_section_of_the_table() -> None:
    from samestyle.streams.dev.learn import format_learn

    quality = {"k": 10, "listings": 46, "versions": {}}
    learn = {
        "products": {"clicked": 105, "valid": 22, "measured": 23},
        "clicks": {"sessions": 2100, "clicks": 5000},
        "pairs": {"distinct_pairs": 100, "precision": 0.95, "recall": 0.9},
        "trainer": {"decision": "PROMOTED", "version": "v2", "reason": "better"},
        "switch": {"seconds_after_decision": 12.0, "listings_sent": 40, "listings_answered": 40},
        "before": {**quality, "model_version": "v1", "recall_at_1": 0.25, "recall_at_k": 0.5},
        "after": {**quality, "model_version": "v2", "recall_at_1": 0.5, "recall_at_k": 0.75},
    }
    table = format_learn(learn)
    assert "PROMOTED  v2: better" in table and "40 of 40 listings sent meanwhile answered" in table
    assert "R@10" in table and "+0.250" in table
    rejected = format_learn({**learn, "trainer": {**learn["trainer"], "decision": "REJECTED"}, "switch": None,
                             "after": None})
    assert "after" not in rejected.split("R@10")[1] and "change" not in rejected
