"""An agent that dies takes its worker down (no worker left running without committing), and a
worker never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from samestyle.models.data import ListingRecord
from samestyle.streams.dev.broker import die_with_parent
from samestyle.streams.io.producer import listing_message
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration


def wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_crashing_agent_stops_the_worker_with_an_error(stack: Stack) -> None:
    env = dict(os.environ, **stack.settings.to_env())
    log = open(stack.tmp / "exploding.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.exploding_worker"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    try:
        stack.produce([listing_message(ListingRecord("x1", "Red mug", "", None, "s1"))])
        code = wait_exit(proc, 90)
        text = (stack.tmp / "exploding.log").read_text(errors="replace")
        assert code is not None, "the worker kept running after its agent crashed:\n" + text[-3000:]
        assert code != 0
        assert "simulated" in text
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_a_worker_dies_with_the_process_that_started_it(stack: Stack) -> None:
    # A parent (standing in for the demo) starts a worker, prints its pid, then is SIGKILLed.
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from samestyle.streams.settings import Settings
        from samestyle.streams.worker.process import WorkerProcess
        w = WorkerProcess(Settings.from_env(), Path({str(stack.tmp / 'orphan.log')!r})).start()
        print(w.pid, flush=True)
        time.sleep(600)
    """)
    env = dict(os.environ, **stack.settings.to_env())
    parent = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE)
    assert parent.stdout is not None
    with parent.stdout:
        worker_pid = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.kill(worker_pid, 0)
        except ProcessLookupError:
            return
        # A zombie is reaped by init; check its state too.
        try:
            with open(f"/proc/{worker_pid}/stat") as f:
                if f.read().split()[2] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.2)
    os.kill(worker_pid, signal.SIGKILL)
    pytest.fail("the worker outlived its parent by 30 s")
