"""Backbone token features, and a cache of them, so that training touches only the fusion.

The unified model reads *tokens*, not pooled vectors: the text backbone's last hidden states
(MiniLM: ``[L, 384]``) and the image backbone's feature map pooled to a small grid
(EfficientNet-Lite0: ``[1280, 7, 7]`` → ``[grid * grid, 1280]``). With frozen backbones these
never change during training, so they are computed once per listing and stored (float16) in a
cache file keyed by the listings file, the backbones and the token limits. Training the fusion
and the heads on 2 CPU cores then takes minutes instead of hours.

The same two functions (:func:`text_tokens`, :func:`image_tokens`) serve the encoder at
inference time, so cached training inputs and live serving inputs cannot drift apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from samestyle.models.backbones import EfficientNetLiteBackbone, HFTextBackbone, ImageBackbone, TinyConvBackbone
from samestyle.models.data import ListingRecord
from samestyle.models.encoder import EncoderConfig, ListingInput, listing_text
from samestyle.models.images import ImagePreprocessing, load_image_bytes
from samestyle.topics.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2

__all__ = [
    "FeatureCache",
    "LiveImageFeatures",
    "LiveTextFeatures",
    "build_feature_cache",
    "image_tokens",
    "listing_input",
    "load_pixels",
    "text_tokens",
]


def listing_input(record: ListingRecord, with_image: bool = True) -> ListingInput:
    """A data-set row as the encoder sees it: the text fields, every attribute (the encoders keep
    the provenance ones out of the embedded text) and the image bytes when there is an image and
    ``with_image``."""
    attributes = dict(record.attributes)
    image = None
    if with_image and record.image_path:
        image = load_image_bytes(record.image_path)
    return ListingInput(
        listing_id=record.listing_id,
        title=record.title,
        description=record.description,
        attributes=attributes,
        image=image,
        category=record.category,
    )


def text_tokens(
    backbone: HFTextBackbone, texts: Sequence[str], max_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contextual token states of the text backbone and the token ids:
    ``([B, L, Dt] float, [B, L] bool mask, [B, L] long ids)``.

    An empty text (an image-only listing) gets an all-False mask row: the tokenizer's special
    tokens alone are no text, and the fusion then gives that listing no T view.
    Gradients flow when called outside ``no_grad`` (fine-tuning the backbone).
    """
    device = next(backbone.model.parameters()).device
    batch = backbone.tokenizer(
        list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
    )
    batch = {k: v.to(device) for k, v in batch.items()}
    hidden = backbone.model(**batch).last_hidden_state  # [B, L, Dt]
    has_text = torch.tensor([bool(t) for t in texts], device=device)  # [B]
    mask = batch["attention_mask"].bool() & has_text.unsqueeze(1)  # [B, L]
    return hidden, mask, batch["input_ids"]


def image_tokens(backbone: ImageBackbone, pixels: torch.Tensor, grid: int) -> torch.Tensor:
    """The image backbone's feature map, average-pooled to ``grid x grid``: ``[B, grid², Di]``.

    Backbones without a known feature map give their pooled vector as one token.
    """
    if isinstance(backbone, EfficientNetLiteBackbone):
        fmap = backbone.net.extract_features(pixels)  # [B, Di, h, w]
    elif isinstance(backbone, TinyConvBackbone):
        fmap = backbone.net[:-2](pixels)  # [B, Di, h, w], before the global pool
    else:
        return backbone(pixels).unsqueeze(1)  # [B, 1, Di]
    fmap = F.adaptive_avg_pool2d(fmap, grid)  # [B, Di, grid, grid]
    return fmap.flatten(2).transpose(1, 2)  # [B, grid², Di]


def load_pixels(
    paths: Sequence[str | None], preprocess: ImagePreprocessing, ids: Sequence[str] | None = None
) -> tuple[list[torch.Tensor], list[int]]:
    """Read and preprocess the images of a batch: ``(pixels, rows)``, one ``[3, S, S]`` tensor
    per row of ``paths`` that has an image that could be read. An unreadable image is logged
    (naming ``ids[k]`` when given) and skipped, so its listing counts as text-only."""
    pixels, rows = [], []
    for k, path in enumerate(paths):
        if not path:
            continue
        try:
            pixels.append(preprocess(load_image_bytes(path)))
            rows.append(k)
        except ImageError as exc:
            logger.warning("listing %s: image skipped (%s)", ids[k] if ids is not None else path, exc)
    return pixels, rows


@dataclass
class FeatureCache:
    """Token features of every listing of one file, row ``k`` for ``ids[k]`` (float16 on CPU).

    Listings without an image have all-zero image rows and ``has_image`` False.
    """

    ids: list[str]
    texts: list[str]
    text: torch.Tensor  # [n, L, Dt] float16
    text_mask: torch.Tensor  # [n, L] bool
    token_ids: torch.Tensor  # [n, L] int32 (0 where padded)
    image: torch.Tensor  # [n, P, Di] float16 (P = 0 when no listing has an image)
    has_image: torch.Tensor  # [n] bool

    def __post_init__(self) -> None:
        self.index = {listing_id: k for k, listing_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def usable_ids(self) -> list[str]:
        """Listings with at least one view (text tokens or an image): an image-only listing
        whose image could not be read has none and cannot be trained on."""
        usable = self.text_mask.any(dim=1) | self.has_image  # [n]
        return [listing_id for listing_id, ok in zip(self.ids, usable.tolist(), strict=True) if ok]

    def rows(self, listing_ids: Sequence[str]) -> torch.Tensor:
        """Row numbers of listing ids; ConfigError names an id the cache does not hold."""
        try:
            return torch.tensor([self.index[i] for i in listing_ids], dtype=torch.long)
        except KeyError as exc:
            raise ConfigError(f"listing {exc.args[0]!r} is not in the listings file") from None

    def batch(
        self, rows: torch.Tensor, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(text [B, L, Dt], text_mask [B, L], image [B, P, Di], has_image [B], token_ids
        [B, L])`` on ``device`` (features float32), text trimmed to the batch's longest row."""
        mask = self.text_mask[rows]
        length = max(1, int(mask.sum(dim=1).max()))
        return (
            self.text[rows, :length].to(device).float(),
            mask[:, :length].to(device),
            self.image[rows].to(device).float(),
            self.has_image[rows].to(device),
            self.token_ids[rows, :length].to(device).long(),
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "format": CACHE_FORMAT,
                "ids": self.ids,
                "texts": self.texts,
                "text": self.text,
                "text_mask": self.text_mask,
                "token_ids": self.token_ids,
                "image": self.image,
                "has_image": self.has_image,
            },
            tmp,
        )
        tmp.replace(path)  # atomic: a killed run never leaves half a cache behind

    @classmethod
    def load(cls, path: Path) -> FeatureCache:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("format") != CACHE_FORMAT:
            raise ConfigError(f"{path}: feature cache format {data.get('format')} is not {CACHE_FORMAT}")
        return cls(
            data["ids"], data["texts"], data["text"], data["text_mask"], data["token_ids"], data["image"], data["has_image"]
        )


class LiveTextFeatures(FeatureCache):
    """A :class:`FeatureCache` whose text tokens come from the text backbone at every
    :meth:`batch` call (image tokens still from the cache): the inputs when the text backbone
    is fine-tuned. Gradients reach the backbone when called with grad enabled."""

    def __init__(self, cache: FeatureCache, backbone: HFTextBackbone, max_tokens: int) -> None:
        super().__init__(cache.ids, cache.texts, cache.text, cache.text_mask, cache.token_ids,
                         cache.image, cache.has_image)
        self.backbone = backbone
        self.max_tokens = max_tokens

    def batch(
        self, rows: torch.Tensor, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        image, has_image = self.image[rows].to(device).float(), self.has_image[rows].to(device)
        texts = [self.texts[r] for r in rows.tolist()]
        text, mask, token_ids = text_tokens(self.backbone, texts, self.max_tokens)
        return text.float(), mask, image, has_image, token_ids


class LiveImageFeatures(FeatureCache):
    """A :class:`FeatureCache` whose image tokens come from the image backbone at every
    :meth:`batch` call, computed from the batch's decoded images (text tokens from ``cache``,
    which may itself be a :class:`LiveTextFeatures`): the inputs when the image backbone is
    fine-tuned. Gradients reach the backbone when called with grad enabled.

    ``image_paths[k]`` is the image of ``cache.ids[k]``; only rows the cache marks as having a
    readable image are read again.
    """

    def __init__(
        self, cache: FeatureCache, backbone: ImageBackbone, image_paths: Sequence[str | None],
        preprocess: ImagePreprocessing, grid: int,
    ) -> None:
        if len(image_paths) != len(cache):
            raise ConfigError(f"{len(image_paths)} image paths for {len(cache)} cached listings")
        super().__init__(cache.ids, cache.texts, cache.text, cache.text_mask, cache.token_ids,
                         cache.image, cache.has_image)
        self.inner = cache
        self.backbone = backbone
        self.image_paths = list(image_paths)
        self.preprocess = preprocess
        self.grid = grid

    def batch(
        self, rows: torch.Tensor, device: str | torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        text, mask, cached, _, token_ids = self.inner.batch(rows, device)
        flags = self.has_image[rows].tolist()
        paths = [self.image_paths[r] if ok else None for r, ok in zip(rows.tolist(), flags, strict=True)]
        pixels, found = load_pixels(paths, self.preprocess, [self.ids[r] for r in rows.tolist()])
        has_image = torch.zeros(len(paths), dtype=torch.bool, device=device)
        if not pixels:
            return text, mask, torch.zeros_like(cached), has_image, token_ids
        tokens = image_tokens(self.backbone, torch.stack(pixels).to(device), self.grid).float()  # [m, P, Di]
        index = torch.tensor(found, device=device)
        image = tokens.new_zeros(len(paths), tokens.shape[1], tokens.shape[2]).index_put((index,), tokens)
        has_image[index] = True
        return text, mask, image, has_image, token_ids


def _cache_key(listings_path: Path, config: EncoderConfig, image_grid: int, with_images: bool) -> str:
    stat = listings_path.stat()
    parts = {
        "file": str(listings_path.resolve()),
        "size": stat.st_size,
        "mtime": stat.st_mtime_ns,
        "text": config.text_backbone,
        "image": config.image_backbone,
        "max_text_tokens": config.max_text_tokens,
        "image_size": config.image_size,
        "grid": image_grid,
        "with_images": with_images,
        "seed": config.seed if config.uses_random_weights else None,
        "format": CACHE_FORMAT,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@torch.inference_mode()
def build_feature_cache(
    records: Sequence[ListingRecord],
    text_backbone: HFTextBackbone,
    image_backbone: ImageBackbone,
    config: EncoderConfig,
    *,
    image_grid: int,
    device: str,
    listings_path: Path | None = None,
    cache_dir: Path | None = None,
    with_images: bool = True,
    batch_size: int = 64,
    progress: bool = True,
) -> FeatureCache:
    """Encode every listing's backbone tokens once, or load them from ``cache_dir``.

    A listing whose image cannot be read is kept as text-only (logged), as the stream would
    dead-letter only the image, not the product's text.
    """
    from tqdm import tqdm

    path = None
    if cache_dir is not None and listings_path is not None:
        key = _cache_key(listings_path, config, image_grid, with_images)
        path = cache_dir / f"features-{listings_path.parent.name}-{key}.pt"
        if path.is_file():
            logger.info("feature cache hit: %s", path)
            cache = FeatureCache.load(path)
            if cache.ids == [r.listing_id for r in records]:
                return cache
            logger.warning("feature cache %s does not match the listings; rebuilding", path)
    max_chars = config.max_text_tokens * 32
    preprocess: ImagePreprocessing = config.image_preprocessing()
    text_backbone = text_backbone.to(device).eval()
    image_backbone = image_backbone.to(device).eval()
    ids, texts = [], []
    text_chunks, mask_chunks, id_chunks, image_chunks, has_chunks = [], [], [], [], []
    any_image = with_images and any(r.image_path for r in records)
    bar = tqdm(total=len(records), desc="backbone features", unit="listing", disable=not progress)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.startswith("cuda") else contextlib.nullcontext()
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        inputs = [listing_input(r, with_image=False) for r in chunk]
        # Images are loaded below; an image-only row (no title) is valid when it has one.
        chunk_texts = [
            listing_text(x, max_chars, has_image=any_image and bool(r.image_path))
            for x, r in zip(inputs, chunk, strict=True)
        ]
        with autocast:
            hidden, mask, token_ids = text_tokens(text_backbone, chunk_texts, config.max_text_tokens)
        text_chunks.append(hidden.float().cpu().half())
        mask_chunks.append(mask.cpu())
        id_chunks.append(token_ids.cpu().int())
        has = torch.zeros(len(chunk), dtype=torch.bool)
        if any_image:
            pixels, rows = load_pixels([r.image_path for r in chunk], preprocess, [r.listing_id for r in chunk])
            tokens = None
            if pixels:
                with autocast:
                    out = image_tokens(image_backbone, torch.stack(pixels).to(device), image_grid)
                tokens = out.float().cpu().half()  # [m, P, Di]
            p = tokens.shape[1] if tokens is not None else image_grid * image_grid
            block = torch.zeros(len(chunk), p, image_backbone.dim, dtype=torch.float16)
            if tokens is not None:
                block[rows] = tokens
                has[rows] = True
            image_chunks.append(block)
        has_chunks.append(has)
        ids.extend(r.listing_id for r in chunk)
        texts.extend(chunk_texts)
        bar.update(len(chunk))
    bar.close()
    length = max(m.shape[1] for m in mask_chunks)
    text = torch.cat([F.pad(t, (0, 0, 0, length - t.shape[1])) for t in text_chunks])
    mask = torch.cat([F.pad(m, (0, length - m.shape[1])) for m in mask_chunks])
    token_ids = torch.cat([F.pad(t, (0, length - t.shape[1])) for t in id_chunks])
    if image_chunks:
        image = torch.cat(image_chunks)
    else:
        image = torch.zeros(len(ids), 0, image_backbone.dim, dtype=torch.float16)
    cache = FeatureCache(ids, texts, text, mask, token_ids, image, torch.cat(has_chunks))
    if path is not None:
        cache.save(path)
        logger.info("feature cache written: %s", path)
    return cache


