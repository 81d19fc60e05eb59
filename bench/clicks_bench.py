"""Click events/s through the pairs agents, against raw aiokafka consumption of the same messages.

Clicks: ``--events`` click events drawn by the click simulator (:mod:`streams.dev.simulate`, default
click model, seed 0) on the demo's generated catalogue, produced to ``click-events`` (4 partitions,
keyed by session) before any worker starts. They are generated and produced as a stream, so
``--events 10000000`` needs no memory for the clicks themselves (the embedded broker keeps every
record in memory: its RSS was ~2 GB during such a run, docs/PAIRS.md).

Pairs agents: a real ``samestyle worker`` process (the pairs agents run in every worker) on the
embedded broker, with a fresh topic prefix, app id (consumer groups) and changelog topics per run,
and the default pair rules (so bounces and self-clicks stop at the first stage, as in production).
Its ``/metrics`` is scraped every ``--scrape-interval`` s; the clock runs

* from the last scrape before the agents processed their first click (a fetch high-water mark
  known on every click-events partition, ``samestyle_messages_processed_total{agent="pairs-sessionize"}``
  still 0: the group join and the tables' recovery excluded, the first batch included)
* to the first scrape where the *committed* offsets of the pairs consumer (``consumer="pairs"``)
  have reached the high-water marks on both click-events and the internal click-pairs topic
  (every event through both stages, every table write acknowledged).

The agents commit at once when a fetch comes back empty (and every
``SAMESTYLE_PAIRS_COMMIT_INTERVAL_SECONDS`` while busy), so that end is late by about one fetch
wait; the run also reports a second clock from the broker timestamps of the tables' changelog
records (first session write to last table write), which has no such delay. Each scrape also
records the tables' sizes (``samestyle_pairs_table_keys``), the keys expired so far
(``samestyle_pairs_expired_total``) and the worker's RSS: the run reports their peaks and last
values, and ``runs[].samples`` holds them at every ``--sample-every`` events processed (the
bounded-state check of a long run). The simulator starts a session every 2 s of event time, so
10 million clicks span about 92 days: the default 30-day evidence TTL (``--evidence-ttl``, reported
as ``pairs_evidence_ttl_seconds``) expires keys during such a run.

Raw: an ``AIOKafkaConsumer`` (no group, assigned every partition, from the beginning) reads the
same topic in this process, ``--raw-repeats`` times per run, from the first ``getmany`` call to
the last message. Raw runs alternate with the pairs runs on the noisy machine: raw, pairs, raw,
pairs, ..., raw. ``--profile PATH`` records the worker of the first run with py-spy (raw stacks).

    samestyle bench clicks --json [--events 50000] [--rounds 2] [--profile PATH]
    samestyle bench clicks --json --events 10000000 --rounds 1 --raw-repeats 1 --sample-every 500000

``ratio = pairs_agent_events_per_second / raw_consume_events_per_second``; goal >= 0.5.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Profiler,
    bench_parser,
    finish,
    machine_info,
    ratio,
    rounded,
    setup_logging,
    summarize_profile,
)

GOAL_RATIO = 0.5
#: A caught-up state must hold this long (several scrapes) to count as the end.
CONFIRM_SECONDS = 0.5
#: Consumer label of the pairs agents' rows in the lag metrics.
CONSUMER = "pairs"
#: py-spy samples per second (a run lasts seconds).
PROFILE_RATE = 250


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("clicks", __doc__.splitlines()[0], plot="write a PNG bar chart to PATH")
    p.add_argument("--events", type=int, default=10_000, help="click events per run (default 10000)")
    p.add_argument("--rounds", type=int, default=2, help="pairs runs, alternating with raw runs (default 2)")
    p.add_argument("--raw-repeats", type=int, default=5,
                   help="full reads of the topic per raw run (a single read lasts tens of ms; default 5)")
    p.add_argument("--products", type=int, default=200, help="products of the generated catalogue (default 200)")
    p.add_argument("--encoder", default="tiny",
                   help="encoder spec of the worker; it embeds nothing here (no listings), it only sizes the "
                        "empty index (default tiny)")
    p.add_argument("--scrape-interval", type=float, default=0.1, help="seconds between /metrics scrapes (default 0.1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a pairs run may take (default 600)")
    p.add_argument("--profile", type=Path, help="py-spy the worker of the first run; raw stacks to PATH")
    p.add_argument("--session-timeout", type=float, default=6.0,
                   help="the worker's consumer-group session timeout in s (a group join takes about half)")
    p.add_argument("--evidence-ttl", type=float, default=None,
                   help="the worker's SAMESTYLE_PAIRS_EVIDENCE_TTL_SECONDS (default: the settings' default, 30 days; "
                        "0 keeps every key)")
    p.add_argument("--sample-every", type=int, default=None,
                   help="record table sizes and worker RSS each time this many more clicks are processed "
                        "(default: a tenth of --events)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


# ------------------------------------------------------------------------------ pure helpers


def offsets_from_metrics(text: str) -> dict[str, dict[tuple[str, int], float]]:
    """The pairs consumer's ``highwater`` and committed ``position`` per (topic, partition) of a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"samestyle_consumer_highwater_offset": "highwater", "samestyle_consumer_position_offset": "position"}
    out: dict[str, dict[tuple[str, int], float]] = {"highwater": {}, "position": {}}
    for family in text_string_to_metric_families(text):
        key = wanted.get(family.name)
        if key is None:
            continue
        for s in family.samples:
            if s.labels.get("consumer") == CONSUMER:
                out[key][(s.labels["topic"], int(s.labels["partition"]))] = s.value
    return out


def clicks_processed(text: str) -> float:
    """Click events the sessionize stage has processed, from a /metrics page."""
    values = metric_values(text, ("samestyle_messages_processed_total",))
    return values.get("samestyle_messages_processed_total{agent=pairs-sessionize}", 0.0)


def consumption_started(offsets: dict[str, dict[tuple[str, int], float]], topic: str, partitions: int) -> bool:
    """True once a fetch high-water mark is known for every partition of ``topic``."""
    return all((topic, p) in offsets["highwater"] for p in range(partitions))


def caught_up(offsets: dict[str, dict[tuple[str, int], float]], topics: dict[str, int], events: int,
              source: str) -> bool:
    """Every partition of ``topics`` committed up to its high-water mark, and ``source`` holds all ``events``."""
    hw, pos = offsets["highwater"], offsets["position"]
    for topic, partitions in topics.items():
        for p in range(partitions):
            if (topic, p) not in hw or pos.get((topic, p), 0) < hw[(topic, p)]:
                return False
    return sum(hw[(source, p)] for p in range(topics[source])) >= events


def pooled_rate(events: int, seconds: Sequence[float]) -> float | None:
    """``events`` per run over every run: ``events * runs / total seconds``."""
    total = sum(seconds)
    return events * len(seconds) / total if seconds and total > 0 else None


def metric_values(text: str, names: Sequence[str]) -> dict[str, float]:
    """``{name or name{label=value}: value}`` of the samples of ``names`` on a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in names:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def clicks_result(events: int, raw_seconds: Sequence[float], pairs_seconds: Sequence[float]) -> dict[str, Any]:
    """Pooled rates of both sides and their ratio."""
    raw = pooled_rate(events, raw_seconds)
    pairs = pooled_rate(events, pairs_seconds)
    return {
        "pairs_agent_events_per_second": pairs,
        "raw_consume_events_per_second": raw,
        "ratio": ratio(pairs, raw),
        "goal_ratio": GOAL_RATIO,
        "goal_met": (ratio(pairs, raw) or 0.0) >= GOAL_RATIO,
        "raw_runs_events_per_second": [events / s for s in raw_seconds],
        "pairs_agent_runs_events_per_second": [events / s for s in pairs_seconds],
    }


# ------------------------------------------------------------------------------ click data


def simulated_clicks(count: int, products: int, directory: Path, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``count`` click events of the default click model on a generated catalogue (session order),
    generated as they are taken (the same ones on every call)."""
    from samestyle.models.data import read_clusters, read_listings
    from samestyle.streams.dev.sample import generate_sample
    from samestyle.streams.dev.simulate import ClickSimulator

    sample = directory / "sample"
    if not (sample / "listings.csv").is_file():
        generate_sample(sample, n_products=products, seed=seed)
    sim = ClickSimulator(read_listings(sample / "listings.csv"), read_clusters(sample / "clusters.csv"), seed=seed)
    n = 0
    for c in sim.sessions(math.ceil(count / 2) + 10):  # 2.5 clicks per session on average
        yield c
        n += 1
        if n == count:
            return
    raise RuntimeError(f"the simulator gave {n} clicks, not {count}")  # pragma: no cover


# --------------------------------------------------------------------------------- the runs


class Block:
    """The topics (unique prefix) and settings of one pairs run; clicks pre-produced to its click-events."""

    def __init__(self, bootstrap: str, args: argparse.Namespace, run_dir: Path) -> None:
        from samestyle.streams.dev.broker import free_port
        from samestyle.streams.settings import Settings
        from samestyle.topics import topic_specs

        run = uuid.uuid4().hex[:8]
        self.settings = Settings(
            bootstrap=bootstrap, topic_prefix=f"c{run}-", app_id=f"samestyle-clicks-{run}", worker_id=f"clicks-{run}",
            encoder=args.encoder, allow_random_weights=(args.encoder == "tiny"), state_dir=run_dir / run / "state",
            web_port=free_port(), session_timeout_seconds=args.session_timeout,
            heartbeat_interval_seconds=args.session_timeout / 3,
            **({} if args.evidence_ttl is None else {"pairs_evidence_ttl_seconds": args.evidence_ttl}))
        self.specs = topic_specs(self.settings.topic_prefix, app_id=self.settings.app_id)
        self.log_path = run_dir / run / "worker.log"


async def _produce(block: Block, clicks: Iterable[dict[str, Any]]) -> tuple[int, int] | None:
    """Send ``clicks`` to the block's click-events; the first and last event time (ms) sent."""
    from samestyle.streams.io.producer import send_records
    from samestyle.topics import CLICK_EVENTS, codec_for_topic

    codec = codec_for_topic(CLICK_EVENTS)
    span: list[int] = []

    def messages() -> Iterator[tuple[bytes, bytes]]:
        for c in clicks:
            t = c["event_time"]
            if not span:
                span.extend((t, t))
            elif t < span[0]:
                span[0] = t
            elif t > span[1]:
                span[1] = t
            yield c["session_id"].encode(), codec.encode(c)

    await send_records(block.settings, block.specs[CLICK_EVENTS].name, messages())
    return (span[0], span[1]) if span else None


async def raw_consume(bootstrap: str, topic: str, partitions: int, events: int, repeats: int) -> float:
    """Seconds for ``repeats`` full reads of ``topic`` (``events`` messages each) with aiokafka."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    total = 0.0
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        for _ in range(repeats):
            for tp in tps:
                consumer.seek(tp, 0)
            n = 0
            t0 = time.perf_counter()
            while n < events:
                for records in (await consumer.getmany(timeout_ms=1000, max_records=10_000)).values():
                    n += len(records)
            total += time.perf_counter() - t0
    finally:
        await consumer.stop()
    return total


async def _topic_stats(bootstrap: str, specs: dict[str, Any], timeout: float = 600.0) -> dict[str, dict[str, Any]]:
    """Records, first and last broker timestamp (ms) of each topic in ``specs`` (read to the end)."""
    from samestyle.streams.io.reader import LogReader, every_partition

    out = {key: {"records": 0, "first_ms": None, "last_ms": None} for key in specs}
    by_name = {spec.name: key for key, spec in specs.items()}
    deadline = time.monotonic() + timeout
    async with LogReader(bootstrap, client_id="bench-topic-stats") as reader:
        await reader.assign([p for spec in specs.values() for p in every_partition(spec.name, spec.partitions)])
        while True:  # fetch by fetch, not read_to_end: a long run's topics hold millions of records
            for record in await reader.fetch(0.3):
                row = out[by_name[record.topic]]
                row["records"] += 1
                stamp = record.timestamp
                row["first_ms"] = stamp if row["first_ms"] is None else min(row["first_ms"], stamp)
                row["last_ms"] = stamp if row["last_ms"] is None else max(row["last_ms"], stamp)
            if await reader.at_end():
                return out
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(by_name)} to the end in {timeout:.0f} s")


#: Scraped beside the offsets: table sizes, keys expired so far and the worker's memory.
STATE_METRICS = ("samestyle_pairs_table_keys", "samestyle_pairs_expired_total", "process_resident_memory_bytes")


def by_table(values: dict[str, float], name: str) -> dict[str, float]:
    """``{table: value}`` of the ``name{table=...}`` entries of :func:`metric_values`."""
    prefix = name + "{table="
    return {k[len(prefix):-1]: v for k, v in values.items() if k.startswith(prefix)}


def state_sample(values: dict[str, float], processed: float, seconds: float) -> dict[str, Any]:
    """One point of a run's state series: clicks processed, seconds since the worker started, table
    keys and expired keys per table, the worker's RSS in MiB."""
    rss = values.get("process_resident_memory_bytes")
    return {"events_processed": int(processed), "seconds": rounded(seconds),
            "table_keys": by_table(values, "samestyle_pairs_table_keys"),
            "expired": by_table(values, "samestyle_pairs_expired_total"),
            "worker_rss_mb": rounded(rss / 2**20) if rss is not None else None}


def pairs_run(block: Block, events: int, args: argparse.Namespace, profile: Path | None = None) -> dict[str, Any]:
    """Start a worker on ``block`` and time its pairs agents through every pre-produced click."""
    import urllib.request

    from samestyle.streams.dev.broker import die_with_parent
    from samestyle.topics import CLICK_EVENTS, CLICK_PAIRS, POSITIVE_PAIRS
    from samestyle.topics.registry import PAIRS_EVIDENCE_TABLE, PAIRS_SESSIONS_TABLE, changelog_topic

    source = block.specs[CLICK_EVENTS]
    watched = {source.name: source.partitions, block.specs[CLICK_PAIRS].name: block.specs[CLICK_PAIRS].partitions}
    url = f"http://127.0.0.1:{block.settings.web_port}/metrics"
    env = dict(os.environ, **block.settings.to_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    block.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(block.log_path, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "samestyle", "worker"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
    profiler: Profiler | None = None
    launched = time.monotonic()
    started = ended = candidate = idle_at = None
    scrapes = 0
    state: list[dict[str, float]] = []
    samples: list[dict[str, Any]] = []
    sample_every = args.sample_every or max(1, events // 10)
    next_sample = sample_every
    processed = 0.0
    try:
        deadline = launched + args.timeout
        while ended is None:
            if proc.poll() is not None:
                raise RuntimeError(f"pairs worker exited with {proc.returncode}; log {block.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"pairs run not done in {args.timeout:.0f} s; log {block.log_path}")
            t = time.monotonic()
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:  # web server not up yet
                text = None
            if text is not None:
                scrapes += 1
                offsets = offsets_from_metrics(text)
                state.append(metric_values(text, STATE_METRICS))
                processed = clicks_processed(text)
                if processed >= next_sample:
                    samples.append(state_sample(state[-1], processed, t - launched))
                    next_sample = (processed // sample_every + 1) * sample_every
                if started is None and consumption_started(offsets, source.name, source.partitions):
                    if profile is not None and profiler is None:  # the measured window, not the start-up
                        profiler = Profiler(proc.pid, profile, rate=PROFILE_RATE)
                    if processed == 0:
                        idle_at = t  # assigned, fetching, tables being read: not processing yet
                    else:
                        started = idle_at if idle_at is not None else t
                # The high-water mark of click-pairs comes from the worker's last fetch: confirm
                # over CONFIRM_SECONDS of scrapes, and time the end at the first of them.
                if started is not None and caught_up(offsets, watched, events, source.name):
                    candidate = t if candidate is None else candidate
                    if profiler is not None:
                        profiler.stop()
                    if t - candidate >= CONFIRM_SECONDS:
                        ended = candidate
                else:
                    candidate = None
            time.sleep(max(0.0, args.scrape_interval - (time.monotonic() - t)))
    finally:
        if profiler is not None:
            profiler.stop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert started is not None and ended is not None
    stats_specs = {k: block.specs[k] for k in (CLICK_PAIRS, POSITIVE_PAIRS)}
    for table in (PAIRS_SESSIONS_TABLE, PAIRS_EVIDENCE_TABLE):
        stats_specs[table] = block.specs[changelog_topic(block.settings.app_id, table)]
    if state and (not samples or samples[-1]["events_processed"] < processed):
        samples.append(state_sample(state[-1], processed, ended - launched))
    stats = asyncio.run(_topic_stats(block.settings.bootstrap or "", stats_specs, args.timeout))
    first = stats[PAIRS_SESSIONS_TABLE]["first_ms"]
    last = max(v for v in (stats[PAIRS_EVIDENCE_TABLE]["last_ms"], stats[PAIRS_SESSIONS_TABLE]["last_ms"])
               if v is not None) if first is not None else None
    keys = [sum(v for k, v in row.items() if k.startswith("samestyle_pairs_table_keys")) for row in state]
    rss = [row.get("process_resident_memory_bytes", 0.0) / 2**20 for row in state]
    return {
        "seconds": ended - started,
        "join_seconds": started - launched,
        "scrapes": scrapes,
        # First session-table write to the last table write, from the changelog records' timestamps.
        "seconds_by_record_timestamps": (last - first) / 1000.0 if first is not None and last is not None else None,
        "forwarded_to_click_pairs": stats[CLICK_PAIRS]["records"],
        "positive_pairs": stats[POSITIVE_PAIRS]["records"],
        "sessions_changelog_records": stats[PAIRS_SESSIONS_TABLE]["records"],
        "evidence_changelog_records": stats[PAIRS_EVIDENCE_TABLE]["records"],
        "table_keys_max": max(keys, default=None),
        "table_keys_last": keys[-1] if keys else None,
        "table_keys_last_by_table": {k.split("=", 1)[1].rstrip("}"): v for k, v in (state[-1] if state else {}).items()
                                     if k.startswith("samestyle_pairs_table_keys")},
        "worker_rss_mb_max": max(rss, default=None),
        "worker_rss_mb_last": rss[-1] if rss else None,
        "expired_last_by_table": by_table(state[-1], "samestyle_pairs_expired_total") if state else {},
        "samples": samples,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["raw aiokafka", "pairs agents\n(batched)"]
    values = [result["raw_consume_events_per_second"], result["pairs_agent_events_per_second"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=80)
    bars = ax.bar(names, [v or 0 for v in values], color=["#888888", "#3b75af"])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_yscale("log")
    ax.set_ylabel("click events / s (log)")
    r = result["ratio"]
    ax.set_title(f"{result['events']} clicks x {result['rounds']} rounds: ratio "
                 f"{r:.3f} (goal {GOAL_RATIO})" if r is not None else "ratio n/a", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.events < 1 or args.rounds < 1 or args.raw_repeats < 1 or args.scrape_interval <= 0:
        raise SystemExit("--events, --rounds and --raw-repeats must be >= 1, --scrape-interval > 0")
    setup_logging(args.verbose)
    from samestyle.streams.dev.broker import EmbeddedBroker, create_topics
    from samestyle.topics import CLICK_EVENTS

    tmp = Path(tempfile.mkdtemp(prefix="samestyle-bench-clicks-"))
    raw_seconds: list[float] = []
    pairs_seconds: list[float] = []
    runs: list[dict[str, Any]] = []
    with EmbeddedBroker(log_path=tmp / "broker.log") as broker:
        blocks = [Block(broker.bootstrap, args, tmp) for _ in range(args.rounds)]
        span = None
        for block in blocks:  # every topic exists, and every click is in, before any worker starts
            create_topics(broker.bootstrap, block.specs.values())
            produced = time.monotonic()
            span = asyncio.run(_produce(block, simulated_clicks(args.events, args.products, tmp)))
            print(f"produced {args.events:,} clicks in {time.monotonic() - produced:.0f} s", file=sys.stderr)

        def raw(block: Block) -> None:
            spec = block.specs[CLICK_EVENTS]
            seconds = asyncio.run(raw_consume(broker.bootstrap, spec.name, spec.partitions, args.events,
                                              args.raw_repeats))
            raw_seconds.append(seconds / args.raw_repeats)
            print(f"raw run {len(raw_seconds)}: {args.events * args.raw_repeats / seconds:,.0f} events/s",
                  file=sys.stderr)

        for i, block in enumerate(blocks):
            raw(block)
            run = pairs_run(block, args.events, args, args.profile if i == 0 else None)
            runs.append(run)
            pairs_seconds.append(run["seconds"])
            print(f"pairs run {i + 1}: {args.events / run['seconds']:,.0f} events/s "
                  f"(by record timestamps {run['seconds_by_record_timestamps']} s; join {run['join_seconds']:.1f} s)",
                  file=sys.stderr)
        raw(blocks[-1])

    result = clicks_result(args.events, raw_seconds, pairs_seconds)
    by_stamps = [r["seconds_by_record_timestamps"] for r in runs if r["seconds_by_record_timestamps"]]
    result["pairs_agent_events_per_second_by_record_timestamps"] = rounded(pooled_rate(args.events, by_stamps))
    result.update({
        "events": args.events,
        "rounds": args.rounds,
        "raw_repeats": args.raw_repeats,
        "runs": [{k: rounded(v) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
        "forwarded_share": rounded(runs[0]["forwarded_to_click_pairs"] / args.events) if runs else None,
        "encoder": args.encoder,
        "pairs_evidence_ttl_seconds": blocks[0].settings.pairs_evidence_ttl_seconds,
        "event_time_span_days": rounded((span[1] - span[0]) / 86_400_000) if span else None,
        "scrape_interval_seconds": args.scrape_interval,
        "machine": machine_info(),
        "run_dir": str(tmp),
    })
    if args.profile is not None and args.profile.exists():
        result["profile"] = summarize_profile(args.profile, top=20)
        result["profile_path"] = str(args.profile)
    for key, value in list(result.items()):
        if isinstance(value, float):
            result[key] = rounded(value)
        elif isinstance(value, list) and value and isinstance(value[0], float):
            result[key] = [rounded(v) for v in value]
    return finish(result, args, _plot)


if __name__ == "__main__":
    sys.exit(main())
