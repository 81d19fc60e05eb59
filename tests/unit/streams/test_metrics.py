"""The worker's metrics: lag arithmetic, naming rules, and the /metrics and /health routes."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from samestyle.streams.http.server import WebServer, core_routes
from samestyle.streams.settings import Settings
from samestyle.streams.worker.metrics import (
    PREFIX,
    Metrics,
    PartitionLag,
    freshness_seconds,
    metric_names,
    partition_lags,
    probe_bootstrap,
)


def test_lag_is_highwater_minus_committed() -> None:
    rows = partition_lags("group", {("listings", 0): 100, ("listings", 1): 7, ("listings", 2): None},
                          {("listings", 0): 90, ("listings", 1): 7})
    assert [(r.partition, r.lag) for r in rows] == [(0, 10), (1, 0)]  # partition 2: never fetched, left out


def test_lag_without_a_commit_counts_from_zero_and_is_never_negative() -> None:
    (row,) = partition_lags("replica", {("e", 3): 42}, {})
    assert row.lag == 42 and row.position == 0
    assert PartitionLag("group", "t", 0, highwater=5, position=9).lag == 0


def test_freshness_is_seconds_and_never_negative() -> None:
    assert freshness_seconds(1_000, 3_500) == 2.5
    assert freshness_seconds(5_000, 4_000) == 0.0


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_observations_show_up_under_prometheus_names() -> None:
    m = Metrics(process=False)
    m.observe_embed_batch(size=8, seconds=0.2, processed=7, failed=1)
    m.observe_dead_letters([("embed", "DecodeError")])
    m.observe_freshness(m.listing_to_searchable, [1_000, 2_000], now_ms=3_000)
    m.lag_sources.append(lambda: partition_lags("group", {("listings", 0): 10}, {("listings", 0): 4}))
    m.lag_sources.append(lambda: 1 / 0)  # a failing source is skipped, the scrape goes on
    m.rebalance_count = lambda: 3
    m.model.info({"version": "tiny-v1"})
    values = scrape(m)
    assert values[("samestyle_messages_processed_total", (("agent", "embed"),))] == 7
    assert values[("samestyle_messages_failed_total", (("agent", "embed"),))] == 1
    assert values[("samestyle_messages_processed_total", (("agent", "index"),))] == 0  # exists before use
    assert values[("samestyle_dead_letters_total", (("error_type", "DecodeError"), ("stage", "embed")))] == 1
    assert values[("samestyle_embed_batch_size_sum", ())] == 8
    assert values[("samestyle_embed_batch_duration_seconds_count", ())] == 1
    assert values[("samestyle_listing_to_searchable_seconds_sum", ())] == pytest.approx(3.0)
    lag_key = ("samestyle_consumer_lag_messages", (("consumer", "group"), ("partition", "0"), ("topic", "listings")))
    assert values[lag_key] == 6
    assert values[("samestyle_rebalances_total", ())] == 3
    assert values[("samestyle_model_info", (("version", "tiny-v1"),))] == 1


def test_names_follow_the_conventions() -> None:
    names = {n for n in metric_names(Metrics(process=False)) if not n.endswith("_created")}
    assert names and all(n.startswith(PREFIX) for n in names)
    m = Metrics(process=False)
    for family in m.registry.collect():
        if family.type == "counter":
            assert family.name + "_total" in metric_names(m)
        # base units: durations in seconds, never ms
        assert not re.search(r"_(ms|milliseconds|minutes)\b", family.name)
        for sample in family.samples:
            assert "listing_id" not in sample.labels


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _FakeRuntime:
    def __init__(self) -> None:
        self.metrics = Metrics(process=False)

    def health(self) -> dict:
        return {"ok": True, "worker_id": "w"}


def test_web_server_serves_metrics_health_and_extra_routes(tmp_path: Path) -> None:
    from aiohttp import web

    port = _free_port()
    runtime = _FakeRuntime()
    runtime.metrics.similar_products.inc(5)

    def extra(app: web.Application) -> None:
        async def hello(request: web.Request) -> web.Response:
            return web.Response(text="hi")
        app.router.add_get("/hello", hello)

    async def run() -> tuple[str, dict, str]:
        server = WebServer(Settings(web_port=port, state_dir=tmp_path), [core_routes(runtime.metrics.registry, runtime.health)], host="127.0.0.1")
        server.add_routes(extra)
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/metrics") as r:
                    assert r.status == 200
                    metrics_text = await r.text()
                async with session.get(f"http://127.0.0.1:{port}/health") as r:
                    health = await r.json()
                async with session.get(f"http://127.0.0.1:{port}/hello") as r:
                    hello = await r.text()
        finally:
            await server.stop()
        return metrics_text, health, hello

    text, health, hello = asyncio.run(run())
    assert "samestyle_similar_products_emitted_total 5.0" in text
    assert health["ok"] is True
    assert hello == "hi"


def test_probe_tells_a_listening_port_from_a_closed_one() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert asyncio.run(probe_bootstrap([f"127.0.0.1:{port}"], timeout=1.0))
    assert not asyncio.run(probe_bootstrap([f"127.0.0.1:{_free_port()}"], timeout=1.0))
