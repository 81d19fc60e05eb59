"""Running a worker: in this process (``samestyle worker``) or as a child process (demo, tests)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from samestyle.streams.dev.broker import die_with_parent
from samestyle.streams.settings import Settings
from samestyle.topics.errors import BrokerError

log = logging.getLogger(__name__)


def run_worker(settings: Settings, *, pairs: bool | None = None) -> int:
    """Run the Faust worker until SIGTERM/SIGINT; returns the exit code (non-zero after a crash).
    ``pairs`` (default ``settings.pairs_enabled``) adds the click-pairs agents (their tables'
    changelog topics must exist too)."""
    if pairs is None:
        pairs = settings.pairs_enabled
    import faust  # imported here so `samestyle --help` stays fast

    from samestyle.streams.dev.broker import check_topics
    from samestyle.streams.worker.app import create_app
    from samestyle.topics import topic_specs

    # Only the pairs agents keep tables: their changelog topics are required with them.
    specs = topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id if pairs else None)
    check_topics(",".join(settings.bootstrap_servers), specs.values())
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)
    app = create_app(settings, pairs=pairs)
    worker = faust.Worker(app, loglevel=settings.log_level.upper(), quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    else:  # pragma: no cover - execute_from_commandline always raises SystemExit
        code = 0
    if worker.crash_reason is not None and code == 0:
        code = 1
    return code


class WorkerProcess:
    """A ``samestyle worker`` child process that dies with its parent (no orphaned workers)."""

    def __init__(self, settings: Settings, log_path: Path, extra_env: dict[str, str] | None = None) -> None:
        self.settings = settings
        self.log_path = log_path
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "WorkerProcess":
        env = dict(os.environ)
        env.update(self.settings.to_env())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "samestyle.streams.cli.main", "worker"], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent,
                                         # Ctrl-C goes to the parent, which stops the worker in order.
                                         start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise BrokerError(f"worker exited with code {self.proc.returncode}; its log: {self.log_path}\n"
                              + self.log_tail())

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful: the replica snapshots, offsets commit), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("worker %d ignored SIGTERM for %.0f s; killing it", self.proc.pid, timeout)
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no snapshot, no commit (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def wait_for_log(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            if text in self.log_path.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise TimeoutError(f"worker log never showed {text!r} in {timeout:.0f} s:\n{self.log_tail()}")
