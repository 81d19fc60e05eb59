"""Backbones run as TorchScript traces: one call into C++ per forward pass, the GIL given up for it.

An eager forward pass is hundreds of short torch calls, and each one gives the GIL up and waits to
get it back. Beside one thread spinning in pure Python, EfficientNet-Lite0 in bf16 took 2.41 s a
batch against 0.76 s alone, MiniLM 1.64 s against 0.21 s (``samestyle bench gil``;
bench/results/gil_lite0_bf16_traced.json). A ``torch.jit.trace`` of the same module runs its
whole graph in one call that releases the GIL: 0.67 and 0.20 s beside the busy thread. It is not
frozen: freezing folds the batch norms into bf16 convolution weights and moves the features,
while the plain trace computes what the eager module computes, kernel for kernel. In the worker
it measured no gain beyond the noise (the agents are not threads that spin:
bench/results/pipeline_traced_ab_2026-12-03/), so no default runtime is traced.

A trace records one run's operations, so it is taken on a synthetic example that takes every
branch the real inputs take: two texts, one of them padded; two images of the served size. The
graph is shape-generic in the batch and the text length (tests/unit/models/test_runtime.py
compares it with the eager module on other shapes). Tracing prints warnings that Python values
became constants (the padding checks of transformers' mask code: a mask is always given here, and
it is as long as the ids) and that TorchScript is deprecated in torch 2.13; both are silenced
around the trace only.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["TracedTextModel", "trace_image_model"]

#: The synthetic text example's shape: two rows of this many tokens, the second half-padded.
_EXAMPLE_TOKENS = 8


@contextmanager
def _tracing() -> Iterator[None]:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: "torch.jit.trace is deprecated"
        yield


class _LastHidden(nn.Module):
    """A Hugging Face encoder as a function of (ids, mask) returning its last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class TracedTextModel(nn.Module):
    """A traced Hugging Face text encoder that callers use as the model itself:
    ``model(input_ids=…, attention_mask=…).last_hidden_state`` (single-segment inputs: token type
    ids, when given, must be all zero, as a tokenizer gives them for one text)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.config = model.config
        device = next(model.parameters()).device
        ids = torch.zeros((2, _EXAMPLE_TOKENS), dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        mask[1, _EXAMPLE_TOKENS // 2:] = 0
        with _tracing():
            self.graph = torch.jit.trace(_LastHidden(model.eval()), (ids, mask), check_trace=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> _Output:
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("a traced text model takes single-segment inputs (token type ids all zero)")
        return _Output(self.graph(input_ids, attention_mask))


class _Output:
    """What callers read of a Hugging Face model's output."""

    __slots__ = ("last_hidden_state",)

    def __init__(self, last_hidden_state: torch.Tensor) -> None:
        self.last_hidden_state = last_hidden_state


def trace_image_model(model: nn.Module, image_size: int, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    """``model`` (pixels ``[B, 3, S, S]`` → features) traced on two images of ``image_size`` in
    the dtype and memory format the runtime feeds it."""
    device = next(model.parameters()).device
    example = torch.zeros((2, 3, image_size, image_size), dtype=dtype, device=device)
    if channels_last:
        example = example.contiguous(memory_format=torch.channels_last)
    with _tracing():
        return torch.jit.trace(model.eval(), example, check_trace=False)
