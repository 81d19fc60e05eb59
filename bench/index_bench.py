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

    samestyle bench index --n 1000000 --dim 256 --json [--approx-n 100000] [--plot index.png]

Goals: exact >= 0.7 of memory bandwidth and >= 0.7 of the sgemm's GFLOP/s; approximate recall@10
>= 0.95 at >= 1,000 q/s per core.
"""

from __future__ import annotations

import argparse
import gc
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
    matrix = index._vectors[: len(index)]  # the very array the search scans
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
    for name in ("n", "dim", "k", "query_batch", "add_batch", "memory_mb", "approx_n", "approx_queries", "repeat"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
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
