"""The overlapped embed pipeline without a broker: acknowledgements only after delivery and in
batch order, records handed over in embedding order, the next batch prepared while one embeds,
failures raised, and the same records as the one-call embed step (tiny random-weight models)."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest
from PIL import Image

from samestyle.models import create_encoder
from samestyle.streams.settings import Settings
from samestyle.streams.worker.embedding import EmbedPipeline
from samestyle.streams.worker.pipeline import EmbedStep, Failure, Incoming, Outgoing
from samestyle.topics import LISTINGS, codec_for_topic


@pytest.fixture(scope="module")
def encoder():
    return create_encoder("tiny", "cpu", allow_random_weights=True)


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 10)).save(buf, "PNG")
    return buf.getvalue()


def message(listing_id: str, offset: int, *, title: str = "Red mug", op: str = "UPSERT",
            image: bytes | None = None, raw: bytes | None = None) -> Incoming:
    record = {"listing_id": listing_id, "supplier_id": "s1", "category": "mugs", "title": title,
              "description": "ceramic", "attributes": {}, "image_uri": None, "image_bytes": image,
              "op": op, "event_time": 1_700_000_000_000}
    value = raw if raw is not None else codec_for_topic(LISTINGS).encode(record)
    return Incoming(listing_id.encode(), value, "listings", 0, offset)


class Harness:
    """An EmbedPipeline whose broker is in the test's hands: ``release(k)`` acknowledges the
    k-th enqueued batch of records."""

    def __init__(self, encoder: Any, *, step: EmbedStep | None = None, slow_embed: float = 0.0,
                 fail_enqueue: bool = False, max_delivering: int = 2, overlap: bool = True) -> None:
        self.step_ = step or EmbedStep(encoder, Settings())
        self.encoders = [encoder]
        self.enqueued: list[list[Outgoing]] = []
        self.deliveries: list[asyncio.Future[Any]] = []
        self.acked: list[list[int]] = []
        self.dead: list[Failure] = []
        self.errors: list[BaseException] = []
        self.log: list[tuple[str, int, float]] = []  # (what, batch size, when) from any thread
        self.slow_embed = slow_embed
        self.fail_enqueue = fail_enqueue
        self.model = threading.Lock()
        real_embed, real_prepare = self.step_.embed, self.step_.prepare

        def embed(prepared: Any, encoders: Any) -> Any:
            self.log.append(("embed-start", prepared.size, time.perf_counter()))
            time.sleep(self.slow_embed)
            out = real_embed(prepared, encoders)
            self.log.append(("embed-end", prepared.size, time.perf_counter()))
            return out

        def prepare(*args: Any, **kwargs: Any) -> Any:
            self.log.append(("prepare-start", len(args[0]), time.perf_counter()))
            return real_prepare(*args, **kwargs)

        self.step_.embed = embed  # type: ignore[method-assign]
        self.step_.prepare = prepare  # type: ignore[method-assign]
        self.pipeline = EmbedPipeline(lambda: self.step_, self.run_model, lambda: self.encoders, asyncio.Lock(),
                                      self.enqueue, self.dead_letter, self.ack, on_error=self.errors.append,
                                      max_delivering=max_delivering, overlap=overlap)

    async def run_model(self, fn: Any, *args: Any) -> Any:
        def locked() -> Any:
            with self.model:
                return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(None, locked)

    async def enqueue(self, out: Sequence[Outgoing]) -> asyncio.Future[Any]:
        if self.fail_enqueue:
            raise RuntimeError("broker gone")
        self.enqueued.append(list(out))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.deliveries.append(future)
        return future

    async def dead_letter(self, failures: Sequence[Failure]) -> None:
        self.dead.extend(failures)

    async def ack(self, events: Sequence[Any]) -> None:
        self.acked.append([e.offset for e in events])

    async def until(self, condition: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            await asyncio.sleep(0.005)


def batches(n: int, size: int, image: bytes | None = None) -> list[list[Incoming]]:
    return [[message(f"b{b}-{i}", b * size + i, image=image) for i in range(size)] for b in range(n)]


def test_acks_wait_for_delivery_and_keep_batch_order(encoder: Any) -> None:
    async def run() -> None:
        h = Harness(encoder, max_delivering=3)
        b = batches(3, 4)
        for batch in b:
            await h.pipeline.submit(batch, batch)
        await h.until(lambda: len(h.deliveries) == 3)
        # Records were handed over in batch order, in input order within a batch.
        assert [[o.key for o in out] for out in h.enqueued] == [[m.key for m in batch] for batch in b]
        h.deliveries[2].set_result([])
        h.deliveries[1].set_result([])
        await asyncio.sleep(0.05)
        assert h.acked == []  # batch 0 is not delivered yet: nothing after it may be acknowledged
        h.deliveries[0].set_result([])
        await h.pipeline.drain()
        assert h.acked == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
        assert not h.errors
        h.pipeline.close()

    asyncio.run(run())


def test_at_most_max_delivering_batches_await_the_broker(encoder: Any) -> None:
    async def run() -> None:
        h = Harness(encoder, max_delivering=2)
        b = batches(3, 2)
        await h.pipeline.submit(b[0], b[0])
        await h.pipeline.submit(b[1], b[1])
        third = asyncio.ensure_future(h.pipeline.submit(b[2], b[2]))
        await h.until(lambda: len(h.deliveries) == 2)
        await asyncio.sleep(0.1)
        assert not third.done()  # two batches await their acknowledgements: the third waits
        h.deliveries[0].set_result([])
        await third
        await h.until(lambda: len(h.deliveries) == 3)
        for future in h.deliveries[1:]:
            future.set_result([])
        await h.pipeline.drain()
        assert h.acked == [[0, 1], [2, 3], [4, 5]]
        h.pipeline.close()

    asyncio.run(run())


def test_the_next_batch_is_prepared_while_one_is_embedded(encoder: Any) -> None:
    async def run() -> None:
        h = Harness(encoder, slow_embed=0.3)
        first, second = batches(2, 3, image=png())
        await h.pipeline.submit(first, first)
        started = time.perf_counter()
        await h.pipeline.submit(second, second)  # returns once the first is embedded
        assert time.perf_counter() - started >= 0.25
        events = [(what, t) for what, _, t in h.log]
        first_embed_end = next(t for what, t in events if what == "embed-end")
        second_prepare = [t for what, t in events if what == "prepare-start"][1]
        assert second_prepare < first_embed_end  # prepared during the first forward pass
        await h.until(lambda: len(h.deliveries) == 2)
        for future in h.deliveries:
            future.set_result([])
        await h.pipeline.drain()
        assert h.acked == [[0, 1, 2], [3, 4, 5]]
        h.pipeline.close()

    asyncio.run(run())


def test_same_records_and_failures_as_the_one_call_step(encoder: Any) -> None:
    step = EmbedStep(encoder, Settings())
    batch = [message("a", 0, image=png()), message("bad", 1, raw=b"\x00garbage"), message("a", 2, op="DELETE"),
             message("c", 3, title=""), message("d", 4, image=b"not an image")]
    direct_out, direct_failures = step(batch)

    async def run() -> tuple[list[Outgoing], list[Failure]]:
        h = Harness(encoder)
        await h.pipeline.submit(batch, batch)
        await h.until(lambda: len(h.deliveries) == 1)
        h.deliveries[0].set_result([])
        await h.pipeline.drain()
        h.pipeline.close()
        assert h.acked == [[0, 1, 2, 3, 4]]
        return h.enqueued[0], h.dead

    out, dead = asyncio.run(run())
    codec = codec_for_topic("listing-embeddings")

    def comparable(records: list[Outgoing]) -> list[dict[str, Any]]:
        return [{k: v for k, v in codec.decode(o.value).items() if k != "embedded_at"} for o in records]

    assert comparable(out) == comparable(direct_out)
    assert [(f.incoming.offset, type(f.error)) for f in dead] == [(f.incoming.offset, type(f.error))
                                                                  for f in direct_failures]
    assert [f.incoming.offset for f in dead] == [1, 3, 4]


def test_a_switch_between_prepare_and_embed_prepares_for_the_new_encoders(encoder: Any) -> None:
    other = create_encoder({"name": "tiny2", "text_backbone": "tiny", "image_backbone": "tiny", "seed": 3,
                            "max_text_tokens": 64, "image_size": 32, "image_crop_pct": 1.0},
                           "cpu", allow_random_weights=True)
    step = EmbedStep(encoder, Settings())
    first, second = batches(2, 2, image=png())

    async def run() -> list[list[Outgoing]]:
        h = Harness(encoder, step=step)
        await h.pipeline.submit(first, first)
        await h.until(lambda: len(h.deliveries) == 1)
        h.encoders = [encoder, other]  # a switch began: the second batch was prepared for one encoder
        await h.pipeline.submit(second, second)
        await h.until(lambda: len(h.deliveries) == 2)
        for future in h.deliveries:
            if not future.done():
                future.set_result([])
        # While the switch lasts, a batch is embedded and written before submit returns.
        third = batches(3, 2, image=png())[2]
        submitted = asyncio.ensure_future(h.pipeline.submit(third, third))
        await h.until(lambda: len(h.deliveries) == 3)
        await asyncio.sleep(0.05)
        assert not submitted.done()
        h.deliveries[2].set_result([])
        await submitted
        assert h.acked == [[0, 1], [2, 3], [4, 5]]
        await h.pipeline.drain()
        h.pipeline.close()
        return h.enqueued

    enqueued = asyncio.run(run())
    direct, _ = step(second, [encoder, other])
    codec = codec_for_topic("listing-embeddings")
    got = [codec.decode(o.value) for o in enqueued[1]]
    want = [codec.decode(o.value) for o in direct]
    assert all(g["next_model"] is not None and g["next_model"]["model_version"] == other.version for g in got)
    assert [g["next_model"]["vector_image_text"] for g in got] == [w["next_model"]["vector_image_text"] for w in want]


def test_during_a_switch_the_next_model_s_match_text_travels_where_it_differs(encoder: Any) -> None:
    other = create_encoder({"name": "tiny2", "text_backbone": "tiny", "image_backbone": "tiny", "seed": 3,
                            "max_text_tokens": 64, "image_size": 32, "image_crop_pct": 1.0},
                           "cpu", allow_random_weights=True)
    step = EmbedStep(encoder, Settings())
    [batch] = batches(1, 3)
    codec = codec_for_topic("listing-embeddings")
    out, _ = step(batch, [encoder, other])
    same = [codec.decode(o.value) for o in out]
    # The same serialisation (these two tiny models): null, the top-level text serves both.
    assert same and all(r["next_model"]["match_text"] is None and r["match_text"] for r in same)
    other.match_text = lambda listing: "next: " + encoder.match_text(listing)  # reads more of the listing
    out, _ = step(batch, [encoder, other])
    differs = [codec.decode(o.value) for o in out]
    assert [r["match_text"] for r in differs] == [r["match_text"] for r in same]
    assert [r["next_model"]["match_text"] for r in differs] == ["next: " + r["match_text"] for r in same]


def test_a_failed_stage_is_raised_and_reported(encoder: Any) -> None:
    async def run() -> Harness:
        h = Harness(encoder, fail_enqueue=True)
        first, second = batches(2, 2)
        await h.pipeline.submit(first, first)
        with pytest.raises(RuntimeError, match="broker gone"):
            await h.pipeline.submit(second, second)
        h.pipeline.close()
        return h

    h = asyncio.run(run())
    assert h.acked == [] and len(h.errors) == 1 and "broker gone" in str(h.errors[0])


def test_without_overlap_a_batch_is_written_and_acknowledged_before_submit_returns(encoder: Any) -> None:
    async def run() -> None:
        h = Harness(encoder, overlap=False)
        first, second = batches(2, 2)
        submitted = asyncio.ensure_future(h.pipeline.submit(first, first))
        await h.until(lambda: len(h.deliveries) == 1)
        await asyncio.sleep(0.05)
        assert not submitted.done() and h.acked == []
        h.deliveries[0].set_result([])
        await submitted
        assert h.acked == [[0, 1]]
        submitted = asyncio.ensure_future(h.pipeline.submit(second, second))
        await h.until(lambda: len(h.deliveries) == 2)
        h.deliveries[1].set_result([])
        await submitted
        assert h.acked == [[0, 1], [2, 3]]
        h.pipeline.close()

    asyncio.run(run())
