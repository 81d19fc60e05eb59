"""A tiny end-to-end run: ``samestyle train`` then ``samestyle eval`` on a few listings with
tiny random backbones (the pipeline, not the quality)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from samestyle.models.train import evaluate
from samestyle.models.train import run as train
from samestyle.topics.errors import ConfigError

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


@pytest.fixture(scope="module")
def photo_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Grocery-style data: a catalog entry (title + image) per product, and image-only photos
    (no title) split into train and val."""
    root = tmp_path_factory.mktemp("photos")
    (root / "images").mkdir()
    listings, clusters = [], []
    for k, (title, description, color) in enumerate(PRODUCTS):
        for name, split, shift in (("cat", "catalog", 0), ("tr0", "train", 10), ("tr1", "train", 20), ("val", "val", 15)):
            image = f"images/{name}{k}.png"
            Image.new("RGB", (36, 36), tuple(min(255, c + shift) for c in color)).save(root / image)
            text = (title, description) if split == "catalog" else ("", "")
            listings.append([f"{name}{k}", *text, "", "", "", image, f"shop_{split}"])
            clusters.append([f"{name}{k}", f"c{k}", split])
    header = ["listing_id", "title", "description", "price", "brand", "category", "image_path", "source"]
    _write(root / "listings.csv", header, listings)
    _write(root / "clusters.csv", ["listing_id", "cluster_id", "split"], clusters)
    return root


def test_image_only_photos_train_then_eval_val_against_catalog(
    photo_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "model"
    _train(photo_dataset, out, "--clusters", str(photo_dataset / "clusters.csv"), "--split-column", "split",
           "--scorer-layers", "1", "--loss", "infonce")
    trained = json.loads((out / "manifest.json").read_text())["trained_listings"]
    assert len(trained) == 18 and not any(t.startswith("val") for t in trained)  # val never read
    capsys.readouterr()
    assert evaluate.main(["--model", str(out), "--listings", str(photo_dataset / "listings.csv"),
                          "--clusters", str(photo_dataset / "clusters.csv"), "--split-column", "split",
                          "--query-split", "val", "--gallery-split", "catalog", "--baselines", "tfidf",
                          "--json", "--allow-random-weights", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n_queries"] == 6 and result["n_gallery"] == 6
    assert "never trained on" in result["leakage"]
    # Photos have no text: every view pair with a T query is absent; image and cross-modal are there.
    assert {"I->I", "I->IT", "I->T", "IT->IT", "IT->T"} <= set(result["views"])
    assert not any(v.startswith("T->") for v in result["views"])
    for metrics in result["views"].values():
        assert metrics["queries"] == 6
    assert "tfidf" not in result["baselines"]  # no titled query: the title baseline has nothing to do


def test_mined_negatives_skip_excluded_listings() -> None:
    import torch

    from samestyle.models.features import FeatureCache
    from samestyle.models.unified import UnifiedConfig, UnifiedFusion

    n = 6
    cache = FeatureCache([f"x{k}" for k in range(n)], ["t"] * n, torch.randn(n, 3, 8).half(),
                         torch.ones(n, 3, dtype=torch.bool), torch.ones(n, 3, dtype=torch.int32),
                         torch.zeros(n, 0, 4).half(), torch.zeros(n, dtype=torch.bool))
    product = {f"x{k}": f"p{k // 2}" for k in range(n)}
    data = train.TrainingData({"x0": ["x1"], "x1": ["x0"], "x2": ["x3"], "x3": ["x2"]}, {}, product, [], [],
                              excluded={"x4", "x5"})
    fusion = UnifiedFusion(UnifiedConfig(dim=8, hidden=16, heads=2, ffn=16), 8, 4).eval()
    pairs = train._mined_pairs(fusion, cache, data, "cpu", k=5)
    seen = {a for a, _, _ in pairs} | {b for _, b, _ in pairs}
    assert pairs and not seen & {"x4", "x5"}
    assert {(a, b, y) for a, b, y in pairs if y == 1} == {("x0", "x1", 1), ("x2", "x3", 1)}


def test_finetune_last_text_layer_saves_and_serves_the_backbone(dataset: Path, tmp_path: Path) -> None:
    import torch

    from samestyle.models.encoder import NAMED_CONFIGS, ListingInput
    from samestyle.models.unified import load_unified_model

    out = tmp_path / "model"
    _train(dataset, out, "--clusters", str(dataset / "clusters.csv"), "--scorer-layers", "0", "--no-images",
           "--finetune", "--finetune-layers", "1", "--backbone-lr", "1e-2")
    state = torch.load(out / "weights.pt", weights_only=True)
    assert "text_backbone" in state and "image_backbone" not in state
    fresh = train.build_text_backbone("tiny", NAMED_CONFIGS["tiny"]).state_dict()
    changed = {k for k, v in state["text_backbone"].items() if not torch.equal(v, fresh[k])}
    # Only the last layer trained: the embeddings and the first layer are untouched.
    assert changed and all(k.startswith("model.encoder.layer.1.") for k in changed)
    loaded = load_unified_model(out, allow_random_weights=True)
    loaded_state = loaded.text_backbone.state_dict()
    assert all(torch.equal(loaded_state[k], state["text_backbone"][k]) for k in changed)
    assert loaded.encode([ListingInput("x", "sony turntable")]).text.shape == (1, 16)


def test_finetune_last_image_block_saves_and_serves_the_backbone(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import copy

    import torch

    from samestyle.models.encoder import NAMED_CONFIGS, ListingInput
    from samestyle.models.features import image_tokens
    from samestyle.models.unified import load_unified_model

    saved: dict[str, torch.nn.Module] = {}
    original_save = train.save_unified_model

    def capture(out_dir, config, unified, fusion, scorer, manifest, metrics, backbones=None, idf=None):  # type: ignore[no-untyped-def]
        saved.update({"fusion": copy.deepcopy(fusion), **{k: copy.deepcopy(v) for k, v in (backbones or {}).items()}})
        return original_save(out_dir, config, unified, fusion, scorer, manifest, metrics, backbones=backbones, idf=idf)

    monkeypatch.setattr(train, "save_unified_model", capture)
    out = tmp_path / "model"
    _train(dataset, out, "--clusters", str(dataset / "clusters.csv"), "--scorer-layers", "0", "--epochs", "1",
           "--finetune-image-blocks", "1", "--backbone-lr", "1e-2")
    state = torch.load(out / "weights.pt", weights_only=True)
    assert "image_backbone" in state and "text_backbone" not in state  # text backbone stayed frozen
    config = NAMED_CONFIGS["tiny"]
    fresh = train.build_image_backbone("tiny", config).state_dict()
    changed = {k for k, v in state["image_backbone"].items() if not torch.equal(v, fresh[k])}
    # Only the last block (the second convolution) trained: the first one is untouched.
    assert changed and all(k.startswith("net.2.") for k in changed)
    assert all(torch.equal(state["image_backbone"][k], fresh[k]) for k in fresh if k.startswith("net.0."))

    loaded = load_unified_model(out, allow_random_weights=True)
    assert all(torch.equal(v, state["image_backbone"][k]) for k, v in loaded.image_backbone.state_dict().items())
    image = (dataset / "images" / "l0.png").read_bytes()
    served = loaded.encode([ListingInput("x", "", image=image)])
    assert bool(served.has_image[0])
    # The trained backbone + fusion, as they were at the end of training, give the same I view.
    with torch.no_grad():
        pixels = config.image_preprocessing()(image).unsqueeze(0)
        tokens = image_tokens(saved["image"].eval(), pixels, 2)  # --image-grid 2
        text = torch.zeros(1, 1, loaded.text_backbone.dim)
        expected = saved["fusion"].eval()("I", text, torch.zeros(1, 1, dtype=torch.bool), tokens,
                                          torch.ones(1, dtype=torch.bool), torch.zeros(1, 1, dtype=torch.long))[0]
        untrained = image_tokens(train.build_image_backbone("tiny", config).eval(), pixels, 2)
    assert torch.allclose(torch.from_numpy(served.image), expected, atol=1e-5)
    assert not torch.allclose(loaded_tokens := image_tokens(loaded.image_backbone, pixels, 2), untrained)
    assert torch.allclose(loaded_tokens, tokens, atol=1e-6)


def test_finetune_image_blocks_checked(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune-image-blocks"):
        _train(dataset, tmp_path / "m", "--clusters", str(dataset / "clusters.csv"), "--scorer-layers", "0",
               "--finetune-image-blocks", "3")  # the tiny image backbone has 2 blocks
    with pytest.raises(ConfigError, match="finetune-image-blocks"):
        _train(dataset, tmp_path / "n", "--clusters", str(dataset / "clusters.csv"), "--scorer-layers", "0",
               "--no-images", "--finetune-image-blocks", "1")


def test_finetune_layers_checked(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="finetune-layers"):
        _train(dataset, tmp_path / "m", "--clusters", str(dataset / "clusters.csv"), "--scorer-layers", "0",
               "--finetune", "--finetune-layers", "9")


def test_concat_fusion_ablation_trains_and_evaluates(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "model"
    _train(dataset, out, "--clusters", str(dataset / "clusters.csv"), "--holdout-fraction", "0.5",
           "--scorer-layers", "0", "--fusion", "concat")
    assert json.loads((out / "unified.json").read_text())["fusion"] == "concat"
    capsys.readouterr()
    assert evaluate.main(["--model", str(out), "--listings", str(dataset / "listings.csv"),
                          "--clusters", str(dataset / "clusters.csv"), "--baselines", "", "--json",
                          "--allow-random-weights", "--no-progress"]) == 0
    assert {"I->IT", "IT->IT"} <= set(json.loads(capsys.readouterr().out)["views"])


def test_embed_view_matches_one_fusion_call() -> None:
    import torch

    from samestyle.models.unified import UnifiedConfig, UnifiedFusion

    torch.manual_seed(0)
    fusion = UnifiedFusion(UnifiedConfig(dim=8, hidden=16, heads=2, ffn=16, layers=1, dropout=0.0), 6, 4).eval()
    text = torch.randn(5, 7, 6)
    mask = torch.tensor([[1] * 7, [1, 1, 0, 0, 0, 0, 0], [0] * 7, [0] * 7, [1, 1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    image = torch.randn(5, 3, 4)
    has_image = torch.tensor([True, False, True, True, False])
    ids = torch.zeros(5, 7, dtype=torch.long)
    for view in ("I", "T", "IT"):
        expected = fusion(view, text, mask, image, has_image, ids)[0]
        got = train._embed_view(fusion, view, text, mask, image, has_image, ids)
        assert torch.allclose(got, expected, atol=1e-5), view


def test_partner_split_pairs_photos_with_their_catalog_entry(photo_dataset: Path) -> None:
    args = train.build_parser().parse_args([
        "--listings", str(photo_dataset / "listings.csv"), "--clusters", str(photo_dataset / "clusters.csv"),
        "--split-column", "split", "--partner-split", "catalog", "--out", "unused"])
    ids = {f"{name}{k}" for name in ("cat", "tr0", "tr1", "val") for k in range(len(PRODUCTS))}
    data = train.load_training_data(args, ids)
    assert data.positives["tr00"] == ["cat0"] and data.positives["tr11"] == ["cat1"]
    assert sorted(data.positives["cat2"]) == ["tr02", "tr12"]  # the catalog entry: its photos
    assert not any(i.startswith("val") for i in data.positives) and "val3" in data.excluded
    with pytest.raises(ConfigError, match="split-column"):
        train.load_training_data(train.build_parser().parse_args([
            "--listings", "x", "--clusters", str(photo_dataset / "clusters.csv"), "--partner-split", "catalog",
            "--out", "unused"]), ids)


def test_retrieval_ties_are_not_hits() -> None:
    import numpy as np

    from samestyle.models.train.metrics import retrieval_metrics

    # No signal at all (every score equal): expected rank, not a perfect score.
    flat = retrieval_metrics(np.zeros((2, 4)), ["a", "b"], ["a", "b", "c", "d"])
    assert flat["recall_at_1"] == 0.0 and flat["mrr"] == pytest.approx(1 / 2.5)
    exact = retrieval_metrics(np.array([[0.9, 0.1], [0.2, 0.8]]), ["a", "b"], ["a", "b"])
    assert exact["recall_at_1"] == 1.0 and exact["mrr"] == 1.0


def test_the_re_rank_breaks_probability_ties_by_cosine_as_the_stream_does() -> None:
    import numpy as np

    from samestyle.models.data import ListingRecord
    from samestyle.models.encoder import Embeddings

    class Flat:
        """A matcher without an opinion: every candidate gets the same probability."""

        def probabilities(self, candidates: list) -> np.ndarray:
            return np.full(len(candidates), 0.5, dtype=np.float32)

    class Model:
        duplicate_scorer = Flat()

        @staticmethod
        def match_text(listing: object) -> str:
            return "text"

    # One query; three gallery items; the query's own cluster "a" holds the most similar one.
    it = np.array([[1.0, 0.0], [0.9, 0.436], [0.6, 0.8], [0.0, 1.0]], dtype=np.float32)
    emb = Embeddings(image=np.zeros_like(it), text=it, image_text=it, has_image=np.zeros(4, dtype=bool))
    records = [ListingRecord(f"l{k}", f"title {k}", "", None, None) for k in range(4)]
    clusters = np.array(["a", "a", "b", "c"])
    q, g = np.array([0]), np.array([1, 2, 3])
    same = np.zeros((1, 3), dtype=bool)
    result = evaluate._reranked(Model(), records, emb, q, g, clusters, same)
    # Tied probabilities: the stream lists by cosine, so the hit is first (not a half-counted tie).
    assert result["recall_at_1"] == 1.0 and result["mrr"] == 1.0
