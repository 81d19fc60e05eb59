"""The encoder contract: a listing in, unit vectors for its I, T and IT views out.

``ListingInput`` / ``PreparedListing`` / ``Embeddings`` are the data, :class:`EncoderConfig`
the architecture as data (names, JSON files or model directories: :func:`load_config`), and
:class:`Encoder` the interface every encoder implements: :meth:`Encoder.prepare` is the
per-listing CPU part (validation, text building, image decode), safe on a thread pool;
:meth:`Encoder.embed` is one batched forward pass. Implementations live in
:mod:`samestyle.models.pretrained` and :mod:`samestyle.models.unified`; build one with
:func:`samestyle.models.factory.create_encoder`.
"""

from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from samestyle.models.backbones import (
    BUNDLED_EFFICIENTNET_LITE0,
    BUNDLED_MINILM,
    RANDOM_WEIGHT_SPECS,
    TINY,
    is_local_text_spec,
)
from samestyle.models.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImagePreprocessing
from samestyle.models.runtime import RUNTIMES, Runtime
from samestyle.topics.errors import ConfigError, ImageError, InvalidListingError

logger = logging.getLogger(__name__)

ALLOW_RANDOM_WEIGHTS_ENV = "SAMESTYLE_ALLOW_RANDOM_WEIGHTS"
MODEL_DIR_CONFIG = "encoder.json"
VIEWS = ("I", "T", "IT")
# A wordpiece token is rarely over a few characters; capping the text at this many characters
# per token bounds tokenizer work on a hostile 10 MB description without changing the result.
MAX_CHARS_PER_TOKEN = 32

__all__ = [
    "ALLOW_RANDOM_WEIGHTS_ENV",
    "MODEL_DIR_CONFIG",
    "NAMED_CONFIGS",
    "VIEWS",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "ListingInput",
    "DuplicateScorer",
    "PROVENANCE_ATTRIBUTES",
    "PairCandidate",
    "PreparedListing",
    "listing_text",
    "load_config",
    "prepare_listing",
    "random_weights_allowed",
]


# ------------------------------------------------------------------------------ data classes


@dataclass(frozen=True)
class ListingInput:
    """One product listing as the encoder sees it (decoded from the ``listings`` topic)."""

    listing_id: str
    title: str
    description: str = ""
    attributes: Mapping[str, str] = field(default_factory=dict)
    image: bytes | None = None  # encoded image file (JPEG, PNG, WebP, ...), not pixels
    category: str | None = None


@dataclass(frozen=True)
class PreparedListing:
    """The CPU-side preprocessing result of one listing, ready for a batched forward pass."""

    listing_id: str
    text: str  # title, description and attributes, whitespace-normalised, not yet tokenised
    image: torch.Tensor | None  # [3, S, S] float32, normalised for the image backbone
    category: str | None = None


@dataclass(frozen=True)
class Embeddings:
    """Embeddings of a batch, row ``k`` for the batch's ``k``-th listing; every row unit-norm
    except the all-zero image rows of listings without an image and the all-zero text rows of
    image-only listings (no title, no text)."""

    image: np.ndarray  # [n, dim] float32; all-zero rows where has_image is False
    text: np.ndarray  # [n, dim] float32; all-zero rows where has_text is False
    image_text: np.ndarray  # [n, dim] float32; from the one modality a listing has, else both
    has_image: np.ndarray  # [n] bool
    # [n] bool; None derives it from the text rows (a listing has text iff its T row is non-zero)
    has_text: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.has_image.shape[0]
        for name in ("image", "text", "image_text"):
            array = getattr(self, name)
            if array.ndim != 2 or array.shape[0] != n or array.shape != self.text.shape:
                raise ValueError(f"Embeddings.{name} has shape {array.shape}, expected [{n}, dim]")
        if self.has_text is None:
            object.__setattr__(self, "has_text", np.any(self.text != 0, axis=1))
        elif self.has_text.shape != (n,):
            raise ValueError(f"Embeddings.has_text has shape {self.has_text.shape}, expected [{n}]")

    def __len__(self) -> int:
        return int(self.has_image.shape[0])

    @property
    def dim(self) -> int:
        return int(self.text.shape[1])

    def view(self, name: str) -> np.ndarray:
        """The ``[n, dim]`` array of one view: ``"I"``, ``"T"`` or ``"IT"``."""
        arrays = {"I": self.image, "T": self.text, "IT": self.image_text}
        if name not in arrays:
            raise ValueError(f"unknown view {name!r}; expected one of {VIEWS}")
        return arrays[name]

    @classmethod
    def empty(cls, dim: int) -> Embeddings:
        zeros = np.zeros((0, dim), dtype=np.float32)
        return cls(zeros, zeros.copy(), zeros.copy(), np.zeros(0, dtype=bool), np.zeros(0, dtype=bool))


# ------------------------------------------------------------------------------------ config


@dataclass(frozen=True)
class EncoderConfig:
    """An encoder architecture as data. Load with :func:`load_config` (name, JSON file or model
    directory) or :meth:`from_dict`; backbone specs are described in :mod:`models.backbones`."""

    name: str
    text_backbone: str
    image_backbone: str
    fusion: str = "concat"
    # Carried on every emitted message; vectors of different versions must never be compared.
    # Empty means "<name>-<fusion>-v1".
    version: str = ""
    max_text_tokens: int = 128
    image_size: int = 224
    image_crop_pct: float = 0.875
    image_mean: tuple[float, float, float] = (127.0, 127.0, 127.0)  # on 0..255 values
    image_std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    # Checked against the loaded backbones when set, so a config states the dims it expects.
    text_dim: int | None = None
    image_dim: int | None = None
    # Random ("tiny") backbones: seed and sizes. Ignored by pretrained backbones.
    seed: int = 0
    tiny_text_hidden: int = 32
    tiny_text_layers: int = 2
    tiny_image_channels: int = 32

    def __post_init__(self) -> None:
        for name in ("image_mean", "image_std"):
            value = getattr(self, name)
            if isinstance(value, (int, float)):
                value = (value,) * 3
            value = tuple(float(v) for v in value)
            if len(value) != 3:
                raise ConfigError(
                    f"encoder config {self.name!r}: {name} needs 3 values, got {value}"
                )
            object.__setattr__(self, name, value)
        for name in ("name", "text_backbone", "image_backbone", "fusion"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"encoder config: {name} must be a non-empty string")
        positive = (
            "max_text_tokens",
            "image_size",
            "max_image_bytes",
            "max_image_pixels",
            "tiny_text_hidden",
            "tiny_text_layers",
            "tiny_image_channels",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"encoder config {self.name!r}: {name} must be a positive int")
        if not 0.0 < self.image_crop_pct <= 1.0:
            raise ConfigError(f"encoder config {self.name!r}: image_crop_pct must be in (0, 1]")
        if any(s == 0 for s in self.image_std):
            raise ConfigError(f"encoder config {self.name!r}: image_std must not contain 0")
        if self.tiny_text_hidden % 2:
            raise ConfigError(f"encoder config {self.name!r}: tiny_text_hidden must be even")
        if not self.version:
            object.__setattr__(self, "version", f"{self.name}-{self.fusion}-v1")

    @property
    def uses_random_weights(self) -> bool:
        return bool({self.text_backbone, self.image_backbone} & RANDOM_WEIGHT_SPECS)

    def image_preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(
            size=self.image_size,
            crop_pct=self.image_crop_pct,
            mean=self.image_mean,
            std=self.image_std,
            max_bytes=self.max_image_bytes,
            max_pixels=self.max_image_pixels,
        )

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["image_mean"] = list(self.image_mean)
        data["image_std"] = list(self.image_std)
        return data

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], base_dir: str | Path | None = None
    ) -> EncoderConfig:
        """Build from a mapping; a relative local text-model path is taken from ``base_dir``."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown encoder config keys {unknown}; known: {sorted(known)}")
        missing = sorted({"name", "text_backbone", "image_backbone"} - set(data))
        if missing:
            raise ConfigError(f"encoder config is missing {missing}")
        values = dict(data)
        text = values["text_backbone"]
        if base_dir is not None and isinstance(text, str) and is_local_text_spec(text):
            path = Path(text.removeprefix("hf:")).expanduser()
            if not path.is_absolute():
                values["text_backbone"] = str(Path(base_dir) / path)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"bad encoder config: {exc}") from exc

    @classmethod
    def from_json(cls, path: str | Path) -> EncoderConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read encoder config {path}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"encoder config {path} must be a JSON object")
        return cls.from_dict(data, base_dir=path.parent)


NAMED_CONFIGS: Mapping[str, EncoderConfig] = {
    "default": EncoderConfig(
        name="default",
        text_backbone=BUNDLED_MINILM,
        image_backbone=BUNDLED_EFFICIENTNET_LITE0,
        fusion="concat",
        version="pretrained-concat-v1",
        text_dim=384,
        image_dim=1280,
    ),
    "tiny": EncoderConfig(
        name="tiny",
        text_backbone=TINY,
        image_backbone=TINY,
        fusion="concat",
        version="tiny-random-concat-v1",
        max_text_tokens=64,
        image_size=32,
        image_crop_pct=1.0,
        text_dim=32,
        image_dim=32,
    ),
}


def load_config(spec: str | Path) -> EncoderConfig:
    """Resolve a config name (``default``, ``tiny``), a JSON config file, or a model directory
    (one holding ``encoder.json``; trained weights next to it come with the trained fusion)."""
    spec_str = str(spec)
    if spec_str in NAMED_CONFIGS:
        return NAMED_CONFIGS[spec_str]
    path = Path(spec_str).expanduser()
    if path.is_file():
        return EncoderConfig.from_json(path)
    if path.is_dir():
        config_file = path / MODEL_DIR_CONFIG
        if not config_file.is_file():
            raise ConfigError(
                f"{path} is not an encoder model directory: it has no {MODEL_DIR_CONFIG}"
            )
        return EncoderConfig.from_json(config_file)
    raise ConfigError(
        f"unknown encoder {spec_str!r}: expected one of {sorted(NAMED_CONFIGS)}, a JSON config "
        "file or a model directory"
    )


# ---------------------------------------------------------------------------------- encoders


class Encoder(ABC):
    """Embeds listings into one space for the I, T and IT views.

    Implementations: :class:`ConcatEncoder` (pretrained backbones, untrained block fusion);
    the trained single-stream fusion transformer plugs in here too, keyed by ``config.fusion``.
    """

    config: EncoderConfig
    version: str  # carried on every emitted message
    dim: int  # width of every view
    device: str  # "cpu", "cuda", "cuda:1", ...
    #: How the backbones compute (:mod:`samestyle.models.runtime`); the factory sets it.
    runtime: Runtime = RUNTIMES["eager"]
    #: Whether :meth:`use_runtime` takes runtimes other than eager.
    supports_runtimes: ClassVar[bool] = False

    def use_runtime(self, runtime: Runtime) -> None:
        """Run the forward pass under ``runtime`` from now on. It converts the backbones in
        place: call it once, right after the encoder is built (the factory does). An encoder
        that runs eager float32 only raises ConfigError for any other runtime."""
        if not runtime.is_eager:
            raise ConfigError(f"{type(self).__name__} runs eager float32 only, not runtime {runtime.name!r}")
        self.runtime = runtime

    @abstractmethod
    def prepare(self, listing: ListingInput) -> PreparedListing:
        """Validate and preprocess one listing on CPU. Thread-safe.

        A listing needs a title or an image: an image-only listing (empty title) is valid and
        gets an all-zero T row, its IT from the image alone.

        Raises:
            InvalidListingError: no listing id, neither a title nor an image, or a field of the
                wrong type.
            ImageError: the image is undecodable, truncated or too large.
        """

    @abstractmethod
    def embed(self, batch: Sequence[PreparedListing]) -> Embeddings:
        """One batched forward pass (under ``torch.inference_mode``); rows follow ``batch``."""

    def encode(self, listings: Sequence[ListingInput]) -> Embeddings:
        """``prepare`` every listing, then ``embed`` them as one batch."""
        return self.embed([self.prepare(listing) for listing in listings])

    def match_text(self, listing: ListingInput) -> str:
        """The text the duplicate scorer compares (kept with the listing in the index)."""
        return " ".join((listing.title or "").split())

    @property
    def duplicate_scorer(self) -> DuplicateScorer | None:
        """The model's own duplicate decision, or None: then an image+text cosine threshold
        (``SAMESTYLE_DUPLICATE_THRESHOLD``) decides."""
        return None


@dataclass(frozen=True)
class PairCandidate:
    """A same-supplier candidate pair as the index agent sees it: listing a searched, b found."""

    text_a: str  # match_text of both listings
    text_b: str
    cosine: float  # image+text cosine of the pair
    rank: int  # b's position among a's neighbours, 0 = nearest
    best_other: float  # best image+text cosine of a's other neighbours (-1.0 when none)
    # The same two among a's neighbours from b's source only (None: b names no source, and the
    # overall ones stand in). A shop that lists each product once puts its look-alikes above a
    # listing's true match from the other shop; among the other shop's listings it is first.
    source_rank: int | None = None
    source_best_other: float | None = None
    # The two listings' ids and image+text vectors, for a scorer that reads them
    # (:attr:`DuplicateScorer.uses_vectors`); None where the caller has none.
    id_a: str | None = None
    id_b: str | None = None
    vector_a: np.ndarray | None = field(default=None, compare=False, repr=False)
    vector_b: np.ndarray | None = field(default=None, compare=False, repr=False)


class DuplicateScorer(ABC):
    """A calibrated duplicate classifier over candidate pairs, with the threshold chosen on valid."""

    #: Probability at or above which a pair is a duplicate (chosen on a valid split).
    threshold: float

    @property
    def uses_vectors(self) -> bool:
        """Whether :meth:`probabilities` reads the candidates' ids and vectors (then callers fill them)."""
        return False

    @abstractmethod
    def probabilities(self, candidates: Sequence[PairCandidate]) -> np.ndarray:
        """``[n]`` calibrated probabilities that each pair is one product."""


#: Attributes that say where a listing came from, not what it is: kept out of the embedded text
#: (a "source: abt.com" in every Abt listing's text would pull same-shop listings together). The
#: fine-tuned model's duplicate matcher still sees the source (``models/text.py``).
PROVENANCE_ATTRIBUTES = frozenset({"source"})


def listing_text(
    listing: ListingInput, max_chars: int | None = None, *, has_image: bool | None = None
) -> str:
    """The text a listing is embedded from: title, description, then sorted ``key: value``
    attributes except :data:`PROVENANCE_ATTRIBUTES`, whitespace-normalised (attribute order must
    not change the vector).

    A listing with an image may have no title (a photo-only listing, e.g. a shopper's photo
    query): its text is what the other fields give, possibly ``""`` (the listing then has no T
    view). ``has_image`` overrides ``listing.image is not None`` for callers that know about
    an image they have not loaded (the feature cache).

    Raises:
        InvalidListingError: an empty title and no image (nothing to embed), or a field that is
            not text.
    """
    with_image = listing.image is not None if has_image is None else has_image
    title = listing.title
    if title is not None and not isinstance(title, str):
        raise InvalidListingError(f"listing {listing.listing_id!r}: title is not a string")
    if not (title or "").strip() and not with_image:
        raise InvalidListingError(
            f"listing {listing.listing_id!r} has an empty title and no image: nothing to embed"
        )
    if not isinstance(listing.description, str):
        raise InvalidListingError(f"listing {listing.listing_id!r}: description is not a string")
    if not isinstance(listing.attributes, Mapping):
        raise InvalidListingError(f"listing {listing.listing_id!r}: attributes is not a mapping")
    pairs = []
    for key, value in sorted((str(k), str(v)) for k, v in listing.attributes.items()):
        key, value = " ".join(key.split()), " ".join(value.split())
        if key and value and key not in PROVENANCE_ATTRIBUTES:
            pairs.append(f"{key}: {value}")
    parts = [
        " ".join((title or "").split()),
        " ".join(listing.description.split()),
        "; ".join(pairs),
    ]
    text = ". ".join(p for p in parts if p)
    return text[:max_chars] if max_chars is not None else text


def prepare_listing(listing: ListingInput, preprocess: Callable[[bytes], torch.Tensor],
                    max_chars: int | None, *, text_of: Callable[[ListingInput], str] | None = None) -> PreparedListing:
    """The CPU side of every encoder: validate, build the text, decode the image (thread-safe).

    ``text`` is ``""`` for an image-only listing (see :func:`listing_text`); ``text_of`` replaces
    :func:`listing_text` for a listing with a title (the fine-tuned model's serialisation)."""
    if not isinstance(listing.listing_id, str) or not listing.listing_id:
        raise InvalidListingError(f"listing id must be a non-empty string, got {listing.listing_id!r}")
    if listing.image is not None and not isinstance(listing.image, (bytes, bytearray, memoryview)):
        raise InvalidListingError(f"listing {listing.listing_id!r}: image must be bytes")
    text = listing_text(listing, max_chars)  # validates the fields too
    if text_of is not None:
        text = text_of(listing) if (listing.title or "").strip() else ""
    image = None
    if listing.image is not None:
        try:
            image = preprocess(bytes(listing.image))  # [3, S, S]
        except ImageError as exc:
            raise ImageError(f"listing {listing.listing_id!r}: {exc}") from exc
    return PreparedListing(listing.listing_id, text, image, listing.category)


def random_weights_allowed(flag: bool = False) -> bool:
    """Whether random backbone weights may be used: ``flag`` or ``SAMESTYLE_ALLOW_RANDOM_WEIGHTS=1``."""
    env = os.environ.get(ALLOW_RANDOM_WEIGHTS_ENV, "").strip().lower()
    return flag or env in ("1", "true", "yes")
