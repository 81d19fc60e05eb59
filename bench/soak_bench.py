"""Soak: a worker under steady paced load for minutes: does lag stay bounded and memory flat?

One real ``samestyle worker`` process (``--encoder``, default the pretrained one) on the
embedded broker, its ``/metrics`` served on a free port. A warm-up batch goes first and is
waited for (model load and group join are excluded). Then a paced producer sends ``--rate``
listings/s for ``--minutes``, stamping ``event_time`` at the moment of sending. Content cycles
through the demo's generated catalogue (``--templates`` listings, images included); listing ids
cycle through ``--catalogue`` ids (``soak-000000`` …), so after ``catalogue / rate`` seconds
every send is an *update* of a listing already indexed and the index stops growing at
``catalogue`` (+ the warm-up set): memory growth after that point is not the catalogue.

Every ``--interval`` seconds it samples:

* consumer lag: ``samestyle_consumer_lag_messages`` of the worker's ``/metrics``, summed over
  every row (group agents + index replica; each also reported alone). The group's part is the
  fetch high-water mark minus the *committed* offset, so it idles at up to one commit interval
  (1 s) of input, not 0;
* freshness: p50/p99 of ``emitted_at - event_time`` of the similar-products messages (read by a
  consumer here, no group) emitted in the last interval;
* the worker's RSS (psutil if installed, else ``/proc/PID/status`` VmRSS), and the broker's
  (tansu keeps every record in memory, so it grows by design).

    samestyle bench soak --rate 7 --minutes 10 --json --plot soak.png

Not run in CI: it takes ``--minutes`` plus the model load.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.common import (
    Stack,
    bench_parser,
    encode_listing,
    finish,
    machine_info,
    percentile,
    rounded,
    rss_mb,
    sample_messages,
    setup_logging,
    wait_indexed,
    worker_environment,
)

LAG_METRIC = "samestyle_consumer_lag_messages"


def positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("soak", __doc__.splitlines()[0], plot="write a PNG of lag, freshness and RSS over time to PATH")
    p.add_argument("--rate", type=positive_float, default=7.0, help="offered listings/s (default 7)")
    p.add_argument("--minutes", type=positive_float, default=10.0, help="minutes of paced load (default 10)")
    p.add_argument("--interval", type=positive_float, default=5.0, help="seconds between samples (default 5)")
    p.add_argument("--catalogue", type=positive_int, default=1000,
                   help="distinct listing ids the sends cycle through: the index's bounded size (default 1000)")
    p.add_argument("--templates", type=positive_int, default=200,
                   help="generated catalogue listings whose content the sends cycle through (default 200)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="worker batch size (default 32)")
    p.add_argument("--encoder", default="default", help="encoder spec: default, tiny, a JSON config or model dir")
    p.add_argument("--image-mode", choices=("bytes", "uri"), default="bytes")
    p.add_argument("--drain-timeout", type=float, default=120.0,
                   help="seconds to wait for the last listings after the load ends (default 120)")
    p.add_argument("--torch-threads", type=int, help="OMP/MKL threads of the worker")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable of the worker process (repeatable)")
    p.add_argument("--session-timeout", type=float, default=6.0,
                   help="the worker's consumer-group session timeout in s (a group join takes about half)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


# ------------------------------------------------------------------------------ pure helpers


def cycled_listing(templates: Sequence[dict[str, Any]], k: int, catalogue: int) -> dict[str, Any]:
    """The ``k``-th send: content of template ``k % len(templates)``, id ``soak-{k % catalogue}``."""
    return dict(templates[k % len(templates)], listing_id=f"soak-{k % catalogue:06d}")


def lag_from_metrics(text: str, metric: str = LAG_METRIC) -> dict[str, float]:
    """Sum a lag gauge of a Prometheus text page, overall (``"total"``) and per ``consumer`` label."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"total": 0.0}
    for family in text_string_to_metric_families(text):
        if family.name != metric:
            continue
        for sample in family.samples:
            consumer = sample.labels.get("consumer", "?")
            out[consumer] = out.get(consumer, 0.0) + sample.value
            out["total"] += sample.value
    return out


def slope_per_minute(t_seconds: Sequence[float], values: Sequence[float | None]) -> float | None:
    """Least-squares slope of ``values`` against time, per minute; None with fewer than 2 points."""
    points = [(t, v) for t, v in zip(t_seconds, values) if v is not None]
    if len(points) < 2:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mt) * (v - mv) for t, v in points) / var


def summarize(samples: Sequence[dict[str, Any]], latencies: Sequence[float], fill_seconds: float,
              rate: float) -> dict[str, Any]:
    """Max/end lag, RSS start/end and slopes (whole run; after the catalogue filled), p50/p99."""
    t = [s["t_seconds"] for s in samples]
    lag = [s["lag_messages"] for s in samples]
    rss = [s["worker_rss_mb"] for s in samples]
    known_lag = [v for v in lag if v is not None]
    known_rss = [v for v in rss if v is not None]
    after = [(ti, r) for ti, r in zip(t, rss) if ti >= fill_seconds]
    end_lag = known_lag[-1] if known_lag else None
    third = max(1, len(known_lag) // 3)
    return {
        "samples": len(samples),
        "max_lag_messages": max(known_lag) if known_lag else None,
        "lag_at_end_messages": end_lag,
        "max_lag_last_third_messages": max(known_lag[-third:]) if known_lag else None,
        "lag_slope_messages_per_minute": slope_per_minute(t, lag),
        # Bounded: at the end it is behind by less than 10 s of input.
        "lag_bounded": end_lag is not None and end_lag < 10.0 * rate,
        "rss_start_mb": known_rss[0] if known_rss else None,
        "rss_end_mb": known_rss[-1] if known_rss else None,
        "rss_max_mb": max(known_rss) if known_rss else None,
        "rss_slope_mb_per_minute": slope_per_minute(t, rss),
        "rss_slope_after_fill_mb_per_minute": slope_per_minute([a for a, _ in after], [b for _, b in after]),
        "catalogue_filled_after_seconds": fill_seconds,
        "p50_seconds": percentile(latencies, 50),
        "p99_seconds": percentile(latencies, 99),
        "max_seconds": max(latencies) if latencies else None,
    }


# --------------------------------------------------------------------------------- the stack


@contextmanager
def soak_stack(args: argparse.Namespace, run_dir: Path, worker_env: dict[str, str]) -> Iterator[tuple[Stack, Any, int]]:
    """Broker, topics, one worker with its web server on a free port: ``(stack, broker, port)``."""
    from samestyle.streams.dev.broker import EmbeddedBroker, create_topics, free_port
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.process import WorkerProcess
    from samestyle.topics import topic_specs

    run = uuid.uuid4().hex[:8]
    port = free_port()
    with EmbeddedBroker(log_path=run_dir / "broker.log") as broker:
        settings = Settings(
            bootstrap=broker.bootstrap, topic_prefix=f"s{run}-", app_id=f"samestyle-soak-{run}",
            encoder=args.encoder, allow_random_weights=(args.encoder == "tiny"), batch_size=args.batch_size,
            state_dir=run_dir / "state", web_port=port, session_timeout_seconds=args.session_timeout,
            heartbeat_interval_seconds=args.session_timeout / 3)
        specs = topic_specs(settings.topic_prefix, settings.partitions)
        create_topics(broker.bootstrap,
                      topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id).values())
        worker = WorkerProcess(settings, run_dir / "worker.log", extra_env=worker_env).start()
        print(f"worker pid {worker.pid}, /metrics on :{port}, logs in {run_dir}", file=sys.stderr)
        try:
            yield Stack(settings, specs, worker, run_dir), broker, port
        finally:
            worker.kill()


async def _scrape(session: Any, port: int) -> str | None:
    try:
        async with session.get(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return await response.text() if response.status == 200 else None
    except Exception:  # the worker is busy or restarting: this sample has no lag
        return None


async def _soak(stack: Stack, broker: Any, port: int, templates: list[dict[str, Any]],
                args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from samestyle.streams.io.producer import OutputReader, make_producer
    from samestyle.topics import LISTINGS

    topic = stack.specs[LISTINGS].name
    producer = make_producer(stack.settings)
    await producer.start()
    sent: dict[tuple[str, int], None] = {}
    samples: list[dict[str, Any]] = []
    latencies: list[tuple[int, float]] = []  # (emitted_at ms, seconds)
    late = 0.0
    try:
        async with OutputReader(stack.settings, stack.specs) as reader, aiohttp.ClientSession() as http:
            warm = [dict(m, listing_id=f"warm-{i:04d}", event_time=int(time.time() * 1000))
                    for i, m in enumerate(templates[:args.batch_size])]
            started = time.monotonic()
            for record in warm:
                key, value = encode_listing(record)
                await producer.send(topic, key=key, value=value)
            await producer.flush()
            await wait_indexed(stack, reader, {r["listing_id"] for r in warm}, timeout=600.0)
            print(f"warm-up: {len(warm)} listings in {time.monotonic() - started:.1f} s", file=sys.stderr)
            seen = len(reader.outputs.similar)
            count = max(1, round(args.rate * args.minutes * 60))
            t0 = time.monotonic()
            stop = asyncio.Event()

            async def read() -> None:
                nonlocal seen
                while not stop.is_set():
                    await reader.poll(timeout=0.2)
                    for m in reader.outputs.similar[seen:]:
                        key = (m["listing_id"], m["event_time"])
                        if key in sent:
                            latencies.append((m["emitted_at"], (m["emitted_at"] - m["event_time"]) / 1000.0))
                    seen = len(reader.outputs.similar)

            async def sample() -> None:
                last_ms = int(time.time() * 1000)
                while not stop.is_set():
                    await asyncio.sleep(args.interval)
                    stack.check()
                    text = await _scrape(http, port)
                    lag = lag_from_metrics(text) if text is not None else {}
                    now_ms = int(time.time() * 1000)
                    window = [s for e, s in latencies if last_ms < e <= now_ms]
                    last_ms = now_ms
                    row = {
                        "t_seconds": round(time.monotonic() - t0, 2),
                        "sent": len(sent),
                        "delivered": len(latencies),
                        "lag_messages": lag.get("total"),
                        "lag_group_messages": lag.get("group"),
                        "lag_replica_messages": lag.get("replica"),
                        "window_outputs": len(window),
                        "p50_seconds": rounded(percentile(window, 50)),
                        "p99_seconds": rounded(percentile(window, 99)),
                        "worker_rss_mb": rounded(rss_mb(stack.worker.pid)),
                        "broker_rss_mb": rounded(rss_mb(broker._proc.pid)) if broker.running else None,
                    }
                    samples.append(row)
                    print(f"t={row['t_seconds']:.0f}s sent {row['sent']} out {row['delivered']} "
                          f"lag {row['lag_messages']} p50 {row['p50_seconds']} p99 {row['p99_seconds']} "
                          f"rss {row['worker_rss_mb']} MB broker {row['broker_rss_mb']} MB", file=sys.stderr)

            reader_task = asyncio.create_task(read())
            sampler_task = asyncio.create_task(sample())
            futures = []
            for k in range(count):
                due = t0 + k / args.rate
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                else:
                    late = max(late, -wait)
                record = cycled_listing(templates, k, args.catalogue)
                record["event_time"] = int(time.time() * 1000)
                key, value = encode_listing(record)
                sent[(record["listing_id"], record["event_time"])] = None
                futures.append(await producer.send(topic, key=key, value=value))
                if sampler_task.done():  # the worker died: its error ends the run
                    sampler_task.result()
            await asyncio.gather(*futures)
            load_seconds = time.monotonic() - t0
            stop.set()
            await sampler_task
            await reader_task  # before the drain polls the same consumer
            # Drain: the last listings (the reader goes on until every send is out, or time is up).
            deadline = time.monotonic() + args.drain_timeout
            while len(latencies) < len(sent) and time.monotonic() < deadline:
                await reader.poll(timeout=0.2)
                for m in reader.outputs.similar[seen:]:
                    if (m["listing_id"], m["event_time"]) in sent:
                        latencies.append((m["emitted_at"], (m["emitted_at"] - m["event_time"]) / 1000.0))
                seen = len(reader.outputs.similar)
            drain_seconds = time.monotonic() - t0 - load_seconds
    finally:
        await producer.stop()
    delivered = {(m["listing_id"], m["event_time"]) for m in reader.outputs.similar} & set(sent)
    return {"samples": samples, "latencies": [s for _, s in latencies], "sent": len(sent),
            "delivered": len(delivered), "load_seconds": load_seconds, "drain_seconds": drain_seconds,
            "producer_late_seconds_max": late, "dead_letters": len(reader.outputs.dead_letters)}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["series"]
    t = [s["t_seconds"] / 60.0 for s in samples]
    fig, axes = plt.subplots(3, 1, figsize=(7, 6.5), dpi=80, sharex=True)
    ax = axes[0]
    ax.plot(t, [s["lag_messages"] for s in samples], "-", lw=1, label="total")
    ax.plot(t, [s["lag_group_messages"] for s in samples], ":", lw=1, label="group (committed)")
    ax.plot(t, [s["lag_replica_messages"] for s in samples], "--", lw=1, label="index replica")
    ax.set_ylabel("consumer lag (msgs)")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[1]
    ax.plot(t, [s["p50_seconds"] for s in samples], "-", lw=1, label="p50")
    ax.plot(t, [s["p99_seconds"] for s in samples], "-", lw=1, label="p99")
    ax.set_ylabel("freshness (s)")
    ax.legend(fontsize=7, loc="upper right")
    ax = axes[2]
    ax.plot(t, [s["worker_rss_mb"] for s in samples], "-", lw=1, label="worker")
    ax.set_ylabel("worker RSS (MiB)")
    fill = result["summary"]["catalogue_filled_after_seconds"] / 60.0
    for a in axes:
        a.axvline(fill, color="grey", lw=0.6, ls=":")
    ax2 = ax.twinx()
    ax2.plot(t, [s["broker_rss_mb"] for s in samples], color="grey", lw=0.8, ls="--", label="broker (right)")
    ax2.set_ylabel("broker RSS (MiB)", fontsize=8)
    lines = ax.get_legend_handles_labels()
    lines2 = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], fontsize=7, loc="center right")
    axes[2].set_xlabel("minutes of load (dotted: catalogue filled, sends are updates from here)")
    s = result["summary"]
    fig.suptitle(f"soak: {result['rate']:g} listings/s x {result['minutes']:g} min, {result['encoder']} encoder, "
                 f"catalogue {result['catalogue']}; max lag {s['max_lag_messages']}, "
                 f"p99 {s['p99_seconds']} s", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    tmp = Path(tempfile.mkdtemp(prefix="samestyle-bench-soak-"))
    templates = sample_messages(max(args.templates, args.batch_size), tmp, image_mode=args.image_mode)
    worker_env = worker_environment(args.worker_env, args.torch_threads)
    with soak_stack(args, tmp, worker_env) as (stack, broker, port):
        outcome = asyncio.run(_soak(stack, broker, port, templates, args))
    summary = summarize(outcome["samples"], outcome["latencies"], args.catalogue / args.rate, args.rate)
    summary = {k: rounded(v) if isinstance(v, float) else v for k, v in summary.items()}
    result = {
        "summary": summary,
        "series": outcome["samples"],
        "rate": args.rate,
        "minutes": args.minutes,
        "interval_seconds": args.interval,
        "catalogue": args.catalogue,
        "templates": len(templates),
        "sent": outcome["sent"],
        "delivered": outcome["delivered"],
        "dead_letters": outcome["dead_letters"],
        "load_seconds": rounded(outcome["load_seconds"]),
        "drain_seconds": rounded(outcome["drain_seconds"]),
        "producer_late_seconds_max": rounded(outcome["producer_late_seconds_max"]),
        "batch_size": args.batch_size,
        "encoder": args.encoder,
        "image_mode": args.image_mode,
        "worker_env": worker_env or {},
        "rss_source": "psutil" if _has_psutil() else "/proc/PID/status VmRSS",
        "machine": machine_info(),
        "run_dir": str(tmp),
    }
    return finish(result, args, _plot)


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
