"""The ``samestyle`` command line. ``main(argv)`` is what the console script and the tests call."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from samestyle.streams.settings import Settings
from samestyle.topics.errors import ConfigError, SamestyleError

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
    demo.add_argument("--serve", action="store_true",
                      help="keep the worker running and serve the search page (printed URL) until Ctrl-C")
    learn = demo.add_argument_group("the learning loop (--learn; docs/RETRAIN.md)")
    learn.add_argument("--learn", action="store_true",
                       help="simulate clicks on --listings/--clusters with some products held out, let the workers "
                            "mine pairs and the trainer promote a candidate, watch the switch, print before/after")
    learn.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    learn.add_argument("--sessions", type=int, help="click sessions to simulate (default: 4 per clickable listing)")
    learn.add_argument("--holdout-fraction", dest="holdout_fraction", type=float, default=0.5,
                       help="products without clicks: half the trainer's valid set, half measured (default 0.5)")
    learn.add_argument("--epochs", type=int, default=1, help="the trainer's candidate epochs (default 1)")
    learn.add_argument("--train-batch-size", dest="train_batch_size", type=int, default=64,
                       help="the trainer's candidate batch size (default 64)")
    learn.add_argument("--seed", type=int, default=0, help="the split, the clicks and the candidate (default 0)")

    worker = sub.add_parser("worker", help="run a worker against the configured broker (embed, index and, "
                                            "unless SAMESTYLE_PAIRS_ENABLED=0, the click-pairs agents)")
    _add_common(worker)
    worker.add_argument("--encoder", help="encoder spec: default, a JSON config or a model directory")

    pairs = sub.add_parser("pairs-worker", help="run a worker with the click-pairs agents, whatever "
                                                "SAMESTYLE_PAIRS_ENABLED says")
    _add_common(pairs)
    pairs.add_argument("--encoder", help="encoder spec: default, a JSON config or a model directory")

    produce = sub.add_parser("produce", help="send a listings CSV to the listings topic")
    _add_common(produce)
    produce.add_argument("listings", type=Path, help="listings CSV in the common form")
    produce.add_argument("--limit", type=int)
    produce.add_argument("--image-mode", choices=("uri", "bytes"), default="uri")

    # Listed for --help; main() hands their arguments to the module's own parser.
    sub.add_parser("bench", help="benchmarks: `samestyle bench NAME --help` (pipeline, freshness, index, codec, ...)")
    sub.add_parser("train", help="train the unified model (`samestyle train --help`)")
    sub.add_parser("eval", help="evaluate a model on a dataset (`samestyle eval --help`)")
    sub.add_parser("simulate-clicks", help="produce simulated click sessions to click-events")
    sub.add_parser("pairs-report", help="score the mined positive pairs against clusters")
    sub.add_parser("trainer", help="retrain from mined positive pairs, promote only what beats the current model")

    topics = sub.add_parser("create-topics", help="create every topic with the registry's partitions")
    _add_common(topics)

    tail = sub.add_parser("tail", help="print a topic's records decoded, one JSON object per line",
                          description="Print a topic's records decoded, one JSON object per line (vectors as "
                                      "dimension and norm, bytes by length). Default: the last 10 records.")
    _add_common(tail)
    tail.add_argument("topic", help="a topic of the registry (listings, duplicate-alerts, dead-letters, ...) "
                                    "or its full, prefixed name")
    tail.add_argument("--from-beginning", dest="from_beginning", action="store_true",
                      help="start at the first record (default: the last --limit records)")
    tail.add_argument("-f", "--follow", action="store_true", help="then keep printing records as they arrive")
    tail.add_argument("-n", "--limit", type=int,
                      help="how many: the last N (default 10), or with --from-beginning the first N")
    tail.add_argument("--key", help="only records with this key (a listing id, for most topics)")
    tail.add_argument("--timeout", type=float, default=30.0, help="seconds to read up to the end of the log")
    return parser


#: Subcommands whose arguments belong to another module's own parser: ``samestyle NAME ARGS`` is
#: ``MODULE.main(ARGS)`` (argparse's REMAINDER cannot pass a leading ``--help`` through).
FORWARDED = {
    "train": "samestyle.models.train.finetune",
    "eval": "samestyle.models.train.evaluate",
    "simulate-clicks": "samestyle.streams.dev.simulate",
    "pairs-report": "samestyle.streams.dev.pairs_report",
    "trainer": "samestyle.streams.trainer.service",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and (argv[0] in FORWARDED or argv[0] == "bench"):
        return _forward(argv)
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return _dispatch(args)
    except SamestyleError as exc:
        print(f"samestyle: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _checkout_with_benches() -> Path | None:
    """The source checkout whose ``bench/`` folder holds the benchmark scripts, if any."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "bench" / "common.py").is_file():
            return root
    return None


def _forward(argv: list[str]) -> int:
    import importlib

    _configure_logging(verbose=False)
    if argv[0] == "bench":
        if len(argv) < 2 or argv[1].startswith("-"):
            print("usage: samestyle bench NAME [ARGS...]  (NAME: a bench/NAME_bench.py script)", file=sys.stderr)
            return 2
        name, rest = f"bench.{argv[1].replace('-', '_')}_bench", argv[2:]
        checkout = _checkout_with_benches()
        if checkout is None:
            print("samestyle: error: bench: the benches are scripts in a source checkout's bench/ "
                  "folder (run this from a checkout, or from an editable install)", file=sys.stderr)
            return 2
        if str(checkout) not in sys.path:
            sys.path.insert(0, str(checkout))
    else:
        name, rest = FORWARDED[argv[0]], argv[1:]
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:
            raise
        what = " ".join(argv[:2]) if argv[0] == "bench" else argv[0]
        print(f"samestyle: error: {what}: not available ({name} is missing)", file=sys.stderr)
        return 2
    try:
        return int(module.main(rest) or 0)
    except SamestyleError as exc:
        print(f"samestyle: error: {exc}", file=sys.stderr)
        return 2


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("kafka", "aiokafka", "faiss.loader"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _dispatch(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.schema_dir is not None:
        from samestyle.topics.codec import use_schema_dir

        use_schema_dir(settings.schema_dir)  # before any codec is built: every topic reads with it
    if args.command in ("worker", "pairs-worker"):
        from samestyle.streams.worker.process import run_worker

        settings.bootstrap_servers  # fails with a clear message when none is configured
        return run_worker(settings, pairs=True if args.command == "pairs-worker" else None)
    if args.command == "create-topics":
        from samestyle.streams.dev.broker import create_topics
        from samestyle.topics import topic_specs

        # app_id: the Faust tables' changelogs are created up front too (BROKER.md trap 2).
        create_topics(",".join(settings.bootstrap_servers),
                      topic_specs(settings.topic_prefix, settings.partitions, app_id=settings.app_id).values())
        return 0
    if args.command == "produce":
        from samestyle.models.data import read_listings
        from samestyle.streams.io.producer import listing_message, produce_listings
        from samestyle.topics import LISTINGS, topic_specs

        records = read_listings(args.listings, limit=args.limit)
        messages = [listing_message(r, image_mode=args.image_mode) for r in records]
        spec = topic_specs(settings.topic_prefix, settings.partitions)[LISTINGS]
        sent = asyncio.run(produce_listings(settings, spec, messages, progress=sys.stderr.isatty()))
        print(f"sent {sent} listings to {spec.name}")
        return 0
    if args.command == "tail":
        from samestyle.streams.io.tail import TailRequest, tail

        request = TailRequest(args.topic, from_beginning=args.from_beginning, follow=args.follow, limit=args.limit,
                              key=args.key, timeout=args.timeout)
        settings.bootstrap_servers  # fails with a clear message when none is configured

        def write(line: str) -> None:
            print(line, flush=True)

        try:
            asyncio.run(tail(settings, request, write))
        except BrokenPipeError:  # `samestyle tail ... | head`: the reader has all it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    if args.command == "demo":
        from samestyle.streams.dev.demo import dumps, format_summary, run_demo

        if not args.json:
            logging.getLogger().setLevel(logging.WARNING if not args.verbose else logging.DEBUG)
        if args.learn:
            from samestyle.streams.dev.learn import LearnConfig, format_learn, run_learn

            if args.serve:
                raise ConfigError("--learn and --serve do not go together")
            config = LearnConfig(holdout_fraction=args.holdout_fraction, sessions=args.sessions, workers=args.workers,
                                 epochs=args.epochs, batch_size=args.train_batch_size, seed=args.seed,
                                 # Random weights are for tests: their candidates train tiny backbones.
                                 base="tiny" if settings.allow_random_weights else "default", timeout=args.timeout)
            summary = run_learn(settings, args.listings, args.clusters, config, limit=args.limit,
                                image_mode=args.image_mode, progress=sys.stderr.isatty())
            print(dumps(summary) if args.json else format_summary(summary) + "\n" + format_learn(summary["learn"]))
            return 0

        def announce(summary: dict, url: str) -> None:
            print(dumps(summary) if args.json else format_summary(summary), flush=True)
            # With --json, stdout stays one JSON object.
            print(f"search page: {url}  (API: {url}openapi.json; Ctrl-C to stop)", flush=True,
                  file=sys.stderr if args.json else sys.stdout)

        summary = run_demo(settings, args.listings, args.clusters, limit=args.limit, timeout=args.timeout,
                           image_mode=args.image_mode, serve=announce if args.serve else None)
        if not args.serve:
            print(dumps(summary) if args.json else format_summary(summary))
        return 0
    raise AssertionError(f"unhandled command {args.command}")


if __name__ == "__main__":
    sys.exit(main())
