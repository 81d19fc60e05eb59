"""``samestyle pairs-report``: how good are the mined positive pairs?

Scores mined pairs against a clusters file. Online (default): reads ``positive-pairs`` and
``click-events`` from the beginning (no consumer group) until nothing new arrives for ``--idle``
seconds. Offline (``--simulate-listings``): simulates the clicks in memory and mines them with the
pairs agents' own code and SAMESTYLE_PAIRS_* rules, no broker. Reports precision, recall,
recall_co_clicked and pairs/clicks per second (definitions in docs/INTERNALS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from samestyle.models.data import cluster_pairs, pair_precision_recall, read_clusters, read_listings
from samestyle.streams.dev.simulate import ClickSimulator, add_model_arguments, model_from_args
from samestyle.streams.io.reader import LogReader, every_partition
from samestyle.streams.pairs.mining import PairMiner, PairRules
from samestyle.streams.settings import Settings
from samestyle.topics import CLICK_EVENTS, POSITIVE_PAIRS, codec_for_topic, topic_specs


def score(pairs: Sequence[Mapping[str, Any]], clicks: Iterable[Mapping[str, Any]],
          clusters: Mapping[str, str]) -> dict[str, Any]:
    """Precision / recall of mined pairs (see the module docstring), plus counts."""
    clicked: set[str] = set()
    co_clicked: set[frozenset[str]] = set()
    n_clicks = 0
    for c in clicks:
        n_clicks += 1
        clicked.update((c["trigger_id"], c["clicked_id"]))
        co_clicked.add(frozenset((c["trigger_id"], c["clicked_id"])))
    truth = cluster_pairs(clusters, restrict_to=clicked)
    mined = [(p["listing_id_a"], p["listing_id_b"]) for p in pairs]
    result = pair_precision_recall(mined, truth)
    reachable = {p for p in truth if p in co_clicked}
    result["recall_co_clicked"] = (result["true_positives"] / len(reachable)) if reachable else None
    result["co_clicked_true_pairs"] = len(reachable)
    result["clicks"] = n_clicks
    result["listings_clicked"] = len(clicked)
    result["pairs_emitted"] = len(pairs)
    result["distinct_pairs"] = len({frozenset(m) for m in mined})
    result["category_checked"] = sum(1 for p in pairs if p["category"] is not None)
    result["cosine_checked"] = sum(1 for p in pairs if p["relevance_score"] is not None)
    return result


async def read_topics(settings: Settings, idle: float, timeout: float) -> tuple[list[dict], list[dict], int | None]:
    """(positive pairs, clicks, first click's broker timestamp) read until ``idle`` seconds bring nothing."""
    specs = topic_specs(settings.topic_prefix, settings.partitions)
    pairs: list[dict] = []
    clicks: list[dict] = []
    first_ts: int | None = None
    pair_codec, click_codec = codec_for_topic(POSITIVE_PAIRS), codec_for_topic(CLICK_EVENTS)
    async with LogReader(settings.bootstrap_servers, client_id="samestyle-pairs-report",
                         fetch_max_wait_ms=200, max_message_bytes=settings.max_message_bytes) as reader:
        await reader.assign([p for k in (POSITIVE_PAIRS, CLICK_EVENTS)
                             for p in every_partition(specs[k].name, specs[k].partitions)])
        deadline = time.monotonic() + timeout
        last_new = time.monotonic()
        while time.monotonic() - last_new < idle and time.monotonic() < deadline:
            records = await reader.fetch(timeout=0.5, max_records=50_000)
            if records:
                last_new = time.monotonic()
            for r in records:
                if r.topic == specs[POSITIVE_PAIRS].name:
                    pairs.append(pair_codec.decode(r.value))
                else:
                    clicks.append(click_codec.decode(r.value))
                    first_ts = r.timestamp if first_ts is None else min(first_ts, r.timestamp)
    return pairs, clicks, first_ts


def offline(args: argparse.Namespace, settings: Settings, clusters: dict[str, str]) -> dict[str, Any]:
    records = read_listings(args.simulate_listings)
    sim = ClickSimulator(records, clusters, model_from_args(args), args.seed)
    clicks = list(sim.sessions(args.sessions))
    payloads = {r.listing_id: (None, {"category": r.category}) for r in records}
    miner = PairMiner(PairRules.from_settings(settings), payloads.get)
    started = time.perf_counter()
    for click in clicks:
        miner.feed(click)
    seconds = time.perf_counter() - started
    result = score(miner.emitted, clicks, clusters)
    result.update(mode="offline", seconds=round(seconds, 3),
                  pairs_per_second=round(len(miner.emitted) / seconds, 1) if seconds else None,
                  clicks_per_second=round(len(clicks) / seconds, 1) if seconds else None)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samestyle pairs-report", description=__doc__.split("\n\n")[0])
    p.add_argument("--clusters", type=Path, required=True, help="clusters CSV (ground truth)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--idle", type=float, default=5.0, help="online: stop after this many seconds without news")
    p.add_argument("--timeout", type=float, default=600.0, help="online: stop after this many seconds anyway")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (env SAMESTYLE_BOOTSTRAP)")
    p.add_argument("--topic-prefix", dest="topic_prefix", help="prefix of every topic name")
    p.add_argument("--simulate-listings", type=Path,
                   help="offline: simulate clicks on this listings CSV and mine them in memory (no broker)")
    p.add_argument("--sessions", type=int, default=20_000, help="offline: sessions to simulate")
    p.add_argument("--seed", type=int, default=0, help="offline: simulator seed")
    add_model_arguments(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
    clusters = read_clusters(args.clusters)
    if args.simulate_listings:
        result = offline(args, settings, clusters)
    else:
        pairs, clicks, first_ts = asyncio.run(read_topics(settings, args.idle, args.timeout))
        result = score(pairs, clicks, clusters)
        span = (max(p["emitted_at"] for p in pairs) - first_ts) / 1000 if pairs and first_ts is not None else None
        result.update(mode="online", seconds=span,
                      pairs_per_second=round(len(pairs) / span, 1) if span else None,
                      clicks_per_second=round(len(clicks) / span, 1) if span else None)
    rules = PairRules.from_settings(settings)
    result["rules"] = {k: getattr(rules, k) for k in rules.__dataclass_fields__}
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        for k, v in result.items():
            print(f"{k:24} {v}")
    return 0


__all__ = ["main", "score"]
