"""The pairs agent against the real broker and real worker processes.

Workers run ``samestyle pairs-worker`` (create_app with the pairs agents). Every test creates
its topics *and* the tables' changelogs (topic_specs(app_id=...)) before a worker starts.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from samestyle.models.data import ListingRecord
from samestyle.streams.dev.broker import create_topics, die_with_parent
from samestyle.streams.dev.pairs_report import read_topics
from samestyle.streams.io.producer import listing_message, send_records
from samestyle.streams.pairs.agents import partition_for
from samestyle.streams.worker.process import WorkerProcess
from samestyle.topics import CLICK_EVENTS, CLICK_PAIRS, TopicSpec, codec_for_topic, topic_specs
from tests.integration.conftest import Stack

pytestmark = pytest.mark.integration

T0 = 1_717_200_000_000
FAST = {"pairs_min_co_clicks": 3, "pairs_min_sessions": 2, "pairs_min_dwell_ms": 1_000}


class PairsWorker(WorkerProcess):
    """A worker process with the pairs agent registered."""

    def start(self) -> "PairsWorker":
        env = dict(os.environ, **self.settings.to_env(), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "samestyle", "pairs-worker"], env=env, stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=die_with_parent)
        return self


def start(stack: Stack, name: str = "w1", **overrides: Any) -> PairsWorker:
    settings = stack.settings.replace(worker_id=name, **{**FAST, **overrides})
    if not stack.workers:  # the fixture created the other topics; the changelogs come on top
        create_topics(settings.bootstrap or "", changelog_specs(stack))
    worker = PairsWorker(settings, stack.tmp / f"{name}.log").start()
    stack.workers.append(worker)
    return worker


def changelog_specs(stack: Stack) -> list[TopicSpec]:
    plain = topic_specs(stack.settings.topic_prefix)
    return [s for k, s in topic_specs(stack.settings.topic_prefix, app_id=stack.settings.app_id).items()
            if k not in plain]


def click(session: str, trigger: str, clicked: str, t: int, dwell: int = 5_000, position: int = 1) -> dict[str, Any]:
    return {"session_id": session, "user_id": None, "query": None, "trigger_id": trigger, "clicked_id": clicked,
            "position": position, "dwell_ms": dwell, "event_time": t}


def send_clicks(stack: Stack, clicks: list[dict[str, Any]]) -> None:
    codec = codec_for_topic(CLICK_EVENTS)
    asyncio.run(send_records(stack.settings, stack.specs[CLICK_EVENTS].name,
                             [(c["session_id"].encode(), codec.encode(c)) for c in clicks]))


def pairs_out(stack: Stack, want: int, timeout: float = 60.0, settle: float = 3.0) -> list[dict[str, Any]]:
    """Positive pairs read back once ``want`` have arrived and ``settle`` more seconds bring no more."""
    deadline = time.monotonic() + timeout
    while True:
        pairs, _, _ = asyncio.run(read_topics(stack.settings, idle=1.0, timeout=5.0))
        if len(pairs) >= want or time.monotonic() > deadline:
            break
        for w in stack.workers:
            if w.proc is not None and w.proc.returncode is None:
                w.check_alive()
    time.sleep(settle)
    pairs, _, _ = asyncio.run(read_topics(stack.settings, idle=1.0, timeout=5.0))
    if len(pairs) < want:
        logs = "\n".join(f"--- {w.log_path.name}\n{w.log_tail(40)}" for w in stack.workers)
        pytest.fail(f"{len(pairs)} of {want} positive pairs in {timeout:.0f} s\n{logs}")
    return pairs


def pair_set(pairs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((p["listing_id_a"], p["listing_id_b"]) for p in pairs)


def sessions_on_one_partition(n: int, partitions: int) -> list[str]:
    """``n`` session ids keyed to one click-events partition: only clicks of one partition keep
    their order through both stages (the agents fold each partition's batch on its own)."""
    ids = (f"s{k}" for k in itertools.count())
    return list(itertools.islice((i for i in ids if partition_for(i.encode(), partitions) == 0), n))


def test_clicks_in_expected_pairs_out_once(stack: Stack) -> None:
    start(stack)
    clicks = []
    # (a, b): 3 clicks in 3 sessions, both directions -> positive, exactly once even with a 4th click.
    ordered = sessions_on_one_partition(4, stack.specs[CLICK_EVENTS].partitions)
    for s, (t, c) in enumerate([("a", "b"), ("b", "a"), ("a", "b"), ("b", "a")]):
        clicks.append(click(ordered[s], t, c, T0 + s * 1000, dwell=2_000 + s))
    # (c, d): 3 clicks but one session -> rejected (min sessions).
    clicks += [click("s9", "c", "d", T0 + k * 1000) for k in range(3)]
    # (e, f): 3 sessions but one click is a bounce -> only 2 co-clicks, rejected.
    clicks += [click(f"t{k}", "e", "f", T0 + k, dwell=200 if k == 0 else 5_000) for k in range(3)]
    # (g, g): self-clicks are no evidence.
    clicks += [click(f"u{k}", "g", "g", T0 + k) for k in range(4)]
    send_clicks(stack, clicks)
    pairs = pairs_out(stack, want=1)
    assert pair_set(pairs) == [("a", "b")]
    (p,) = pairs
    assert (p["co_clicks"], p["sessions"], p["dwell_ms_total"]) == (3, 3, 2_000 + 2_001 + 2_002)
    assert p["category"] is None and p["relevance_score"] is None  # not indexed: constraints skipped
    assert p["event_time"] == T0 + 2_000


def test_category_and_cosine_constraints_use_the_index(stack: Stack) -> None:
    listings = [ListingRecord("m1", "Green ceramic frog mug 350 ml", "", "Home > Kitchen > Mugs", "s1"),
                ListingRecord("m2", "Green ceramic frog mug 350 ml", "", "home/kitchen/cups", "s2"),
                ListingRecord("m3", "Green ceramic frog mug 350 ml", "", "Electronics > Audio", "s3"),
                ListingRecord("m4", "Stainless steel hex bolt M8 pack of 100", "", "Home > Tools", "s4")]
    w = start(stack, pairs_min_cosine=0.99)
    stack.produce([listing_message(r) for r in listings])
    stack.collect(lambda o: o.indexed_ids >= {"m1", "m2", "m3", "m4"})
    w.check_alive()
    clicks = []
    for s, (t, c) in enumerate([("m1", "m2"), ("m1", "m3"), ("m1", "m4")] * 3):
        clicks.append(click(f"s{s}", t, c, T0 + s * 1000))
    send_clicks(stack, clicks)
    pairs = pairs_out(stack, want=1)
    # m1-m2: same level-1 category, identical text (cosine 1) -> positive.
    # m1-m3: other category -> rejected. m1-m4: same category, cosine < 0.99 -> rejected.
    assert pair_set(pairs) == [("m1", "m2")]
    assert pairs[0]["category"] == "home"
    assert pairs[0]["relevance_score"] == pytest.approx(1.0, abs=1e-5)
    assert pairs[0]["model_version"]


def test_restart_mid_stream_keeps_counts_exact(stack: Stack) -> None:
    """400 pairs get 2 clicks, the worker is killed (SIGKILL) and a new one takes over from the
    changelogs; a 3rd click must then make every pair positive with exactly 3 co-clicks, and
    pairs that got only 2 clicks in all must stay silent. A lost changelog record (BROKER.md trap
    1) leaves pairs at 2; a recount inflates co_clicks. The 3rd clicks are waiting when w2's table
    recovery ends: Faust 0.15.3 used to drop (and commit unread) the records it fetched while it
    sought the source partitions, which left those pairs at 2 (samestyle.streams.worker.transport.seek_before_resuming_streams)."""
    n, markers = 400, 20
    w1 = start(stack, "w1")
    phase1 = [click(f"s{i}-{k}", f"x{i}", f"y{i}", T0 + k * 1000) for i in range(n) for k in range(2)]
    phase1 += [click(f"q{i}-{k}", f"p{i}", f"r{i}", T0 + k * 1000) for i in range(50) for k in range(2)]
    # Markers go positive in phase 1: once they are out, w1 has worked through (most of) the rest.
    phase1 += [click(f"m{i}-{k}", f"m{i}", f"n{i}", T0 + k * 1000) for i in range(markers) for k in range(3)]
    send_clicks(stack, phase1)
    pairs_out(stack, want=markers, timeout=90.0, settle=0.0)
    w1.kill()  # no commit, no graceful hand-over: w2 must recover the tables from the changelogs
    start(stack, "w2")
    send_clicks(stack, [click(f"s{i}-2", f"y{i}", f"x{i}", T0 + 2000) for i in range(n)])
    pairs = pairs_out(stack, want=n + markers, timeout=180.0)  # a loaded 2-core machine is slow
    expected = sorted([(f"x{i}", f"y{i}") for i in range(n)] + [(f"m{i}", f"n{i}") for i in range(markers)])
    assert pair_set(pairs) == expected  # no pair lost, none repeated, the 2-click pairs stay silent
    assert {p["co_clicks"] for p in pairs} == {3}
    assert {p["sessions"] for p in pairs} == {3}
    assert {p["event_time"] for p in pairs if p["listing_id_a"].startswith("x")} == {T0 + 2000}


def test_changelog_topics_exist_with_source_partitions(stack: Stack) -> None:
    specs = changelog_specs(stack)
    create_topics(stack.settings.bootstrap or "", specs)  # checks the partition counts it gets back
    assert {(s.name, s.partitions) for s in specs} == {
        (f"{stack.settings.app_id}-pairs-sessions-changelog", stack.specs[CLICK_EVENTS].partitions),
        (f"{stack.settings.app_id}-pairs-evidence-changelog", stack.specs[CLICK_PAIRS].partitions)}
