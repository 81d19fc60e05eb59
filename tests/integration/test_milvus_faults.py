"""Faults on the Milvus backend: a worker SIGKILLed in the middle of an index batch, and the Milvus
Lite server SIGKILLed and started again under load. Neither loses a listing or alerts a pair twice.

Real tansu broker, real worker processes, a real ``milvus-lite server`` process shared by the workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from samestyle.streams.dev.broker import die_with_parent, free_port
from samestyle.streams.io.producer import Outputs
from tests.integration.conftest import Stack
from tests.integration.test_faults import scrape, total
from tests.integration.test_milvus import (
    assert_every_pair_alerted_once,
    catalogue,
    copies_of,
    milvus,  # noqa: F401  (the fixture)
    on_milvus,
    planted,
    wait_all_processed,
)

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from samestyle.index_store.milvus import MilvusBackend, milvus_lite_server

pytestmark = [pytest.mark.integration, pytest.mark.faults]


def held(uri: str, prefix: str) -> list[str]:
    """Every listing id in the active collection, read by a client of its own."""
    client = MilvusBackend(uri, n_views=3, prefix=prefix)
    try:
        version = client.active
        return [] if version is None else sorted(client.ids(version))
    finally:
        client.close()


def all_answered_and_alerted_once(stack: Stack, every: set[str], copies: list[dict], timeout: float) -> Outputs:
    """The outputs once every listing of ``every`` was answered and each planted copy alerted, after
    every consumer committed; asserts no pair was alerted twice."""
    stack.collect(lambda o: every <= o.indexed_ids and len({(a["listing_id"], a["duplicate_of"])
                                                            for a in o.alerts}) >= len(copies), timeout=timeout)
    wait_all_processed(stack)
    out = stack.collect(lambda o: every <= o.indexed_ids)
    assert_every_pair_alerted_once(out, planted(copies))
    return out


def test_a_worker_killed_mid_batch_loses_no_listing_and_alerts_no_pair_twice(
        stack: Stack, milvus: tuple[str, Any]) -> None:  # noqa: F811
    uri, _ = milvus
    on_milvus(stack, uri, duplicate_threshold=0.999)
    survivor = stack.start_worker("w2", state_dir=stack.tmp / "state-w2")
    env = dict(os.environ, **stack.settings.replace(worker_id="w1", state_dir=stack.tmp / "state-w1").to_env())
    log_path = stack.tmp / "killed.log"
    with open(log_path, "wb") as log:
        killed = subprocess.Popen([sys.executable, "-m", "tests.integration.killed_worker"], env=env, stdout=log,
                                  stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        survivor.wait_for_log("shared index ready", timeout=90)
        deadline = time.monotonic() + 90
        while "shared index ready" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and killed.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.2)
        originals = catalogue("orig", 48)
        stack.produce(originals)
        stack.collect(lambda o: {x["listing_id"] for x in originals} <= o.indexed_ids)
        # Each worker's index agent owns half of the partitions: the killed one alerts on some copies.
        copies = copies_of(originals, step=2)
        stack.produce(copies)
        assert killed.wait(90) == -9, log_path.read_text(errors="replace")[-3000:]
        assert "alert(s) acknowledged; SIGKILL" in log_path.read_text(errors="replace")
        every = {x["listing_id"] for x in originals + copies}
        # The survivor takes the dead worker's partitions over and replays what it had not committed.
        out = all_answered_and_alerted_once(stack, every, copies, timeout=120)
        # The replay really happened: the killed batch's listings were answered again.
        assert len(out.similar) > len(every)
        assert held(uri, stack.settings.milvus_prefix) == sorted(every)
        survivor.check_alive()
        assert survivor.stop() == 0
    finally:
        if killed.poll() is None:
            killed.kill()


def test_a_killed_and_restarted_milvus_lite_server_loses_no_listing_and_alerts_no_pair_twice(
        stack: Stack, tmp_path: Path) -> None:
    data_dir, port = tmp_path / "milvus" / "index.db", free_port()
    with ExitStack() as servers:
        uri, server = servers.enter_context(milvus_lite_server(data_dir, port))
        on_milvus(stack, uri, duplicate_threshold=0.999)
        web = free_port()
        worker = stack.start_worker("w1", web_port=web)
        worker.wait_for_log("shared index ready", timeout=90)
        originals = catalogue("orig", 40)
        stack.produce(originals)
        stack.collect(lambda o: {x["listing_id"] for x in originals} <= o.indexed_ids)
        # Copies and new listings keep arriving while the server is killed and comes back.
        waves = [copies_of(originals[w::4], step=2) + catalogue(f"new{w}", 6) for w in range(4)]
        sent = [threading.Event() for _ in waves]

        def producer() -> None:
            for i, wave in enumerate(waves):
                stack.produce(wave)
                sent[i].set()
                time.sleep(1.0)

        thread = threading.Thread(target=producer)
        thread.start()
        sent[0].wait(30)
        server.kill()  # SIGKILL: no flush, no clean shutdown
        assert server.wait() == -9
        time.sleep(3.0)  # the worker's writes fail meanwhile; it retries, commits nothing
        worker.check_alive()
        servers.close()
        uri_again, _ = servers.enter_context(milvus_lite_server(data_dir, port))
        assert uri_again == uri
        thread.join(60)
        every = {x["listing_id"] for x in originals + [x for wave in waves for x in wave]}
        copies = [x for wave in waves for x in wave if x["listing_id"].startswith("copy-")]
        all_answered_and_alerted_once(stack, every, copies, timeout=180)
        assert held(uri, stack.settings.milvus_prefix) == sorted(every)
        worker.check_alive()  # it waited for the server: no crash, no restart
        assert total(scrape(web), "samestyle_index_vectors") == len(every)
        assert worker.stop() == 0
