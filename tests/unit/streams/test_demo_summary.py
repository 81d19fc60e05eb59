"""The demo's summary scores alerts on the products a trained model never saw."""

from __future__ import annotations

import json
from pathlib import Path

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
    assert quality == {"listings": 2, "match_listed": 1.0, "match_first": 0.5}
    assert similar_quality(similar, clusters, order, only={"b1", "b2"}) == {
        "listings": 1, "match_listed": 1.0, "match_first": 0.0}
