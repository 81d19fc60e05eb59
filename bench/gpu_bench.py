"""The served model and the exact search on a CUDA GPU: encoder listings/s per precision and batch
size, and flat search of 32-query batches over 1M x 256 on the GPU against the CPU.

    samestyle bench gpu --json [--encoder runs/models/NAME] [--batch-sizes 32,64,128,256,512]
        [--precisions fp32,fp16,bf16] [--n 1000000] [--dim 256] [--query-batch 32] > gpu.json
    samestyle bench gpu --dry-run --json --encoder tiny     # CPU smoke run, tiny sizes, no CUDA

Encoder (``--encoder``: the served model directory; default: the bundled pretrained encoder):
``--listings`` listings of the generated catalogue (images included) are prepared once on the CPU
(``prepare_listings_per_second``: the embed agent's decode + preprocessing, one thread); then, per
precision (fp32; fp16 and bf16 under ``torch.autocast``) and batch size, ``--rounds`` timed
forward passes (``encoder.embed``, synchronised) after ``--warmup`` untimed ones. listings/s from
the median pass; quality as the cosine of each image+text vector to the fp32 one of the same
listing; the peak GPU memory of the pass.

Search (``--n`` random unit vectors, ``--query-batch`` random unit queries, top ``--k``), medians
of ``--repeat`` batches after one warm-up: faiss-gpu ``GpuIndexFlatIP`` when the installed faiss
has GPU support (``make install GPU=1``), else recorded as skipped; torch ``mm`` + ``topk`` on the
GPU in fp32 and fp16 (always; ids compared with the exact ones); on the CPU, the flat index's
search (``samestyle.index_store.exact``) and faiss-cpu ``knn`` with faiss's settings. Queries go
to the GPU and results come back inside each timed batch, as a worker would use them.

``--pipeline`` also runs ``samestyle bench pipeline`` (embedded broker and one worker on this
machine, the worker on the GPU) with the same encoder and puts its JSON under ``pipeline``.

Without CUDA the script exits with status 2 and says so; ``--dry-run`` runs every step on the CPU
with tiny sizes (the unit test's smoke run), so a GPU session only has to run it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    bench_parser,
    finish,
    listing_inputs,
    machine_info,
    median,
    positive_int_list,
    rounded_tree,
    sample_messages,
    setup_logging,
)

PRECISIONS = ("fp32", "fp16", "bf16")
#: What a full run uses, and what --dry-run uses instead (an explicit flag wins in both).
FULL = {"listings": 512, "batch_sizes": [32, 64, 128, 256, 512], "n": 1_000_000, "dim": 256,
        "rounds": 5, "warmup": 2, "repeat": 20}
DRY = {"listings": 6, "batch_sizes": [2, 4], "n": 3000, "dim": 32, "rounds": 2, "warmup": 1, "repeat": 2}


def precision_list(text: str) -> list[str]:
    """argparse type: ``"fp32,bf16"`` -> ``["fp32", "bf16"]`` (each one of PRECISIONS)."""
    values = [v.strip() for v in text.split(",") if v.strip()]
    bad = [v for v in values if v not in PRECISIONS]
    if not values or bad:
        raise ValueError(f"expected a comma-separated subset of {','.join(PRECISIONS)}, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("gpu", __doc__.splitlines()[0], plot="write a PNG (listings/s per batch size) to PATH")
    p.add_argument("--encoder", default="default",
                   help="the served model: a model directory, a JSON config, 'default' (the bundled "
                        "pretrained encoder, the default) or 'tiny' (random weights, smoke runs)")
    p.add_argument("--dry-run", action="store_true",
                   help="run every step on the CPU with tiny sizes (no CUDA needed; for tests)")
    p.add_argument("--precisions", type=precision_list, default=list(PRECISIONS),
                   help="encoder precisions (default fp32,fp16,bf16)")
    p.add_argument("--batch-sizes", type=positive_int_list, help=f"encoder batch sizes (default {FULL['batch_sizes']})")
    p.add_argument("--listings", type=int, help=f"distinct catalogue listings, reused to fill a batch (default {FULL['listings']})")
    p.add_argument("--rounds", type=int, help=f"timed forward passes per precision and batch size (default {FULL['rounds']})")
    p.add_argument("--warmup", type=int, help=f"untimed passes first (default {FULL['warmup']})")
    p.add_argument("--n", type=int, help=f"vectors searched (default {FULL['n']:,})")
    p.add_argument("--dim", type=int, help=f"vector dimension (default {FULL['dim']})")
    p.add_argument("--query-batch", type=int, default=32, help="queries per search (default 32, the index agent's batch)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--repeat", type=int, help=f"timed search batches per method (default {FULL['repeat']})")
    p.add_argument("--pipeline", action="store_true",
                   help="also run the pipeline bench (embedded broker + worker here) with this encoder")
    p.add_argument("--pipeline-args", default="--n 512 --batch-size 32 --rounds 2",
                   help="arguments of the pipeline bench (default '--n 512 --batch-size 32 --rounds 2')")
    p.add_argument("--skip-encoder", action="store_true", help="search part only")
    p.add_argument("--skip-search", action="store_true", help="encoder part only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _settle(args: argparse.Namespace) -> None:
    """Fill the size flags left unset from FULL or DRY, then check them."""
    for name, value in (DRY if args.dry_run else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("listings", "rounds", "n", "dim", "query_batch", "k", "repeat"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must be >= 0")


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: str, times: int) -> list[float]:
    out = []
    for _ in range(times):
        _synchronize(device)
        t0 = time.perf_counter()
        fn()
        _synchronize(device)
        out.append(time.perf_counter() - t0)
    return out


# ------------------------------------------------------------------------------------ encoder


def _autocast(precision: str, device: str) -> Any:
    import torch

    if precision == "fp32":
        return nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def encoder_part(args: argparse.Namespace, device: str) -> dict[str, Any]:
    import torch

    from samestyle.models import encoder_from_spec

    t0 = time.perf_counter()
    encoder = encoder_from_spec(args.encoder, device, allow_random_weights=args.encoder == "tiny")
    load_seconds = time.perf_counter() - t0
    with tempfile.TemporaryDirectory(prefix="samestyle-gpu-bench-") as tmp:
        inputs = listing_inputs(sample_messages(args.listings, Path(tmp), image_mode="bytes"))
    t0 = time.perf_counter()
    prepared = [encoder.prepare(x) for x in inputs]
    prepare_seconds = time.perf_counter() - t0
    with_images = sum(x.image is not None for x in inputs)
    _log(f"encoder {encoder.version} on {device}: {len(prepared)} listings prepared in {prepare_seconds:.2f} s")

    runs = []
    for batch_size in args.batch_sizes:
        batch = [prepared[i % len(prepared)] for i in range(batch_size)]
        reference = encoder.embed(batch).image_text  # [batch, dim] fp32, unit rows
        for precision in args.precisions:
            row: dict[str, Any] = {"precision": precision, "batch_size": batch_size}
            try:
                with _autocast(precision, device):
                    for _ in range(args.warmup):
                        encoder.embed(batch)
                    if device.startswith("cuda"):
                        torch.cuda.reset_peak_memory_stats()
                    seconds = median(_timed(lambda b=batch: encoder.embed(b), device, args.rounds))
                    vectors = encoder.embed(batch).image_text
            except (RuntimeError, TypeError, ValueError) as e:  # a precision the device lacks
                row["error"] = f"{type(e).__name__}: {e}"
                runs.append(row)
                _log(f"  {precision} batch {batch_size}: failed: {row['error']}")
                continue
            assert seconds is not None
            cosine = np.sum(vectors * reference, axis=1)
            row.update({
                "seconds_per_batch": seconds,
                "listings_per_second": batch_size / seconds,
                "cosine_to_fp32_min": float(cosine.min()),
                "cosine_to_fp32_mean": float(cosine.mean()),
                "peak_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
            })
            runs.append(row)
            _log(f"  {precision} batch {batch_size}: {row['listings_per_second']:.1f} listings/s, "
                 f"cosine to fp32 >= {row['cosine_to_fp32_min']:.4f}")
    ok = [r for r in runs if "error" not in r]
    best = max(ok, key=lambda r: r["listings_per_second"]) if ok else None
    return {
        "encoder": args.encoder,
        "encoder_version": encoder.version,
        "encoder_dim": encoder.dim,
        "encoder_load_seconds": load_seconds,
        "listings": len(inputs),
        "listings_with_images": with_images,
        "prepare_listings_per_second": len(prepared) / prepare_seconds,
        "encoder_runs": runs,
        "best_encoder_run": best,
    }


# ------------------------------------------------------------------------------------- search


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _agreement(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids that ``found`` holds."""
    k = truth.shape[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def search_methods(matrix: np.ndarray, queries: np.ndarray, k: int, device: str,
                   faiss: Any) -> dict[str, tuple[Callable[[], np.ndarray], str | None]]:
    """name -> (one search returning the ids ``[nq, k]``, or None with the reason it is skipped)."""
    import torch

    from samestyle.index_store.exact import Scratch, top_k_inner_product

    scratch = Scratch()
    methods: dict[str, Any] = {
        "cpu_flat_index": (lambda: top_k_inner_product(queries, matrix, k, scratch=scratch)[1], None),
    }
    if faiss is None:
        methods["cpu_faiss_knn"] = (None, "faiss is not installed")
    else:
        methods["cpu_faiss_knn"] = (
            lambda: faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT)[1], None)
    gpus = faiss.get_num_gpus() if faiss is not None and hasattr(faiss, "get_num_gpus") else 0
    if not device.startswith("cuda"):
        methods["gpu_faiss_flat"] = (None, "no CUDA device (dry run)")
    elif faiss is None or not hasattr(faiss, "StandardGpuResources") or gpus == 0:
        methods["gpu_faiss_flat"] = (None, "the installed faiss has no GPU support (faiss-gpu-cu12: make install GPU=1)")
    else:
        resources = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(resources, matrix.shape[1])
        index.add(matrix)
        methods["gpu_faiss_flat"] = (lambda: index.search(queries, k)[1], None)
    for name, dtype in (("gpu_torch_fp32", torch.float32), ("gpu_torch_fp16", torch.float16)):
        on_device = torch.from_numpy(matrix).to(device=device, dtype=dtype)  # [n, dim]

        def search(on_device: Any = on_device, dtype: Any = dtype) -> np.ndarray:
            q = torch.from_numpy(queries).to(device=device, dtype=dtype)  # [nq, dim]
            return torch.topk(q @ on_device.T, k, dim=1).indices.cpu().numpy()

        methods[name] = (search, None)
    return methods


def search_part(args: argparse.Namespace, device: str, rng: np.random.Generator) -> dict[str, Any]:
    faiss = _faiss()
    matrix = _unit_rows(rng, args.n, args.dim)
    queries = _unit_rows(rng, args.query_batch, args.dim)
    k = min(args.k, args.n)
    _log(f"search: {args.n:,} x {args.dim}, {args.query_batch} queries, k={k}, on {device}")
    from samestyle.index_store.exact import top_k_inner_product

    truth = top_k_inner_product(queries, matrix, k)[1]
    flop = 2 * args.query_batch * args.n * args.dim
    out: dict[str, Any] = {}
    for name, (search, skipped) in search_methods(matrix, queries, k, device, faiss).items():
        if search is None:
            out[name] = {"skipped": skipped}
            _log(f"  {name}: skipped ({skipped})")
            continue
        ids = search()  # warm-up; also the ids compared with the exact ones
        seconds = median(_timed(search, device if name.startswith("gpu") else "cpu", args.repeat))
        assert seconds is not None
        out[name] = {"seconds_per_batch": seconds, "queries_per_second": args.query_batch / seconds,
                     "gflops": flop / seconds / 1e9, "agreement_with_exact": _agreement(np.asarray(ids), truth)}
        _log(f"  {name}: {seconds * 1000:.2f} ms per batch, agreement {out[name]['agreement_with_exact']:.3f}")
    cpu = out["cpu_flat_index"]["seconds_per_batch"]
    for row in out.values():
        if "seconds_per_batch" in row:
            row["speedup_over_cpu_flat_index"] = cpu / row["seconds_per_batch"]
    return {"n": args.n, "dim": args.dim, "query_batch": args.query_batch, "k": k,
            "faiss": getattr(faiss, "__version__", None), "methods": out}


# ----------------------------------------------------------------------------------- pipeline


def pipeline_part(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """``bench.pipeline_bench`` in a child process (its own broker and worker), its JSON or why not."""
    command = [sys.executable, "-m", "bench.pipeline_bench", "--json", "--encoder", args.encoder,
               *shlex.split(args.pipeline_args)]
    env = {**os.environ, "SAMESTYLE_DEVICE": device}
    _log(f"pipeline: {' '.join(command)}")
    done = subprocess.run(command, capture_output=True, text=True, env=env,
                          cwd=Path(__file__).resolve().parent.parent, check=False)
    if done.returncode != 0:
        return {"command": command, "error": f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"}
    return {"command": command, **json.loads(done.stdout)}


# ------------------------------------------------------------------------------------- output


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    runs = [r for r in result.get("encoder_runs", []) if "error" not in r]
    for precision in PRECISIONS:
        rows = [r for r in runs if r["precision"] == precision]
        if rows:
            ax.plot([r["batch_size"] for r in rows], [r["listings_per_second"] for r in rows], "o-", label=precision)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("listings / s (forward pass)")
    ax.set_title(f"{result.get('encoder_version', '?')} on {result['device_name']}", fontsize=9)
    if runs:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _settle(args)
    setup_logging(args.verbose)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(f"samestyle bench gpu: CUDA is not available (torch {torch.__version__}, built for CUDA "
              f"{torch.version.cuda or 'none'}): run it on a machine with an NVIDIA GPU and a CUDA build of "
              "torch, or pass --dry-run for a CPU smoke run.", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": device,
        "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (dry run)",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    if not args.skip_encoder:
        result.update(encoder_part(args, device))
    if not args.skip_search:
        result["search"] = search_part(args, device, np.random.default_rng(args.seed))
    if args.pipeline:
        result["pipeline"] = pipeline_part(args, device)
    result["machine"] = machine_info()
    return finish(rounded_tree(result), args, _plot)


if __name__ == "__main__":
    sys.exit(main())
