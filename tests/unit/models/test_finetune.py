"""The fine-tuning recipe on tiny random models: products, negatives, matcher, augmentation, model dirs."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samestyle.models.encoder import ListingInput, PairCandidate
from samestyle.models.factory import create_encoder
from samestyle.models.finetuned import FinetunedEncoder
from samestyle.models.matcher import FEATURES, MEMORY_FEATURES, PairFeaturizer, ProductMemory, load_matcher
from samestyle.models.text import match_text, parse_price, serialize, split_source
from samestyle.models.train import finetune
from samestyle.models.train.finetune import TrainConfig, augment, candidates_for, load_products, train
from samestyle.topics.errors import ConfigError


def _catalogue(folder: Path, products: int = 12) -> Path:
    rows, clusters, pairs = [], [], {"train": [], "valid": []}
    for p in range(products):
        code = f"k{p}x{100 + 7 * p}"
        for k in range(2):
            rows.append({"listing_id": f"l{p}_{k}", "title": f"acme speaker {code}" if k == 0 else f"ACME {code} speaker",
                         "description": "", "price": str(10 + p) if k == 0 else "", "brand": "acme" if k else "",
                         "category": "", "image_path": "", "source": "ab"[k]})
            clusters.append({"listing_id": f"l{p}_{k}", "cluster_id": f"c{p}"})
        split = "train" if p < 8 else "valid"
        pairs[split] += [(f"l{p}_0", f"l{p}_1", 1), (f"l{p}_0", f"l{(p + 1) % products}_1", 0)]
    with open(folder / "listings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(folder / "clusters.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["listing_id", "cluster_id"])
        w.writeheader()
        w.writerows(clusters)
    for split, rows_ in pairs.items():
        with open(folder / f"pairs_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["listing_id_a", "listing_id_b", "label"])
            w.writerows(rows_)
    return folder


def test_serialisation_is_the_same_at_training_and_serving(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    config = TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", clusters=folder / "clusters.csv")
    data = load_products(config)
    record = data.records["l3_1"]
    listing = ListingInput(record.listing_id, record.title, attributes=dict(record.attributes))
    embedded = FinetunedEncoder._text(listing)
    matched = FinetunedEncoder.match_text(SimpleNamespace(_matcher=None), listing)  # type: ignore[arg-type]
    assert data.texts["l3_1"] == embedded == "ACME k3x121 speaker"  # the title names the brand already
    # The matcher's text adds the source after a tab; the embedded text never holds one.
    assert data.match_texts["l3_1"] == matched == "ACME k3x121 speaker\tsource b"
    assert split_source(matched) == ("ACME k3x121 speaker", "b")
    assert split_source(match_text("Speaker X1 | with a tab\tin it", {})) == ("Speaker X1 | with a tab in it", "")
    assert data.texts["l3_0"] == "acme speaker k3x121 | price 13"
    assert serialize("Speaker X1", {"brand": "acme"}) == "Speaker X1 | brand acme"
    assert serialize("Sony TV", {"brand": "sony", "price": "$1,299.00"}) == "Sony TV | price 1299"
    assert parse_price("n/a") is None and parse_price("12,5") == 12.5


def test_the_matcher_s_text_carries_as_many_description_words_as_it_was_fitted_with(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    with open(folder / "listings.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    rows[7]["description"] = "Brand new | sealed  box, 2 year warranty from acme"
    with open(folder / "listings.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    config = TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", clusters=folder / "clusters.csv",
                         match_description_words=4)
    data = load_products(config)
    record = data.records["l3_1"]
    expected = "ACME k3x121 speaker | description Brand new sealed box,\tsource b"
    assert data.match_texts["l3_1"] == expected
    assert data.texts["l3_1"] == "ACME k3x121 speaker"  # the embedded text reads no description
    # The served model builds the same text from the listing, with its matcher's word count.
    listing = ListingInput(record.listing_id, record.title, record.description, dict(record.attributes))
    served = SimpleNamespace(_matcher=SimpleNamespace(description_words=4))
    assert FinetunedEncoder.match_text(served, listing) == expected  # type: ignore[arg-type]
    # A matcher fitted before descriptions were read (no description_words) keeps its texts.
    assert FinetunedEncoder.match_text(SimpleNamespace(_matcher=None), listing) == "ACME k3x121 speaker\tsource b"
    # A word "brand" or "price" in the description is no field of the text.
    featurizer = PairFeaturizer().fit([expected, "acme speaker k3x121 | price 13"])
    assert featurizer.features([PairCandidate(expected, expected, 1.0, 0, 0.5)], ["brand_agree"])[0, 0] != 1.0
    assert match_text("", {}, "a photo caption", 2) == " | description a photo"
    with pytest.raises(ConfigError, match="description-words"):
        load_products(replace(config, match_description_words=-1))
    # Settings are refused before any training, not when the matcher is fitted at the end.
    with pytest.raises(ConfigError, match="product memory setting 'sometimes'"):
        load_products(replace(config, product_memory="sometimes"))


def test_products_come_from_positive_pairs_and_test_files_are_refused(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    config = TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", pairs=folder / "pairs_train.csv")
    data = load_products(config)
    assert data.product["l0_0"] == data.product["l0_1"] != data.product["l1_1"]
    # A labelled negative is never a listing of the same product.
    assert all(data.product[a] != data.product[b] for a, negs in data.negatives.items() for b in negs)
    (folder / "pairs_test.csv").write_text((folder / "pairs_train.csv").read_text())
    with pytest.raises(ConfigError, match="test"):
        load_products(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", pairs=folder / "pairs_test.csv"))


def test_held_out_clusters_never_train(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    data = load_products(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m",
                                     clusters=folder / "clusters.csv", holdout_fraction=0.25))
    assert len(data.held_out) == 3
    held = {f"l{c.removeprefix('c:c')}_{k}" for c in data.held_out for k in (0, 1)}
    assert held and not held & set(data.product)
    assert not any(a in held or b in held for a, b in data.positives)


def test_lexical_near_misses_are_never_the_same_product(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    data = load_products(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", clusters=folder / "clusters.csv"))
    near = finetune._lexical_neighbours(data, sorted(data.product))
    assert near and all(data.product[a] != data.product[b] for a, b in near.items())


def test_mined_hard_negatives_exclude_the_anchor_s_product(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The dense near-misses mined each epoch: whatever the model says, never a same-product listing."""
    folder = _catalogue(tmp_path)
    config = TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", clusters=folder / "clusters.csv",
                         base="tiny", epochs=1, batch_size=4, allow_random_weights=True, progress=False)
    data = load_products(config)
    seen: list[tuple[str, str]] = []
    original = finetune._Embedder.views

    def spy(self, ids, train_, generator):  # type: ignore[no-untyped-def]
        if train_:
            n = (len(ids)) // 3 if len(ids) % 3 == 0 else None
            if n:
                seen.extend(zip(ids[:n], ids[2 * n:]))
        return original(self, ids, train_, generator)

    monkeypatch.setattr(finetune._Embedder, "views", spy)
    finetune.train_towers(config, data, None, {}, {})
    assert seen and all(data.product[a] != data.product[n] for a, n in seen)


def test_each_listing_of_a_large_product_anchors_about_once_an_epoch() -> None:
    import random

    small = [("s0", "s1")]
    large = [(f"l{0}", f"l{k}") for k in range(1, 12)] + [(f"l{k}", f"l{k + 1}") for k in range(1, 11)]
    edges = finetune.epoch_edges({"small": small, "large": large}, {"small": 2, "large": 12}, 6, random.Random(0))
    by = {p: [e for e in edges if e[0][0] == p[0]] for p in ("small", "large")}
    assert sorted(by["small"]) == [("s0", "s1"), ("s1", "s0")]  # both directions, no more than it has
    assert len(by["large"]) == 12  # one per listing, above the floor of 6
    assert len(finetune.epoch_edges({"large": large}, {"large": 12}, 30, None)) == 30  # the floor rules


def test_the_image_backbone_flag_picks_the_towers_backbone(tmp_path: Path) -> None:
    from samestyle.models.backbones import BUNDLED_EFFICIENTNET_LITE0, BUNDLED_EFFICIENTNET_LITE2

    args = finetune.build_parser().parse_args(["--listings", "l.csv", "--clusters", "c.csv", "--out", "m",
                                               "--image-backbone", "lite2"])
    config = finetune.config_from_args(args)
    assert finetune._tower_config(config, True).image_backbone == BUNDLED_EFFICIENTNET_LITE2
    assert finetune._tower_config(TrainConfig(listings=Path("l"), out=Path("m")), True).image_backbone \
        == BUNDLED_EFFICIENTNET_LITE0
    with pytest.raises(ConfigError, match="image backbone"):
        finetune._tower_config(TrainConfig(listings=Path("l"), out=Path("m"), image_backbone="lite9"), True)


def test_augmentation_keeps_shape_and_range() -> None:
    images = torch.rand(4, 3, 32, 32) * 255
    out = augment(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 255.0
    assert not torch.equal(out, images)
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded: reproducible


def test_feature_map_augmentation_flips_and_crops_without_changing_values() -> None:
    maps = torch.randn(6, 5, 12, 12)
    out = finetune.augment_feature_maps(maps, torch.Generator().manual_seed(1))
    side = out.shape[-1]
    assert out.shape[:2] == (6, 5) and out.shape[-2] == side and 9 <= side <= 12  # sqrt(0.6) of 12 rounds to 9
    assert torch.equal(out, finetune.augment_feature_maps(maps, torch.Generator().manual_seed(1)))  # seeded
    flipped = 0
    for j in range(6):  # each output map is a window of its input map, mirrored or not
        windows = [m[:, y : y + side, x : x + side] for m in (maps[j], maps[j].flip(-1))
                   for y in range(13 - side) for x in range(13 - side)]
        match = [k for k, w in enumerate(windows) if torch.equal(w, out[j])]
        assert match
        flipped += match[0] >= len(windows) // 2
    assert 0 < flipped < 6
    sizes = {finetune.augment_feature_maps(maps, torch.Generator().manual_seed(k)).shape[-1] for k in range(20)}
    assert len(sizes) > 1  # the crop's side varies from batch to batch


def test_candidates_rank_and_margin_are_the_stream_s() -> None:
    vectors = {k: np.array(v, dtype=np.float32) for k, v in
               {"a": [1, 0], "b": [0.8, 0.6], "c": [0.6, 0.8], "d": [0, 1]}.items()}
    texts = {k: k for k in vectors}
    [ab, ac] = candidates_for([("a", "b"), ("a", "c")], vectors, list(vectors), texts)
    assert (ab.rank, ac.rank) == (0, 1)
    assert ab.cosine == pytest.approx(0.8) and ab.best_other == pytest.approx(0.6)
    assert ac.best_other == pytest.approx(0.8)


def test_in_arrival_order_the_later_listing_queries_only_the_earlier_ones() -> None:
    vectors = {k: np.array(v, dtype=np.float32) / np.linalg.norm(v) for k, v in
               {"a": [1, 0], "b": [0.9, 0.1], "c": [0.8, 0.2], "d": [0, 1]}.items()}
    texts = {k: k for k in vectors}
    arrival = {"c": 0, "a": 1, "b": 2, "d": 3}
    # (a, b): b came later, so b is the query, and the index holds c and a (not d).
    [ab] = candidates_for([("a", "b")], vectors, list(vectors), texts, arrival)
    assert (ab.text_a, ab.text_b, ab.rank) == ("b", "a", 0)
    assert ab.best_other == pytest.approx(float(vectors["b"] @ vectors["c"]))
    # (c, a): a is the query of an index holding only c: nothing else to be better than.
    [ca] = candidates_for([("c", "a")], vectors, list(vectors), texts, arrival)
    assert (ca.text_a, ca.text_b, ca.rank, ca.best_other) == ("a", "c", 0, -1.0)
    # With every listing indexed, a's nearest is b, so c ranks second.
    [ac] = candidates_for([("a", "c")], vectors, list(vectors), texts)
    assert ac.rank == 1


def test_mined_pairs_in_arrival_order_never_look_ahead() -> None:
    rng = np.random.default_rng(0)
    ids = [f"l{k}" for k in range(30)]
    product = {i: f"p{k // 3}" for k, i in enumerate(ids)}
    vectors = {i: v / np.linalg.norm(v) for i, v in zip(ids, rng.normal(size=(30, 8)).astype(np.float32))}
    arrival = finetune.arrival_order(ids, seed=3)
    assert sorted(arrival.values()) == list(range(30)) and arrival == finetune.arrival_order(ids, seed=3)
    mined = finetune._mined_pairs(ids, vectors, product, 4, arrival)
    assert mined and all(arrival[b] < arrival[a] for a, b, _ in mined)
    positives = {frozenset((a, b)) for a, b, y in mined if y}
    # every same-product pair is met exactly once: by whichever of the two arrived later
    assert positives == {frozenset((a, b)) for a in ids for b in ids if a < b and product[a] == product[b]}
    first = min(ids, key=arrival.__getitem__)
    assert not any(a == first for a, _, _ in mined)  # the first listing meets an empty index


def test_arrival_orders_add_one_source_by_source_order_per_leading_source() -> None:
    from samestyle.models.text import SOURCE_SEPARATOR

    ids = [f"l{k}" for k in range(12)]
    texts = {i: f"title {k}{SOURCE_SEPARATOR}{'shop-a' if k % 3 else 'shop-b'}" for k, i in enumerate(ids)}
    orders = finetune.arrival_orders(ids, texts, seed=1)
    assert list(orders) == ["interleaved", "shop-a first", "shop-b first"]  # the larger shop leads first
    interleaved = orders["interleaved"]
    assert interleaved == finetune.arrival_order(ids, seed=1)
    for lead in ("shop-a", "shop-b"):
        order = orders[f"{lead} first"]
        assert sorted(order.values()) == list(range(12))
        by_arrival = sorted(ids, key=order.__getitem__)
        leading = [i for i in by_arrival if texts[i].endswith(lead)]
        assert by_arrival[: len(leading)] == leading  # the whole catalogue of the lead first
        for part in (by_arrival[: len(leading)], by_arrival[len(leading):]):
            assert part == sorted(part, key=interleaved.__getitem__)  # each part in the interleaved order
    assert list(finetune.arrival_orders(ids, texts, seed=1, grouped=False)) == ["interleaved"]
    one_shop = {i: f"title{SOURCE_SEPARATOR}shop-a" for i in ids}
    assert list(finetune.arrival_orders(ids, one_shop, seed=1)) == ["interleaved"]
    no_source = {i: "title" for i in ids}
    assert list(finetune.arrival_orders(ids, no_source, seed=1)) == ["interleaved"]


def test_the_matcher_refits_from_the_saved_vectors(tmp_path: Path) -> None:
    import json

    folder = _catalogue(tmp_path)
    out = train(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "model", clusters=folder / "clusters.csv",
                            base="tiny", epochs=1, batch_size=4, allow_random_weights=True, progress=False,
                            folds=2, mined_k=3))
    assert (out / finetune.MATCHER_VECTORS).is_file()
    assert load_matcher(out).meta["candidate_order"] == "arrival"  # type: ignore[union-attr]
    info = finetune.refit_matcher(out, matcher_order="full")
    assert info["orders"] == ["full"]
    matcher = load_matcher(out)
    assert matcher is not None and matcher.meta["candidate_order"] == "full"
    assert matcher.threshold == pytest.approx(info["threshold"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["matcher_refits"][-1]["matcher_order"] == "full"
    assert manifest["config"]["matcher_order"] == "full"
    assert matcher.description_words == TrainConfig.match_description_words
    finetune.refit_matcher(out, match_description_words=0)
    assert load_matcher(out).description_words == 0  # type: ignore[union-attr]
    # The product memory: by default fitted with and without, the better on valid kept.
    auto = load_matcher(out).meta["valid"]["product_memory"]  # type: ignore[union-attr]
    assert auto["chosen"] in ("with", "without") and {"valid_f1_with", "valid_f1_without"} <= set(auto)
    # Forced on: the served model's vectors of every training listing, saved with the matcher.
    finetune.refit_matcher(out, product_memory="on")
    matcher = load_matcher(out)
    assert matcher is not None and matcher.memory is not None and set(MEMORY_FEATURES) <= set(matcher.features)
    data = finetune.load_products(TrainConfig(listings=folder / "listings.csv", out=out, clusters=folder / "clusters.csv"))
    saved = finetune.MatcherData.load(out / finetune.MATCHER_VECTORS)
    assert set(matcher.memory.row_of) == set(data.product) and matcher.meta["memory"]["listings"] == len(data.product)
    some = sorted(data.product)[0]
    assert np.allclose(matcher.memory.matrix[matcher.memory.row_of[some]], saved.final[some])
    finetune.refit_matcher(out, product_memory="off")
    plain = load_matcher(out)
    assert plain is not None and plain.memory is None and not plain.uses_vectors
    assert not set(MEMORY_FEATURES) & set(plain.features)
    with pytest.raises(ConfigError, match="cannot be refitted"):
        finetune.refit_matcher(tmp_path)


def test_featurizer_sees_codes_and_brands() -> None:
    featurizer = PairFeaturizer().fit(["acme speaker k1x100", "acme speaker k2x200", "zeta lamp z9"])
    same = PairCandidate("acme speaker k1x100 | price 10", "ACME k1-x100 speaker | brand acme", 0.9, 0, 0.5)
    other = PairCandidate("acme speaker k1x100", "acme speaker k2x200", 0.9, 0, 0.5)
    f = featurizer.features([same, other])
    text_features = [n for n in FEATURES if n not in MEMORY_FEATURES]  # without a product memory
    assert f.shape == (2, len(text_features)) and f.dtype == np.float32
    col = {name: k for k, name in enumerate(text_features)}
    assert f[0, col["code_in_other"]] == 1.0 and f[1, col["code_conflict"]] == 1.0
    assert f[0, col["brand_agree"]] > 0.5


def test_the_source_is_a_feature_and_no_text_feature_sees_it() -> None:
    featurizer = PairFeaturizer().fit(["acme speaker k1x100", "zeta lamp z9"])
    col = {name: k for k, name in enumerate(FEATURES)}
    pairs = [PairCandidate(match_text("acme speaker k1x100", {"source": a}), match_text("acme speaker k1x100", {"source": b}),
                           0.9, 0, 0.5) for a, b in [("shop1", "shop1"), ("shop1", "Shop2"), ("shop1", ""), ("", "")]]
    f = featurizer.features(pairs)
    assert list(f[:, col["same_source"]]) == [1.0, 0.0, -1.0, -1.0]
    # The source never reaches the text features: every pair's texts are the same title.
    text_columns = [col[n] for n in ("word_full", "word_title", "char_title", "char_full")]
    assert np.allclose(f[:, text_columns], 1.0, atol=1e-6)


def test_a_pair_scores_the_same_in_a_batch_that_repeats_its_texts_as_alone() -> None:
    # The featurizer works once per distinct text of a batch: a query text meets its k
    # neighbours, a neighbour several queries. Each pair's row must be what it is alone.
    texts = ["Acme DW-100 dishwasher white | brand acme | price 199 || abt.com",
             "acme dw100 dish washer, white || buy.com",
             "Acme DW-100B dishwasher black | price 205 || buy.com",
             "Zeta lamp 40W | description warm light for desks || abt.com",
             "zeta desk lamp 40 w || buy.com"]
    featurizer = PairFeaturizer().fit(texts)
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(texts), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    memory = ProductMemory(["k0", "k1", "k2"], vectors[:3], ["P", "P", "Q"], texts[:3])
    pairs = [(a, b) for a in range(len(texts)) for b in range(len(texts)) if a != b] + [(0, 1), (1, 0), (4, 4)]
    batch = [PairCandidate(texts[a], texts[b], float(vectors[a] @ vectors[b]), r % 10, 0.3,
                           id_a=f"k{a}" if a < 3 else f"n{a}", id_b=f"k{b}" if b < 3 else f"n{b}",
                           vector_a=vectors[a], vector_b=vectors[b]) for r, (a, b) in enumerate(pairs)]
    together = featurizer.features(batch, FEATURES, memory)
    alone = np.vstack([featurizer.features([c], FEATURES, memory) for c in batch])
    assert together.shape == (len(batch), len(FEATURES))
    assert together.tobytes() == alone.tobytes()


def test_title_differences_weigh_the_rarest_word_one_side_lacks() -> None:
    featurizer = PairFeaturizer().fit(["acme dishwasher white", "acme dishwasher black", "acme dishwasher steel",
                                       "acme fridge white", "zeta lamp"])
    col = {name: k for k, name in enumerate(FEATURES)}
    pairs = [PairCandidate("acme dishwasher white", "ACME dishwasher white | price 9", 0.9, 0, 0.5),
             PairCandidate("acme dishwasher white", "acme dishwasher black", 0.9, 0, 0.5),
             PairCandidate("acme dishwasher white", "acme dishwasher", 0.9, 0, 0.5),
             PairCandidate("acme dishwasher white", "acme dishwasher qx9", 0.9, 0, 0.5)]
    f = featurizer.features(pairs)
    idf = featurizer._vectorizers["word_title"].idf_
    vocabulary = featurizer._vectorizers["word_title"].vocabulary_
    # The same title (price aside): nothing unshared.
    assert list(f[0, [col["title_diff_max"], col["title_diff_min"], col["title_diff_mass"]]]) == [0.0, 0.0, 0.0]
    # white / black: each side lacks one word; black is the rarer.
    assert f[1, col["title_diff_max"]] == pytest.approx(idf[vocabulary["black"]])
    assert f[1, col["title_diff_min"]] == pytest.approx(idf[vocabulary["white"]])
    total = sum(idf[vocabulary[w]] for w in ("acme", "dishwasher", "white", "black"))
    assert f[1, col["title_diff_mass"]] == pytest.approx((idf[vocabulary["white"]] + idf[vocabulary["black"]]) / total)
    # Only one side has an unshared word: the smaller side is 0.
    assert f[2, col["title_diff_min"]] == 0.0 and f[2, col["title_diff_max"]] == pytest.approx(idf[vocabulary["white"]])
    # A word the training titles never had weighs as the rarest word they had.
    assert f[3, col["title_diff_max"]] == pytest.approx(idf.max())


def test_a_matcher_saved_with_fewer_features_scores_with_its_own(tmp_path: Path) -> None:
    import json

    from sklearn.linear_model import LogisticRegression

    from samestyle.models.matcher import Matcher

    featurizer = PairFeaturizer().fit(["acme speaker k1x100", "acme speaker k2x200", "zeta lamp z9"])
    old = [n for n in FEATURES if n != "same_source" and n not in MEMORY_FEATURES]
    pairs = [PairCandidate("acme speaker k1x100", "acme k1x100", 0.9, 0, 0.4),
             PairCandidate("acme speaker k1x100", "zeta lamp z9", 0.2, 5, 0.8)]
    classifier = LogisticRegression().fit(featurizer.features(pairs, old), [1, 0])
    Matcher(featurizer, classifier, 0.5, {"classifier": "lr"}, old).save(tmp_path)
    loaded = load_matcher(tmp_path)
    assert loaded is not None and loaded.features == tuple(old)
    assert np.allclose(loaded.probabilities(pairs), classifier.predict_proba(featurizer.features(pairs, old))[:, 1])
    meta = json.loads((tmp_path / "matcher.json").read_text())
    (tmp_path / "matcher.json").write_text(json.dumps({**meta, "features": old + ["colour_agree"]}))
    with pytest.raises(ConfigError, match="refit-matcher"):
        load_matcher(tmp_path)


def test_pairs_run_writes_a_model_whose_threshold_round_trips(tmp_path: Path) -> None:
    folder = _catalogue(tmp_path)
    out = train(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "model", pairs=folder / "pairs_train.csv",
                            valid_pairs=folder / "pairs_valid.csv", base="tiny", epochs=1, batch_size=4,
                            allow_random_weights=True, progress=False, folds=2, product_memory="on"))
    matcher = load_matcher(out)
    assert matcher is not None
    encoder = create_encoder(str(out), "cpu", allow_random_weights=True)
    assert isinstance(encoder, FinetunedEncoder)
    assert encoder.duplicate_scorer is not None
    assert encoder.duplicate_scorer.threshold == pytest.approx(matcher.threshold)
    assert 0.0 <= matcher.threshold <= 1.0
    emb = encoder.encode([ListingInput("x", "acme speaker k1x107", attributes={"price": "11"}),
                          ListingInput("y", "zeta lamp")])
    assert emb.image_text.shape == (2, 32)
    assert np.allclose(np.linalg.norm(emb.image_text, axis=1), 1.0, atol=1e-5)
    assert np.allclose(emb.image_text, emb.text, atol=1e-6)  # no image: IT is T
    # The matcher reads its product memory: the candidates carry both listings' ids and vectors.
    assert encoder.duplicate_scorer.uses_vectors and matcher.memory is not None
    p = encoder.duplicate_scorer.probabilities([PairCandidate("a", "a", 0.9, 0, 0.1, id_a="x", id_b="y",
                                                              vector_a=emb.image_text[0], vector_b=emb.image_text[1])])
    assert p.shape == (1,) and 0.0 <= float(p[0]) <= 1.0
    with pytest.raises(ConfigError, match="carry none"):
        encoder.duplicate_scorer.probabilities([PairCandidate("a", "a", 0.9, 0, 0.1)])
    with pytest.raises(ConfigError, match="not empty"):
        train(TrainConfig(listings=folder / "listings.csv", out=out, pairs=folder / "pairs_train.csv",
                          valid_pairs=folder / "pairs_valid.csv", base="tiny", allow_random_weights=True))


def test_random_backbones_need_the_test_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAMESTYLE_ALLOW_RANDOM_WEIGHTS", raising=False)
    folder = _catalogue(tmp_path)
    with pytest.raises(ConfigError, match="tests only"):
        train(TrainConfig(listings=folder / "listings.csv", out=tmp_path / "m", clusters=folder / "clusters.csv", base="tiny"))


def test_a_catalogue_with_images_trains_both_towers_into_one_space(tmp_path: Path) -> None:
    from samestyle.models.data import read_listings
    from samestyle.models.features import listing_input
    from samestyle.streams.dev.sample import generate_sample

    listings, clusters = generate_sample(tmp_path / "data", n_products=12, seed=1)
    out = train(TrainConfig(listings=listings, out=tmp_path / "model", clusters=clusters, base="tiny", epochs=1,
                            batch_size=4, allow_random_weights=True, progress=False, mined_k=3))
    encoder = create_encoder(str(out), "cpu", allow_random_weights=True)
    records = read_listings(listings)[:4]
    assert all(r.image_path for r in records)
    emb = encoder.encode([listing_input(r, with_image=True) for r in records])
    assert emb.has_image.all() and emb.has_text.all()
    assert np.allclose(np.linalg.norm(emb.image, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(emb.image_text, emb.text)  # IT reads the image too
    photo = encoder.encode([ListingInput(records[0].listing_id, "", image=Path(records[0].image_path).read_bytes())])
    assert not photo.has_text[0] and np.allclose(photo.image_text, photo.image, atol=1e-6)  # no title: IT is I


def test_image_blocks_train_only_the_last_blocks_of_the_image_backbone(tmp_path: Path) -> None:
    from samestyle.models.backbones import TINY
    from samestyle.models.finetuned import DualTower, TowerConfig
    from samestyle.streams.dev.sample import generate_sample

    listings, clusters = generate_sample(tmp_path / "data", n_products=12, seed=1)
    out = train(TrainConfig(listings=listings, out=tmp_path / "model", clusters=clusters, base="tiny", epochs=1,
                            batch_size=4, allow_random_weights=True, progress=False, mined_k=3, image_blocks=1))
    trained = create_encoder(str(out), "cpu", allow_random_weights=True).towers.image.blocks()
    start = DualTower(TowerConfig(text_backbone=TINY, image_backbone=TINY, dim=32, image_size=32)).image.blocks()
    first, last = (list(zip(a.parameters(), b.parameters(), strict=True)) for a, b in zip(trained, start, strict=True))
    assert all(torch.equal(p, q) for p, q in first)  # frozen: the starting weights
    assert not all(torch.equal(p, q) for p, q in last)  # trained


def test_image_blocks_beyond_the_backbone_train_every_block_and_negative_is_an_error(tmp_path: Path) -> None:
    from samestyle.models.data import read_listings
    from samestyle.streams.dev.sample import generate_sample

    listings, clusters = generate_sample(tmp_path / "data", n_products=4, seed=1)
    records = {r.listing_id: r for r in read_listings(listings)}
    pixels = finetune._load_pixels(records, sorted(records), 32, 1.0, False)
    config = TrainConfig(listings=listings, out=tmp_path / "m", base="tiny", image_blocks=3, progress=False)
    assert finetune.prefix_features(config, finetune._tower_config(config, True), pixels, "cpu") is None
    with pytest.raises(ConfigError, match="--image-blocks must be >= 0"):
        train(TrainConfig(listings=listings, out=tmp_path / "model", clusters=clusters, base="tiny",
                          allow_random_weights=True, progress=False, image_blocks=-1))


def test_cached_frozen_image_blocks_give_the_serving_view(tmp_path: Path) -> None:
    from samestyle.models.data import read_listings
    from samestyle.models.finetuned import DualTower
    from samestyle.streams.dev.sample import generate_sample

    listings, _ = generate_sample(tmp_path / "data", n_products=4, seed=1)
    records = {r.listing_id: r for r in read_listings(listings)}
    config = TrainConfig(listings=listings, out=tmp_path / "m", base="tiny", image_blocks=1, prefix_views=3,
                         progress=False)
    towers_config = finetune._tower_config(config, True)
    pixels = finetune._load_pixels(records, sorted(records), 32, 1.0, False)
    prefix = finetune.prefix_features(config, towers_config, pixels, "cpu")
    assert prefix is not None and prefix.start == 1
    assert {tuple(v.shape[:1]) for v in prefix.views.values()} == {(3,)}  # the serving view + 2 augmented
    towers = DualTower(towers_config).eval()
    texts = {i: r.title for i, r in records.items()}
    ids = sorted(records)
    cached = finetune._Embedder(towers, texts, pixels, "cpu", prefix).encode(ids)
    full = finetune._Embedder(towers, texts, pixels, "cpu").encode(ids)
    assert np.abs(cached - full).max() < 1e-2  # float16 features, same blocks
    augmented = finetune._Embedder(towers, texts, pixels, "cpu", prefix).views(ids, True, torch.Generator().manual_seed(0))
    assert not np.allclose(augmented["I"].detach().numpy(), finetune._Embedder(towers, texts, pixels, "cpu", prefix)
                           .views(ids, False, None)["I"].detach().numpy())


def test_the_prefix_cache_is_skipped_when_it_would_not_fit(tmp_path: Path) -> None:
    from samestyle.models.data import read_listings
    from samestyle.streams.dev.sample import generate_sample

    listings, _ = generate_sample(tmp_path / "data", n_products=4, seed=1)
    records = {r.listing_id: r for r in read_listings(listings)}
    config = TrainConfig(listings=listings, out=tmp_path / "m", base="tiny", image_blocks=1, prefix_cache_mb=0,
                         progress=False)
    pixels = finetune._load_pixels(records, sorted(records), 32, 1.0, False)
    assert finetune.prefix_features(config, finetune._tower_config(config, True), pixels, "cpu") is None
    everything = replace(config, image_blocks=0, prefix_cache_mb=4096)
    assert finetune.prefix_features(everything, finetune._tower_config(everything, True), pixels, "cpu") is None
