"""``samestyle trainer --once`` as a real process against the real broker, with a tiny random model.

Mined pairs are produced straight to ``positive-pairs`` (the pairs agent has its own tests): the
trainer must read them, dedupe them, train a candidate, compare it with the current model and
record the decision on ``model-updates``; a second run resumes from its offsets. Moderators'
decisions produced to ``moderation-decisions`` (as the moderation page writes them) must reach
the candidate's training set: the pairs CSV it trains on and the state it resumes from.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from samestyle.models.factory import encoder_from_spec
from samestyle.streams.dev.sample import generate_sample
from samestyle.streams.io.producer import send_records
from samestyle.streams.pairs.mining import pair_key
from samestyle.streams.trainer.service import PROMOTED, REJECTED, decide
from samestyle.topics import MODEL_UPDATES, MODERATION_DECISIONS, POSITIVE_PAIRS, codec_for_topic
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration



def positive(a: str, b: str) -> dict[str, Any]:
    first, second = sorted((a, b))
    now = int(time.time() * 1000)
    return {"listing_id_a": first, "listing_id_b": second, "category": None, "co_clicks": 5, "sessions": 2,
            "dwell_ms_total": 150_000, "relevance_score": None, "model_version": None, "event_time": now,
            "emitted_at": now}


def send_pairs(stack: Stack, pairs: list[tuple[str, str]]) -> None:
    codec = codec_for_topic(POSITIVE_PAIRS)
    asyncio.run(send_records(stack.settings, stack.specs[POSITIVE_PAIRS].name,
                             [(pair_key(a, b).encode(), codec.encode(positive(a, b))) for a, b in pairs]))


def send_decisions(stack: Stack, decisions: list[tuple[str, str, str, int]]) -> None:
    """``(listing_id, duplicate_of, confirmed|rejected, decided_at)`` records, keyed by listing_id."""
    codec = codec_for_topic(MODERATION_DECISIONS)
    records = [{"listing_id": a, "duplicate_of": b, "decision": verdict, "moderator_id": "mod-7", "decided_at": at,
                "model_version": "v0", "probability": 0.93} for a, b, verdict, at in decisions]
    asyncio.run(send_records(stack.settings, stack.specs[MODERATION_DECISIONS].name,
                             [(r["listing_id"].encode(), codec.encode(r)) for r in records]))


def key(pair: tuple[str, str]) -> tuple[str, str]:
    return (pair[0], pair[1]) if pair[0] <= pair[1] else (pair[1], pair[0])


def training_csv(path: Path) -> dict[tuple[str, str], tuple[int, float, str]]:
    """``{sorted pair: (label, weight, source)}`` of a pairs CSV the trainer wrote."""
    with path.open(newline="") as fh:
        return {key((r["listing_id_a"], r["listing_id_b"])): (int(r["label"]), float(r["weight"]), r["source"])
                for r in csv.DictReader(fh)}


def model_updates(stack: Stack) -> list[tuple[bytes, dict[str, Any]]]:
    """Every (key, record) on model-updates."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    async def run() -> list[tuple[bytes, dict[str, Any]]]:
        consumer = AIOKafkaConsumer(bootstrap_servers=stack.settings.bootstrap_servers, group_id=None,
                                    enable_auto_commit=False, auto_offset_reset="earliest")
        await consumer.start()
        try:
            tp = TopicPartition(stack.specs[MODEL_UPDATES].name, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            out: list[tuple[bytes, dict[str, Any]]] = []
            codec = codec_for_topic(MODEL_UPDATES)
            while True:
                batches = await consumer.getmany(tp, timeout_ms=300)
                out += [(r.key, codec.decode(r.value)) for r in batches.get(tp, [])]
                high = consumer.highwater(tp)
                if high is not None and await consumer.position(tp) >= high:
                    return out
        finally:
            await consumer.stop()

    return asyncio.run(run())


def run_trainer(stack: Stack, data: Path, *extra: str, prefix: str | None = None) -> subprocess.CompletedProcess[str]:
    # One torch thread: on a loaded 2-core machine, two spinning threads made the tiny training
    # several times slower.
    env = dict(os.environ, **stack.settings.to_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1")
    if prefix is not None:
        env["SAMESTYLE_TOPIC_PREFIX"] = prefix
    argv = [sys.executable, "-m", "samestyle.streams.cli.main", "trainer", "--once", "--json",
            "--listings", str(data / "listings.csv"), "--valid-clusters", str(data / "clusters.csv"),
            "--work-dir", str(stack.tmp / "work"), "--models-dir", str(stack.tmp / "models"),
            "--base", "tiny", "--epochs", "1", "--batch-size", "4", *extra]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def catalogue(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """The 56-listing generated sample and its 16 same-product pairs."""
    data = tmp_path / "data"
    _, clusters_csv = generate_sample(data, n_products=40, seed=3)
    members: dict[str, list[str]] = {}
    with clusters_csv.open() as fh:
        for row in csv.DictReader(fh):
            members.setdefault(row["cluster_id"], []).append(row["listing_id"])
    pairs = [(m[0], m[1]) for m in members.values() if len(m) == 2]
    assert len(pairs) == 16
    return data, pairs


def test_trainer_once_trains_decides_and_resumes(stack: Stack, catalogue: tuple[Path, list[tuple[str, str]]]) -> None:
    data, pairs = catalogue
    first, later = pairs[:10], pairs[10:13]
    # Two pairs re-sent (one of them reversed): a compacted topic may still hold both copies.
    send_pairs(stack, first + [first[0], (first[1][1], first[1][0])])

    done = run_trainer(stack, data, "--min-new-pairs", "5", "--current", "tiny")
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(done.stdout)
    ((key, on_topic),) = model_updates(stack)
    assert on_topic == record and key == record["version"].encode()
    assert record["pairs_used"] == 10  # deduped
    assert record["metric"] == "recall_at_1" and 0.0 <= record["score"] <= 1.0
    assert record["previous_score"] is not None and 0.0 <= record["previous_score"] <= 1.0
    assert record["previous_version"] == encoder_from_spec("tiny", "cpu", allow_random_weights=True).version
    decision, reason = decide(record["metric"], record["score"], record["previous_score"], record["previous_version"])
    assert (record["decision"], record["reason"]) == (decision, reason)
    model_dir = Path(record["model_dir"])
    assert model_dir == (stack.tmp / "models" / record["version"]).resolve()
    encoder = encoder_from_spec(str(model_dir), "cpu", allow_random_weights=True)
    assert encoder.version == record["version"]
    assert (stack.tmp / "work" / "pairs" / "pairs-10.csv").is_file()
    assert f"{record['decision']} {record['version']}" in done.stderr  # the decision is logged

    # Nothing new: the offsets file says where it left off, no candidate, no record.
    again = run_trainer(stack, data, "--min-new-pairs", "1", "--current", "tiny")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout) is None and len(model_updates(stack)) == 1

    # Three new pairs plus a replay of old ones: the next candidate trains on all 13 and is
    # compared with the newest promoted model (or still the --current one).
    send_pairs(stack, later + first[:4])
    third = run_trainer(stack, data, "--min-new-pairs", "3", "--current", "tiny")
    assert third.returncode == 0, third.stderr[-3000:]
    second = json.loads(third.stdout)
    assert second["pairs_used"] == 13 and second["version"] != record["version"]
    assert second["decision"] in (PROMOTED, REJECTED)
    expected_previous = record["version"] if record["decision"] == PROMOTED else record["previous_version"]
    assert second["previous_version"] == expected_previous
    assert [r["version"] for _, r in model_updates(stack)] == [record["version"], second["version"]]


def test_trainer_errors_missing_topics_and_no_pairs(stack: Stack, catalogue: tuple[Path, list[tuple[str, str]]]) -> None:
    data, _ = catalogue
    done = run_trainer(stack, data, prefix="missing-topics-")
    assert done.returncode == 2
    assert "samestyle create-topics" in done.stderr and "missing-topics-positive-pairs" in done.stderr
    empty = run_trainer(stack, data)
    assert empty.returncode == 2 and "no positive pairs" in empty.stderr, empty.stderr[-2000:]
    assert model_updates(stack) == []


def test_moderation_decisions_reach_the_training_set(stack: Stack,
                                                     catalogue: tuple[Path, list[tuple[str, str]]]) -> None:
    data, pairs = catalogue
    mined, extra = pairs[:8], pairs[8:]
    send_pairs(stack, mined)
    other = (mined[2][0], mined[3][1])  # two products: an alert the moderator rejected
    send_decisions(stack, [
        (mined[0][1], mined[0][0], "confirmed", 1_000),   # mined too: one row, the label's weight
        (mined[1][0], mined[1][1], "confirmed", 1_000),
        (mined[1][1], mined[1][0], "rejected", 2_000),    # the later verdict, other key: no positive now
        (extra[0][0], extra[0][1], "confirmed", 1_000),   # a duplicate the clicks never mined
        (other[0], other[1], "rejected", 1_000),
        (extra[1][0], extra[1][1], "rejected", 5_000),
        (extra[1][1], extra[1][0], "confirmed", 4_000),   # older, read later: superseded already
        ("ghost-listing", extra[2][0], "confirmed", 1_000),  # not in the catalogue: skipped
    ])
    first = run_trainer(stack, data, "--min-new-pairs", "5", "--current", "tiny", "--label-weight", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    record = json.loads(first.stdout)
    expected = {key(p): (1, 1.0, "clicks") for p in mined[2:]}
    expected |= {key(mined[0]): (1, 4.0, "confirmed"), key(mined[1]): (0, 4.0, "rejected"),
                 key(extra[0]): (1, 4.0, "confirmed"), key(other): (0, 4.0, "rejected"),
                 key(extra[1]): (0, 4.0, "rejected")}
    assert record["pairs_used"] == len(expected) == 11
    assert training_csv(stack.tmp / "work" / "pairs" / "pairs-11.csv") == expected
    assert "not in" in first.stderr and "ghost-listing" in first.stderr  # skipped with a warning
    assert "8 moderation decisions read" in first.stderr
    state = json.loads((stack.tmp / "work" / "state.json").read_text())
    spec = stack.specs[MODERATION_DECISIONS]
    assert sorted(state["label_offsets"]) == [str(p) for p in range(spec.partitions)]
    assert sum(state["label_offsets"].values()) == 8  # every decision read, offsets per partition
    assert len(state["labels"]) == 6 and state["labels_seen"] == state["labels_at_last_candidate"]

    # A restart resumes from both topics' offsets: nothing new, no candidate.
    again = run_trainer(stack, data, "--min-new-pairs", "1", "--current", "tiny", "--label-weight", "4")
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads(again.stdout) is None and len(model_updates(stack)) == 1

    # One changed verdict is new information: it makes a candidate due on its own, and it wins.
    send_decisions(stack, [(extra[0][1], extra[0][0], "rejected", 9_000)])
    third = run_trainer(stack, data, "--min-new-pairs", "1", "--current", "tiny", "--label-weight", "4")
    assert third.returncode == 0, third.stderr[-3000:]
    assert json.loads(third.stdout) is not None, third.stderr[-4000:]
    assert json.loads(third.stdout)["pairs_used"] == 11
    assert training_csv(stack.tmp / "work" / "pairs" / "pairs-11.csv")[key(extra[0])] == (0, 4.0, "rejected")
    assert len(model_updates(stack)) == 2
