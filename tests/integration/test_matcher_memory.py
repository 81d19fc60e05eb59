"""A worker serving a trained model whose matcher reads its product memory.

Real broker, a real worker process; the model is a tiny random-initialised model trained for one
epoch on the generated sample, its matcher forced to keep the memory (``product_memory="on"``).
Such a matcher refuses candidates without both listings' ids and vectors, so classifier-decided
alerts from the worker show the stream hands them over.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from samestyle.models.data import read_listings
from samestyle.models.matcher import MEMORY_FEATURES, load_matcher
from samestyle.models.train.finetune import TrainConfig, train
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.io.producer import listing_message
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def test_a_worker_serves_a_matcher_with_a_product_memory(stack: Stack, tmp_path: Path) -> None:
    listings_csv, clusters_csv = generate_sample(tmp_path / "data", n_products=40, seed=3)
    model_dir = train(TrainConfig(listings=listings_csv, out=tmp_path / "model", clusters=clusters_csv, base="tiny",
                                  epochs=1, batch_size=4, folds=2, mined_k=3, product_memory="on",
                                  allow_random_weights=True, progress=False, images=False))
    matcher = load_matcher(model_dir)
    assert matcher is not None and matcher.memory is not None and set(MEMORY_FEATURES) <= set(matcher.features)

    records = read_listings(listings_csv)
    messages = [listing_message(r, event_time=1_000 + k) for k, r in enumerate(records)]
    for m in messages:  # text only: the sample's pictures are not what this test is about
        m["image_uri"] = m["image_bytes"] = None
    # Threshold 0: every same-supplier neighbour the classifier scores becomes an alert.
    stack.start_worker(encoder=str(model_dir), duplicate_threshold=0.0)
    stack.produce(messages)
    out = stack.collect(lambda o: len({m["listing_id"] for m in o.similar}) >= len(messages) and len(o.alerts) > 0)
    assert not out.dead_letters
    version = json.loads((model_dir / "manifest.json").read_text())["version"]
    assert {m["model_version"] for m in out.similar} == {version}
    classified = [a for a in out.alerts if a["decided_by"] == "classifier"]
    assert classified and len(classified) == len(out.alerts)
    assert all(a["probability"] is not None and 0.0 <= a["probability"] <= 1.0 for a in classified)
    assert stack.workers[0].proc is not None and stack.workers[0].proc.returncode is None
