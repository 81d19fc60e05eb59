"""A tiny end-to-end run: ``samestyle train`` then ``samestyle eval`` on a few listings with
tiny random backbones (the pipeline, not the quality)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from models import evaluate, train
from topics.errors import ConfigError

PRODUCTS = [
    ("sony turntable pslx350h", "sony pslx350h belt drive turntable", (200, 30, 30)),
    ("bose acoustimass 5 am53bk", "bose am53bk speaker system", (30, 200, 30)),
    ("canon powershot sd1100", "canon sd1100 is digital camera", (30, 30, 200)),
    ("panasonic lumix dmc-fx35", "panasonic dmcfx35 lumix camera", (200, 200, 30)),
    ("apple ipod nano 8gb", "ipod nano 8 gb apple", (30, 200, 200)),
    ("logitech mx revolution mouse", "logitech mx revolution cordless mouse", (200, 30, 200)),
]
SMALL = ["--dim", "16", "--hidden", "32", "--heads", "2", "--layers", "1", "--image-grid", "2"]


def _write(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    listings, clusters = [], []
    for k, (left, right, color) in enumerate(PRODUCTS):
        for side, title in (("l", left), ("r", right)):
            image = f"images/{side}{k}.png"
            shade = tuple(min(255, c + (25 if side == "r" else 0)) for c in color)
            Image.new("RGB", (36, 36), shade).save(root / image)
            listings.append([f"{side}{k}", title, "", "", "", "", image, f"{side}.com"])
            clusters.append([f"{side}{k}", f"c{k}"])
    header = ["listing_id", "title", "description", "price", "brand", "category", "image_path", "source"]
    _write(root / "listings.csv", header, listings)
    _write(root / "clusters.csv", ["listing_id", "cluster_id"], clusters)
    pair_header = ["listing_id_a", "listing_id_b", "label"]
    _write(root / "pairs_train.csv", pair_header,
           [[f"l{k}", f"r{k}", 1] for k in range(6)] + [[f"l{k}", f"r{(k + 1) % 6}", 0] for k in range(6)])
    _write(root / "pairs_valid.csv", pair_header,
           [[f"l{k}", f"r{k}", 1] for k in range(3)] + [[f"l{k}", f"r{(k + 2) % 6}", 0] for k in range(3)])
    _write(root / "pairs_check.csv", pair_header,
           [[f"l{k}", f"r{k}", 1] for k in range(3, 6)] + [[f"l{k}", f"r{(k + 3) % 6}", 0] for k in range(3, 6)])
    _write(root / "pairs_test.csv", pair_header, [["l0", "r0", 1]])
    return root


def _train(dataset: Path, out: Path, *extra: str) -> None:
    argv = ["--listings", str(dataset / "listings.csv"), "--out", str(out), "--base", "tiny",
            "--allow-random-weights", "--epochs", "2", "--scorer-epochs", "1", "--batch-size", "4",
            "--cache-dir", str(out.parent / "cache"), "--no-progress", *SMALL, *extra]
    assert train.main(argv) == 0


def test_train_then_eval_pairs(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    _train(dataset, out, "--pairs", str(dataset / "pairs_train.csv"), "--valid-pairs", str(dataset / "pairs_valid.csv"))
    for name in ("encoder.json", "unified.json", "weights.pt", "manifest.json", "metrics.json", "idf.json"):
        assert (out / name).is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pairs"]["sha256"] and manifest["with_images"] is True
    assert json.loads((out / "encoder.json").read_text())["fusion"] == "unified"
    assert "valid_cosine" in json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert evaluate.main(["--model", str(out), "--listings", str(dataset / "listings.csv"),
                          "--pairs", str(dataset / "pairs_check.csv"), "--valid-pairs", str(dataset / "pairs_valid.csv"),
                          "--baselines", "tfidf", "--json", "--allow-random-weights", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("f1", "precision", "recall", "threshold"):
        assert 0.0 <= result[key] <= 1.0 or key == "threshold"
    assert result["decision"] == "cross-scorer"
    assert {"bi_encoder", "cross_scorer"} <= set(result) and "tfidf" in result["baselines"]


def test_train_clusters_holdout_then_eval_retrieval(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    _train(dataset, out, "--clusters", str(dataset / "clusters.csv"), "--holdout-fraction", "0.5", "--scorer-layers", "0")
    held = json.loads((out / "manifest.json").read_text())["held_out_clusters"]
    assert len(held) == 3
    capsys.readouterr()
    report = tmp_path / "report"
    assert evaluate.main(["--model", str(out), "--listings", str(dataset / "listings.csv"),
                          "--clusters", str(dataset / "clusters.csv"), "--baselines", "tfidf", "--json",
                          "--allow-random-weights", "--no-progress", "--report", str(report)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_queries"] == 3 and "held out" in result["leakage"]
    assert {"T->T", "IT->IT", "I->I", "I->IT", "T->IT"} <= set(result["views"])
    for metrics in result["views"].values():
        assert set(metrics) >= {"recall_at_1", "recall_at_10", "mrr"}
    assert result["baselines"]["tfidf"]["views"]["T->T"]["recall_at_1"] == 1.0
    assert (report / "report.md").is_file() and (report / "recall_at_k.png").is_file()


def test_train_refuses_test_split(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="test split"):
        _train(dataset, tmp_path / "m", "--pairs", str(dataset / "pairs_test.csv"))


def test_eval_needs_valid_pairs(dataset: Path) -> None:
    with pytest.raises(ConfigError, match="valid"):
        evaluate.main(["--model", "tiny", "--listings", str(dataset / "listings.csv"),
                       "--pairs", str(dataset / "pairs_check.csv"), "--allow-random-weights"])
