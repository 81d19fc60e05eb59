"""decode_embedding: listing-embeddings bytes round-trip to the vectors and payload written, its
one-buffer fast path gives what the vector-by-vector path gives (errors included)."""

from __future__ import annotations

import numpy as np
import pytest

from samestyle.streams.worker.pipeline import _views, _views_checked, decode_embedding
from samestyle.topics import LISTING_EMBEDDINGS, codec_for_topic, vector_to_bytes
from samestyle.topics.errors import DecodeError, InvalidListingError

DIM = 8


def vectors(rng: np.random.Generator, image: bool = True) -> dict:
    return {
        "vector_image": vector_to_bytes(rng.standard_normal(DIM)) if image else None,
        "vector_text": vector_to_bytes(rng.standard_normal(DIM)),
        "vector_image_text": vector_to_bytes(rng.standard_normal(DIM)),
    }


def record(listing_id: str = "l1", *, seed: int = 0, image: bool = True, next_model: bool = False,
           op: str = "UPSERT", **overrides: object) -> dict:
    rng = np.random.default_rng(seed)
    out = {"listing_id": listing_id, "supplier_id": "s1", "category": "mugs", "title": "Red mug", "op": op,
           "model_version": "v1", "dim": DIM, "has_image": image, **vectors(rng, image),
           "image_uri": "a.jpg" if image else None, "match_text": "Red mug", "reembed": False,
           "next_model": ({"model_version": "v2", "dim": DIM, **vectors(rng, image)} if next_model else None),
           "event_time": 1_700_000_000_000, "embedded_at": 1_700_000_000_500}
    if op == "DELETE":
        out.update(title=None, has_image=False, vector_image=None, vector_text=None, vector_image_text=None,
                   image_uri=None, match_text=None)
    out.update(overrides)
    return out


def expected_views(rec: dict) -> np.ndarray:
    def vec(b: bytes | None) -> np.ndarray:
        return np.frombuffer(b, "<f4").astype(np.float32) if b else np.zeros(rec["dim"], np.float32)
    return np.stack([vec(rec["vector_image"]), vec(rec["vector_text"]), vec(rec["vector_image_text"])])


def encode(rec: dict) -> bytes:
    return codec_for_topic(LISTING_EMBEDDINGS).encode(rec)


@pytest.mark.parametrize("image", [True, False])
@pytest.mark.parametrize("next_model", [False, True])
def test_round_trip(image: bool, next_model: bool) -> None:
    rec = record(image=image, next_model=next_model, seed=3)
    update = decode_embedding(encode(rec))
    assert (update.listing_id, update.supplier_id, update.op, update.model_version) == ("l1", "s1", "UPSERT", "v1")
    assert update.event_time == rec["event_time"] and update.has_image is image
    assert update.payload == {"supplier_id": "s1", "category": "mugs", "title": "Red mug",
                              "event_time": rec["event_time"], "has_image": image,
                              "image_uri": rec["image_uri"], "match_text": "Red mug"}
    assert update.views is not None
    np.testing.assert_array_equal(update.views, expected_views(rec))
    assert update.views.dtype == np.float32 and update.views.shape == (3, DIM)
    assert update.views.flags.c_contiguous and update.views.flags.writeable
    assert list(update.vectors) == (["v1", "v2"] if next_model else ["v1"])
    if next_model:
        np.testing.assert_array_equal(update.vectors["v2"], expected_views(rec["next_model"]))


def test_delete_has_no_views() -> None:
    update = decode_embedding(encode(record(op="DELETE")))
    assert update.op == "DELETE" and update.views is None and update.vectors == {}


def test_fast_path_matches_vector_by_vector() -> None:
    for seed in range(20):
        rec = codec_for_topic(LISTING_EMBEDDINGS).decode(encode(record(seed=seed, image=seed % 2 == 0)))
        fast, checked = _views(rec, "l1"), _views_checked(rec, "l1")
        np.testing.assert_array_equal(fast, checked)
        assert fast.dtype == checked.dtype


@pytest.mark.parametrize("broken", [
    {"vector_text": vector_to_bytes(np.ones(DIM))[:-4]},                          # short
    {"vector_image": vector_to_bytes(np.ones(DIM + 1))},                          # long image
    {"vector_image_text": np.array([np.nan] * DIM, "<f4").tobytes()},             # NaN
    {"vector_image": np.array([np.inf] + [0.0] * (DIM - 1), "<f4").tobytes()},    # inf in the image
    {"vector_text": None},                                                        # missing text
    {"vector_image_text": b""},                                                   # empty image+text
    {"dim": 0},
])
def test_errors_are_the_vector_by_vector_ones(broken: dict) -> None:
    rec = record(**broken)
    with pytest.raises((DecodeError, InvalidListingError)) as slow:
        _views_checked(rec, "l1")
    with pytest.raises(type(slow.value)) as fast:
        decode_embedding(encode(rec))
    assert str(fast.value) == str(slow.value)


def test_null_value_is_invalid() -> None:
    with pytest.raises(InvalidListingError):
        decode_embedding(None)


def test_the_next_model_s_own_match_text_reaches_its_index_only() -> None:
    rec = record(next_model=True, seed=4)
    rec["next_model"]["match_text"] = "Red mug | description ceramic 350 ml"
    update = decode_embedding(encode(rec))
    assert update.match_texts == {"v2": "Red mug | description ceramic 350 ml"}
    assert update.payload["match_text"] == update.payload_for("v1")["match_text"] == "Red mug"
    assert update.payload_for("v2")["match_text"] == "Red mug | description ceramic 350 ml"
    assert update.for_version("v2").payload == update.payload_for("v2")
    assert update.for_version("v1").payload["match_text"] == "Red mug"
    # Null (the same text, or a record written before the field): every index keeps the top-level one.
    same = decode_embedding(encode(record(next_model=True, seed=4)))
    assert same.match_texts == {} and same.payload_for("v2") == same.payload
