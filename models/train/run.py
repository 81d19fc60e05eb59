"""``samestyle train``: train the unified fusion (and the cross-scorer) on cached backbone tokens.

    samestyle train --listings L.csv (--pairs P.csv | --clusters C.csv) [--valid-pairs V.csv] --out DIR

The backbones stay frozen unless ``--finetune`` / ``--finetune-image-blocks`` say otherwise. The
model directory gets the best epoch on the valid pairs: its config, weights, the data manifest and
the validation metrics. Test splits are refused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from samestyle.models.backbones import build_image_backbone, build_text_backbone, trainable_image_blocks
from samestyle.models.data import UnionFind, read_clusters, read_listings, read_pairs, refuse_test
from samestyle.models.encoder import ALLOW_RANDOM_WEIGHTS_ENV, load_config
from samestyle.models.features import FeatureCache, LiveImageFeatures, LiveTextFeatures, build_feature_cache
from samestyle.models.train.losses import (
    InBatchHinge,
    LocalityConsistency,
    SelfDistinctiveness,
    SymmetricInfoNCE,
    same_product_mask,
)
from samestyle.models.train.metrics import best_threshold, pair_metrics
from samestyle.models.unified import (
    FUSION_MODES,
    FUSION_NAME,
    CrossScorer,
    UnifiedConfig,
    UnifiedFusion,
    document_frequencies,
    lexical_features,
    save_unified_model,
)
from samestyle.topics.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["TRAINING_SPLITS", "main", "build_parser"]

#: With ``--split-column``, the rows of these splits are trained on; every other split (val,
#: test) is never read as a positive or a negative.
TRAINING_SPLITS = ("train", "catalog")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samestyle train", description=__doc__.split("\n\n")[0])
    p.add_argument("--listings", required=True, type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pairs", type=Path, help="labelled pairs (label 1 positives, 0 hard negatives)")
    src.add_argument("--clusters", type=Path, help="clusters file: same cluster = same product")
    p.add_argument("--valid-pairs", type=Path, help="pairs for model selection and thresholds")
    p.add_argument("--out", required=True, type=Path, help="model directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.add_argument("--base", default="default", help="backbone config: default, tiny, or a JSON file")
    p.add_argument("--name", default=None, help="model name (default: the listings' folder name)")
    p.add_argument("--max-text-tokens", type=int, default=32)
    p.add_argument("--no-images", action="store_true", help="ignore image_path (text only)")
    p.add_argument("--holdout-fraction", type=float, default=0.0, help="clusters kept out (clusters mode)")
    p.add_argument("--partner-split", default=None,
                   help="with --split-column: the positive of every other row is its cluster's row of this "
                        "split (e.g. catalog: photo -> catalog entry) instead of any cluster member")
    p.add_argument("--split-column", default=None,
                   help="clusters column: rows whose value is 'train' or 'catalog' are trained on, others never")
    # architecture
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-grid", type=int, default=4)
    p.add_argument("--no-skip", action="store_true", help="ablation: no mean-input skip path")
    p.add_argument("--scorer-layers", type=int, default=1, help="0: no cross-scorer")
    p.add_argument("--no-lexical", action="store_true", help="cross-scorer without lexical features")
    p.add_argument("--no-token-ids", action="store_true", help="ablation: no token-id embedding")
    p.add_argument("--no-scorer-tokens", action="store_true", help="scorer on lexical features + cosine only")
    p.add_argument("--fusion", choices=FUSION_MODES, default="single_stream",
                   help="single_stream (one transformer over both modalities) or concat (ablation: "
                        "per-modality towers over pooled tokens, summed)")
    # fine-tuning
    p.add_argument("--finetune", action="store_true",
                   help="fine-tune the text backbone too (the image backbone: see --finetune-image-blocks)")
    p.add_argument("--finetune-layers", type=int, default=0,
                   help="with --finetune: train only the last N transformer layers (0: the whole backbone)")
    p.add_argument("--finetune-image-blocks", type=int, default=0,
                   help="fine-tune the last N blocks of the image backbone on live image features "
                        "(0: image backbone frozen, its tokens cached); works with or without --finetune")
    p.add_argument("--backbone-lr", type=float, default=2e-5, help="learning rate of fine-tuned backbone weights")
    # loss
    p.add_argument("--loss", choices=("hinge", "infonce"), default="hinge")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--w-it", type=float, default=1.0, help="weight of hinge IT-IT")
    p.add_argument("--w-t", type=float, default=1.0, help="weight of hinge T-IT")
    p.add_argument("--w-i", type=float, default=1.0, help="weight of hinge I-IT")
    p.add_argument("--w-self", type=float, default=0.1, help="weight of self-distinctiveness")
    p.add_argument("--w-local", type=float, default=1.0, help="weight of locality consistency")
    p.add_argument("--locality-k", type=int, default=10)
    p.add_argument("--token-drop", type=float, default=0.2, help="token drop of the transformed view")
    p.add_argument("--no-hard-negatives", action="store_true")
    # optimisation
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--scorer-epochs", type=int, default=5)
    p.add_argument("--scorer-lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when available)")
    p.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    p.add_argument("--allow-random-weights", action="store_true", help="tests only: tiny random backbones")
    p.add_argument("--no-progress", action="store_true")
    return p


# ------------------------------------------------------------------------------------ data


def _file_info(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return {"path": str(path.resolve()), "sha256": digest, "bytes": path.stat().st_size}


class TrainingData:
    """Positive partners, hard negatives and product ids of the training listings."""

    def __init__(
        self,
        positives: dict[str, list[str]],
        negatives: dict[str, list[str]],
        product: dict[str, str],
        labelled: list[tuple[str, str, int]],
        held_out: list[str],
        excluded: set[str] | None = None,
    ) -> None:
        self.positives = positives
        self.negatives = negatives
        self.product = product
        self.labelled = labelled  # pairs for the cross-scorer (pairs mode)
        self.held_out = held_out
        # Listings training must not see even as negatives: held-out clusters, other splits.
        self.excluded = excluded or set()


def load_training_data(args: argparse.Namespace, ids: set[str]) -> TrainingData:
    positives: dict[str, list[str]] = defaultdict(list)
    negatives: dict[str, list[str]] = defaultdict(list)
    uf = UnionFind()
    labelled: list[tuple[str, str, int]] = []
    held_out: list[str] = []
    excluded: set[str] = set()
    if args.pairs is not None:
        for a, b, label in read_pairs(args.pairs):
            if a not in ids or b not in ids:
                raise ConfigError(f"{args.pairs}: pair ({a}, {b}) names a listing not in {args.listings}")
            labelled.append((a, b, label))
            if label:
                positives[a].append(b)
                positives[b].append(a)
                uf.union(a, b)
            else:
                negatives[a].append(b)
                negatives[b].append(a)
    else:
        clusters = read_clusters(args.clusters)
        split_ok: set[str] | None = None
        split_of: dict[str, str] = {}
        if args.partner_split and not args.split_column:
            raise ConfigError("--partner-split needs --split-column")
        if args.split_column:
            import csv

            with open(args.clusters, encoding="utf-8-sig", newline="") as fh:
                rows = list(csv.DictReader(fh))
            if rows and args.split_column not in rows[0]:
                raise ConfigError(f"{args.clusters}: no column {args.split_column!r}")
            if any("test" in (r[args.split_column] or "").lower() for r in rows):
                logger.info("rows of split 'test' in %s are ignored", args.clusters)
            split_of = {r["listing_id"]: r[args.split_column] for r in rows}
            split_ok = {i for i, v in split_of.items() if v in TRAINING_SPLITS}
        members: dict[str, list[str]] = defaultdict(list)
        for listing_id, cluster in clusters.items():
            if listing_id in ids and (split_ok is None or listing_id in split_ok):
                members[cluster].append(listing_id)
        names = sorted(c for c, m in members.items() if len(m) >= 2)
        if args.holdout_fraction > 0:
            rng = random.Random(args.seed)
            shuffled = names[:]
            rng.shuffle(shuffled)
            held_out = sorted(shuffled[: int(round(args.holdout_fraction * len(shuffled)))])
        keep = set(names) - set(held_out)
        held_set = set(held_out)
        excluded = {i for i in ids if (split_ok is not None and i not in split_ok)
                    or clusters.get(i) in held_set}
        for cluster in sorted(keep):
            group = members[cluster]
            anchors_of = [x for x in group if split_of.get(x) == args.partner_split] if args.partner_split else []
            for listing_id in group:
                # With --partner-split, a photo's positive is its product's catalog entry (the
                # gallery it will be searched against), not another photo.
                partners = [x for x in anchors_of if x != listing_id]
                positives[listing_id] = partners or [x for x in group if x != listing_id]
                uf.union(listing_id, group[0])
    product = {listing_id: uf.find(listing_id) for listing_id in ids}
    if not positives:
        raise ConfigError("no positive pairs to train on")
    return TrainingData(dict(positives), dict(negatives), product, labelled, held_out, excluded)


def _batches(data: TrainingData, batch_size: int, rng: random.Random) -> list[list[tuple[str, str]]]:
    """One epoch: every anchor once with a random positive; no product twice in a batch."""
    anchors = sorted(data.positives)
    rng.shuffle(anchors)
    batches: list[list[tuple[str, str]]] = []
    pending = anchors
    while pending:
        batch: list[tuple[str, str]] = []
        seen: set[str] = set()
        deferred = []
        for a in pending:
            p = data.product[a]
            if p in seen or len(batch) >= batch_size:
                deferred.append(a)
                continue
            seen.add(p)
            batch.append((a, rng.choice(data.positives[a])))
        if len(batch) < 2 and batches:
            break  # only one product left: nothing to contrast it with
        batches.append(batch)
        pending = deferred
        if len(batch) < 2:
            break
    return batches


# ---------------------------------------------------------------------------------- losses


class ContrastiveUnit:
    """The weighted loss unit, assembled from the per-term classes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.hinge = InBatchHinge(args.margin)
        self.infonce = SymmetricInfoNCE(args.temperature)
        self.selfdist = SelfDistinctiveness(args.temperature)
        self.locality = LocalityConsistency(args.locality_k)

    def pair_term(self, q: torch.Tensor, keys: torch.Tensor, same: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        if self.args.loss == "infonce":
            return self.infonce(q, keys, same, valid)
        return self.hinge(q, keys, same, valid)


def _embed_view(
    fusion: UnifiedFusion, view: str, text: torch.Tensor, mask: torch.Tensor, image: torch.Tensor,
    has_image: torch.Tensor, token_ids: torch.Tensor, token_drop: float = 0.0,
) -> torch.Tensor:
    """``fusion(view, ...)[0]`` ``[B, dim]``, computed only where the view has tokens: image-only
    rows (photos) skip the padded text positions of a mixed batch and rows without the view
    skip the forward pass (their row is zero, as the fusion would give). The same numbers as
    one call, at a fraction of the cost on photo-heavy data."""
    has_text = mask.any(dim=1)  # [B]
    has = {"T": has_text, "I": has_image, "IT": has_text | has_image}[view]
    # Rows that need no text positions at all: no text, or a view that does not read text.
    short = has & (~has_text if "T" in view else torch.ones_like(has))
    if bool(has.all()) and not bool(short.any()):
        return fusion(view, text, mask, image, has_image, token_ids, token_drop)[0]
    out = text.new_zeros(text.shape[0], fusion.config.dim)  # [B, dim]
    for rows, length in ((has & ~short, text.shape[1]), (short, 1)):
        if bool(rows.any()):
            z = fusion(view, text[rows, :length], mask[rows, :length], image[rows], has_image[rows],
                       token_ids[rows, :length], token_drop)[0]
            out = out.index_put((rows.nonzero(as_tuple=True)[0],), z.to(out.dtype))
    return out


def _step_loss(
    fusion: UnifiedFusion,
    cache: FeatureCache,
    data: TrainingData,
    batch: list[tuple[str, str]],
    unit: ContrastiveUnit,
    rng: random.Random,
    device: str,
    with_images: bool,
) -> tuple[torch.Tensor, dict[str, float]]:
    args = unit.args
    anchors = [a for a, _ in batch]
    partners = [b for _, b in batch]
    extras: list[str] = []
    if not args.no_hard_negatives:
        for a in anchors:
            if data.negatives.get(a):
                extras.append(rng.choice(data.negatives[a]))
    ids = anchors + partners + extras
    text, mask, image, has_image, tids = cache.batch(cache.rows(ids), device)
    b = len(batch)
    products = [data.product[i] for i in ids]
    views: dict[str, torch.Tensor] = {}
    views["IT"] = _embed_view(fusion, "IT", text, mask, image, has_image, tids)  # [2B + E, d]
    if with_images:  # a view whose term is switched off is not computed at all
        for name, weight in (("T", args.w_t), ("I", args.w_i)):
            if weight > 0:
                views[name] = _embed_view(fusion, name, text[: 2 * b], mask[: 2 * b], image[: 2 * b],
                                          has_image[: 2 * b], tids[: 2 * b])
    it = views["IT"]
    if not with_images:
        # Without images the T sequence is the IT sequence (the image is masked either way):
        # reuse it instead of a second identical forward pass.
        views["T"] = it
    losses: dict[str, torch.Tensor] = {}
    total = it.new_zeros(())
    # Both directions: anchors query the partners' IT (+ hard negatives) and vice versa.
    for q_slice, k_slice in ((slice(0, b), slice(b, 2 * b)), (slice(b, 2 * b), slice(0, b))):
        keys = torch.cat([it[k_slice], it[2 * b :]])  # [B + E, d]
        key_products = products[k_slice] + products[2 * b :]
        same = same_product_mask(products[q_slice], key_products).to(it.device)
        for name, weight in (("IT", args.w_it), ("T", args.w_t), ("I", args.w_i)):
            if weight <= 0 or name not in views:
                continue
            # Queries without the view (no image for I, no text for T) are left out of the mean.
            valid = {"I": has_image[q_slice], "T": mask[q_slice].any(dim=1)}.get(name)
            term = unit.pair_term(views[name][q_slice], keys, same, valid) * 0.5
            losses[f"{name}-IT"] = losses.get(f"{name}-IT", 0.0) + term
            total = total + weight * term
    if args.w_self > 0 or args.w_local > 0:
        transformed = _embed_view(fusion, "IT", text[:b], mask[:b], image[:b], has_image[:b], tids[:b],
                                  token_drop=args.token_drop)
        if args.w_self > 0:
            same = same_product_mask(products[:b], products[:b]).to(it.device)
            term = unit.selfdist(transformed, it[:b], same)
            losses["self"] = term
            total = total + args.w_self * term
        if args.w_local > 0:
            term = unit.locality(transformed, it[:b])
            losses["local"] = term
            total = total + args.w_local * term
    return total, {k: float(v.detach()) for k, v in losses.items()}


# ------------------------------------------------------------------------------ validation


@torch.no_grad()
def embed_cache(fusion: UnifiedFusion, cache: FeatureCache, view: str, device: str, batch_size: int = 256) -> torch.Tensor:
    """``[n, dim]`` embeddings of one view for every cached listing (CPU float32)."""
    was = fusion.training
    fusion.eval()
    out = []
    for start in range(0, len(cache), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(cache)))
        out.append(fusion(view, *cache.batch(rows, device))[0].float().cpu())
    fusion.train(was)
    return torch.cat(out)


def _valid_cosine(fusion: UnifiedFusion, cache: FeatureCache, pairs: list[tuple[str, str, int]], device: str) -> dict[str, float]:
    z = embed_cache(fusion, cache, "IT", device)
    a, b = cache.rows([p[0] for p in pairs]), cache.rows([p[1] for p in pairs])
    scores = (z[a] * z[b]).sum(dim=1).numpy()
    labels = np.array([p[2] for p in pairs])
    return pair_metrics(scores, labels, best_threshold(scores, labels))


# -------------------------------------------------------------------------------- scorer


class FusedTokens:
    """Frozen fusion outputs of every listing: IT embedding and its valid tokens."""

    def __init__(self, fusion: UnifiedFusion, cache: FeatureCache, device: str, batch_size: int = 256) -> None:
        fusion.eval()
        self.z: list[torch.Tensor] = []
        self.tokens: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(cache), batch_size):
                rows = torch.arange(start, min(start + batch_size, len(cache)))
                z, tok, mask = fusion("IT", *cache.batch(rows, device))
                for k in range(len(rows)):
                    self.z.append(z[k].cpu())
                    self.tokens.append(tok[k][mask[k]].half().cpu())  # [S_k, h]

    def batch(self, rows: Sequence[int], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        toks = [self.tokens[r] for r in rows]
        length = max(t.shape[0] for t in toks)
        out = torch.zeros(len(rows), length, toks[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.bool)
        for k, t in enumerate(toks):
            out[k, : t.shape[0]] = t.float()
            mask[k, : t.shape[0]] = True
        return out.to(device), mask.to(device), torch.stack([self.z[r] for r in rows]).to(device)


def score_pairs_cached(
    scorer: CrossScorer, fused: FusedTokens, cache: FeatureCache, pairs: Sequence[tuple[str, str]],
    device: str, lexical: np.ndarray | None = None, batch_size: int = 256,
) -> np.ndarray:
    """Match probabilities of pairs from precomputed fused tokens."""
    was = scorer.training
    scorer.eval()
    if lexical is None:
        lexical = _lexical(cache, pairs)
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            logits = _scorer_forward(scorer, fused, cache, chunk, lexical[start : start + batch_size], device)
            out.append(torch.sigmoid(logits).float().cpu())
    scorer.train(was)
    return torch.cat(out).numpy() if out else np.zeros(0, np.float32)


def _lexical(cache: FeatureCache, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
    idf = _idf_of(cache)
    feats = [lexical_features(cache.texts[cache.index[a]], cache.texts[cache.index[b]], idf) for a, b in pairs]
    return np.asarray(feats, dtype=np.float32).reshape(len(pairs), -1)


_IDF: dict[int, dict[str, float]] = {}


def _idf_of(cache: FeatureCache) -> dict[str, float]:
    """The idf table of a cache's texts (the training listings), computed once per cache."""
    if id(cache) not in _IDF:
        _IDF[id(cache)] = document_frequencies(cache.texts)
    return _IDF[id(cache)]


def _scorer_forward(
    scorer: CrossScorer, fused: FusedTokens, cache: FeatureCache, pairs: Sequence[tuple[str, str]],
    lexical: np.ndarray, device: str,
) -> torch.Tensor:
    ta, ma, za = fused.batch([cache.index[a] for a, _ in pairs], device)
    tb, mb, zb = fused.batch([cache.index[b] for _, b in pairs], device)
    lex = torch.from_numpy(lexical).to(device)
    return scorer(ta, ma, tb, mb, (za * zb).sum(dim=1), lex)


def _mined_pairs(fusion: UnifiedFusion, cache: FeatureCache, data: TrainingData, device: str, k: int = 5) -> list[tuple[str, str, int]]:
    """Clusters mode: positives within clusters plus each anchor's top-k non-matching
    bi-encoder neighbours as hard negatives (never a held-out or other-split listing)."""
    z = embed_cache(fusion, cache, "IT", device)
    anchors = sorted(data.positives)
    rows = cache.rows(anchors)
    sim = z[rows] @ z.T  # [A, n]
    sim[torch.arange(len(anchors)), rows] = -2.0
    if data.excluded:
        sim[:, cache.rows(sorted(data.excluded & set(cache.ids)))] = -2.0
    top = sim.topk(min(k + 10, len(cache) - 1), dim=1).indices
    pairs: list[tuple[str, str, int]] = []
    for i, a in enumerate(anchors):
        for b in data.positives[a]:
            if a < b:
                pairs.append((a, b, 1))
        count = 0
        for j in top[i].tolist():
            b = cache.ids[j]
            if b in data.excluded:
                continue
            if data.product.get(b) != data.product[a] and b not in data.positives[a]:
                pairs.append((a, b, 0))
                count += 1
                if count >= k:
                    break
    return pairs


def train_scorer(
    args: argparse.Namespace, unified: UnifiedConfig, fusion: UnifiedFusion, cache: FeatureCache,
    data: TrainingData, valid: list[tuple[str, str, int]] | None, device: str, rng: random.Random,
) -> tuple[CrossScorer, dict[str, Any]]:
    from tqdm import tqdm

    labelled = data.labelled if data.labelled else _mined_pairs(fusion, cache, data, device)
    fused = FusedTokens(fusion, cache, device)
    pairs = [(a, b) for a, b, _ in labelled]
    labels = torch.tensor([y for _, _, y in labelled], dtype=torch.float32)
    lexical = _lexical(cache, pairs)
    valid_lex = _lexical(cache, [(a, b) for a, b, _ in valid]) if valid else None
    scorer = CrossScorer(unified).to(device)
    # The lexical branch is tiny and its inputs are already informative: it may move faster.
    lexical_params = list(scorer.lexical_head.parameters()) if scorer.lexical_head is not None else []
    lexical_ids = {id(p) for p in lexical_params}
    groups = [{"params": [p for p in scorer.parameters() if id(p) not in lexical_ids], "lr": args.scorer_lr}]
    if lexical_params:
        groups.append({"params": lexical_params, "lr": 10 * args.scorer_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    steps = max(1, args.scorer_epochs * math.ceil(len(pairs) / args.batch_size))
    schedule = _schedule(optimizer, steps)
    positive_weight = torch.tensor(max(1.0, float((labels == 0).sum() / labels.sum().clamp(min=1))) ** 0.5)
    best: dict[str, Any] = {"f1": -1.0}
    best_state = None
    for epoch in range(args.scorer_epochs):
        scorer.train()
        order = list(range(len(pairs)))
        rng.shuffle(order)
        bar = tqdm(range(0, len(order), args.batch_size), desc=f"scorer {epoch + 1}/{args.scorer_epochs}",
                   disable=args.no_progress, leave=False)
        total = 0.0
        for start in bar:
            idx = order[start : start + args.batch_size]
            logits = _scorer_forward(scorer, fused, cache, [pairs[i] for i in idx], lexical[idx], device)
            loss = F.binary_cross_entropy_with_logits(logits, labels[idx].to(device), pos_weight=positive_weight.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(scorer.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(idx)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": total / max(1, len(pairs))}
        if valid:
            scores = score_pairs_cached(scorer, fused, cache, [(a, b) for a, b, _ in valid], device, valid_lex)
            y = np.array([p[2] for p in valid])
            record.update(pair_metrics(scores, y, best_threshold(scores, y)))
        logger.info("scorer epoch %s", record)
        print(f"scorer epoch {epoch + 1}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), file=sys.stderr)
        if not valid or record["f1"] >= best["f1"]:
            best = record
            best_state = {k: v.detach().clone() for k, v in scorer.state_dict().items()}
    if best_state is not None:
        scorer.load_state_dict(best_state)
    scorer.eval()
    return scorer, best


def trainable_text_layers(backbone: torch.nn.Module, last: int = 0) -> list[torch.nn.Module]:
    """Unfreeze the text backbone for fine-tuning: all of it (``last == 0``) or only its last
    ``last`` transformer layers (the rest stays frozen, cheap on CPU). Returns the trainable
    modules; every other backbone parameter gets ``requires_grad = False``.

    Raises:
        ConfigError: ``last`` is negative or exceeds the model's layers, or the model has no
            ``encoder.layer`` list (BERT-style models do) to pick layers from.
    """
    model = backbone.model  # type: ignore[attr-defined]
    if last == 0:
        for param in model.parameters():
            param.requires_grad_(True)
        return [model]
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError("--finetune-layers needs a BERT-style text model (model.encoder.layer)")
    if not 0 < last <= len(layers):
        raise ConfigError(f"--finetune-layers must be in 1..{len(layers)}, got {last}")
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = list(layers[len(layers) - last :])
    for layer in chosen:
        for param in layer.parameters():
            param.requires_grad_(True)
    return chosen


def _snapshot(fusion: torch.nn.Module, backbones: dict[str, torch.nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of the weights that train (the fusion and the fine-tuned backbones by name), to
    restore the best epoch."""
    state = {"fusion": {k: v.detach().clone() for k, v in fusion.state_dict().items()}}
    for name, module in backbones.items():
        state[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return state


def _schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in (args.pairs, args.clusters, args.valid_pairs):
        refuse_test(path)
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise ConfigError(f"{args.out} exists and is not empty (use --overwrite)")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.time()

    base = load_config(args.base)
    folder = args.listings.resolve().parent
    name = args.name or f"{folder.parent.name}-{folder.name}"
    config = replace(base, name=name, fusion=FUSION_NAME, version="placeholder", max_text_tokens=args.max_text_tokens)
    if config.uses_random_weights:
        import os

        allowed = os.environ.get(ALLOW_RANDOM_WEIGHTS_ENV, "").lower() in ("1", "true", "yes")
        if not (args.allow_random_weights or allowed):
            raise ConfigError(f"backbones of {args.base!r} are random: tests only (--allow-random-weights)")
    records = read_listings(args.listings)
    text_backbone = build_text_backbone(config.text_backbone, config)
    image_backbone = build_image_backbone(config.image_backbone, config)
    unified = UnifiedConfig(
        dim=args.dim, hidden=args.hidden, layers=args.layers, heads=args.heads, ffn=2 * args.hidden,
        image_grid=args.image_grid, skip=not args.no_skip, scorer_layers=args.scorer_layers,
        scorer_lexical=not args.no_lexical,
        scorer_tokens=not args.no_scorer_tokens,
        token_vocab=0 if args.no_token_ids else len(text_backbone.tokenizer),
        fusion=args.fusion,
    )
    cache = build_feature_cache(
        records, text_backbone, image_backbone, config, image_grid=args.image_grid, device=device,
        listings_path=args.listings, cache_dir=args.cache_dir, with_images=not args.no_images,
        progress=not args.no_progress,
    )
    with_images = bool(cache.has_image.any())
    if args.finetune_image_blocks < 0:
        raise ConfigError(f"--finetune-image-blocks must be >= 0, got {args.finetune_image_blocks}")
    if args.finetune_image_blocks and not with_images:
        raise ConfigError("--finetune-image-blocks needs listings with readable images (and no --no-images)")
    usable = cache.usable_ids()
    if len(usable) < len(cache):
        logger.warning("%d listings have neither text nor a readable image: not trained on",
                       len(cache) - len(usable))
    data = load_training_data(args, set(usable))
    valid = read_pairs(args.valid_pairs) if args.valid_pairs else None
    if valid:
        cache.rows([p[0] for p in valid] + [p[1] for p in valid])  # every valid id must exist

    fusion = UnifiedFusion(unified, text_backbone.dim, image_backbone.dim).to(device)
    unit = ContrastiveUnit(args)
    groups: list[dict[str, Any]] = [{"params": list(fusion.parameters()), "lr": args.lr}]
    tuned: list[torch.nn.Module] = []
    if args.finetune:
        text_backbone = text_backbone.to(device)
        tuned = trainable_text_layers(text_backbone, args.finetune_layers)
        # Every batch now runs the text backbone; image tokens come from the cache unless
        # --finetune-image-blocks makes them live too.
        cache = LiveTextFeatures(cache, text_backbone, config.max_text_tokens)
        groups.append({"params": [p for m in tuned for p in m.parameters()], "lr": args.backbone_lr})
    image_tuned: list[torch.nn.Module] = []
    if args.finetune_image_blocks:
        image_backbone = image_backbone.to(device).eval()  # eval: see trainable_image_blocks
        image_tuned = trainable_image_blocks(image_backbone, args.finetune_image_blocks, "--finetune-image-blocks")
        # Every batch now decodes its images and runs the image backbone on them.
        paths = {r.listing_id: r.image_path for r in records}
        cache = LiveImageFeatures(cache, image_backbone, [paths[i] for i in cache.ids],
                                  config.image_preprocessing(), args.image_grid)
        groups.append({"params": [p for m in image_tuned for p in m.parameters()], "lr": args.backbone_lr})
    finetuned: dict[str, torch.nn.Module] = {}
    if tuned:
        finetuned["text"] = text_backbone
    if image_tuned:
        finetuned["image"] = image_backbone
    trainable = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(groups, weight_decay=0.01)
    epoch_batches = len(_batches(data, args.batch_size, random.Random(0)))
    schedule = _schedule(optimizer, max(1, args.epochs * epoch_batches))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    from tqdm import tqdm

    history: list[dict[str, Any]] = []
    best: dict[str, Any] = {"f1": -1.0}
    best_state = None
    for epoch in range(args.epochs):
        fusion.train()
        for module in tuned:
            module.train()
        batches = _batches(data, args.batch_size, rng)
        bar = tqdm(batches, desc=f"fusion {epoch + 1}/{args.epochs}", disable=args.no_progress, leave=False)
        sums: dict[str, float] = defaultdict(float)
        for batch in bar:
            with autocast:
                loss, parts = _step_loss(fusion, cache, data, batch, unit, rng, device, with_images)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            schedule.step()
            sums["loss"] += float(loss.detach())
            for k, v in parts.items():
                sums[k] += v
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
        record: dict[str, Any] = {"epoch": epoch + 1, **{k: v / max(1, len(batches)) for k, v in sums.items()}}
        text_backbone.eval()
        if valid:
            record.update({f"valid_{k}": v for k, v in _valid_cosine(fusion, cache, valid, device).items()})
        history.append(record)
        print(f"fusion epoch {epoch + 1}: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), file=sys.stderr)
        if not valid or record["valid_f1"] >= best["f1"]:
            best = {"f1": record.get("valid_f1", 0.0), "epoch": epoch + 1}
            best_state = _snapshot(fusion, finetuned)
    if best_state is not None:
        fusion.load_state_dict(best_state["fusion"])
        for backbone_name, module in finetuned.items():
            module.load_state_dict(best_state[backbone_name])
    fusion.eval()
    text_backbone.eval()
    metrics: dict[str, Any] = {"fusion_history": history, "fusion_best_epoch": best.get("epoch")}
    if valid:
        metrics["valid_cosine"] = _valid_cosine(fusion, cache, valid, device)

    scorer = None
    if args.scorer_layers > 0:
        scorer, scorer_best = train_scorer(args, unified, fusion, cache, data, valid, device, rng)
        metrics["valid_scorer"] = scorer_best

    weights_digest = hashlib.sha256()
    for value in fusion.state_dict().values():
        weights_digest.update(value.detach().float().cpu().numpy().tobytes())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    config = replace(config, version=f"{name}-unified-{stamp}-{weights_digest.hexdigest()[:8]}")
    manifest = {
        "version": config.version,
        "created": stamp,
        "listings": _file_info(args.listings),
        "listings_rows": len(records),
        "pairs": _file_info(args.pairs),
        "clusters": _file_info(args.clusters),
        "valid_pairs": _file_info(args.valid_pairs),
        "held_out_clusters": data.held_out,
        "trained_listings": sorted(data.positives),
        "positive_anchors": len(data.positives),
        "labelled_pairs": len(data.labelled),
        "with_images": with_images,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": device,
        "seconds": round(time.time() - started, 1),
    }
    if args.out.exists() and args.overwrite:
        for child in args.out.iterdir():
            if child.is_file():
                child.unlink()
    save_unified_model(args.out, config, unified, fusion, scorer, manifest, metrics,
                       backbones=finetuned or None,
                       idf=_idf_of(cache) if scorer is not None else None)
    summary = {"model": str(args.out), "version": config.version, "seconds": manifest["seconds"],
               "valid_cosine": metrics.get("valid_cosine"), "valid_scorer": metrics.get("valid_scorer")}
    print(json.dumps(summary, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
