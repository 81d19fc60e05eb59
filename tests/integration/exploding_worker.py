"""A real worker process whose encoder fails on every batch: the crash policy under test.

Run as ``python -m tests.integration.exploding_worker`` with SAMESTYLE_* settings in the env.
"""

from __future__ import annotations

import sys
from typing import Sequence

import faust

from samestyle.models import create_encoder
from samestyle.models.encoder import Embeddings, PreparedListing
from samestyle.streams.settings import Settings
from samestyle.streams.worker.app import create_app


class ExplodingEncoder:
    """Delegates to the tiny encoder but fails in the forward pass, like a GPU that fell over."""

    def __init__(self) -> None:
        self._inner = create_encoder("tiny", "cpu", allow_random_weights=True)
        self.version, self.dim, self.device = self._inner.version, self._inner.dim, "cpu"

    def prepare(self, listing):  # type: ignore[no-untyped-def]
        return self._inner.prepare(listing)

    def embed(self, batch: Sequence[PreparedListing]) -> Embeddings:
        raise RuntimeError("CUDA error: device-side assert triggered (simulated)")


def main() -> int:
    app = create_app(Settings.from_env(), encoder=ExplodingEncoder())  # type: ignore[arg-type]
    worker = faust.Worker(app, loglevel="INFO", quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) and exc.code else 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
