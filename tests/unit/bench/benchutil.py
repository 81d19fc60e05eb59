"""Shared by the benchmark smoke tests."""

from __future__ import annotations

import json
from typing import Any

import pytest


def run_json(capsys: pytest.CaptureFixture[str], main: Any, argv: list[str]) -> dict[str, Any]:
    """Run a bench's main and parse stdout, which must be exactly one JSON object."""
    assert main(argv) == 0
    out = capsys.readouterr().out.strip()
    assert out.count("\n") == 0, "--json must print exactly one line"
    result = json.loads(out)
    assert isinstance(result, dict)
    return result
