"""Smoke tests of the benchmark scripts: argument parsing, the arithmetic of their ratios and
percentiles, and the JSON each prints on a tiny run (the streaming ones on the real embedded
broker with the tiny encoder: a few seconds each)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import common, freshness_bench, index_bench, pipeline_bench
from tests.unit.bench.benchutil import run_json

# ------------------------------------------------------------------------------ parsing


def test_pipeline_arguments() -> None:
    args = pipeline_bench.build_parser().parse_args([])
    assert (args.n, args.batch_size, args.encoder, args.json) == (256, 32, "default", False)
    args = pipeline_bench.build_parser().parse_args(["--json", "--n", "64", "--batch-size", "8", "--encoder", "tiny"])
    assert (args.n, args.batch_size, args.encoder, args.json) == (64, 8, "tiny", True)
    with pytest.raises(SystemExit):
        pipeline_bench.build_parser().parse_args(["--json", "out.json"])  # --json is a flag


def test_freshness_arguments() -> None:
    args = freshness_bench.build_parser().parse_args(["--rates", "2,5,10", "--duration", "3", "--json"])
    assert args.rates == [2.0, 5.0, 10.0] and args.duration == 3.0 and args.json
    assert freshness_bench.build_parser().parse_args(["--rates", "0.5"]).rates == [0.5]
    for bad in ("", "2,x", "0", "-1"):
        with pytest.raises(SystemExit):
            freshness_bench.build_parser().parse_args(["--rates", bad])


def test_index_arguments() -> None:
    args = index_bench.build_parser().parse_args(["--n", "1000000", "--dim", "256", "--json"])
    assert (args.n, args.dim, args.json, args.approx_n) == (1_000_000, 256, True, 100_000)
    args = index_bench.build_parser().parse_args(["--ef-sweep", "8,64", "--approx-n", "5000"])
    assert args.ef_sweep == [8, 64] and args.approx_n == 5000


def test_bench_reachable_from_cli(capsys: pytest.CaptureFixture[str]) -> None:
    from samestyle.streams.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["bench", "index", "--help"])
    assert exc.value.code == 0
    assert "--approx-n" in capsys.readouterr().out


# ----------------------------------------------------------------------------- arithmetic


def test_ratio_and_percentile() -> None:
    assert common.ratio(3.0, 4.0) == 0.75
    assert common.ratio(1.0, 0.0) is None and common.ratio(None, 2.0) is None
    values = [0.3, 0.1, 0.9, 0.5, 0.7, 0.2]
    for q in (0, 50, 95, 99, 100):
        assert common.percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert common.percentile([], 50) is None
    assert common.rounded(123456.0) == 123500.0 and common.rounded(0.00123456) == 0.001235


def test_pipeline_ratio_is_pooled_pipeline_over_pooled_encoder() -> None:
    # 100 listings per run: pipeline runs of 10 s and 30 s -> 200 / 40 = 5/s; encoder runs of
    # 4, 5 and 6 s -> 300 / 15 = 20/s; ratio 0.25.
    r = pipeline_bench.pipeline_result(100, [10.0, 30.0], [4.0, 5.0, 6.0])
    assert r["pipeline_listings_per_second"] == pytest.approx(5.0)
    assert r["encoder_listings_per_second"] == pytest.approx(20.0)
    assert r["ratio"] == pytest.approx(0.25)
    assert r["pipeline_runs_listings_per_second"] == pytest.approx([10.0, 100 / 30])
    assert r["encoder_runs_listings_per_second"] == pytest.approx([25.0, 20.0, 100 / 6])
    assert r["goal_met"] is False
    assert pipeline_bench.pipeline_result(90, [10.0], [9.0])["goal_met"] is True  # 9 / 10 = 0.9


def test_index_bandwidth_ratio() -> None:
    r = index_bench.index_result({"read_gbps": 10.0}, {"exact_scan_gbps": 7.5})
    assert r["bandwidth_ratio"] == pytest.approx(0.75) and r["exact_goal_met"] is True
    r = index_bench.index_result({"read_gbps": 10.0}, {"exact_scan_gbps": 6.0})
    assert r["bandwidth_ratio"] == pytest.approx(0.6) and r["exact_goal_met"] is False


def test_index_search_against_sgemm() -> None:
    assert index_bench.gemm_flop(32, 200_000, 256) == 2 * 32 * 200_000 * 256
    rng = np.random.default_rng(0)
    matrix, queries = index_bench.unit_rows(rng, 500, 16), index_bench.unit_rows(rng, 4, 16)
    assert np.allclose(np.linalg.norm(matrix, axis=1), 1, atol=1e-5)
    calls = {"search": 0, "other": 0}

    def count(name: str) -> None:
        calls[name] += 1

    r = index_bench.versus_sgemm(lambda: count("search"), matrix, queries, 3, {"other": lambda: count("other")})
    assert calls == {"search": 4, "other": 4}  # one warm-up each, then one call per round
    assert r["rounds"] == 3 and len(r["sgemm_ratio_per_round"]) == 3
    assert r["sgemm_ratio"] == pytest.approx(r["sgemm_seconds"] / r["search_seconds"])
    assert r["search_gflops"] == pytest.approx(2 * 4 * 500 * 16 / r["search_seconds"] / 1e9)
    assert r["other_sgemm_ratio"] == pytest.approx(r["sgemm_seconds"] / r["other_seconds"])
    headline = {"search_gflops": 30.0, "sgemm_gflops": 40.0, "sgemm_ratio": 0.75, "search_seconds": 0.1,
                "faiss_default_seconds": 0.5, "faiss_default_gflops": 6.0, "faiss_blas_sgemm_ratio": 0.7}
    out = index_bench.index_result({"read_gbps": 10.0}, {"exact_scan_gbps": 1.0, "exact_headline": headline})
    assert out["sgemm_ratio"] == 0.75 and out["sgemm_goal_met"] is True
    out = index_bench.index_result({"read_gbps": 10.0},
                                   {"exact_scan_gbps": 1.0, "exact_headline": {**headline, "sgemm_ratio": 0.69}})
    assert out["sgemm_goal_met"] is False


def test_recall_at_k() -> None:
    truth = np.array([[1, 2, 3], [4, 5, 6]])
    assert index_bench.recall_at_k([[3, 2, 1], [4, 5, 6]], truth, 3) == 1.0
    assert index_bench.recall_at_k([[1, 9, 9], [9, 9, 9]], truth, 3) == pytest.approx(1 / 6)


def test_freshness_row_and_goal() -> None:
    events = {f"l{i}": 1000 * i for i in range(11)}  # 1 listing/s offered for 10 s
    emitted = {f"l{i}": 1000 * i + 200 + 10 * i for i in range(11)}  # latency 0.2 .. 0.3 s
    row = freshness_bench.rate_row(1.0, 11, events, emitted, {k: v - 100 for k, v in emitted.items()})
    assert row["delivered"] == 11
    assert row["p50_seconds"] == pytest.approx(0.25)
    assert row["p99_seconds"] == pytest.approx(common.percentile([0.2 + 0.01 * i for i in range(11)], 99))
    assert row["output_rate"] == pytest.approx(10 / 10.1)
    assert row["saturated"] is False
    assert row["p50_embedded_to_emitted_seconds"] == pytest.approx(0.1)
    # Offered 4/s, out at 1/s: saturated. A missing listing is saturated too.
    assert freshness_bench.rate_row(4.0, 11, events, emitted)["saturated"] is True
    assert freshness_bench.rate_row(1.0, 12, {**events, "lost": 0}, emitted)["saturated"] is True
    goal = freshness_bench.goal_check(1.7, 0.5)
    assert goal["limit_seconds"] == 1.5 and goal["met"] is False
    assert goal["missed_by_seconds"] == pytest.approx(0.2)
    assert freshness_bench.goal_check(1.4, 0.5)["met"] is True


def test_clustered_vectors_are_unit_and_clustered() -> None:
    x = index_bench.clustered(np.random.default_rng(0), 400, 32, 4, 0.8)
    assert x.dtype == np.float32 and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    sims = x @ x.T
    # Nearest neighbours are much closer than random pairs: there is structure to recall.
    assert np.sort(sims, axis=1)[:, -2].mean() > sims.mean() + 0.3


# ------------------------------------------------------------------------------ tiny runs


def test_index_json_on_a_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, index_bench.main, [
        "--n", "3000", "--dim", "16", "--json", "--approx-n", "2000", "--approx-queries", "50",
        "--memory-mb", "16", "--repeat", "1", "--query-batches", "1,4", "--query-batch", "4",
        "--ef-sweep", "16,64", "--ef-search", "64", "--delete-n", "100", "--ivf", "--gallery-blocks", "256,4096"])
    for key in ("memory_gbps", "exact_scan_gbps", "bandwidth_ratio", "recall_at_10", "qps_per_core",
                "add_per_second", "delete_per_second", "n", "dim", "approx_n", "machine"):
        assert key in r, key
    assert r["n"] == 3000 and r["dim"] == 16 and r["approx_n"] == 2000
    assert r["bandwidth_ratio"] == pytest.approx(r["exact_scan_gbps"] / r["memory_gbps"], rel=2e-3)
    for key in ("search_gflops", "sgemm_gflops", "sgemm_ratio", "search_seconds_per_batch",
                "faiss_default_seconds_per_batch", "faiss_blas_sgemm_ratio"):
        assert r[key] > 0, key
    assert r["sgemm_ratio"] == pytest.approx(r["search_gflops"] / r["sgemm_gflops"], rel=2e-3)
    assert [row["gallery_rows"] for row in r["gallery_block_sweep"]] == [256, 4096]
    assert 0.0 <= r["recall_at_10"] <= 1.0 and r["qps_per_core"] > 0
    assert [row["ef_search"] for row in r["approx"]["ef_sweep"]] == [16, 64]
    assert r["approx"]["ivf"]["sweep"]


def test_pipeline_json_on_a_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, pipeline_bench.main, [
        "--json", "--encoder", "tiny", "--n", "8", "--batch-size", "4", "--rounds", "1", "--warmup", "4",
        "--session-timeout", "2", "--torch-threads", "1"])
    for key in ("pipeline_listings_per_second", "encoder_listings_per_second", "ratio", "n", "batch_size",
                "encoder", "machine"):
        assert key in r, key
    assert (r["n"], r["batch_size"], r["encoder"]) == (8, 4, "tiny")
    assert r["ratio"] == pytest.approx(r["pipeline_listings_per_second"] / r["encoder_listings_per_second"])
    assert len(r["encoder_runs_listings_per_second"]) == 2 and len(r["pipeline_runs_listings_per_second"]) == 1
    assert r["listings_with_images"] > 0


def test_freshness_json_on_a_tiny_run(capsys: pytest.CaptureFixture[str]) -> None:
    r = run_json(capsys, freshness_bench.main, [
        "--json", "--encoder", "tiny", "--batch-size", "4", "--rates", "20", "--duration", "0.5",
        "--max-doublings", "0", "--no-half-run", "--session-timeout", "2", "--torch-threads", "1"])
    assert [row["rate"] for row in r["rates"]] == [20.0]
    row = r["rates"][0]
    assert row["sent"] == 10 and row["delivered"] == 10
    for key in ("p50_seconds", "p95_seconds", "p99_seconds"):
        assert 0 < row[key] < 60, key
    assert row["p50_seconds"] <= row["p95_seconds"] <= row["p99_seconds"]
    assert r["batch_encode_seconds"] > 0 and "saturation_rate" in r and not math.isnan(r["batch_encode_seconds"])


def test_index_compact_section_on_a_tiny_run(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    cache = tmp_path / "catalogue.npy"
    rng = np.random.default_rng(0)
    np.save(cache, rng.standard_normal((600, 24)).astype(np.float32))  # stands in for MiniLM vectors
    r = run_json(capsys, index_bench.main, [
        "--n", "2000", "--dim", "16", "--json", "--skip-approx", "--memory-mb", "16", "--repeat", "1",
        "--query-batches", "4", "--query-batch", "4", "--gallery-blocks", "512", "--delete-n", "10",
        "--vectors", "float16,sq8", "--catalogue", str(tmp_path / "none"), "--catalogue-cache", str(cache),
        "--compact-queries", "40", "--rss-n", "3000"])
    compact = r["compact"]
    assert compact["forms"] == ["float32", "float16", "sq8"]
    for form in ("float16", "sq8"):
        assert 0.0 <= compact["recall"][form]["recall_at_10"] <= 1.0
        assert r["compact_timing"][f"{form}_seconds"] > 0 and r["compact_timing"][f"{form}_vs_float32"] > 0
    memory = compact["memory"]
    assert set(memory) == {"float32", "float16", "sq8"}
    # Sparse views: float16 stores ~2 of the 4 vectors at half the bytes; 3,000 rows are fewer than sq8
    # trains on, so its rows are still float32, but sparse.
    assert memory["float16"]["vector_bytes_per_listing"] < memory["sq8"]["vector_bytes_per_listing"] \
        < memory["float32"]["vector_bytes_per_listing"]
    assert isinstance(compact["goal_met"], bool)
    with pytest.raises(SystemExit):
        index_bench.build_parser().parse_args(["--vectors", "int4"])
