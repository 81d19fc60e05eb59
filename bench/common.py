"""Helpers shared by the benchmark scripts: machine facts, ratios, percentiles, JSON output, and a
real streaming stack (embedded broker + topics + one worker process) to measure end to end.

Every benchmark prints exactly one JSON object on stdout with ``--json`` and logs to stderr, so
``samestyle bench NAME --json > out.json`` captures only the result.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("bench")


# ---------------------------------------------------------------------------------- reporting


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either side is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100, numpy's linear interpolation); None if empty."""
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50.0)


def bench_parser(name: str, description: str, plot: str | None = None) -> argparse.ArgumentParser:
    """The parser every bench starts from: ``samestyle bench NAME``, ``--json`` and, when the bench
    draws one, ``--plot PATH`` (``plot`` is its help)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    if plot is not None:
        parent.add_argument("--plot", type=Path, help=plot)
    return argparse.ArgumentParser(prog=f"samestyle bench {name}", description=description, parents=[parent])


def rounded(value: float | None, digits: int = 4) -> float | None:
    """Round to ``digits`` significant digits (JSON readability); None stays None."""
    if value is None or value == 0 or not math.isfinite(value):
        return value
    return float(round(value, digits - 1 - math.floor(math.log10(abs(value)))))


def rss_mb(pid: int) -> float | None:
    """Resident set size of ``pid`` in MiB (psutil if installed, else /proc); None if it is gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return float(psutil.Process(pid).memory_info().rss) / 2**20
        except psutil.Error:
            return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


def rounded_tree(value: Any) -> Any:
    """Every float in nested dicts and lists :func:`rounded` (a result object before printing)."""
    if isinstance(value, float):
        return rounded(value)
    if isinstance(value, dict):
        return {k: rounded_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded_tree(v) for v in value]
    return value


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What a reader needs to compare results: CPU, cores, memory, load, library versions."""
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    try:
        info["load_average_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal"):
                    info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    import numpy

    info["numpy"] = numpy.__version__
    for name in ("torch", "faiss"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "?")
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


def emit(result: dict[str, Any], as_json: bool) -> None:
    """Print the result: one JSON object (``--json``) or indented JSON for a person."""
    if as_json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    sys.stdout.flush()


def finish(result: dict[str, Any], args: Any, plot: Callable[[dict[str, Any], Path], None]) -> int:
    """The end of every bench's main: the PNG when ``--plot`` asks for one, then the JSON."""
    if args.plot is not None:
        plot(result, args.plot)
    emit(result, args.json)
    return 0


def setup_logging(verbose: bool = False) -> None:
    """Progress to stderr; stdout is kept for the JSON result."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", force=True)
    for noisy in ("kafka", "aiokafka", "faiss.loader", "samestyle.models.encoder", "samestyle.streams.dev.broker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def positive_int_list(text: str) -> list[int]:
    """argparse type: ``"2,5,10"`` -> ``[2, 5, 10]``."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"expected positive integers, got {text!r}")
    return values


def positive_float_list(text: str) -> list[float]:
    """argparse type: ``"0.5,2,10"`` -> ``[0.5, 2.0, 10.0]``."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise ValueError(f"expected positive numbers, got {text!r}")
    return values


def worker_environment(assignments: Sequence[str], torch_threads: int | None) -> dict[str, str]:
    """The worker's extra environment from ``NAME=VALUE`` strings and a torch thread count."""
    env: dict[str, str] = {}
    if torch_threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(torch_threads)
    for item in assignments:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise SystemExit(f"--worker-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


# ------------------------------------------------------------------------------ sample data


def sample_messages(count: int, directory: Path, image_mode: str = "bytes") -> list[dict[str, Any]]:
    """``count`` listings records of the demo's generated catalogue (images included).

    The sample has about 1.4 listings per product (near copies and resold products), so enough
    products are generated to cover ``count``.
    """
    from samestyle.models.data import read_listings
    from samestyle.streams.dev.sample import generate_sample
    from samestyle.streams.io.producer import listing_message

    products = max(1, math.ceil(count / 1.4) + 2)
    while True:
        listings_csv, _ = generate_sample(directory / f"sample-{products}", n_products=products)
        records = read_listings(listings_csv)
        if len(records) >= count:
            break
        products = math.ceil(products * 1.2) + 1
    return [listing_message(r, image_mode=image_mode) for r in records[:count]]


def listing_inputs(messages: Sequence[dict[str, Any]]) -> list[Any]:
    """``ListingInput`` objects of listings records, images read into memory."""
    from samestyle.models import ListingInput

    out = []
    for m in messages:
        image = m.get("image_bytes")
        if image is None and m.get("image_uri"):
            image = Path(m["image_uri"]).read_bytes()
        out.append(ListingInput(m["listing_id"], m["title"], m.get("description") or "",
                                dict(m.get("attributes") or {}), image, m.get("category")))
    return out


def time_encoder(encoder: Any, inputs: Sequence[Any], batch_size: int) -> tuple[float, list[float]]:
    """Encode ``inputs`` as the embed step does (prepare each, embed per batch).

    Returns ``(total seconds, seconds of each batch)``.
    """
    batches: list[float] = []
    start = time.perf_counter()
    for i in range(0, len(inputs), batch_size):
        t0 = time.perf_counter()
        encoder.embed([encoder.prepare(x) for x in inputs[i:i + batch_size]])
        batches.append(time.perf_counter() - t0)
    return time.perf_counter() - start, batches


# --------------------------------------------------------------------------- streaming stack


@dataclass
class Stack:
    """An isolated samestyle deployment: embedded broker, created topics, one worker process."""

    settings: Any  # streams.settings.Settings
    specs: dict[str, Any]
    worker: Any  # streams.worker.WorkerProcess
    run_dir: Path

    def check(self) -> None:
        """Raise with the worker's log tail when the worker has died."""
        self.worker.check_alive()


@contextmanager
def streaming_stack(encoder: str, batch_size: int, run_dir: Path | None = None,
                    worker_env: dict[str, str] | None = None, **overrides: Any) -> Iterator[Stack]:
    """Start tansu, create the topics (unique prefix), start one ``samestyle worker`` process.

    ``worker_env`` adds environment variables to the worker (e.g. ``OMP_NUM_THREADS``).
    """
    from samestyle.streams.dev.broker import EmbeddedBroker, create_topics
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.process import WorkerProcess
    from samestyle.topics import topic_specs

    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="samestyle-bench-"))
    run = uuid.uuid4().hex[:8]
    with EmbeddedBroker(log_path=run_dir / "broker.log") as broker:
        settings = Settings(**{
            "bootstrap": broker.bootstrap, "topic_prefix": f"b{run}-", "app_id": f"samestyle-bench-{run}",
            "encoder": encoder, "allow_random_weights": encoder == "tiny", "batch_size": batch_size,
            "state_dir": run_dir / "state", "web_port": 0, **overrides})
        specs = topic_specs(settings.topic_prefix, settings.partitions)
        # app_id: the pairs agents' changelogs too (the worker runs them unless SAMESTYLE_PAIRS_ENABLED=0).
        create_topics(broker.bootstrap,
                      topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id).values())
        worker = WorkerProcess(settings, run_dir / "worker.log", extra_env=worker_env).start()
        log.info("worker pid %d, logs in %s", worker.pid, run_dir)
        try:
            yield Stack(settings, specs, worker, run_dir)
        finally:
            # Nothing of the worker's state is wanted afterwards, and a graceful Faust stop
            # (leave the group, snapshot, commit) takes seconds.
            worker.kill()


def encode_listing(record: dict[str, Any]) -> tuple[bytes, bytes]:
    from samestyle.topics import LISTINGS, codec_for_topic

    return record["listing_id"].encode(), codec_for_topic(LISTINGS).encode(record)


async def wait_indexed(stack: Stack, reader: Any, ids: set[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Poll until every id in ``ids`` has a similar-products message (or was dead-lettered).

    Returns ``listing_id -> first similar-products message``; raises TimeoutError with the
    worker's log tail when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        await reader.poll(timeout=0.1)
        out = reader.outputs
        done = {m["listing_id"] for m in out.similar} | out.dead_lettered_ids
        if ids <= done:
            break
        stack.check()
        if time.monotonic() > deadline:
            missing = len(ids - done)
            raise TimeoutError(f"{missing} of {len(ids)} listings not indexed in {timeout:.0f} s; "
                               f"worker log {stack.worker.log_path}:\n{stack.worker.log_tail(20)}")
    first: dict[str, dict[str, Any]] = {}
    for m in reader.outputs.similar:
        if m["listing_id"] in ids:
            first.setdefault(m["listing_id"], m)
    return first


async def embedded_times(stack: Stack, ids: set[str], timeout: float = 20.0) -> dict[str, int]:
    """``listing_id -> embedded_at`` read back from the listing-embeddings topic (stage timing)."""
    from samestyle.streams.io.reader import LogReader, every_partition
    from samestyle.topics import LISTING_EMBEDDINGS, codec_for_topic

    spec = stack.specs[LISTING_EMBEDDINGS]
    codec = codec_for_topic(LISTING_EMBEDDINGS)
    out: dict[str, int] = {}
    async with LogReader(stack.settings.bootstrap_servers, client_id="bench-embedded-times") as reader:
        await reader.assign(every_partition(spec.name, spec.partitions))
        deadline = time.monotonic() + timeout
        while not ids <= set(out) and time.monotonic() < deadline:
            for record in await reader.fetch():
                value = codec.decode(record.value)
                if value["listing_id"] in ids:
                    out.setdefault(value["listing_id"], value["embedded_at"])
    return out


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


# ---------------------------------------------------------------------------------- profiles


class Profiler:
    """``py-spy record`` of one process, raw (collapsed) stacks, stopped with SIGINT."""

    def __init__(self, pid: int, path: Path, rate: int = 50) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid), "--rate", str(rate),
             "--format", "raw", "--threads", "--output", str(path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def summarize_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Samples per thread and the functions that take the most samples, inclusive and self."""
    threads: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        names = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1] + ")"
                 for f in frames[1:]]
        for name in set(names):
            inclusive[name] += count
        if names:
            leaf[names[-1]] += count

    def share(counter: collections.Counter[str]) -> list[dict[str, Any]]:
        return [{"name": k, "share": round(v / total, 3)} for k, v in counter.most_common(top)]

    return {"samples": total, "threads": share(threads), "inclusive": share(inclusive), "self": share(leaf)}


__all__ = [
    "Profiler", "Stack", "bench_parser", "embedded_times", "emit", "encode_listing", "listing_inputs", "machine_info", "median", "percentile",
    "positive_float_list", "positive_int_list", "ratio", "rounded", "run_async", "sample_messages",
    "setup_logging", "streaming_stack", "summarize_profile", "time_encoder", "wait_indexed", "worker_environment",
]

