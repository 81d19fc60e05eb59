"""How an encoder's forward pass runs: the inference runtime, chosen per device by measurement.

A :class:`Runtime` is data: the backbones' compute dtype, channels-last memory for the image
backbone, dynamic int8 linear layers in the text backbone, ``torch.compile``. It changes how the
two backbones compute and nothing after them: the pooled features are cast back to float32
before the projection heads, the fusion and the normalisation, so every runtime emits float32
unit vectors of the same model. :data:`RUNTIMES` names them; ``auto`` is
:func:`default_runtime` of the device.

The choice is measured (``samestyle bench encoder``: listings/s of the served model per runtime,
alternated in one run, and recall@10 on held-out products against eager float32;
bench/results/encoder.json). On this project's CPU (Xeon with AMX and AVX512-BF16, 2 shared
cores, one torch thread) ``bf16`` ran the Abt-Buy text model 3.2x and the Grocery image model
2.9x faster than eager, recall@10 unchanged on Abt-Buy and one Grocery query of 296 moved
(I->I -0.0034); dynamic int8 was 1.7x on text but moved the vectors much further (min cosine to
float32 0.86, recall -0.003) and gained nothing on images; channels-last alone 1.0-1.2x;
``torch.compile`` 1.1-1.2x after a minute of compiling (bench/results/encoder_compile.json). A
CPU without native bf16 emulates it slowly, so ``auto`` is eager there, and on CUDA too until a
GPU run measures the others. ``traced`` and ``bf16-traced`` run the same kernels as ``eager`` and
``bf16`` as one TorchScript call that gives the GIL up (:mod:`samestyle.models.traced`): the
same vectors to the last bit (bench/results/encoder_traced.json), 1.05-1.1x on text alone, and
no gain in the stream beyond the noise (the pipeline ratio alternated against ``bf16``:
bench/results/pipeline_traced_ab_2026-12-03/), so ``auto`` stays untraced.

This module imports torch only when a runtime is applied, so settings can name runtimes cheaply.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from samestyle.topics.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

__all__ = ["AUTO", "RUNTIMES", "RUNTIME_NAMES", "Runtime", "default_runtime", "native_bf16", "resolve_runtime"]

#: The runtime name that means "the measured default of the device" (:func:`default_runtime`).
AUTO = "auto"


@dataclass(frozen=True)
class Runtime:
    """One way to run the backbones. ``dtype`` is their compute dtype (``"float32"`` or
    ``"bfloat16"``); ``channels_last`` stores the image backbone's activations NHWC (what oneDNN's
    convolutions prefer); ``int8_linear`` swaps the text backbone's ``nn.Linear`` layers for
    dynamically quantised int8 ones (CPU only); ``compile`` wraps both backbones in
    ``torch.compile`` (the first batches of each shape compile, which takes minutes on CPU);
    ``traced`` runs both backbones as TorchScript traces (:mod:`samestyle.models.traced`: the
    same kernels as the eager module, in one call that gives the GIL up for the whole pass)."""

    name: str
    dtype: str = "float32"
    channels_last: bool = False
    int8_linear: bool = False
    compile: bool = False
    traced: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"runtime {self.name!r}: dtype must be 'float32' or 'bfloat16', not {self.dtype!r}")
        if self.traced and self.compile:
            raise ConfigError(f"runtime {self.name!r}: a backbone is either traced or compiled, not both")

    @property
    def is_eager(self) -> bool:
        """Whether this runtime leaves the backbones exactly as they are (float32, as trained)."""
        return not (self.dtype != "float32" or self.channels_last or self.int8_linear or self.compile or self.traced)

    def torch_dtype(self) -> torch.dtype:
        import torch

        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    def check_device(self, device: str) -> None:
        if self.int8_linear and not device.startswith("cpu"):
            raise ConfigError(f"runtime {self.name!r} (dynamic int8) runs on the CPU only, not on {device!r}")

    def text_model(self, model: nn.Module) -> nn.Module:
        """The text backbone's transformer converted for this runtime (``model`` itself may change)."""
        if self.int8_linear:
            import torch
            from torch import nn

            with warnings.catch_warnings():
                # torch.ao.quantization announces its move to torchao on every call; the eager
                # dynamic quantisation it does is what is measured here.
                warnings.simplefilter("ignore", DeprecationWarning)
                warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
                from torch.ao.quantization import quantize_dynamic

                model = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        elif self.dtype != "float32":
            model = model.to(self.torch_dtype())
        if self.traced:
            from samestyle.models.traced import TracedTextModel

            return TracedTextModel(model)
        return self._compiled(model)

    def image_model(self, model: nn.Module, image_size: int) -> nn.Module:
        """The image backbone, which takes ``[B, 3, image_size, image_size]`` pixels, converted for
        this runtime (``model`` itself may change)."""
        import torch

        if self.dtype != "float32":
            model = model.to(self.torch_dtype())
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.traced:
            from samestyle.models.traced import trace_image_model

            return trace_image_model(model, image_size, self.torch_dtype(), self.channels_last)
        return self._compiled(model)

    def pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[B, 3, S, S]`` float32 pixels in the dtype and memory format the image backbone takes."""
        import torch

        if self.dtype != "float32":
            pixels = pixels.to(self.torch_dtype())
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        return pixels

    def _compiled(self, model: nn.Module) -> nn.Module:
        if not self.compile:
            return model
        import torch

        # Text lengths and batch sizes vary from batch to batch: one dynamic graph, not one per shape.
        return torch.compile(model, dynamic=True)  # type: ignore[return-value]


RUNTIMES: Mapping[str, Runtime] = {
    "eager": Runtime("eager"),
    "channels-last": Runtime("channels-last", channels_last=True),
    "bf16": Runtime("bf16", dtype="bfloat16", channels_last=True),
    "int8": Runtime("int8", int8_linear=True, channels_last=True),
    "compile": Runtime("compile", compile=True),
    "traced": Runtime("traced", traced=True),
    "bf16-traced": Runtime("bf16-traced", dtype="bfloat16", channels_last=True, traced=True),
}
#: Every name ``SAMESTYLE_ENCODER_RUNTIME`` accepts.
RUNTIME_NAMES: tuple[str, ...] = (AUTO, *RUNTIMES)


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AMX or AVX512-BF16, as oneDNN reports it)."""
    import torch

    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN's bf16 query
        return False


def default_runtime(device: str) -> str:
    """The measured default of ``device``: ``bf16`` on a CPU with native bf16, else ``eager``
    (CUDA included: no GPU measurement exists yet)."""
    if device.startswith("cpu") and native_bf16():
        return "bf16"
    return "eager"


def resolve_runtime(name: str | None, device: str) -> Runtime:
    """The runtime ``name`` names on ``device`` (None: eager; ``auto``: :func:`default_runtime`).

    Raises:
        ConfigError: an unknown name, or a runtime the device cannot run.
    """
    if name is None:
        name = "eager"
    if name == AUTO:
        name = default_runtime(device)
    runtime = RUNTIMES.get(name)
    if runtime is None:
        raise ConfigError(f"unknown encoder runtime {name!r}; known: {list(RUNTIME_NAMES)}")
    runtime.check_device(device)
    return runtime
