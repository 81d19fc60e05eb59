"""The contrastive loss unit: values on hand-made embeddings, masking, gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from samestyle.models.train.losses import (
    InBatchHinge,
    LocalityConsistency,
    SelfDistinctiveness,
    SymmetricInfoNCE,
    same_product_mask,
)

E = torch.eye(3)


def test_hinge_zero_when_positives_win_by_the_margin() -> None:
    assert InBatchHinge(0.2)(E, E).item() == pytest.approx(0.0)


def test_hinge_value_on_swapped_keys() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # s_ii = 0, s_ij = 1: each query has one negative costing 1 - 0 + 0.2, averaged with the
    # positive's own zero term over j = 2 keys.
    assert InBatchHinge(0.2)(q, keys).item() == pytest.approx(0.6)


def test_hinge_extra_keys_are_negatives_only() -> None:
    q = torch.tensor([[1.0, 0.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # positive, then a hard negative equal to it
    assert InBatchHinge(0.5)(q, keys).item() == pytest.approx(0.25)  # (0 + 0.5) / 2


def test_same_product_never_a_negative() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    same = same_product_mask(["p", "p"], ["p", "p"])
    assert same.all()
    assert InBatchHinge(0.2)(q, keys, same).item() == pytest.approx(0.0)
    info = SymmetricInfoNCE(0.1)(q, keys, same)
    assert info.item() == pytest.approx(0.0, abs=1e-6)  # only the positive is left


def test_hinge_valid_mask_skips_queries() -> None:
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # query 1's negative beats its positive
    full = InBatchHinge(0.2)(q, keys).item()
    only_first = InBatchHinge(0.2)(q, keys, valid=torch.tensor([True, False])).item()
    assert full > 0 and only_first == pytest.approx(0.1)  # query 0: (0 + 0.2) / 2, averaged alone


def test_infonce_value() -> None:
    t = 0.5
    got = SymmetricInfoNCE(t)(E[:2, :2], E[:2, :2]).item()
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + 1.0))
    assert got == pytest.approx(expected, rel=1e-5)


def test_self_distinctiveness_value() -> None:
    t = 1.0
    got = SelfDistinctiveness(t)(E, E).item()
    expected = math.log(1 + 2 * math.exp(-1 / t))
    assert got == pytest.approx(expected, rel=1e-5)


def test_locality_consistency_zero_when_unchanged_and_positive_when_moved() -> None:
    torch.manual_seed(0)
    z = F.normalize(torch.randn(8, 4), dim=-1)
    loss = LocalityConsistency(k=3)
    assert loss(z, z).item() == pytest.approx(0.0, abs=1e-7)
    moved = F.normalize(z + 0.5 * torch.randn(8, 4), dim=-1)
    assert loss(moved, z).item() > 0


@pytest.mark.parametrize("term", ["hinge", "infonce", "self", "local"])
def test_gradients_flow(term: str) -> None:
    torch.manual_seed(1)
    q = torch.randn(6, 5, requires_grad=True)
    k = torch.randn(6, 5, requires_grad=True)
    a, b = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if term == "hinge":
        loss = InBatchHinge(1.0)(a, b)
    elif term == "infonce":
        loss = SymmetricInfoNCE(0.1)(a, b)
    elif term == "self":
        loss = SelfDistinctiveness(0.1)(a, b)
    else:
        loss = LocalityConsistency(3)(a, b)
    loss.backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    if term != "local":  # locality's targets are detached originals on purpose
        assert k.grad is not None and k.grad.abs().sum() > 0
