"""The pretrained stand-in encoder: two unrelated pretrained backbones and an untrained block fusion.

    t = normalise(MiniLM(text))              # [384]
    i = normalise(EfficientNet-Lite0(image)) # [1280]
    T  = [t, 0]                              # [1664]; all-zero for an image-only listing
    I  = [0, i]                              # all-zero for a listing without an image
    IT = normalise([t, i])  with both,  [t, 0] text only,  [0, i] image only

T·IT and I·IT carry real similarity (each through its own block) and T·I is exactly 0: there is
no cross-modal signal without training (the trained model is :mod:`samestyle.models.unified`).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samestyle.models.backbones import HFTextBackbone, ImageBackbone, build_image_backbone, build_text_backbone
from samestyle.models.encoder import (
    MAX_CHARS_PER_TOKEN,
    Embeddings,
    Encoder,
    EncoderConfig,
    ListingInput,
    PreparedListing,
    prepare_listing,
)
from samestyle.models.runtime import Runtime
from samestyle.topics.errors import ConfigError

__all__ = ["ConcatEncoder", "ConcatFusion"]


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
    supports_runtimes: ClassVar[bool] = True

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
        self._max_chars = config.max_text_tokens * MAX_CHARS_PER_TOKEN
        # The fast tokenizer and the model are not safe under concurrent calls ("Already
        # borrowed"), and parallel forward passes on one device would not be faster anyway.
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EncoderConfig, device: str) -> ConcatEncoder:
        text = build_text_backbone(config.text_backbone, config)
        image = build_image_backbone(config.image_backbone, config)
        return cls(config, text, image, device)

    def use_runtime(self, runtime: Runtime) -> None:
        runtime.check_device(self.device)
        with self._lock:
            self.text_backbone.model = runtime.text_model(self.text_backbone.model)
            self.image_backbone = runtime.image_model(self.image_backbone, self.config.image_size)
            self.runtime = runtime

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
                pixels = self.runtime.pixels(pixels.to(self.device, non_blocking=True))
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
