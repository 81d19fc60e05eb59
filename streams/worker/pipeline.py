"""The work each agent does on one batch, as plain functions of bytes and objects (no Faust, no I/O).

The agents in :mod:`streams.app` only move bytes between topics and call these steps in an
executor, so the steps can be unit-tested without a broker and the event loop never blocks on the
model or the index.

Error policy: a message that cannot be processed becomes a :class:`Failure` carrying the
:class:`~topics.errors.BadInputError` that says why; the agent dead-letters it and goes on with
the rest of the batch. Anything else that goes wrong is a bug or an outage and propagates.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

import numpy as np

from samestyle.index_store import LiveIndex
from samestyle.models import Embeddings, Encoder, ListingInput
from samestyle.models.encoder import DuplicateScorer, PairCandidate
from samestyle.models.text import split_source
from samestyle.streams.io.images import is_remote, listing_image
from samestyle.streams.settings import Settings
from samestyle.topics import (
    DEAD_LETTERS,
    DUPLICATE_ALERTS,
    LISTING_EMBEDDINGS,
    LISTINGS,
    SIMILAR_PRODUCTS,
    bytes_to_vector,
    codec_for_topic,
    vector_to_bytes,
)
from samestyle.topics.errors import BadInputError, DecodeError, ImageError, IndexStoreError, InvalidListingError

log = logging.getLogger(__name__)

#: The supplier of listings that name none: a marketplace deduplicating its own catalogue.
DEFAULT_SUPPLIER = "_catalogue"
#: How many alerted pairs a worker remembers to avoid alerting the same pair twice.
ALERTED_PAIRS_REMEMBERED = 100_000
#: Order of the per-listing views kept beside the searched vector in the index.
VIEWS = ("image", "text", "image_text")


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Incoming:
    """One consumed message, as raw bytes plus where it came from."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int

    @classmethod
    def of_event(cls, event: Any) -> Incoming:
        """The raw message of a Faust event."""
        msg = event.message
        return cls(key=msg.key, value=msg.value, topic=msg.topic, partition=msg.partition, offset=msg.offset)


@dataclass(frozen=True)
class Failure:
    incoming: Incoming
    stage: str
    error: BadInputError

    def dead_letter(self) -> bytes:
        """The dead-letter record: the original bytes, where they came from and why they failed."""
        return codec_for_topic(DEAD_LETTERS).encode({
            "original_key": self.incoming.key,
            "original_value": self.incoming.value,
            "topic": self.incoming.topic,
            "partition": self.incoming.partition,
            "offset": self.incoming.offset,
            "stage": self.stage,
            "error_type": type(self.error).__name__,
            "error": str(self.error),
            "failed_at": now_ms(),
        })


@dataclass(frozen=True)
class Outgoing:
    key: bytes
    value: bytes


# --------------------------------------------------------------------------------------------
# embed step: listings -> listing-embeddings


def validate_listing(record: dict[str, Any], settings: Settings) -> None:
    """Schema-valid is not enough: reject what cannot be embedded, with a reason a person can act on."""
    if not record.get("listing_id"):
        raise InvalidListingError("listing_id is empty")
    if record.get("op", "UPSERT") == "DELETE":
        return
    has_image = record.get("image_bytes") is not None or bool(record.get("image_uri"))
    if not (record.get("title") or "").strip() and not has_image:
        # An image alone is a listing (a photo); text alone needs a title.
        raise InvalidListingError(f"listing {record['listing_id']!r} has no title and no image")
    text_chars = len(record.get("title") or "") + len(record.get("description") or "")
    text_chars += sum(len(k) + len(v) for k, v in (record.get("attributes") or {}).items())
    if text_chars > settings.max_text_chars:
        raise InvalidListingError(
            f"listing {record['listing_id']!r} has {text_chars:,} characters of text; "
            f"the limit is {settings.max_text_chars:,} (SAMESTYLE_MAX_TEXT_CHARS)")
    image = record.get("image_bytes")
    if image is not None and len(image) > settings.max_image_bytes:
        raise InvalidListingError(
            f"listing {record['listing_id']!r} has a {len(image):,}-byte image; "
            f"the limit is {settings.max_image_bytes:,} (SAMESTYLE_MAX_IMAGE_BYTES)")


def listing_input(record: dict[str, Any], settings: Settings,
                  images: Mapping[str, bytes | ImageError] | None = None) -> ListingInput:
    """The encoder's input for a listing record. Its image: inline bytes, else ``image_uri``
    read from under ``SAMESTYLE_IMAGE_BASE_DIR`` or, for a URL, taken from ``images`` (what
    :func:`remote_image_uris` named, fetched by the agent before the step runs)."""
    image = record.get("image_bytes")
    if image is None and record.get("image_uri"):
        image = listing_image(record["image_uri"], settings.image_base_dir, settings.max_image_bytes, images)
    return ListingInput(
        listing_id=record["listing_id"],
        title=record.get("title") or "",
        description=record.get("description") or "",
        attributes=dict(record.get("attributes") or {}),
        image=image,
        category=record.get("category"),
    )


def remote_image_uris(batch: Sequence[Incoming]) -> list[str]:
    """The ``http(s)://`` image URIs the upserts of ``batch`` need fetched (messages that do not
    decode are skipped here: the step dead-letters them)."""
    codec = codec_for_topic(LISTINGS)
    uris = []
    for msg in batch:
        if msg.value is None:
            continue
        try:
            record = codec.decode(msg.value)
        except DecodeError:
            continue
        uri = record.get("image_uri")
        if record.get("op") != "DELETE" and record.get("image_bytes") is None and uri and is_remote(uri):
            uris.append(uri)
    return list(dict.fromkeys(uris))


@dataclass
class PreparedBatch:
    """The CPU side of an embed step for one batch (:meth:`EmbedStep.prepare`): records decoded and
    checked, listings prepared for ``encoders``; the forward pass is :meth:`EmbedStep.embed`."""

    size: int  # messages in the batch
    #: (slot, record, listing) of every upsert to embed, in input order.
    upserts: list[tuple[int, dict[str, Any], ListingInput]]
    #: (slot, record) of every delete (its record is built with the serving model at embed time).
    deletes: list[tuple[int, dict[str, Any]]]
    #: The encoders the listings were prepared for, and per upsert their prepared listings.
    encoders: list[Encoder]
    prepared: list[list[Any]]
    failures: list[Failure]
    #: The incoming message of every upsert (an encoder prepared for at embed time may fail one).
    messages: list[Incoming]
    reembed: bool = False


def _prepare_for(encoders: Sequence[Encoder]) -> Callable[[ListingInput], list[Any] | BadInputError]:
    """One listing prepared for each encoder, or the BadInputError why not (runs on a pool thread)."""
    def prepare(listing: ListingInput) -> list[Any] | BadInputError:
        try:
            return [encoder.prepare(listing) for encoder in encoders]
        except BadInputError as exc:
            return exc
    return prepare


class EmbedStep:
    """listings bytes -> listing-embeddings bytes, one batched forward pass per call.

    A call is two parts that may run on different threads: :meth:`prepare` (decode, check, build
    the listings, decode their images; ``map_`` spreads the image decoding over a pool) and
    :meth:`embed` (the forward pass and the output records; on the model thread). The embed
    agent prepares the next batch while the model embeds the current one.
    """

    stage = "embed"

    def __init__(self, encoder: Encoder, settings: Settings) -> None:
        self.encoder = encoder
        self.settings = settings
        self._listings = codec_for_topic(LISTINGS)
        self._embeddings = codec_for_topic(LISTING_EMBEDDINGS)

    def __call__(self, batch: Sequence[Incoming], encoders: Sequence[Encoder] | None = None,
                 images: Mapping[str, bytes | ImageError] | None = None, *,
                 reembed: bool = False) -> tuple[list[Outgoing], list[Failure]]:
        """Embed ``batch`` with ``encoders`` (default: the step's encoder). ``images``: the fetched
        images of the batch's URLs (:func:`remote_image_uris`); a listing whose URL is missing there
        or failed is a Failure with the reason.

        With two encoders (a model switch under way) each record carries the first one's vectors
        and, in ``next_model``, the second one's. ``reembed`` marks records of the catalogue
        re-embedding that a switch runs: replicas apply them, nothing is emitted for them.
        """
        encoders = self._checked(encoders)
        return self.embed(self.prepare(batch, encoders, images, reembed=reembed), encoders)

    def _checked(self, encoders: Sequence[Encoder] | None) -> list[Encoder]:
        encoders = list(encoders) if encoders else [self.encoder]
        if len(encoders) > 2:
            raise ValueError(f"at most two encoders at a time, got {len(encoders)}")
        return encoders

    def prepare(self, batch: Sequence[Incoming], encoders: Sequence[Encoder] = (),
                images: Mapping[str, bytes | ImageError] | None = None, *, reembed: bool = False,
                map_: Callable[..., Iterable[Any]] = map) -> PreparedBatch:
        """Decode and check every message, build the listings and prepare them for ``encoders``
        (none: :meth:`embed` prepares them for its own). Thread-safe; no forward pass."""
        failed: list[tuple[int, Failure]] = []
        upserts: list[tuple[int, dict[str, Any], ListingInput]] = []
        deletes: list[tuple[int, dict[str, Any]]] = []
        for i, msg in enumerate(batch):
            try:
                if msg.value is None:
                    raise InvalidListingError("empty message (null value)")
                record = self._listings.decode(msg.value)
                validate_listing(record, self.settings)
                if record.get("op") == "DELETE":
                    deletes.append((i, record))
                    continue
                upserts.append((i, record, listing_input(record, self.settings, images)))
            except BadInputError as exc:
                failed.append((i, Failure(msg, self.stage, exc)))
        encoders = list(encoders)
        prepared: list[list[Any]] = []
        if encoders:
            # Image decoding is most of this: ``map_`` may run the listings on a pool.
            results = list(map_(_prepare_for(encoders), [listing for _, _, listing in upserts]))
            kept = []
            for upsert, result in zip(upserts, results):
                if isinstance(result, BadInputError):
                    failed.append((upsert[0], Failure(batch[upsert[0]], self.stage, result)))
                else:
                    kept.append(upsert)
                    prepared.append(result)
            upserts = kept
        failures = [f for _, f in sorted(failed, key=lambda pair: pair[0])]
        messages = [batch[i] for i, _, _ in upserts]
        return PreparedBatch(len(batch), upserts, deletes, encoders, prepared, failures, messages, reembed)

    def embed(self, prepared: PreparedBatch,
              encoders: Sequence[Encoder] | None = None) -> tuple[list[Outgoing], list[Failure]]:
        """The forward pass of a prepared batch with ``encoders`` (default: the step's encoder),
        and its output records in input order. Listings prepared for other encoders than these
        (a model switch began or ended since) are prepared here."""
        encoders = self._checked(encoders)
        failures = list(prepared.failures)
        # Where each encoder's prepared listings are (None: not prepared for it yet).
        columns = [next((k for k, e in enumerate(prepared.encoders) if e is encoder), None) for encoder in encoders]
        upserts = prepared.upserts
        rows = prepared.prepared if prepared.encoders else [[] for _ in upserts]
        missing = [e for e, c in zip(encoders, columns) if c is None]
        if missing:
            fresh = list(map(_prepare_for(missing), [listing for _, _, listing in upserts]))
            kept_upserts, kept_rows = [], []
            for upsert, row, message, result in zip(upserts, rows, prepared.messages, fresh):
                if isinstance(result, BadInputError):
                    failures.append(Failure(message, self.stage, result))
                    continue
                extra = iter(result)
                kept_upserts.append(upsert)
                kept_rows.append([row[c] if c is not None else next(extra) for c in columns])
            upserts, rows = kept_upserts, kept_rows
        else:
            rows = [[row[c] for c in columns] for row in rows]  # type: ignore[index]
        # Output slots keep input order, so an upsert and a later delete of one listing stay in order.
        slots: list[dict[str, Any] | None] = [None] * prepared.size
        for i, record in prepared.deletes:
            slots[i] = self._delete_record(record, encoders[0], prepared.reembed)
        if upserts:
            embedded = [encoder.embed([r[k] for r in rows]) for k, encoder in enumerate(encoders)]
            embedded_at = now_ms()
            for row, (i, record, listing) in enumerate(upserts):
                out = self._upsert_record(record, encoders[0], embedded[0], row, embedded_at, prepared.reembed)
                out["match_text"] = encoders[0].match_text(listing)
                if len(encoders) == 2:
                    # The next model's index compares the next model's text: its matcher may read
                    # more or fewer description words than the serving one's.
                    text = encoders[1].match_text(listing)
                    out["next_model"] = {**self._vectors(encoders[1], embedded[1], row),
                                         "match_text": None if text == out["match_text"] else text}
                slots[i] = out
        out = []
        for record in slots:
            if record is not None:
                out.append(Outgoing(record["listing_id"].encode(), self._embeddings.encode(record)))
        return out, failures

    @staticmethod
    def _vectors(encoder: Encoder, emb: Embeddings, row: int) -> dict[str, Any]:
        has_image = bool(emb.has_image[row])
        return {
            "model_version": encoder.version,
            "dim": encoder.dim,
            "vector_image": vector_to_bytes(emb.image[row]) if has_image else None,
            "vector_text": vector_to_bytes(emb.text[row]),
            "vector_image_text": vector_to_bytes(emb.image_text[row]),
        }

    def _upsert_record(self, record: dict[str, Any], encoder: Encoder, emb: Embeddings, row: int,
                       embedded_at: int, reembed: bool) -> dict[str, Any]:
        has_image = bool(emb.has_image[row])
        return {
            "listing_id": record["listing_id"],
            "supplier_id": record.get("supplier_id") or DEFAULT_SUPPLIER,
            "category": record.get("category"),
            "title": record.get("title"),
            "op": "UPSERT",
            "has_image": has_image,
            **self._vectors(encoder, emb, row),
            "image_uri": record.get("image_uri") if has_image else None,
            "match_text": None,  # set by the caller, from the listing
            "reembed": reembed,
            "next_model": None,
            "event_time": record["event_time"],
            "embedded_at": embedded_at,
        }

    def _delete_record(self, record: dict[str, Any], encoder: Encoder, reembed: bool) -> dict[str, Any]:
        return {
            "listing_id": record["listing_id"],
            "supplier_id": record.get("supplier_id") or DEFAULT_SUPPLIER,
            "category": record.get("category"),
            "title": None,
            "op": "DELETE",
            "model_version": encoder.version,
            "dim": encoder.dim,
            "has_image": False,
            "vector_image": None,
            "vector_text": None,
            "vector_image_text": None,
            "image_uri": None,
            "match_text": None,
            "reembed": reembed,
            "next_model": None,
            "event_time": record["event_time"],
            "embedded_at": now_ms(),
        }


# --------------------------------------------------------------------------------------------
# index step: listing-embeddings -> live index (replica) and -> similar-products / duplicate-alerts


@dataclass(frozen=True)
class EmbeddingUpdate:
    """A decoded listing-embeddings record, vectors as float32 arrays."""

    listing_id: str
    supplier_id: str
    op: str
    model_version: str
    event_time: int
    has_image: bool
    views: np.ndarray | None  # [3, dim] image / text / image_text; None for DELETE
    payload: dict[str, Any]
    #: model version -> views [3, dim]: the record's own model first, then ``next_model``'s.
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    #: Written by a model switch's re-embedding: apply it, emit nothing for it.
    reembed: bool = False
    #: model version -> its matcher's text of the listing, where it differs from ``payload``'s.
    match_texts: dict[str, str] = field(default_factory=dict)

    @property
    def vector(self) -> np.ndarray:
        assert self.views is not None
        return self.views[2]

    def payload_for(self, version: str) -> dict[str, Any]:
        """The payload ``version``'s index keeps: :attr:`payload` with that model's match text."""
        text = self.match_texts.get(version)
        return self.payload if text is None else {**self.payload, "match_text": text}

    def for_version(self, version: str) -> EmbeddingUpdate:
        """This update as seen by ``version``'s index (its vectors, payload and version on the outputs)."""
        if version == self.model_version:
            return self
        return replace(self, model_version=version, views=self.vectors[version], payload=self.payload_for(version))


def decode_embedding(value: bytes | None) -> EmbeddingUpdate:
    """The update a listing-embeddings record describes; raises BadInputError (DecodeError for
    bytes that are not one, InvalidListingError for an upsert without its vectors)."""
    if value is None:
        raise InvalidListingError("empty message (null value)")
    record = codec_for_topic(LISTING_EMBEDDINGS).decode(value)
    views = None
    vectors: dict[str, np.ndarray] = {}
    match_texts: dict[str, str] = {}
    if record["op"] != "DELETE":
        views = _views(record, record["listing_id"])
        vectors[record["model_version"]] = views
        other = record.get("next_model")
        if other is not None and other["model_version"] != record["model_version"]:
            vectors[other["model_version"]] = _views(other, record["listing_id"])
            if isinstance(other.get("match_text"), str):
                match_texts[other["model_version"]] = other["match_text"]
    return EmbeddingUpdate(
        listing_id=record["listing_id"],
        supplier_id=record["supplier_id"],
        op=record["op"],
        model_version=record["model_version"],
        event_time=record["event_time"],
        has_image=record["has_image"],
        views=views,
        payload={"supplier_id": record["supplier_id"], "category": record.get("category"),
                 "title": record.get("title"), "event_time": record["event_time"],
                 "has_image": record["has_image"], "image_uri": record.get("image_uri"),
                 "match_text": record.get("match_text")},
        vectors=vectors,
        reembed=bool(record.get("reembed")),
        match_texts=match_texts,
    )


def _views(record: dict[str, Any], listing_id: str) -> np.ndarray:
    """``[3, dim]`` image / text / image_text of one model's vectors (zeros for a missing image)."""
    dim, image, text, image_text = (record["dim"], record["vector_image"], record["vector_text"],
                                    record["vector_image_text"])
    size = 4 * dim if type(dim) is int and dim > 0 else -1
    if (text and image_text and len(text) == size and len(image_text) == size
            and (not image or len(image) == size) and type(text) is bytes and type(image_text) is bytes
            and (not image or type(image) is bytes)):
        # The common case in one buffer: one array, one finiteness check (bytes_to_vector's
        # checks, each vector's, are the slow path below, which also words the errors).
        buf = bytearray(image) if image else bytearray(size)
        buf += text
        buf += image_text
        views = np.frombuffer(buf, dtype="<f4").reshape(3, dim)  # [3, dim], writable (a bytearray's)
        if np.isfinite(views).all():
            return views.astype(np.float32, copy=False)  # native order: no copy on little-endian
    return _views_checked(record, listing_id)


def _views_checked(record: dict[str, Any], listing_id: str) -> np.ndarray:
    """:func:`_views` one vector at a time, raising the first problem found."""
    dim = record["dim"]
    text = bytes_to_vector(record["vector_text"], dim) if record["vector_text"] else None
    image_text = bytes_to_vector(record["vector_image_text"], dim) if record["vector_image_text"] else None
    if text is None or image_text is None:
        raise InvalidListingError(f"listing {listing_id!r}: upsert without text/image+text vectors")
    image = bytes_to_vector(record["vector_image"], dim) if record["vector_image"] else np.zeros(dim, np.float32)
    return np.stack([image, text, image_text]).astype(np.float32)


def match_text_of(payload: dict[str, Any]) -> str:
    """A listing's match text as the index keeps it: ``match_text``, else (a record or snapshot
    from before the field existed) its whitespace-normalised title, the default
    :meth:`Encoder.match_text`."""
    text = payload.get("match_text")
    return text if isinstance(text, str) else " ".join((payload.get("title") or "").split())


@dataclass(frozen=True)
class Decision:
    """How a search step decides duplicates: the served model's classifier or the cosine rule."""

    decided_by: str  # "classifier" (probability >= threshold) or "cosine" (score >= threshold)
    threshold: float
    scorer: DuplicateScorer | None
    #: Where the threshold came from: the model's own or SAMESTYLE_DUPLICATE_THRESHOLD.
    source: str

    @classmethod
    def of(cls, scorer: DuplicateScorer | None, settings: Settings) -> Decision:
        explicit = settings.duplicate_threshold
        source = "SAMESTYLE_DUPLICATE_THRESHOLD" if explicit is not None else "the model's threshold"
        if scorer is not None:
            return cls("classifier", float(scorer.threshold if explicit is None else explicit), scorer, source)
        return cls("cosine", settings.effective_cosine_threshold, None,
                   source if explicit is not None else "the default threshold")


class AlertedPairs:
    """The pairs a worker has alerted on, or seen alerted in ``duplicate-alerts`` (bounded, oldest
    forgotten first: at-least-once delivery made idempotent for the pairs it remembers)."""

    def __init__(self, capacity: int = ALERTED_PAIRS_REMEMBERED) -> None:
        self.capacity = capacity
        self._pairs: OrderedDict[tuple[str, str], None] = OrderedDict()

    @staticmethod
    def _key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a < b else (b, a)

    def __len__(self) -> int:
        return len(self._pairs)

    def __contains__(self, pair: object) -> bool:
        return isinstance(pair, tuple) and len(pair) == 2 and self._key(*pair) in self._pairs

    def add(self, a: str, b: str) -> bool:
        """Remember the pair; True if it was not remembered before."""
        key = self._key(a, b)
        if key in self._pairs:
            self._pairs.move_to_end(key)
            return False
        self._pairs[key] = None
        if len(self._pairs) > self.capacity:
            self._pairs.popitem(last=False)
        return True

    def discard(self, a: str, b: str) -> None:
        self._pairs.pop(self._key(a, b), None)


def payloads_of(index: Any, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The payloads of the ``ids`` present in ``index``: one request where the index reads many
    at once (``payloads``, a backend's view), else one lookup each (a :class:`LiveIndex`)."""
    many = getattr(index, "payloads", None)
    if many is not None:
        return many(ids)
    found = ((i, index.payload(i)) for i in ids)
    return {i: p for i, p in found if p is not None}


@dataclass
class _Candidate:
    """A neighbour of a searched listing: a similar product, and a duplicate candidate when it
    is of the same supplier."""

    update: EmbeddingUpdate
    other_id: str
    score: float
    payload: dict[str, Any]
    pair: PairCandidate
    probability: float | None = None


class SearchStep:
    """For every upsert: its top-k neighbours, and an alert for each same-supplier near copy.

    The duplicate decision is the served model's (:attr:`Encoder.duplicate_scorer`): its
    calibrated classifier scores every same-supplier neighbour of a batch in one call, and a
    pair is a duplicate when the probability reaches its threshold. A model without a scorer
    keeps the cosine rule (image+text cosine >= ``settings.effective_cosine_threshold``). An
    explicit ``settings.duplicate_threshold`` replaces the model's threshold, in its terms.

    With a scorer, the similar-products list is the dense top-k re-ranked by the same
    probabilities (every neighbour is scored, in the same call); each neighbour's ``score`` stays
    its image+text cosine. Without one, it is in cosine order.
    """

    stage = "index"

    def __init__(self, index: LiveIndex, settings: Settings, scorer: DuplicateScorer | None = None,
                 alerted: AlertedPairs | None = None) -> None:
        self.index = index
        self.settings = settings
        #: The duplicate scorer of the model whose index is searched (None: the cosine rule).
        self.scorer = scorer
        self._similar = codec_for_topic(SIMILAR_PRODUCTS)
        self._alerts = codec_for_topic(DUPLICATE_ALERTS)
        #: Pairs not to alert again: this step's alerts, and, when the worker follows
        #: ``duplicate-alerts`` into it, every worker's (bounded: at-least-once, not exactly-once).
        self.alerted = alerted if alerted is not None else AlertedPairs()
        #: Pairs first remembered by the call under way (forgotten again if it fails).
        self._new_pairs: list[tuple[str, str]] = []

    def __call__(self, updates: Sequence[EmbeddingUpdate], index: LiveIndex | None = None,
                 scorer: DuplicateScorer | None = None) -> tuple[list[Outgoing], list[Outgoing]]:
        """Search ``index`` (default: the step's) for every upsert; the updates' vectors must be
        that index's model's (see :meth:`EmbeddingUpdate.for_version`). ``scorer`` is that
        model's duplicate scorer: given with an ``index``, None means the model has none; with
        neither, the step's index and scorer are used."""
        if index is not None or scorer is not None:
            if index is not None:
                self.index = index
            self.scorer = scorer
        self._new_pairs = []
        try:
            return self._search(updates)
        except BaseException:
            # Nothing of this call was emitted: its pairs must alert when the batch is retried.
            for pair in self._new_pairs:
                self.alerted.discard(*pair)
            raise

    def _search(self, updates: Sequence[EmbeddingUpdate]) -> tuple[list[Outgoing], list[Outgoing]]:
        upserts = [u for u in updates if u.op != "DELETE"]
        if not upserts:
            return [], []
        decision = Decision.of(self.scorer, self.settings)
        queries = np.stack([u.vector for u in upserts])  # [q, dim]
        results = self.index.search(queries, self.settings.top_k, exclude=[u.listing_id for u in upserts])
        payloads = payloads_of(self.index, list(dict.fromkeys(h.listing_id for hits in results for h in hits)))
        emitted_at = now_ms()
        per_update: list[list[_Candidate]] = []
        for update, hits in zip(upserts, results):
            found: list[tuple[str, float, dict[str, Any]]] = []
            for hit in hits:
                payload = payloads.get(hit.listing_id)
                if payload is None:  # deleted between search and here
                    continue
                found.append((hit.listing_id, float(hit.score), payload))
            per_update.append(self._candidates(update, found))
        if decision.scorer is not None and decision.scorer.uses_vectors:
            per_update = self._with_vectors(per_update)
        everyone = [c for cs in per_update for c in cs]
        if decision.scorer is not None and everyone:
            # One call scores every neighbour of the batch: the same-supplier ones for the
            # duplicate decision, all of them to order the similar-products list.
            probabilities = np.asarray(decision.scorer.probabilities([c.pair for c in everyone]),
                                       dtype=np.float64).reshape(-1)
            if probabilities.shape[0] != len(everyone):
                raise ValueError(f"duplicate scorer returned {probabilities.shape[0]} probabilities "
                                 f"for {len(everyone)} candidates")
            for c, p in zip(everyone, probabilities):
                c.probability = float(p)
        similar: list[Outgoing] = []
        for update, cs in zip(upserts, per_update):
            if decision.scorer is not None:
                # The matcher's order (the dense top-k re-ranked); NaN sorts last, ties by cosine.
                cs = sorted(cs, key=lambda c: (-(c.probability if c.probability == c.probability else -1.0),
                                               -c.score))
            similar.append(Outgoing(update.listing_id.encode(), self._similar.encode({
                "listing_id": update.listing_id,
                "supplier_id": update.supplier_id,
                "neighbours": [{"listing_id": c.other_id, "supplier_id": c.payload["supplier_id"],
                                "score": c.score} for c in cs],
                "model_version": update.model_version,
                "event_time": update.event_time,
                "emitted_at": emitted_at,
            })))
        same_supplier = [c for c in everyone if c.payload["supplier_id"] == c.update.supplier_id]
        alerts = [self._alert(c, decision, emitted_at) for c in self._decide(same_supplier, decision)]
        return similar, alerts

    def _with_vectors(self, per_update: list[list[_Candidate]]) -> list[list[_Candidate]]:
        """The candidates with both listings' ids and image+text vectors, for a scorer that reads
        them; a neighbour deleted since the search is left out, as one without a payload is."""
        ids = list(dict.fromkeys(c.other_id for cs in per_update for c in cs))
        found: dict[str, np.ndarray] = {}
        if ids:
            try:
                views = self.index.views(ids)
                found = {i: views[k, 2] for k, i in enumerate(ids)}
            except IndexStoreError:  # one was deleted since the search: the others one by one
                for i in ids:
                    try:
                        found[i] = self.index.views([i])[0, 2]
                    except IndexStoreError:
                        pass
        return [[replace(c, pair=replace(c.pair, id_a=c.update.listing_id, id_b=c.other_id,
                                         vector_a=c.update.vector, vector_b=found[c.other_id]))
                 for c in cs if c.other_id in found] for cs in per_update]

    @staticmethod
    def _candidates(update: EmbeddingUpdate,
                    found: list[tuple[str, float, dict[str, Any]]]) -> list[_Candidate]:
        """Every neighbour of ``update`` as a candidate pair (``found``: nearest first), with its
        rank and margin among all neighbours and among the neighbours from its own source."""
        out = []
        text = match_text_of(update.payload) if found else None
        texts = [match_text_of(payload) for _, _, payload in found]
        sources = [split_source(t.lower())[1] for t in texts]
        for rank, (other_id, score, payload) in enumerate(found):
            others = [s for k, (_, s, _) in enumerate(found) if k != rank]
            source_rank = source_best = None
            if sources[rank]:
                peers = [s for k, (_, s, _) in enumerate(found) if k != rank and sources[k] == sources[rank]]
                source_rank = sum(1 for s in peers if s > score + 1e-6)
                source_best = max(peers) if peers else -1.0
            pair = PairCandidate(text_a=text or "", text_b=texts[rank], cosine=score, rank=rank,
                                 best_other=max(others) if others else -1.0,
                                 source_rank=source_rank, source_best_other=source_best)
            out.append(_Candidate(update, other_id, score, payload, pair))
        return out

    def _decide(self, candidates: list[_Candidate], decision: Decision) -> list[_Candidate]:
        """The candidates (scored already when a scorer decides) that are duplicates and not
        alerted here before, in search order."""
        duplicates = []
        for c in candidates:
            value = c.probability if decision.scorer is not None else c.score
            # NaN is never a duplicate.
            if value is not None and value >= decision.threshold and self._first_alert(c.update.listing_id, c.other_id):
                duplicates.append(c)
        return duplicates

    def _first_alert(self, listing_id: str, other_id: str) -> bool:
        """Whether this worker has not alerted the pair before (and remember it now)."""
        # Either side of a pair may find the other: whichever is searched second sees the first
        # (a copy can be searched before its original reached this replica from another partition,
        # and then the original finds the copy). Pairs already alerted here are not alerted again.
        if not self.alerted.add(listing_id, other_id):
            return False
        self._new_pairs.append((listing_id, other_id))
        return True

    def _alert(self, candidate: _Candidate, decision: Decision, emitted_at: int) -> Outgoing:
        update, other_id, score, payload = candidate.update, candidate.other_id, candidate.score, candidate.payload
        assert update.views is not None
        other = self.index.views([other_id])[0]  # [3, dim]
        both_images = update.has_image and bool(payload.get("has_image"))
        view_scores = {
            "image": float(update.views[0] @ other[0]) if both_images else None,
            "text": float(update.views[1] @ other[1]),
            "image_text": float(update.views[2] @ other[2]),
        }
        # The newer listing (by event time) is named the duplicate of the older one, whichever of
        # the two found the pair, so both sides produce the same alert and the same key.
        if (payload["event_time"], other_id) < (update.event_time, update.listing_id):
            newer, older, event_time = update.listing_id, other_id, update.event_time
        else:
            newer, older, event_time = other_id, update.listing_id, payload["event_time"]
        if decision.decided_by == "classifier":
            assert candidate.probability is not None
            reason = (f"duplicate probability {candidate.probability:.3f} >= {decision.threshold:.3f} "
                      f"({decision.source}) by the model's classifier, image+text cosine {score:.3f}, "
                      f"with an older listing of the same supplier")
        else:
            reason = (f"image+text cosine {score:.3f} >= {decision.threshold:.3f} ({decision.source}) "
                      f"with an older listing of the same supplier")
        return Outgoing(newer.encode(), self._alerts.encode({
            "listing_id": newer,
            "duplicate_of": older,
            "supplier_id": update.supplier_id,
            "score": score,
            "scores": view_scores,
            "model_version": update.model_version,
            "probability": candidate.probability,
            "threshold": decision.threshold,
            "decided_by": decision.decided_by,
            "reason": reason,
            "event_time": event_time,
            "emitted_at": emitted_at,
        }))
