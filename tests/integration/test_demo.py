"""`samestyle demo` end to end: embedded broker, a real worker with the pretrained encoder."""

from __future__ import annotations

import json

import pytest

from samestyle.streams.cli.main import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_demo_indexes_the_generated_sample_and_alerts_on_planted_copies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--json", "--timeout", "300"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["listings_produced"] == summary["listings_indexed"] == summary["similar_products"] == 56
    assert summary["dead_letters"] == 0
    assert summary["duplicate_alerts"] > 0
    assert summary["model_version"] == "pretrained-concat-v1"
    # Planted same-supplier copies are the truth; precision and recall are measured, not assumed.
    assert summary["true_duplicate_pairs"] == 10
    assert 0.0 < summary["alert_recall"] <= 1.0
    assert summary["alert_precision"] > 0.5
    for key in ("listings_indexed", "similar_products", "duplicate_alerts", "alert_precision", "alert_recall",
                "seconds"):
        assert key in summary
