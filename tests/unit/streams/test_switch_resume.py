"""A restart resumes the model switch its index snapshot recorded, when the decision log lost it.

The snapshot's record (``MODELS.json`` format 2) goes through the real registry and watcher into
the real coordinator, with the fake listings log and replica of test_model_switch: an unfinished
switch resumes and completes, a finished one is not redone, a target whose directory is gone is
abandoned without a crash, a promotion on the log supersedes the record, and a format 1 snapshot
(no record) still loads.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from samestyle.models import create_encoder
from samestyle.models.encoder import MODEL_DIR_CONFIG, NAMED_CONFIGS, Encoder
from samestyle.streams.settings import Settings
from samestyle.streams.switch.backfill import Backfill
from samestyle.streams.switch.coordinator import ModelSwitch, SwitchState
from samestyle.streams.switch.indexes import MODELS_FILE, ModelIndexes
from samestyle.streams.switch.record import RecordedModel, SwitchRecord
from samestyle.streams.switch.registry import ModelRegistry
from samestyle.streams.switch.watcher import ModelWatcher
from samestyle.streams.worker.metrics import Metrics
from samestyle.streams.worker.pipeline import EmbedStep, Incoming, Outgoing, decode_embedding
from samestyle.streams.worker.replica import IndexReplica
from samestyle.topics import LISTINGS, MODEL_UPDATES, codec_for_topic
from samestyle.topics.errors import IndexStoreError
from tests.unit.streams.test_model_switch import FakeLog, FakeReplica, _in_partition, _listing, run_switch_until

V2 = "promoted-v2"
SETTINGS = Settings(allow_random_weights=True, device="cpu")


def model_dir(path: Path, version: str) -> Path:
    """A promoted model directory: the tiny encoder's config under another version."""
    path.mkdir(parents=True)
    config = replace(NAMED_CONFIGS["tiny"], version=version)
    (path / MODEL_DIR_CONFIG).write_text(json.dumps(config.to_dict()))
    return path


def promotion(version: str, directory: Path) -> bytes:
    return codec_for_topic(MODEL_UPDATES).encode({
        "version": version, "model_dir": str(directory), "decision": "PROMOTED", "previous_version": None,
        "metric": "valid_f1", "score": 0.9, "previous_score": 0.5, "pairs_used": 3, "reason": "test",
        "created_at": int(time.time() * 1000)})


def embedded(encoder: Encoder, ids: list[str], reembed: bool = False) -> list[Outgoing]:
    listings = codec_for_topic(LISTINGS)
    out, failures = EmbedStep(encoder, SETTINGS)(
        [Incoming(i.encode(), listings.encode(_listing(i)), "listings", 0, 0) for i in ids], [encoder], reembed=reembed)
    assert not failures
    return out


@pytest.fixture(scope="module")
def v1() -> Encoder:
    return create_encoder("tiny", allow_random_weights=True, device="cpu")


def write_snapshot(root: Path, v1: Encoder, serving: list[str], target_has: list[str], record: SwitchRecord | None,
                   v2_dir: Path, switched: bool = False) -> None:
    """A worker's snapshot: ``serving`` under v1, ``target_has`` already re-embedded with V2."""
    v2 = create_encoder(str(v2_dir), allow_random_weights=True, device="cpu")
    indexes = ModelIndexes("flat", 3, active=v1.version)
    indexes.apply([decode_embedding(o.value) for o in embedded(v1, serving) + embedded(v2, target_has, True)])
    if switched:
        assert indexes.try_switch(V2)
    indexes.snapshot(root, {0: 10, 1: 10}, record)


class Restarted:
    """A worker restarted from the snapshot under ``root`` with a decision log holding ``decisions``
    and a listings log holding ``log_ids``: the real registry, watcher and coordinator."""

    def __init__(self, root: Path, v1: Encoder, log_ids: list[str], decisions: Sequence[bytes] = ()) -> None:
        indexes, _ = ModelIndexes.load(root, "flat", 3)
        self.metrics = Metrics(process=False)
        watcher = ModelWatcher(SETTINGS, "model-updates", records=list(enumerate(decisions)))
        self.registry = ModelRegistry(SETTINGS, watcher, v1, on_load_failure=self.metrics.model_load_failures.inc)
        self.registry.restore(indexes.switch_record, indexes.active)  # build_replica's call
        watcher.ready.set()  # the start-up read of model-updates is in
        target = self.registry.target_version()
        assert target is not None
        self.replica = FakeReplica(indexes, target)
        listings = codec_for_topic(LISTINGS)
        rows: dict[int, list[tuple[bytes, bytes]]] = {0: [], 1: []}
        for listing_id in log_ids:
            rows[0 if listing_id in _in_partition(0, 50) else 1].append(
                (listing_id.encode(), listings.encode(_listing(listing_id))))
        self.sent: list[Outgoing] = []

        async def send(out: list[Outgoing]) -> None:
            self.sent.extend(out)
            self.replica.apply(list(out))

        async def run_model(fn: Callable[..., Any], *args: Any) -> Any:
            return fn(*args)

        self.switch = ModelSwitch(self.registry, self.replica,  # type: ignore[arg-type]
                                  Backfill(SETTINGS, "listings", 2, reader=FakeLog("listings", rows)),  # type: ignore[arg-type]
                                  lambda: EmbedStep(v1, SETTINGS), self.metrics, run_model, send, lambda: [0, 1], 4,
                                  deadline_seconds=60)

    def run_until(self, done: Callable[[], bool], timeout: float = 20.0) -> None:
        asyncio.run(run_switch_until(self.switch, done, timeout))

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0


def ids(n: int) -> list[str]:
    return _in_partition(0, n // 2) + _in_partition(1, n - n // 2)


def test_an_unfinished_switch_resumes_when_the_decision_log_lost_it(tmp_path: Path, v1: Encoder,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    catalogue = ids(6)
    v2_dir = model_dir(tmp_path / "v2", V2)
    record = SwitchRecord(V2, "reembedding", (RecordedModel(V2, str(v2_dir)),))
    # Two listings re-embedded before the crash; the recreated listings log holds three others only.
    write_snapshot(tmp_path / "snap", v1, catalogue, catalogue[:2], record, v2_dir)
    worker = Restarted(tmp_path / "snap", v1, log_ids=catalogue[2:5])
    assert worker.registry.target_version() == V2  # not the configured v1: the record stands in for the log

    with caplog.at_level(logging.INFO):
        worker.run_until(lambda: worker.replica.indexes.active == V2 and worker.switch.state is SwitchState.SERVING)

    assert "resuming that switch" in caplog.text
    indexes = worker.replica.indexes
    assert indexes.active == V2 and not worker.replica.forced  # by the rule, not the deadline
    # The snapshot's two, the log's three; the sixth is in neither: left out by the documented rule.
    assert sorted(indexes.active_index.ids()) == sorted(catalogue[:5])
    assert worker.metric("samestyle_model_switch_left_out_total", reason="not_in_log") == 1
    reembedded = [decode_embedding(o.value) for o in worker.sent]
    assert {r.listing_id for r in reembedded if r.op != "DELETE"} == set(catalogue[2:5])
    assert {r.listing_id for r in reembedded if r.op == "DELETE"} == {catalogue[5]} and all(r.reembed for r in reembedded)
    assert worker.switch.record() == SwitchRecord(V2, "serving", (RecordedModel(V2, str(v2_dir)),))


def test_a_finished_switch_is_not_redone_and_its_model_still_loads(tmp_path: Path, v1: Encoder) -> None:
    catalogue = ids(4)
    v2_dir = model_dir(tmp_path / "v2", V2)
    record = SwitchRecord(V2, "serving", (RecordedModel(V2, str(v2_dir)),))
    write_snapshot(tmp_path / "snap", v1, catalogue, catalogue, record, v2_dir, switched=True)
    worker = Restarted(tmp_path / "snap", v1, log_ids=catalogue)

    worker.run_until(lambda: worker.switch.state is SwitchState.SERVING)

    assert worker.replica.indexes.active == V2 and worker.switch.target_version() == V2
    assert worker.sent == [] and not worker.switch.backfill.active  # nothing re-embedded
    assert worker.switch.serving_encoder().version == V2  # loaded from the recorded directory
    # Without the record (a format 1 snapshot) the empty log would send it back to the configured model.
    bare = ModelRegistry(SETTINGS, ModelWatcher(SETTINGS, "model-updates"), v1)
    bare.watcher.ready.set()
    assert bare.target_version() == v1.version


def test_a_recorded_target_whose_directory_is_gone_is_abandoned(tmp_path: Path, v1: Encoder,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    catalogue = ids(4)
    v2_dir = model_dir(tmp_path / "v2", V2)
    record = SwitchRecord(V2, "reembedding", (RecordedModel(V2, str(v2_dir)),))
    write_snapshot(tmp_path / "snap", v1, catalogue, catalogue[:1], record, v2_dir)
    (v2_dir / MODEL_DIR_CONFIG).unlink()
    v2_dir.rmdir()

    with caplog.at_level(logging.INFO):
        worker = Restarted(tmp_path / "snap", v1, log_ids=catalogue)  # no exception: no crash loop
        worker.run_until(lambda: worker.switch.state is SwitchState.SERVING)

    assert "unfinished switch to promoted-v2" in caplog.text and "no longer exists" in caplog.text
    assert worker.metric("samestyle_model_load_failures_total") == 1
    assert worker.switch.target_version() == v1.version == worker.replica.indexes.active
    assert worker.sent == []
    assert worker.switch.record() == SwitchRecord(v1.version, "serving", ())  # the next snapshot forgets it


def test_a_promotion_on_the_log_supersedes_the_recorded_target(tmp_path: Path, v1: Encoder) -> None:
    v2_dir, v3_dir = model_dir(tmp_path / "v2", V2), model_dir(tmp_path / "v3", "promoted-v3")
    record = SwitchRecord(V2, "reembedding", (RecordedModel(V2, str(v2_dir)),))
    write_snapshot(tmp_path / "snap", v1, ids(2), [], record, v2_dir)

    later = Restarted(tmp_path / "snap", v1, [], decisions=[promotion("promoted-v3", v3_dir)])
    assert later.registry.target_version() == "promoted-v3"
    assert later.registry.encoder_for(V2).version == V2  # its directory is still known
    kept = Restarted(tmp_path / "snap", v1, [], decisions=[promotion(V2, v2_dir)])
    assert kept.registry.target_version() == V2 and kept.registry.watcher.chain.from_log(V2)
    assert kept.registry.watcher.chain.promoted == 1  # the restored promotion is no decision seen


def test_the_switch_record_round_trips_and_format_1_snapshots_still_load(tmp_path: Path, v1: Encoder,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    v2_dir = model_dir(tmp_path / "v2", V2)
    record = SwitchRecord(V2, "awaiting_index", (RecordedModel(V2, str(v2_dir)),))
    write_snapshot(tmp_path / "snap", v1, ids(2), [], record, v2_dir)
    loaded, offsets = ModelIndexes.load(tmp_path / "snap", "flat", 3)
    assert loaded.switch_record == record and offsets == {0: 10, 1: 10}
    meta = json.loads((tmp_path / "snap" / MODELS_FILE).read_text())
    assert meta["format"] == 2

    # Format 1, as the code before the switch record wrote it: no "format", no "switch".
    old = {k: meta[k] for k in ("active", "indexes", "retired")}
    (tmp_path / "snap" / MODELS_FILE).write_text(json.dumps(old, indent=1))
    loaded, offsets = ModelIndexes.load(tmp_path / "snap", "flat", 3)
    assert loaded.switch_record is None and loaded.active == v1.version and offsets == {0: 10, 1: 10}
    assert sorted(loaded.indexes[v1.version].ids()) == sorted(ids(2))
    registry = ModelRegistry(SETTINGS, ModelWatcher(SETTINGS, "model-updates"), v1)
    registry.restore(loaded.switch_record, loaded.active)
    registry.watcher.ready.set()
    assert registry.target_version() == v1.version

    # A record that does not parse leaves the indexes loadable; a newer format is refused.
    (tmp_path / "snap" / MODELS_FILE).write_text(json.dumps({**old, "format": 2, "switch": {"target": 7}}))
    with caplog.at_level(logging.ERROR):
        assert ModelIndexes.load(tmp_path / "snap", "flat", 3)[0].switch_record is None
    assert "switch record is ignored" in caplog.text
    (tmp_path / "snap" / MODELS_FILE).write_text(json.dumps({**old, "format": 3}))
    with pytest.raises(IndexStoreError, match="format 3"):
        ModelIndexes.load(tmp_path / "snap", "flat", 3)


def test_a_replica_snapshot_keeps_the_loaded_record_until_the_switch_knows_its_target(tmp_path: Path,
                                                                                       v1: Encoder) -> None:
    v2_dir = model_dir(tmp_path / "v2", V2)
    record = SwitchRecord(V2, "reembedding", (RecordedModel(V2, str(v2_dir)),))
    write_snapshot(tmp_path / "snap", v1, ids(2), [], record, v2_dir)
    indexes, offsets = ModelIndexes.load(tmp_path / "snap", "flat", 3)
    replica = IndexReplica(SETTINGS, indexes, "listing-embeddings", 2, tmp_path / "snap", offsets)
    pending: list[SwitchRecord | None] = [None]
    replica.switch_record = lambda: pending[0]

    async def snapshot() -> None:
        await replica.snapshot()

    asyncio.run(snapshot())  # the decision log is not read yet: the record is kept
    assert ModelIndexes.load(tmp_path / "snap", "flat", 3)[0].switch_record == record
    pending[0] = SwitchRecord(V2, "serving", (RecordedModel(V2, str(v2_dir)),))
    assert replica._record_changed()
    asyncio.run(snapshot())
    assert ModelIndexes.load(tmp_path / "snap", "flat", 3)[0].switch_record == pending[0]
    assert not replica._record_changed()
