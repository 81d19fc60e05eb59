"""A real worker process that SIGKILLs itself in the middle of an index batch: right after the
broker acknowledged the first duplicate alerts it sent, before that batch's similar-products are
sent and its offsets committed (the worst moment for at-least-once delivery).

Run as ``python -m tests.integration.killed_worker`` with SAMESTYLE_* settings in the env.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable

from samestyle.streams.settings import Settings
from samestyle.streams.worker import sinks
from samestyle.streams.worker.pipeline import Outgoing
from samestyle.streams.worker.process import run_worker
from samestyle.topics import DUPLICATE_ALERTS

_send_all = sinks.Sinks.send_all


async def _send_then_die(self: sinks.Sinks, topic_key: str, messages: Iterable[Outgoing]) -> None:
    messages = list(messages)
    await _send_all(self, topic_key, messages)
    if topic_key == DUPLICATE_ALERTS and messages:
        print(f"killed_worker: {len(messages)} alert(s) acknowledged; SIGKILL", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def main() -> int:
    sinks.Sinks.send_all = _send_then_die  # type: ignore[method-assign]
    return run_worker(Settings.from_env())


if __name__ == "__main__":
    sys.exit(main())
