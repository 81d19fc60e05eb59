"""`samestyle demo --learn` end to end with tiny random-initialised models: clicks → pairs → trainer → switch.

The catalogue is made so that only the clicks can teach: every product is listed twice, once in
English and once in French words ("red wooden chair" / "rouge bois chaise"), so the untrained
tiny encoder, whose two listings of a product share no token, retrieves at chance. Words recur
across products, so what the candidate learns from the clicked products' pairs carries over to
the held-out ones.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from pathlib import Path

import pytest

from samestyle.streams.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENGLISH = (("red", "blue", "green", "black", "white", "yellow"),
           ("wooden", "metal", "glass", "leather", "cotton", "stone"),
           ("chair", "table", "lamp", "bag", "shirt", "vase"))
FRENCH = (("rouge", "bleu", "vert", "noir", "blanc", "jaune"),
          ("bois", "acier", "verre", "cuir", "coton", "pierre"),
          ("chaise", "bureau", "lampe", "sac", "chemise", "pot"))


def bilingual_catalogue(folder: Path, products: int = 150, seed: int = 0) -> tuple[Path, Path]:
    """``products`` distinct (colour, material, object) products, each an "en" and an "fr" listing."""
    combos = list(itertools.product(*(range(len(words)) for words in ENGLISH)))
    random.Random(seed).shuffle(combos)
    folder.mkdir(parents=True, exist_ok=True)
    listings, clusters = folder / "listings.csv", folder / "clusters.csv"
    with listings.open("w", newline="") as lf, clusters.open("w", newline="") as cf:
        lw, cw = csv.writer(lf), csv.writer(cf)
        lw.writerow(["listing_id", "title", "source"])
        cw.writerow(["listing_id", "cluster_id"])
        for k, combo in enumerate(combos[:products]):
            for source, words in (("en", ENGLISH), ("fr", FRENCH)):
                listing_id = f"{source}-{k:03d}"
                lw.writerow([listing_id, " ".join(w[i] for w, i in zip(words, combo)), source])
                cw.writerow([listing_id, f"p{k:03d}"])
    return listings, clusters


def test_demo_learn_mines_trains_promotes_switches_and_measures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    listings, clusters = bilingual_catalogue(tmp_path / "catalogue")
    monkeypatch.setenv("SAMESTYLE_ENCODER", "tiny")
    monkeypatch.setenv("SAMESTYLE_ALLOW_RANDOM_WEIGHTS", "1")
    # Enough steps for tiny random backbones to learn the word pairs: measured offline on this
    # catalogue, 6 epochs of batches of 8 took held-out R@1 from 0.0 (untrained) to 0.51; 5 epochs
    # of 16 reached only 0.18, which the trainer's 22 valid queries could not tell from chance.
    assert main(["demo", "--learn", "--json", "--listings", str(listings), "--clusters", str(clusters),
                 "--holdout-fraction", "0.3", "--sessions", "2100", "--workers", "2", "--epochs", "6",
                 "--train-batch-size", "8", "--timeout", "300"]) == 0
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    learn = summary["learn"]
    for n, stage in enumerate(("split", "index", "before", "clicks", "trainer", "switch", "after"), start=1):
        assert f"[{n}/7] {stage}: " in captured.err
        assert stage in learn["stage_seconds"]

    # 150 products: 45 kept out of the clicks (22 valid, 23 measured), 105 clicked.
    assert learn["products"] == {"clicked": 105, "valid": 22, "measured": 23}
    assert summary["listings_indexed"] == 300 and summary["dead_letters"] == 0
    assert learn["clicks"]["sessions"] == 2100 and learn["clicks"]["clicks"] > 2100
    assert learn["switch"]["seconds_after_decision"] >= 0
    # The workers' pairs agents mined the clicked products' pairs (precision and recall measured, not assumed).
    pairs = learn["pairs"]
    assert pairs["distinct_pairs"] >= 50 and pairs["precision"] > 0.8

    trainer = learn["trainer"]
    assert trainer["decision"] == "PROMOTED", trainer["reason"]
    assert trainer["pairs_used"] == pairs["distinct_pairs"]
    assert trainer["score"] > trainer["previous_score"]
    untrained = summary["model_version"]
    assert trainer["previous_version"] == untrained

    # Every worker switched, and every listing sent during the switch was answered.
    switch = learn["switch"]
    assert switch["listings_sent"] > 0 and switch["listings_answered"] == switch["listings_sent"]
    assert set(switch["answers_by_version"]) <= {untrained, trainer["version"]}
    assert trainer["version"] in switch["answers_by_version"]

    before, after = learn["before"], learn["after"]
    assert before["versions"] == {untrained: 46} and after["versions"] == {trainer["version"]: 46}
    assert before["listings"] == after["listings"] == 46
    for quality in (before, after):
        assert 0.0 <= quality["recall_at_1"] <= quality["recall_at_k"] <= 1.0
    # The point of the loop: the retrained model finds held-out products the untrained one cannot.
    assert after["recall_at_k"] > before["recall_at_k"]
