"""The pairs agent: click events → positive pairs, under category and relevance constraints.

Two Faust agents in the worker's consumer group, each with a co-partitioned table: ``sessionize``
(``click-events`` → ``click-pairs``, re-keyed by unordered pair) and ``evidence`` (``click-pairs`` →
``positive-pairs``, compacted, keyed by pair). A pair is emitted once its evidence, category and
cosine constraints (:class:`PairRules`, from Settings) pass. Delivery is at-least-once; a repeated
pair is byte-identical and under the same key. Design and restart notes: docs/INTERNALS.md.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping

from samestyle.streams.pairs.mining import PairRules, evidence_step, pair_key, sessionize_step
from samestyle.streams.settings import Settings
from samestyle.topics import CLICK_EVENTS, CLICK_PAIRS, POSITIVE_PAIRS, codec_for_topic, topic_specs
from samestyle.topics.errors import BadInputError
from samestyle.topics.registry import PAIRS_EVIDENCE_TABLE, PAIRS_SESSIONS_TABLE

log = logging.getLogger(__name__)


def register_pairs_agent(app: Any, settings: Settings, topics: Mapping[str, Any], sinks: Any, *,
                         index: Callable[[], Any], model_version: Callable[[], str | None]) -> None:
    """Add the sessionize and evidence agents and their tables to a worker app (idempotent).

    ``topics`` are the app's Faust topics by registry key, ``sinks`` its
    :class:`~samestyle.streams.worker.sinks.Sinks`; ``index()`` is the served index (cosines come
    from it) and ``model_version()`` its model.
    """
    import faust
    import mode

    from samestyle.streams.worker.pipeline import Failure, Incoming, Outgoing
    from samestyle.streams.worker.transport import seek_before_resuming_streams

    if getattr(app, "_samestyle_pairs_registered", False):
        return
    app._samestyle_pairs_registered = True
    seek_before_resuming_streams()  # else a restart drops source records (see the module docstring)
    if settings.changelog_single_record_batches:
        # App-wide: Faust has one producer. BROKER.md trap 1; cost measured in docs/PAIRS.md.
        app.conf.producer_max_batch_size = 1
    rules = PairRules.from_settings(settings)
    specs = topic_specs(settings.topic_prefix, settings.partitions)
    codec = codec_for_topic(CLICK_EVENTS)
    out_codec = codec_for_topic(POSITIVE_PAIRS)
    clicks_topic, pairs_topic, positive_topic = (topics[k] for k in (CLICK_EVENTS, CLICK_PAIRS, POSITIVE_PAIRS))
    # Keys and values go through Faust's default table serializers (json).
    sessions = app.Table(PAIRS_SESSIONS_TABLE, default=None, partitions=specs[CLICK_EVENTS].partitions,
                         help="session id -> [session window, last click time]")
    evidence_table = app.Table(PAIRS_EVIDENCE_TABLE, default=None, partitions=specs[CLICK_PAIRS].partitions,
                               help="unordered pair -> click evidence and the emitted record")

    def lookup(listing_id: str) -> Any:
        served = index()
        return served.get(listing_id) if served is not None else None

    def decode(event: Any) -> dict[str, Any] | Failure:
        try:
            if event.message.value is None:
                raise BadInputError("empty message (null value)")
            return codec.decode(event.message.value)
        except BadInputError as exc:
            return Failure(Incoming.of_event(event), "pairs", exc)

    # One event at a time (not take_events): a table write goes to the changelog partition of the
    # *current* event. Sends are not awaited one by one: Faust flushes the producer before it
    # commits offsets, so nothing acknowledged is lost.
    @app.agent(clicks_topic, name="pairs-sessionize", supervisor_strategy=mode.CrashingSupervisor)
    async def sessionize(stream: faust.StreamT) -> None:
        async for event in stream.events():
            click = decode(event)
            if isinstance(click, Failure):
                await sinks.dead_letter([click])
                continue
            state, forwarded = sessionize_step(sessions.get(click["session_id"]), click, rules)
            if forwarded is None:
                continue
            sessions[click["session_id"]] = state
            await pairs_topic.send(key=pair_key(click["trigger_id"], click["clicked_id"]).encode(),
                                   value=codec.encode(forwarded))

    @app.agent(pairs_topic, name="pairs-evidence", supervisor_strategy=mode.CrashingSupervisor)
    async def evidence(stream: faust.StreamT) -> None:
        async for event in stream.events():
            click = decode(event)
            if isinstance(click, Failure):
                await sinks.dead_letter([click])
                continue
            key = pair_key(click["trigger_id"], click["clicked_id"])
            state, counted, record = evidence_step(evidence_table.get(key), click, rules, lookup, model_version())
            if counted:
                evidence_table[key] = state  # before the send: a crash in between re-sends on replay
            elif record is not None:
                log.info("re-sending positive pair %s after a replay", key)
            if record is not None:
                await sinks.send_all(POSITIVE_PAIRS, [Outgoing(key.encode(), out_codec.encode(record))])
                evidence_table[key] = {**state, "sent": True}

    app.samestyle_pairs = (sessions, evidence_table)  # type: ignore[attr-defined]  # for tests


__all__ = ["register_pairs_agent"]
