"""The live index against this machine: exact scan vs memory bandwidth, approximate recall and speed.

* Memory bandwidth, measured in the same run: read (``numpy`` sum over a large float32 array,
  one thread per core, best of ``--repeat``) and copy (read + write bytes counted).
* Exact search (``LiveIndex(kind="flat")``, ``--n`` random unit vectors): GB/s of vectors
  scanned = ``n * dim * 4`` bytes per query batch / seconds (median of ``--repeat``), all cores;
  ``bandwidth_ratio = exact_scan_gbps / memory_gbps``. Also add and delete throughput.
* Exact search against the matrix product, at ``--query-batch`` (the index agent's 32): rounds
  alternating the search, numpy's sgemm of the same shapes (``queries @ vectors.T`` and
  ``vectors @ queries.T`` into preallocated outputs; the faster of the two each round) and
  ``faiss.knn`` twice: with faiss's own settings (what the flat search called before) and forced
  onto its BLAS path with large blocks (the alternative to ``index_store/exact.py``). GFLOP/s =
  ``2 * nq * n * dim`` / median seconds; ``sgemm_ratio = search_gflops / sgemm_gflops``; the
  thread counts are the process defaults (a worker sets none). ``--gallery-blocks`` sweeps the
  rows per GEMM of the search the same way.
* Approximate search (``LiveIndex(kind="hnsw")``) on ``--approx-n`` *clustered* vectors (unit
  Gaussian blobs, see :func:`clustered`): recall@10 against exact search on the same vectors
  and queries/s on one core (FAISS limited to one thread), for ``--ef-search`` and a sweep.
  ``--ivf`` adds a FAISS IVF-Flat sweep for comparison (not a LiveIndex kind).
* Compact vectors (``--vectors float16,sq8``), each form against float32 in the same run:
  recall@10 against exact float32 search on *real* embeddings (all-MiniLM-L6-v2 over the titles
  and descriptions of every catalogue under ``--catalogue``, reduced to ``--dim`` by PCA and
  normalised, as a ``--dim`` model's vectors would be; each query is a catalogue listing searched
  with itself excluded, as the index agent does), the search time of ``--query-batch`` queries on
  the ``--n`` vectors of the exact part (same rounds as float32), and memory per listing: the RSS
  growth of a fresh process that indexes ``--rss-n`` listings with three views (``--image-share``
  of them with an image, the others with none and a text view equal to the image+text one, as
  text-only listings have) and payloads shaped like the worker's, against the vector bytes alone.

    samestyle bench index --n 1000000 --dim 256 --json [--approx-n 100000] [--plot index.png]
    samestyle bench index --n 1000000 --dim 256 --skip-approx --vectors float16,sq8 --json

Goals: exact >= 0.7 of memory bandwidth and >= 0.7 of the sgemm's GFLOP/s; approximate recall@10
>= 0.95 at >= 1,000 q/s per core; compact: >= 10 million listings of a 256-dimension model per
24 GB (1e9 bytes) at recall@10 >= 0.99 against exact float32.
"""

from __future__ import annotations

import argparse
import csv
import gc
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    bench_parser,
    finish,
    machine_info,
    median,
    positive_int_list,
    ratio,
    rounded_tree,
    setup_logging,
)

GOAL_BANDWIDTH_RATIO = 0.7
GOAL_SGEMM_RATIO = 0.7
GOAL_RECALL = 0.95
GOAL_QPS_PER_CORE = 1000.0
GOAL_COMPACT_RECALL = 0.99
GOAL_COMPACT_LISTINGS = 10_000_000
GOAL_WORKER_BYTES = 24e9
COMPACT_FORMS = ("float16", "sq8")


def forms_list(text: str) -> list[str]:
    """argparse type: ``"float16,sq8"`` -> ``["float16", "sq8"]`` (compact forms only)."""
    forms = [f.strip() for f in text.split(",") if f.strip()]
    if not forms or any(f not in COMPACT_FORMS for f in forms):
        raise ValueError(f"expected a comma-separated list of {', '.join(COMPACT_FORMS)}, got {text!r}")
    return list(dict.fromkeys(forms))


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("index", __doc__.splitlines()[0], plot="write a PNG to PATH")
    p.add_argument("--n", type=int, default=1_000_000, help="vectors in the exact index (default 1,000,000)")
    p.add_argument("--dim", type=int, default=256, help="vector dimension (default 256)")
    p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
    p.add_argument("--query-batch", type=int, default=32,
                   help="queries per exact search call (default 32, the index agent's batch)")
    p.add_argument("--query-batches", type=positive_int_list, default=[1, 8, 32, 128],
                   help="query batch sizes of the exact-scan sweep (default 1,8,32,128)")
    p.add_argument("--gallery-blocks", type=positive_int_list, default=[16384, 65536, 262144, 1048576],
                   help="gallery rows per GEMM of the exact search to sweep at --query-batch, against "
                        "the sgemm (default 16384,65536,262144,1048576; the search's own: 2**23 / batch)")
    p.add_argument("--add-batch", type=int, default=1000, help="vectors per upsert call (default 1000)")
    p.add_argument("--delete-n", type=int, default=20_000, help="listings deleted to time deletes (default 20,000)")
    p.add_argument("--memory-mb", type=int, default=1024, help="array size of the bandwidth test (default 1024)")
    p.add_argument("--approx-n", type=int, default=100_000,
                   help="vectors in the approximate index (default 100,000: an HNSW build of 1M x 256 "
                        "takes far longer than the exact part on 2 cores)")
    p.add_argument("--approx-queries", type=int, default=2000, help="queries for recall and q/s (default 2000)")
    p.add_argument("--clusters", type=int, help="Gaussian blobs in the approximate data (default approx-n / 100)")
    p.add_argument("--noise", type=float, default=0.8,
                   help="blob spread: norm of a point's offset from its unit centre (default 0.8)")
    p.add_argument("--hnsw-m", type=int, default=32, help="HNSW M (default 32, LiveIndex's)")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW efConstruction (default 200)")
    p.add_argument("--ef-search", type=int, default=128, help="HNSW efSearch of the headline numbers (default 128)")
    p.add_argument("--ef-sweep", type=positive_int_list, default=[16, 32, 64, 128, 256],
                   help="efSearch values of the sweep (default 16,32,64,128,256)")
    p.add_argument("--ivf", action="store_true", help="also sweep FAISS IVF-Flat nprobe on the approximate data")
    p.add_argument("--skip-approx", action="store_true", help="exact part only")
    p.add_argument("--vectors", type=forms_list, default=[],
                   help="compact vector forms to measure against float32 (float16,sq8; default none)")
    p.add_argument("--catalogue", type=Path, default=Path("../shared/data"),
                   help="folder searched for listings.csv files whose texts are embedded for the recall "
                        "of the compact forms (default ../shared/data)")
    p.add_argument("--catalogue-cache", type=Path,
                   help=".npy of the catalogue's MiniLM embeddings: read if it exists, else written")
    p.add_argument("--compact-queries", type=int, default=2000,
                   help="catalogue listings searched for the compact forms' recall (default 2000)")
    p.add_argument("--rss-n", type=int, default=1_000_000,
                   help="listings indexed per form to measure memory per listing (default 1,000,000; 0 skips)")
    p.add_argument("--image-share", type=float, default=0.5,
                   help="share of the --rss-n listings with an image view (default 0.5)")
    p.add_argument("--repeat", type=int, default=5, help="timed repetitions (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


# ----------------------------------------------------------------------------- bandwidth


def memory_bandwidth(megabytes: int, repeat: int, threads: int) -> dict[str, float]:
    """Best GB/s (1e9 bytes) of a read (sum) with 1 and ``threads`` threads and of a copy."""
    n = megabytes * 2**20 // 4
    a = np.ones(n, dtype=np.float32)
    b = np.empty_like(a)
    chunks = np.array_split(a, threads)
    nbytes = a.nbytes

    def read_parallel(pool: ThreadPoolExecutor) -> None:
        # numpy releases the GIL inside the reduction, so the threads run on separate cores.
        list(pool.map(np.sum, chunks))

    with ThreadPoolExecutor(max_workers=threads) as pool:
        read_parallel(pool)  # first touch / warm-up
        read_n = min(_timed(lambda: read_parallel(pool), repeat))
    read_1 = min(_timed(lambda: np.sum(a), repeat))
    copy = min(_timed(lambda: np.copyto(b, a), repeat))
    return {
        "read_gbps": nbytes / read_n / 1e9,
        "read_gbps_1thread": nbytes / read_1 / 1e9,
        "copy_gbps": 2 * nbytes / copy / 1e9,
        "threads": threads,
        "array_bytes": nbytes,
    }


# --------------------------------------------------------------------------------- exact


def _ids(start: int, stop: int) -> list[str]:
    return [f"v{i:08d}" for i in range(start, stop)]


def unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """``n`` random unit vectors ``[n, dim]`` float32, like the encoders' normalised embeddings."""
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def gemm_flop(nq: int, n: int, dim: int) -> int:
    """Floating-point operations of the ``[nq, dim] x [dim, n]`` product a flat search computes."""
    return 2 * nq * n * dim


def versus_sgemm(search: Callable[[], Any], matrix: np.ndarray, queries: np.ndarray, rounds: int,
                 others: dict[str, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """Time ``search`` and numpy's sgemm of the same shapes in alternating rounds (one call each
    per round, in a new random order each round, after one warm-up each: a call right after a
    faiss call meets its OpenMP threads still spinning); ``others`` are timed in the same rounds.

    The sgemm of a round is the faster of ``queries @ matrix.T`` and ``matrix @ queries.T`` (into
    preallocated outputs, so neither pays for page faults). Rates from the median seconds.
    """
    nq, n, dim = queries.shape[0], matrix.shape[0], matrix.shape[1]
    out_qn = np.empty((nq, n), dtype=np.float32)
    out_nq = np.empty((n, nq), dtype=np.float32)
    calls: dict[str, Callable[[], Any]] = {
        "search": search,
        "sgemm_qn": lambda: np.matmul(queries, matrix.T, out=out_qn),
        "sgemm_nq": lambda: np.matmul(matrix, queries.T, out=out_nq),
        **(others or {}),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    for fn in calls.values():
        fn()
    order = np.random.default_rng(0)
    names = list(calls)
    for _ in range(rounds):
        for name in order.permutation(names).tolist():
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    sgemm = [min(a, b) for a, b in zip(times["sgemm_qn"], times["sgemm_nq"])]
    flop = gemm_flop(nq, n, dim)
    search_s, sgemm_s = median(times["search"]), median(sgemm)
    assert search_s is not None and sgemm_s is not None
    out: dict[str, Any] = {
        "query_batch": nq,
        "search_seconds": search_s,
        "sgemm_seconds": sgemm_s,
        "search_gflops": flop / search_s / 1e9,
        "sgemm_gflops": flop / sgemm_s / 1e9,
        "sgemm_ratio": sgemm_s / search_s,
        "sgemm_ratio_per_round": [g / s for g, s in zip(sgemm, times["search"])],
        "sgemm_qn_seconds": median(times["sgemm_qn"]),
        "sgemm_nq_seconds": median(times["sgemm_nq"]),
        "rounds": rounds,
    }
    for name in others or {}:
        seconds = median(times[name])
        assert seconds is not None
        out[f"{name}_seconds"] = seconds
        out[f"{name}_gflops"] = flop / seconds / 1e9
        out[f"{name}_sgemm_ratio"] = sgemm_s / seconds
    return out


def faiss_blas_knn(queries: np.ndarray, matrix: np.ndarray, k: int) -> Any:
    """``faiss.knn`` (inner product) on faiss's BLAS path with blocks of ``2**23 / nq`` gallery rows:
    the best faiss setting measured for the flat search. faiss's globals are restored."""
    import faiss

    cvar = faiss.cvar
    names = ("distance_compute_blas_threshold", "distance_compute_blas_query_bs",
             "distance_compute_blas_database_bs")
    saved = [getattr(cvar, name) for name in names]
    nq = queries.shape[0]
    for name, value in zip(names, (1, nq, max(1024, (1 << 23) // nq))):
        setattr(cvar, name, value)
    try:
        return faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT)
    finally:
        for name, value in zip(names, saved):
            setattr(cvar, name, value)


def blas_threads() -> dict[str, Any]:
    """Thread counts of the BLAS libraries loaded (numpy's and faiss's), via threadpoolctl."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return {}
    return {f"{i.get('internal_api')}:{Path(i.get('filepath', '?')).name}": i.get("num_threads")
            for i in threadpool_info()}


def exact_part(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    import faiss

    from samestyle.index_store import LiveIndex, exact

    index = LiveIndex(args.dim, "flat")
    add_seconds = 0.0
    for start in range(0, args.n, args.add_batch):
        stop = min(args.n, start + args.add_batch)
        vectors = unit_rows(rng, stop - start, args.dim)
        ids = _ids(start, stop)
        t0 = time.perf_counter()
        index.upsert(ids, vectors)
        add_seconds += time.perf_counter() - t0
    _log(f"flat: {args.n:,} added in {add_seconds:.1f} s")
    scanned = args.n * args.dim * 4

    sweep = []
    for nq in sorted(set(args.query_batches) | {args.query_batch}):
        queries = unit_rows(rng, nq, args.dim)
        index.search(queries, args.k)  # warm-up
        seconds = median(_timed(lambda: index.search(queries, args.k), args.repeat))
        assert seconds is not None
        sweep.append({"query_batch": nq, "seconds": seconds, "scan_gbps": scanned / seconds / 1e9,
                      "queries_per_second": nq / seconds})
        _log(f"flat: batch {nq}: {seconds * 1000:.1f} ms, {scanned / seconds / 1e9:.2f} GB/s scanned")
    headline = next(r for r in sweep if r["query_batch"] == args.query_batch)

    # The search against the matrix product of its shapes, and against faiss.knn: left at faiss's
    # own settings (what the flat search called before) and on faiss's BLAS path.
    matrix = index._vectors.all()  # the very array the search scans (float32: a view)
    queries = unit_rows(rng, args.query_batch, args.dim)
    k = args.k + 1  # the agent excludes the query listing itself: one more neighbour
    exclude = [f"v{i:08d}" for i in rng.integers(0, args.n, size=args.query_batch)]
    versus = versus_sgemm(
        lambda: index.search(queries, args.k, exclude=exclude), matrix, queries, args.repeat,
        {"faiss_default": lambda: faiss.knn(queries, matrix, k, metric=faiss.METRIC_INNER_PRODUCT),
         "faiss_blas": lambda: faiss_blas_knn(queries, matrix, k)})
    _log(f"flat vs sgemm, batch {args.query_batch}: search {versus['search_seconds'] * 1000:.1f} ms "
         f"({versus['search_gflops']:.1f} GFLOP/s), sgemm {versus['sgemm_seconds'] * 1000:.1f} ms "
         f"({versus['sgemm_gflops']:.1f} GFLOP/s), ratio {versus['sgemm_ratio']:.2f}; faiss defaults "
         f"{versus['faiss_default_seconds'] * 1000:.1f} ms (ratio {versus['faiss_default_sgemm_ratio']:.2f}), "
         f"faiss BLAS {versus['faiss_blas_seconds'] * 1000:.1f} ms (ratio {versus['faiss_blas_sgemm_ratio']:.2f})")
    compact = compact_timing(args, index, matrix, queries, exclude) if args.vectors else None
    gc.collect()
    blocks = []
    kept = exact.GALLERY_BLOCK_FLOATS
    try:
        for rows in args.gallery_blocks:
            exact.GALLERY_BLOCK_FLOATS = rows * args.query_batch
            row = versus_sgemm(lambda: index.search(queries, args.k, exclude=exclude), matrix, queries,
                               args.repeat)
            blocks.append({"gallery_rows": rows, **{key: row[key] for key in (
                "search_seconds", "search_gflops", "sgemm_gflops", "sgemm_ratio")}})
            _log(f"flat: gallery blocks of {rows:,} rows: ratio {row['sgemm_ratio']:.2f}")
    finally:
        exact.GALLERY_BLOCK_FLOATS = kept

    victims = rng.choice(args.n, size=min(args.delete_n, args.n), replace=False)
    victim_ids = [f"v{i:08d}" for i in victims]
    delete_seconds = 0.0
    for start in range(0, len(victim_ids), args.add_batch):
        t0 = time.perf_counter()
        index.delete(victim_ids[start:start + args.add_batch])
        delete_seconds += time.perf_counter() - t0
    return {
        "exact_scan_gbps": headline["scan_gbps"],
        "exact_query_batch_seconds": headline["seconds"],
        "exact_sweep": sweep,
        "exact_headline": versus,
        "gallery_block_sweep": blocks,
        "compact_timing": compact,
        "gallery_block_rows": max(exact.FIRST_BLOCK_ROWS, exact.GALLERY_BLOCK_FLOATS // args.query_batch),
        "add_per_second": args.n / add_seconds,
        "delete_per_second": len(victim_ids) / delete_seconds if victim_ids else None,
        "deleted": len(victim_ids),
    }


# ---------------------------------------------------------------------------- approximate


def clustered(rng: np.random.Generator, n: int, dim: int, clusters: int, noise: float) -> np.ndarray:
    """``n`` unit vectors in ``clusters`` Gaussian blobs: unit centre + offset of norm ~``noise``.

    Products of one style sit close together and far from other styles, as the encoder's
    vectors do; uniform random vectors would make every neighbour list nearly arbitrary.
    """
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    which = rng.integers(0, clusters, size=n)
    points = centres[which] + rng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return np.ascontiguousarray(points, dtype=np.float32)


def recall_at_k(found: Sequence[Sequence[int]], truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-``k`` that the approximate top-``k`` contains."""
    hits = sum(len(set(list(f)[:k]) & set(truth[q, :k].tolist())) for q, f in enumerate(found))
    return hits / (len(found) * k)


def approx_part(args: argparse.Namespace, rng: np.random.Generator) -> dict[str, Any]:
    import faiss

    from samestyle.index_store import LiveIndex

    n = args.approx_n
    clusters = args.clusters or max(1, n // 100)
    data = clustered(rng, n + args.approx_queries, args.dim, clusters, args.noise)
    base, queries = data[:n], data[n:]
    truth = faiss.knn(queries, base, args.k, metric=faiss.METRIC_INNER_PRODUCT)[1]  # [q, k]

    index = LiveIndex(args.dim, "hnsw", hnsw_m=args.hnsw_m, ef_construction=args.ef_construction,
                      ef_search=args.ef_search)
    ids = _ids(0, n)
    slot_of = {listing_id: i for i, listing_id in enumerate(ids)}
    build_batch = max(args.add_batch, 10_000)  # HNSW insertion parallelises within one call
    add_seconds = 0.0
    for start in range(0, n, build_batch):
        t0 = time.perf_counter()
        index.upsert(ids[start:start + build_batch], base[start:start + build_batch])
        add_seconds += time.perf_counter() - t0
        _log(f"hnsw: {min(n, start + build_batch):,}/{n:,} added ({add_seconds:.0f} s)")

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)  # q/s per core
    try:
        sweep = []
        for ef in sorted(set(args.ef_sweep) | {args.ef_search}):
            # LiveIndex fixes efSearch at construction; the sweep sets it on its graph directly.
            index._hnsw.hnsw.efSearch = ef  # noqa: SLF001 - benchmark probe, no public setter
            index.search(queries[:50], args.k)
            seconds = median(_timed(lambda: index.search(queries, args.k), max(1, args.repeat // 2)))
            assert seconds is not None
            hits = index.search(queries, args.k)
            found = [[slot_of[h.listing_id] for h in row] for row in hits]
            sweep.append({"ef_search": ef, "recall_at_10": recall_at_k(found, truth, args.k),
                          "qps_per_core": len(queries) / seconds})
            _log(f"hnsw ef {ef}: recall@{args.k} {sweep[-1]['recall_at_10']:.3f}, "
                 f"{sweep[-1]['qps_per_core']:.0f} q/s per core")
        index._hnsw.hnsw.efSearch = args.ef_search  # noqa: SLF001
        deleted = ids[: min(args.delete_n, n // 10)]  # below the 25 % tombstone rebuild threshold
        t0 = time.perf_counter()
        for start in range(0, len(deleted), args.add_batch):
            index.delete(deleted[start:start + args.add_batch])
        delete_seconds = time.perf_counter() - t0
        ivf = ivf_sweep(args, base, queries, truth) if args.ivf else None
    finally:
        faiss.omp_set_num_threads(threads)
    headline = next(r for r in sweep if r["ef_search"] == args.ef_search)
    meeting = [r for r in sweep if r["recall_at_10"] >= GOAL_RECALL and r["qps_per_core"] >= GOAL_QPS_PER_CORE]
    return {
        "recall_at_10": headline["recall_at_10"],
        "qps_per_core": headline["qps_per_core"],
        "approx_goal_met": bool(meeting),
        "approx_goal_best_ef_search": max(meeting, key=lambda r: r["qps_per_core"])["ef_search"] if meeting else None,
        "approx": {
            "kind": "hnsw",
            "n": n,
            "queries": len(queries),
            "data": f"{clusters} Gaussian blobs of unit vectors, offset norm {args.noise} "
                    "(cosine to the blob centre about 0.78); queries drawn from the same blobs; "
                    "truth = exact inner-product top-k on the same vectors",
            "hnsw_m": args.hnsw_m,
            "ef_construction": args.ef_construction,
            "ef_search": args.ef_search,
            "build_threads": threads,
            "add_per_second": n / add_seconds,
            "delete_per_second": len(deleted) / delete_seconds if deleted else None,
            "ef_sweep": sweep,
            "ivf": ivf,
        },
    }


def ivf_sweep(args: argparse.Namespace, base: np.ndarray, queries: np.ndarray,
              truth: np.ndarray) -> dict[str, Any]:
    """FAISS IVF-Flat (inner product), trained on the data, nprobe sweep on one thread."""
    import faiss

    n = base.shape[0]
    nlist = max(1, int(4 * np.sqrt(n)))
    quantizer = faiss.IndexFlatIP(args.dim)
    ivf = faiss.IndexIVFFlat(quantizer, args.dim, nlist, faiss.METRIC_INNER_PRODUCT)
    faiss.omp_set_num_threads(os.cpu_count() or 1)
    t0 = time.perf_counter()
    ivf.train(base[: min(n, 64 * nlist)])
    train_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.add(base)
    add_seconds = time.perf_counter() - t0
    faiss.omp_set_num_threads(1)
    sweep = []
    for nprobe in (1, 2, 4, 8, 16, 32, 64):
        if nprobe > nlist:
            break
        ivf.nprobe = nprobe
        seconds = median(_timed(lambda: ivf.search(queries, args.k), max(1, args.repeat // 2)))
        assert seconds is not None
        found = ivf.search(queries, args.k)[1]
        sweep.append({"nprobe": nprobe, "recall_at_10": recall_at_k(found.tolist(), truth, args.k),
                      "qps_per_core": len(queries) / seconds})
        _log(f"ivf nprobe {nprobe}: recall {sweep[-1]['recall_at_10']:.3f}, {sweep[-1]['qps_per_core']:.0f} q/s")
    return {"nlist": nlist, "train_seconds": train_seconds, "add_per_second": n / add_seconds, "sweep": sweep}


# ------------------------------------------------------------------------- compact vectors


def _catalogue_rows(root: Path) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = []
    for path in sorted(root.rglob("listings.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows.extend(csv.DictReader(f))
    return rows


def catalogue_texts(root: Path) -> list[str]:
    """Title and description of every listing in every ``listings.csv`` under ``root``, whitespace
    collapsed, at most 1,000 characters, each distinct text once (the sets overlap)."""
    texts: dict[str, None] = {}
    for row in _catalogue_rows(root):
        text = " ".join(f"{row.get('title') or ''} {row.get('description') or ''}".split())[:1000]
        if text:
            texts.setdefault(text, None)
    return list(texts)


def catalogue_titles(root: Path) -> list[str]:
    """The distinct non-empty titles under ``root`` (payloads of the memory measurement)."""
    titles = {" ".join((row.get("title") or "").split()): None for row in _catalogue_rows(root)}
    return [t for t in titles if t]


def minilm_embeddings(texts: Sequence[str], cache: Path | None, batch: int = 64) -> np.ndarray:
    """``[len(texts), 384]`` all-MiniLM-L6-v2 sentence vectors (mean pooled, L2-normalised, as
    sentence-transformers gives them), read from ``cache`` when it holds as many, else computed
    on the CPU (minutes for the 29k catalogue texts on 2 cores) and written there."""
    if cache is not None and cache.is_file():
        cached = np.load(cache, allow_pickle=False)
        if cached.shape[0] == len(texts):
            return cached
        _log(f"compact: {cache} holds {cached.shape[0]} vectors for {len(texts)} texts; embedding again")
    import torch

    from samestyle.models.backbones import BUNDLED_MINILM, build_text_backbone
    from samestyle.models.encoder import EncoderConfig

    model = build_text_backbone(BUNDLED_MINILM, EncoderConfig())
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths pad little
    out = np.empty((len(texts), model.dim), dtype=np.float32)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for start in range(0, len(texts), batch):
            rows = order[start:start + batch]
            out[rows] = model([texts[i] for i in rows], 128).numpy()
            if start // batch % 50 == 0:
                _log(f"compact: embedded {start:,}/{len(texts):,} texts ({time.perf_counter() - t0:.0f} s)")
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache, out, allow_pickle=False)
    return out


def reduce_to(x: np.ndarray, dim: int) -> np.ndarray:
    """Unit vectors ``[n, dim]``: ``x`` projected on its ``dim`` principal axes (the mean is kept, as
    a ``dim``-wide model's outputs share one), then normalised."""
    if dim > x.shape[1]:
        raise SystemExit(f"--dim {dim} is wider than the catalogue embeddings ({x.shape[1]})")
    if dim < x.shape[1]:
        centred = x - x.mean(axis=0)
        axes = np.linalg.svd(centred, full_matrices=False)[2][:dim]  # [dim, native]
        x = x @ axes.T
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def _search_rows(index: Any, queries: np.ndarray, k: int, exclude: list[str], batch: int) -> list[list[Any]]:
    hits: list[list[Any]] = []
    for start in range(0, len(queries), batch):
        hits += index.search(queries[start:start + batch], k, exclude=exclude[start:start + batch])
    return hits


def compact_recall(args: argparse.Namespace, vectors: np.ndarray, forms: Sequence[str]) -> dict[str, Any]:
    """Recall@k of each form against exact float32 search on ``vectors`` (rows in a random
    arrival order, so each form's sq8 ranges are learnt on a random sample), each query a listing
    searched with itself excluded; how far the scores are from the float32 scores; and the same
    recall on galleries of 1/8, 1/4 and 1/2 of the rows (the queries drawn from the smallest), to
    show how it moves with the catalogue's size."""
    from samestyle.index_store import LiveIndex

    rng = np.random.default_rng(args.seed)
    x = vectors[rng.permutation(len(vectors))]
    n = len(x)
    ids = _ids(0, n)
    asked = rng.choice(max(1, n // 8), size=min(args.compact_queries, max(1, n // 8)), replace=False)
    queries, exclude = x[asked], [ids[i] for i in asked]

    def build(form: str, size: int) -> Any:
        index = LiveIndex(x.shape[1], vectors=form)
        for start in range(0, size, args.add_batch):
            stop = min(size, start + args.add_batch)
            index.upsert(ids[start:stop], x[start:stop])
        return index

    out: dict[str, Any] = {form: {"by_gallery": []} for form in forms}
    for size in sorted({max(1, n // 8), max(1, n // 4), max(1, n // 2), n}):
        truth = _search_rows(build("float32", size), queries, args.k, exclude, args.query_batch)
        for form in forms:
            index = build(form, size)
            found = _search_rows(index, queries, args.k, exclude, args.query_batch)
            overlap = [len({h.listing_id for h in f} & {h.listing_id for h in t}) / args.k
                       for f, t in zip(found, truth)]
            out[form]["by_gallery"].append({"gallery": size, "recall_at_10": float(np.mean(overlap))})
            if size < n:
                continue
            errors = [abs(h.score - float(q @ x[int(h.listing_id[1:])])) for q, f in zip(queries, found) for h in f]
            out[form].update({
                "recall_at_10": float(np.mean(overlap)),
                "queries_below_1": int(sum(o < 1.0 for o in overlap)),
                "score_error_mean": float(np.mean(errors)),
                "score_error_max": float(np.max(errors)),
                "vector_bytes_per_listing": index.vector_bytes / len(index),
            })
    for form in forms:
        r = out[form]
        sweep = ", ".join(f"{g['gallery']:,}: {g['recall_at_10']:.4f}" for g in r["by_gallery"])
        _log(f"compact {form}: recall@{args.k} {r['recall_at_10']:.4f} against float32 on {n:,} "
             f"({r['queries_below_1']} of {len(queries)} queries below 1; by gallery size {sweep}), "
             f"score error mean {r['score_error_mean']:.2e} max {r['score_error_max']:.2e}")
    return out


def compact_timing(args: argparse.Namespace, index: Any, matrix: np.ndarray, queries: np.ndarray,
                   exclude: list[str]) -> dict[str, Any]:
    """Search seconds of each compact form and of float32 on the same vectors, same rounds."""
    from samestyle.index_store import LiveIndex

    ids = _ids(0, len(matrix))
    others: dict[str, Callable[[], Any]] = {}
    for form in args.vectors:
        compact = LiveIndex(args.dim, vectors=form)
        for start in range(0, len(matrix), 65536):
            compact.upsert(ids[start:start + 65536], matrix[start:start + 65536])
        others[form] = lambda compact=compact: compact.search(queries, args.k, exclude=exclude)
    row = versus_sgemm(lambda: index.search(queries, args.k, exclude=exclude), matrix, queries, args.repeat, others)
    out: dict[str, Any] = {"query_batch": len(queries), "n": len(matrix), "float32_seconds": row["search_seconds"],
                           "float32_sgemm_ratio": row["sgemm_ratio"], "rounds": row["rounds"]}
    for form in args.vectors:
        out[f"{form}_seconds"] = row[f"{form}_seconds"]
        out[f"{form}_sgemm_ratio"] = row[f"{form}_sgemm_ratio"]
        out[f"{form}_vs_float32"] = row["search_seconds"] / row[f"{form}_seconds"]
        _log(f"compact {form}: {row[f'{form}_seconds'] * 1000:.1f} ms per batch of {len(queries)}, "
             f"float32 {row['search_seconds'] * 1000:.1f} ms ({out[f'{form}_vs_float32']:.2f} of its speed)")
    return out


def _process_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def worker_payload(i: int, title: str, has_image: bool) -> dict[str, Any]:
    """A payload with the keys and value sizes the worker stores per listing."""
    return {"supplier_id": f"supplier-{i % 5000:05d}", "category": "Electronics > Audio > Headphones",
            "title": title, "event_time": 1_760_000_000_000 + i, "has_image": has_image,
            "image_uri": f"https://images.example.com/listings/{i:012d}.jpg" if has_image else None,
            "match_text": title}


def rss_child(form: str, n: int, dim: int, image_share: float, titles: list[str], seed: int, batch: int,
              conn: Any) -> None:
    """In a fresh process: index ``n`` listings with three views and worker payloads in ``form``,
    and send back the resident memory that added (at half and at all of ``n``) and the peak."""
    from samestyle.index_store import LiveIndex

    rng = np.random.default_rng(seed)
    gc.collect()
    before, peak_before = _process_bytes(), _process_bytes("VmHWM")
    index = LiveIndex(dim, n_views=3, vectors=form)
    half: tuple[int, int] | None = None
    t0 = time.perf_counter()
    for start in range(0, n, batch):
        stop = min(n, start + batch)
        m = stop - start
        image_text = unit_rows(rng, m, dim)
        has_image = rng.random(m) < image_share
        image = unit_rows(rng, m, dim) * has_image[:, None]
        text = np.where(has_image[:, None], unit_rows(rng, m, dim), image_text)  # text-only: T = IT
        views = np.stack([image, text, image_text], axis=1)  # [m, 3, dim]
        payloads = [worker_payload(i, titles[i % len(titles)], bool(h)) for i, h in zip(range(start, stop), has_image)]
        index.upsert([f"listing-{i:012d}" for i in range(start, stop)], image_text, payloads=payloads, views=views)
        del image_text, image, text, views, payloads
        if half is None and stop >= n // 2:
            gc.collect()
            half = (stop, _process_bytes())
    seconds = time.perf_counter() - t0
    gc.collect()
    after = _process_bytes()
    assert half is not None
    conn.send({"n": n, "rss_growth_bytes": after - before, "rss_half": [half[0], half[1] - before],
               "peak_growth_bytes": max(0, _process_bytes("VmHWM") - max(before, peak_before)),
               "vector_bytes": index.vector_bytes, "seconds": seconds})
    conn.close()


def compact_memory(args: argparse.Namespace, forms: Sequence[str], titles: list[str]) -> dict[str, Any]:
    """:func:`rss_child` per form, one at a time: bytes per listing measured, and what they extrapolate to."""
    context = multiprocessing.get_context("spawn")
    out: dict[str, Any] = {}
    for form in forms:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=rss_child, args=(form, args.rss_n, args.dim, args.image_share, titles,
                                                        args.seed, 10_000, send))
        child.start()
        send.close()
        r = receive.recv()
        child.join()
        n = r["n"]
        half_n, half_bytes = r["rss_half"]
        per = r["rss_growth_bytes"] / n
        out[form] = {
            "rss_growth_bytes_per_listing": per,
            "rss_slope_bytes_per_listing": (r["rss_growth_bytes"] - half_bytes) / (n - half_n) if n > half_n else None,
            "peak_growth_bytes_per_listing": r["peak_growth_bytes"] / n,
            "vector_bytes_per_listing": r["vector_bytes"] / n,
            "other_bytes_per_listing": per - r["vector_bytes"] / n,
            "listings_per_24gb": GOAL_WORKER_BYTES / per,
            "gb_for_10m": per * GOAL_COMPACT_LISTINGS / 1e9,
            "index_seconds": r["seconds"],
        }
        _log(f"compact {form}: {n:,} listings grew RSS by {r['rss_growth_bytes'] / 1e9:.2f} GB, "
             f"{per:,.0f} bytes per listing ({r['vector_bytes'] / n:,.0f} of them vectors); "
             f"24 GB would hold {GOAL_WORKER_BYTES / per / 1e6:.1f} M listings")
    return out


def compact_part(args: argparse.Namespace) -> dict[str, Any]:
    forms = ["float32", *args.vectors]
    texts = catalogue_texts(args.catalogue) if args.catalogue.is_dir() else []
    if not texts and (args.catalogue_cache is None or not args.catalogue_cache.is_file()):
        raise SystemExit(f"no listings.csv under {args.catalogue} and no --catalogue-cache: nothing to embed")
    if texts:
        native = minilm_embeddings(texts, args.catalogue_cache)
    else:
        assert args.catalogue_cache is not None
        native = np.load(args.catalogue_cache, allow_pickle=False)
    vectors = reduce_to(native, args.dim)
    recall = compact_recall(args, vectors, args.vectors)
    titles = catalogue_titles(args.catalogue) if texts else [f"Listing title number {i} of a catalogue" for i in range(1000)]
    memory = compact_memory(args, forms, titles) if args.rss_n > 0 else {}
    met_by = [f for f in args.vectors if recall[f]["recall_at_10"] >= GOAL_COMPACT_RECALL
              and f in memory and memory[f]["listings_per_24gb"] >= GOAL_COMPACT_LISTINGS]
    return {
        "forms": forms,
        "recall": recall,
        "memory": memory,
        "data": {
            "recall": f"{len(vectors):,} all-MiniLM-L6-v2 embeddings of the catalogue texts under {args.catalogue} "
                      f"({'from the cache' if not texts else 'embedded here or cached'}), PCA to {args.dim} "
                      f"dimensions and normalised; {min(args.compact_queries, len(vectors))} of them searched, "
                      "each excluding itself; truth = exact float32 search",
            "memory": f"{args.rss_n:,} listings of {args.dim} dims in a fresh process each, three views, "
                      f"{args.image_share:.0%} with an image (three vectors), the others with none and a text view "
                      f"equal to the image+text one; payloads with the worker's keys, "
                      f"{'catalogue titles' if texts else 'synthetic titles'}",
        },
        "goal_recall": GOAL_COMPACT_RECALL,
        "goal_listings": GOAL_COMPACT_LISTINGS,
        "goal_worker_bytes": GOAL_WORKER_BYTES,
        "goal_met_by": met_by,
        "goal_met": bool(met_by),
    }


# ---------------------------------------------------------------------------------- output


def index_result(memory: dict[str, float], exact: dict[str, Any]) -> dict[str, Any]:
    """The headline bandwidth numbers and their ratio (the read bandwidth with every core)."""
    memory_gbps = memory["read_gbps"]
    r = ratio(exact["exact_scan_gbps"], memory_gbps)
    out: dict[str, Any] = {
        "memory_gbps": memory_gbps,
        "exact_scan_gbps": exact["exact_scan_gbps"],
        "bandwidth_ratio": r,
        "goal_bandwidth_ratio": GOAL_BANDWIDTH_RATIO,
        "exact_goal_met": r is not None and r >= GOAL_BANDWIDTH_RATIO,
    }
    versus = exact.get("exact_headline")
    if versus is not None:
        out.update({
            "search_gflops": versus["search_gflops"],
            "sgemm_gflops": versus["sgemm_gflops"],
            "sgemm_ratio": versus["sgemm_ratio"],
            "search_seconds_per_batch": versus["search_seconds"],
            "faiss_default_seconds_per_batch": versus["faiss_default_seconds"],
            "faiss_default_gflops": versus["faiss_default_gflops"],
            "faiss_blas_sgemm_ratio": versus["faiss_blas_sgemm_ratio"],
            "goal_sgemm_ratio": GOAL_SGEMM_RATIO,
            "sgemm_goal_met": versus["sgemm_ratio"] >= GOAL_SGEMM_RATIO,
        })
    return out


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=80)
    sweep = result["exact_sweep"]
    labels = ["memory read"] + [f"scan q={r['query_batch']}" for r in sweep]
    values = [result["memory_gbps"]] + [r["scan_gbps"] for r in sweep]
    bars = left.bar(labels, values, color=["#888888"] + ["#3b75af"] * len(sweep))
    left.bar_label(bars, fmt="%.1f", fontsize=7)
    left.axhline(GOAL_BANDWIDTH_RATIO * result["memory_gbps"], color="red", lw=0.8, ls=":", label="0.7 x memory")
    left.set_ylabel("GB/s")
    title = f"exact flat scan, n={result['n']:,} x {result['dim']}"
    if result.get("sgemm_ratio") is not None:
        title += f"\nq={result['query_batch']}: {result['sgemm_ratio']:.2f} of numpy sgemm's GFLOP/s"
    left.set_title(title, fontsize=9)
    left.tick_params(axis="x", labelsize=7, rotation=20)
    left.legend(fontsize=7)
    approx = result.get("approx")
    if approx:
        s = approx["ef_sweep"]
        right.plot([r["qps_per_core"] for r in s], [r["recall_at_10"] for r in s], "o-", label="HNSW (ef sweep)")
        for r in s:
            right.annotate(str(r["ef_search"]), (r["qps_per_core"], r["recall_at_10"]), fontsize=7)
        if approx.get("ivf"):
            v = approx["ivf"]["sweep"]
            right.plot([r["qps_per_core"] for r in v], [r["recall_at_10"] for r in v], "s--", label="IVF-Flat (nprobe)")
        right.axhline(GOAL_RECALL, color="red", lw=0.8, ls=":")
        right.axvline(GOAL_QPS_PER_CORE, color="red", lw=0.8, ls=":")
        right.set_xscale("log")
        right.set_xlabel("queries / s, one core")
        right.set_ylabel("recall@10")
        right.set_title(f"approximate, n={approx['n']:,} clustered", fontsize=9)
        right.legend(fontsize=7)
    elif result.get("exact_headline"):
        h = result["exact_headline"]
        names = ["numpy sgemm", "flat search", "faiss.knn\n(faiss's settings)", "faiss.knn\n(BLAS path)"]
        rates = [h["sgemm_gflops"], h["search_gflops"], h["faiss_default_gflops"], h["faiss_blas_gflops"]]
        bars = right.bar(names, rates, color=["#888888", "#3b75af", "#c44e52", "#dd8452"])
        right.bar_label(bars, fmt="%.1f", fontsize=7)
        right.axhline(GOAL_SGEMM_RATIO * h["sgemm_gflops"], color="red", lw=0.8, ls=":", label="0.7 x sgemm")
        right.set_ylabel("GFLOP/s")
        right.set_title(f"{h['query_batch']} queries x {result['n']:,} x {result['dim']}, same run", fontsize=9)
        right.tick_params(axis="x", labelsize=7)
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n", "dim", "k", "query_batch", "add_batch", "memory_mb", "approx_n", "approx_queries", "repeat",
                 "compact_queries"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.rss_n < 0 or not 0.0 <= args.image_share <= 1.0:
        raise SystemExit("--rss-n must be >= 0 and --image-share in [0, 1]")
    setup_logging(args.verbose)
    import faiss

    rng = np.random.default_rng(args.seed)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    memory = memory_bandwidth(args.memory_mb, args.repeat, threads)
    gc.collect()
    _log(f"memory: read {memory['read_gbps']:.2f} GB/s ({threads} threads), "
         f"{memory['read_gbps_1thread']:.2f} GB/s (1 thread), copy {memory['copy_gbps']:.2f} GB/s")
    exact = exact_part(args, rng)
    gc.collect()
    result: dict[str, Any] = index_result(memory, exact)
    result.update({k: v for k, v in exact.items() if k != "exact_scan_gbps"})
    result["memory"] = memory
    if not args.skip_approx:
        result.update(approx_part(args, rng))
    if args.vectors:
        gc.collect()
        result["compact"] = compact_part(args)
    result.update({
        "n": args.n,
        "dim": args.dim,
        "k": args.k,
        "query_batch": args.query_batch,
        "add_batch": args.add_batch,
        "approx_n": None if args.skip_approx else args.approx_n,
        "exact_data": "random unit float32 vectors (the scan speed does not depend on them)",
        "faiss_threads": faiss.omp_get_max_threads(),
        "blas_threads": blas_threads(),
        "repeat": args.repeat,
        "goal_recall": GOAL_RECALL,
        "goal_qps_per_core": GOAL_QPS_PER_CORE,
        "machine": machine_info(),
    })
    result = rounded_tree(result)
    return finish(result, args, _plot)


if __name__ == "__main__":
    sys.exit(main())
