"""``samestyle simulate-clicks``: realistic click sessions from a data set with ground truth.

Simulates sessions over a listings data set (every rate a flag; defaults in :class:`ClickModel`)
and produces the clicks to ``click-events`` keyed by session id (SAMESTYLE_BOOTSTRAP), in session
order. The pseudo-categories the simulator falls back on are its own; the pairs agent never sees
them. The click model is described in docs/INTERNALS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from samestyle.models.data import ListingRecord, read_clusters, read_listings
from samestyle.topics import CLICK_EVENTS, codec_for_topic, topic_specs
from samestyle.topics.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from samestyle.streams.settings import Settings

T_START = 1_717_200_000_000  # 2024-06-01T00:00:00Z: simulated time, reproducible


@dataclass(frozen=True)
class ClickModel:
    """Rates and shapes of simulated behaviour (intent rates are per click and must sum to <= 1;
    whatever is left over goes to ``random``)."""

    product_rate: float = 0.50
    category_rate: float = 0.25
    cross_category_rate: float = 0.10
    random_rate: float = 0.15
    extra_clicks: float = 1.5
    page_size: int = 12
    position_bias: float = 1.0
    popular_items: int = 40
    query_rate: float = 0.3
    dwell_product_s: float = 45.0
    dwell_category_s: float = 15.0
    dwell_cross_s: float = 8.0
    dwell_random_s: float = 3.0
    dwell_sigma: float = 0.8

    def __post_init__(self) -> None:
        rates = (self.product_rate, self.category_rate, self.cross_category_rate, self.random_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1 + 1e-9:
            raise ConfigError(f"click intent rates must be >= 0 and sum to <= 1, got {rates}")
        if self.page_size < 4 or self.extra_clicks < 0 or self.position_bias < 0:
            raise ConfigError("page_size must be >= 4, extra_clicks and position_bias >= 0")


def pseudo_category(record: ListingRecord) -> str:
    """The listing's category, else its brand, else its first title word (simulator only)."""
    if record.category:
        return record.category
    brand = record.attributes.get("brand")
    if brand:
        return f"brand:{brand.casefold()}"
    words = record.title.split()
    return f"word:{words[0].casefold()}" if words else "unknown"


class ClickSimulator:
    """Draws sessions; ``sessions(n)`` yields click-event records (dicts of the click_event schema)."""

    def __init__(self, records: Sequence[ListingRecord], clusters: dict[str, str], model: ClickModel | None = None,
                 seed: int = 0) -> None:
        if not records:
            raise ConfigError("no listings to simulate clicks on")
        self.model = model or ClickModel()
        self.seed = seed
        self.ids = [r.listing_id for r in records]
        self.titles = {r.listing_id: r.title for r in records}
        self.cluster = {i: clusters.get(i, f"solo:{i}") for i in self.ids}
        self.category = {r.listing_id: pseudo_category(r) for r in records}
        self.by_cluster: dict[str, list[str]] = defaultdict(list)
        self.by_category: dict[str, list[str]] = defaultdict(list)
        for i in self.ids:
            self.by_cluster[self.cluster[i]].append(i)
            self.by_category[self.category[i]].append(i)
        rng = np.random.default_rng([seed, 1])
        n_popular = min(self.model.popular_items, len(self.ids))
        self.popular = [self.ids[k] for k in rng.choice(len(self.ids), n_popular, replace=False)]
        zipf = 1.0 / np.arange(1, n_popular + 1)
        self.popular_weights = zipf / zipf.sum()
        self._pages: dict[str, list[tuple[str, str]]] = {}

    def page(self, trigger: str) -> list[tuple[str, str]]:
        """The fixed page shown for ``trigger``: ``[(listing_id, kind)]`` in display order."""
        if trigger in self._pages:
            return self._pages[trigger]
        m = self.model
        rng = np.random.default_rng([self.seed, 2, zlib.crc32(trigger.encode())])
        mates = [i for i in self.by_cluster[self.cluster[trigger]] if i != trigger][: m.page_size // 3]
        same_cat = [i for i in self.by_category[self.category[trigger]]
                    if i != trigger and self.cluster[i] != self.cluster[trigger]]
        n_cat = min(len(same_cat), m.page_size // 2)
        cat = [same_cat[k] for k in rng.choice(len(same_cat), n_cat, replace=False)] if n_cat else []
        others = [p for p in self.popular if self.category[p] != self.category[trigger]]
        pop = [others[k] for k in rng.choice(len(others), min(2, len(others)), replace=False,
                                             p=_renorm([self.popular_weights[self.popular.index(o)] for o in others]))]
        page = [(i, "product") for i in mates] + [(i, "category") for i in cat] + [(i, "cross") for i in pop]
        taken = {trigger, *(i for i, _ in page)}
        while len(page) < m.page_size and len(taken) < len(self.ids):
            i = self.ids[int(rng.integers(len(self.ids)))]
            if i not in taken:
                taken.add(i)
                page.append((i, "filler"))
        order = rng.permutation(len(page))
        self._pages[trigger] = [page[k] for k in order]
        return self._pages[trigger]

    def sessions(self, n: int) -> Iterator[dict[str, Any]]:
        m = self.model
        rng = np.random.default_rng([self.seed, 3])
        n_users = max(1, n // 3)
        intents = ("product", "category", "cross", "random")
        probs = np.array([m.product_rate, m.category_rate, m.cross_category_rate, m.random_rate])
        probs = np.append(probs, max(0.0, 1 - probs.sum()))
        probs /= probs.sum()
        medians = {"product": m.dwell_product_s, "category": m.dwell_category_s, "cross": m.dwell_cross_s,
                   "random": m.dwell_random_s}
        for s in range(n):
            trigger = self.ids[int(rng.integers(len(self.ids)))]
            page = self.page(trigger)
            query = None
            if rng.random() < m.query_rate:
                query = " ".join(self.titles[trigger].split()[:3]) or None
            t = T_START + s * 2_000 + int(rng.integers(0, 1_000))
            session_id, user_id = f"s{self.seed}-{s}", f"u{int(rng.integers(n_users))}"
            for _ in range(1 + int(rng.poisson(m.extra_clicks))):
                k = int(rng.choice(len(probs), p=probs))
                intent = intents[k] if k < len(intents) else "random"
                clicked, position, intent = self._pick(rng, page, intent)
                dwell = int(1000 * medians[intent] * math.exp(m.dwell_sigma * rng.standard_normal()))
                t += int(rng.integers(3_000, 30_000))
                yield {"session_id": session_id, "user_id": user_id, "query": query, "trigger_id": trigger,
                       "clicked_id": clicked, "position": position, "dwell_ms": dwell, "event_time": t}
                t += dwell

    def _pick(self, rng: np.random.Generator, page: list[tuple[str, str]],
              intent: str) -> tuple[str, int | None, str]:
        for kind in {"product": ("product", "category"), "category": ("category",),
                     "cross": ("cross",)}.get(intent, ()):
            positions = [p for p, (_, k) in enumerate(page) if k == kind]
            if positions:
                w = _renorm([1.0 / (p + 1) ** self.model.position_bias for p in positions])
                pos = positions[int(rng.choice(len(positions), p=w))]
                return page[pos][0], pos, kind
        # Random click (or no candidate of the wanted kind): anywhere in the catalogue.
        return self.ids[int(rng.integers(len(self.ids)))], None, "random"


def _renorm(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(ClickModel):
        flag = "--" + f.name.replace("_", "-")
        parser.add_argument(flag, dest=f"sim_{f.name}", type=type(f.default), default=f.default,
                            help=f"click model: {f.name} (default {f.default})")


def model_from_args(args: argparse.Namespace) -> ClickModel:
    return ClickModel(**{f.name: getattr(args, f"sim_{f.name}") for f in fields(ClickModel)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samestyle simulate-clicks", description=__doc__.split("\n\n")[0])
    p.add_argument("--listings", type=Path, required=True, help="listings CSV in the common form")
    p.add_argument("--clusters", type=Path, required=True, help="clusters CSV (ground truth)")
    p.add_argument("--sessions", type=int, required=True, help="number of sessions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    p.add_argument("--bootstrap", help="Kafka bootstrap servers (env SAMESTYLE_BOOTSTRAP)")
    p.add_argument("--topic-prefix", dest="topic_prefix", help="prefix of every topic name")
    add_model_arguments(p)
    return p


async def produce_clicks(settings: Settings, clicks: Sequence[dict[str, Any]], progress: bool = False) -> int:
    """Send click-event records to ``click-events`` keyed by session id, in order; returns how many."""
    from samestyle.streams.io.producer import send_records

    codec = codec_for_topic(CLICK_EVENTS)
    topic = topic_specs(settings.topic_prefix, settings.partitions)[CLICK_EVENTS].name
    return await send_records(settings, topic, ((c["session_id"].encode(), codec.encode(c)) for c in clicks),
                              total=len(clicks), progress=progress, desc="clicks sent")


def main(argv: Sequence[str] | None = None) -> int:
    from samestyle.streams.settings import Settings

    args = build_parser().parse_args(argv)
    if args.sessions < 1:
        raise ConfigError("--sessions must be >= 1")
    settings = Settings.from_env(bootstrap=args.bootstrap, topic_prefix=args.topic_prefix)
    settings.bootstrap_servers  # a clear error when no broker is configured
    sim = ClickSimulator(read_listings(args.listings), read_clusters(args.clusters), model_from_args(args), args.seed)
    topic = topic_specs(settings.topic_prefix, settings.partitions)[CLICK_EVENTS].name
    clicks = list(sim.sessions(args.sessions))
    started = time.monotonic()
    sent = asyncio.run(produce_clicks(settings, clicks, progress=sys.stderr.isatty()))
    summary = {"sessions": args.sessions, "clicks": sent, "topic": topic, "seed": args.seed,
               "seconds": round(time.monotonic() - started, 2)}
    print(json.dumps(summary, sort_keys=True) if args.json else f"sent {sent} clicks ({args.sessions} sessions) to {topic}")
    return 0


__all__ = ["ClickModel", "ClickSimulator", "main", "produce_clicks", "pseudo_category"]
