"""`samestyle bench backends` end to end at a tiny size: both backends, a real milvus-lite server."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from bench import backends_bench


def test_backends_bench_measures_both_backends(capsys: pytest.CaptureFixture[str]) -> None:
    assert backends_bench.main(["--n", "300", "--dim", "16", "--queries", "8", "--fresh", "3",
                                "--concurrency", "4", "--buffer", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {(r["backend"], r["consistency"]): r for r in result["rows"]}
    assert set(rows) == {("faiss", None), ("milvus", "Strong"), ("milvus", "Bounded"), ("milvus", "Bounded+buffer")}
    for row in rows.values():
        assert row["n"] == 300 and row["recall_at_10"] == 1.0  # both are exact (flat / FLAT)
        assert row["ingest_per_s"] > 0 and row["search_1"]["p50_ms"] > 0 and row["search_4"]["clients"] == 4
        assert row["search_batch_4"]["queries_per_call"] == 4 and row["search_batch_4"]["qps"] > 0
        assert row["upsert_to_searchable"]["p99_ms"] >= row["upsert_to_searchable"]["p50_ms"] > 0
    assert rows[("milvus", "Strong")]["server_rss_mb_after"] > 0
    assert "server_rss_mb_after" not in rows[("faiss", None)]
