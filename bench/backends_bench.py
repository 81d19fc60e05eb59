"""The same listings through both index backends: in-process FAISS and Milvus (Milvus Lite here).

For each backend and each ``--n``: ``n`` clustered unit vectors of ``--dim`` (the shapes of
``bench index``; three views per listing as the worker stores them) are upserted in batches of
``--batch`` (ingest/s), then:

  The ingest ends with ``flush`` (Milvus Lite searches unsealed rows by a slow scan);
* upsert -> searchable: ``--fresh`` single new listings, each timed from the start of its upsert
  until a search (repeated until it does) returns it as the top hit; p50/p99 in ms;
* search latency of single queries at 1 and at ``--concurrency`` concurrent clients (threads
  sharing the backend, as the index agent and the search API would), p50/p99 in ms, and q/s;
  and of calls carrying ``--concurrency`` queries each (the index agent searches a batch at once);
* recall@10 of ``--queries`` queries against exact numpy search on the same vectors;
* RSS of this process (the worker's side) and, for Milvus, of the Milvus Lite server process.

Milvus runs as its own ``milvus-lite server`` process (``--milvus-uri`` points at another
Milvus instead), so this process holds no vectors. ``--consistency`` lists the read consistency
levels to measure for freshness: "Strong" (a search waits until every earlier write is visible)
against "Bounded" (no wait; a worker would search its recent writes itself)::

    samestyle bench backends --n 20000 --dim 256 --json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    bench_parser,
    finish,
    machine_info,
    percentile,
    positive_int_list,
    rounded,
    rss_mb,
    setup_logging,
)
from bench.index_bench import clustered, recall_at_k

N_VIEWS = 3


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("backends", __doc__.splitlines()[0], plot="unused; accepted for symmetry with other benches")
    p.add_argument("--n", type=positive_int_list, default=[20000], help="catalogue sizes, e.g. 20000,100000")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--backends", default="faiss,milvus", help="comma-separated: faiss, milvus")
    p.add_argument("--batch", type=int, default=1000, help="listings per upsert call while ingesting")
    p.add_argument("--queries", type=int, default=200, help="queries for latency and recall")
    p.add_argument("--fresh", type=int, default=50, help="single upserts timed until searchable")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--consistency", default="Strong,Bounded,Bounded+buffer",
                   help="Milvus read modes to measure; +buffer adds an exact search of the last --buffer upserts")
    p.add_argument("--buffer", type=int, default=1000, help="recent upserts a +buffer mode searches exactly")
    p.add_argument("--milvus-uri", help="an existing Milvus (default: a milvus-lite server process on a temp dir)")
    p.add_argument("--no-flush", action="store_true",
                   help="never seal Milvus segments (shows the cost of Milvus Lite's unsealed-row scan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true")
    return p


class RecentBuffer:
    """The alternative to Strong reads: a Bounded-consistency backend search merged with an exact
    search over this worker's last ``size`` upserts (what Milvus may not show yet)."""

    def __init__(self, backend: Any, size: int) -> None:
        self.backend, self.size = backend, size
        self.ids: list[str] = []
        self.vectors: list[np.ndarray] = []

    def upsert(self, version: str, ids: list[str], vectors: np.ndarray, **kwargs: Any) -> None:
        self.backend.upsert(version, ids, vectors, **kwargs)
        self.ids = (self.ids + list(ids))[-self.size:]
        self.vectors = (self.vectors + list(vectors))[-self.size:]

    def search(self, queries: np.ndarray, k: int) -> list[list[Any]]:
        from samestyle.index_store import Hit

        found = self.backend.search(queries, k)
        if not self.ids:
            return found
        scores = queries @ np.stack(self.vectors).T  # [nq, buffered]
        out = []
        for q, hits in enumerate(found):
            merged = {h.listing_id: h for h in hits}
            for i, listing_id in enumerate(self.ids):
                merged[listing_id] = Hit(listing_id, float(scores[q, i]))
            out.append(sorted(merged.values(), key=lambda h: -h.score)[:k])
        return out


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int, block: int = 16) -> np.ndarray:
    """``[nq, k]`` row numbers of the exact top-``k`` by inner product, best first; ``block``
    queries at a time, so a million vectors never need a ``[nq, n]`` score matrix at once."""
    out = np.empty((len(queries), k), dtype=np.int64)
    for lo in range(0, len(queries), block):
        scores = queries[lo:lo + block] @ vectors.T  # [block, n]
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1, kind="stable")
        out[lo:lo + block] = np.take_along_axis(top, order, axis=1)
    return out


def _ms(values: list[float]) -> dict[str, float | None]:
    return {"p50_ms": rounded(percentile(values, 50) * 1e3 if values else None),
            "p99_ms": rounded(percentile(values, 99) * 1e3 if values else None)}


def _latencies(backend: Any, queries: np.ndarray, k: int, clients: int) -> dict[str, Any]:
    """Single-query searches from ``clients`` threads; per-query latency and overall q/s."""
    def one(q: int) -> float:
        t = time.perf_counter()
        backend.search(queries[q:q + 1], k)
        return time.perf_counter() - t

    start = time.perf_counter()
    if clients == 1:
        times = [one(q) for q in range(len(queries))]
    else:
        with ThreadPoolExecutor(clients) as pool:
            times = list(pool.map(one, range(len(queries))))
    wall = time.perf_counter() - start
    return {**_ms(times), "qps": rounded(len(queries) / wall), "clients": clients}


def _batched(backend: Any, queries: np.ndarray, k: int, batch: int) -> dict[str, Any]:
    """Searches of ``batch`` queries per call (the index agent searches a whole batch at once)."""
    times = []
    for lo in range(0, len(queries) - batch + 1, batch):
        t = time.perf_counter()
        backend.search(queries[lo:lo + batch], k)
        times.append(time.perf_counter() - t)
    return {**_ms(times), "queries_per_call": batch, "qps": rounded(batch * len(times) / sum(times)) if times else None}


def _freshness(backend: Any, rng: np.random.Generator, dim: int, count: int, tag: str) -> dict[str, Any]:
    """Upsert one new listing, then search until it is the top hit; seconds per listing."""
    waits, searches = [], []
    for i in range(count):
        v = clustered(rng, 1, dim, 1, 0.0)
        views = np.repeat(v[:, None, :], N_VIEWS, axis=1)
        listing_id = f"fresh-{tag}-{i}"
        start = time.perf_counter()
        backend.upsert("bench", [listing_id], v, payloads=[{"supplier_id": "S0"}], views=views)
        tries = 0
        while True:
            tries += 1
            hits = backend.search(v, 1)[0]
            if hits and hits[0].listing_id == listing_id:
                break
            if time.perf_counter() - start > 30:
                raise RuntimeError(f"{listing_id} not searchable after 30 s")
        waits.append(time.perf_counter() - start)
        searches.append(tries)
    return {**_ms(waits), "searches_per_listing_mean": rounded(float(np.mean(searches)))}


def run_one(name: str, n: int, args: argparse.Namespace, uri: str | None, consistency: str,
            server_pid: int | None) -> dict[str, Any]:
    from samestyle.index_store.backend import FaissBackend

    rng = np.random.default_rng(args.seed)
    vectors = clustered(rng, n, args.dim, max(1, n // 50), 0.6)  # [n, dim]
    queries = clustered(np.random.default_rng(args.seed + 1), args.queries, args.dim, max(1, n // 50), 0.6)
    truth = exact_top_k(queries, vectors, args.k)  # [queries, k]
    ids = [f"L{i:08d}" for i in range(n)]
    payloads = [{"supplier_id": f"S{i % 97}"} for i in range(n)]
    gc.collect()
    rss_before = rss_mb(os.getpid())
    server_before = rss_mb(server_pid) if server_pid else None
    if name == "faiss":
        backend: Any = FaissBackend("flat", n_views=N_VIEWS)
    else:
        from samestyle.index_store.milvus import MilvusBackend

        backend = MilvusBackend(uri, n_views=N_VIEWS, prefix=f"bench{n}{consistency.split('+')[0].lower()}",
                                consistency=consistency.split("+")[0], flush_rows=0 if args.no_flush else 5000)
    start = time.perf_counter()
    for lo in range(0, n, args.batch):
        hi = min(n, lo + args.batch)
        chunk = vectors[lo:hi]
        backend.upsert("bench", ids[lo:hi], chunk, payloads=payloads[lo:hi],
                       views=np.repeat(chunk[:, None, :], N_VIEWS, axis=1))
    if not args.no_flush:
        backend.flush("bench")
    backend.switch("bench")
    ingest_s = time.perf_counter() - start
    searcher: Any = backend
    if "+buffer" in consistency:  # as if the last --buffer listings had just been written
        searcher = RecentBuffer(backend, args.buffer)
        searcher.ids, searcher.vectors = ids[-args.buffer:], list(vectors[-args.buffer:])
    found = [[int(h.listing_id[1:]) for h in hits] for hits in searcher.search(queries, args.k)]
    row: dict[str, Any] = {
        "backend": name, "n": n, "dim": args.dim,
        "consistency": consistency if name == "milvus" else None,
        "ingest_per_s": rounded(n / ingest_s), "ingest_seconds": rounded(ingest_s),
        f"recall_at_{args.k}": rounded(recall_at_k(found, truth, args.k)),
        "search_1": _latencies(searcher, queries, args.k, 1),
        f"search_{args.concurrency}": _latencies(searcher, queries, args.k, args.concurrency),
        f"search_batch_{args.concurrency}": _batched(searcher, queries, args.k, args.concurrency),
        "upsert_to_searchable": _freshness(searcher, rng, args.dim, args.fresh, consistency.replace("+", "")),
        "rss_mb_before": rounded(rss_before), "rss_mb_after": rounded(rss_mb(os.getpid())),
    }
    if server_pid:
        row["server_rss_mb_before"] = rounded(server_before)
        row["server_rss_mb_after"] = rounded(rss_mb(server_pid))
    if name == "milvus":  # free the server for the next row
        backend.release_active()
        backend.drop("bench")
    backend.close()
    del backend
    gc.collect()
    return row


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import faiss

    faiss.omp_set_num_threads(1)
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    levels = [c.strip() for c in args.consistency.split(",") if c.strip()]
    rows: list[dict[str, Any]] = []
    server = None
    uri = args.milvus_uri
    if "milvus" in names and uri is None:
        from samestyle.index_store.milvus import milvus_lite_server

        server = milvus_lite_server(Path(tempfile.mkdtemp(prefix="samestyle-milvus-")) / "bench.db")
        uri, proc = server.__enter__()
    try:
        for n in args.n:
            for name in names:
                for level in (levels if name == "milvus" else ["-"]):
                    print(f"backends: {name} n={n} {level}", file=sys.stderr)
                    rows.append(run_one(name, n, args, uri, level if name == "milvus" else "Strong",
                                        proc.pid if server is not None and name == "milvus" else None))
    finally:
        if server is not None:
            server.__exit__(None, None, None)
    result = {"rows": rows, "k": args.k, "batch": args.batch, "queries": args.queries, "flush": not args.no_flush,
              "milvus": "milvus-lite server process" if args.milvus_uri is None else args.milvus_uri,
              "versions": _versions(), "machine": machine_info()}
    return finish(result, args, lambda r, path: None)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("pymilvus", "milvus-lite", "faiss-cpu"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


if __name__ == "__main__":
    sys.exit(main())
