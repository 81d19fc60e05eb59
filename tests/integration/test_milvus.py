"""Workers on the Milvus index backend: no replica, every worker writes and reads one index.

Real tansu broker, real worker processes, real Milvus Lite: a ``milvus-lite server`` process that
several workers share through its ``http://`` URI (a ``*.db`` file is one process's only), or the
demo's single worker running Milvus Lite in process on a file of its state directory.
"""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from samestyle.streams.dev.broker import free_port
from samestyle.streams.io.producer import Outputs
from tests.integration.conftest import Stack, text_listing
from tests.integration.test_faults import group_committed_and_ends, scrape, total
from tests.integration.test_model_switch import health, switch_during_traffic, versions_by_listing

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from samestyle.index_store.milvus import MilvusBackend, milvus_lite_server
from samestyle.topics import LISTING_EMBEDDINGS

pytestmark = pytest.mark.integration


@pytest.fixture
def milvus(tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """A ``milvus-lite server`` process of this test's own: ``(uri, process)``."""
    with milvus_lite_server(tmp_path / "milvus" / "index.db") as server:
        yield server


def on_milvus(stack: Stack, uri: str, **overrides: Any) -> Stack:
    """Point ``stack``'s workers at ``uri``, with collection names of this test's own."""
    stack.settings = stack.settings.replace(index_backend="milvus", milvus_uri=uri,
                                            milvus_prefix=f"t{uuid.uuid4().hex[:8]}", **overrides)
    return stack


def catalogue(prefix: str, n: int) -> list[dict[str, Any]]:
    """Listings whose titles differ in a word, not only a number: no two are near copies."""
    words = ["oak", "walnut", "enamel", "linen", "glass", "steel", "cork", "clay", "jute", "slate", "wool", "brass"]
    return [text_listing(f"{prefix}-{i:03d}", f"{words[i % 12]} {words[(i // 12) % 12]} {prefix} tray no {i}")
            for i in range(n)]


def copies_of(listings: list[dict[str, Any]], step: int = 3) -> list[dict[str, Any]]:
    """Same-supplier exact copies (new id, later event time) of every ``step``-th listing."""
    return [dict(x, listing_id=f"copy-{x['listing_id']}", event_time=x["event_time"] + 1) for x in listings[::step]]


def wait_all_processed(stack: Stack, timeout: float = 60) -> None:
    """Until the group committed every listing-embeddings record: nothing is left to replay."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        committed, ends = group_committed_and_ends(stack.settings, LISTING_EMBEDDINGS)
        if committed == ends:
            return
        time.sleep(1)
    raise AssertionError(f"committed {committed}, ends {ends}")


def planted(copies: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(c["listing_id"], c["listing_id"].removeprefix("copy-")) for c in copies}


def assert_every_pair_alerted_once(out: Outputs, pairs: set[tuple[str, str]]) -> None:
    counts = Counter((a["listing_id"], a["duplicate_of"]) for a in out.alerts)
    assert set(counts) == pairs
    assert [p for p, n in counts.items() if n > 1] == []


def test_two_workers_share_one_milvus_and_hold_no_replica(stack: Stack, milvus: tuple[str, Any]) -> None:
    uri, _ = milvus
    on_milvus(stack, uri, duplicate_threshold=0.999)
    ports = [free_port(), free_port()]
    workers = [stack.start_worker(name, web_port=port, state_dir=stack.tmp / f"state-{name}")
               for name, port in zip(("w1", "w2"), ports)]
    for w in workers:
        w.wait_for_log("web server listening", timeout=90)
    originals = catalogue("orig", 36)
    stack.produce(originals)
    stack.collect(lambda o: {x["listing_id"] for x in originals} <= o.indexed_ids)
    copies = copies_of(originals)
    stack.produce(copies)
    every = {x["listing_id"] for x in originals + copies}
    out = stack.collect(lambda o: every <= o.indexed_ids and len(o.alerts) >= len(copies))
    wait_all_processed(stack)
    out = stack.collect(lambda o: every <= o.indexed_ids)

    assert_every_pair_alerted_once(out, planted(copies))
    similar = {m["listing_id"]: m for m in out.similar}
    for c in copies:  # each copy's nearest neighbour is its original, whichever worker wrote that
        assert similar[c["listing_id"]]["neighbours"][0]["listing_id"] == c["listing_id"].removeprefix("copy-")
    client = MilvusBackend(uri, n_views=3, prefix=stack.settings.milvus_prefix)
    try:
        version = client.active
        assert version is not None and sorted(client.ids(version)) == sorted(every)
    finally:
        client.close()
    for w, port in zip(workers, ports):
        state = health(port)
        assert state["ok"] and state["index_backend"] == "milvus" and state["index_vectors"] == len(every)
        consumers = {dict(labels).get("consumer") for (name, labels) in scrape(port)
                     if name == "samestyle_consumer_lag_messages"}
        assert "replica" not in consumers  # no replica: nothing reads listing-embeddings but the group
        assert not any((stack.tmp / f"state-{w.settings.worker_id}").glob("index-*"))  # no snapshots
    # The search API of either worker reads the shared index.
    target = copies[0]["listing_id"]
    with urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/listings/{target}/duplicates", timeout=10) as r:
        body = json.loads(r.read())
    assert [x["listing_id"] for x in body["results"]] == [target.removeprefix("copy-")]
    assert body["results"][0]["duplicate"] and body["results"][0]["scores"]["text"] == pytest.approx(1.0, abs=1e-4)
    request = urllib.request.Request(f"http://127.0.0.1:{ports[0]}/search", method="POST",
                                     data=json.dumps({"text": originals[5]["title"], "k": 3}).encode())
    with urllib.request.urlopen(request, timeout=30) as r:
        found = json.loads(r.read())
    assert found["index_size"] == len(every) and len(found["results"]) == 3
    for w in workers:
        assert w.stop() == 0


def test_a_promoted_model_gets_its_own_collection_and_the_alias_moves_when_it_is_complete(
        stack: Stack, milvus: tuple[str, Any], tmp_path: Path) -> None:
    uri, _ = milvus
    on_milvus(stack, uri)
    ports = [free_port(), free_port()]
    for name, port in zip(("w1", "w2"), ports):
        stack.start_worker(name, web_port=port, state_dir=tmp_path / f"state-{name}").wait_for_log(
            "web server listening", timeout=90)
    v1, v2, every = switch_during_traffic(stack, tmp_path, ports, timeout=120)
    client = MilvusBackend(uri, n_views=3, prefix=stack.settings.milvus_prefix)
    try:
        assert client.active == v2 and sorted(client.ids(v2)) == sorted(every)
        assert set(client.versions()) <= {v1, v2}  # the old one is dropped a minute after the switch
    finally:
        client.close()
    stack.produce([text_listing("copy-7", "walnut chopping board 7")])
    outputs = stack.collect(lambda o: (every | {"copy-7"}) <= o.indexed_ids)
    [message] = [m for m in outputs.similar if m["listing_id"] == "copy-7"]
    assert message["model_version"] == v2 and message["neighbours"][0]["listing_id"] == "old-007"
    seen = versions_by_listing(outputs)
    assert every <= set(seen) and {v for vs in seen.values() for v in vs} <= {v1, v2}  # no gap
    assert sum(total(scrape(p), "samestyle_reembedded_total") for p in ports) >= 30


# ---------------------------------------------------------------------------------------------
# the demo on both backends


def stack_of(broker: Any, tmp: Path, **settings: Any) -> Stack:
    """Another isolated deployment on the shared broker (what the ``stack`` fixture builds)."""
    from samestyle.streams.dev.broker import create_topics
    from samestyle.streams.settings import Settings
    from samestyle.topics import topic_specs

    run = uuid.uuid4().hex[:8]
    s = Settings(bootstrap=broker.bootstrap, topic_prefix=f"t{run}-", app_id=f"samestyle-test-{run}",
                 state_dir=tmp / "state", web_port=0, **settings)
    create_topics(broker.bootstrap, topic_specs(s.topic_prefix, app_id=s.app_id).values())
    tmp.mkdir(parents=True, exist_ok=True)
    return Stack(s, topic_specs(s.topic_prefix), tmp)


def neighbours_via_api(port: int, ids: list[str], k: int) -> dict[str, list[tuple[str, float]]]:
    out = {}
    for listing_id in ids:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/listings/{listing_id}/similar?k={k}", timeout=30) as r:
            out[listing_id] = [(x["listing_id"], x["score"]) for x in json.loads(r.read())["results"]]
    return out


def same_up_to_ties(a: list[tuple[str, float]], b: list[tuple[str, float]], tol: float = 1e-4) -> bool:
    """Equal scores in order, and the same ids once equal scores may swap places (the last of a
    tie may fall off either list's end)."""
    if len(a) != len(b) or any(abs(x[1] - y[1]) > tol for x, y in zip(a, b)):
        return False
    last = min(x[1] for x in a) if a else 0.0
    firm = lambda xs: {i for i, s in xs if s > last + tol}
    return firm(a) == firm(b)


@pytest.mark.slow
def test_the_demo_gives_the_same_outputs_on_milvus_as_on_faiss(broker: Any, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """``samestyle demo`` with SAMESTYLE_INDEX_BACKEND=milvus passes what test_demo asks of FAISS; and
    the demo's catalogue through a FAISS worker and a Milvus worker side by side (the pretrained
    encoder) gives the same listings indexed, the same alerts and the same similar-products (equal
    up to ties: both searches are exact), in the stream and in the final index."""
    from samestyle.models.data import read_clusters, read_listings
    from samestyle.streams.cli.main import main
    from samestyle.streams.dev.demo import image_folder, similar_quality
    from samestyle.streams.dev.sample import generate_sample
    from samestyle.streams.io.producer import listing_message

    monkeypatch.setenv("SAMESTYLE_INDEX_BACKEND", "milvus")
    assert main(["demo", "--json", "--timeout", "300"]) == 0
    summary = json.loads(capsys.readouterr().out)
    monkeypatch.delenv("SAMESTYLE_INDEX_BACKEND")
    assert summary["listings_produced"] == summary["listings_indexed"] == summary["similar_products"] == 56
    assert summary["dead_letters"] == 0 and summary["true_duplicate_pairs"] == 10
    assert summary["alert_recall"] > 0 and summary["alert_precision"] > 0.5  # what test_demo asks of FAISS

    listings_csv, clusters_csv = generate_sample(tmp_path / "sample")
    records = read_listings(listings_csv)
    messages = [listing_message(r) for r in records]
    order = [r.listing_id for r in records]
    common = {"image_base_dir": image_folder(records), "encoder": "default"}
    faiss = stack_of(broker, tmp_path / "faiss", **common)
    milvus_ = stack_of(broker, tmp_path / "milvus", index_backend="milvus", **common)
    ports = [free_port(), free_port()]
    for s, port in zip((faiss, milvus_), ports):
        s.start_worker("w1", web_port=port)
    try:
        for s in (faiss, milvus_):
            s.workers[0].wait_for_log("web server listening", timeout=180)
        # One listing at a time, each indexed on both before the next: every search then sees
        # exactly the listings before it on both backends, and the outputs must agree.
        for k, message in enumerate(messages):
            for s in (faiss, milvus_):
                s.produce([message])
            wanted = set(order[:k + 1])
            outs = [s.collect(lambda o, wanted=wanted: wanted <= o.indexed_ids, timeout=120)
                    for s in (faiss, milvus_)]
        for s in (faiss, milvus_):
            wait_all_processed(s)
        outs = [s.collect(lambda o: set(order) <= o.indexed_ids) for s in (faiss, milvus_)]
        on_faiss, on_milvus = outs
        assert on_faiss.indexed_ids == on_milvus.indexed_ids == set(order)
        assert len(on_faiss.similar) == len(on_milvus.similar) == len(order)
        pairs = [{(a["listing_id"], a["duplicate_of"]) for a in o.alerts} for o in outs]
        assert pairs[0] == pairs[1] and len(pairs[1]) == len(on_milvus.alerts)
        streamed = [{m["listing_id"]: [(n["listing_id"], n["score"]) for n in m["neighbours"]] for m in o.similar}
                    for o in outs]
        differ = [i for i in order if not same_up_to_ties(streamed[0][i], streamed[1][i])]
        assert differ == [], {i: (streamed[0][i], streamed[1][i]) for i in differ[:3]}
        # The final index: every listing's neighbours through each worker's search API, both exact.
        final = [neighbours_via_api(port, order, 10) for port in ports]
        differ = [i for i in order if not same_up_to_ties(final[0][i], final[1][i])]
        assert differ == [], {i: (final[0][i], final[1][i]) for i in differ[:3]}
        clusters = read_clusters(clusters_csv)
        quality = [similar_quality(o.similar, clusters, order) for o in outs]
        assert quality[0] == quality[1]
        print(json.dumps({"alert_pairs": len(pairs[1]), "similar_quality": quality[1]}))
    finally:
        faiss.stop()
        milvus_.stop()
