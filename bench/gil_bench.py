"""The backbones' forward passes beside a busy Python thread: eager against traced (images: traced and frozen too).

The worker runs its model beside agents that are Python threads. An eager forward is hundreds of
short torch calls, each giving the GIL up and waiting to get it back; a ``torch.jit.trace`` of
the backbone (the ``traced`` runtimes' form) runs as one call, and frozen as well
(``torch.jit.freeze``: weights inlined, batch norms folded into the convolutions) it computes in
fewer kernels. Each round times the three, alone and beside one thread spinning in pure Python,
alternated; the JSON has the median seconds per batch of each, their slowdowns, and the largest
absolute difference of each traced form's pooled features to eager's (quality is not measured
here: ``samestyle bench encoder`` does that for a runtime). The text backbone's transformer is
timed the same way, eager against its trace (``text`` in the JSON). A spinning thread is the worst case
for the GIL, not the worker's load: bench/results/pipeline_traced_ab_2026-12-03/ is the stream.

    .venv/bin/samestyle bench gil --json    # EfficientNet-Lite0 (batch 32 at 192 px) and MiniLM (32 texts of 48 tokens), bf16
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from bench.common import bench_parser, machine_info, median, ratio, rounded
from samestyle.models.backbones import BUNDLED_EFFICIENTNET_LITE0, BUNDLED_MINILM, build_image_backbone, build_text_backbone
from samestyle.models.encoder import EncoderConfig
from samestyle.models.runtime import RUNTIMES, Runtime
from samestyle.models.traced import TracedTextModel, trace_image_model


@contextmanager
def busy_python_thread() -> Iterator[None]:
    """One thread running pure Python (it holds the GIL whenever the interpreter lets it) for the block."""
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(50))

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def seconds_per_call(f: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return float(median(times))  # type: ignore[arg-type]


def text_forms(args: argparse.Namespace, config: EncoderConfig, runtime: Runtime) -> dict[str, object]:
    """The text backbone's transformer, eager against the ``traced`` runtimes' form, on a batch of
    ``--batch-size`` texts of ``--text-tokens`` tokens (a quarter of them half-padded)."""
    import torch

    model = runtime.text_model(build_text_backbone(args.text_backbone, config).model.eval())
    traced = TracedTextModel(model)
    ids = torch.randint(1000, 20000, (args.batch_size, args.text_tokens), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[: args.batch_size // 4, args.text_tokens // 2:] = 0
    ids = ids * mask
    with torch.no_grad():
        forms = {"eager": lambda: model(input_ids=ids, attention_mask=mask).last_hidden_state,
                 "traced": lambda: traced(input_ids=ids, attention_mask=mask).last_hidden_state}
        real = mask.unsqueeze(-1).bool()
        difference = float(((forms["traced"]().float() - forms["eager"]().float()).abs() * real).max())
        rounds = timed_rounds(forms, args)
    result: dict[str, object] = {"backbone": args.text_backbone, "tokens": args.text_tokens}
    summarise(result, rounds, forms)
    result["traced_max_abs_feature_difference"] = rounded(difference)  # over real (unpadded) tokens
    return result


def timed_rounds(forms: dict[str, Callable[[], object]], args: argparse.Namespace) -> list[dict[str, float]]:
    """Each form warmed up, then ``--rounds`` rounds timing each alone and beside a busy thread."""
    for f in forms.values():
        f()
    rounds = []
    for _ in range(args.rounds):
        row = {}
        for name, f in forms.items():
            row[f"{name}_alone_s"] = rounded(seconds_per_call(f, args.repeat))
            with busy_python_thread():
                row[f"{name}_beside_busy_thread_s"] = rounded(seconds_per_call(f, args.repeat))
        rounds.append(row)
    return rounds


def summarise(result: dict[str, object], rounds: list[dict[str, float]], forms: dict[str, object]) -> None:
    """Medians of the rounds, each form's slowdown beside the busy thread and speedup over eager
    alone, the rounds themselves."""
    for key in rounds[0]:
        result[key] = rounded(median([r[key] for r in rounds]))
    for name in forms:
        result[f"{name}_slowdown_beside_busy_thread"] = rounded(
            ratio(result[f"{name}_beside_busy_thread_s"], result[f"{name}_alone_s"]))  # type: ignore[arg-type]
        if name != "eager":
            result[f"{name}_speedup_alone"] = rounded(
                ratio(result["eager_alone_s"], result[f"{name}_alone_s"]))  # type: ignore[arg-type]
    result["rounds"] = rounds


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("gil", __doc__.splitlines()[0])
    parser.add_argument("--backbone", default=BUNDLED_EFFICIENTNET_LITE0, help="image backbone spec (tests: tiny)")
    untraced = sorted(name for name, r in RUNTIMES.items() if not (r.traced or r.compile))
    parser.add_argument("--runtime", default="bf16", choices=untraced,
                        help="how the backbones compute (an untraced runtime: the bench traces it)")
    parser.add_argument("--text-backbone", default=BUNDLED_MINILM, help="text backbone spec (tests: tiny; '' skips text)")
    parser.add_argument("--text-tokens", type=int, default=48, help="tokens per text of the timed text batch")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=4, help="timed batches of each form per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.torch_threads)
    runtime = RUNTIMES[args.runtime]
    config = EncoderConfig(name="bench-gil", text_backbone="unused", image_backbone=args.backbone, image_size=args.image_size)
    eager = runtime.image_model(build_image_backbone(args.backbone, config), args.image_size)
    pixels = runtime.pixels(torch.randn(args.batch_size, 3, args.image_size, args.image_size))
    traced = trace_image_model(eager, args.image_size, runtime.torch_dtype(), runtime.channels_last)
    with torch.no_grad():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13: TorchScript is deprecated
            frozen = torch.jit.freeze(trace_image_model(eager, args.image_size, runtime.torch_dtype(),
                                                        runtime.channels_last))
        reference = eager(pixels).float()
        traced_diff = float((traced(pixels).float() - reference).abs().max())
        max_diff = float((frozen(pixels).float() - reference).abs().max())
        forms = {"eager": lambda: eager(pixels), "traced": lambda: traced(pixels),
                 "traced_frozen": lambda: frozen(pixels)}
        rounds = timed_rounds(forms, args)  # the warm-up also builds oneDNN primitives and optimises the frozen graph
    result: dict[str, object] = {"backbone": args.backbone, "runtime": args.runtime, "image_size": args.image_size,
                                 "batch_size": args.batch_size, "torch_threads": args.torch_threads,
                                 "unit": "seconds per batch (median of rounds)"}
    summarise(result, rounds, forms)
    if args.text_backbone:
        result["text"] = text_forms(args, config, runtime)
    result["max_abs_feature_difference"] = rounded(max_diff)  # frozen against eager
    result["traced_max_abs_feature_difference"] = rounded(traced_diff)
    result["machine"] = machine_info()
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
