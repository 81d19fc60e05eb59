"""The GIL bench on the tiny random image backbone: one JSON object, each form timed both ways."""

from __future__ import annotations

import pytest

from bench import gil_bench
from tests.unit.bench.benchutil import run_json


def test_the_bench_times_eager_and_traced_alone_and_beside_a_busy_thread(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_json(capsys, gil_bench.main, ["--json", "--backbone", "tiny", "--runtime", "eager", "--image-size", "32",
                                               "--text-backbone", "tiny", "--text-tokens", "12",
                                               "--batch-size", "4", "--repeat", "2", "--rounds", "2"])
    for form in ("eager", "traced", "traced_frozen"):
        assert result[f"{form}_alone_s"] > 0 and result[f"{form}_beside_busy_thread_s"] > 0
        assert result[f"{form}_slowdown_beside_busy_thread"] == pytest.approx(
            result[f"{form}_beside_busy_thread_s"] / result[f"{form}_alone_s"], rel=1e-2)
    assert len(result["rounds"]) == 2
    # Float32 eager and its frozen trace compute the same features up to rounding.
    assert result["max_abs_feature_difference"] < 1e-3
    assert result["traced_max_abs_feature_difference"] < 1e-6  # the same kernels as eager
    text = result["text"]
    for form in ("eager", "traced"):
        assert text[f"{form}_alone_s"] > 0 and text[f"{form}_beside_busy_thread_s"] > 0
    assert text["traced_max_abs_feature_difference"] < 1e-6 and len(text["rounds"]) == 2
