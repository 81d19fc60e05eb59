"""The fine-tuned model: both backbones trained end to end into one space, and its duplicate matcher.

``T = normalise(P_t(MiniLM(text)))``, ``I = normalise(P_i(EfficientNet(image)))`` and
``IT = normalise(T + I)`` (T alone without an image, I alone without a title): modality masking
gives all three views from one model. The text is :func:`samestyle.models.text.serialize`, at
training and serving time alike. A model directory holds ``encoder.json`` (``fusion:
"finetuned"``), ``towers.json``, ``text/`` (the fine-tuned text model and tokenizer),
``towers.pt`` (projections and, when trained, the image backbone), and optionally the matcher.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samestyle.models.backbones import BUNDLED_EFFICIENTNET_LITE0, TINY, build_image_backbone, build_text_backbone
from samestyle.models.encoder import (
    MODEL_DIR_CONFIG,
    DuplicateScorer,
    Embeddings,
    Encoder,
    EncoderConfig,
    ListingInput,
    PreparedListing,
    prepare_listing,
    random_weights_allowed,
)
from samestyle.models.matcher import Matcher, load_matcher
from samestyle.models.runtime import Runtime
from samestyle.models.text import match_text, serialize
from samestyle.topics.errors import ConfigError, MissingWeightsError

logger = logging.getLogger(__name__)

__all__ = ["DualTower", "FinetunedEncoder", "TowerConfig", "is_finetuned_dir", "load_finetuned", "save_finetuned",
           "serving_crop_pct"]

FUSION = "finetuned"
TOWERS_CONFIG = "towers.json"
TOWERS_WEIGHTS = "towers.pt"
TEXT_DIR = "text"


@dataclass(frozen=True)
class TowerConfig:
    """The architecture as data: backbones it starts from, the shared width, token and pixel sizes."""

    text_backbone: str = "bundled:all-MiniLM-L6-v2"
    image_backbone: str = BUNDLED_EFFICIENTNET_LITE0
    dim: int = 384
    max_text_tokens: int = 48
    image_size: int = 224
    #: Whether towers.pt holds image-backbone weights (it was trained) or the pretrained ones serve.
    image_trained: bool = False
    seed: int = 0
    # Tiny random backbones (tests): sizes, as EncoderConfig has them.
    tiny_text_hidden: int = 32
    tiny_text_layers: int = 2
    tiny_image_channels: int = 32

    @property
    def uses_random_weights(self) -> bool:
        return TINY in (self.text_backbone, self.image_backbone)


class DualTower(nn.Module):
    """Text and image towers projected into one ``dim``-wide space."""

    def __init__(self, config: TowerConfig, text_dir: Path | None = None) -> None:
        super().__init__()
        self.config = config
        text_spec = f"hf:{text_dir}" if text_dir is not None else config.text_backbone
        self.text = build_text_backbone(text_spec, config)  # .model, .tokenizer
        self.image = build_image_backbone(config.image_backbone, config)
        torch.manual_seed(config.seed)
        self.text_proj = nn.Linear(self.text.dim, config.dim)
        if self.text.dim == config.dim:  # start as the pretrained space: fine-tuning moves from there
            nn.init.eye_(self.text_proj.weight)
            nn.init.zeros_(self.text_proj.bias)
        self.image_proj = nn.Linear(self.image.dim, config.dim)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids per text, truncated, unpadded (batches are padded when they are built)."""
        return self.text.tokenizer(list(texts), truncation=True, max_length=self.config.max_text_tokens)["input_ids"]

    def embed_tokens(self, ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """``[B, dim]`` unit T vectors of tokenised texts (mean pooling over real tokens)."""
        device = self.text_proj.weight.device
        width = max(len(s) for s in ids)
        batch = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        mask = torch.zeros((len(ids), width), dtype=torch.long, device=device)
        for row, seq in enumerate(ids):
            batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        # float32 from here on whatever dtype the backbone computes in (models.runtime).
        hidden = self.text.model(input_ids=batch, attention_mask=mask).last_hidden_state.float()  # [B, L, h]
        m = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)  # [B, h]
        return F.normalize(self.text_proj(pooled), dim=-1)

    def embed_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, dim]`` unit I vectors of ``[B, 3, S, S]`` preprocessed images."""
        return F.normalize(self.image_proj(self.image(pixels).float()), dim=-1)

    @staticmethod
    def fuse(image: torch.Tensor, text: torch.Tensor, has_image: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        """IT from unit I and T rows: their normalised sum, or whichever is present."""
        z = image * has_image.to(image.dtype).unsqueeze(1) + text * has_text.to(text.dtype).unsqueeze(1)
        return F.normalize(z, dim=-1)


def serving_crop_pct(config: TowerConfig) -> float:
    """The centre crop the served model takes of an image before resizing it."""
    return 1.0 if config.image_backbone == TINY else 0.875


def _encoder_config(config: TowerConfig, version: str, name: str) -> EncoderConfig:
    return EncoderConfig(name=name, text_backbone=TEXT_DIR, image_backbone=config.image_backbone, fusion=FUSION,
                         version=version, max_text_tokens=config.max_text_tokens, image_size=config.image_size,
                         image_crop_pct=serving_crop_pct(config), seed=config.seed,
                         tiny_text_hidden=config.tiny_text_hidden, tiny_text_layers=config.tiny_text_layers,
                         tiny_image_channels=config.tiny_image_channels)


class FinetunedEncoder(Encoder):
    """Serves a :class:`DualTower` (and its matcher) through the :class:`Encoder` contract."""

    supports_runtimes: ClassVar[bool] = True

    def __init__(self, towers: DualTower, config: EncoderConfig, device: str,
                 matcher: Matcher | None = None) -> None:
        self.towers = towers.to(device).eval()
        self.config = config
        self.version = config.version
        self.dim = towers.config.dim
        self.device = device
        self._matcher = matcher
        self._preprocess = config.image_preprocessing()
        self._lock = threading.Lock()  # one forward pass at a time (the worker has one model thread anyway)

    def __repr__(self) -> str:
        return f"FinetunedEncoder(version={self.version!r}, dim={self.dim}, device={self.device!r})"

    def use_runtime(self, runtime: Runtime) -> None:
        runtime.check_device(self.device)
        with self._lock:
            self.towers.text.model = runtime.text_model(self.towers.text.model)
            self.towers.image = runtime.image_model(self.towers.image, self.config.image_size)
            self.runtime = runtime

    def match_text(self, listing: ListingInput) -> str:
        words = self._matcher.description_words if self._matcher is not None else 0
        return match_text(listing.title, listing.attributes, listing.description, words)

    @staticmethod
    def _text(listing: ListingInput) -> str:
        return serialize(listing.title, listing.attributes)

    @property
    def duplicate_scorer(self) -> DuplicateScorer | None:
        return self._matcher

    def prepare(self, listing: ListingInput) -> PreparedListing:
        # Without a title the T view is empty (a photo query): brand and price alone are no text.
        return prepare_listing(listing, self._preprocess, None, text_of=self._text)

    def embed(self, batch: Sequence[PreparedListing]) -> Embeddings:
        if not batch:
            return Embeddings.empty(self.dim)
        n = len(batch)
        has_text = torch.tensor([bool(p.text) for p in batch])
        has_image = torch.tensor([p.image is not None for p in batch])
        with self._lock, torch.inference_mode():
            text = torch.zeros(n, self.dim, device=self.device)
            if has_text.any():
                rows = [k for k in range(n) if batch[k].text]
                text[rows] = self.towers.embed_tokens(self.towers.tokenize([batch[k].text for k in rows]))
            image = torch.zeros(n, self.dim, device=self.device)
            if has_image.any():
                rows = [k for k in range(n) if batch[k].image is not None]
                pixels = torch.stack([batch[k].image for k in rows]).to(self.device)  # [b, 3, S, S]
                pixels = self.runtime.pixels(pixels)
                image[rows] = self.towers.embed_pixels(pixels)
            fused = DualTower.fuse(image, text, has_image.to(self.device), has_text.to(self.device))
        return Embeddings(image=np.ascontiguousarray(image.cpu().numpy(), dtype=np.float32),
                          text=np.ascontiguousarray(text.cpu().numpy(), dtype=np.float32),
                          image_text=np.ascontiguousarray(fused.cpu().numpy(), dtype=np.float32),
                          has_image=has_image.numpy(), has_text=has_text.numpy())


def is_finetuned_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / TOWERS_CONFIG).is_file() and (path / MODEL_DIR_CONFIG).is_file()


def save_finetuned(directory: Path, towers: DualTower, *, version: str, name: str,
                   matcher: Matcher | None = None, manifest: dict[str, Any] | None = None) -> Path:
    """Write a complete model directory (``directory`` must not exist yet or be empty)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = towers.config
    (directory / MODEL_DIR_CONFIG).write_text(json.dumps(_encoder_config(config, version, name).to_dict(), indent=2) + "\n")
    (directory / TOWERS_CONFIG).write_text(json.dumps(asdict(config), indent=2) + "\n")
    towers.text.model.save_pretrained(directory / TEXT_DIR)
    towers.text.tokenizer.save_pretrained(directory / TEXT_DIR)
    state = {"text_proj": towers.text_proj.state_dict(), "image_proj": towers.image_proj.state_dict()}
    if config.image_trained:
        state["image"] = towers.image.state_dict()
    torch.save(state, directory / TOWERS_WEIGHTS)
    if matcher is not None:
        matcher.save(directory)
    if manifest is not None:
        (directory / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return directory


def load_finetuned(path: Path, device: str, *, allow_random_weights: bool = False) -> FinetunedEncoder:
    """Load a model directory written by :func:`save_finetuned`."""
    if not is_finetuned_dir(path):
        raise ConfigError(f"{path} is not a fine-tuned model directory ({MODEL_DIR_CONFIG} + {TOWERS_CONFIG})")
    config = TowerConfig(**json.loads((path / TOWERS_CONFIG).read_text()))
    if config.uses_random_weights and not random_weights_allowed(allow_random_weights):
        raise ConfigError(f"{path} was trained from random (tiny) backbones: tests only "
                          "(allow_random_weights=True or SAMESTYLE_ALLOW_RANDOM_WEIGHTS=1)")
    if not (path / TEXT_DIR).is_dir() or not (path / TOWERS_WEIGHTS).is_file():
        raise MissingWeightsError(f"{path}: {TEXT_DIR}/ or {TOWERS_WEIGHTS} is missing")
    towers = DualTower(config, text_dir=path / TEXT_DIR)
    state = torch.load(path / TOWERS_WEIGHTS, map_location="cpu", weights_only=True)
    towers.text_proj.load_state_dict(state["text_proj"])
    towers.image_proj.load_state_dict(state["image_proj"])
    if "image" in state:
        towers.image.load_state_dict(state["image"])
    encoder_config = EncoderConfig.from_json(path / MODEL_DIR_CONFIG)
    return FinetunedEncoder(towers, encoder_config, device, matcher=load_matcher(path))
