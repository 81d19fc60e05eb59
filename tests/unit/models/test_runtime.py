"""Inference runtimes (models/runtime.py) on tiny random-weight models: names and defaults, float32
unit vectors from every runtime, and recall@10 on a small retrieval sample within 0.005 of eager
float32 for the pretrained-style (concat) and the fine-tuned (dual-tower) encoders."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from samestyle.models.backbones import TINY
from samestyle.models.encoder import Embeddings, Encoder, ListingInput
from samestyle.models.factory import create_encoder
from samestyle.models.finetuned import DualTower, TowerConfig, save_finetuned
from samestyle.models.runtime import AUTO, RUNTIME_NAMES, RUNTIMES, default_runtime, resolve_runtime
from samestyle.models.train.metrics import retrieval_metrics
from samestyle.topics.errors import ConfigError

#: compile is left to the bench: compiling even a tiny model takes a minute on these CPUs.
FAST_RUNTIMES = [name for name in RUNTIMES if name != "compile"]
TOLERANCE = 0.005


def test_names_and_resolution() -> None:
    assert RUNTIME_NAMES[0] == AUTO and set(RUNTIME_NAMES[1:]) == set(RUNTIMES)
    assert resolve_runtime(None, "cpu").name == "eager"
    assert resolve_runtime(AUTO, "cpu").name == default_runtime("cpu")
    assert default_runtime("cuda") == "eager"  # no GPU measurement exists yet
    assert RUNTIMES["eager"].is_eager and not RUNTIMES["bf16"].is_eager
    with pytest.raises(ConfigError, match="unknown encoder runtime"):
        resolve_runtime("fp8", "cpu")
    with pytest.raises(ConfigError, match="CPU only"):
        resolve_runtime("int8", "cuda")
    with pytest.raises(ConfigError, match="unknown encoder runtime"):
        create_encoder("tiny", "cpu", allow_random_weights=True, runtime="fp8")


def test_an_encoder_without_runtimes_runs_eager_only() -> None:
    class EagerOnly(Encoder):
        def prepare(self, listing):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def embed(self, batch):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    encoder = EagerOnly()
    encoder.use_runtime(RUNTIMES["eager"])
    assert encoder.runtime.name == "eager" and not encoder.supports_runtimes
    with pytest.raises(ConfigError, match="eager float32 only"):
        encoder.use_runtime(RUNTIMES["bf16"])


def test_the_runtime_setting_is_checked() -> None:
    from samestyle.streams.settings import Settings

    assert Settings().encoder_runtime == AUTO
    assert Settings.from_env({"SAMESTYLE_ENCODER_RUNTIME": "int8"}).encoder_runtime == "int8"
    with pytest.raises(ConfigError, match="encoder_runtime"):
        Settings(encoder_runtime="onnx")


# ------------------------------------------------------------------------------ a small sample

def _image(product: int, variant: int, jitter: int = 40) -> bytes:
    """A product's photo: its own colours and mark; each variant moves them by up to ``jitter``."""
    rng = np.random.default_rng(product)
    base = rng.integers(60, 200, 3)
    mark = tuple(int(c) for c in rng.integers(0, 256, 3))
    noise = np.random.default_rng(1000 + 7 * product + variant)
    colour = tuple(int(c) for c in np.clip(base + noise.integers(-jitter, jitter + 1, 3), 0, 255))
    img = Image.new("RGB", (48, 48), colour)
    x, y = (int(v) for v in rng.integers(4, 24, 2))
    dx, dy = (int(v) for v in noise.integers(-jitter // 8, jitter // 8 + 1, 2))
    ImageDraw.Draw(img).rectangle((x + dx, y + dy, x + 16 + dx, y + 20 + dy), fill=mark)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


WORDS = ["red", "blue", "green", "steel", "oak", "glass", "mug", "lamp", "chair", "desk", "cable", "phone", "case", "bag", "shoe", "sofa", "kettle", "large", "small", "pro", "mini", "wireless", "leather", "cotton", "black", "white", "silver", "350ml", "2m", "usb-c"]


def sample(n_products: int = 300) -> tuple[list[ListingInput], list[ListingInput], np.ndarray]:
    """A gallery listing per product and a query for it: two of its four title words replaced by
    random ones, another photo. Hard enough that the random model ranks about half right."""
    rng = np.random.default_rng(7)
    gallery, queries = [], []
    for p in range(n_products):
        words = [str(w) for w in rng.choice(WORDS, size=4, replace=False)]
        gallery.append(ListingInput(f"g{p}", " ".join(words), image=_image(p, 0)))
        changed = list(words)
        for _ in range(2):
            changed[int(rng.integers(0, 4))] = str(rng.choice(WORDS))
        queries.append(ListingInput(f"q{p}", " ".join(changed), image=_image(p, 1)))
    return gallery, queries, np.arange(n_products)


@pytest.fixture(scope="module")
def retrieval_sample() -> tuple[list[ListingInput], list[ListingInput], np.ndarray]:
    return sample()


def _encode(encoder: Encoder, listings: list[ListingInput]) -> Embeddings:
    parts = [encoder.encode(listings[i:i + 32]) for i in range(0, len(listings), 32)]
    return Embeddings(*(np.concatenate([getattr(p, f) for p in parts]) for f in ("image", "text", "image_text",
                                                                                "has_image", "has_text")))


def _recall(query: Embeddings, gallery: Embeddings, products: np.ndarray) -> dict[str, float]:
    out = {}
    for name, qv, gv in (("IT->IT", "IT", "IT"), ("I->I", "I", "I"), ("T->T", "T", "T")):
        sim = query.view(qv) @ gallery.view(gv).T  # [Q, G]
        out[name] = retrieval_metrics(sim, products, products)["recall_at_10"]
    return out


@pytest.fixture(scope="module")
def finetuned_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    towers = DualTower(TowerConfig(text_backbone=TINY, image_backbone=TINY, dim=32, image_size=32,
                                   max_text_tokens=32)).eval()
    return save_finetuned(tmp_path_factory.mktemp("model") / "tiny", towers, version="tiny-finetuned-v1",
                          name="tiny")


@pytest.mark.parametrize("kind", ["concat", "finetuned"])
def test_every_runtime_keeps_recall_at_10(kind: str, finetuned_dir: Path, retrieval_sample: tuple) -> None:
    gallery, queries, products = retrieval_sample
    spec = "tiny" if kind == "concat" else str(finetuned_dir)
    reference = None
    for name in FAST_RUNTIMES:  # eager first
        encoder = create_encoder(spec, "cpu", allow_random_weights=True, runtime=name)
        assert encoder.runtime.name == name
        g, q = _encode(encoder, gallery), _encode(encoder, queries)
        for emb in (g, q):
            assert emb.image_text.dtype == np.float32
            np.testing.assert_allclose(np.linalg.norm(emb.image_text, axis=1), 1.0, atol=1e-5)
        recall = _recall(q, g, products)
        if reference is None:
            reference, vectors = recall, g.image_text
            # The sample must be informative: neither trivial nor hopeless for the random model.
            assert 0.2 < recall["IT->IT"] < 1.0, recall
            continue
        assert all(abs(recall[k] - reference[k]) <= TOLERANCE for k in reference), (name, recall, reference)
        cosine = np.sum(g.image_text * vectors, axis=1)
        assert cosine.min() > 0.99, (name, float(cosine.min()))


def test_auto_is_the_measured_default(finetuned_dir: Path) -> None:
    encoder = create_encoder(str(finetuned_dir), "cpu", allow_random_weights=True, runtime=AUTO)
    assert encoder.runtime.name == default_runtime("cpu")


@pytest.mark.parametrize("kind", ["concat", "finetuned"])
@pytest.mark.parametrize("traced, untraced", [("traced", "eager"), ("bf16-traced", "bf16")])
def test_a_traced_runtime_computes_what_its_untraced_one_does(kind: str, traced: str, untraced: str,
                                                               finetuned_dir: Path, retrieval_sample: tuple) -> None:
    # The trace is taken on two synthetic inputs; here it meets other batch sizes, texts of other
    # lengths (padded batches and a lone text), listings without a photo and without a title.
    gallery, queries, _ = retrieval_sample
    spec = "tiny" if kind == "concat" else str(finetuned_dir)
    listings = gallery[:40] + [ListingInput("photo-only", "", image=_image(1, 2)),
                               ListingInput("text-only", "a much longer title " * 6 + "usb-c cable 2m")]
    batches = [listings[:1], listings[1:8], queries[:32], listings[8:], listings[-1:]]
    a = create_encoder(spec, "cpu", allow_random_weights=True, runtime=traced)
    b = create_encoder(spec, "cpu", allow_random_weights=True, runtime=untraced)
    for batch in batches:
        x, y = a.encode(batch), b.encode(batch)
        for view in ("image", "text", "image_text"):
            np.testing.assert_allclose(getattr(x, view), getattr(y, view), atol=1e-6, err_msg=f"{view}, {len(batch)}")
        np.testing.assert_array_equal(x.has_image, y.has_image)
        np.testing.assert_array_equal(x.has_text, y.has_text)


def test_a_runtime_is_traced_or_compiled_not_both() -> None:
    from samestyle.models.runtime import Runtime

    with pytest.raises(ConfigError, match="traced or compiled"):
        Runtime("both", traced=True, compile=True)
    assert not RUNTIMES["traced"].is_eager
