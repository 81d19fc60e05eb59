"""The unified fusion: shapes, modality masking, the encoder interface, model directories."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from samestyle.models.backbones import build_image_backbone, build_text_backbone
from samestyle.models.encoder import NAMED_CONFIGS, ListingInput
from samestyle.models.unified import (
    CrossScorer,
    UnifiedConfig,
    UnifiedEncoder,
    UnifiedFusion,
    is_unified_model_dir,
    lexical_features,
    load_unified_model,
    save_unified_model,
)
from samestyle.topics.errors import ConfigError, InvalidListingError

SMALL = UnifiedConfig(dim=16, hidden=32, layers=1, heads=2, ffn=64, image_grid=2, dropout=0.0, scorer_layers=1)


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def encoder() -> UnifiedEncoder:
    config = NAMED_CONFIGS["tiny"]
    text = build_text_backbone(config.text_backbone, config)
    image = build_image_backbone(config.image_backbone, config)
    torch.manual_seed(0)
    fusion = UnifiedFusion(SMALL, text.dim, image.dim)
    return UnifiedEncoder(config, SMALL, text, image, fusion, CrossScorer(SMALL), "cpu")


LISTINGS = [
    ListingInput("a", "red ceramic mug 350ml", image=_png((200, 20, 20))),
    ListingInput("b", "blue ceramic mug", image=_png((20, 20, 200))),
    ListingInput("c", "leather wallet slim brown"),
]


def test_fusion_shapes_and_masking() -> None:
    torch.manual_seed(0)
    fusion = UnifiedFusion(SMALL, 8, 6).eval()
    text = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]], dtype=torch.bool)
    image = torch.randn(3, 4, 6)
    has_image = torch.tensor([True, True, False])
    with torch.no_grad():
        z = {v: fusion(v, text, mask, image, has_image)[0] for v in ("I", "T", "IT")}
        tokens = fusion("IT", text, mask, image, has_image)[1]
    assert tokens.shape == (3, 1 + 5 + 4, 32)
    for v in z.values():
        assert v.shape == (3, 16)
    norms = {v: z[v].norm(dim=1) for v in z}
    assert torch.allclose(norms["T"], torch.ones(3)) and torch.allclose(norms["IT"], torch.ones(3))
    assert torch.allclose(norms["I"], torch.tensor([1.0, 1.0, 0.0]))  # no image: zero row
    # With an image the three views differ; without one IT is exactly T (the image is masked).
    for k in (0, 1):
        assert not torch.allclose(z["I"][k], z["T"][k], atol=1e-3)
        assert not torch.allclose(z["IT"][k], z["T"][k], atol=1e-3)
    assert torch.allclose(z["IT"][2], z["T"][2], atol=1e-5)
    # Padding is masked: changing padded text tokens changes nothing.
    noisy = text.clone()
    noisy[0, 3:] = 100.0
    with torch.no_grad():
        assert torch.allclose(fusion("IT", noisy, mask, image, has_image)[0], z["IT"], atol=1e-5)


def test_image_only_listing_masks_the_text(encoder: UnifiedEncoder) -> None:
    photo = ListingInput("p", "", image=_png((200, 20, 20)))
    prepared = encoder.prepare(photo)
    assert prepared.text == ""
    out = encoder.encode([photo, LISTINGS[0], LISTINGS[2]])
    assert out.has_image.tolist() == [True, True, False]
    assert out.has_text.tolist() == [False, True, True]
    for view in ("I", "T", "IT"):
        assert out.view(view).shape == (3, 16)
    assert not out.text[0].any()  # no text tokens: all-zero T row
    np.testing.assert_allclose(out.image_text[0], out.image[0], atol=1e-5)  # IT == I
    np.testing.assert_allclose(np.linalg.norm(out.image_text[0]), 1.0, atol=1e-5)
    # The same photo with a title: same I (the image tokens alone), a different IT.
    np.testing.assert_allclose(out.image[0], out.image[1], atol=1e-5)
    assert not np.allclose(out.image_text[0], out.image_text[1], atol=1e-3)
    # Alone in a batch it embeds the same as beside listings with text.
    alone = encoder.encode([photo])
    np.testing.assert_allclose(alone.image_text[0], out.image_text[0], atol=1e-5)


def test_image_only_listing_without_image_is_invalid(encoder: UnifiedEncoder) -> None:
    with pytest.raises(InvalidListingError, match="empty title and no image"):
        encoder.prepare(ListingInput("p", ""))


def test_concat_fusion_ablation_shapes_and_masking() -> None:
    from dataclasses import replace

    torch.manual_seed(0)
    fusion = UnifiedFusion(replace(SMALL, fusion="concat"), 8, 6).eval()
    assert fusion.encoder is None and fusion.towers is not None
    text = torch.randn(3, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    image = torch.randn(3, 4, 6)
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        z = {v: fusion(v, text, mask, image, has_image)[0] for v in ("I", "T", "IT")}
    for v in z.values():
        assert v.shape == (3, 16)
    assert torch.allclose(z["IT"].norm(dim=1), torch.ones(3))
    assert torch.allclose(z["IT"][1], z["T"][1], atol=1e-5)  # no image: IT == T
    assert torch.allclose(z["IT"][2], z["I"][2], atol=1e-5)  # no text: IT == I
    assert z["T"][2].abs().sum() == 0 and z["I"][1].abs().sum() == 0
    assert not torch.allclose(z["IT"][0], z["T"][0], atol=1e-3)
    assert not torch.allclose(z["IT"][0], z["I"][0], atol=1e-3)
    train = UnifiedFusion(replace(SMALL, fusion="concat"), 8, 6)
    train("IT", text, mask, image, has_image)[0].sum().backward()
    assert all(p.grad is not None for p in train.towers.parameters())
    with pytest.raises(ConfigError, match="fusion"):
        replace(SMALL, fusion="late")


def test_fusion_gradients_flow() -> None:
    fusion = UnifiedFusion(SMALL, 8, 6)
    z, _, _ = fusion("IT", torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 4, 6),
                     torch.tensor([True, False]), token_drop=0.3)
    z.sum().backward()
    assert all(p.grad is not None for p in fusion.encoder.parameters())


def test_encoder_interface(encoder: UnifiedEncoder) -> None:
    out = encoder.encode(LISTINGS)
    assert out.dim == 16 and len(out) == 3
    assert out.has_image.tolist() == [True, True, False]
    assert np.allclose(np.linalg.norm(out.image_text, axis=1), 1.0, atol=1e-5)
    assert np.allclose(out.image[2], 0.0)
    assert not np.allclose(out.image[0], out.text[0], atol=1e-3)
    assert np.allclose(out.image_text[2], out.text[2], atol=1e-5)
    probs = encoder.score_pairs([encoder.prepare(LISTINGS[0])], [encoder.prepare(LISTINGS[1])])
    assert probs.shape == (1,) and 0.0 <= probs[0] <= 1.0


def test_model_dir_round_trip(encoder: UnifiedEncoder, tmp_path) -> None:
    config = encoder.config
    from dataclasses import replace

    config = replace(config, fusion="unified", version="test-unified-v1")
    save_unified_model(tmp_path, config, SMALL, encoder.fusion, encoder.scorer, {"data": "x"}, {"f1": 0.5})
    assert is_unified_model_dir(tmp_path)
    with pytest.raises(ConfigError):
        load_unified_model(tmp_path)  # random backbones need explicit permission
    loaded = load_unified_model(tmp_path, allow_random_weights=True)
    assert loaded.version == "test-unified-v1"
    a, b = encoder.encode(LISTINGS), loaded.encode(LISTINGS)
    assert np.allclose(a.image_text, b.image_text, atol=1e-5)
    from samestyle.models.factory import encoder_from_spec

    via_spec = encoder_from_spec(str(tmp_path), "cpu", allow_random_weights=True)
    assert isinstance(via_spec, UnifiedEncoder)
    assert np.allclose(via_spec.encode(LISTINGS).text, a.text, atol=1e-5)


def test_lexical_features() -> None:
    same = lexical_features("Sony KDL-40V4100 40in LCD TV", "sony kdl40v4100 lcd hdtv", {"sony": 1.5})
    other = lexical_features("Sony KDL-40V4100 40in LCD TV", "Samsung LN40A550 LCD TV")
    assert len(same) == len(other) == 10
    assert same[3] == 1.0 and other[3] == 0.0  # shared model code


def test_scorer_without_token_branch() -> None:
    from dataclasses import replace

    scorer = CrossScorer(replace(SMALL, scorer_tokens=False))
    tokens = torch.randn(2, 3, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    logits = scorer(tokens, mask, tokens, mask, torch.tensor([0.9, 0.1]), torch.rand(2, 10))
    assert logits.shape == (2,)
    with pytest.raises(ConfigError):
        replace(SMALL, scorer_tokens=False, scorer_lexical=False)
