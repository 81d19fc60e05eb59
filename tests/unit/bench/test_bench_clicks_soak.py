"""Smoke tests of ``samestyle bench clicks`` and ``samestyle bench soak``: argument parsing, their
pure helpers, and the JSON shape of ``main`` with the long parts (the pairs worker, the paced
soak) replaced by canned results. The real runs take minutes and are not run here."""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench import clicks_bench, common, soak_bench
from tests.unit.bench.benchutil import run_json

# ------------------------------------------------------------------------------ clicks


def test_clicks_arguments() -> None:
    args = clicks_bench.build_parser().parse_args([])
    assert (args.events, args.rounds, args.json, args.encoder, args.profile) == (10_000, 2, False, "tiny", None)
    args = clicks_bench.build_parser().parse_args(["--json", "--events", "500", "--profile", "p.txt"])
    assert (args.events, args.json, args.profile) == (500, True, Path("p.txt"))
    with pytest.raises(SystemExit):
        clicks_bench.build_parser().parse_args(["--modes", "on"])  # gone: no producer sends one record per batch
    assert (args.evidence_ttl, args.sample_every) == (None, None)  # the settings' TTL; a tenth of --events
    args = clicks_bench.build_parser().parse_args(["--evidence-ttl", "86400", "--sample-every", "1000"])
    assert (args.evidence_ttl, args.sample_every) == (86400.0, 1000)


PAIRS_METRICS = """\
# TYPE samestyle_consumer_highwater_offset gauge
samestyle_consumer_highwater_offset{consumer="pairs",partition="0",topic="ce"} 60.0
samestyle_consumer_highwater_offset{consumer="pairs",partition="1",topic="ce"} 40.0
samestyle_consumer_highwater_offset{consumer="pairs",partition="0",topic="cp"} 30.0
samestyle_consumer_highwater_offset{consumer="group",partition="0",topic="listings"} 9.0
samestyle_consumer_highwater_offset{consumer="replica",partition="0",topic="emb"} 5.0
# TYPE samestyle_consumer_position_offset gauge
samestyle_consumer_position_offset{consumer="pairs",partition="0",topic="ce"} 60.0
samestyle_consumer_position_offset{consumer="pairs",partition="1",topic="ce"} 40.0
samestyle_consumer_position_offset{consumer="pairs",partition="0",topic="cp"} 29.0
samestyle_consumer_position_offset{consumer="replica",partition="0",topic="emb"} 2.0
# TYPE samestyle_pairs_table_keys gauge
samestyle_pairs_table_keys{table="sessions"} 12.0
samestyle_pairs_table_keys{table="evidence"} 3.0
# TYPE samestyle_pairs_expired counter
samestyle_pairs_expired_total{table="sessions"} 4.0
samestyle_pairs_expired_total{table="evidence"} 1.0
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 1.048576e+08
"""


METRICS = """\
# TYPE samestyle_consumer_highwater_offset gauge
samestyle_consumer_highwater_offset{consumer="group",partition="0",topic="ce"} 60.0
samestyle_consumer_highwater_offset{consumer="group",partition="1",topic="ce"} 40.0
samestyle_consumer_highwater_offset{consumer="group",partition="0",topic="cp"} 30.0
samestyle_consumer_highwater_offset{consumer="replica",partition="0",topic="emb"} 5.0
# TYPE samestyle_consumer_position_offset gauge
samestyle_consumer_position_offset{consumer="group",partition="0",topic="ce"} 60.0
samestyle_consumer_position_offset{consumer="group",partition="1",topic="ce"} 40.0
samestyle_consumer_position_offset{consumer="group",partition="0",topic="cp"} 29.0
samestyle_consumer_position_offset{consumer="replica",partition="0",topic="emb"} 2.0
# TYPE samestyle_consumer_lag_messages gauge
samestyle_consumer_lag_messages{consumer="group",partition="0",topic="cp"} 1.0
samestyle_consumer_lag_messages{consumer="replica",partition="0",topic="emb"} 3.0
"""


def test_clicks_progress_from_metrics() -> None:
    offsets = clicks_bench.offsets_from_metrics(PAIRS_METRICS)
    assert offsets["highwater"][("ce", 1)] == 40.0 and ("emb", 0) not in offsets["highwater"]  # pairs only
    assert ("listings", 0) not in offsets["highwater"]
    assert clicks_bench.consumption_started(offsets, "ce", 2)
    assert not clicks_bench.consumption_started(offsets, "ce", 3)
    assert not clicks_bench.caught_up(offsets, {"ce": 2, "cp": 1}, 100, "ce")  # cp 29 < 30
    offsets["position"][("cp", 0)] = 30.0
    assert clicks_bench.caught_up(offsets, {"ce": 2, "cp": 1}, 100, "ce")
    assert not clicks_bench.caught_up(offsets, {"ce": 2, "cp": 1}, 101, "ce")  # not every event in yet


def test_clicks_result_ratio() -> None:
    result = clicks_bench.clicks_result(1000, [0.01, 0.01], [2.0, 2.0])
    assert result["raw_consume_events_per_second"] == pytest.approx(100_000)
    assert result["pairs_agent_events_per_second"] == pytest.approx(500)
    assert result["ratio"] == pytest.approx(0.005) and result["goal_met"] is False
    assert result["pairs_agent_runs_events_per_second"] == [500.0, 500.0]


def test_clicks_state_from_metrics() -> None:
    values = clicks_bench.metric_values(PAIRS_METRICS, clicks_bench.STATE_METRICS)
    assert values == {"samestyle_pairs_table_keys{table=sessions}": 12.0,
                      "samestyle_pairs_table_keys{table=evidence}": 3.0,
                      "samestyle_pairs_expired_total{table=sessions}": 4.0,
                      "samestyle_pairs_expired_total{table=evidence}": 1.0,
                      "process_resident_memory_bytes": 104857600.0}
    assert clicks_bench.by_table(values, "samestyle_pairs_table_keys") == {"sessions": 12.0, "evidence": 3.0}
    assert clicks_bench.state_sample(values, 500_000.0, 12.345) == {
        "events_processed": 500_000, "seconds": 12.35, "table_keys": {"sessions": 12.0, "evidence": 3.0},
        "expired": {"sessions": 4.0, "evidence": 1.0}, "worker_rss_mb": 100.0}
    assert clicks_bench.state_sample({}, 0.0, 1.0)["worker_rss_mb"] is None


def test_clicks_processed_from_metrics() -> None:
    text = ('# TYPE samestyle_messages_processed counter\n'
            'samestyle_messages_processed_total{agent="pairs-sessionize"} 12.0\n'
            'samestyle_messages_processed_total{agent="embed"} 3.0\n')
    assert clicks_bench.clicks_processed(text) == 12.0
    assert clicks_bench.clicks_processed(PAIRS_METRICS) == 0.0  # not processing yet: the clock has not started


def test_simulated_clicks_are_a_stream_and_the_same_each_time(tmp_path: Path) -> None:
    first = clicks_bench.simulated_clicks(50, 8, tmp_path)
    assert iter(first) is first  # generated as taken: --events 10000000 holds none of them
    clicks = list(first)
    assert len(clicks) == 50 and clicks == list(clicks_bench.simulated_clicks(50, 8, tmp_path))


def test_clicks_json_shape(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                           tmp_path: Path) -> None:
    """Real broker, clicks produced and read raw; the pairs worker replaced by a canned run."""

    def fake_pairs_run(block: Any, events: int, args: argparse.Namespace,
                       profile: Path | None = None) -> dict[str, Any]:
        return {"seconds": events / 400.0, "join_seconds": 3.0, "scrapes": 10,
                "seconds_by_record_timestamps": events / 410.0, "forwarded_to_click_pairs": events // 2,
                "positive_pairs": 1, "sessions_changelog_records": events // 2,
                "evidence_changelog_records": events // 2, "table_keys_max": 7.0, "worker_rss_mb_max": 100.0}

    monkeypatch.setattr(clicks_bench, "pairs_run", fake_pairs_run)
    plot = tmp_path / "clicks.png"
    result = run_json(capsys, clicks_bench.main, ["--json", "--events", "200", "--rounds", "1", "--products", "8",
                                                  "--raw-repeats", "2", "--plot", str(plot)])
    for key in ("pairs_agent_events_per_second", "raw_consume_events_per_second", "ratio", "events", "machine",
                "pairs_agent_events_per_second_by_record_timestamps", "runs", "goal_met"):
        assert key in result, key
    assert result["events"] == 200 and len(result["raw_runs_events_per_second"]) == 2  # raw, pairs, raw
    assert result["pairs_evidence_ttl_seconds"] == 30 * 24 * 3600.0  # the settings' default was in effect
    assert 0 < result["event_time_span_days"] < 1  # 200 clicks: minutes of simulated time
    assert result["runs"][0]["table_keys_max"] == 7.0
    # The raw side was measured on the real broker; the ratio and the goal combine it with the
    # pairs run's rate, as the bench reports them.
    raw = result["raw_consume_events_per_second"]
    assert raw > 0 and result["machine"]["cores"]
    assert result["raw_runs_events_per_second"] and min(result["raw_runs_events_per_second"]) > 0
    assert result["ratio"] == pytest.approx(result["pairs_agent_events_per_second"] / raw, rel=1e-2)
    assert plot.stat().st_size > 0


# -------------------------------------------------------------------------------- soak


def test_soak_arguments() -> None:
    args = soak_bench.build_parser().parse_args(["--rate", "7", "--minutes", "10", "--json", "--plot", "x.png"])
    assert (args.rate, args.minutes, args.json, args.plot, args.encoder) == (7.0, 10.0, True, Path("x.png"), "default")
    assert args.catalogue == 1000 and args.interval == 5.0
    for bad in (["--rate", "0"], ["--minutes", "-1"], ["--catalogue", "0"], ["--json", "out.json"]):
        with pytest.raises(SystemExit):
            soak_bench.build_parser().parse_args(bad)


def test_soak_helpers() -> None:
    templates = [{"listing_id": "a", "title": "A"}, {"listing_id": "b", "title": "B"}]
    ids = [soak_bench.cycled_listing(templates, k, 3)["listing_id"] for k in range(7)]
    assert ids == ["soak-000000", "soak-000001", "soak-000002", "soak-000000", "soak-000001", "soak-000002",
                   "soak-000000"]  # bounded catalogue: ids repeat, the index stops growing
    assert soak_bench.cycled_listing(templates, 3, 3)["title"] == "B"
    assert soak_bench.lag_from_metrics(METRICS) == {"total": 4.0, "group": 1.0, "replica": 3.0}
    assert soak_bench.slope_per_minute([0, 60, 120], [10, 12, 14]) == pytest.approx(2.0)
    assert soak_bench.slope_per_minute([0], [1]) is None
    import os

    assert common.rss_mb(os.getpid()) > 1


def _samples(n: int) -> list[dict[str, Any]]:
    return [{"t_seconds": 5.0 * (i + 1), "sent": 7 * i, "delivered": 7 * i, "lag_messages": float(i % 3),
             "lag_group_messages": float(i % 3), "lag_replica_messages": 0.0, "window_outputs": 35,
             "p50_seconds": 0.2, "p99_seconds": 0.3, "worker_rss_mb": 900.0 + (i if i < 4 else 4),
             "broker_rss_mb": 30.0 + i} for i in range(n)]


def test_soak_summary() -> None:
    summary = soak_bench.summarize(_samples(12), [0.1, 0.2, 0.3], fill_seconds=25.0, rate=7.0)
    assert summary["max_lag_messages"] == 2.0 and summary["lag_bounded"] is True
    assert (summary["rss_start_mb"], summary["rss_end_mb"]) == (900.0, 904.0)
    assert summary["rss_slope_after_fill_mb_per_minute"] == pytest.approx(0.0)
    assert summary["p99_seconds"] == pytest.approx(0.298)


def test_soak_json_shape(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                         tmp_path: Path) -> None:
    @contextmanager
    def fake_stack(args: Any, run_dir: Path, worker_env: dict[str, str]) -> Any:
        yield None, None, 0

    async def fake_soak(stack: Any, broker: Any, port: int, templates: list[dict[str, Any]],
                        args: argparse.Namespace) -> dict[str, Any]:
        return {"samples": _samples(6), "latencies": [0.1, 0.2], "sent": 42, "delivered": 42, "load_seconds": 30.0,
                "drain_seconds": 0.2, "producer_late_seconds_max": 0.0, "dead_letters": 0}

    monkeypatch.setattr(soak_bench, "soak_stack", fake_stack)
    monkeypatch.setattr(soak_bench, "_soak", fake_soak)
    plot = tmp_path / "soak.png"
    result = run_json(capsys, soak_bench.main, ["--json", "--rate", "2", "--minutes", "0.25", "--templates", "3",
                                                "--batch-size", "2", "--plot", str(plot)])
    assert {"summary", "series", "rate", "minutes", "catalogue", "machine", "sent", "delivered"} <= set(result)
    assert len(result["series"]) == 6 and result["sent"] == 42
    for key in ("max_lag_messages", "lag_at_end_messages", "rss_start_mb", "rss_end_mb", "rss_slope_mb_per_minute",
                "p99_seconds", "p50_seconds", "lag_bounded"):
        assert key in result["summary"], key
    assert 0 < plot.stat().st_size < 150_000
