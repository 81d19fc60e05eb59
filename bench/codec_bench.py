"""Throughput of the Avro libraries on realistic samestyle records: `avro` vs `fastavro`.

Times encode and decode of the Avro binary body (no single-object header) of `listing` and
`listing_embedding` records with each library, and the full `topics.Codec` path (validation,
header, fastavro) that the service runs. Prints one JSON object: records/s per schema, library and
direction, and the fastavro/avro ratio. Single process, best of ``--repeat`` runs.

    .venv/bin/samestyle bench codec --n 20000 [--json] [--out out.json]
"""

from __future__ import annotations

import io
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import avro.io
import avro.schema
import fastavro
import numpy as np

from bench.common import bench_parser
from samestyle.topics import codec, vector_to_bytes
from samestyle.topics.codec import _without_logical_types, load_schema

_WORDS = ("stainless steel insulated water bottle vacuum flask leak proof sports gym travel "
          "bpa free double wall keeps drinks cold 24 hours hot 12 hours wide mouth lid ceramic "
          "mug frog handmade glazed coffee cup gift set men women kids outdoor camping").split()


def _text(rng: np.random.Generator, n_words: int) -> str:
    return " ".join(rng.choice(_WORDS, size=n_words))


def make_listings(rng: np.random.Generator, count: int) -> list[dict[str, Any]]:
    """Listings as a marketplace sends them: ~12-word title, ~70-word description, attributes."""
    return [{
        "listing_id": f"L{rng.integers(10**9):09d}",
        "supplier_id": f"S{rng.integers(10**6):06d}",
        "category": "home-garden/drinkware",
        "title": _text(rng, 12),
        "description": _text(rng, 70),
        "attributes": {"brand": "Acme", "colour": "green", "material": "ceramic",
                       "capacity": "350 ml", "origin": "PT", "pack": "2"},
        "image_uri": f"file:///data/images/{rng.integers(10**9)}.jpg",
        "image_bytes": None,
        "op": "UPSERT",
        "event_time": 1_717_171_717_000 + int(rng.integers(10**6)),
    } for _ in range(count)]


def make_embeddings(rng: np.random.Generator, count: int, dim: int) -> list[dict[str, Any]]:
    """Embeddings as the embed agent emits them: three L2-normalised float32 views."""
    def unit() -> bytes:
        v = rng.standard_normal(dim).astype(np.float32)
        return vector_to_bytes(v / np.linalg.norm(v))

    return [{
        "listing_id": f"L{rng.integers(10**9):09d}",
        "supplier_id": f"S{rng.integers(10**6):06d}",
        "category": "home-garden/drinkware",
        "title": _text(rng, 12),
        "op": "UPSERT",
        "model_version": "crossbert-minilm-effnet-v3",
        "dim": dim,
        "has_image": True,
        "vector_image": unit(),
        "vector_text": unit(),
        "vector_image_text": unit(),
        "event_time": 1_717_171_717_000 + int(rng.integers(10**6)),
        "embedded_at": 1_717_171_718_000 + int(rng.integers(10**6)),
    } for _ in range(count)]


def _rate(fn: Callable[[Any], Any], items: Sequence[Any], n: int, repeat: int) -> float:
    """Best records/s of ``repeat`` runs of ``fn`` over ``n`` items cycled from ``items``."""
    best = 0.0
    work = [items[i % len(items)] for i in range(n)]
    for _ in range(repeat):
        start = time.perf_counter()
        for item in work:
            fn(item)
        best = max(best, n / (time.perf_counter() - start))
    return best


def bench_schema(schema_name: str, records: list[dict[str, Any]], n: int,
                 repeat: int) -> dict[str, Any]:
    # Both libraries get the same schema, timestamps as plain longs, as the service uses them.
    raw = _without_logical_types(load_schema(schema_name))

    avro_schema = avro.schema.parse(json.dumps(raw))
    avro_writer = avro.io.DatumWriter(avro_schema)
    avro_reader = avro.io.DatumReader(avro_schema)

    def avro_encode(rec: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        avro_writer.write(rec, avro.io.BinaryEncoder(buf))
        return buf.getvalue()

    def avro_decode(body: bytes) -> Any:
        return avro_reader.read(avro.io.BinaryDecoder(io.BytesIO(body)))

    fa_schema = fastavro.parse_schema(raw)

    def fastavro_encode(rec: dict[str, Any]) -> bytes:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, fa_schema, rec)
        return buf.getvalue()

    def fastavro_decode(body: bytes) -> Any:
        return fastavro.schemaless_reader(io.BytesIO(body), fa_schema)

    bodies = [fastavro_encode(r) for r in records]
    if [avro_encode(r) for r in records] != bodies:
        raise SystemExit(f"{schema_name}: avro and fastavro bodies differ")
    c = codec(schema_name)
    messages = [c.encode(r) for r in records]

    result: dict[str, Any] = {
        "body_bytes_mean": round(sum(map(len, bodies)) / len(bodies), 1),
        "avro": {"encode": _rate(avro_encode, records, n, repeat),
                 "decode": _rate(avro_decode, bodies, n, repeat)},
        "fastavro": {"encode": _rate(fastavro_encode, records, n, repeat),
                     "decode": _rate(fastavro_decode, bodies, n, repeat)},
        # What the service pays: validation + single-object header + fastavro.
        "topics_codec": {"encode": _rate(c.encode, records, n, repeat),
                         "decode": _rate(c.decode, messages, n, repeat)},
    }
    for lib in ("avro", "fastavro", "topics_codec"):
        result[lib] = {k: round(v) for k, v in result[lib].items()}
    result["fastavro_over_avro"] = {
        d: round(result["fastavro"][d] / result["avro"][d], 1) for d in ("encode", "decode")}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("codec", __doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="records per timed run")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs, best is kept")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", metavar="PATH", help="also write the JSON result to PATH")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    pool = 256  # distinct records, cycled: realistic variety without gigabytes of vectors
    result = {
        "unit": "records/s (best of repeat)",
        "n": args.n,
        "repeat": args.repeat,
        "dim": args.dim,
        "versions": {"python": platform.python_version(), "avro": avro.__version__,
                     "fastavro": fastavro.__version__},
        "listing": bench_schema("listing", make_listings(rng, pool), args.n, args.repeat),
        "listing_embedding": bench_schema(
            "listing_embedding", make_embeddings(rng, pool, args.dim), args.n, args.repeat),
    }
    text = json.dumps(result) if args.json else json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
