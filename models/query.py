"""Search queries in the listings' embedding space: text only, image only, or image + modifier text.

A query is embedded as if it were a listing, through the public :class:`~models.encoder.Encoder`
API (``prepare`` then ``embed``), and the view that matches what the query holds is the one
searched against the listings' image+text (IT) vectors:

    text only           -> T view   (T-IT is a trained pair of the contrastive unit)
    image only          -> I view   (I-IT likewise)
    image + modifier    -> IT view of (image, modifier text): the paper's "the same, but ..." query

``prepare`` insists on a non-empty title; an image-only query gets a placeholder title, which the
I view never reads (the concat encoder's I block and the unified model's masked-text I view both
ignore the text).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from samestyle.models.encoder import Encoder, ListingInput
from samestyle.topics.errors import InvalidListingError

#: Title given to an image-only query; the I view does not read it.
_IMAGE_ONLY_TITLE = "query image"

__all__ = ["Query", "QueryEmbedding", "embed_queries"]


@dataclass(frozen=True)
class Query:
    """What a user searches with: ``text`` (a query, or the modifier of an image), ``image``
    (encoded file bytes), or both."""

    text: str | None = None
    image: bytes | None = None

    @property
    def has_text(self) -> bool:
        return bool(self.text and self.text.strip())

    @property
    def mode(self) -> str:
        """``"text"``, ``"image"`` or ``"image_text"``."""
        if self.image is not None and self.has_text:
            return "image_text"
        if self.image is not None:
            return "image"
        if self.has_text:
            return "text"
        raise InvalidListingError("a query needs text, an image, or both")


@dataclass(frozen=True)
class QueryEmbedding:
    """One query's vectors, each ``[dim]`` float32 and unit-norm, or None where the query has no
    such view. ``search`` is the one to search the IT index with."""

    mode: str
    search: np.ndarray
    image: np.ndarray | None
    text: np.ndarray | None
    image_text: np.ndarray | None


def embed_queries(encoder: Encoder, queries: Sequence[Query]) -> list[QueryEmbedding]:
    """Embed queries in one batched forward pass (blocking: run it off the event loop).

    Raises:
        InvalidListingError: a query with neither text nor image.
        ImageError: an image that does not decode or is too large.
    """
    modes = [q.mode for q in queries]
    inputs = [
        ListingInput(
            listing_id=f"query-{k}",
            title=" ".join(q.text.split()) if q.has_text and q.text else _IMAGE_ONLY_TITLE,
            image=q.image,
        )
        for k, q in enumerate(queries)
    ]
    emb = encoder.embed([encoder.prepare(listing) for listing in inputs])
    out = []
    for row, mode in enumerate(modes):
        image = emb.image[row] if mode in ("image", "image_text") and emb.has_image[row] else None
        text = emb.text[row] if mode in ("text", "image_text") else None
        image_text = emb.image_text[row] if mode == "image_text" else None
        search = {"text": text, "image": image, "image_text": image_text}[mode]
        if search is None:  # an image that embedded without has_image: should not happen
            raise InvalidListingError(f"query {row}: the encoder returned no {mode} view")
        out.append(QueryEmbedding(mode, search, image, text, image_text))
    return out
