"""Listings/s of the served model under each inference runtime, and what each costs in recall.

Speed: for each evaluation set, one encoder per runtime (``models/runtime.py``) is loaded from the
model directory; each is warmed up, then the runtimes take turns (``--rounds`` rounds, the order
rotating every round) encoding the same ``--n`` listings in batches of ``--batch-size`` the way
the embed step does (``prepare`` each listing, ``embed`` per batch). A runtime's rate is the median
of its rounds; ``ratio_to_eager`` divides it by eager's median, and ``round_ratios_median`` is the
median of the per-round ratios (the steadier figure on a loaded machine).

Quality: each runtime embeds the whole set and its recall@10 is compared with eager float32's on
the same queries: Abt-Buy ``full_gt`` with the queries restricted to the products the model held
out from training (``--model``, text only), and Grocery's val photos against the catalogue
(``--image-model``, images). ``quality_holds`` means every reported view's recall@10 is within
``--tolerance`` (0.005) of float32's; ``cosine_to_eager_min`` is the lowest cosine between a
listing's IT vector and its float32 one.

    samestyle bench encoder --json [--runtimes eager,channels-last,int8,bf16] [--torch-threads 1]
        [--model runs/models/abt_buy_gt] [--image-model runs/models/grocery] [--plot encoder.png]

``fastest_holding`` names, per set, the fastest runtime whose quality holds; ``auto`` is what
``SAMESTYLE_ENCODER_RUNTIME=auto`` picks on this machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import bench_parser, finish, machine_info, rounded_tree, setup_logging, time_encoder

TOLERANCE = 0.005
GOAL_RATIO = 2.0
DATA = Path("../shared/data")


def _runtime_list(text: str) -> list[str]:
    from samestyle.models.runtime import RUNTIMES

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNTIMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"runtimes must be among {list(RUNTIMES)}, got {text!r}")
    return ["eager", *[n for n in dict.fromkeys(names) if n != "eager"]]


def build_parser() -> argparse.ArgumentParser:
    p = bench_parser("encoder", __doc__.splitlines()[0], plot="write a PNG bar chart of listings/s to PATH")
    p.add_argument("--model", default="runs/models/abt_buy_gt",
                   help="text model directory, measured on Abt-Buy full_gt ('' to skip)")
    p.add_argument("--image-model", default="runs/models/grocery",
                   help="image model directory, measured on Grocery val photos ('' to skip)")
    p.add_argument("--data", type=Path, default=DATA, help="the shared data folder (default ../shared/data)")
    p.add_argument("--runtimes", type=_runtime_list, default=_runtime_list("eager,channels-last,int8,bf16"),
                   help="comma list of runtimes; eager is always measured (default eager,channels-last,int8,bf16)")
    p.add_argument("--batch-size", type=int, default=32, help="listings per forward pass (default 32)")
    p.add_argument("--n", type=int, default=256, help="listings timed per runtime and round (default 256)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per runtime (default 3)")
    p.add_argument("--warmup-batches", type=int, default=2, help="untimed batches per runtime first (default 2)")
    p.add_argument("--torch-threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--skip-quality", action="store_true", help="speed only")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, help="largest recall@10 change that holds (0.005)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--allow-random-weights", action="store_true", help="tests only (tiny model directories)")
    return p


@dataclass(frozen=True)
class EvalSet:
    """A model and the listings it is measured on: queries against a gallery, per view pair."""

    name: str
    model: str
    listings: Path
    clusters: Path
    with_images: bool
    view_pairs: tuple[tuple[str, str], ...]
    split_column: str | None = None
    query_split: str | None = None
    gallery_split: str | None = None


def eval_sets(args: argparse.Namespace) -> list[EvalSet]:
    sets = []
    if args.model:
        base = args.data / "abt_buy" / "full_gt"
        sets.append(EvalSet("abt_buy_full_gt", args.model, base / "listings.csv", base / "clusters.csv",
                            with_images=False, view_pairs=(("T", "T"), ("IT", "IT"))))
    if args.image_model:
        base = args.data / "grocery_store_images"
        sets.append(EvalSet("grocery_val_photos", args.image_model, base / "listings.csv", base / "clusters.csv",
                            with_images=True, view_pairs=(("IT", "IT"), ("I", "IT"), ("I", "I")),
                            split_column="split", query_split="val", gallery_split="catalog"))
    return sets


def speed(encoders: dict[str, Any], inputs: Sequence[Any], batch_size: int, rounds: int,
          warmup_batches: int) -> dict[str, Any]:
    """Listings/s of each encoder on ``inputs``, the runtimes alternating within every round."""
    names = list(encoders)
    for name in names:
        started = time.perf_counter()
        for _ in range(warmup_batches):
            time_encoder(encoders[name], inputs[:batch_size], batch_size)
        print(f"  warm-up {name}: {time.perf_counter() - started:.1f} s", file=sys.stderr)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]  # no runtime always goes first
        for name in order:
            seconds, _ = time_encoder(encoders[name], inputs, batch_size)
            rates[name].append(len(inputs) / seconds)
        summary = ", ".join(f"{n} {rates[n][-1]:.1f}/s" for n in names)
        print(f"  round {r + 1}: {summary}", file=sys.stderr)
    eager = statistics.median(rates["eager"])
    out = {}
    for name in names:
        med = statistics.median(rates[name])
        out[name] = {
            "listings_per_second": med,
            "runs_listings_per_second": rates[name],
            "ratio_to_eager": med / eager,
            "round_ratios_median": statistics.median(a / b for a, b in zip(rates[name], rates["eager"])),
        }
    return out


def recall_at_10(emb: Any, setup: Any, view_pairs: Sequence[tuple[str, str]]) -> dict[str, float]:
    """recall@10 per view pair (``"Q->G"``), as ``samestyle eval`` counts it."""
    from samestyle.models.train.metrics import retrieval_metrics

    views = {"I": emb.image, "T": emb.text, "IT": emb.image_text}
    has = {"I": emb.has_image, "T": emb.has_text, "IT": emb.has_image | emb.has_text}
    out = {}
    for qv, gv in view_pairs:
        keep = has[qv][setup.q]
        q = setup.q[keep]
        gallery_ok = has[gv][setup.g]
        if len(q) == 0 or not gallery_ok.any():
            continue
        sim = views[qv][q] @ views[gv][setup.g].T  # [Q, G]
        exclude = setup.same[keep] | ~gallery_ok[None, :]
        metrics = retrieval_metrics(sim, setup.clusters[q], setup.clusters[setup.g], exclude)
        if metrics.get("queries"):
            out[f"{qv}->{gv}"] = metrics["recall_at_10"]
    return out


def quality(encoders: dict[str, Any], ev: EvalSet, records: Sequence[Any], batch_size: int,
            tolerance: float) -> dict[str, Any]:
    """Every runtime's recall@10 on the whole set against eager float32's."""
    from samestyle.models.train.evaluate import embed_records, run_clusters

    setup = run_clusters(records, ev.clusters, model=ev.model, split_column=ev.split_column,
                         query_split=ev.query_split, gallery_split=ev.gallery_split)
    embedded = {}
    for name, encoder in encoders.items():
        started = time.perf_counter()
        embedded[name] = embed_records(encoder, records, with_images=ev.with_images, batch_size=batch_size,
                                       progress=False, label=name)[0]
        print(f"  embedded {len(records)} listings with {name} in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    reference = recall_at_10(embedded["eager"], setup, ev.view_pairs)
    out: dict[str, Any] = {"setup": setup.info}
    for name, emb in embedded.items():
        recall = recall_at_10(emb, setup, ev.view_pairs)
        delta = {k: recall[k] - reference[k] for k in reference}
        cosine = np.sum(emb.image_text * embedded["eager"].image_text, axis=1)  # [n]
        worst = max((abs(d) for d in delta.values()), default=0.0)
        out[name] = {
            "recall_at_10": recall,
            "recall_at_10_delta": delta,
            "max_abs_delta": worst,
            "quality_holds": worst <= tolerance + 1e-12,
            "cosine_to_eager_min": float(cosine.min()),
            "cosine_to_eager_mean": float(cosine.mean()),
        }
    return out


def measure_set(ev: EvalSet, args: argparse.Namespace) -> dict[str, Any]:
    from samestyle.models.data import read_listings
    from samestyle.models.factory import encoder_from_spec
    from samestyle.models.features import listing_input

    records = read_listings(ev.listings)
    if ev.split_column:
        import csv

        with ev.clusters.open(encoding="utf-8-sig", newline="") as fh:
            split = {r["listing_id"]: r[ev.split_column] for r in csv.DictReader(fh)}
        records = [r for r in records if split.get(r.listing_id) in (ev.query_split, ev.gallery_split)]
    print(f"{ev.name}: {ev.model}, {len(records)} listings", file=sys.stderr)
    encoders = {name: encoder_from_spec(ev.model, args.device, allow_random_weights=args.allow_random_weights,
                                        runtime=name) for name in args.runtimes}
    # Timed on the first --n listings of the set (photos first for the image set: the val photos
    # are what a shopper sends), repeated if the set is smaller.
    ordered = sorted(records, key=lambda r: not r.image_path) if ev.with_images else list(records)
    timed = [listing_input(r, with_image=ev.with_images) for r in ordered[:args.n]]
    while len(timed) < args.n:
        timed += timed[:args.n - len(timed)]
    result: dict[str, Any] = {"model": ev.model, "version": next(iter(encoders.values())).version,
                              "listings": len(records), "timed_listings": len(timed),
                              "timed_with_images": sum(1 for x in timed if x.image is not None)}
    result["speed"] = speed(encoders, timed, args.batch_size, args.rounds, args.warmup_batches)
    if not args.skip_quality:
        result["quality"] = quality(encoders, ev, records, args.batch_size, args.tolerance)
    holding = [n for n in args.runtimes
               if args.skip_quality or result["quality"][n]["quality_holds"]]
    result["fastest_holding"] = max(holding, key=lambda n: result["speed"][n]["listings_per_second"])
    return result


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(result["sets"])
    fig, axes = plt.subplots(1, len(sets), figsize=(5 * len(sets), 3.4), dpi=80, squeeze=False)
    for ax, name in zip(axes[0], sets):
        speed_ = result["sets"][name]["speed"]
        names = list(speed_)
        bars = ax.bar(names, [speed_[n]["listings_per_second"] for n in names], color="#3b75af")
        ax.bar_label(bars, labels=[f"{speed_[n]['ratio_to_eager']:.2f}x" for n in names])
        ax.set_ylabel("listings / s")
        ax.set_title(f"{name}, batch {result['batch_size']}", fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 or args.batch_size < 1 or args.rounds < 1 or args.warmup_batches < 0:
        raise SystemExit("--n, --batch-size and --rounds must be >= 1, --warmup-batches >= 0")
    setup_logging()
    import torch

    from samestyle.models.runtime import default_runtime

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sets = eval_sets(args)
    if not sets:
        raise SystemExit("nothing to measure: --model and --image-model are both empty")
    result: dict[str, Any] = {
        "runtimes": args.runtimes,
        "batch_size": args.batch_size,
        "n": args.n,
        "rounds": args.rounds,
        "tolerance": args.tolerance,
        "device": args.device,
        "auto": default_runtime(args.device),
        "torch_threads": torch.get_num_threads(),
        "goal_ratio": GOAL_RATIO,
        "sets": {ev.name: measure_set(ev, args) for ev in sets},
    }
    auto = result["auto"]
    result["auto_ratio_to_eager"] = {name: s["speed"][auto]["ratio_to_eager"] if auto in s["speed"] else None
                                     for name, s in result["sets"].items()}
    result["goal_met"] = all(
        s["speed"].get(auto, {}).get("ratio_to_eager", 0.0) >= GOAL_RATIO
        and (args.skip_quality or s["quality"].get(auto, {}).get("quality_holds", False))
        for s in result["sets"].values())
    result["machine"] = machine_info()
    return finish(rounded_tree(result), args, _plot)


if __name__ == "__main__":
    sys.exit(main())
