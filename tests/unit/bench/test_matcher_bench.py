"""The matcher bench on a tiny matcher with a product memory: one JSON object, both timings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from bench import matcher_bench
from samestyle.models.matcher import FEATURES, MEMORY_FEATURES, Matcher, PairFeaturizer, ProductMemory
from samestyle.topics.errors import ConfigError
from tests.unit.bench.benchutil import run_json

TEXTS = ["acme kettle kx100", "acme kettle kx-100 steel", "zeta lamp z9", "zeta z9 lamp white",
         "omni router r7", "omni r7 wifi router"]


def tiny_matcher(path: Path, with_memory: bool = True) -> Path:
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(len(TEXTS), 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = [f"l{k}" for k in range(len(TEXTS))]
    memory = ProductMemory(ids, vectors, ["k", "k", "z", "z", "o", "o"], TEXTS) if with_memory else None
    featurizer = PairFeaturizer().fit(TEXTS)
    names = FEATURES if with_memory else tuple(n for n in FEATURES if n not in MEMORY_FEATURES)
    classifier = LogisticRegression().fit(np.array([[0.0] * len(names), [1.0] * len(names)]), [0, 1])
    Matcher(featurizer, classifier, 0.5, {"classifier": "lr"}, names, memory).save(path)
    return path


def test_the_bench_times_a_batch_with_and_without_the_memory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_matcher(tmp_path)
    result = run_json(capsys, matcher_bench.main, ["--model", str(model), "--json", "--queries", "3", "--k", "2",
                                                   "--repeat", "2", "--rounds", "2"])
    assert result["pairs_per_batch"] == 6 and result["memory_listings"] == 6 and result["memory_products"] == 3
    assert result["features_without_memory_ms"] > 0 and result["features_with_memory_ms"] > 0
    assert result["ratio_with_over_without"] == pytest.approx(
        result["features_with_memory_ms"] / result["features_without_memory_ms"], rel=1e-2)
    assert len(result["rounds"]) == 2


def test_the_batch_queries_under_new_ids_against_their_nearest_known_listings(tmp_path: Path) -> None:
    from samestyle.models.matcher import load_matcher

    matcher = load_matcher(tiny_matcher(tmp_path))
    assert matcher is not None and matcher.memory is not None
    batch = matcher_bench.batch_of(matcher, queries=2, k=3)
    assert len(batch) == 6
    for c in batch:
        assert c.id_a not in matcher.memory.row_of and c.id_b in matcher.memory.row_of
        assert c.cosine == pytest.approx(float(c.vector_a @ c.vector_b), abs=1e-6)
    assert [c.rank for c in batch[:3]] == [0, 1, 2] and batch[0].cosine >= batch[1].cosine >= batch[2].cosine


def test_a_matcher_without_a_memory_is_refused_with_a_way_out(tmp_path: Path) -> None:
    from samestyle.models.matcher import load_matcher

    matcher = load_matcher(tiny_matcher(tmp_path, with_memory=False))
    assert matcher is not None
    with pytest.raises(ConfigError, match="product-memory on"):
        matcher_bench.batch_of(matcher, 2, 2)
