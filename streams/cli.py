"""The ``samestyle`` command line. ``main(argv)`` is what the console script and the tests call."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from topics.errors import ConfigError, SamestyleError

from .settings import Settings

log = logging.getLogger("samestyle")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {name: getattr(args, name, None) for name in ("bootstrap", "encoder", "duplicate_threshold", "top_k",
                                                            "batch_size", "topic_prefix")}
    return Settings.from_env(**overrides)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", help="Kafka bootstrap servers host:port[,...] (env SAMESTYLE_BOOTSTRAP)")
    p.add_argument("--topic-prefix", dest="topic_prefix", help="prefix of every topic name")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samestyle",
        description="Same-style product retrieval and duplicate-listing detection on a Kafka stream.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="embedded broker + a worker + listings in; print a summary")
    _add_common(demo)
    demo.add_argument("--listings", type=Path, help="listings CSV in the common form (default: a generated sample)")
    demo.add_argument("--clusters", type=Path, help="clusters CSV: score the duplicate alerts against it")
    demo.add_argument("--limit", type=int, help="only the first N listings")
    demo.add_argument("--encoder", help="encoder spec: default, a JSON config or a model directory")
    demo.add_argument("--duplicate-threshold", dest="duplicate_threshold", type=float)
    demo.add_argument("--top-k", dest="top_k", type=int)
    demo.add_argument("--batch-size", dest="batch_size", type=int)
    demo.add_argument("--image-mode", choices=("uri", "bytes"), default="uri",
                      help="send images as local paths (uri) or inline bytes")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every listing")
    demo.add_argument("--json", action="store_true", help="print one JSON object instead of a table")

    worker = sub.add_parser("worker", help="run a worker against the configured broker")
    _add_common(worker)
    worker.add_argument("--encoder", help="encoder spec: default, a JSON config or a model directory")

    produce = sub.add_parser("produce", help="send a listings CSV to the listings topic")
    _add_common(produce)
    produce.add_argument("listings", type=Path, help="listings CSV in the common form")
    produce.add_argument("--limit", type=int)
    produce.add_argument("--image-mode", choices=("uri", "bytes"), default="uri")

    bench = sub.add_parser("bench", help="benchmarks (scripts in bench/): pipeline, freshness, clicks, index, codec",
                           add_help=False)
    bench.add_argument("name", help="which benchmark; `samestyle bench NAME --help` for its options")
    bench.add_argument("args", nargs=argparse.REMAINDER)

    for name, module, text in (("train", "models.train", "train the unified model (models/train.py)"),
                               ("eval", "models.evaluate", "evaluate a model on a dataset (models/evaluate.py)"),
                               ("simulate-clicks", "streams.simulate",
                                "produce simulated click sessions to click-events (streams/simulate.py)"),
                               ("pairs-report", "streams.pairs_report",
                                "score the mined positive pairs against clusters (streams/pairs_report.py)")):
        forward = sub.add_parser(name, help=text, add_help=False)
        forward.set_defaults(module=module)
        forward.add_argument("args", nargs=argparse.REMAINDER)

    topics = sub.add_parser("create-topics", help="create every topic with the registry's partitions")
    _add_common(topics)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kafka", "aiokafka", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return _dispatch(args)
    except SamestyleError as exc:
        print(f"samestyle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "bench":
        import importlib

        try:
            module = importlib.import_module(f"bench.{args.name.replace('-', '_')}_bench")
        except ModuleNotFoundError:
            raise ConfigError(f"no benchmark named {args.name!r}") from None
        return int(module.main(args.args) or 0)
    if getattr(args, "module", None):
        import importlib

        return int(importlib.import_module(args.module).main(args.args) or 0)
    settings = _settings(args)
    if args.command == "worker":
        from .worker import run_worker

        settings.bootstrap_servers  # fails with a clear message when none is configured
        return run_worker(settings)
    if args.command == "create-topics":
        from topics import topic_specs

        from .broker import create_topics

        create_topics(",".join(settings.bootstrap_servers), topic_specs(settings.topic_prefix, settings.partitions).values())
        return 0
    if args.command == "produce":
        from models.data import read_listings
        from topics import LISTINGS, topic_specs

        from .io import listing_message, produce_listings

        records = read_listings(args.listings, limit=args.limit)
        messages = [listing_message(r, image_mode=args.image_mode) for r in records]
        spec = topic_specs(settings.topic_prefix, settings.partitions)[LISTINGS]
        sent = asyncio.run(produce_listings(settings, spec, messages, progress=sys.stderr.isatty()))
        print(f"sent {sent} listings to {spec.name}")
        return 0
    if args.command == "demo":
        from .demo import dumps, format_summary, run_demo

        if not args.json:
            logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
        summary = run_demo(settings, args.listings, args.clusters, limit=args.limit, timeout=args.timeout,
                           image_mode=args.image_mode)
        print(dumps(summary) if args.json else format_summary(summary))
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
