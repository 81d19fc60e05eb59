"""``samestyle trainer``: continuous retraining from mined positive pairs and moderators' decisions.

    samestyle trainer --listings L.csv (--valid-pairs V.csv | --valid-clusters C.csv)
                      [--work-dir DIR] [--models-dir DIR] [--min-new-pairs N] [--once]
                      [--max-pairs N] [--max-labels N] [--label-weight W]

Each cycle trains a candidate on the newest mined pairs (a window of ``--max-pairs``, default
``SAMESTYLE_TRAINER_MAX_PAIRS``) and the latest moderation decision on each pair (a window of
``--max-labels``): confirmed duplicates are positives, rejected alerts hard negatives, both
weighted ``--label-weight`` against 1 for a click-mined pair, and a decision replaces the mined
pair it names. The valid set decides promotion only. The decision, PROMOTED (strictly better)
or REJECTED, goes to ``model-updates``, at least once.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from samestyle.streams.io.reader import LogReader, LogRecord, every_partition
from samestyle.streams.settings import Settings
from samestyle.topics import (
    MODEL_UPDATES,
    MODERATION_DECISIONS,
    POSITIVE_PAIRS,
    TopicSpec,
    codec_for_topic,
    topic_specs,
)
from samestyle.topics.codec import use_schema_dir
from samestyle.topics.errors import BadInputError, ConfigError

log = logging.getLogger("samestyle.trainer")

STATE_FILE = "state.json"
PROMOTED, REJECTED = "PROMOTED", "REJECTED"
#: Metric names as they appear in ModelUpdate.metric.
METRIC_PAIRS, METRIC_CLUSTERS = "valid_f1", "recall_at_1"

Pair = tuple[str, str]
#: The ``decision`` values of ``moderation-decisions`` (topics/schemas/moderation_decision.avsc).
LABEL_CONFIRMED, LABEL_REJECTED = "confirmed", "rejected"
#: ``source`` column of the training CSV: where a row came from.
SOURCE_CLICKS = "clicks"


# --- pure logic (unit-tested without a broker or a model) -------------------------------------


def pair_of(record: Mapping[str, Any]) -> Pair:
    """The unordered pair of a ``positive-pairs`` record, as a sorted tuple."""
    a, b = record["listing_id_a"], record["listing_id_b"]
    return (a, b) if a <= b else (b, a)


def decision_pair(record: Mapping[str, Any]) -> Pair:
    """The unordered pair of a ``moderation-decisions`` record, as a sorted tuple."""
    a, b = record["listing_id"], record["duplicate_of"]
    return (a, b) if a <= b else (b, a)


@dataclass(frozen=True)
class Label:
    """A moderator's latest verdict on one pair."""

    confirmed: bool
    decided_at: int
    moderator_id: str

    @property
    def decision(self) -> str:
        return LABEL_CONFIRMED if self.confirmed else LABEL_REJECTED


def _trim(window: dict[Pair, Any], size: int | None) -> None:
    """Drop the oldest entries of an insertion-ordered window down to ``size`` (None: keep all)."""
    if size is not None and len(window) > size:
        for pair in list(itertools.islice(window, len(window) - size)):
            del window[pair]


@dataclass
class TrainerState:
    """What survives a restart: next offset per partition of both topics, the window of mined
    pairs, the window of moderators' latest decisions, the last candidate."""

    #: Next ``positive-pairs`` offset per partition.
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
    #: Next ``moderation-decisions`` offset per partition.
    label_offsets: dict[int, int] = field(default_factory=dict)
    #: The latest decision per unordered pair, oldest change first: at most ``max_labels``.
    labels: dict[Pair, Label] = field(default_factory=dict)
    #: Decisions that changed a pair's label (a new pair, or the other verdict) since the state began.
    labels_seen: int = 0
    #: ``labels_seen`` when the last candidate was trained.
    labels_at_last_candidate: int = 0
    #: The labels window's size (None: every pair). Configuration, not saved.
    max_labels: int | None = field(default=None, compare=False)

    def add(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Add mined pairs, each unordered pair once (while in the window); returns how many were new."""
        new = 0
        for record in records:
            pair = pair_of(record)
            if pair not in self.pairs:
                self.pairs[pair] = None
                new += 1
        self.pairs_seen += new
        _trim(self.pairs, self.max_pairs)
        return new

    def add_decisions(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Fold ``moderation-decisions`` records into the latest decision per unordered pair.

        A decision supersedes the pair's stored one unless it is older (``decided_at``; a tie goes
        to the one read later); a replay of the stored decision changes nothing. An accepted
        decision moves its pair to the newest end of the window. Returns how many decisions
        changed a label (a pair without one, or the other verdict): what counts toward a candidate.
        """
        changed = 0
        for record in records:
            pair = decision_pair(record)
            if pair[0] == pair[1]:
                log.warning("moderation decision on %s against itself: skipped", pair[0])
                continue
            label = Label(record["decision"] == LABEL_CONFIRMED, int(record["decided_at"]), str(record["moderator_id"]))
            old = self.labels.get(pair)
            if old is not None and (label.decided_at < old.decided_at or label == old):
                continue  # superseded already, or a re-read of the same decision
            if old is not None:
                del self.labels[pair]
            self.labels[pair] = label
            if old is None or old.confirmed != label.confirmed:
                changed += 1
        self.labels_seen += changed
        _trim(self.labels, self.max_labels)
        return changed

    @property
    def new_pairs(self) -> int:
        return max(0, self.pairs_seen - self.pairs_at_last_candidate)

    @property
    def new_labels(self) -> int:
        return self.labels_seen - self.labels_at_last_candidate

    def mark_candidate(self) -> None:
        """A candidate was trained on everything held now: nothing is new any more."""
        self.pairs_at_last_candidate = self.pairs_seen
        self.labels_at_last_candidate = self.labels_seen
        self.candidates += 1

    def to_json(self) -> dict[str, Any]:
        return {"offsets": {str(p): o for p, o in sorted(self.offsets.items())},
                "pairs": [list(p) for p in self.pairs],
                "pairs_at_last_candidate": self.pairs_at_last_candidate,
                "candidates": self.candidates,
                "pairs_seen": self.pairs_seen,
                "label_offsets": {str(p): o for p, o in sorted(self.label_offsets.items())},
                "labels": [[a, b, label.decision, label.decided_at, label.moderator_id]
                           for (a, b), label in self.labels.items()],
                "labels_seen": self.labels_seen,
                "labels_at_last_candidate": self.labels_at_last_candidate}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], max_pairs: int | None = None,
                  max_labels: int | None = None) -> TrainerState:
        """A state file's contents; a file written before decisions were kept has none (read from the start)."""
        pairs = {(str(a), str(b)): None for a, b in data.get("pairs", [])}
        labels = {}
        for a, b, decision, decided_at, moderator in data.get("labels", []):
            if decision not in (LABEL_CONFIRMED, LABEL_REJECTED):
                raise ValueError(f"decision {decision!r}")
            labels[(str(a), str(b))] = Label(decision == LABEL_CONFIRMED, int(decided_at), str(moderator))
        state = cls(offsets={int(p): int(o) for p, o in data.get("offsets", {}).items()},
                    pairs=pairs, pairs_at_last_candidate=int(data.get("pairs_at_last_candidate", 0)),
                    candidates=int(data.get("candidates", 0)),
                    pairs_seen=int(data.get("pairs_seen", len(pairs))), max_pairs=max_pairs,
                    label_offsets={int(p): int(o) for p, o in data.get("label_offsets", {}).items()},
                    labels=labels, labels_seen=int(data.get("labels_seen", len(labels))),
                    labels_at_last_candidate=int(data.get("labels_at_last_candidate", 0)), max_labels=max_labels)
        _trim(state.pairs, max_pairs)  # a smaller window than the file's: trimmed now
        _trim(state.labels, max_labels)
        return state

    @classmethod
    def load(cls, path: Path, max_pairs: int | None = None, max_labels: int | None = None) -> TrainerState:
        if not path.is_file():
            return cls(max_pairs=max_pairs, max_labels=max_labels)
        try:
            return cls.from_json(json.loads(path.read_text()), max_pairs, max_labels)
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
    """A candidate is due when at least ``min_new_pairs`` new mined pairs and changed decisions
    (together) arrived since the last one, and there is a positive to train on."""
    has_positive = bool(state.pairs) or any(label.confirmed for label in state.labels.values())
    return has_positive and state.new_pairs + state.new_labels >= min_new_pairs


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
    """A pairs file ``samestyle train --pairs`` reads: every pair, label 1."""
    return write_training_csv(path, (TrainingRow(a, b, 1, 1.0, SOURCE_CLICKS) for a, b in pairs), weights=False)


class TrainingRow(NamedTuple):
    """One row of a candidate's pairs file."""

    a: str
    b: str
    label: int
    weight: float
    #: ``clicks`` (a mined pair), ``confirmed`` or ``rejected`` (a moderator's decision).
    source: str


@dataclass(frozen=True)
class TrainingSet:
    """A candidate's pairs and what was left out of them."""

    rows: list[TrainingRow]
    #: Mined pairs a decision on the same pair replaced (the label wins).
    replaced: int = 0
    #: Mined pairs and decisions naming a listing that is not in the catalogue.
    pairs_left_out: int = 0
    labels_left_out: int = 0

    def count(self, source: str) -> int:
        return sum(1 for row in self.rows if row.source == source)

    def summary(self) -> str:
        return (f"{self.count(SOURCE_CLICKS)} mined pairs, {self.count(LABEL_CONFIRMED)} confirmed and "
                f"{self.count(LABEL_REJECTED)} rejected decisions ({self.replaced} mined pairs replaced by a decision)")


def training_set(pairs: Iterable[Pair], labels: Mapping[Pair, Label], catalogue: set[str],
                 label_weight: float) -> TrainingSet:
    """The rows a candidate trains on: each mined pair (label 1, weight 1) unless a decision names
    it, then each decision (confirmed: label 1, rejected: label 0; weight ``label_weight``).
    A confirmed pair the clicks also mined appears once; a rejected one is no positive any more.
    Pairs and decisions naming a listing outside ``catalogue`` are left out (and counted)."""
    def known(pair: Pair) -> bool:
        return pair[0] in catalogue and pair[1] in catalogue

    rows: list[TrainingRow] = []
    replaced = pairs_left_out = labels_left_out = 0
    for pair in pairs:
        if not known(pair):
            pairs_left_out += 1
        elif pair in labels:
            replaced += 1
        else:
            rows.append(TrainingRow(pair[0], pair[1], 1, 1.0, SOURCE_CLICKS))
    for pair, label in labels.items():
        if not known(pair):
            labels_left_out += 1
        else:
            rows.append(TrainingRow(pair[0], pair[1], int(label.confirmed), float(label_weight), label.decision))
    return TrainingSet(rows, replaced, pairs_left_out, labels_left_out)


def write_training_csv(path: Path, rows: Iterable[TrainingRow], weights: bool = True) -> int:
    """The pairs file ``samestyle train --pairs`` reads: ``listing_id_a, listing_id_b, label``, and
    with ``weights`` the ``weight`` column ``train`` honours and the row's ``source``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["listing_id_a", "listing_id_b", "label"] + (["weight", "source"] if weights else []))
        for row in rows:
            writer.writerow([row.a, row.b, row.label] + ([repr(float(row.weight)), row.source] if weights else []))
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


def train_candidate(args: argparse.Namespace, training: TrainingSet) -> tuple[Path, str, int]:
    """Write the pairs CSV and train a candidate; returns ``(model dir, version, rows used)``."""
    from samestyle.models.encoder import load_config
    from samestyle.models.train.finetune import TrainConfig, train

    if training.pairs_left_out:
        log.warning("%d mined pairs name listings not in %s: left out", training.pairs_left_out, args.listings)
    if training.labels_left_out:
        log.warning("%d moderation decisions name listings not in %s: skipped", training.labels_left_out,
                    args.listings)
    rows = training.rows
    if sum(row.label for row in rows) < 2:
        raise ConfigError(f"only {sum(row.label for row in rows)} mined pairs and confirmed decisions name "
                          f"listings of {args.listings}: nothing to train on")
    pairs_csv = args.work_dir / "pairs" / f"pairs-{len(rows)}.csv"
    write_training_csv(pairs_csv, rows)
    args.models_dir.mkdir(parents=True, exist_ok=True)
    # The version (name + time + weights hash) is known only once trained: train into a fresh
    # directory, then rename it to the version.
    staging = Path(tempfile.mkdtemp(prefix=".candidate-", dir=args.models_dir))
    config = TrainConfig(listings=args.listings, out=staging, pairs=pairs_csv, base=args.base, epochs=args.epochs,
                         batch_size=args.batch_size, seed=args.seed, name=args.name, images=not args.no_images,
                         device=args.device, progress=args.progress, overwrite=True,
                         allow_random_weights=args.allow_random_weights)
    log.info("training a candidate on %d rows: %s; decisions weigh %g (%s)", len(rows), training.summary(),
             args.label_weight, pairs_csv)
    started = time.monotonic()
    train(config)
    version = load_config(staging).version
    model_dir = args.models_dir / version
    os.replace(staging, model_dir)
    log.info("candidate %s trained in %.0f s: %s", version, time.monotonic() - started, model_dir)
    return model_dir.resolve(), version, len(rows)


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


def decode_records(records: Iterable[LogRecord], key: str) -> list[dict[str, Any]]:
    """The values of ``records`` of the topic ``key``; a record that does not decode (or a
    tombstone) is logged with its topic, partition and offset and skipped (the trainer writes no
    dead letters: it reads output topics)."""
    codec = codec_for_topic(key)
    out = []
    for record in records:
        try:
            if record.value is None:
                raise BadInputError("null value")
            out.append(codec.decode(record.value))
        except BadInputError as exc:
            log.warning("%s[%d]@%d skipped by the trainer: %s", record.topic, record.partition, record.offset, exc)
    return out


class TopicReader:
    """Reads one topic (every partition, manually assigned) from offsets the state keeps."""

    def __init__(self, settings: Settings, spec: TopicSpec, key: str) -> None:
        self.settings, self.spec, self.key = settings, spec, key
        self.reader: LogReader | None = None

    async def start(self, offsets: Mapping[int, int]) -> None:
        self.reader = await _reader(self.settings).start()
        await self.reader.assign({(self.spec.name, p): offsets.get(p) for p in range(self.spec.partitions)})

    async def catch_up(self, offsets: dict[int, int], timeout: float) -> tuple[int, list[dict[str, Any]]]:
        """Read to the end; returns (records read, their decoded values) and moves ``offsets`` past them.
        The caller folds the values into the state before it saves the offsets with them."""
        assert self.reader is not None
        records = await self.reader.read_to_end(timeout)
        values = decode_records(records, self.key)
        for topic, p in self.reader.partitions:
            offsets[p] = await self.reader.position((topic, p))
        return len(records), values

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
        self.state = TrainerState.load(self.state_path, max_pairs=args.max_pairs, max_labels=args.max_labels)

    async def catch_up(self, pairs: TopicReader, decisions: TopicReader) -> None:
        """Read both topics to the end into the state; save it (offsets with what they cover)."""
        args, state = self.args, self.state
        read, values = await pairs.catch_up(state.offsets, args.read_timeout)
        new = state.add(values)
        read_labels, labels = await decisions.catch_up(state.label_offsets, args.read_timeout)
        changed = state.add_decisions(labels)
        if read or read_labels:
            state.save(self.state_path)
        if read:
            log.info("%d records read, %d new pairs; %d pairs in the window (%d seen), %d since the "
                     "last candidate", read, new, len(state.pairs), state.pairs_seen, state.new_pairs)
        if read_labels:
            outside = sorted({i for record in labels for i in decision_pair(record) if i not in self.catalogue})
            if outside:
                log.warning("moderation decisions name %d listings not in %s (e.g. %r): they are skipped in "
                            "training", len(outside), args.listings, outside[0])
            confirmed = sum(1 for label in state.labels.values() if label.confirmed)
            log.info("%d moderation decisions read, %d changed a label; %d labels held (%d confirmed, %d "
                     "rejected), %d changed since the last candidate", read_labels, changed, len(state.labels),
                     confirmed, len(state.labels) - confirmed, state.new_labels)

    async def run(self) -> dict[str, Any] | None:
        """Consume, and train when due; ``--once``: one catch-up, at most one candidate.
        Returns the last decision made (None when none was)."""
        args, state = self.args, self.state
        updates = await read_model_updates(self.settings, self.specs[MODEL_UPDATES])
        used = last_pairs_used(updates)
        # A state that never trained (a lost work directory) starts counting new pairs after the
        # newest decision's; a state that did knows better (its rows include moderators' decisions).
        if state.candidates == 0 and used > state.pairs_at_last_candidate:
            log.info("the newest decision on %s used %d pairs: counting new pairs from there",
                     self.specs[MODEL_UPDATES].name, used)
            state.pairs_at_last_candidate = used
        pairs = TopicReader(self.settings, self.specs[POSITIVE_PAIRS], POSITIVE_PAIRS)
        decisions = TopicReader(self.settings, self.specs[MODERATION_DECISIONS], MODERATION_DECISIONS)
        last: dict[str, Any] | None = None
        try:
            await pairs.start(state.offsets)
            await decisions.start(state.label_offsets)
            while True:
                await self.catch_up(pairs, decisions)
                if should_train(state, args.min_new_pairs):
                    last = await asyncio.to_thread(self.cycle)
                    if args.once:
                        return last
                elif args.once:
                    if not state.pairs and not any(label.confirmed for label in state.labels.values()):
                        raise ConfigError(f"no positive pairs on {self.specs[POSITIVE_PAIRS].name} and no confirmed "
                                          f"decision on {self.specs[MODERATION_DECISIONS].name}: run the pairs "
                                          "agent on click events first (docs/PAIRS.md)")
                    log.info("%d new pairs and %d changed decisions since the last candidate, fewer than "
                             "--min-new-pairs %d: nothing to train", state.new_pairs, state.new_labels,
                             args.min_new_pairs)
                    return None
                else:
                    await asyncio.sleep(args.poll_seconds)
        finally:
            await pairs.stop()
            await decisions.stop()

    def cycle(self) -> dict[str, Any]:
        """Train, evaluate against the current model, decide, record. Runs off the event loop."""
        args, state = self.args, self.state
        model_dir, version, used = train_candidate(
            args, training_set(state.pairs, state.labels, self.catalogue, args.label_weight))
        updates = asyncio.run(read_model_updates(self.settings, self.specs[MODEL_UPDATES]))
        current_spec, _ = current_model(updates, args.current or self.settings.encoder)
        score, _ = self.validation.score(str(model_dir), "candidate")
        previous_score, previous_version = self.validation.score(current_spec, "current")
        decision, reason = decide(self.validation.metric, score, previous_score, previous_version)
        record = update_record(version, model_dir, decision, previous_version, self.validation.metric, score,
                               previous_score, used, reason)
        asyncio.run(produce_update(self.settings, self.specs[MODEL_UPDATES], record))
        log.info("%s %s (%d pairs): %s", decision, version, used, reason)
        state.mark_candidate()
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
                   help="state (offsets, mined pairs, decisions) and the pairs CSVs (default runs/trainer)")
    p.add_argument("--models-dir", type=Path, default=Path("runs/models"),
                   help="candidates go to DIR/<version> (default runs/models); workers must see the same path")
    p.add_argument("--max-pairs", type=int,
                   help="train on the newest N distinct mined pairs; older ones leave the state "
                        "(default SAMESTYLE_TRAINER_MAX_PAIRS, 100000)")
    p.add_argument("--max-labels", type=int,
                   help="keep the latest moderation decision of the N pairs decided most recently "
                        "(default SAMESTYLE_TRAINER_MAX_LABELS, 100000)")
    p.add_argument("--label-weight", type=float,
                   help="weight of a moderator's decision in training against 1 for a click-mined pair "
                        "(default SAMESTYLE_TRAINER_LABEL_WEIGHT, 3)")
    p.add_argument("--min-new-pairs", type=int, default=100,
                   help="train a candidate when this many new mined pairs and changed moderation decisions "
                        "(together) arrived since the last one (default 100)")
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
    if args.max_labels is None:
        args.max_labels = settings.trainer_max_labels
    elif args.max_labels < 1:
        raise ConfigError("--max-labels must be >= 1")
    if args.label_weight is None:
        args.label_weight = settings.trainer_label_weight
    elif not (math.isfinite(args.label_weight) and args.label_weight > 0):
        raise ConfigError("--label-weight must be finite and > 0")
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
    check_topics(bootstrap, [specs[POSITIVE_PAIRS], specs[MODERATION_DECISIONS], specs[MODEL_UPDATES]])
    try:
        record = asyncio.run(trainer.run())
    except KeyboardInterrupt:
        # The state file is saved after every read and every decision: nothing to flush.
        log.info("stopped; %d pairs, %d decisions, %d candidates so far", len(trainer.state.pairs),
                 len(trainer.state.labels), trainer.state.candidates)
        return 130
    if record is not None:
        print(json.dumps(record, sort_keys=True) if args.json else
              f"{record['decision']} {record['version']} ({record['pairs_used']} pairs): {record['reason']}")
    elif args.json:
        print(json.dumps(None))
    else:
        print(f"no candidate: {trainer.state.new_pairs} new pairs and {trainer.state.new_labels} changed decisions "
              f"since the last one (--min-new-pairs {args.min_new_pairs}); {len(trainer.state.pairs)} pairs and "
              f"{len(trainer.state.labels)} decisions in the window")
    return 0


__all__ = ["LABEL_CONFIRMED", "LABEL_REJECTED", "Label", "TrainerState", "TrainingRow", "TrainingSet", "Validation",
           "current_model", "decide", "decision_pair", "decode_records", "last_pairs_used", "main", "pair_of",
           "should_train", "training_set", "update_record", "write_pairs_csv", "write_training_csv"]
