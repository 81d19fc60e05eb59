"""A model switch under load: how long it takes, and what the output stream sees meanwhile.

One worker serves ``--encoder`` on a catalogue (``--listings``, first ``--catalogue`` rows); then
a model directory (``--model``) is promoted on ``model-updates`` while the rest of the rows keep
arriving at ``--rate`` per second. Measured: seconds from the promotion to the worker serving the
new model (its ``/health``), catalogue records re-embedded per second, the listing-to-output
latency of listings that arrived before the promotion (baseline, same rate) and during the switch,
and whether any listing went unanswered (the "no gap" promise)::

    samestyle bench switch --listings ../shared/data/abt_buy/full_gt/listings.csv \\
        --model runs/models/abt_buy_gt_infonce --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
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
    setup_logging,
    streaming_stack,
    wait_indexed,
)


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("switch", __doc__.splitlines()[0], plot="unused; accepted for symmetry with other benches")
    p.add_argument("--listings", required=True, help="catalogue CSV in the common form")
    p.add_argument("--model", required=True, help="the model directory to promote")
    p.add_argument("--encoder", default="default", help="the model served before the switch (default: default)")
    p.add_argument("--catalogue", type=int, default=1000, help="rows indexed before the promotion (default 1000)")
    p.add_argument("--during", type=int, default=200, help="rows sent while switching (default 200)")
    p.add_argument("--rate", type=float, default=2.0, help="listings per second offered, before and during (default 2)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--timeout", type=float, default=1800.0, help="give up after this many seconds")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


async def _paced(stack: Stack, producer: Any, records: list[dict[str, Any]], rate: float) -> dict[str, int]:
    topic = stack.specs["listings"].name
    sent: dict[str, int] = {}
    start = time.monotonic()
    futures = []
    for i, record in enumerate(records):
        wait = start + i / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        record = dict(record, event_time=int(time.time() * 1000))
        key, value = encode_listing(record)
        futures.append(await producer.send(topic, key=key, value=value))
        sent[record["listing_id"]] = record["event_time"]
    await asyncio.gather(*futures)
    return sent


def _latencies(sent: dict[str, int], first: dict[str, dict[str, Any]]) -> dict[str, Any]:
    values = [(first[i]["emitted_at"] - t) / 1000.0 for i, t in sent.items() if i in first]
    return {"n": len(values), "p50_seconds": rounded(percentile(values, 50)),
            "p99_seconds": rounded(percentile(values, 99)), "max_seconds": rounded(max(values) if values else None)}


async def _run(stack: Stack, port: int, rows: list[dict[str, Any]], args: argparse.Namespace,
               new_version: str) -> dict[str, Any]:
    from samestyle.streams.io.producer import OutputReader, make_producer, produce_listings, send_records
    from samestyle.topics import LISTINGS, MODEL_UPDATES, codec_for_topic

    catalogue, baseline, during = (rows[:args.catalogue], rows[args.catalogue:args.catalogue + args.during // 2],
                                   rows[args.catalogue + args.during // 2:args.catalogue + args.during])
    async with OutputReader(stack.settings, stack.specs) as reader:
        started = time.monotonic()
        await produce_listings(stack.settings, stack.specs[LISTINGS], catalogue)
        await wait_indexed(stack, reader, {r["listing_id"] for r in catalogue}, timeout=args.timeout)
        catalogue_seconds = time.monotonic() - started
        old_version = json.loads(_get(port, "/health"))["model_version"]
        producer = make_producer(stack.settings)
        await producer.start()
        try:
            base_sent = await _paced(stack, producer, baseline, args.rate)
            base_first = await wait_indexed(stack, reader, set(base_sent), timeout=args.timeout)
            record = {"version": new_version, "model_dir": str(Path(args.model).resolve()), "decision": "PROMOTED",
                      "previous_version": old_version, "metric": "bench", "score": 1.0, "previous_score": 0.0,
                      "pairs_used": 0, "reason": "samestyle bench switch", "created_at": int(time.time() * 1000)}
            await send_records(stack.settings, stack.specs[MODEL_UPDATES].name,
                               [(new_version.encode(), codec_for_topic(MODEL_UPDATES).encode(record))])
            promoted = time.monotonic()
            sending = asyncio.create_task(_paced(stack, producer, during, args.rate))
            switched_after = None
            while time.monotonic() - promoted < args.timeout:
                health = json.loads(_get(port, "/health"))
                if health["model_version"] == new_version:
                    switched_after = time.monotonic() - promoted
                    break
                stack.check()
                await asyncio.sleep(0.5)
            during_sent = await sending
            during_first = await wait_indexed(stack, reader, set(during_sent), timeout=args.timeout)
        finally:
            await producer.stop()
        every = {r["listing_id"] for r in catalogue} | set(base_sent) | set(during_sent)
        answered = {m["listing_id"] for m in reader.outputs.similar}
        versions: dict[str, int] = {}
        for listing_id in during_sent:
            version = during_first[listing_id]["model_version"] if listing_id in during_first else "none"
            versions[version] = versions.get(version, 0) + 1
    metrics = _get(port, "/metrics")
    reembedded = _metric(metrics, "samestyle_reembedded_total")
    health = json.loads(_get(port, "/health"))
    return {
        "old_version": old_version,
        "new_version": new_version,
        "catalogue": len(catalogue),
        "catalogue_index_seconds": rounded(catalogue_seconds),
        "switch_seconds": rounded(switched_after),
        "reembedded": int(reembedded),
        "reembedded_per_second": rounded(reembedded / switched_after if switched_after else None),
        "unanswered": len(every - answered),
        "index_vectors_after": health["index_vectors"],
        "listings_total": len(every),
        "baseline_latency": _latencies(base_sent, base_first),
        "during_switch_latency": _latencies(during_sent, during_first),
        "during_switch_versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from samestyle.models.data import read_listings
    from samestyle.streams.dev.broker import free_port
    from samestyle.streams.io.producer import listing_message

    new_version = json.loads((Path(args.model) / "encoder.json").read_text())["version"]
    rows = [listing_message(r) for r in read_listings(args.listings, limit=args.catalogue + args.during)]
    if len(rows) < args.catalogue + args.during:
        raise SystemExit(f"{args.listings} has {len(rows)} rows; --catalogue + --during needs "
                         f"{args.catalogue + args.during}")
    tmp = Path(tempfile.mkdtemp(prefix="samestyle-switch-"))
    port = free_port()
    with streaming_stack(args.encoder, args.batch_size, run_dir=tmp, web_port=port) as stack:
        result = asyncio.run(_run(stack, port, rows, args, new_version))
    result.update({"listings": args.listings, "model": args.model, "rate": args.rate, "batch_size": args.batch_size,
                   "machine": machine_info(), "run_dir": str(tmp)})
    return finish(result, args, lambda r, path: None)


if __name__ == "__main__":
    sys.exit(main())
