"""The unified single-stream model: one transformer reads text and image tokens together.

Masking a modality out of the sequence gives the IT, T and I views from the same weights; a listing
missing a modality gets its IT from the other one and an all-zero row for the missing view, as
:class:`~samestyle.models.encoder.Embeddings` requires. :class:`CrossScorer` is the optional pairwise
re-ranker for the duplicate decision. A trained model is a directory: ``encoder.json``,
``unified.json``, ``weights.pt``, ``manifest.json`` and ``metrics.json``.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from samestyle.models.backbones import HFTextBackbone, ImageBackbone, build_image_backbone, build_text_backbone
from samestyle.models.encoder import (
    ALLOW_RANDOM_WEIGHTS_ENV,
    MODEL_DIR_CONFIG,
    Embeddings,
    Encoder,
    EncoderConfig,
    ListingInput,
    PreparedListing,
    prepare_listing,
)
from samestyle.models.features import image_tokens, text_tokens
from samestyle.topics.errors import ConfigError, MissingWeightsError

logger = logging.getLogger(__name__)

FUSION_NAME = "unified"
UNIFIED_CONFIG = "unified.json"
WEIGHTS_FILE = "weights.pt"
MANIFEST_FILE = "manifest.json"
METRICS_FILE = "metrics.json"
N_LEXICAL = 10
IDF_FILE = "idf.json"
FUSION_MODES = ("single_stream", "concat")

__all__ = [
    "FUSION_NAME",
    "CrossScorer",
    "UnifiedConfig",
    "UnifiedEncoder",
    "UnifiedFusion",
    "document_frequencies",
    "is_unified_model_dir",
    "lexical_features",
    "load_unified_model",
    "save_unified_model",
]


@dataclass(frozen=True)
class UnifiedConfig:
    """Architecture of the fusion and the cross-scorer (the backbones are in EncoderConfig)."""

    dim: int = 256  # width of every view's embedding
    hidden: int = 256  # transformer width
    layers: int = 2
    heads: int = 4
    ffn: int = 512
    dropout: float = 0.1
    image_grid: int = 4  # image feature map pooled to grid x grid tokens
    skip: bool = True  # the mean-input skip path (ablation switch)
    scorer_layers: int = 2  # 0: no cross-scorer
    scorer_lexical: bool = True  # feed lexical overlap features to the scorer head
    scorer_tokens: bool = True  # the cross-attention branch over both listings' fused tokens
    # A learned embedding of each text token's id, added to its contextual state: frozen
    # contextual states blur exact strings (model codes), and mean-pooled random id vectors
    # start out as a bag-of-wordpieces similarity. 0 disables it (ablation).
    token_vocab: int = 0
    token_id_std: float = 0.5
    # "single_stream": one transformer reads both modalities' tokens (the paper's model).
    # "concat" (ablation): no cross-modal attention; each modality's tokens are mean-pooled and
    # passed through its own MLP tower, the towers of the present modalities are summed, and the
    # same head and skip path give the embedding.
    fusion: str = "single_stream"

    def __post_init__(self) -> None:
        for name in ("dim", "hidden", "layers", "heads", "ffn", "image_grid"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"unified config: {name} must be a positive int, got {value!r}")
        if self.hidden % self.heads:
            raise ConfigError("unified config: hidden must be a multiple of heads")
        if self.scorer_layers < 0 or not 0.0 <= self.dropout < 1.0:
            raise ConfigError("unified config: scorer_layers >= 0 and 0 <= dropout < 1")
        if not (self.scorer_tokens or self.scorer_lexical):
            raise ConfigError("unified config: the scorer needs tokens or lexical features")
        if self.fusion not in FUSION_MODES:
            raise ConfigError(f"unified config: fusion must be one of {FUSION_MODES}, got {self.fusion!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnifiedConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown unified config keys {unknown}; known: {sorted(known)}")
        return cls(**data)


def _transformer(width: int, layers: int, heads: int, ffn: int, dropout: float) -> nn.Module:
    layer = nn.TransformerEncoderLayer(
        width, heads, ffn, dropout, activation="gelu", batch_first=True, norm_first=True
    )
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _drop_tokens(mask: torch.Tensor, rate: float) -> torch.Tensor:
    """Randomly hide a fraction of the valid tokens, keeping at least one per row that has one."""
    if rate <= 0.0:
        return mask
    keep = (torch.rand(mask.shape, device=mask.device) >= rate) & mask
    empty = ~keep.any(dim=1) & mask.any(dim=1)
    if empty.any():
        first = mask.float().argmax(dim=1)  # first valid token of each row
        keep[empty, first[empty]] = True
    return keep


class UnifiedFusion(nn.Module):
    """Single-stream fusion over backbone tokens; :meth:`forward` gives one view's embeddings."""

    def __init__(self, config: UnifiedConfig, text_dim: int, image_dim: int) -> None:
        super().__init__()
        h = config.hidden
        self.config = config
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, h))
        self.token_embedding = None
        if config.token_vocab > 0:
            self.token_embedding = nn.Embedding(config.token_vocab, h)
            nn.init.normal_(self.token_embedding.weight, std=config.token_id_std)
        self.image_in = nn.Sequential(nn.LayerNorm(image_dim), nn.Linear(image_dim, h))
        self.type_embedding = nn.Embedding(3, h)  # 0: CLS, 1: text, 2: image
        self.image_position = nn.Parameter(torch.zeros(config.image_grid**2, h))
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        nn.init.normal_(self.image_position, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        self.encoder: nn.Module | None = None
        self.towers: nn.ModuleDict | None = None
        if config.fusion == "single_stream":
            self.encoder = _transformer(h, config.layers, config.heads, config.ffn, config.dropout)
        else:
            self.towers = nn.ModuleDict({
                m: nn.Sequential(nn.LayerNorm(h), nn.Linear(h, config.ffn), nn.GELU(),
                                 nn.Dropout(config.dropout), nn.Linear(config.ffn, h))
                for m in ("text", "image")
            })
        self.norm = nn.LayerNorm(h)
        self.head = nn.Linear(2 * h, config.dim)
        self.skip = nn.Linear(h, config.dim) if config.skip else None

    def forward(
        self,
        view: str,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        image: torch.Tensor,
        has_image: torch.Tensor,
        token_ids: torch.Tensor | None = None,
        token_drop: float = 0.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Embed one view.

        Args:
            view: ``"I"``, ``"T"`` or ``"IT"``.
            text: ``[B, L, Dt]`` token states; text_mask: ``[B, L]`` bool (True = a token).
            image: ``[B, P, Di]`` (P may be 0 when no listing has an image); has_image: ``[B]``.
            token_ids: ``[B, L]`` text token ids (needed when ``token_vocab > 0``).
            token_drop: fraction of tokens hidden at random (the "transformed view").

        Returns:
            ``(embedding [B, dim] unit rows, zero where the view has no token,
            tokens [B, S, hidden], key mask [B, S] bool)``; token 0 is CLS.
        """
        if view not in ("I", "T", "IT"):
            raise ValueError(f"unknown view {view!r}")
        batch = text.shape[0]
        device = text.device
        parts = [self.cls.expand(batch, -1, -1) + self.type_embedding.weight[0]]
        masks = [torch.ones(batch, 1, dtype=torch.bool, device=device)]
        segments: list[str] = []  # the modality of each part after CLS
        if "T" in view:
            tokens = self.text_in(text) + self.type_embedding.weight[1]  # [B, L, h]
            if self.token_embedding is not None:
                if token_ids is None:
                    raise ValueError("this fusion needs token_ids")
                tokens = tokens + self.token_embedding(token_ids.clamp(0, self.config.token_vocab - 1))
            parts.append(tokens)
            masks.append(_drop_tokens(text_mask, token_drop))
            segments.append("text")
        if "I" in view and image.shape[1] > 0:
            p = image.shape[1]
            pixels = self.image_in(image) + self.image_position[:p] + self.type_embedding.weight[2]
            parts.append(pixels)  # [B, P, h]
            image_mask = has_image.unsqueeze(1).expand(-1, p)
            masks.append(_drop_tokens(image_mask, token_drop))
            segments.append("image")
        x = torch.cat(parts, dim=1)  # [B, S, h]
        mask = torch.cat(masks, dim=1)  # [B, S]
        content = mask[:, 1:].float().unsqueeze(-1)  # [B, S-1, 1]
        count = content.sum(dim=1)  # [B, 1]
        mean_in = (x[:, 1:] * content).sum(dim=1) / count.clamp(min=1.0)  # [B, h]
        if self.towers is not None:
            out, first = self._towers(x, masks[1:], segments)
            pooled = mean_in
        else:
            out = self.norm(self.encoder(x, src_key_padding_mask=~mask))  # type: ignore[misc]  # [B, S, h]
            first = out[:, 0]  # CLS
            pooled = (out[:, 1:] * content).sum(dim=1) / count.clamp(min=1.0)  # [B, h]
        z = self.head(torch.cat([first, pooled], dim=-1))  # [B, dim]
        if self.skip is not None:
            z = z + self.skip(mean_in)
        z = F.normalize(z, dim=-1) * (count > 0).to(z.dtype)  # zero rows: nothing to see
        return z, out, mask

    def _towers(
        self, x: torch.Tensor, masks: list[torch.Tensor], segments: list[str]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``concat`` ablation: each modality's visible tokens mean-pooled and passed through
        its own tower, the towers of the present modalities summed (no cross-modal attention).
        Returns ``(tokens [B, S, h] with the tower sum in place of CLS, tower sum [B, h])``."""
        assert self.towers is not None
        fused = x.new_zeros(x.shape[0], x.shape[2])  # [B, h]
        start = 1
        for mask, name in zip(masks, segments, strict=True):
            width = mask.shape[1]
            weight = mask.to(x.dtype).unsqueeze(-1)  # [B, w, 1]
            n = weight.sum(dim=1)  # [B, 1]
            pooled = (x[:, start : start + width] * weight).sum(dim=1) / n.clamp(min=1.0)  # [B, h]
            fused = fused + self.towers[name](pooled) * (n > 0).to(x.dtype)
            start += width
        out = torch.cat([fused.unsqueeze(1), x[:, 1:]], dim=1)  # [B, S, h]
        return out, fused


class CrossScorer(nn.Module):
    """Match logit of a listing pair from both listings' fused tokens (re-ranking stage)."""

    def __init__(self, config: UnifiedConfig) -> None:
        super().__init__()
        h = config.hidden
        self.lexical = config.scorer_lexical
        self.tokens = config.scorer_tokens
        self.segment = nn.Embedding(2, h)
        self.cls = nn.Parameter(torch.zeros(1, 1, h))
        nn.init.normal_(self.cls, std=0.02)
        self.encoder = _transformer(h, config.scorer_layers, config.heads, config.ffn, config.dropout)
        self.norm = nn.LayerNorm(h)
        self.out = nn.Sequential(nn.Linear(h + 1, h), nn.GELU(), nn.Linear(h, 1))
        # Its own small branch, added to the logit: a few overlap numbers fed beside a
        # 256-wide CLS vector would be drowned out and learned far too slowly.
        self.lexical_head = (
            nn.Sequential(nn.Linear(N_LEXICAL + 1, 32), nn.GELU(), nn.Linear(32, 1)) if self.lexical else None
        )

    def forward(
        self,
        tokens_a: torch.Tensor,
        mask_a: torch.Tensor,
        tokens_b: torch.Tensor,
        mask_b: torch.Tensor,
        cosine: torch.Tensor,
        lexical: torch.Tensor | None,
    ) -> torch.Tensor:
        """tokens: ``[B, S, h]`` fused IT tokens, masks ``[B, S]``; cosine ``[B]``; lexical
        ``[B, N_LEXICAL]``. Returns logits ``[B]``."""
        batch = tokens_a.shape[0]
        if not self.tokens:  # ablation: the lexical branch and the cosine alone
            if lexical is None:
                raise ValueError("this scorer needs lexical features")
            return self.lexical_head(torch.cat([lexical, cosine.unsqueeze(1)], dim=1)).squeeze(1)  # type: ignore[misc]
        x = torch.cat(
            [self.cls.expand(batch, -1, -1), tokens_a + self.segment.weight[0], tokens_b + self.segment.weight[1]],
            dim=1,
        )  # [B, 1 + Sa + Sb, h]
        ones = torch.ones(batch, 1, dtype=torch.bool, device=x.device)
        mask = torch.cat([ones, mask_a, mask_b], dim=1)
        cls = self.norm(self.encoder(x, src_key_padding_mask=~mask))[:, 0]  # [B, h]
        logit = self.out(torch.cat([cls, cosine.unsqueeze(1)], dim=1)).squeeze(1)
        if self.lexical_head is not None:
            if lexical is None:
                raise ValueError("this scorer needs lexical features")
            logit = logit + self.lexical_head(torch.cat([lexical, cosine.unsqueeze(1)], dim=1)).squeeze(1)
        return logit


# -------------------------------------------------------------------------- lexical features

_WORD = re.compile(r"[a-z0-9]+(?:[-./][a-z0-9]+)*")


def _words(text: str) -> set[str]:
    return set(_WORD.findall(text.lower()))


def _codes(words: set[str]) -> set[str]:
    """Model-number-like tokens (letters and digits mixed, or long numbers), punctuation
    removed, so "KDL-40V4100" and "kdl40v4100" agree."""
    out = set()
    for w in words:
        flat = re.sub(r"[-./]", "", w)
        if len(flat) >= 4 and any(c.isdigit() for c in flat) and (any(c.isalpha() for c in flat) or len(flat) >= 5):
            out.add(flat)
    return out


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def document_frequencies(texts: Sequence[str]) -> dict[str, float]:
    """Smoothed idf, ``log((1 + N) / (1 + df)) + 1``, of every word of ``texts`` (the training
    listings), for the idf-weighted lexical features."""
    df: dict[str, int] = {}
    for text in texts:
        for w in _words(text):
            df[w] = df.get(w, 0) + 1
    n = len(texts)
    return {w: math.log((1 + n) / (1 + c)) + 1.0 for w, c in df.items()}


def lexical_features(
    text_a: str, text_b: str, idf: Mapping[str, float] | None = None, title_chars: int = 200
) -> list[float]:
    """``N_LEXICAL`` overlap features of two listing texts: word Jaccard (all, first
    ``title_chars`` characters), model-code Jaccard, any shared code, one side's codes all in
    the other's text, character-trigram Jaccard of the leading text; then, idf-weighted (a
    word the idf table has never seen counts as the rarest): weighted Jaccard, TF-IDF cosine of
    the leading text, shared-number Jaccard and the largest idf shared (over 10)."""
    idf = idf or {}
    unseen = max(idf.values(), default=1.0)
    wa, wb = _words(text_a), _words(text_b)
    ta, tb = _words(text_a[:title_chars]), _words(text_b[:title_chars])
    ca, cb = _codes(wa), _codes(wb)
    flat_a = re.sub(r"[^a-z0-9]", "", text_a.lower())
    flat_b = re.sub(r"[^a-z0-9]", "", text_b.lower())
    contained = 0.0
    if ca and all(c in flat_b for c in _codes(ta)) and _codes(ta):
        contained = 1.0
    if cb and all(c in flat_a for c in _codes(tb)) and _codes(tb):
        contained = 1.0
    ga = {text_a[:title_chars].lower()[i : i + 3] for i in range(max(0, min(len(text_a), title_chars) - 2))}
    gb = {text_b[:title_chars].lower()[i : i + 3] for i in range(max(0, min(len(text_b), title_chars) - 2))}

    def weight(w: str) -> float:
        return idf.get(w, unseen)

    shared = wa & wb
    union = sum(weight(w) for w in wa | wb)
    title_norm = math.sqrt(sum(weight(w) ** 2 for w in ta) * sum(weight(w) ** 2 for w in tb))
    na = {w for w in wa if w.isdigit()}
    nb = {w for w in wb if w.isdigit()}
    return [
        _jaccard(wa, wb),
        _jaccard(ta, tb),
        _jaccard(ca, cb),
        float(bool(ca & cb)),
        contained,
        _jaccard(ga, gb),
        sum(weight(w) for w in shared) / union if union else 0.0,
        sum(weight(w) ** 2 for w in ta & tb) / title_norm if title_norm else 0.0,
        _jaccard(na, nb),
        max((weight(w) for w in shared), default=0.0) / 10.0,
    ]


# ---------------------------------------------------------------------------------- encoder


class UnifiedEncoder(Encoder):
    """The trained unified model behind the :class:`~models.encoder.Encoder` interface."""

    fusion_name = FUSION_NAME

    def __init__(
        self,
        config: EncoderConfig,
        unified: UnifiedConfig,
        text_backbone: HFTextBackbone,
        image_backbone: ImageBackbone,
        fusion: UnifiedFusion,
        scorer: CrossScorer | None,
        device: str,
        idf: Mapping[str, float] | None = None,
    ) -> None:
        self.idf = dict(idf or {})
        self.config = config
        self.unified = unified
        self.version = config.version
        self.device = device
        self.dim = unified.dim
        self.text_backbone = text_backbone.to(device).eval()
        self.image_backbone = image_backbone.to(device).eval()
        self.fusion = fusion.to(device).eval()
        self.scorer = scorer.to(device).eval() if scorer is not None else None
        self._preprocess = config.image_preprocessing()
        self._max_chars = config.max_text_tokens * 32
        self._lock = threading.Lock()  # tokenizer and model are not safe under concurrent calls

    def __repr__(self) -> str:
        return f"UnifiedEncoder(version={self.version!r}, dim={self.dim}, device={self.device!r})"

    def prepare(self, listing: ListingInput) -> PreparedListing:
        return prepare_listing(listing, self._preprocess, self._max_chars)

    def _tokens(
        self, batch: Sequence[PreparedListing]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(batch)
        size = self.config.image_size
        autocast = torch.autocast("cuda", dtype=torch.float16, enabled=self.device.startswith("cuda"))
        with autocast:
            text, mask, token_ids = text_tokens(self.text_backbone, [p.text for p in batch], self.config.max_text_tokens)
        grid = self.unified.image_grid
        image = torch.zeros(n, 0, self.image_backbone.dim, device=text.device)
        has_image = torch.zeros(n, dtype=torch.bool, device=text.device)
        rows = [k for k, p in enumerate(batch) if p.image is not None]
        if rows:
            for k in rows:
                if tuple(batch[k].image.shape) != (3, size, size):  # type: ignore[union-attr]
                    raise ValueError(
                        f"listing {batch[k].listing_id!r} was prepared for another encoder"
                    )
            pixels = torch.stack([batch[k].image for k in rows]).to(self.device)  # type: ignore[misc]
            with autocast:
                tokens = image_tokens(self.image_backbone, pixels, grid).float()  # [m, P, Di]
            image = torch.zeros(n, tokens.shape[1], tokens.shape[2], device=text.device)
            index = torch.tensor(rows, device=text.device)
            image[index] = tokens
            has_image[index] = True
        return text.float(), mask, image, has_image, token_ids

    def embed(self, batch: Sequence[PreparedListing]) -> Embeddings:
        if len(batch) == 0:
            return Embeddings.empty(self.dim)
        with self._lock, torch.inference_mode():
            inputs = self._tokens(batch)
            views = {v: self.fusion(v, *inputs)[0] for v in ("I", "T", "IT")}
            arrays = {v: np.ascontiguousarray(z.float().cpu().numpy(), dtype=np.float32) for v, z in views.items()}
        return Embeddings(
            image=arrays["I"], text=arrays["T"], image_text=arrays["IT"], has_image=inputs[3].cpu().numpy(),
            has_text=inputs[1].any(dim=1).cpu().numpy(),
        )

    def fuse(self, batch: Sequence[PreparedListing]) -> tuple[np.ndarray, list[torch.Tensor]]:
        """IT embeddings ``[n, dim]`` and each listing's fused IT tokens (``[S_k, hidden]``,
        CPU) for the cross-scorer; compute once per listing, then score many pairs."""
        if not batch:
            return np.zeros((0, self.dim), np.float32), []
        with self._lock, torch.inference_mode():
            z, tokens, mask = self.fusion("IT", *self._tokens(batch))
            z_np = z.float().cpu().numpy()
            kept = [tokens[k][mask[k]].float().cpu() for k in range(len(batch))]
        return z_np, kept

    def score_fused(
        self,
        left: tuple[np.ndarray, Sequence[torch.Tensor], Sequence[str]],
        right: tuple[np.ndarray, Sequence[torch.Tensor], Sequence[str]],
    ) -> np.ndarray:
        """Match probabilities of pairs given as ``(embeddings, tokens, texts)`` per side, row
        ``k`` of each side forming pair ``k`` (from :meth:`fuse` and the prepared texts)."""
        if self.scorer is None:
            raise ConfigError(f"model {self.version} has no cross-scorer (scorer_layers=0)")
        (za, ta, xa), (zb, tb, xb) = left, right
        n = len(za)
        if n == 0:
            return np.zeros(0, dtype=np.float32)

        def pad(tokens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            length = max(t.shape[0] for t in tokens)
            out = torch.zeros(len(tokens), length, tokens[0].shape[1])
            mask = torch.zeros(len(tokens), length, dtype=torch.bool)
            for k, t in enumerate(tokens):
                out[k, : t.shape[0]] = t
                mask[k, : t.shape[0]] = True
            return out.to(self.device), mask.to(self.device)

        with self._lock, torch.inference_mode():
            a, ma = pad(ta)
            b, mb = pad(tb)
            cosine = torch.from_numpy(np.sum(za * zb, axis=1)).float().to(self.device)
            lexical = torch.tensor(
                [lexical_features(s, t, self.idf) for s, t in zip(xa, xb, strict=True)],
                dtype=torch.float32, device=self.device,
            )
            logits = self.scorer(a, ma, b, mb, cosine, lexical)
        return torch.sigmoid(logits).float().cpu().numpy()

    def score_pairs(
        self, left: Sequence[PreparedListing], right: Sequence[PreparedListing]
    ) -> np.ndarray:
        """Match probability of each pair ``(left[k], right[k])`` from the cross-scorer."""
        if len(left) != len(right):
            raise ValueError("left and right must have the same length")
        za, ta = self.fuse(left)
        zb, tb = self.fuse(right)
        return self.score_fused((za, ta, [p.text for p in left]), (zb, tb, [p.text for p in right]))


# ------------------------------------------------------------------------------ model dirs


def is_unified_model_dir(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding a trained unified model."""
    path = Path(path)
    return (path / MODEL_DIR_CONFIG).is_file() and (path / UNIFIED_CONFIG).is_file()


def save_unified_model(
    out_dir: Path,
    config: EncoderConfig,
    unified: UnifiedConfig,
    fusion: UnifiedFusion,
    scorer: CrossScorer | None,
    manifest: Mapping[str, Any],
    metrics: Mapping[str, Any],
    backbones: Mapping[str, nn.Module] | None = None,
    idf: Mapping[str, float] | None = None,
) -> None:
    """Write a model directory (see the module docstring). ``backbones`` holds fine-tuned
    backbones to save too (``{"text": ..., "image": ...}``); frozen ones are rebuilt from specs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"fusion": fusion.state_dict()}
    if scorer is not None:
        state["scorer"] = scorer.state_dict()
    for name, module in (backbones or {}).items():
        state[f"{name}_backbone"] = module.state_dict()
    torch.save(state, out_dir / WEIGHTS_FILE)
    if idf is not None:
        (out_dir / IDF_FILE).write_text(json.dumps(idf, sort_keys=True) + "\n")
    (out_dir / MODEL_DIR_CONFIG).write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    (out_dir / UNIFIED_CONFIG).write_text(json.dumps(unified.to_dict(), indent=2) + "\n")
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str) + "\n")


def load_unified_model(
    path: str | Path, device: str = "cpu", *, allow_random_weights: bool = False
) -> UnifiedEncoder:
    """Load a trained model directory. Backbones come from their specs (or from the saved
    fine-tuned weights); random test backbones need ``allow_random_weights``.

    Raises:
        ConfigError: not a unified model directory, or random backbones without permission.
        MissingWeightsError: ``weights.pt`` or the backbones' pretrained weights are missing.
    """
    import os

    path = Path(path)
    if not is_unified_model_dir(path):
        raise ConfigError(f"{path} is not a unified model directory ({MODEL_DIR_CONFIG} + {UNIFIED_CONFIG})")
    config = EncoderConfig.from_json(path / MODEL_DIR_CONFIG)
    if config.fusion != FUSION_NAME:
        raise ConfigError(f"{path}: fusion is {config.fusion!r}, expected {FUSION_NAME!r}")
    unified = UnifiedConfig.from_dict(json.loads((path / UNIFIED_CONFIG).read_text()))
    env = os.environ.get(ALLOW_RANDOM_WEIGHTS_ENV, "").strip().lower() in ("1", "true", "yes")
    if config.uses_random_weights and not (allow_random_weights or env):
        raise ConfigError(
            f"model {path} uses random backbones; pass allow_random_weights=True (tests only)"
        )
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise MissingWeightsError(f"{weights} is missing: the model directory is incomplete")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    text = build_text_backbone(config.text_backbone, config)
    image = build_image_backbone(config.image_backbone, config)
    if "text_backbone" in state:
        text.load_state_dict(state["text_backbone"])
    if "image_backbone" in state:
        image.load_state_dict(state["image_backbone"])
    fusion = UnifiedFusion(unified, text.dim, image.dim)
    fusion.load_state_dict(state["fusion"])
    scorer = None
    if "scorer" in state:
        scorer = CrossScorer(unified)
        scorer.load_state_dict(state["scorer"])
    idf = json.loads((path / IDF_FILE).read_text()) if (path / IDF_FILE).is_file() else None
    return UnifiedEncoder(config, unified, text, image, fusion, scorer, device, idf)
