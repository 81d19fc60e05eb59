"""The contrastive loss unit: pure functions of embeddings, one class per term.

Every term takes unit-norm embeddings and an optional ``same_product`` mask: entries that are
True are listings of the same product, which must never serve as each other's negatives (they
are dropped from the negative set, not counted as errors).

- :class:`InBatchHinge` — ``mean_j max(0, s_ij - s_ii + margin * [i != j])`` on cosine
  similarity between queries and the positives' IT embeddings (applied IT-IT, T-IT, I-IT).
  Extra keys past the batch (hard negatives) only ever act as negatives.
- :class:`SelfDistinctiveness` — a transformed view of each product must find its own original
  among the batch (InfoNCE, transformed → original).
- :class:`LocalityConsistency` — each product's top-k in-batch neighbours keep their similarities
  under the transformed view (squared error against the detached original similarities).
- :class:`SymmetricInfoNCE` — the CLIP-style alternative to the hinge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "InBatchHinge",
    "LocalityConsistency",
    "SelfDistinctiveness",
    "SymmetricInfoNCE",
    "same_product_mask",
]


def same_product_mask(query_products: Sequence[object], key_products: Sequence[object]) -> torch.Tensor:
    """``[B, M]`` bool: True where query ``i`` and key ``j`` are the same product."""
    index: dict[object, int] = {}
    q = torch.tensor([index.setdefault(p, len(index)) for p in query_products])
    k = torch.tensor([index.setdefault(p, len(index)) for p in key_products])
    return q.unsqueeze(1) == k.unsqueeze(0)


def _exclusion(same_product: torch.Tensor | None, rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Entries that are not negatives: same product, but never the diagonal (the positive)."""
    eye = torch.zeros(rows, cols, dtype=torch.bool, device=device)
    eye[:, :rows].fill_diagonal_(True)
    if same_product is None:
        return torch.zeros_like(eye)
    return same_product.to(device) & ~eye


class InBatchHinge(nn.Module):
    """In-batch hinge on cosine similarity against the positives.

    ``forward(query [B, d], keys [M, d], same_product [B, M] | None, valid [B] | None)`` with
    ``M >= B``: key ``i`` is query ``i``'s positive, keys past ``B`` are extra negatives. Returns
    the mean over valid queries of ``mean_j max(0, s_ij - s_ii + margin)`` over the negatives
    ``j`` plus the positive itself (whose term is 0), as in the paper's formula.
    """

    def __init__(self, margin: float = 0.2) -> None:
        super().__init__()
        self.margin = margin

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        same_product: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, m = query.shape[0], keys.shape[0]
        sim = query @ keys.T  # [B, M]
        positive = sim[:, :b].diagonal().unsqueeze(1)  # [B, 1]
        cost = (sim - positive + self.margin).clamp(min=0.0)  # [B, M]
        excluded = _exclusion(same_product, b, m, sim.device)
        eye = torch.zeros_like(excluded)
        eye[:, :b].fill_diagonal_(True)
        cost = cost.masked_fill(excluded | eye, 0.0)
        per_query = cost.sum(dim=1) / (m - excluded.sum(dim=1)).clamp(min=1)  # [B]
        return _masked_mean(per_query, valid)


class SymmetricInfoNCE(nn.Module):
    """Symmetric cross-entropy over ``query @ keys.T / temperature`` (CLIP's loss): query
    ``i`` must pick key ``i`` among the keys and key ``i`` must pick query ``i`` among the
    queries (the second direction over the first ``B`` keys)."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        query: torch.Tensor,
        keys: torch.Tensor,
        same_product: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, m = query.shape[0], keys.shape[0]
        logits = query @ keys.T / self.temperature  # [B, M]
        excluded = _exclusion(same_product, b, m, logits.device)
        logits = logits.masked_fill(excluded, float("-inf"))
        target = torch.arange(b, device=logits.device)
        forward = F.cross_entropy(logits, target, reduction="none")  # [B]
        backward = F.cross_entropy(logits[:, :b].T, target, reduction="none")  # [B]
        return _masked_mean((forward + backward) / 2, valid)


class SelfDistinctiveness(nn.Module):
    """A transformed view ``z'`` of each product must be closer to its own original ``z`` than
    to any other product of the batch: InfoNCE(z' → z)."""

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(
        self,
        transformed: torch.Tensor,
        original: torch.Tensor,
        same_product: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = original.shape[0]
        logits = transformed @ original.T / self.temperature  # [B, B]
        logits = logits.masked_fill(_exclusion(same_product, b, b, logits.device), float("-inf"))
        target = torch.arange(b, device=logits.device)
        return _masked_mean(F.cross_entropy(logits, target, reduction="none"), valid)


class LocalityConsistency(nn.Module):
    """Each product's ``k`` nearest in-batch neighbours (by original similarity) keep their
    similarities under the transformed view: mean squared difference, originals detached so
    the neighbourhood is the target and the transformed view moves towards it."""

    def __init__(self, k: int = 10) -> None:
        super().__init__()
        self.k = k

    def forward(
        self,
        transformed: torch.Tensor,
        original: torch.Tensor,
        valid: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = original.shape[0]
        k = min(self.k, b - 1)
        if k <= 0:
            return original.sum() * 0.0
        target = (original @ original.T).detach()  # [B, B]
        eye = torch.eye(b, dtype=torch.bool, device=original.device)
        if valid is not None:  # rows without the view are nobody's neighbour
            eye = eye | ~valid.unsqueeze(0)
        neighbours = target.masked_fill(eye, float("-inf")).topk(k, dim=1).indices  # [B, k]
        moved = transformed @ original.T  # [B, B]
        diff = moved.gather(1, neighbours) - target.gather(1, neighbours)  # [B, k]
        ok = torch.isfinite(target.masked_fill(eye, float("-inf")).gather(1, neighbours))
        per_query = (diff.pow(2) * ok).sum(dim=1) / ok.sum(dim=1).clamp(min=1)
        return _masked_mean(per_query, valid)


def _masked_mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return values.mean()
    weight = valid.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)
