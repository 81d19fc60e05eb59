"""``samestyle demo``: the whole stream on one machine, end to end, with a measured summary.

Starts the embedded broker (unless a bootstrap server is configured), creates the topics, starts
a real worker process, produces the listings, waits until every listing is indexed (its
similar-products message is out) or dead-lettered, and scores the duplicate alerts against the
clusters file when one is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm import tqdm

from samestyle.models.data import cluster_pairs, pair_precision_recall, read_clusters, read_listings
from samestyle.streams.dev.broker import EmbeddedBroker, create_topics, free_port
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.io.producer import OutputReader, Outputs, listing_message, produce_listings
from samestyle.streams.settings import Settings
from samestyle.streams.worker.pipeline import DEFAULT_SUPPLIER
from samestyle.streams.worker.process import WorkerProcess
from samestyle.topics import LISTINGS, topic_specs
from samestyle.topics.errors import BrokerError, ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def broker_for(settings: Settings, run_dir: Path) -> Iterator[Settings]:
    """Yield settings that point at a broker: the configured one, or an embedded tansu."""
    if settings.bootstrap:
        yield settings
        return
    with EmbeddedBroker(log_path=run_dir / "broker.log") as broker:
        yield settings.replace(bootstrap=broker.bootstrap)


def duplicate_truth(clusters: dict[str, str], suppliers: dict[str, str], ids: set[str]) -> set[frozenset[str]]:
    """Pairs a perfect duplicate detector alerts on: same cluster (same product) and same supplier."""
    return {pair for pair in cluster_pairs(clusters, restrict_to=ids)
            if len({suppliers[i] for i in pair}) == 1}


def run_demo(settings: Settings, listings_csv: Path | None = None, clusters_csv: Path | None = None,
             limit: int | None = None, timeout: float = 900.0, progress: bool = True,
             image_mode: str = "uri", serve: Callable[[dict[str, Any], str], None] | None = None) -> dict[str, Any]:
    """Run the demo and return its summary (the ``--json`` object).

    With ``serve``, the worker keeps running once everything is indexed: ``serve(summary, url)``
    is called with the search page's URL, then the demo waits for Ctrl-C (or the worker's exit).
    """
    started = time.monotonic()
    run_dir = Path(tempfile.mkdtemp(prefix="samestyle-demo-"))
    if listings_csv is None:
        listings_csv, clusters_csv = generate_sample(run_dir / "sample")
        log.info("generated a sample catalogue in %s", listings_csv.parent)
    records = read_listings(listings_csv, limit=limit)
    if not records:
        raise ConfigError(f"{listings_csv} has no listings")
    clusters = read_clusters(clusters_csv) if clusters_csv else None
    messages = [listing_message(r, image_mode=image_mode) for r in records]
    suppliers = {r.listing_id: r.supplier_id or DEFAULT_SUPPLIER for r in records}
    wanted = {r.listing_id for r in records}
    order = [r.listing_id for r in records]
    if len(wanted) != len(records):
        raise ConfigError(f"{listings_csv} repeats listing ids: {len(records) - len(wanted)} duplicates")

    settings = settings.replace(state_dir=run_dir / "state")
    if image_mode == "uri" and settings.image_base_dir is None:
        # The demo's worker reads the catalogue it was handed: the folder that holds its images.
        settings = settings.replace(image_base_dir=image_folder(records))
    # The demo's own worker gets a free port: a second demo (or a worker on 6066) must not collide.
    settings = settings.replace(web_port=free_port())
    with broker_for(settings, run_dir) as settings:
        specs = topic_specs(settings.topic_prefix, settings.partitions)
        # With app_id: the Faust tables' changelogs too (BROKER.md trap 2).
        create_topics(settings.bootstrap or "",
                      topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id).values())
        worker = WorkerProcess(settings, run_dir / "worker.log").start()
        try:
            outputs = asyncio.run(_produce_and_collect(settings, specs, messages, wanted, worker, timeout, progress))
            if serve is not None:
                summary = summarize(outputs, wanted, clusters, suppliers, time.monotonic() - started, settings, run_dir,
                                    order)
                serve(summary, f"http://127.0.0.1:{settings.web_port}/")
                _wait_for_interrupt(worker)
                return summary
        finally:
            worker.stop()
    seconds = time.monotonic() - started
    return summarize(outputs, wanted, clusters, suppliers, seconds, settings, run_dir, order)


def image_folder(records: list[Any]) -> Path | None:
    """The deepest folder that holds every image of ``records`` (None without images)."""
    paths = [str(Path(r.image_path).resolve().parent) for r in records if r.image_path]
    return Path(os.path.commonpath(paths)) if paths else None


def _wait_for_interrupt(worker: WorkerProcess) -> None:
    """Block until Ctrl-C; a worker that dies meanwhile ends the wait with its log."""
    try:
        while True:
            worker.check_alive()
            time.sleep(0.5)
    except KeyboardInterrupt:
        log.info("stopping the demo worker")


async def _produce_and_collect(settings: Settings, specs: dict, messages: list[dict], wanted: set[str],
                               worker: WorkerProcess, timeout: float, progress: bool) -> Outputs:
    async with OutputReader(settings, specs) as reader:
        await produce_and_wait(reader, settings, specs, messages, wanted, worker.check_alive, worker.log_path, timeout,
                               progress)
        return reader.outputs


async def produce_and_wait(reader: OutputReader, settings: Settings, specs: dict, messages: list[dict],
                           wanted: set[str], check_alive: Callable[[], None], logs: Path, timeout: float,
                           progress: bool, desc: str = "listings indexed",
                           answered: Callable[[Outputs], set[str]] | None = None) -> None:
    """Produce ``messages`` and read ``reader`` until every listing of ``wanted`` is ``answered``
    (default: indexed, its similar-products message is out, or dead-lettered); ``check_alive``
    raises if a worker died, ``logs`` is where the workers log (named in the timeout's message)."""
    await produce_listings(settings, specs[LISTINGS], messages, progress=progress)

    def settled(o: Outputs) -> int:
        done = answered(o) if answered is not None else o.indexed_ids | o.dead_lettered_ids
        return len(done & wanted)

    deadline = time.monotonic() + timeout
    with tqdm(total=len(wanted), desc=desc, unit="listing", disable=not progress, leave=False) as bar:
        while not await reader.wait_for(lambda o: settled(o) >= len(wanted), timeout=2.0, progress=bar,
                                        measure=settled):
            check_alive()
            if time.monotonic() > deadline:
                raise BrokerError(f"only {settled(reader.outputs)} of {len(wanted)} listings were answered ({desc}) "
                                  f"in {timeout:.0f} s; worker log: {logs}")
    # A listing's alerts are acknowledged before its similar-products message is sent, but the
    # reader fetches each topic on its own: read until a poll brings nothing new.
    while await reader.poll(timeout=0.5):
        pass


def similar_quality(similar: Sequence[dict[str, Any]], clusters: dict[str, str], order: Sequence[str],
                    only: set[str] | None = None) -> dict[str, Any]:
    """How well the similar-products lists find a listing's own product among the listings before it.

    ``order`` is the produce order: a listing can only find a same-product listing produced before
    it (a listing produced again is judged at its last place). ``match_listed``: of the listings
    with such an earlier listing, the fraction whose list holds one (recall@k, k the list's
    length); ``match_first``: of those, the fraction whose first neighbour is one;
    ``recall_at_1``: of all of them, the fraction whose first neighbour is one.
    """
    position = {i: k for k, i in enumerate(order)}  # a listing produced twice: its last time
    first_of: dict[str, int] = {}
    for k, i in enumerate(order):
        first_of.setdefault(clusters.get(i, f"\0{i}"), k)
    eligible = listed = first = 0
    for message in similar:
        i = message["listing_id"]
        product = clusters.get(i)
        if product is None or i not in position or (only is not None and i not in only):
            continue
        if first_of[product] >= position[i]:
            continue  # nothing of its product came before it
        eligible += 1
        hits = [clusters.get(n["listing_id"]) == product for n in message.get("neighbours", [])]
        if any(hits):
            listed += 1
            first += int(hits[0])
    return {"listings": eligible, "match_listed": listed / eligible if eligible else None,
            "match_first": first / listed if listed else None,
            "recall_at_1": first / eligible if eligible else None}


def summarize(outputs: Outputs, wanted: set[str], clusters: dict[str, str] | None, suppliers: dict[str, str],
              seconds: float, settings: Settings, run_dir: Path, order: Sequence[str] = ()) -> dict[str, Any]:
    indexed = outputs.indexed_ids & wanted
    alert_pairs = {frozenset((a["listing_id"], a["duplicate_of"])) for a in outputs.alerts}
    summary: dict[str, Any] = {
        "listings_produced": len(wanted),
        "listings_indexed": len(indexed),
        "similar_products": len(outputs.similar),
        "duplicate_alerts": len(outputs.alerts),
        "duplicate_pairs": len(alert_pairs),
        "dead_letters": len(outputs.dead_letters),
        "alert_precision": None,
        "alert_recall": None,
        "duplicate_threshold": settings.duplicate_threshold,
        "model_version": outputs.similar[0]["model_version"] if outputs.similar else None,
        "seconds": round(seconds, 2),
        "run_dir": str(run_dir),
    }
    if clusters is not None:
        truth = duplicate_truth(clusters, suppliers, indexed)
        scores = pair_precision_recall([tuple(p) for p in alert_pairs], truth)
        summary["alert_precision"] = scores["precision"]
        summary["alert_recall"] = scores["recall"]
        summary["true_duplicate_pairs"] = len(truth)
        if order:
            summary["similar_products_quality"] = similar_quality(outputs.similar, clusters, order)
        held = held_out_clusters(settings.encoder)
        if held:
            # The products the model never trained on: true pairs inside them, and every alert
            # that names one of their listings.
            held_ids = {i for i in indexed if clusters.get(i) in held}
            held_truth = {pair for pair in truth if pair <= held_ids}
            held_alerts = [tuple(pair) for pair in alert_pairs if pair & held_ids]
            held_scores = pair_precision_recall(held_alerts, held_truth)
            summary["held_out"] = {"clusters": len(held), "listings": len(held_ids),
                                   "true_duplicate_pairs": len(held_truth), "alerts": len(held_alerts),
                                   "alert_precision": held_scores["precision"], "alert_recall": held_scores["recall"]}
            if order:
                summary["held_out"]["similar_products_quality"] = similar_quality(outputs.similar, clusters, order,
                                                                                  only=held_ids)
    return summary


def held_out_clusters(encoder: str) -> set[str]:
    """The clusters a trained model directory's manifest says it was not trained on (else none)."""
    manifest = Path(encoder).expanduser() / "manifest.json"
    if not manifest.is_file():
        return set()
    return set(json.loads(manifest.read_text()).get("held_out_clusters") or [])


def format_summary(summary: dict[str, Any]) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.1%}"

    lines = [
        f"listings produced   {summary['listings_produced']:>8}",
        f"listings indexed    {summary['listings_indexed']:>8}",
        f"similar-products    {summary['similar_products']:>8}",
        f"duplicate-alerts    {summary['duplicate_alerts']:>8}  (threshold "
        f"{summary['duplicate_threshold'] if summary['duplicate_threshold'] is not None else 'of the model'})",
        f"dead letters        {summary['dead_letters']:>8}",
        f"alert precision     {pct(summary['alert_precision']):>8}",
        f"alert recall        {pct(summary['alert_recall']):>8}",
    ]
    if summary.get("held_out"):
        held = summary["held_out"]
        lines += [
            f"held-out products   {held['clusters']:>8}  (clusters the model never trained on)",
            f"  alert precision   {pct(held['alert_precision']):>8}",
            f"  alert recall      {pct(held['alert_recall']):>8}",
        ]
    quality = (summary.get("held_out") or {}).get("similar_products_quality") or summary.get("similar_products_quality")
    if quality and quality["listings"]:
        lines.append(f"similar, first hit  {pct(quality['match_first']):>8}  first neighbour of the same product "
                     f"({quality['listings']} listings{', held-out products' if summary.get('held_out') else ''})")
    lines += [
        f"model version       {summary['model_version']}",
        f"seconds             {summary['seconds']:>8}",
        f"logs                {summary['run_dir']}",
    ]
    return "\n".join(lines)


def dumps(summary: dict[str, Any]) -> str:
    return json.dumps(summary, sort_keys=True)
