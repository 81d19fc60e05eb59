"""One factory builds an encoder from a named config, a JSON file or a model directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from samestyle.models.encoder import (
    ALLOW_RANDOM_WEIGHTS_ENV,
    Encoder,
    EncoderConfig,
    load_config,
    random_weights_allowed,
)
from samestyle.models.finetuned import FUSION as FINETUNED
from samestyle.models.finetuned import load_finetuned
from samestyle.models.pretrained import ConcatEncoder
from samestyle.models.runtime import AUTO, RUNTIME_NAMES, resolve_runtime
from samestyle.models.unified import load_unified_model
from samestyle.topics.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["ENCODER_BUILDERS", "create_encoder", "encoder_from_spec", "resolve_device"]


# Fusion name → builder of an encoder from (config, device); a trained model directory
# (fusion "unified") loads through load_unified_model instead.
EncoderBuilder = Callable[[EncoderConfig, str], Encoder]
ENCODER_BUILDERS: dict[str, EncoderBuilder] = {ConcatEncoder.fusion_name: ConcatEncoder.from_config}


def resolve_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"bad device {device!r}: {exc}") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return str(parsed)


def create_encoder(
    config: EncoderConfig | str | Mapping[str, Any],
    device: str | None = None,
    *,
    allow_random_weights: bool = False,
    runtime: str | None = None,
) -> Encoder:
    """Build an encoder from a config, a config name / JSON path / model directory, or a dict.

    ``device`` defaults to CUDA when available. Models are in eval mode. ``runtime`` names how
    the backbones compute (:data:`samestyle.models.runtime.RUNTIMES`): None is eager float32,
    ``"auto"`` the device's measured default (eager for an encoder that supports no other).

    Raises:
        ConfigError: a bad config, an unavailable device, an unknown runtime or one the device
            or encoder cannot run, or random backbones without ``allow_random_weights=True``
            (or ``SAMESTYLE_ALLOW_RANDOM_WEIGHTS=1``).
        MissingWeightsError: pretrained weights are not installed; names the package.
    """
    if runtime is not None and runtime not in RUNTIME_NAMES:
        raise ConfigError(f"unknown encoder runtime {runtime!r}; known: {list(RUNTIME_NAMES)}")
    encoder = _build(config, device, allow_random_weights)
    if runtime is not None:
        name = runtime if runtime != AUTO or encoder.supports_runtimes else "eager"
        chosen = resolve_runtime(name, encoder.device)
        encoder.use_runtime(chosen)
        logger.info("encoder %s runs with runtime %s%s", encoder.version, chosen.name,
                    " (auto)" if runtime == AUTO else "")
    return encoder


def _build(config: EncoderConfig | str | Mapping[str, Any], device: str | None,
           allow_random_weights: bool) -> Encoder:
    if isinstance(config, EncoderConfig):
        cfg = config
    elif isinstance(config, (str, Path)):
        cfg = load_config(config)
        if cfg.fusion == FINETUNED and Path(config).expanduser().is_dir():
            return load_finetuned(Path(config).expanduser(), resolve_device(device),
                                  allow_random_weights=allow_random_weights)
        if cfg.fusion == "unified" and Path(config).expanduser().is_dir():
            return load_unified_model(Path(config).expanduser(), resolve_device(device),
                                      allow_random_weights=allow_random_weights)
    elif isinstance(config, Mapping):
        cfg = EncoderConfig.from_dict(config)
    else:
        raise ConfigError(f"cannot build an encoder from {type(config).__name__}")
    if cfg.uses_random_weights:
        if not random_weights_allowed(allow_random_weights):
            raise ConfigError(
                f"encoder config {cfg.name!r} uses random weights (text={cfg.text_backbone!r}, "
                f"image={cfg.image_backbone!r}); pass allow_random_weights=True or set "
                f"{ALLOW_RANDOM_WEIGHTS_ENV}=1, in tests only"
            )
        logger.warning(
            "ENCODER %r HAS RANDOM WEIGHTS: its vectors mean nothing; use it for tests only",
            cfg.name,
        )
    builder = ENCODER_BUILDERS.get(cfg.fusion)
    if builder is None:
        raise ConfigError(f"unknown fusion {cfg.fusion!r}; known: {sorted(ENCODER_BUILDERS)}")
    resolved = resolve_device(device)
    started = time.perf_counter()
    encoder = builder(cfg, resolved)
    logger.info(
        "encoder %s loaded (version %s, dim %d, device %s) in %.2fs",
        cfg.name,
        encoder.version,
        encoder.dim,
        resolved,
        time.perf_counter() - started,
    )
    return encoder


def encoder_from_spec(
    spec: str, device: str | None = None, *, allow_random_weights: bool = False, runtime: str | None = None
) -> Encoder:
    """Build an encoder from a command-line spec: ``default``, ``tiny``, a JSON config file, or
    a model directory (holding ``encoder.json``; otherwise ConfigError); ``runtime`` as
    :func:`create_encoder` takes it."""
    return create_encoder(spec, device, allow_random_weights=allow_random_weights, runtime=runtime)
