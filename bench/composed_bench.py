"""Composed queries on Grocery: a photo of product A plus the name of product B, target B.

``samestyle bench composed --json`` prints one JSON object. The setting (the paper's
"user-interactive search": start from a picture, say what should differ):

* index: the 81 catalog listings (title, description, catalog image), their IT vectors, as the
  worker indexes them;
* queries: for every photo of product A in the chosen split (``val`` by default) and every other
  product B of A's coarse class ("Golden Delicious" photo + "Granny Smith"), one query of each kind,
  all embedded through :func:`models.query.embed_queries`, the path ``POST /search`` takes:

    composed    IT view of (photo of A, title of B)
    image-only  I view of the photo of A
    text-only   T view of the title of B

* target: B's catalog listing(s). Reported: recall@1, recall@10 and MRR per kind over the same
  (A photo, B) pairs, plus how often the composed query still ranks A's own listing in its top 10
  (it should move towards B, not forget the picture).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_parser

log = logging.getLogger("bench.composed")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "grocery_store_images"
KINDS = ("composed", "image_only", "text_only")


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = bench_parser("composed", __doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Grocery directory (listings.csv, clusters.csv)")
    p.add_argument("--encoder", default="default", help="encoder spec: default, a JSON config or a model directory")
    p.add_argument("--split", default="val", help="split of the query photos (val, train)")
    p.add_argument("--max-photos", type=int, default=None, help="only the first N photos of the split")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when present)")
    p.add_argument("--allow-random-weights", action="store_true", help="allow the tiny encoder (smoke tests)")
    return p.parse_args(argv)


def _read_clusters(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as f:
        return {row["listing_id"]: row for row in csv.DictReader(f)}


def _ranks(scores: np.ndarray, targets: list[set[int]]) -> np.ndarray:
    """1-based rank of the best-ranked target per query row (scores [q, n])."""
    order = np.argsort(-scores, axis=1, kind="stable")  # [q, n]
    ranks = np.empty(len(targets), dtype=np.int64)
    for row, wanted in enumerate(targets):
        hit = np.flatnonzero(np.isin(order[row], list(wanted)))
        ranks[row] = hit[0] + 1
    return ranks


def _summary(ranks: np.ndarray) -> dict[str, float]:
    return {"recall@1": round(float(np.mean(ranks <= 1)), 4), "recall@10": round(float(np.mean(ranks <= 10)), 4),
            "mrr": round(float(np.mean(1.0 / ranks)), 4)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from samestyle.models import ListingInput, encoder_from_spec
    from samestyle.models.data import read_listings
    from samestyle.models.query import Query, embed_queries

    started = time.perf_counter()
    clusters = _read_clusters(args.data / "clusters.csv")
    records = {r.listing_id: r for r in read_listings(args.data / "listings.csv")}
    catalog = sorted(i for i, c in clusters.items() if c["split"] == "catalog" and i in records)
    photos = sorted(i for i, c in clusters.items() if c["split"] == args.split and i in records)
    if args.max_photos is not None:
        photos = photos[: args.max_photos]
    fine_to_rows: dict[str, set[int]] = defaultdict(set)
    for row, listing_id in enumerate(catalog):
        fine_to_rows[clusters[listing_id]["cluster_id"]].add(row)
    coarse_to_fine: dict[str, set[str]] = defaultdict(set)
    for listing_id in catalog:
        coarse_to_fine[clusters[listing_id]["coarse_cluster_id"]].add(clusters[listing_id]["cluster_id"])
    title_of = {clusters[i]["cluster_id"]: records[i].title for i in catalog}

    encoder = encoder_from_spec(args.encoder, device=args.device, allow_random_weights=args.allow_random_weights)
    log.info("encoder %s; %d catalog listings, %d %s photos", encoder.version, len(catalog), len(photos), args.split)

    def image_bytes(listing_id: str) -> bytes:
        path = records[listing_id].image_path
        assert path is not None
        return Path(path).read_bytes()

    # The index: catalog listings as the worker embeds them (IT view).
    rows = []
    for lo in range(0, len(catalog), args.batch_size):
        batch = []
        for listing_id in catalog[lo: lo + args.batch_size]:
            r = records[listing_id]
            batch.append(ListingInput(listing_id, r.title, r.description,
                                      dict(r.attributes),
                                      image_bytes(listing_id), r.category))
        rows.append(encoder.encode(batch).image_text)
    index = np.concatenate(rows)  # [n_catalog, dim]

    # The (A photo, B product) pairs: every other fine class of A's coarse class.
    pairs: list[tuple[str, str]] = []
    for photo in photos:
        fine, coarse = clusters[photo]["cluster_id"], clusters[photo]["coarse_cluster_id"]
        pairs += [(photo, b) for b in sorted(coarse_to_fine[coarse] - {fine})]
    if not pairs:
        raise SystemExit("no (photo, other product of the same coarse class) pairs: check --data and --split")
    log.info("%d composed pairs", len(pairs))

    def embed(queries: list[Query]) -> np.ndarray:
        out = []
        for lo in range(0, len(queries), args.batch_size):
            out += [q.search for q in embed_queries(encoder, queries[lo: lo + args.batch_size])]
        return np.stack(out)  # [q, dim]

    image_vectors = dict(zip(photos, embed([Query(image=image_bytes(p)) for p in photos])))
    text_vectors = dict(zip(sorted(title_of), embed([Query(text=title_of[b]) for b in sorted(title_of)])))
    composed = embed([Query(text=title_of[b], image=image_bytes(a)) for a, b in pairs])

    targets = [fine_to_rows[b] for _, b in pairs]
    sources = [fine_to_rows[clusters[a]["cluster_id"]] for a, _ in pairs]
    queries = {
        "composed": composed,
        "image_only": np.stack([image_vectors[a] for a, _ in pairs]),
        "text_only": np.stack([text_vectors[b] for _, b in pairs]),
    }
    result: dict[str, Any] = {
        "bench": "composed",
        "dataset": str(args.data.name),
        "encoder": args.encoder,
        "model_version": encoder.version,
        "split": args.split,
        "catalog_listings": len(catalog),
        "query_photos": len(photos),
        "pairs": len(pairs),
        "coarse_classes_used": len({clusters[a]["coarse_cluster_id"] for a, _ in pairs}),
        "target": "catalog listing of product B (same coarse class as A, not A)",
    }
    for kind in KINDS:
        result[kind] = _summary(_ranks(queries[kind] @ index.T, targets))
    result["composed"]["source_A_recall@10"] = _summary(_ranks(composed @ index.T, sources))["recall@10"]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    result = run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(json.dumps(result, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
