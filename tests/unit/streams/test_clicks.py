"""Pairs constraints, session windows, evidence counting and the click simulator (no broker)."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest

from samestyle.models.data import ListingRecord
from samestyle.streams.dev.simulate import ClickModel, ClickSimulator, pseudo_category
from samestyle.streams.pairs.mining import (
    PairMiner,
    PairRules,
    add_click,
    category_path,
    evidence_batch,
    evidence_step,
    mark_sent,
    new_evidence,
    pair_key,
    session_window,
    sessionize_batch,
)
from samestyle.streams.pairs.store import (
    TableStore,
    decode_value,
    encode_value,
    evidence_kind,
    evidence_time,
    session_time,
)
from samestyle.streams.settings import Settings
from samestyle.streams.worker.transport import seek_before_resuming_streams
from samestyle.topics import codec_for_topic
from samestyle.topics.errors import ConfigError

T0 = 1_717_200_000_000
RULES = PairRules(min_co_clicks=3, min_sessions=2, min_dwell_ms=1_000, min_cosine=0.5)


def click(session: str, a: str, b: str, t: int, dwell: int = 5_000) -> dict:
    return {"session_id": session, "user_id": None, "query": None, "trigger_id": a, "clicked_id": b,
            "position": 0, "dwell_ms": dwell, "event_time": t}


def evidence(co: int, sessions: int) -> dict:
    return {"co_clicks": co, "sessions": [f"s{i}" for i in range(sessions)]}


def test_pair_key_is_unordered_and_unambiguous() -> None:
    assert pair_key("b", "a") == pair_key("a", "b") == '["a","b"]'
    assert pair_key("a|b", "c") != pair_key("a", "b|c")


def test_category_path_splits_common_separators() -> None:
    assert category_path("Electronics > Audio") == ("electronics", "audio")
    assert category_path("home-garden/drinkware") == ("home-garden", "drinkware")
    assert category_path("") is None and category_path(None) is None and category_path("  ") is None


@pytest.mark.parametrize(("rules", "ev", "cats", "cosine", "ok", "why"), [
    (RULES, evidence(2, 2), ("A", "A"), None, False, "co_clicks"),
    (RULES, evidence(3, 1), ("A", "A"), None, False, "sessions"),
    (RULES, evidence(3, 2), ("A > x", "B > x"), None, False, "categories differ"),
    (RULES, evidence(3, 2), ("A > x", "a > y"), 0.9, True, "positive"),
    (PairRules(category_level=2, min_co_clicks=3), evidence(3, 2), ("A > x", "A > y"), None, False, "level 2"),
    (PairRules(category_level=0, min_co_clicks=3), evidence(3, 2), ("A", "B"), None, True, "positive"),
    (RULES, evidence(3, 2), (None, "A"), None, True, "positive"),  # unknown category: skipped
    (PairRules(unknown_category="reject", min_co_clicks=3), evidence(3, 2), (None, "A"), None, False, "unknown"),
    (RULES, evidence(3, 2), ("A", "A"), 0.4, False, "cosine 0.400"),
    (PairRules(require_cosine=True, min_co_clicks=3), evidence(3, 2), ("A", "A"), None, False, "not indexed"),
])
def test_constraints(rules: PairRules, ev: dict, cats: tuple, cosine: float | None, ok: bool, why: str) -> None:
    decision = rules.decide(ev, *cats, cosine)
    assert decision.ok is ok and why in decision.reason


def test_shared_category_is_reported_at_the_level() -> None:
    assert RULES.decide(evidence(3, 2), "Home > Mugs", "home > cups", None).category == "home"
    assert PairRules(category_level=3).decide(evidence(5, 2), "a > b", "a > b", None).category == "a > b"


def test_bounces_and_self_clicks_are_no_evidence() -> None:
    assert RULES.is_evidence(click("s", "a", "b", T0))
    assert not RULES.is_evidence(click("s", "a", "b", T0, dwell=999))
    assert not RULES.is_evidence(click("s", "a", "a", T0))


def test_session_windows_split_on_idle_gaps_and_replays_keep_their_window() -> None:
    state, w = session_window(None, 0, 100)
    assert w == 0
    state, w = session_window(state, 50, 100)
    assert w == 0
    state, w = session_window(state, 500, 100)  # idle 450 > 100: next window
    assert w == 1
    _, w_replay = session_window(state, 50, 100)  # a replayed old click keeps window 0
    assert w_replay == 0
    _, w = session_window(state, 550, 100)
    assert w == 1


def test_add_click_counts_each_click_once() -> None:
    ev, counted = add_click(None, click("s1#0", "a", "b", T0), ("0", 10))
    ev, counted2 = add_click(ev, click("s1#0", "b", "a", T0 + 1, dwell=7_000), ("1", 3))
    ev, replay = add_click(ev, click("s1#0", "a", "b", T0), ("0", 10))  # a copy: same origin
    ev, older = add_click(ev, click("s1#0", "a", "b", T0), ("0", 4))  # re-forwarded, already counted
    assert (counted, counted2, replay, older) == (True, True, False, False)
    assert (ev["co_clicks"], ev["sessions"], ev["dwell_ms"], ev["last_time"]) == (2, ["s1#0"], 12_000, T0 + 1)
    assert ev["origins"] == {"0": 10, "1": 3}  # one offset per source, however many clicks


def test_evidence_step_emits_once_and_resends_only_an_unconfirmed_send() -> None:
    state = None
    clicks = [click(f"s{i}#0", "a", "b", T0 + i) for i in range(4)]
    out = []
    for i, c in enumerate(clicks[:3]):
        state, counted, record = evidence_step(state, c, ("0", i), RULES, lambda _: None, None, now=T0)
        out.append(record)
    assert out[:2] == [None, None] and out[2]["co_clicks"] == 3
    assert state["emitted_by"] == ["0", 2] and state["held_by"] is None
    # A replay of the emitting click before the send was confirmed: the same record again.
    _, counted, again = evidence_step(state, clicks[2], ("0", 2), RULES, lambda _: None, None, now=T0 + 99)
    assert not counted and again == out[2]
    # Confirmed: neither the replay nor a new click emits again, but counts stay exact.
    state = {**state, "sent": True}
    assert evidence_step(state, clicks[2], ("0", 2), RULES, lambda _: None, None)[2] is None
    state, counted, record = evidence_step(state, clicks[3], ("0", 3), RULES, lambda _: None, None)
    assert counted and record is None and state["co_clicks"] == 4
    assert state["sessions"] == ["s0#0", "s1#0", "s2#0"]  # frozen once emitted: the state stops growing
    codec_for_topic("positive-pairs").encode(out[2])  # fits the schema


def test_held_by_names_the_constraint_and_counts_come_first() -> None:
    lookups = []

    def lookup(listing: str) -> None:
        lookups.append(listing)

    state, _, _ = evidence_step(None, click("s0#0", "a", "b", T0), ("0", 0), RULES, lookup, None)
    assert state["held_by"] == "co_clicks" and lookups == []  # no index lookup before the counts pass
    for i in (1, 2):
        state, _, _ = evidence_step(state, click("s0#0", "a", "b", T0 + i), ("0", i), RULES, lookup, None)
    assert state["held_by"] == "sessions" and lookups == []
    state, _, record = evidence_step(state, click("s1#0", "a", "b", T0 + 3), ("0", 3), RULES, lookup, None)
    assert record is not None and lookups == ["a", "b"]


def test_batches_fold_to_one_state_per_key_and_send_each_pair_once() -> None:
    """A batch gives the states and records one click at a time would, with one write per key."""
    clicks = [click(f"u{i % 3}", "a", "b" if i % 2 else "c", T0 + 1_000 * i) for i in range(12)]
    sessions: dict = {}
    forwarded = sessionize_batch(sessions, clicks, RULES)
    assert [i for i, _ in forwarded] == list(range(12)) and len(sessions) == 3
    store = TableStore(None, evidence_time)
    pairs = [(("0", i), f) for i, f in forwarded]
    sent = evidence_batch(store, pairs + pairs[-2:], RULES, lambda _: None, None, now=T0)  # copies at the end
    changes = dict(store.changes())
    assert set(changes) == {pair_key("a", "b"), pair_key("a", "c")}  # one write per pair for the batch
    assert sorted(k for k, _ in sent) == sorted(changes)  # each positive once, copies not again
    one_by_one = PairMiner(RULES)
    for c in clicks:
        one_by_one.feed(c)
    assert sorted((r["listing_id_b"], r["co_clicks"], r["sessions"]) for _, r in sent) == sorted(
        (r["listing_id_b"], r["co_clicks"], r["sessions"]) for r in one_by_one.emitted)
    mark_sent(store, [k for k, _ in sent])
    assert all(store[k]["sent"] for k, _ in sent) and {k for k, _ in store.changes()} == set(changes)


# --- table store: changes and expiry -----------------------------------------------------------


DAY = 86_400_000


def test_table_store_records_changes_once_per_batch() -> None:
    store = TableStore(None, session_time)
    store["s1"] = [T0, T0]
    store["s1"] = [T0 + 5, T0]
    store["s2"] = [T0 + 1, T0 + 1]
    assert store.changes() == [("s1", [T0 + 5, T0]), ("s2", [T0 + 1, T0 + 1])]
    assert store.changes() == []
    store.load("s3", [T0, T0])  # from the changelog: not written back
    store.load("s1", None)  # a tombstone
    assert store.changes() == [] and set(store) == {"s2", "s3"}
    del store["s2"]
    assert store.changes() == [("s2", None)]


def test_pairs_idle_longer_than_the_ttl_expire_by_event_time() -> None:
    store = TableStore(30 * DAY, evidence_time, evidence_kind)
    for i, key in enumerate(("old", "mid", "new")):
        store[key] = {**new_evidence(), "last_time": T0 + 10 * DAY * i, "held_by": "co_clicks"}
    store.changes()
    assert store.expire() == 0  # the newest is 20 days after the oldest
    store["newest"] = {**new_evidence(), "last_time": T0 + 35 * DAY, "emitted": {"x": 1}}
    assert store.expire() == 1  # "old" is 35 days behind the watermark, "mid" only 25
    assert "old" not in store and "mid" in store
    assert dict(store.changes()) == {"newest": store["newest"], "old": None}  # a tombstone for the changelog
    assert store.kinds["co_clicks"] == 2 and store.kinds["emitted"] == 1
    store["mid"] = {**store["mid"], "last_time": T0 + 34 * DAY}  # clicked again: young, and last in line
    store["newest"] = {**store["newest"], "last_time": T0 + 60 * DAY}
    assert store.expire() == 1 and set(store) == {"mid", "newest"}  # "new" went, "mid" is 26 days behind
    assert TableStore(None, evidence_time).expire() == 0


def test_expired_pair_starts_counting_again() -> None:
    """A pair that expired is new evidence when it is clicked again (and may be mined again)."""
    miner_store = TableStore(30 * DAY, evidence_time)
    first = [(("0", i), click(f"s{i}#0", "a", "b", T0 + i)) for i in range(3)]
    assert len(evidence_batch(miner_store, first, RULES, lambda _: None, None, now=T0)) == 1
    other = [(("0", 10), click("z#0", "c", "d", T0 + 31 * DAY))]
    evidence_batch(miner_store, other, RULES, lambda _: None, None)
    assert miner_store.expire() == 1 and pair_key("a", "b") not in miner_store
    again = [(("0", 20 + i), click(f"t{i}#0", "a", "b", T0 + 31 * DAY + i)) for i in range(2)]
    assert evidence_batch(miner_store, again, RULES, lambda _: None, None) == []  # 2 clicks: not yet
    assert miner_store[pair_key("a", "b")]["co_clicks"] == 2


def test_changelog_values_round_trip() -> None:
    value = {**new_evidence(), "sessions": ["s#0"], "origins": {"0": 3}, "emitted_by": ["0", 3]}
    assert decode_value(encode_value(value)) == value
    assert encode_value(None) is None and decode_value(None) is None


def test_pairs_settings_validation() -> None:
    assert Settings().pairs_evidence_ttl_seconds == 30 * 86_400 and Settings().pairs_enabled
    Settings(pairs_evidence_ttl_seconds=0)  # 0: never expire
    for bad in ({"pairs_evidence_ttl_seconds": -1}, {"pairs_evidence_ttl_seconds": 60},  # < the session gap
                {"pairs_batch_max_records": 0}, {"trainer_max_pairs": 1}):
        with pytest.raises(ConfigError):
            Settings(**bad)


def test_cosine_and_category_come_from_the_index_lookup() -> None:
    vec = {"a": np.array([1.0, 0.0], np.float32), "b": np.array([0.6, 0.8], np.float32)}
    index = {k: (v, {"category": "Home > Mugs"}) for k, v in vec.items()}
    for threshold, ok in ((0.5, True), (0.7, False)):
        miner = PairMiner(PairRules(min_co_clicks=2, min_sessions=2, min_dwell_ms=0, min_cosine=threshold),
                          index.get, "v1")
        for i in range(2):
            miner.feed(click(f"s{i}", "a", "b", T0 + i))
        assert bool(miner.emitted) is ok
    assert miner.evidence[pair_key("a", "b")]["reason"] == "cosine 0.600 < 0.7"


def test_rules_from_settings_and_validation() -> None:
    rules = PairRules.from_settings(Settings(pairs_min_co_clicks=7, pairs_session_gap_seconds=2.5))
    assert rules.min_co_clicks == 7 and rules.session_gap_ms == 2_500
    for bad in ({"pairs_unknown_category": "maybe"}, {"pairs_min_cosine": 2.0}, {"pairs_min_sessions": 0},
                {"pairs_category_level": -1}):
        with pytest.raises(ConfigError):
            Settings(**bad)


# --- simulator ---------------------------------------------------------------------------------


def catalogue(n_products: int = 30) -> tuple[list[ListingRecord], dict[str, str]]:
    records, clusters = [], {}
    for p in range(n_products):
        for shop in ("x", "y"):
            lid = f"{shop}{p}"
            records.append(ListingRecord(lid, f"Brand{p % 3} thing {p}", "", None, shop))
            clusters[lid] = f"c{p}"
    return records, clusters


def test_simulator_is_reproducible_and_fits_the_schema() -> None:
    records, clusters = catalogue()
    a = list(ClickSimulator(records, clusters, seed=3).sessions(200))
    b = list(ClickSimulator(records, clusters, seed=3).sessions(200))
    assert a == b and len(a) >= 200
    codec = codec_for_topic("click-events")
    for c in a[:50]:
        assert codec.decode(codec.encode(c)) == c
    assert all(c["trigger_id"] in clusters and c["clicked_id"] in clusters for c in a)


def test_simulator_clicks_mostly_the_same_product_with_position_bias() -> None:
    records, clusters = catalogue()
    clicks = list(ClickSimulator(records, clusters, seed=0).sessions(3000))
    same = sum(clusters[c["trigger_id"]] == clusters[c["clicked_id"]] for c in clicks) / len(clicks)
    assert 0.4 < same < 0.6  # product_rate 0.5
    positions = Counter(c["position"] for c in clicks if c["position"] is not None)
    assert positions[0] > positions[5]
    product_dwell = np.median([c["dwell_ms"] for c in clicks if clusters[c["trigger_id"]] == clusters[c["clicked_id"]]])
    other_dwell = np.median([c["dwell_ms"] for c in clicks if clusters[c["trigger_id"]] != clusters[c["clicked_id"]]])
    assert product_dwell > 2 * other_dwell


def test_simulator_noise_rates_are_configurable() -> None:
    records, clusters = catalogue()
    clean = ClickModel(product_rate=1.0, category_rate=0.0, cross_category_rate=0.0, random_rate=0.0)
    clicks = list(ClickSimulator(records, clusters, clean, seed=0).sessions(300))
    assert all(clusters[c["trigger_id"]] == clusters[c["clicked_id"]] for c in clicks)
    with pytest.raises(ConfigError):
        ClickModel(product_rate=0.9, random_rate=0.2)


def test_mined_pairs_on_simulated_clicks_are_precise() -> None:
    records, clusters = catalogue()
    miner = PairMiner(PairRules())
    for c in ClickSimulator(records, clusters, seed=1).sessions(1500):
        miner.feed(c)
    pairs = {frozenset((p["listing_id_a"], p["listing_id_b"])) for p in miner.emitted}
    assert len(pairs) == len(miner.emitted) > 20
    true = sum(len({clusters[i] for i in p}) == 1 for p in pairs)
    assert true / len(pairs) >= 0.9


def test_pseudo_category_prefers_category_then_brand_then_first_word() -> None:
    assert pseudo_category(ListingRecord("1", "Sony TV", "", "TVs", None, {"brand": "Sony"})) == "TVs"
    assert pseudo_category(ListingRecord("1", "Sony TV", "", None, None, {"brand": "Sony"})) == "brand:sony"
    assert pseudo_category(ListingRecord("1", "Sony TV", "", None, None)) == "word:sony"


def test_recovery_seeks_and_clears_buffers_before_resuming_source_partitions() -> None:
    """Issue 4: records fetched while Faust seeks after table recovery were dropped, then committed.

    Drives the patched ``Recovery.on_recovery_completed`` with a recording consumer: the stream
    partitions must resume only after the seek and after the flow-control resume that clears the
    stream buffers, and the changelog partitions must stay paused.
    """
    from faust.tables.recovery import Recovery

    seek_before_resuming_streams()
    seek_before_resuming_streams()  # idempotent
    calls: list[object] = []
    source, changelog = ("clicks", 0), ("app-pairs-evidence-changelog", 0)

    async def perform_seek() -> None:
        await asyncio.sleep(0)  # a broker round trip: the fetcher could run meanwhile
        calls.append("seek")

    async def noop(*_: object) -> None:
        return None

    async def wait(coro: object, timeout: float | None = None) -> None:
        await coro  # type: ignore[misc]

    def quiet(*_: object) -> None:
        return None

    consumer = SimpleNamespace(assignment=lambda: {source, changelog}, perform_seek=perform_seek,
                               resume_partitions=lambda tps: calls.append(("resume", set(tps))),
                               resume_flow=lambda: calls.append("resume_flow"))
    app = SimpleNamespace(consumer=consumer, consumer_generation_id=1, on_rebalance_complete=SimpleNamespace(send=noop),
                          conf=SimpleNamespace(broker_request_timeout=5.0),
                          flow_control=SimpleNamespace(resume=lambda: calls.append("clear_buffers")),
                          _fetcher=SimpleNamespace(maybe_start=noop),
                          assignor=SimpleNamespace(assigned_standbys=lambda: set()),
                          on_rebalance_end=lambda: calls.append("ready"))
    recovery = SimpleNamespace(app=app, log=SimpleNamespace(info=quiet, dev=quiet, warning=quiet),
                               _set_recovery_ended=lambda: None, tables={}, actives_for_table={},
                               standbys_for_table={}, completed=SimpleNamespace(set=lambda: None), _wait=wait,
                               _is_changelog_tp=lambda tp: tp[0].endswith("-changelog"))
    recovery.tables = SimpleNamespace(values=lambda: [], on_actives_ready=lambda: None,
                                      on_standbys_ready=lambda: None)
    asyncio.run(Recovery.on_recovery_completed(recovery, 1))  # type: ignore[arg-type]
    assert calls == ["seek", "clear_buffers", ("resume", {source}), "resume_flow", "ready"]
    # The same order for an app without tables (the embed and index agents of every worker).
    calls.clear()
    asyncio.run(Recovery._resume_streams(recovery, 1))  # type: ignore[arg-type]
    assert calls == ["seek", "clear_buffers", ("resume", {source}), "resume_flow", "ready"]
