"""Settings and the per-batch steps of the agents, without a broker (tiny random-weight models)."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from samestyle.index_store import LiveIndex
from samestyle.models import ListingInput, create_encoder
from samestyle.models.encoder import DuplicateScorer, PairCandidate
from samestyle.streams.settings import DEFAULT_COSINE_THRESHOLD, Settings
from samestyle.streams.switch.indexes import ModelIndexes
from samestyle.streams.worker.pipeline import (
    VIEWS,
    EmbeddingUpdate,
    EmbedStep,
    Incoming,
    SearchStep,
    decode_embedding,
    match_text_of,
)
from samestyle.topics import DEAD_LETTERS, DUPLICATE_ALERTS, LISTINGS, SIMILAR_PRODUCTS, codec_for_topic
from samestyle.topics.errors import ConfigError

# ---------------------------------------------------------------------------------- settings


def test_settings_read_the_environment_and_overrides_win() -> None:
    env = {"SAMESTYLE_BOOTSTRAP": "k1:9092,k2:9092", "SAMESTYLE_TOP_K": "7", "SAMESTYLE_DUPLICATE_THRESHOLD": "0.8",
           "SAMESTYLE_ALLOW_RANDOM_WEIGHTS": "yes", "SAMESTYLE_STATE_DIR": "/tmp/x", "SAMESTYLE_PARTITIONS": ""}
    s = Settings.from_env(env, top_k=3)
    assert s.bootstrap_servers == ["k1:9092", "k2:9092"]
    assert s.broker_url == "kafka://k1:9092;kafka://k2:9092"
    assert s.top_k == 3 and s.duplicate_threshold == 0.8 and s.allow_random_weights is True
    assert s.state_dir == Path("/tmp/x") and s.partitions is None


def test_settings_round_trip_through_the_environment() -> None:
    s = Settings(bootstrap="h:1", topic_prefix="p-", top_k=4, allow_random_weights=True, state_dir=Path("/s"))
    assert Settings.from_env(s.to_env()) == s


@pytest.mark.parametrize("env, message", [
    ({"SAMESTYLE_TOP_K": "many"}, "SAMESTYLE_TOP_K"),
    ({"SAMESTYLE_ALLOW_RANDOM_WEIGHTS": "maybe"}, "boolean"),
    ({"SAMESTYLE_DUPLICATE_THRESHOLD": "1.5"}, "duplicate_threshold"),
    ({"SAMESTYLE_INDEX_KIND": "ivf"}, "index_kind"),
    ({"SAMESTYLE_HEARTBEAT_INTERVAL_SECONDS": "10"}, "heartbeat"),
])
def test_bad_settings_fail_with_a_clear_message(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_no_bootstrap_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="SAMESTYLE_BOOTSTRAP"):
        Settings().broker_url


# ---------------------------------------------------------------------------------- embed step


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("tiny", "cpu", allow_random_weights=True)


def listing(listing_id: str, title: str | None = "Red mug", **extra: object) -> dict:
    record = {"listing_id": listing_id, "supplier_id": "s1", "category": "mugs", "title": title,
              "description": "ceramic", "attributes": {"size": "350 ml"}, "image_uri": None, "image_bytes": None,
              "op": "UPSERT", "event_time": 1_700_000_000_000}
    record.update(extra)
    return record


def incoming(records: list[dict | bytes]) -> list[Incoming]:
    out = []
    for offset, r in enumerate(records):
        value = r if isinstance(r, bytes) else codec_for_topic(LISTINGS).encode(r)
        out.append(Incoming(b"k", value, "listings", 0, offset))
    return out


def png_bytes(colour: tuple[int, int, int] = (10, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_embed_step_keeps_order_and_passes_deletes_through(encoder) -> None:
    step = EmbedStep(encoder, Settings())
    batch = incoming([listing("a", image_bytes=png_bytes()), listing("a", op="DELETE", title=None),
                      listing("b", supplier_id=None)])
    out, failures = step(batch)
    assert not failures
    records = [codec_for_topic("listing-embeddings").decode(o.value) for o in out]
    assert [(r["listing_id"], r["op"]) for r in records] == [("a", "UPSERT"), ("a", "DELETE"), ("b", "UPSERT")]
    assert records[0]["has_image"] and records[0]["vector_image"] is not None
    assert not records[2]["has_image"] and records[2]["vector_image"] is None
    assert records[2]["supplier_id"] == "_catalogue"  # no supplier: one catalogue-wide supplier
    update = decode_embedding(out[0].value)
    assert update.views is not None and update.views.shape == (len(VIEWS), encoder.dim)
    assert np.linalg.norm(update.vector) == pytest.approx(1.0, abs=1e-5)


def test_embed_step_reports_each_bad_message_and_embeds_the_rest(encoder) -> None:
    step = EmbedStep(encoder, Settings(max_text_chars=1000))
    batch = incoming([b"\x00garbage", listing("no-title", title=" "), listing("huge", description="x" * 5000),
                      listing("bad-img", image_bytes=b"not an image"), listing("ok")])
    out, failures = step(batch)
    assert [decode_embedding(o.value).listing_id for o in out] == ["ok"]
    kinds = {f.incoming.offset: type(f.error).__name__ for f in failures}
    assert kinds == {0: "DecodeError", 1: "InvalidListingError", 2: "InvalidListingError", 3: "ImageError"}
    letter = codec_for_topic(DEAD_LETTERS).decode(failures[0].dead_letter())
    assert letter["original_value"] == b"\x00garbage" and letter["offset"] == 0 and letter["stage"] == "embed"


def test_an_image_without_a_title_is_a_listing(encoder) -> None:
    step = EmbedStep(encoder, Settings())
    out, failures = step(incoming([listing("photo", title=None, description=None, attributes={},
                                           image_bytes=png_bytes()),
                                   listing("nothing", title=None, description="only words")]))
    assert [type(f.error).__name__ for f in failures] == ["InvalidListingError"]
    assert "no title and no image" in str(failures[0].error)
    [record] = [codec_for_topic("listing-embeddings").decode(o.value) for o in out]
    assert record["listing_id"] == "photo" and record["has_image"]
    update = decode_embedding(out[0].value)
    assert np.allclose(update.views[1], 0.0)  # no text: a zero T view
    assert np.linalg.norm(update.views[0]) == pytest.approx(1.0, abs=1e-5)


# ---------------------------------------------------------------------------------- index + search


def update(listing_id: str, vec: np.ndarray, supplier: str = "s1", event_time: int = 0, op: str = "UPSERT",
           image: np.ndarray | None = None, text: str | None = None) -> EmbeddingUpdate:
    """``text``: the listing's match_text (None: none in the payload, the title ``listing_id`` is used)."""
    vec = (vec / np.linalg.norm(vec)).astype(np.float32)
    has_image = image is not None
    views = np.stack([image if has_image else np.zeros_like(vec), vec, vec]) if op != "DELETE" else None
    payload = {"supplier_id": supplier, "category": None, "title": listing_id,
               "event_time": event_time, "has_image": has_image}
    if text is not None:
        payload["match_text"] = text
    return EmbeddingUpdate(listing_id, supplier, op, "test-v1", event_time, has_image, views, payload,
                           vectors={"test-v1": views} if views is not None else {})


def apply_updates(index: LiveIndex, updates: list[EmbeddingUpdate]) -> None:
    """Apply through the production applier (the replica's), with ``index`` as version test-v1."""
    ModelIndexes("flat", n_views=3, indexes={"test-v1": index}).apply(updates)


def test_apply_updates_lets_the_last_op_per_listing_win() -> None:
    index = LiveIndex(4, n_views=3)
    e = np.eye(4, dtype=np.float32)
    apply_updates(index, [update("a", e[0]), update("a", e[0], op="DELETE"), update("b", e[1]),
                          update("b", e[2]), update("c", e[3], op="DELETE")])
    assert index.ids() == ["b"]
    np.testing.assert_allclose(index.get("b")[0], e[2])
    apply_updates(index, [update("b", e[2])])  # replay: same state
    assert len(index) == 1


def test_search_alerts_once_per_pair_within_a_supplier_above_the_threshold() -> None:
    index = LiveIndex(3, n_views=3)
    settings = Settings(duplicate_threshold=0.95, top_k=5)
    base = np.array([1.0, 0.0, 0.0])
    updates = [update("old", base, event_time=1), update("new", base + [0, 0.05, 0], event_time=2),
               update("other-supplier", base, supplier="s2", event_time=3),
               update("far", np.array([0.0, 1.0, 0.0]), event_time=4)]
    apply_updates(index, updates)
    similar, alerts = SearchStep(index, settings)(updates)
    assert len(similar) == 4
    decoded = [codec_for_topic(DUPLICATE_ALERTS).decode(a.value) for a in alerts]
    # "old" and "new" find each other: one alert, naming the newer listing as the copy of the older.
    assert [(a["listing_id"], a["duplicate_of"]) for a in decoded] == [("new", "old")]
    assert alerts[0].key == b"new" and decoded[0]["event_time"] == 2
    assert decoded[0]["scores"]["image"] is None  # neither has an image
    assert decoded[0]["score"] >= 0.95
    assert SearchStep(index, settings)(updates)[1]  # a fresh step (another worker) may alert again ...
    step = SearchStep(index, settings)
    step(updates)
    assert step(updates)[1] == []  # ... but one step never alerts a pair twice
    first = codec_for_topic(SIMILAR_PRODUCTS).decode(similar[0].value)
    assert first["listing_id"] == "old"
    assert [n["listing_id"] for n in first["neighbours"]][:2] in (["other-supplier", "new"], ["new", "other-supplier"])
    assert "old" not in [n["listing_id"] for n in first["neighbours"]]


def test_the_readme_documents_every_setting() -> None:
    import dataclasses

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    missing = [f"SAMESTYLE_{f.name.upper()}" for f in dataclasses.fields(Settings)
               if f"`SAMESTYLE_{f.name.upper()}`" not in readme]
    assert not missing, f"README's configuration table lacks {missing}"


def test_a_copy_searched_before_its_original_arrived_is_alerted_by_the_original() -> None:
    # The copy's search ran while the original (another partition) was not in the replica yet.
    index = LiveIndex(3, n_views=3)
    step = SearchStep(index, Settings(duplicate_threshold=0.9))
    base = np.array([0.0, 0.0, 1.0])
    copy, original = update("copy", base, event_time=20), update("original", base, event_time=10)
    apply_updates(index, [copy])
    assert step([copy])[1] == []
    apply_updates(index, [original])
    decoded = [codec_for_topic(DUPLICATE_ALERTS).decode(a.value) for a in step([original])[1]]
    assert [(a["listing_id"], a["duplicate_of"], a["event_time"]) for a in decoded] == [("copy", "original", 20)]


def test_the_app_consumes_with_the_configured_fetch_wait(tmp_path: Path) -> None:
    from samestyle.streams.worker.app import create_app
    from samestyle.streams.worker.transport import Consumer, Transport

    settings = Settings(bootstrap="127.0.0.1:1", web_port=0, state_dir=tmp_path, consumer_fetch_max_wait_seconds=0.25)
    app = create_app(settings, encoder=create_encoder("tiny", "cpu", allow_random_weights=True))
    assert isinstance(app.transport, Transport)
    assert app.transport.Consumer is Consumer
    # Faust alone waits 1500 ms per fetch; the aiokafka consumer the worker's consumer thread
    # builds (not started: no broker here) must carry the configured wait instead.

    async def built_consumer_wait_ms() -> int:
        thread = app.consumer._thread  # the worker's consumer thread (never started here)
        aio = thread._create_worker_consumer(app.transport)
        try:
            return int(aio._fetch_max_wait_ms)
        finally:
            await aio.stop()
            thread.thread_loop.close()  # the thread never ran: its loop is ours to close

    assert asyncio.run(built_consumer_wait_ms()) == 250


# ---------------------------------------------------------------------------------- duplicate decision


class TextScorer(DuplicateScorer):
    """A deterministic stand-in for a model's classifier: one product when the match texts agree."""

    def __init__(self, threshold: float = 0.5, same: float = 0.9, different: float = 0.1) -> None:
        self.threshold = threshold
        self.same, self.different = same, different
        self.calls: list[list[PairCandidate]] = []

    def probabilities(self, candidates):
        self.calls.append(list(candidates))
        return np.array([self.same if c.text_a == c.text_b else self.different for c in candidates],
                        dtype=np.float32)


def at_cosine(cos: float, axis: int, dim: int = 6) -> np.ndarray:
    """A unit vector with the given cosine to e0, leaning towards ``axis``."""
    v = np.zeros(dim)
    v[0], v[axis] = cos, np.sqrt(1.0 - cos * cos)
    return v


def mug_index() -> tuple[LiveIndex, EmbeddingUpdate]:
    """A query listing, a same-text copy at cosine 0.6 (below 0.82) and a different product of the
    same supplier at cosine 0.99 (above it), both older than the query."""
    index = LiveIndex(6, n_views=3)
    copy = update("copy", at_cosine(0.6, 1), event_time=1, text="Red ceramic mug 350 ml")
    lookalike = update("lookalike", at_cosine(0.99, 2), event_time=2, text="Blue ceramic mug 350 ml")
    query = update("query", at_cosine(1.0, 1), event_time=3, text="Red ceramic mug 350 ml")
    apply_updates(index, [copy, lookalike, query])
    return index, query


def decoded_alerts(alerts) -> dict[str, dict]:
    out = {}
    for a in alerts:
        record = codec_for_topic(DUPLICATE_ALERTS).decode(a.value)
        out[record["duplicate_of"]] = record
    return out


def test_settings_default_to_the_models_threshold_with_a_cosine_fallback() -> None:
    assert Settings().duplicate_threshold is None
    assert Settings().effective_cosine_threshold == DEFAULT_COSINE_THRESHOLD == 0.82
    assert Settings(duplicate_threshold=0.7).effective_cosine_threshold == 0.7
    assert "SAMESTYLE_DUPLICATE_THRESHOLD" not in Settings().to_env()
    assert Settings.from_env(Settings(duplicate_threshold=0.3).to_env()).duplicate_threshold == 0.3


def test_with_a_scorer_the_models_classifier_decides_not_the_cosine() -> None:
    index, query = mug_index()
    scorer = TextScorer(threshold=0.5)
    similar, alerts = SearchStep(index, Settings(), scorer)([query])
    assert len(similar) == 1
    by_other = decoded_alerts(alerts)
    # The copy is below the cosine threshold but its probability passes; the look-alike is the
    # other way round and is not alerted.
    assert set(by_other) == {"copy"}
    alert = by_other["copy"]
    assert (alert["listing_id"], alert["duplicate_of"]) == ("query", "copy")
    assert alert["decided_by"] == "classifier"
    assert alert["probability"] == pytest.approx(0.9)
    assert alert["threshold"] == pytest.approx(0.5)
    assert alert["score"] == pytest.approx(0.6, abs=1e-5)  # the image+text cosine is still carried
    assert alert["scores"]["image_text"] == pytest.approx(0.6, abs=1e-5)
    assert "probability 0.900 >= 0.500" in alert["reason"] and "same supplier" in alert["reason"]
    # Both neighbours were scored, in one call.
    assert len(scorer.calls) == 1 and {c.text_b for c in scorer.calls[0]} == {
        "Red ceramic mug 350 ml", "Blue ceramic mug 350 ml"}


def test_the_streams_candidate_pairs_are_the_ones_the_matcher_trained_on() -> None:
    """Rank and margin, overall and among the neighbour's own source, as training computes them."""
    from samestyle.models.text import match_text
    from samestyle.models.train.finetune import candidates_for

    index = LiveIndex(6, n_views=3)
    older = {"a1": (at_cosine(0.95, 2), "shop-a"), "b1": (at_cosine(0.9, 1), "shop-b"),
             "a2": (at_cosine(0.8, 3), "shop-a"), "b2": (at_cosine(0.7, 4), "shop-b"), "n1": (at_cosine(0.6, 5), "")}
    texts = {k: match_text(f"mug {k}", {"source": src} if src else {}) for k, (_, src) in older.items()}
    texts["q"] = match_text("mug q", {"source": "shop-a"})
    updates = [update(k, v, event_time=1, text=texts[k]) for k, (v, _) in older.items()]
    query = update("q", at_cosine(1.0, 1), event_time=2, text=texts["q"])
    apply_updates(index, updates + [query])
    scorer = TextScorer()
    SearchStep(index, Settings(), scorer)([query])
    streamed = {c.text_b: c for c in scorer.calls[0]}
    vectors = {u.listing_id: u.views[2] for u in updates + [query]}
    trained = candidates_for([("q", k) for k in older], vectors, list(older), texts)
    assert len(streamed) == len(trained) == 5
    for c in trained:
        s = streamed[c.text_b]
        assert (s.rank, s.source_rank) == (c.rank, c.source_rank)
        assert s.best_other == pytest.approx(c.best_other, abs=1e-5)
        assert (s.source_best_other is None) == (c.source_best_other is None)
        if c.source_best_other is not None:
            assert s.source_best_other == pytest.approx(c.source_best_other, abs=1e-5)
    b2 = streamed[texts["b2"]]
    assert (b2.rank, b2.source_rank) == (3, 1) and b2.source_best_other == pytest.approx(0.9, abs=1e-5)
    assert streamed[texts["n1"]].source_rank is None  # no source: the overall rank stands in


def test_with_a_scorer_similar_products_are_in_the_matchers_order() -> None:
    index, query = mug_index()
    # Another supplier's copy: a similar product to recommend, never a duplicate alert.
    apply_updates(index, [update("elsewhere", at_cosine(0.3, 3), supplier="s2", event_time=2,
                                 text="Red ceramic mug 350 ml")])
    scorer = TextScorer(threshold=0.5)
    similar, alerts = SearchStep(index, Settings(), scorer)([query])
    record = codec_for_topic(SIMILAR_PRODUCTS).decode(similar[0].value)
    # Dense order is lookalike (0.99), copy (0.6), elsewhere (0.3); the matcher puts the two
    # same-text listings first (ties by cosine), and each score stays the cosine.
    assert [n["listing_id"] for n in record["neighbours"]] == ["copy", "elsewhere", "lookalike"]
    assert [round(n["score"], 3) for n in record["neighbours"]] == [0.6, 0.3, 0.99]
    assert set(decoded_alerts(alerts)) == {"copy"}
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 3  # every neighbour, one call
    # Without a scorer: cosine order.
    plain = codec_for_topic(SIMILAR_PRODUCTS).decode(SearchStep(index, Settings())([query])[0][0].value)
    assert [n["listing_id"] for n in plain["neighbours"]] == ["lookalike", "copy", "elsewhere"]


def test_the_scorer_is_given_per_call_with_the_index_it_belongs_to() -> None:
    index, query = mug_index()
    step = SearchStep(None, Settings())
    assert set(decoded_alerts(step([query], index, TextScorer())[1])) == {"copy"}
    # The same step searching a model without a classifier (None given with its index): the cosine rule.
    assert set(decoded_alerts(step([query], index, None)[1])) == {"lookalike"}
    assert step.scorer is None


def test_an_explicit_threshold_overrides_the_models() -> None:
    index, query = mug_index()
    strict = SearchStep(index, Settings(duplicate_threshold=0.95), TextScorer(threshold=0.5))
    assert strict([query])[1] == []  # 0.9 < 0.95: nothing, although the model's 0.5 would alert
    lenient = SearchStep(index, Settings(duplicate_threshold=0.05), TextScorer(threshold=0.5))
    by_other = decoded_alerts(lenient([query])[1])
    assert set(by_other) == {"copy", "lookalike"}  # 0.1 >= 0.05: the look-alike too
    assert all(a["threshold"] == pytest.approx(0.05) and a["decided_by"] == "classifier" for a in by_other.values())
    assert "SAMESTYLE_DUPLICATE_THRESHOLD" in by_other["lookalike"]["reason"]


def test_without_a_scorer_the_cosine_rule_decides() -> None:
    index, query = mug_index()
    by_other = decoded_alerts(SearchStep(index, Settings())([query])[1])
    assert set(by_other) == {"lookalike"}
    alert = by_other["lookalike"]
    assert alert["decided_by"] == "cosine" and alert["probability"] is None
    assert alert["threshold"] == pytest.approx(DEFAULT_COSINE_THRESHOLD)
    assert alert["score"] == pytest.approx(0.99, abs=1e-5)
    assert alert["reason"].startswith("image+text cosine 0.990 >= 0.820")
    # An explicit threshold is a cosine for a model without a classifier.
    by_other = decoded_alerts(SearchStep(index, Settings(duplicate_threshold=0.5))([query])[1])
    assert set(by_other) == {"copy", "lookalike"}
    assert by_other["copy"]["threshold"] == pytest.approx(0.5) and by_other["copy"]["decided_by"] == "cosine"


def test_the_scorer_sees_rank_and_best_other_among_the_querys_neighbours() -> None:
    index = LiveIndex(6, n_views=3)
    apply_updates(index, [update("near", at_cosine(0.95, 1), supplier="s2", text="a"),  # rank 0
                          update("mid", at_cosine(0.9, 2), text="b"),  # rank 1
                          update("far", at_cosine(0.5, 3), text="c")])  # rank 2
    scorer = TextScorer()
    step = SearchStep(index, Settings(top_k=3), scorer)
    query = update("query", at_cosine(1.0, 4), text="q")  # searched, not in the index
    step([query])
    [call] = scorer.calls
    got = {c.text_b: c for c in call}
    # every neighbour (the other supplier's too: it orders the similar-products list)
    assert set(got) == {"a", "b", "c"} and {c.text_a for c in call} == {"q"}
    assert (got["a"].rank, got["a"].best_other) == (0, pytest.approx(0.9, abs=1e-5))
    assert (got["b"].rank, got["b"].cosine, got["b"].best_other) == (1, pytest.approx(0.9, abs=1e-5),
                                                                     pytest.approx(0.95, abs=1e-5))
    assert (got["c"].rank, got["c"].cosine, got["c"].best_other) == (2, pytest.approx(0.5, abs=1e-5),
                                                                     pytest.approx(0.95, abs=1e-5))
    # The nearest neighbour's best other is the second nearest.
    scorer.calls.clear()
    step([update("query-s2", at_cosine(1.0, 4), supplier="s2", text="q2")])
    [call] = scorer.calls
    nearest = next(c for c in call if c.text_b == "a")
    assert (nearest.rank, nearest.best_other) == (0, pytest.approx(0.9, abs=1e-5))
    # A lone neighbour has no other: -1.0.
    scorer.calls.clear()
    SearchStep(index, Settings(top_k=1), scorer)([update("query-s2", at_cosine(1.0, 4), supplier="s2", text="q2")])
    [[lone]] = scorer.calls
    assert (lone.text_b, lone.rank, lone.best_other) == ("a", 0, -1.0)
    # A whole batch is one probabilities() call.
    scorer.calls.clear()
    step([query, update("query-s2", at_cosine(1.0, 4), supplier="s2", text="q2")])
    assert len(scorer.calls) == 1 and len(scorer.calls[0]) == 6  # both queries' three neighbours


class VectorScorer(TextScorer):
    """A scorer that reads the candidates' ids and vectors (as a matcher with a product memory)."""

    @property
    def uses_vectors(self) -> bool:
        return True


def test_a_scorer_that_reads_vectors_gets_both_listings_ids_and_image_text_vectors() -> None:
    index = LiveIndex(6, n_views=3)
    near, far = at_cosine(0.95, 1), at_cosine(0.5, 3)
    apply_updates(index, [update("near", near, text="a"), update("far", far, text="c")])
    query = update("query", at_cosine(1.0, 4), text="q")
    scorer = VectorScorer()
    SearchStep(index, Settings(top_k=3), scorer)([query])
    [call] = scorer.calls
    got = {c.id_b: c for c in call}
    assert set(got) == {"near", "far"} and {c.id_a for c in call} == {"query"}
    for other, vector in (("near", near), ("far", far)):
        assert np.allclose(got[other].vector_b, index.views([other])[0, 2])
        assert np.allclose(got[other].vector_b, vector / np.linalg.norm(vector), atol=1e-6)
        assert np.allclose(got[other].vector_a, query.vector)
    # A scorer that does not read them is not given them (no index lookup for it).
    plain = TextScorer()
    SearchStep(index, Settings(top_k=3), plain)([query])
    assert all(c.vector_b is None and c.id_b is None for c in plain.calls[0])


def test_a_neighbour_deleted_before_its_vector_is_read_is_left_out() -> None:
    index = LiveIndex(6, n_views=3)
    apply_updates(index, [update("near", at_cosine(0.95, 1), text="a"), update("far", at_cosine(0.5, 3), text="c")])
    step = SearchStep(index, Settings(top_k=3), VectorScorer())
    real_views = index.views

    def views_after_a_delete(ids):  # "far" goes between the search and the vector lookup
        if "far" in index.ids():
            index.delete(["far"])
        return real_views(ids)

    index.views = views_after_a_delete  # type: ignore[method-assign]
    similar, _ = step([update("query", at_cosine(1.0, 4), text="q")])
    record = codec_for_topic(SIMILAR_PRODUCTS).decode(similar[0].value)
    assert [n["listing_id"] for n in record["neighbours"]] == ["near"]


def test_match_text_travels_from_the_embed_step_into_the_index(encoder, monkeypatch) -> None:
    step = EmbedStep(encoder, Settings())
    out, failures = step(incoming([listing("a", title="  Red   ceramic mug "), listing("a", op="DELETE", title=None)]))
    assert not failures
    upsert, delete = [codec_for_topic("listing-embeddings").decode(o.value) for o in out]
    assert upsert["match_text"] == "Red ceramic mug" == encoder.match_text(ListingInput("a", "  Red   ceramic mug "))
    assert delete["match_text"] is None
    decoded = decode_embedding(out[0].value)
    assert decoded.payload["match_text"] == "Red ceramic mug"
    index = LiveIndex(encoder.dim, n_views=3)
    ModelIndexes("flat", n_views=3, indexes={encoder.version: index}).apply([decoded])
    assert index.payload("a")["match_text"] == "Red ceramic mug"
    assert match_text_of(index.payload("a")) == "Red ceramic mug"
    # The model's own serialisation is what travels (the first model's during a switch).
    monkeypatch.setattr(encoder, "match_text", lambda listing: f"{listing.title.strip()} | brand Acme")
    out, _ = step(incoming([listing("b", title="Mug ")]), [encoder, encoder])
    assert decode_embedding(out[0].value).payload["match_text"] == "Mug | brand Acme"
    # A payload without it (an older snapshot) falls back to the normalised title.
    assert match_text_of({"title": "  Old   mug "}) == "Old mug" and match_text_of({"title": None}) == ""


def test_the_index_agent_gets_each_versions_scorer_from_the_registry() -> None:
    import threading
    from types import SimpleNamespace

    from samestyle.streams.worker.app import ModelThread, Scorers

    scorer = TextScorer()

    class Registry:
        def __init__(self) -> None:
            self.calls: list[tuple[str, str]] = []

        def encoder_for(self, version: str) -> SimpleNamespace:
            self.calls.append((version, threading.current_thread().name))
            if version == "gone":
                raise ConfigError("model 'gone' is neither SAMESTYLE_ENCODER nor a promoted model")
            return SimpleNamespace(duplicate_scorer=scorer if version == "v2" else None)

    registry = Registry()
    scorers = Scorers(registry, ModelThread())  # type: ignore[arg-type]

    async def lookups(*versions: str) -> list:
        return [await scorers.scorer_for(v) for v in versions]

    # v1 has no classifier, v2 has one; a version with no encoder here falls back to the cosine rule.
    assert asyncio.run(lookups("v1", "v2", "v2", "gone")) == [None, scorer, scorer, None]
    assert [v for v, _ in registry.calls] == ["v1", "v2", "gone"]  # found scorers are kept
    assert all(thread.startswith("embed") for _, thread in registry.calls)  # on the model thread
    scorers.keep_only(["v1"])
    assert asyncio.run(lookups("v1", "v2")) == [None, scorer]
    assert [v for v, _ in registry.calls][3:] == ["v2"]
