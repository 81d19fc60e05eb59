"""Listing encoders: one listing in, unit vectors for its I, T and IT views out.

The paper's model is one single-stream transformer that reads title tokens and image patches
together; masking a modality gives the T and I views, so all three live in one learned space.
No such space exists offline before this project trains one, so the ``default`` encoder is an
honest stand-in built from two unrelated pretrained backbones and an untrained block fusion:

    t = normalise(MiniLM(text))              # [384]
    i = normalise(EfficientNet-Lite0(image)) # [1280]
    T  = [t, 0]                              # [1664]; all-zero for an image-only listing
    I  = [0, i]                              # all-zero for a listing without an image
    IT = normalise([t, i])  with both,  [t, 0] text only,  [0, i] image only

so T·IT and I·IT carry real similarity (each through its own block), and T·I is exactly 0: there
is no cross-modal signal without training. A trained fusion (a later issue) implements the same
:class:`Encoder` interface and is selected by ``EncoderConfig.fusion``.

Work is split for a streaming worker: :meth:`Encoder.prepare` is the per-listing CPU part
(validation, text building, image decode) and is safe to run on a thread pool;
:meth:`Encoder.embed` is one batched forward pass on the model's device.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samestyle.models.backbones import (
    BUNDLED_EFFICIENTNET_LITE0,
    BUNDLED_MINILM,
    RANDOM_WEIGHT_SPECS,
    TINY,
    HFTextBackbone,
    ImageBackbone,
    build_image_backbone,
    build_text_backbone,
    is_local_text_spec,
)
from samestyle.models.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, ImagePreprocessing
from samestyle.topics.errors import ConfigError, ImageError, InvalidListingError

logger = logging.getLogger(__name__)

ALLOW_RANDOM_WEIGHTS_ENV = "SAMESTYLE_ALLOW_RANDOM_WEIGHTS"
MODEL_DIR_CONFIG = "encoder.json"
VIEWS = ("I", "T", "IT")
# A wordpiece token is rarely over a few characters; capping the text at this many characters
# per token bounds tokenizer work on a hostile 10 MB description without changing the result.
_MAX_CHARS_PER_TOKEN = 32

__all__ = [
    "ALLOW_RANDOM_WEIGHTS_ENV",
    "ENCODER_BUILDERS",
    "NAMED_CONFIGS",
    "VIEWS",
    "ConcatEncoder",
    "ConcatFusion",
    "Embeddings",
    "Encoder",
    "EncoderConfig",
    "ListingInput",
    "PreparedListing",
    "create_encoder",
    "encoder_from_spec",
    "listing_text",
    "load_config",
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


def listing_text(
    listing: ListingInput, max_chars: int | None = None, *, has_image: bool | None = None
) -> str:
    """The text a listing is embedded from: title, description, then sorted ``key: value``
    attributes, whitespace-normalised (attribute order must not change the vector).

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
        if key and value:
            pairs.append(f"{key}: {value}")
    parts = [
        " ".join((title or "").split()),
        " ".join(listing.description.split()),
        "; ".join(pairs),
    ]
    text = ". ".join(p for p in parts if p)
    return text[:max_chars] if max_chars is not None else text


def prepare_listing(listing: ListingInput, preprocess: Callable[[bytes], torch.Tensor],
                    max_chars: int | None) -> PreparedListing:
    """The CPU side of every encoder: validate, build the text, decode the image (thread-safe).

    ``text`` is ``""`` for an image-only listing (see :func:`listing_text`)."""
    if not isinstance(listing.listing_id, str) or not listing.listing_id:
        raise InvalidListingError(f"listing id must be a non-empty string, got {listing.listing_id!r}")
    if listing.image is not None and not isinstance(listing.image, (bytes, bytearray, memoryview)):
        raise InvalidListingError(f"listing {listing.listing_id!r}: image must be bytes")
    text = listing_text(listing, max_chars)
    image = None
    if listing.image is not None:
        try:
            image = preprocess(bytes(listing.image))  # [3, S, S]
        except ImageError as exc:
            raise ImageError(f"listing {listing.listing_id!r}: {exc}") from exc
    return PreparedListing(listing.listing_id, text, image, listing.category)


class ConcatFusion(nn.Module):
    """Untrained block fusion: ``T = [t, 0]``, ``I = [0, i]``, ``IT = normalise([t, i])``.

    Inputs must be unit rows, all-zero where the listing has no image (image) or no text
    (text). With both, t and i weigh the same in IT; with one modality IT equals that view.
    """

    def forward(
        self, text: torch.Tensor, image: torch.Tensor, has_image: torch.Tensor,
        has_text: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # text: [n, Dt], image: [n, Di], has_image / has_text: [n] bool (has_text: all True)
        if has_text is None:
            has_text = torch.ones_like(has_image)
        zeros_t = torch.zeros_like(text)
        zeros_i = torch.zeros_like(image)
        image_view = torch.cat([zeros_t, image], dim=1)  # [n, Dt + Di]
        text_view = torch.cat([text, zeros_i], dim=1)  # [n, Dt + Di]
        # A missing modality's block is 0, so [t, i] is [t, 0] or [0, i] there; with both
        # blocks unit vectors, dividing by sqrt(2) is exact normalisation. Kept explicit for
        # clarity rather than relying on F.normalize's eps behaviour.
        both = has_image & has_text
        scale = torch.where(both, 1.0 / math.sqrt(2.0), 1.0).to(text.dtype).unsqueeze(1)
        image_text_view = torch.cat([text, image], dim=1) * scale  # [n, Dt + Di]
        return image_view, text_view, image_text_view


class ConcatEncoder(Encoder):
    """Pretrained text and image backbones with :class:`ConcatFusion` (``fusion: "concat"``)."""

    fusion_name: ClassVar[str] = "concat"

    def __init__(
        self,
        config: EncoderConfig,
        text_backbone: HFTextBackbone,
        image_backbone: ImageBackbone,
        device: str,
    ) -> None:
        if text_backbone.max_positions < config.max_text_tokens:
            raise ConfigError(
                f"max_text_tokens={config.max_text_tokens} exceeds the text model's "
                f"{text_backbone.max_positions} positions"
            )
        for label, expected, actual in (
            ("text_dim", config.text_dim, text_backbone.dim),
            ("image_dim", config.image_dim, image_backbone.dim),
        ):
            if expected is not None and expected != actual:
                raise ConfigError(
                    f"config {config.name!r} says {label}={expected}, backbone gives {actual}"
                )
        self.config = config
        self.version = config.version
        self.device = device
        self.text_dim = text_backbone.dim
        self.image_dim = image_backbone.dim
        self.dim = self.text_dim + self.image_dim
        self.text_backbone = text_backbone.to(device).eval()
        self.image_backbone = image_backbone.to(device).eval()
        self.fusion = ConcatFusion()
        self._preprocess = config.image_preprocessing()
        self._max_chars = config.max_text_tokens * _MAX_CHARS_PER_TOKEN
        # The fast tokenizer and the model are not safe under concurrent calls ("Already
        # borrowed"), and parallel forward passes on one device would not be faster anyway.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EncoderConfig, device: str) -> ConcatEncoder:
        text = build_text_backbone(config.text_backbone, config)
        image = build_image_backbone(config.image_backbone, config)
        return cls(config, text, image, device)

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(version={self.version!r}, dim={self.dim}, device={self.device!r})"

    def prepare(self, listing: ListingInput) -> PreparedListing:
        return prepare_listing(listing, self._preprocess, self._max_chars)

    def embed(self, batch: Sequence[PreparedListing]) -> Embeddings:
        n = len(batch)
        if n == 0:
            return Embeddings.empty(self.dim)
        size = self.config.image_size
        images = [(k, p.image) for k, p in enumerate(batch) if p.image is not None]
        for k, pixels in images:
            if tuple(pixels.shape) != (3, size, size):
                raise ValueError(
                    f"listing {batch[k].listing_id!r} was prepared for another encoder: image "
                    f"shape {tuple(pixels.shape)}, expected (3, {size}, {size})"
                )
        with self._lock, torch.inference_mode():
            text = self.text_backbone([p.text for p in batch], self.config.max_text_tokens)
            has_text = torch.tensor([bool(p.text) for p in batch], device=text.device)  # [n]
            # Image-only listings: the backbone read an empty string; their T row is zero.
            text = F.normalize(text.float(), dim=-1) * has_text.unsqueeze(1)  # [n, Dt]
            image = torch.zeros(n, self.image_dim, device=text.device)  # [n, Di]
            has_image = torch.zeros(n, dtype=torch.bool, device=text.device)  # [n]
            if images:
                pixels = torch.stack([pixels for _, pixels in images])  # [m, 3, S, S]
                pixels = pixels.to(self.device, non_blocking=True)
                rows = torch.tensor([k for k, _ in images], device=text.device)  # [m]
                image[rows] = F.normalize(self.image_backbone(pixels).float(), dim=-1)
                has_image[rows] = True
            views = self.fusion(text, image, has_image, has_text)
            image_view, text_view, image_text_view = (v.cpu().numpy() for v in views)
        return Embeddings(
            image=np.ascontiguousarray(image_view, dtype=np.float32),
            text=np.ascontiguousarray(text_view, dtype=np.float32),
            image_text=np.ascontiguousarray(image_text_view, dtype=np.float32),
            has_image=has_image.cpu().numpy(),
            has_text=has_text.cpu().numpy(),
        )


# Fusion name → builder of an encoder from (config, device). The trained single-stream model
# registers its own builder here.
EncoderBuilder = Callable[[EncoderConfig, str], Encoder]
ENCODER_BUILDERS: dict[str, EncoderBuilder] = {ConcatEncoder.fusion_name: ConcatEncoder.from_config}


def _resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return str(parsed)


def _random_weights_allowed(flag: bool) -> bool:
    env = os.environ.get(ALLOW_RANDOM_WEIGHTS_ENV, "").strip().lower()
    return flag or env in ("1", "true", "yes")


def _trained_model_loader(path: Path, device: str, allow_random_weights: bool) -> Encoder:
    """A trained model directory (``fusion: "unified"``, weights beside ``encoder.json``)."""
    from samestyle.models.unified import load_unified_model  # imports this module: load lazily

    return load_unified_model(path, device, allow_random_weights=allow_random_weights)


def create_encoder(
    config: EncoderConfig | str | Mapping[str, Any],
    device: str | None = None,
    *,
    allow_random_weights: bool = False,
) -> Encoder:
    """Build an encoder from a config, a config name / JSON path / model directory, or a dict.

    ``device`` defaults to CUDA when available. Models are in eval mode.

    Raises:
        ConfigError: a bad config, an unavailable device, or random backbones without
            ``allow_random_weights=True`` (or ``SAMESTYLE_ALLOW_RANDOM_WEIGHTS=1``).
        MissingWeightsError: pretrained weights are not installed; names the package.
    """
    if isinstance(config, EncoderConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
        if cfg.fusion == "unified" and Path(config).expanduser().is_dir():
            return _trained_model_loader(Path(config).expanduser(), _resolve_device(device),
                                         allow_random_weights)
    elif isinstance(config, Mapping):
        cfg = EncoderConfig.from_dict(config)
    else:
        raise ConfigError(f"cannot build an encoder from {type(config).__name__}")
    if cfg.uses_random_weights:
        if not _random_weights_allowed(allow_random_weights):
            raise ConfigError(
                f"encoder config {cfg.name!r} uses random weights (text={cfg.text_backbone!r}, "
                f"image={cfg.image_backbone!r}); pass allow_random_weights=True or set "
                f"{ALLOW_RANDOM_WEIGHTS_ENV}=1, in tests only"
            )
        logger.warning(
            "ENCODER %r HAS RANDOM WEIGHTS: its vectors mean nothing; use it for tests only",
            cfg.name,
        )
    builder = ENCODER_BUILDERS.get(cfg.fusion)
    if builder is None:
        raise ConfigError(f"unknown fusion {cfg.fusion!r}; known: {sorted(ENCODER_BUILDERS)}")
    resolved = _resolve_device(device)
    started = time.perf_counter()
    encoder = builder(cfg, resolved)
    logger.info(
        "encoder %s loaded (version %s, dim %d, device %s) in %.2fs",
        cfg.name,
        encoder.version,
        encoder.dim,
        resolved,
        time.perf_counter() - started,
    )
    return encoder


def encoder_from_spec(
    spec: str, device: str | None = None, *, allow_random_weights: bool = False
) -> Encoder:
    """Build an encoder from a command-line spec: ``default``, ``tiny``, a JSON config file, or
    a model directory (holding ``encoder.json``; otherwise ConfigError)."""
    return create_encoder(spec, device, allow_random_weights=allow_random_weights)
