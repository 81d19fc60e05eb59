"""A promoted model reaches running workers: re-embedding in the background, no gap in the output.

Real broker, real worker processes. The "trained" model is a tiny random-initialised unified model
directory (another dimension than the serving tiny encoder, so the two spaces cannot mix).
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from samestyle.models.backbones import build_image_backbone, build_text_backbone
from samestyle.models.encoder import NAMED_CONFIGS
from samestyle.models.unified import UnifiedConfig, UnifiedFusion, save_unified_model
from samestyle.streams.dev.broker import free_port
from samestyle.streams.io.producer import Outputs, send_records
from samestyle.topics import MODEL_UPDATES, codec_for_topic
from tests.integration.conftest import Stack, text_listing

pytestmark = pytest.mark.integration

SMALL = UnifiedConfig(dim=16, hidden=32, layers=1, heads=2, ffn=64, image_grid=2, dropout=0.0, scorer_layers=0)


def make_model_dir(path: Path, version: str, seed: int = 1) -> Path:
    """A tiny unified model directory with random weights (what `samestyle train --base tiny` writes)."""
    config = replace(NAMED_CONFIGS["tiny"], fusion="unified", version=version)
    text = build_text_backbone(config.text_backbone, config)
    image = build_image_backbone(config.image_backbone, config)
    torch.manual_seed(seed)
    fusion = UnifiedFusion(SMALL, text.dim, image.dim)
    save_unified_model(path, config, SMALL, fusion, None, {"data": "test"}, {})
    return path


def promote(stack: Stack, version: str, model_dir: Path, decision: str = "PROMOTED") -> None:
    record = {"version": version, "model_dir": str(model_dir), "decision": decision,
              "previous_version": None, "metric": "valid_f1", "score": 0.9, "previous_score": 0.5,
              "pairs_used": 10, "reason": "test", "created_at": int(time.time() * 1000)}
    value = codec_for_topic(MODEL_UPDATES).encode(record)
    asyncio.run(send_records(stack.settings, stack.specs[MODEL_UPDATES].name, [(version.encode(), value)]))


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return json.loads(r.read())


def versions_by_listing(outputs: Outputs) -> dict[str, list[str]]:
    seen: dict[str, list[str]] = {}
    for m in outputs.similar:
        seen.setdefault(m["listing_id"], []).append(m["model_version"])
    return seen


def test_promoted_model_switches_versions_without_a_gap(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    stack.start_worker("w1", web_port=port)
    before = [text_listing(f"old-{i:03d}", f"ceramic mug model {i} colour {i % 7}") for i in range(40)]
    stack.produce(before)
    first = stack.collect(lambda o: len(o.indexed_ids) >= 40)
    [v1] = {m["model_version"] for m in first.similar}

    # A rejected candidate changes nothing; a promoted one starts the switch.
    promote(stack, "rejected-v9", make_model_dir(tmp_path / "rejected", "rejected-v9", seed=9), "REJECTED")
    v2 = "promoted-v2"
    promote(stack, v2, make_model_dir(tmp_path / "v2", v2))
    # Listings keep arriving while the catalogue is re-embedded, one small batch at a time.
    during = []
    for batch in range(10):
        new = [text_listing(f"new-{batch}-{i}", f"stoneware cup series {batch} item {i}") for i in range(4)]
        stack.produce(new)
        during += new
        time.sleep(0.3)
    every = {x["listing_id"] for x in before + during}

    def switched(o: Outputs) -> bool:
        seen = versions_by_listing(o)
        return every <= set(seen) and any(v2 in v for v in seen.values())

    outputs = stack.collect(switched, timeout=120)
    # After the switch, new listings are answered by the new model from a complete index: exact
    # copies of listings from before the promotion find them (re-embedded), and are alerted.
    after = [text_listing(f"late-{i}", f"ceramic mug model {i} colour {i % 7}") for i in range(5)]
    stack.produce(after)
    every |= {x["listing_id"] for x in after}
    outputs = stack.collect(lambda o: every <= o.indexed_ids and len({a["listing_id"] for a in o.alerts
                                                                        if a["listing_id"].startswith("late-")}) == 5,
                            timeout=90)

    seen = versions_by_listing(outputs)
    assert every <= set(seen), f"no similar-products for {sorted(every - set(seen))}"  # no gap
    assert {v for vs in seen.values() for v in vs} <= {v1, v2}  # the rejected model never served
    for i in range(5):
        [message] = [m for m in outputs.similar if m["listing_id"] == f"late-{i}"]
        assert message["model_version"] == v2
        assert len(message["neighbours"]) == stack.settings.top_k
        top = message["neighbours"][0]
        assert top["listing_id"] == f"old-{i:03d}" and top["score"] > 0.999
        [alert] = [a for a in outputs.alerts if (a["listing_id"], a["duplicate_of"]) == (f"late-{i}", f"old-{i:03d}")]
        assert alert["model_version"] == v2

    state = health(port)
    assert state["model_version"] == v2 and state["switching_to"] is None
    assert state["index_vectors"] == len(every)
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    reembedded = sum(float(line.split()[-1]) for line in metrics.splitlines()
                     if line.startswith("samestyle_reembedded_total"))
    assert reembedded >= 40  # at least the listings that were there before the promotion
    assert "samestyle_model_switches_total 1.0" in metrics


def test_a_worker_started_after_a_promotion_serves_the_promoted_model(stack: Stack, tmp_path: Path) -> None:
    v2 = "promoted-v2"
    promote(stack, v2, make_model_dir(tmp_path / "v2", v2))
    stack.start_worker("w1")
    listings = [text_listing(f"l-{i}", f"linen tea towel {i}") for i in range(6)]
    stack.produce(listings)
    outputs = stack.collect(lambda o: len(o.indexed_ids) >= 6)
    assert {m["model_version"] for m in outputs.similar} == {v2}


def switch_during_traffic(stack: Stack, tmp_path: Path, ports: list[int],
                          timeout: float) -> tuple[str, str, set[str]]:
    """30 listings indexed, then ``promoted-v2`` promoted while 12 more arrive in bursts; returns
    ``(v1, v2, every listing id)`` once every worker (web ``ports``) serves v2 with all of them."""
    before = [text_listing(f"old-{i:03d}", f"walnut chopping board {i}") for i in range(30)]
    stack.produce(before)
    first = stack.collect(lambda o: len(o.indexed_ids) >= 30)
    [v1] = {m["model_version"] for m in first.similar}
    v2 = "promoted-v2"
    promote(stack, v2, make_model_dir(tmp_path / "v2", v2))
    during = [text_listing(f"new-{i}", f"oak serving tray {i}") for i in range(12)]
    for i in range(0, 12, 3):
        stack.produce(during[i:i + 3])
        time.sleep(0.3)
    every = {x["listing_id"] for x in before + during}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = [health(p) for p in ports]
        if all(s["model_version"] == v2 and s["index_vectors"] == len(every) for s in states):
            break
        time.sleep(1)
    assert [(s["model_version"], s["index_vectors"]) for s in states] == [(v2, len(every))] * len(ports)
    return v1, v2, every


def test_two_workers_split_the_reembedding_and_both_switch(stack: Stack, tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    for name, port in zip(("w1", "w2"), ports):
        stack.start_worker(name, web_port=port, state_dir=tmp_path / f"state-{name}")
    _, v2, every = switch_during_traffic(stack, tmp_path, ports, timeout=90)
    copy = text_listing("copy-7", "walnut chopping board 7")
    stack.produce([copy])
    outputs = stack.collect(lambda o: (every | {"copy-7"}) <= o.indexed_ids)
    [message] = [m for m in outputs.similar if m["listing_id"] == "copy-7"]
    assert message["model_version"] == v2 and message["neighbours"][0]["listing_id"] == "old-007"
    # Each worker re-embedded only the listings partitions it owned.
    reembedded = []
    for port in ports:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        reembedded.append(sum(float(line.split()[-1]) for line in text.splitlines()
                              if line.startswith("samestyle_reembedded_total")))
    assert sum(reembedded) >= 30 and all(r > 0 for r in reembedded), reembedded


def test_a_promoted_model_that_does_not_load_is_skipped(stack: Stack, tmp_path: Path) -> None:
    port = free_port()
    stack.start_worker("w1", web_port=port)
    stack.produce([text_listing("l-1", "linen tea towel")])
    first = stack.collect(lambda o: len(o.indexed_ids) >= 1)
    [v1] = {m["model_version"] for m in first.similar}
    promote(stack, "broken-v2", tmp_path / "no-such-model")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        if "samestyle_model_load_failures_total 1.0" in metrics:
            break
        time.sleep(0.5)
    assert "samestyle_model_load_failures_total 1.0" in metrics
    stack.produce([text_listing("l-2", "linen tea towel, blue")])
    outputs = stack.collect(lambda o: "l-2" in o.indexed_ids)
    assert {m["model_version"] for m in outputs.similar} == {v1}  # still served by the old model
    state = health(port)
    assert state["ok"] and state["model_version"] == v1 and state["switching_to"] is None
