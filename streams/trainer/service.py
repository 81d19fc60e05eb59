"""``samestyle trainer``: continuous retraining from mined positive pairs.

    samestyle trainer --listings L.csv (--valid-pairs V.csv | --valid-clusters C.csv)
                      [--work-dir DIR] [--models-dir DIR] [--min-new-pairs N] [--once]

Each cycle trains a candidate on the newest mined pairs (a window of ``--max-pairs``, default
``SAMESTYLE_TRAINER_MAX_PAIRS``; the valid set decides promotion only) and produces PROMOTED
(strictly better) or REJECTED to ``model-updates``, at least once.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from samestyle.streams.io.reader import LogReader, every_partition
from samestyle.streams.settings import Settings
from samestyle.topics import MODEL_UPDATES, POSITIVE_PAIRS, TopicSpec, codec_for_topic, topic_specs
from samestyle.topics.codec import use_schema_dir
from samestyle.topics.errors import ConfigError

log = logging.getLogger("samestyle.trainer")

STATE_FILE = "state.json"
PROMOTED, REJECTED = "PROMOTED", "REJECTED"
#: Metric names as they appear in ModelUpdate.metric.
METRIC_PAIRS, METRIC_CLUSTERS = "valid_f1", "recall_at_1"

Pair = tuple[str, str]


# --- pure logic (unit-tested without a broker or a model) -------------------------------------


def pair_of(record: Mapping[str, Any]) -> Pair:
    """The unordered pair of a ``positive-pairs`` record, as a sorted tuple."""
    a, b = record["listing_id_a"], record["listing_id_b"]
    return (a, b) if a <= b else (b, a)


@dataclass
class TrainerState:
    """What survives a restart: next offset per partition, the window of mined pairs, the last candidate."""

    offsets: dict[int, int] = field(default_factory=dict)
    #: The newest distinct mined pairs, in the order first seen (the order of the pairs CSV): at
    #: most ``max_pairs``, the oldest go first.
    pairs: dict[Pair, None] = field(default_factory=dict)
    #: Distinct pairs seen when the last candidate was trained (0: none yet), on ``pairs_seen``'s scale.
    pairs_at_last_candidate: int = 0
    candidates: int = 0
    #: Distinct pairs added since the state began: keeps growing when the window is full (a pair
    #: that left the window and comes back counts again).
    pairs_seen: int = 0
    #: The window's size (None: every pair). Configuration, not state: not saved.
    max_pairs: int | None = field(default=None, compare=False)

    def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Add mined pairs, each unordered pair once (while in the window); returns how many were new."""
        new = 0
        for record in records:
            pair = pair_of(record)
            if pair not in self.pairs:
                self.pairs[pair] = None
                new += 1
        self.pairs_seen += new
        if self.max_pairs is not None and len(self.pairs) > self.max_pairs:
            for pair in list(itertools.islice(self.pairs, len(self.pairs) - self.max_pairs)):
                del self.pairs[pair]
        return new

    @property
    def new_pairs(self) -> int:
        return self.pairs_seen - self.pairs_at_last_candidate

    def to_json(self) -> dict[str, Any]:
        return {"offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "pairs": [list(p) for p in self.pairs],
                "pairs_at_last_candidate": self.pairs_at_last_candidate,
                "candidates": self.candidates,
                "pairs_seen": self.pairs_seen}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], max_pairs: int | None = None) -> "TrainerState":
        pairs = {(str(a), str(b)): None for a, b in data.get("pairs", [])}
        state = cls(offsets={int(p): int(o) for p, o in data.get("offsets", {}).items()},
                    pairs=pairs, pairs_at_last_candidate=int(data.get("pairs_at_last_candidate", 0)),
                    candidates=int(data.get("candidates", 0)),
                    pairs_seen=int(data.get("pairs_seen", len(pairs))), max_pairs=max_pairs)
        state.add(())  # a smaller window than the file's: trimmed now
        return state

    @classmethod
    def load(cls, path: Path, max_pairs: int | None = None) -> "TrainerState":
        if not path.is_file():
            return cls(max_pairs=max_pairs)
        try:
            return cls.from_json(json.loads(path.read_text()), max_pairs)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"{path} is not a trainer state file ({exc}); move it away to start over") from None

    def save(self, path: Path) -> None:
        """Atomic: a crash leaves the old file or the new one, never half of one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".state-", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.to_json(), fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


def should_train(state: TrainerState, min_new_pairs: int) -> bool:
    """A candidate is due when at least ``min_new_pairs`` pairs arrived since the last one."""
    return len(state.pairs) > 0 and state.new_pairs >= min_new_pairs


def decide(metric: str, score: float, previous_score: float, previous_version: str | None) -> tuple[str, str]:
    """``(decision, reason)``: PROMOTED only when the candidate is strictly better; a tie keeps
    the current model (a swap re-embeds the whole catalogue, so it must buy something)."""
    versus = f"{metric} {score:.4f} vs {previous_score:.4f} of {previous_version or 'the current model'}"
    if score > previous_score:
        return PROMOTED, f"better: {versus} (+{score - previous_score:.4f})"
    if score == previous_score:
        return REJECTED, f"not better (tie): {versus}"
    return REJECTED, f"worse: {versus} ({score - previous_score:.4f})"


def current_model(updates: Sequence[Mapping[str, Any]], fallback: str) -> tuple[str, str | None]:
    """``(spec, version)`` of the serving model: the newest PROMOTED record's directory, else
    ``fallback`` (an encoder spec, version unknown until it is loaded)."""
    for record in reversed(updates):
        if record["decision"] == PROMOTED:
            return record["model_dir"], record["version"]
    return fallback, None


def last_pairs_used(updates: Sequence[Mapping[str, Any]]) -> int:
    """Pairs the newest decision (either kind) was trained on; 0 when there is none."""
    return int(updates[-1]["pairs_used"]) if updates else 0


def write_pairs_csv(path: Path, pairs: Iterable[Pair]) -> int:
    """The pairs file ``samestyle train --pairs`` reads: every mined pair, label 1."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["listing_id_a", "listing_id_b", "label"])
        for a, b in pairs:
            writer.writerow([a, b, 1])
            n += 1
    return n


def update_record(version: str, model_dir: Path, decision: str, previous_version: str | None, metric: str,
                  score: float, previous_score: float, pairs_used: int, reason: str,
                  created_at: int | None = None) -> dict[str, Any]:
    """A ``model-updates`` record (topics/schemas/model_update.avsc)."""
    return {"version": version, "model_dir": str(model_dir), "decision": decision,
            "previous_version": previous_version, "metric": metric, "score": float(score),
            "previous_score": float(previous_score), "pairs_used": int(pairs_used), "reason": reason,
            "created_at": int(time.time() * 1000) if created_at is None else created_at}


# --- validation ---------------------------------------------------------------------------------


class Validation:
    """One valid set and its metric; ``score(spec)`` loads a model and measures it."""

    def __init__(self, args: argparse.Namespace) -> None:
        from samestyle.models.data import read_listings, read_pairs

        self.args = args
        path = args.valid_listings or args.listings
        self.records = read_listings(path)
        index = {r.listing_id: k for k, r in enumerate(self.records)}
        if args.valid_pairs is not None:
            self.metric = METRIC_PAIRS
            self.pairs = read_pairs(args.valid_pairs)
            missing = sorted({i for a, b, _ in self.pairs for i in (a, b) if i not in index})
            if missing:
                raise ConfigError(f"{args.valid_pairs}: {len(missing)} listings are not in {path} "
                                  f"(e.g. {missing[0]!r}); give --valid-listings")
            if not any(y for _, _, y in self.pairs):
                raise ConfigError(f"{args.valid_pairs} has no positive pair")
            # Only the listings the pairs name need embedding.
            needed = sorted({index[i] for a, b, _ in self.pairs for i in (a, b)})
            self.records = [self.records[k] for k in needed]
            self.clusters = None
        else:
            from samestyle.models.train.evaluate import run_clusters

            self.metric = METRIC_CLUSTERS
            self.pairs = None
            # Queries and gallery as `samestyle eval` picks them (first source -> second, or all
            # against all). model=the work dir, which holds no manifest: no query is filtered as
            # "trained on" (candidates never train on clusters).
            setup = run_clusters(self.records, args.valid_clusters)
            q, g, clusters = setup.q, setup.g, setup.clusters
            if len(q) == 0:
                raise ConfigError(f"{args.valid_clusters}: no query listing has a cluster (with two sources, "
                                  "queries are the first source's listings)")
            # Only queries and gallery need embedding: re-index both into the kept rows.
            keep = np.union1d(q, g)
            self.records = [self.records[k] for k in keep]
            self.q, self.g = np.searchsorted(keep, q), np.searchsorted(keep, g)
            self.same = setup.same  # [Q, G]: a query never finds itself
            self.clusters = clusters[keep]
            log.info("valid clusters: %s, %d queries, %d gallery", setup.info["queries"], len(q), len(g))

    def score(self, spec: str, label: str) -> tuple[float, str]:
        """``(metric value, model version)`` of a model directory or encoder spec."""
        from samestyle.models.train.evaluate import embed_records, load_model
        from samestyle.models.train.metrics import best_threshold, pair_metrics, retrieval_metrics

        args = self.args
        model = load_model(spec, args.device, args.allow_random_weights)
        log.info("embedding %d valid listings with %s (%s)", len(self.records), label, model.version)
        emb = embed_records(model, self.records, with_images=not args.no_images, batch_size=64,
                            progress=args.progress, label=label)[0]
        version = str(model.version)
        del model
        it = emb.image_text  # [n, dim]
        index = {r.listing_id: k for k, r in enumerate(self.records)}
        if self.pairs is not None:
            a = np.array([index[p[0]] for p in self.pairs])
            b = np.array([index[p[1]] for p in self.pairs])
            y = np.array([p[2] for p in self.pairs])
            scores = np.sum(it[a] * it[b], axis=1)
            return float(pair_metrics(scores, y, best_threshold(scores, y))["f1"]), version
        sim = it[self.q] @ it[self.g].T  # [Q, G]
        metrics = retrieval_metrics(sim, self.clusters[self.q], self.clusters[self.g], self.same)
        return float(metrics["recall_at_1"]), version


# --- the candidate ------------------------------------------------------------------------------


def train_candidate(args: argparse.Namespace, pairs: Sequence[Pair], catalogue: set[str]) -> tuple[Path, str, int]:
    """Write the pairs CSV and train a candidate; returns ``(model dir, version, pairs used)``."""
    from samestyle.models.encoder import load_config
    from samestyle.models.train.finetune import TrainConfig, train

    usable = [p for p in pairs if p[0] in catalogue and p[1] in catalogue]
    if len(usable) < len(pairs):
        log.warning("%d of %d mined pairs name listings not in %s: left out", len(pairs) - len(usable),
                    len(pairs), args.listings)
    if len(usable) < 2:
        raise ConfigError(f"only {len(usable)} mined pairs name listings of {args.listings}: nothing to train on")
    pairs_csv = args.work_dir / "pairs" / f"pairs-{len(usable)}.csv"
    write_pairs_csv(pairs_csv, usable)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    # The version (name + time + weights hash) is known only once trained: train into a fresh
    # directory, then rename it to the version.
    staging = Path(tempfile.mkdtemp(prefix=".candidate-", dir=args.models_dir))
    config = TrainConfig(listings=args.listings, out=staging, pairs=pairs_csv, base=args.base, epochs=args.epochs,
                         batch_size=args.batch_size, seed=args.seed, name=args.name, images=not args.no_images,
                         device=args.device, progress=args.progress, overwrite=True,
                         allow_random_weights=args.allow_random_weights)
    log.info("training a candidate on %d mined pairs (%s)", len(usable), pairs_csv)
    started = time.monotonic()
    train(config)
    version = load_config(staging).version
    model_dir = args.models_dir / version
    os.replace(staging, model_dir)
    log.info("candidate %s trained in %.0f s: %s", version, time.monotonic() - started, model_dir)
    return model_dir.resolve(), version, len(usable)


# --- Kafka ----------------------------------------------------------------------------------------


def _reader(settings: Settings) -> LogReader:
    return LogReader(settings.bootstrap_servers, client_id=f"samestyle-trainer-{settings.worker_id}",
                     fetch_max_wait_ms=200, max_message_bytes=settings.max_message_bytes)


async def read_model_updates(settings: Settings, spec: TopicSpec, timeout: float = 60.0) -> list[dict[str, Any]]:
    """Every ``model-updates`` record, oldest first (one partition: the order of decisions)."""
    codec = codec_for_topic(MODEL_UPDATES)
    async with _reader(settings) as reader:
        await reader.assign(every_partition(spec.name, spec.partitions))
        return [codec.decode(r.value) for r in await reader.read_to_end(timeout)]


class PairsReader:
    """Reads ``positive-pairs`` (every partition, manually assigned) from the state's offsets."""

    def __init__(self, settings: Settings, spec: TopicSpec) -> None:
        self.settings, self.spec = settings, spec
        self.codec = codec_for_topic(POSITIVE_PAIRS)
        self.reader: LogReader | None = None

    async def start(self, offsets: Mapping[int, int]) -> None:
        self.reader = await _reader(self.settings).start()
        await self.reader.assign({(self.spec.name, p): offsets.get(p) for p in range(self.spec.partitions)})

    async def catch_up(self, state: TrainerState, timeout: float) -> tuple[int, int]:
        """Read to the end into ``state``; returns (records read, new distinct pairs)."""
        assert self.reader is not None
        records = await self.reader.read_to_end(timeout)
        new = state.add(self.codec.decode(r.value) for r in records)
        for topic, p in self.reader.partitions:
            state.offsets[p] = await self.reader.position((topic, p))
        return len(records), new

    async def stop(self) -> None:
        if self.reader is not None:
            await self.reader.stop()


async def produce_update(settings: Settings, spec: TopicSpec, record: Mapping[str, Any]) -> None:
    from samestyle.streams.io.producer import send_records

    value = codec_for_topic(MODEL_UPDATES).encode(dict(record))
    await send_records(settings, spec.name, [(record["version"].encode(), value)])


# --- the loop -------------------------------------------------------------------------------------


class Trainer:
    """The catalogue, the valid set and the state of one trainer; :meth:`run` is the loop."""

    def __init__(self, args: argparse.Namespace, settings: Settings) -> None:
        from samestyle.models.data import read_listings

        self.args, self.settings = args, settings
        self.specs = topic_specs(settings.topic_prefix, settings.partitions)
        self.catalogue = {r.listing_id for r in read_listings(args.listings)}
        self.validation = Validation(args)
        self.state_path = args.work_dir / STATE_FILE
        self.state = TrainerState.load(self.state_path, max_pairs=args.max_pairs)

    async def run(self) -> dict[str, Any] | None:
        """Consume, and train when due; ``--once``: one catch-up, at most one candidate.
        Returns the last decision made (None when none was)."""
        args, state = self.args, self.state
        updates = await read_model_updates(self.settings, self.specs[MODEL_UPDATES])
        used = last_pairs_used(updates)
        if used > state.pairs_at_last_candidate:
            log.info("the newest decision on %s used %d pairs: counting new pairs from there",
                     self.specs[MODEL_UPDATES].name, used)
            state.pairs_at_last_candidate = used
        reader = PairsReader(self.settings, self.specs[POSITIVE_PAIRS])
        await reader.start(state.offsets)
        last: dict[str, Any] | None = None
        try:
            while True:
                read, new = await reader.catch_up(state, args.read_timeout)
                if read:
                    state.save(self.state_path)
                    log.info("%d records read, %d new pairs; %d pairs in the window (%d seen), %d since the "
                             "last candidate", read, new, len(state.pairs), state.pairs_seen, state.new_pairs)
                if should_train(state, args.min_new_pairs):
                    last = await asyncio.to_thread(self.cycle)
                    if args.once:
                        return last
                elif args.once:
                    if not state.pairs:
                        raise ConfigError(f"no positive pairs on {self.specs[POSITIVE_PAIRS].name}: run the pairs "
                                          "agent on click events first (docs/PAIRS.md)")
                    log.info("%d new pairs since the last candidate, fewer than --min-new-pairs %d: nothing to train",
                             state.new_pairs, args.min_new_pairs)
                    return None
                else:
                    await asyncio.sleep(args.poll_seconds)
        finally:
            await reader.stop()

    def cycle(self) -> dict[str, Any]:
        """Train, evaluate against the current model, decide, record. Runs off the event loop."""
        args, state = self.args, self.state
        model_dir, version, used = train_candidate(args, list(state.pairs), self.catalogue)
        updates = asyncio.run(read_model_updates(self.settings, self.specs[MODEL_UPDATES]))
        current_spec, _ = current_model(updates, args.current or self.settings.encoder)
        score, _ = self.validation.score(str(model_dir), "candidate")
        previous_score, previous_version = self.validation.score(current_spec, "current")
        decision, reason = decide(self.validation.metric, score, previous_score, previous_version)
        record = update_record(version, model_dir, decision, previous_version, self.validation.metric, score,
                               previous_score, used, reason)
        asyncio.run(produce_update(self.settings, self.specs[MODEL_UPDATES], record))
        log.info("%s %s (%d pairs): %s", decision, version, used, reason)
        state.pairs_at_last_candidate = state.pairs_seen
        state.candidates += 1
        state.save(self.state_path)
        return record


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samestyle trainer", description=__doc__.split("\n\n")[0])
    p.add_argument("--listings", required=True, type=Path, help="the catalogue, listings CSV in the common form")
    valid = p.add_mutually_exclusive_group(required=True)
    valid.add_argument("--valid-pairs", type=Path, help="labelled valid pairs: compare F1 at the best threshold")
    valid.add_argument("--valid-clusters", type=Path, help="valid clusters: compare IT->IT recall@1")
    p.add_argument("--valid-listings", type=Path, help="listings the valid set names (default: --listings)")
    p.add_argument("--work-dir", type=Path, default=Path("runs/trainer"),
                   help="state (offsets + mined pairs) and the pairs CSVs (default runs/trainer)")
    p.add_argument("--models-dir", type=Path, default=Path("runs/models"),
                   help="candidates go to DIR/<version> (default runs/models); workers must see the same path")
    p.add_argument("--max-pairs", type=int,
                   help="train on the newest N distinct mined pairs; older ones leave the state "
                        "(default SAMESTYLE_TRAINER_MAX_PAIRS, 100000)")
    p.add_argument("--min-new-pairs", type=int, default=100,
                   help="train a candidate when this many new pairs arrived since the last one (default 100)")
    p.add_argument("--once", action="store_true", help="read what is there, train at most one candidate, exit")
    p.add_argument("--current", help="the current model when none was promoted yet (default: SAMESTYLE_ENCODER)")
    p.add_argument("--json", action="store_true", help="print the decision as one JSON object")
    p.add_argument("--poll-seconds", type=float, default=10.0, help="pause between reads when not --once")
    p.add_argument("--read-timeout", type=float, default=120.0, help="longest a catch-up read may take")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (env SAMESTYLE_BOOTSTRAP)")
    p.add_argument("--topic-prefix", dest="topic_prefix", help="prefix of every topic name")
    t = p.add_argument_group("candidate training (the samestyle train recipe)")
    t.add_argument("--base", default="default", choices=("default", "tiny"), help="backbones: default, tiny (tests)")
    t.add_argument("--name", help="model name (default: the listings' folder name)")
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--no-images", action="store_true", help="text only")
    t.add_argument("--device", default=None, help="cpu, cuda (default: CUDA when available)")
    t.add_argument("--allow-random-weights", action="store_true",
                   help="tests only: tiny random backbones (also SAMESTYLE_ALLOW_RANDOM_WEIGHTS=1)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from samestyle.streams.dev.broker import check_topics

    args = build_parser().parse_args(argv)
    if args.min_new_pairs < 1:
        raise ConfigError("--min-new-pairs must be >= 1")
    settings = Settings.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
    if args.max_pairs is None:
        args.max_pairs = settings.trainer_max_pairs
    elif args.max_pairs < 2:
        raise ConfigError("--max-pairs must be >= 2 (a candidate trains on pairs)")
    if settings.schema_dir is not None:
        use_schema_dir(settings.schema_dir)
    args.allow_random_weights = args.allow_random_weights or settings.allow_random_weights
    args.progress = sys.stderr.isatty()
    for path in (args.listings, args.valid_pairs, args.valid_clusters, args.valid_listings):
        if path is not None and "test" in path.stem.lower():
            raise ConfigError(f"{path}: the trainer never reads a test split (promotion is model selection)")
    bootstrap = ",".join(settings.bootstrap_servers)  # a clear error when none is configured
    trainer = Trainer(args, settings)  # reads the catalogue and the valid set: file errors before any work
    specs = topic_specs(settings.topic_prefix, settings.partitions)
    # Lists topics before describing them: asking metadata of a missing topic would auto-create
    # it with the wrong partition count (BROKER.md trap 2). The message says to run create-topics.
    check_topics(bootstrap, [specs[POSITIVE_PAIRS], specs[MODEL_UPDATES]])
    try:
        record = asyncio.run(trainer.run())
    except KeyboardInterrupt:
        # The state file is saved after every read and every decision: nothing to flush.
        log.info("stopped; %d pairs, %d candidates so far", len(trainer.state.pairs), trainer.state.candidates)
        return 130
    if record is not None:
        print(json.dumps(record, sort_keys=True) if args.json else
              f"{record['decision']} {record['version']} ({record['pairs_used']} pairs): {record['reason']}")
    elif args.json:
        print(json.dumps(None))
    else:
        print(f"no candidate: {trainer.state.new_pairs} new pairs since the last one "
              f"(--min-new-pairs {args.min_new_pairs}); {len(trainer.state.pairs)} pairs in the window")
    return 0


__all__ = ["TrainerState", "Validation", "current_model", "decide", "last_pairs_used", "main", "pair_of",
           "should_train", "update_record", "write_pairs_csv"]
