"""Listing-to-similar-products latency at fixed offered rates, up to saturation.

A paced producer sends listings of the demo's generated catalogue (images included, each with a
fresh listing id) at a fixed rate for ``--duration`` seconds, stamping ``event_time`` at the
moment of sending; the latency of a listing is its first similar-products message's
``emitted_at`` minus that ``event_time`` (one machine, one clock). Rates run in the given
order; past the last one the rate keeps doubling until the worker saturates, i.e. emits more
slowly than 90 % of the offered rate. The rate it then sustains is ``saturation_rate``; a last
run at half of it checks the goal: p99 <= 1 s + one batch's encode time, where that encode
time (``batch_encode_seconds``) is the median of timed ``prepare`` + ``embed`` calls on full
batches in this process, in the same run.

    samestyle bench freshness --rates 2,5,10 --json [--duration 20] [--plot latency.png]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Stack,
    bench_parser,
    embedded_times,
    encode_listing,
    finish,
    listing_inputs,
    machine_info,
    median,
    percentile,
    positive_float_list,
    rounded,
    sample_messages,
    setup_logging,
    streaming_stack,
    time_encoder,
    wait_indexed,
    worker_environment,
)

#: Emitting below this share of the offered rate means the worker cannot keep up.
SATURATED_BELOW = 0.9
GOAL_BASE_SECONDS = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("freshness", __doc__.splitlines()[0], plot="write a PNG of latency percentiles vs offered rate to PATH")
    p.add_argument("--rates", type=positive_float_list, default=[2.0, 5.0, 10.0],
                   help="offered listings/s, comma-separated, ascending (default 2,5,10)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds of paced load per rate (default 20)")
    p.add_argument("--batch-size", type=int, default=32, help="worker and encoder batch size (default 32)")
    p.add_argument("--encoder", default="default", help="encoder spec: default, tiny, a JSON config or model dir")
    p.add_argument("--image-mode", choices=("bytes", "uri"), default="bytes")
    p.add_argument("--max-doublings", type=int, default=4,
                   help="rate doublings past the last --rates value while not saturated (default 4)")
    p.add_argument("--no-half-run", action="store_true", help="skip the run at half the saturation rate")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="seconds to wait for a rate's last listings after its load ends (default 300)")
    p.add_argument("--torch-threads", type=int, help="OMP/MKL threads of the worker and torch threads here")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable of the worker process (repeatable; for experiments)")
    p.add_argument("--session-timeout", type=float, default=6.0,
                   help="the worker's consumer-group session timeout in s (a group join takes about half)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def rate_row(rate: float, sent: int, event_ms: dict[str, int], emitted_ms: dict[str, int],
             embedded_ms: dict[str, int] | None = None) -> dict[str, Any]:
    """Latency percentiles and the sustained output rate of one offered rate.

    ``event_ms`` holds every sent listing's event time, ``emitted_ms`` the first similar-products
    ``emitted_at`` of those delivered, ``embedded_ms`` their ``embedded_at`` (optional).
    """
    delivered = [i for i in event_ms if i in emitted_ms]
    latencies = [(emitted_ms[i] - event_ms[i]) / 1000.0 for i in delivered]
    row: dict[str, Any] = {
        "rate": rate,
        "sent": sent,
        "delivered": len(delivered),
        "p50_seconds": percentile(latencies, 50),
        "p95_seconds": percentile(latencies, 95),
        "p99_seconds": percentile(latencies, 99),
        "max_seconds": max(latencies) if latencies else None,
    }
    # Output rate: listings out per second between the first and the last output. It equals the
    # offered rate while the worker keeps up and the worker's capacity once it does not.
    times = sorted(emitted_ms[i] for i in delivered)
    span = (times[-1] - times[0]) / 1000.0 if len(times) > 1 else 0.0
    row["output_rate"] = (len(times) - 1) / span if span > 0 else None
    row["saturated"] = len(delivered) < sent or (
        row["output_rate"] is not None and row["output_rate"] < SATURATED_BELOW * rate)
    if embedded_ms:
        embed = [(embedded_ms[i] - event_ms[i]) / 1000.0 for i in delivered if i in embedded_ms]
        search = [(emitted_ms[i] - embedded_ms[i]) / 1000.0 for i in delivered if i in embedded_ms]
        row["p50_to_embedded_seconds"] = median(embed)
        row["p50_embedded_to_emitted_seconds"] = median(search)
    return row


def goal_check(p99_seconds: float | None, batch_encode_seconds: float) -> dict[str, Any]:
    """p99 <= 1 s + one batch's encode time: met, or by how much it is missed."""
    limit = GOAL_BASE_SECONDS + batch_encode_seconds
    met = p99_seconds is not None and p99_seconds <= limit
    return {"p99_seconds": p99_seconds, "limit_seconds": limit, "met": met,
            "missed_by_seconds": None if met or p99_seconds is None else p99_seconds - limit}


class Feed:
    """Fresh listings (new ids, catalogue content cycled) for every paced send."""

    def __init__(self, templates: Sequence[dict[str, Any]]) -> None:
        self.templates = list(templates)
        self.count = 0

    def next(self) -> dict[str, Any]:
        template = self.templates[self.count % len(self.templates)]
        record = dict(template, listing_id=f"{template['listing_id']}-f{self.count:06d}")
        self.count += 1
        return record


async def _paced(stack: Stack, producer: Any, topic: str, feed: Feed, rate: float,
                 duration: float) -> tuple[dict[str, int], float]:
    """Send ``rate * duration`` listings on schedule; returns ``(id -> event_time ms, max lateness s)``."""
    count = max(2, round(rate * duration))
    events: dict[str, int] = {}
    futures = []
    late = 0.0
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate
        wait = due - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        else:
            late = max(late, -wait)
        record = feed.next()
        record["event_time"] = int(time.time() * 1000)
        key, value = encode_listing(record)
        futures.append(await producer.send(topic, key=key, value=value))
        events[record["listing_id"]] = record["event_time"]
    await asyncio.gather(*futures)
    return events, late


async def _run_rates(stack: Stack, feed: Feed, rates: list[float], args: argparse.Namespace,
                     batch_encode_seconds: float) -> dict[str, Any]:
    from samestyle.streams.io.producer import OutputReader, make_producer
    from samestyle.topics import LISTINGS

    topic = stack.specs[LISTINGS].name
    producer = make_producer(stack.settings)
    await producer.start()
    rows: list[dict[str, Any]] = []
    try:
        async with OutputReader(stack.settings, stack.specs) as reader:
            warm = [feed.next() for _ in range(args.batch_size)]
            for record in warm:
                record["event_time"] = int(time.time() * 1000)
                key, value = encode_listing(record)
                await producer.send(topic, key=key, value=value)
            await producer.flush()
            started = time.monotonic()
            await wait_indexed(stack, reader, {r["listing_id"] for r in warm}, timeout=300.0)
            print(f"warm-up: {len(warm)} listings in {time.monotonic() - started:.1f} s", file=sys.stderr)

            async def phase(rate: float) -> dict[str, Any]:
                events, late = await _paced(stack, producer, topic, feed, rate, args.duration)
                try:
                    first = await wait_indexed(stack, reader, set(events), timeout=args.drain_timeout)
                except TimeoutError as exc:
                    print(f"rate {rate}: {exc}".splitlines()[0], file=sys.stderr)
                    first = {m["listing_id"]: m for m in reversed(reader.outputs.similar) if m["listing_id"] in events}
                emitted = {i: m["emitted_at"] for i, m in first.items()}
                embedded = await embedded_times(stack, set(emitted), timeout=5.0)
                row = rate_row(rate, len(events), events, emitted, embedded)
                row["producer_late_seconds_max"] = late
                print(f"rate {rate:g}/s: sent {row['sent']} delivered {row['delivered']} "
                      f"p50 {row['p50_seconds']} p99 {row['p99_seconds']} out {row['output_rate']} "
                      f"saturated {row['saturated']}", file=sys.stderr)
                return row

            queue = list(rates)
            doublings = 0
            saturated: dict[str, Any] | None = None
            while queue:
                row = await phase(queue.pop(0))
                rows.append(row)
                if row["saturated"]:
                    saturated = row
                    break
                if not queue and doublings < args.max_doublings:
                    queue.append(row["rate"] * 2)
                    doublings += 1
            half: dict[str, Any] | None = None
            saturation_rate = saturated["output_rate"] if saturated else None
            if saturation_rate and not args.no_half_run:
                half = await phase(saturation_rate / 2)
                half["half_saturation_run"] = True
                rows.append(half)
    finally:
        await producer.stop()
    goal = None
    if half is not None:
        goal = {"rate": half["rate"], **goal_check(half["p99_seconds"], batch_encode_seconds)}
    return {"rows": rows, "saturation_rate": saturation_rate, "goal": goal}


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = sorted((r for r in result["rates"] if r["p50_seconds"] is not None), key=lambda r: r["rate"])
    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=80)
    x = [r["rate"] for r in rows]
    for key, style in (("p50_seconds", "o-"), ("p95_seconds", "s--"), ("p99_seconds", "^:")):
        ax.plot(x, [r[key] for r in rows], style, label=key.split("_")[0])
    limit = GOAL_BASE_SECONDS + result["batch_encode_seconds"]
    ax.axhline(limit, color="grey", lw=0.8, label=f"goal p99 <= {limit:.2f} s")
    if result["saturation_rate"]:
        ax.axvline(result["saturation_rate"], color="red", lw=0.8,
                   label=f"saturation {result['saturation_rate']:.2f}/s")
        ax.axvline(result["saturation_rate"] / 2, color="red", lw=0.8, ls=":", label="half saturation")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered listings / s")
    ax.set_ylabel("event -> similar-products (s)")
    ax.set_title(f"freshness, {result['encoder']} encoder, batch {result['batch_size']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.duration <= 0 or args.batch_size < 1:
        raise SystemExit("--duration must be > 0 and --batch-size >= 1")
    setup_logging(args.verbose)
    tmp = Path(tempfile.mkdtemp(prefix="samestyle-bench-freshness-"))
    templates = sample_messages(max(64, 2 * args.batch_size), tmp, image_mode=args.image_mode)

    import torch

    from samestyle.models import encoder_from_spec

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    encoder = encoder_from_spec(args.encoder, allow_random_weights=args.encoder == "tiny")
    inputs = listing_inputs(templates)
    batch = inputs[:args.batch_size]

    def batch_times(repeats: int) -> list[float]:
        time_encoder(encoder, batch, args.batch_size)  # first pass is slower
        return [time_encoder(encoder, batch, args.batch_size)[0] for _ in range(repeats)]

    def single_times(repeats: int) -> list[float]:
        return [time_encoder(encoder, batch[:1], 1)[0] for _ in range(repeats)]

    encode_runs = batch_times(3)
    single_runs = single_times(5)
    worker_env = worker_environment(args.worker_env, args.torch_threads)
    with streaming_stack(args.encoder, args.batch_size, run_dir=tmp, worker_env=worker_env,
                         session_timeout_seconds=args.session_timeout,
                         heartbeat_interval_seconds=args.session_timeout / 3) as stack:
        provisional = median(encode_runs) or 0.0
        outcome = asyncio.run(_run_rates(stack, Feed(templates), list(args.rates), args, provisional))
    encode_runs += batch_times(3)
    single_runs += single_times(5)
    batch_encode_seconds = median(encode_runs) or 0.0
    goal = outcome["goal"]
    if goal is not None:  # with the median of every timed batch, before and after
        goal = {"rate": goal["rate"], **goal_check(goal["p99_seconds"], batch_encode_seconds)}

    def tidy(row: dict[str, Any]) -> dict[str, Any]:
        return {k: rounded(v) if isinstance(v, float) else v for k, v in row.items()}

    result = {
        "rates": [tidy(r) for r in outcome["rows"]],
        "saturation_rate": rounded(outcome["saturation_rate"]),
        "batch_encode_seconds": rounded(batch_encode_seconds),
        "batch_encode_runs_seconds": [rounded(s) for s in encode_runs],
        # What a one-listing batch costs: the batches the worker forms at low rates.
        "single_encode_seconds": rounded(median(single_runs)),
        "goal": tidy(goal) if goal else None,
        "duration_seconds": args.duration,
        "batch_size": args.batch_size,
        "batch_linger_seconds": stack.settings.batch_linger_seconds,
        "encoder": args.encoder,
        "encoder_version": encoder.version,
        "image_mode": args.image_mode,
        "torch_threads": args.torch_threads or torch.get_num_threads(),
        "worker_env": worker_env or {},
        "saturated_below_share": SATURATED_BELOW,
        "machine": machine_info(),
        "run_dir": str(tmp),
    }
    return finish(result, args, _plot)


if __name__ == "__main__":
    sys.exit(main())
