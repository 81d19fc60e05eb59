"""Listings/s through the whole streaming path, against the raw encoder on the same listings.

Pipeline: embedded broker, topics created, one real ``samestyle worker`` process; listings of the
demo's generated catalogue (images included) are produced, embedded, indexed, and their
similar-products messages emitted. A warm-up set goes first and is waited for (model load and
consumer-group join are excluded); the clock then runs from the first produce of the measured set
to the ``emitted_at`` of its last similar-products message.

Encoder: the same listings through ``encoder.prepare`` + ``encoder.embed`` in batches of the same
size, in this one process, while the worker idles. The machine is shared and noisy, so the two
alternate: encoder, pipeline round 1, encoder, pipeline round 2, ..., encoder (``--rounds``, each
round ``--n`` fresh listings). Both rates are pooled over their runs (listings / seconds), and
every run is reported.

    samestyle bench pipeline --json [--n 256] [--batch-size 32] [--encoder default|tiny] [--runtime auto]

``ratio = pipeline_listings_per_second / encoder_listings_per_second``; the goal is >= 0.9 (>= 0.8 with
the tiny test encoder, whose forward pass is so short that the worker's per-batch work shows).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.common import (
    Profiler,
    Stack,
    bench_parser,
    embedded_times,
    encode_listing,
    finish,
    listing_inputs,
    machine_info,
    median,
    ratio,
    rounded,
    sample_messages,
    setup_logging,
    streaming_stack,
    summarize_profile,
    time_encoder,
    wait_indexed,
    worker_environment,
)

GOAL_RATIO = 0.9
#: The goal with the tiny encoder.
GOAL_RATIO_TINY = 0.8


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("pipeline", __doc__.splitlines()[0], plot="write a PNG bar chart to PATH")
    p.add_argument("--n", type=int, default=256, help="measured listings per round (default 256)")
    p.add_argument("--rounds", type=int, default=2,
                   help="pipeline rounds, alternating with encoder runs (default 2)")
    p.add_argument("--batch-size", type=int, default=32, help="worker and encoder batch size (default 32)")
    p.add_argument("--encoder", default="default", help="encoder spec: default, tiny, a JSON config or model dir")
    p.add_argument("--runtime", default="auto",
                   help="encoder runtime of the worker and the raw encoder alike (SAMESTYLE_ENCODER_RUNTIME; default auto)")
    p.add_argument("--warmup", type=int, help="warm-up listings before the clock starts (default: 2 batches)")
    p.add_argument("--image-mode", choices=("bytes", "uri"), default="bytes",
                   help="images inline in the listings messages (bytes) or as file paths (uri)")
    p.add_argument("--torch-threads", type=int,
                   help="OMP/MKL threads of the worker and torch threads of the raw encoder (default: torch's)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the measured set")
    p.add_argument("--profile", type=Path, help="py-spy the worker during the measured window; raw stacks to PATH")
    p.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment variable of the worker process (repeatable; for experiments)")
    p.add_argument("--session-timeout", type=float, default=6.0,
                   help="the worker's consumer-group session timeout in s (a group join takes about half)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def pipeline_result(n: int, pipeline_seconds: Sequence[float], encoder_seconds: Sequence[float],
                    goal: float = GOAL_RATIO) -> dict[str, Any]:
    """Both pooled rates (``n`` listings per run) and their ratio, plus every run's rate."""
    pipeline_lps = n * len(pipeline_seconds) / sum(pipeline_seconds)
    encoder_lps = n * len(encoder_seconds) / sum(encoder_seconds)
    r = ratio(pipeline_lps, encoder_lps)
    return {
        "pipeline_listings_per_second": pipeline_lps,
        "encoder_listings_per_second": encoder_lps,
        "ratio": r,
        "pipeline_runs_listings_per_second": [n / t for t in pipeline_seconds],
        "encoder_runs_listings_per_second": [n / t for t in encoder_seconds],
        "goal_ratio": goal,
        "goal_met": r is not None and r >= goal,
    }


async def _round(stack: Stack, reader: Any, measured: list[dict[str, Any]], timeout: float,
                 profile: Path | None) -> dict[str, Any]:
    """Produce ``measured`` and time it to its last similar-products message."""
    from samestyle.streams.io.producer import send_records
    from samestyle.topics import LISTINGS

    payload = [encode_listing(m) for m in measured]  # encoded before the clock starts
    profiler = Profiler(stack.worker.pid, profile) if profile is not None else None
    t0 = time.time()
    await send_records(stack.settings, stack.specs[LISTINGS].name, payload)
    produced = time.time()
    ids = {m["listing_id"] for m in measured}
    first = await wait_indexed(stack, reader, ids, timeout=timeout)
    if profiler is not None:
        profiler.stop()
    dead = len(ids - set(first))
    if dead:
        raise RuntimeError(f"{dead} measured listings were dead-lettered; see {stack.worker.log_path}")
    t_end = max(m["emitted_at"] for m in first.values()) / 1000.0
    embedded = await embedded_times(stack, ids)
    batches = collections.Counter(embedded.values())
    emitted = collections.Counter(m["emitted_at"] for m in first.values())
    return {
        "seconds": t_end - t0,
        "produce_seconds": produced - t0,
        "last_embedded_after_seconds": (max(embedded.values()) / 1000.0 - t0) if embedded else None,
        "embed_batches": len(batches),
        "embed_batch_size_mean": len(embedded) / len(batches) if batches else None,
        "search_batches": len(emitted),
        "search_batch_size_mean": len(first) / len(emitted),
    }


async def _measure_pipeline(stack: Stack, warm: list[dict[str, Any]], rounds: list[list[dict[str, Any]]],
                            timeout: float, profile: Path | None,
                            between: Callable[[], None]) -> list[dict[str, Any]]:
    """Warm up, then each round through the pipeline followed by ``between()`` (an encoder run)."""
    from samestyle.streams.io.producer import OutputReader, send_records
    from samestyle.topics import LISTINGS

    out = []
    async with OutputReader(stack.settings, stack.specs) as reader:
        started = time.monotonic()
        await send_records(stack.settings, stack.specs[LISTINGS].name, [encode_listing(m) for m in warm])
        await wait_indexed(stack, reader, {m["listing_id"] for m in warm}, timeout=max(timeout, 300.0))
        print(f"warm-up: {len(warm)} listings indexed in {time.monotonic() - started:.1f} s "
              "(model load + group join + first batches)", file=sys.stderr)
        for i, measured in enumerate(rounds):
            stages = await _round(stack, reader, measured, timeout, profile if i == 0 else None)
            print(f"pipeline round {i + 1}: {len(measured) / stages['seconds']:.2f} listings/s", file=sys.stderr)
            out.append(stages)
            between()  # blocks the loop while the worker idles: nothing here needs to run meanwhile
    return out


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    names = ["raw encoder", "pipeline"]
    values = [result["encoder_listings_per_second"], result["pipeline_listings_per_second"]]
    bars = ax.bar(names, values, color=["#888888", "#3b75af"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("listings / s")
    ax.set_title(f"{result['encoder']} encoder, batch {result['batch_size']}, "
                 f"{result['rounds']} x {result['n']} listings: "
                 f"ratio {result['ratio']:.2f} (goal {result['goal_ratio']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.rounds < 1:
        raise SystemExit("--n, --rounds and --batch-size must be >= 1")
    setup_logging(args.verbose)
    warmup = args.warmup if args.warmup is not None else 2 * args.batch_size
    tmp = Path(tempfile.mkdtemp(prefix="samestyle-bench-pipeline-"))
    messages = sample_messages(warmup + args.rounds * args.n, tmp, image_mode=args.image_mode)
    warm = messages[:warmup]
    rounds = [messages[warmup + i * args.n:warmup + (i + 1) * args.n] for i in range(args.rounds)]
    with_images = sum(1 for r in rounds for m in r if m.get("image_bytes") or m.get("image_uri"))

    import torch

    from samestyle.models import encoder_from_spec

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    encoder = encoder_from_spec(args.encoder, allow_random_weights=args.encoder == "tiny", runtime=args.runtime)
    warm_inputs = listing_inputs(warm)
    round_inputs = [listing_inputs(r) for r in rounds]
    encoder_seconds: list[float] = []
    encoder_batches: list[float] = []

    def encoder_run() -> None:
        # The same listings as the pipeline round just run (the first run: those of round 1).
        inputs = round_inputs[max(0, len(encoder_seconds) - 1)]
        time_encoder(encoder, warm_inputs[:args.batch_size], args.batch_size)  # first pass is slower
        seconds, batches = time_encoder(encoder, inputs, args.batch_size)
        encoder_seconds.append(seconds)
        encoder_batches.extend(batches)
        print(f"raw encoder run {len(encoder_seconds)}: {len(inputs) / seconds:.2f} listings/s", file=sys.stderr)

    encoder_run()
    worker_env = worker_environment(args.worker_env, args.torch_threads)
    with streaming_stack(args.encoder, args.batch_size, run_dir=tmp, worker_env=worker_env,
                         session_timeout_seconds=args.session_timeout, encoder_runtime=args.runtime,
                         heartbeat_interval_seconds=args.session_timeout / 3) as stack:
        stages = asyncio.run(_measure_pipeline(stack, warm, rounds, args.timeout, args.profile, encoder_run))

    result = pipeline_result(args.n, [s["seconds"] for s in stages], encoder_seconds,
                             GOAL_RATIO_TINY if args.encoder == "tiny" else GOAL_RATIO)
    result["round_ratios"] = [ratio(result["pipeline_runs_listings_per_second"][i],
                                    (result["encoder_runs_listings_per_second"][i]
                                     + result["encoder_runs_listings_per_second"][i + 1]) / 2)
                              for i in range(args.rounds)]
    result.update({
        "n": args.n,
        "rounds": args.rounds,
        "batch_size": args.batch_size,
        "encoder": args.encoder,
        "encoder_version": encoder.version,
        "encoder_runtime": encoder.runtime.name,
        "encoder_batch_seconds_median": median(encoder_batches),
        "warmup": warmup,
        "listings_with_images": with_images,
        "image_mode": args.image_mode,
        "torch_threads": args.torch_threads or torch.get_num_threads(),
        "worker_env": worker_env or {},
        "stages": [{k: (rounded(v) if isinstance(v, float) else v) for k, v in st.items()} for st in stages],
        "machine": machine_info(),
        "run_dir": str(tmp),
    })
    if args.profile is not None and args.profile.exists():
        result["profile"] = summarize_profile(args.profile)
        result["profile_path"] = str(args.profile)
    for key in ("encoder_batch_seconds_median", "pipeline_runs_listings_per_second",
                "encoder_runs_listings_per_second", "round_ratios"):
        value = result[key]
        result[key] = [rounded(v) for v in value] if isinstance(value, list) else rounded(value)
    return finish(result, args, _plot)


if __name__ == "__main__":
    sys.exit(main())
