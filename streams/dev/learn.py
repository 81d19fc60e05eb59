"""``samestyle demo --learn``: the learning loop on one machine, measured on products the clicks never touched.

Stages, each announced on stderr (the long ones with a progress bar):

1. **split**: the products of ``--clusters`` (clusters of two listings or more) are shuffled
   (seeded). ``holdout_fraction`` of them get no clicks: half of those are the trainer's valid set
   (its promotion decision), the other half are only measured, before and after. Every other
   listing can be clicked.
2. **index**: the embedded broker, every topic (the pairs tables' changelogs too), ``workers``
   worker processes (each one runs the pairs agents) and the whole catalogue in.
3. **before**: the measured listings are sent again; the similar-products list the served model
   gives each of them (every other listing is in the index by then) is scored: recall@1 and
   recall@k (k = ``SAMESTYLE_TOP_K``).
4. **clicks**: simulated sessions on the clickable listings (:class:`ClickSimulator`) go to
   ``click-events``; the workers' pairs agents mine them until their consumer group has committed
   every ``click-events`` and ``click-pairs`` record.
5. **trainer**: ``samestyle trainer --once`` as a child process trains one candidate on the mined
   pairs, scores it and the serving model on the valid products and records PROMOTED or REJECTED
   on ``model-updates``.
6. **switch**: the workers follow ``model-updates`` and re-embed the catalogue with the promoted
   model (blue/green). Listings keep arriving meanwhile (clickable listings sent again), and each
   one must be answered, by either model.
7. **after**: the measured listings once more, now answered by the promoted model.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import random
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

from samestyle.models.data import ListingRecord, read_clusters, read_listings
from samestyle.streams.dev.broker import create_topics, die_with_parent, free_port
from samestyle.streams.dev.demo import broker_for, image_folder, produce_and_wait, similar_quality, summarize
from samestyle.streams.dev.pairs_report import score as score_pairs
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.dev.simulate import ClickModel, ClickSimulator, produce_clicks
from samestyle.streams.io.producer import OutputReader, Outputs, listing_message, produce_listings
from samestyle.streams.io.reader import LogReader, Partition, every_partition
from samestyle.streams.pairs.agents import consumer_group
from samestyle.streams.settings import Settings
from samestyle.streams.worker.pipeline import DEFAULT_SUPPLIER, now_ms
from samestyle.streams.worker.process import WorkerProcess
from samestyle.topics import CLICK_EVENTS, CLICK_PAIRS, LISTINGS, POSITIVE_PAIRS, codec_for_topic, topic_specs
from samestyle.topics.errors import BrokerError, ConfigError

#: Simulated sessions per clickable listing when ``sessions`` is not given: on Abt-Buy, 4 mine the
#: pair of about 70 % of the clicked products (10 mine nearly all of them, and the candidate then
#: trains twice as long: docs/RETRAIN.md).
SESSIONS_PER_LISTING = 4
#: Below these a run cannot say anything: products with clicks, and products in each held-out half.
MIN_CLICKED_PRODUCTS = 40
MIN_HELD_OUT_PRODUCTS = 10
#: Fewest distinct mined pairs the trainer is started on.
MIN_PAIRS = 10
#: During the switch: listings sent again per tick, and the tick.
LISTINGS_PER_TICK = 1
TICK_SECONDS = 0.5
STAGES = ("split", "index", "before", "clicks", "trainer", "switch", "after")
ABT_BUY_EXAMPLE = ("--listings ../shared/data/abt_buy/full_gt/listings.csv "
                   "--clusters ../shared/data/abt_buy/full_gt/clusters.csv")


@dataclass(frozen=True)
class LearnConfig:
    """The choices of one ``demo --learn`` run; the CLI maps its flags onto this."""

    #: Products kept out of the clicks: half the trainer's valid set, half measured before/after.
    holdout_fraction: float = 0.5
    #: Click sessions to simulate (None: ``SESSIONS_PER_LISTING`` per clickable listing).
    sessions: int | None = None
    workers: int = 2
    #: The trainer's candidate (``samestyle trainer --epochs/--batch-size``); text only when the
    #: catalogue has no image. One epoch of 64 fits in the 10 minutes on Abt-Buy (docs/RETRAIN.md).
    epochs: int = 1
    batch_size: int = 64
    #: The candidate's backbones (``samestyle trainer --base``): the bundled ones, or "tiny" (tests).
    base: str = "default"
    seed: int = 0
    #: Longest wait of any one stage, in seconds.
    timeout: float = 900.0

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ConfigError(f"--holdout-fraction must be between 0 and 1, got {self.holdout_fraction}")
        if self.sessions is not None and self.sessions < 1:
            raise ConfigError(f"--sessions must be >= 1, got {self.sessions}")
        if self.workers < 1 or self.epochs < 1 or self.batch_size < 2:
            raise ConfigError("--workers and --epochs must be >= 1, --train-batch-size >= 2")
        if self.base not in ("default", "tiny"):
            raise ConfigError(f"unknown candidate base {self.base!r}: default or tiny")


@dataclass(frozen=True)
class ProductSplit:
    """Cluster ids: the products with clicks, the trainer's valid products, the measured products."""

    clicked: frozenset[str]
    valid: frozenset[str]
    held_out: frozenset[str]


def split_products(clusters: Mapping[str, str], ids: Iterable[str], holdout_fraction: float,
                   seed: int) -> ProductSplit:
    """Shuffle the products with two listings or more among ``ids`` (seeded) and cut them:
    ``holdout_fraction`` held out of the clicks (the first half valid, the rest measured), the others clicked."""
    sizes = Counter(clusters[i] for i in ids if i in clusters)
    products = sorted(c for c, n in sizes.items() if n >= 2)
    random.Random(seed).shuffle(products)
    n = round(holdout_fraction * len(products))
    return ProductSplit(clicked=frozenset(products[n:]), valid=frozenset(products[: n // 2]),
                        held_out=frozenset(products[n // 2 : n]))


def check_learnable(split: ProductSplit, source: str | None) -> None:
    """A clear error when the catalogue is too small to learn from (``source``: its path, None
    for the generated sample)."""
    if len(split.clicked) >= MIN_CLICKED_PRODUCTS and min(len(split.valid), len(split.held_out)) >= MIN_HELD_OUT_PRODUCTS:
        return
    counts = (f"{len(split.clicked)} products with clicks, {len(split.valid)} valid and {len(split.held_out)} "
              f"measured (at least {MIN_CLICKED_PRODUCTS}, {MIN_HELD_OUT_PRODUCTS} and {MIN_HELD_OUT_PRODUCTS} "
              "are needed; a product is a cluster of two listings or more)")
    if source is None:
        raise ConfigError(f"demo --learn: the generated sample is too small to learn from ({counts}); give a "
                          f"real catalogue, e.g. {ABT_BUY_EXAMPLE}")
    raise ConfigError(f"demo --learn: {source} is too small to learn from ({counts}); give a larger catalogue "
                      "or a larger --holdout-fraction")


def write_listings(path: Path, records: Sequence[ListingRecord]) -> Path:
    """A listings CSV that :func:`read_listings` reads back as ``records`` (image paths absolute)."""
    extra = sorted({k for r in records for k in r.attributes})
    columns = ["listing_id", "title", "description", "category", "image_path", "supplier_id", *extra]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for r in records:
            writer.writerow({"listing_id": r.listing_id, "title": r.title, "description": r.description,
                             "category": r.category or "", "image_path": r.image_path or "",
                             "supplier_id": r.supplier_id or "", **r.attributes})
    return path


def write_clusters(path: Path, clusters: Mapping[str, str], products: frozenset[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(["listing_id", "cluster_id"])
        writer.writerows(sorted((i, c) for i, c in clusters.items() if c in products))
    return path


class Stages:
    """Announces each stage on ``out`` and keeps the seconds each one took."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stderr
        self.seconds: dict[str, float] = {}
        self._current: tuple[str, float] | None = None

    def begin(self, name: str, text: str) -> None:
        self.end()
        self._current = (name, time.monotonic())
        self._say(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: {text}")

    def note(self, text: str) -> None:
        self._say(f"      {text}")

    def end(self) -> None:
        if self._current is not None:
            name, started = self._current
            self.seconds[name] = round(time.monotonic() - started, 1)
            self._current = None

    def _say(self, line: str) -> None:
        print(line, file=self.out, flush=True)


def run_learn(settings: Settings, listings_csv: Path | None, clusters_csv: Path | None, config: LearnConfig,
              limit: int | None = None, image_mode: str = "uri", progress: bool = True,
              out: TextIO | None = None) -> dict[str, Any]:
    """Run ``demo --learn`` and return the demo's summary with a ``learn`` section (the ``--json`` object)."""
    started = time.monotonic()
    stages = Stages(out)
    run_dir = Path(tempfile.mkdtemp(prefix="samestyle-learn-"))
    source: str | None = str(listings_csv) if listings_csv is not None else None
    if listings_csv is None:
        listings_csv, clusters_csv = generate_sample(run_dir / "sample")
    elif clusters_csv is None:
        raise ConfigError("demo --learn needs --clusters with --listings: clicks are simulated from the products")
    assert clusters_csv is not None
    records = read_listings(listings_csv, limit=limit)
    if not records:
        raise ConfigError(f"{listings_csv} has no listings")
    if len({r.listing_id for r in records}) != len(records):
        raise ConfigError(f"{listings_csv} repeats listing ids")
    clusters = read_clusters(clusters_csv)
    split = split_products(clusters, [r.listing_id for r in records], config.holdout_fraction, config.seed)
    check_learnable(split, source)

    stages.begin("split", f"{len(records)} listings of {listings_csv}")
    kept_out = split.valid | split.held_out
    clickable = [r for r in records if clusters.get(r.listing_id) not in kept_out]
    files = run_dir / "learn"
    trainer_files = {
        # The trainer trains on the clickable listings only, and decides on the valid products
        # alone: the measured products are never read before the "after" stage.
        "listings": write_listings(files / "clickable_listings.csv", clickable),
        "valid_listings": write_listings(files / "valid_listings.csv",
                                         [r for r in records if clusters.get(r.listing_id) in split.valid]),
        "valid_clusters": write_clusters(files / "valid_clusters.csv", clusters, split.valid),
    }
    write_clusters(files / "measured_clusters.csv", clusters, split.held_out)
    stages.note(f"{len(split.clicked) + len(kept_out)} products: {len(split.clicked)} get clicks, "
                f"{len(split.valid)} are the trainer's valid set, {len(split.held_out)} are measured "
                f"(files in {files})")

    settings = settings.replace(state_dir=run_dir / "state")
    if image_mode == "uri" and settings.image_base_dir is None:
        settings = settings.replace(image_base_dir=image_folder(records))
    if settings.torch_threads is None and config.workers > 1:
        # Workers on one machine share its cores: one torch pool each of the whole machine would
        # oversubscribe it while they embed side by side.
        settings = settings.replace(torch_threads=max(1, (os.cpu_count() or 1) // config.workers))
    with broker_for(settings, run_dir) as settings:
        create_topics(settings.bootstrap or "",
                      topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id).values())
        workers = [WorkerProcess(settings.replace(worker_id=f"demo-w{k}", web_port=free_port(),
                                                  state_dir=run_dir / f"state-w{k}"),
                                 run_dir / f"worker-{k}.log") for k in range(1, config.workers + 1)]
        stages.begin("index", f"{len(records)} listings to {len(workers)} workers (each runs the pairs agents; "
                              f"logs in {run_dir})")
        for w in workers:
            w.start()
        try:
            # The candidate's name: the catalogue's last two folders (abt_buy-full_gt).
            name = "-".join(part for part in Path(listings_csv).absolute().parent.parts[-2:] if part != "/")
            loop = LearnLoop(settings, config, records, clusters, split, clickable, trainer_files, workers, run_dir,
                             stages, image_mode, progress, name)
            summary = asyncio.run(loop.run())
        finally:
            for w in workers:
                w.stop()
    stages.end()
    summary["learn"]["stage_seconds"] = stages.seconds
    summary["seconds"] = round(time.monotonic() - started, 2)
    return summary


class LearnLoop:
    """Stages 2-7 on one event loop, with one reader of the output topics from start to end."""

    def __init__(self, settings: Settings, config: LearnConfig, records: list[ListingRecord],
                 clusters: dict[str, str], split: ProductSplit, clickable: list[ListingRecord],
                 trainer_files: dict[str, Path], workers: list[WorkerProcess], run_dir: Path, stages: Stages,
                 image_mode: str, progress: bool, name: str) -> None:
        self.settings, self.config = settings, config
        self.records, self.clusters, self.split, self.clickable = records, clusters, split, clickable
        self.trainer_files, self.workers, self.run_dir, self.stages = trainer_files, workers, run_dir, stages
        self.image_mode, self.progress, self.name = image_mode, progress, name
        self.specs = topic_specs(settings.topic_prefix, settings.partitions)
        self.order = [r.listing_id for r in records]
        self.reader: OutputReader  # open for the whole of run()

    def check_alive(self) -> None:
        for w in self.workers:
            w.check_alive()

    async def run(self) -> dict[str, Any]:
        settings, stages, config = self.settings, self.stages, self.config
        async with OutputReader(settings, self.specs) as reader:
            self.reader = reader
            started = time.monotonic()
            wanted = set(self.order)
            messages = [listing_message(r, image_mode=self.image_mode) for r in self.records]
            await produce_and_wait(reader, settings, self.specs, messages, wanted, self.check_alive, self.run_dir,
                                   config.timeout, self.progress)
            suppliers = {r.listing_id: r.supplier_id or DEFAULT_SUPPLIER for r in self.records}
            summary = summarize(reader.outputs, wanted, self.clusters, suppliers, time.monotonic() - started, settings,
                                self.run_dir, self.order)
            indexed = reader.outputs.indexed_ids & wanted
            stages.note(f"{len(indexed)} indexed by {summary['model_version']}, {summary['duplicate_alerts']} "
                        f"duplicate alerts, {summary['dead_letters']} dead letters")

            measured = [r for r in self.records
                        if self.clusters.get(r.listing_id) in self.split.held_out and r.listing_id in indexed]
            stages.begin("before", f"{len(measured)} listings of the measured products sent again")
            before = await self.probe(measured, "answered (before)")
            stages.note(_quality_line(before))

            learn: dict[str, Any] = {"products": {"clicked": len(self.split.clicked), "valid": len(self.split.valid),
                                                  "measured": len(self.split.held_out)},
                                     "workers": len(self.workers), "before": before, "after": None, "switch": None}
            learn["clicks"], learn["pairs"] = await self.clicks()
            record = await self.train()
            learn["trainer"] = record
            if record["decision"] == "PROMOTED":
                learn["switch"] = await self.switch(record["version"], record["created_at"], indexed)
                stages.begin("after", f"{len(measured)} listings of the measured products sent again")
                learn["after"] = after = await self.probe(measured, "answered (after)")
                stages.note(_quality_line(after))
            else:
                stages.note("nothing promoted: the workers keep their model, no switch and no after")
        summary["learn"] = learn
        return summary

    async def probe(self, listings: Sequence[ListingRecord], desc: str) -> dict[str, Any]:
        """Send ``listings`` again and score the similar-products lists they get (every other
        listing of their products is indexed by now)."""
        marker = now_ms()  # the event time of this round's messages: their answers carry it
        ids = {r.listing_id for r in listings}

        def answered(o: Outputs) -> set[str]:
            return {m["listing_id"] for m in o.similar if m["event_time"] == marker}

        messages = [listing_message(r, image_mode=self.image_mode, event_time=marker) for r in listings]
        await produce_and_wait(self.reader, self.settings, self.specs, messages, ids, self.check_alive, self.run_dir,
                               self.config.timeout, self.progress, desc=desc, answered=answered)
        first: dict[str, dict[str, Any]] = {}
        for m in self.reader.outputs.similar:
            if m["event_time"] == marker and m["listing_id"] in ids:
                first.setdefault(m["listing_id"], m)  # at least once: a redelivered answer counts once
        # The round comes after the whole catalogue: every other listing of a product is before it.
        quality = similar_quality(list(first.values()), self.clusters, self.order + sorted(ids), only=ids)
        versions = Counter(m["model_version"] for m in first.values())
        return {"model_version": versions.most_common(1)[0][0] if versions else None, "versions": dict(versions),
                "listings": quality["listings"], "k": self.settings.top_k, "recall_at_1": quality["recall_at_1"],
                "recall_at_k": quality["match_listed"]}

    async def clicks(self) -> tuple[dict[str, Any], dict[str, Any]]:
        config, stages = self.config, self.stages
        sessions = config.sessions or SESSIONS_PER_LISTING * len(self.clickable)
        simulator = ClickSimulator(self.clickable, self.clusters, ClickModel(), config.seed)
        clicks = list(simulator.sessions(sessions))
        stages.begin("clicks", f"{sessions} simulated sessions ({len(clicks)} clicks) on {len(self.clickable)} "
                               "clickable listings")
        await produce_clicks(self.settings, clicks, progress=self.progress)
        await self.wait_mined(len(clicks))
        pairs = await self.positive_pairs()
        scores = score_pairs(pairs, clicks, self.clusters)
        stages.note(f"{scores['distinct_pairs']} positive pairs mined by the workers' pairs agents, precision "
                    f"{_fmt(scores['precision'])}, recall {_fmt(scores['recall'])} (against the clicked listings' "
                    "clusters)")
        if scores["distinct_pairs"] < MIN_PAIRS:
            raise ConfigError(f"only {scores['distinct_pairs']} positive pairs were mined from {len(clicks)} clicks "
                              f"(at least {MIN_PAIRS} are needed): raise --sessions")
        return ({"sessions": sessions, "clicks": len(clicks)},
                {k: scores[k] for k in ("distinct_pairs", "precision", "recall", "true_positives")})

    async def wait_mined(self, clicks: int) -> None:
        """Until the pairs agents' consumer group has committed every record of ``click-events``
        (all ``clicks`` of them) and of ``click-pairs``: every click through both stages."""
        from aiokafka import TopicPartition
        from aiokafka.admin import AIOKafkaAdminClient

        source = self.specs[CLICK_EVENTS]
        partitions = every_partition(source.name, source.partitions) + every_partition(
            self.specs[CLICK_PAIRS].name, self.specs[CLICK_PAIRS].partitions)
        group = consumer_group(self.settings)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.settings.bootstrap_servers, client_id="samestyle-demo")
        await admin.start()
        # Read only for the high-water marks that fetch responses carry (BROKER.md trap 1).
        ends = LogReader(",".join(self.settings.bootstrap_servers), client_id="samestyle-demo-ends",
                         max_message_bytes=self.settings.max_message_bytes)
        deadline = time.monotonic() + self.config.timeout
        try:
            await ends.start()
            await ends.assign(partitions)
            caught_up = 0
            with tqdm(total=clicks, desc="clicks through the pairs agents", unit="click",
                      disable=not self.progress, leave=False) as bar:
                while True:
                    # Commits first, ends second: a click committed on click-events had its
                    # click-pairs record acknowledged before, so that end counts it.
                    committed = await admin.list_consumer_group_offsets(
                        group, partitions=[TopicPartition(t, p) for t, p in partitions])
                    await ends.fetch(timeout=0.2, max_records=100_000)
                    done = {(tp.topic, tp.partition): max(0, meta.offset) for tp, meta in committed.items()}
                    bar.n = min(clicks, sum(done.get(p, 0) for p in partitions if p[0] == source.name))
                    bar.refresh()
                    # Twice in a row: an end read from a fetch answered a moment before is not stale then.
                    caught_up = caught_up + 1 if _caught_up(partitions, ends.highwaters(), done, source.name,
                                                            clicks) else 0
                    if caught_up == 2:
                        return
                    self.check_alive()
                    if time.monotonic() > deadline:
                        raise BrokerError(f"the pairs agents did not get through {clicks} clicks in "
                                          f"{self.config.timeout:.0f} s; worker logs in {self.run_dir}")
                    await asyncio.sleep(0.5)
        finally:
            await ends.stop()
            await admin.close()

    async def positive_pairs(self) -> list[dict[str, Any]]:
        spec = self.specs[POSITIVE_PAIRS]
        codec = codec_for_topic(POSITIVE_PAIRS)
        async with LogReader(",".join(self.settings.bootstrap_servers), client_id="samestyle-demo-pairs",
                             max_message_bytes=self.settings.max_message_bytes) as reader:
            await reader.assign(every_partition(spec.name, spec.partitions))
            return [codec.decode(r.value) for r in await reader.read_to_end(self.config.timeout)]

    async def train(self) -> dict[str, Any]:
        """``samestyle trainer --once`` as a child process; returns its decision record."""
        argv = trainer_argv(self.settings, self.config, self.trainer_files, self.run_dir, self.name,
                            images=any(r.image_path for r in self.clickable))
        self.stages.begin("trainer", "samestyle trainer --once: a candidate on the mined pairs, judged on the "
                                     f"{len(self.split.valid)} valid products")
        env = dict(os.environ, **self.settings.to_env())
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        decision_file = self.run_dir / "trainer.json"
        log_path = self.run_dir / "trainer.log"
        # With progress on, the trainer's log lines and bars go to this terminal; else to its log.
        with decision_file.open("wb") as stdout, log_path.open("ab") as log:
            proc = await asyncio.create_subprocess_exec(*argv, env=env, stdout=stdout,
                                                        stderr=None if self.progress else log,
                                                        preexec_fn=die_with_parent)
            deadline = time.monotonic() + self.config.timeout
            try:
                while True:
                    try:
                        code = await asyncio.wait_for(proc.wait(), timeout=2.0)
                        break
                    except asyncio.TimeoutError:
                        self.check_alive()
                        if time.monotonic() > deadline:
                            raise BrokerError(f"the trainer did not decide in {self.config.timeout:.0f} s") from None
            finally:
                if proc.returncode is None:  # a worker died, the deadline passed, or Ctrl-C
                    proc.kill()
                    await proc.wait()
        where = "its output above" if self.progress else str(log_path)
        if code != 0:
            raise BrokerError(f"samestyle trainer exited with code {code}; see {where}")
        lines = decision_file.read_text().strip().splitlines()
        record = json.loads(lines[-1]) if lines else None
        if not record:
            raise BrokerError(f"samestyle trainer made no decision; see {where}")
        self.stages.note(f"{record['decision']} {record['version']} ({record['pairs_used']} pairs): "
                         f"{record['reason']}")
        return record

    async def switch(self, version: str, decided_at_ms: int, indexed: set[str]) -> dict[str, Any]:
        """Wait until every worker serves ``version`` (decided at ``decided_at_ms``: the workers
        start on it then), sending clickable listings again meanwhile; then wait until each of
        those got its similar-products message."""
        self.stages.begin("switch", f"{len(self.workers)} workers re-embed the catalogue with {version}; listings "
                                    "keep arriving meanwhile")
        deadline = time.monotonic() + self.config.timeout
        arriving = [r for r in self.clickable if r.listing_id in indexed]
        random.Random(self.config.seed).shuffle(arriving)
        pending = iter(arriving)
        sent: dict[str, int] = {}  # listing id -> the event time it was sent again with

        def batch() -> list[dict[str, Any]]:
            t = now_ms()
            out = []
            for r in (r for _, r in zip(range(LISTINGS_PER_TICK), pending)):
                sent[r.listing_id] = t
                out.append(listing_message(r, image_mode=self.image_mode, event_time=t))
            return out

        def answered(o: Outputs) -> set[str]:
            return {m["listing_id"] for m in o.similar if sent.get(m["listing_id"]) == m["event_time"]}

        with tqdm(total=len(self.workers), desc="workers serving the new model", unit="worker",
                  disable=not self.progress, leave=False) as bar:
            while True:
                states = await asyncio.gather(*(asyncio.to_thread(worker_health, w.settings.web_port)
                                                for w in self.workers))
                serving = sum(s.get("model_version") == version and not s.get("switching_to") for s in states)
                bar.n = serving
                bar.set_postfix_str(", ".join(str(s.get("switch_state", "?")) for s in states))
                if serving == len(self.workers):
                    break
                self.check_alive()
                if time.monotonic() > deadline:
                    raise BrokerError(f"{len(self.workers) - serving} workers did not switch to {version} in "
                                      f"{self.config.timeout:.0f} s; worker logs in {self.run_dir}")
                messages = batch()
                if messages:
                    await produce_listings(self.settings, self.specs[LISTINGS], messages)
                await self.reader.poll(timeout=TICK_SECONDS)
        seconds = round(max(0, now_ms() - decided_at_ms) / 1000, 1)
        # One more batch once every worker switched, then every listing sent meanwhile must be answered.
        last = batch()
        await produce_and_wait(self.reader, self.settings, self.specs, last, set(sent), self.check_alive,
                               self.run_dir, self.config.timeout, self.progress, desc="answered (during the switch)",
                               answered=answered)
        versions = Counter(m["model_version"] for m in self.reader.outputs.similar
                           if sent.get(m["listing_id"]) == m["event_time"])
        got = answered(self.reader.outputs)
        result = {"seconds_after_decision": seconds, "listings_sent": len(sent), "listings_answered": len(got),
                  "answers_by_version": dict(versions)}
        self.stages.note(f"every worker serves {version} {seconds:.0f} s after the decision; {len(got)} of "
                         f"{len(sent)} listings sent meanwhile were answered "
                         f"({', '.join(f'{n} by {v}' for v, n in versions.items())})")
        return result


def _caught_up(partitions: Sequence[Partition], highwaters: Mapping[Partition, int | None],
               committed: Mapping[Partition, int], source: str, events: int) -> bool:
    """Every partition committed up to its high-water mark, and ``source`` holds all ``events``."""
    if any(highwaters.get(p) is None or committed.get(p, 0) < highwaters[p] for p in partitions):  # type: ignore[operator]
        return False
    return sum(highwaters[p] or 0 for p in partitions if p[0] == source) >= events


def trainer_argv(settings: Settings, config: LearnConfig, files: Mapping[str, Path], run_dir: Path, name: str,
                 images: bool) -> list[str]:
    """The ``samestyle trainer --once`` command line of the run: one candidate on every mined pair,
    compared with the workers' encoder (nothing was promoted before)."""
    argv = [sys.executable, "-m", "samestyle.streams.cli.main", "trainer", "--once", "--json",
            "--listings", str(files["listings"]), "--valid-clusters", str(files["valid_clusters"]),
            "--valid-listings", str(files["valid_listings"]), "--work-dir", str(run_dir / "trainer"),
            "--models-dir", str(run_dir / "models"), "--min-new-pairs", "1", "--current", settings.encoder,
            "--base", config.base, "--name", name, "--epochs", str(config.epochs),
            "--batch-size", str(config.batch_size), "--seed", str(config.seed)]
    if not images:
        argv.append("--no-images")
    return argv


def worker_health(port: int) -> dict[str, Any]:
    """A worker's /health (its body on a 503 too); empty while it does not answer."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as exc:
        try:
            return dict(json.loads(exc.read()))
        except ValueError:
            return {}
    except (OSError, ValueError):
        return {}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _quality_line(quality: Mapping[str, Any]) -> str:
    return (f"{quality['model_version']}: recall@1 {_fmt(quality['recall_at_1'])}, recall@{quality['k']} "
            f"{_fmt(quality['recall_at_k'])} ({quality['listings']} listings)")


def format_learn(learn: Mapping[str, Any]) -> str:
    """The learn section of the demo's table: what was mined and decided, and before/after."""
    trainer, before, after = learn["trainer"], learn["before"], learn["after"]
    pairs = learn["pairs"]
    lines = [
        (f"products            {learn['products']['clicked']:>8} clicked, {learn['products']['valid']} valid, "
         f"{learn['products']['measured']} measured (no clicks)"),
        f"clicks              {learn['clicks']['clicks']:>8}  ({learn['clicks']['sessions']} sessions)",
        (f"pairs mined         {pairs['distinct_pairs']:>8}  (precision {_fmt(pairs['precision'])}, "
         f"recall {_fmt(pairs['recall'])})"),
        f"trainer             {trainer['decision']:>8}  {trainer['version']}: {trainer['reason']}",
    ]
    if learn["switch"]:
        s = learn["switch"]
        lines.append(f"switch              {s['seconds_after_decision']:>7.0f}s  after the decision; "
                     f"{s['listings_answered']} of {s['listings_sent']} listings sent meanwhile answered")
    k = before["k"]
    lines.append(f"measured products   {'R@1':>8} {f'R@{k}':>7}  model")
    for name, q in (("before", before), ("after", after)):
        if q is not None:
            lines.append(f"  {name:<17} {_fmt(q['recall_at_1']):>8} {_fmt(q['recall_at_k']):>7}  {q['model_version']}")
    if after is not None and before["recall_at_1"] is not None and after["recall_at_1"] is not None:
        lines.append(f"  {'change':<17} {after['recall_at_1'] - before['recall_at_1']:>+8.3f} "
                     f"{after['recall_at_k'] - before['recall_at_k']:>+7.3f}")
    return "\n".join(lines)


__all__ = ["LearnConfig", "ProductSplit", "check_learnable", "format_learn", "run_learn", "split_products"]
