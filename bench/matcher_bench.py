"""What a matcher's product memory costs the index agent: featurizing one batch with and without it.

The batch is the index agent's: ``--queries`` listings searched, each with its ``--k`` nearest
neighbours scored. Queries are the memory's own listings arriving again under new ids (so the
memory knows their products, as for a shop re-listing one), their neighbours the nearest other
listings of the memory, with their match texts. Both featurizations run on the same candidates,
alternated, ``--repeat`` times per round; the JSON has the median milliseconds per batch of each
and their ratio.

    .venv/bin/samestyle bench matcher --model runs/models/abt_buy_gt --json
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from bench.common import bench_parser, machine_info, median, ratio, rounded
from samestyle.models.encoder import PairCandidate
from samestyle.models.matcher import MEMORY_FEATURES, Matcher, load_matcher
from samestyle.topics.errors import ConfigError


def batch_of(matcher: Matcher, queries: int, k: int, seed: int = 0) -> list[PairCandidate]:
    """``queries`` × ``k`` candidate pairs drawn from the matcher's memory (see the module doc)."""
    memory = matcher.memory
    if memory is None or memory.texts is None:
        raise ConfigError("this model's matcher keeps no product memory: nothing to measure "
                          "(refit it with `samestyle train --refit-matcher DIR --product-memory on`)")
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(memory), size=min(queries, len(memory)), replace=False)
    out = []
    for q, row in enumerate(rows):
        sims = memory.matrix @ memory.matrix[row]
        sims[row] = -np.inf
        nearest = np.argsort(-sims)[:k]
        for rank, other in enumerate(nearest):
            best_other = float(sims[nearest[1 if rank == 0 else 0]]) if len(nearest) > 1 else -1.0
            out.append(PairCandidate(memory.texts[row], memory.texts[other], float(sims[other]), rank, best_other,
                                     id_a=f"bench-query-{q}", id_b=memory.ids[other],
                                     vector_a=memory.matrix[row], vector_b=memory.matrix[other]))
    return out


def _timed(f: Callable[[], object]) -> float:
    start = time.perf_counter()
    f()
    return (time.perf_counter() - start) * 1000.0


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser("matcher", __doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a model directory whose matcher has a memory")
    parser.add_argument("--queries", type=int, default=32, help="listings searched per batch (default 32)")
    parser.add_argument("--k", type=int, default=10, help="neighbours scored per listing (default 10)")
    parser.add_argument("--repeat", type=int, default=7, help="timed runs of each per round (default 7)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)

    matcher = load_matcher(args.model)
    if matcher is None:
        raise ConfigError(f"{args.model}: no matcher")
    candidates = batch_of(matcher, args.queries, args.k)
    plain = [n for n in matcher.features if n not in MEMORY_FEATURES]

    def without() -> object:
        return matcher.featurizer.features(candidates, plain, None)

    def with_memory() -> object:
        return matcher.featurizer.features(candidates, matcher.features, matcher.memory)

    with_memory()  # the memory's own trigram rows are built on first use
    rounds = []
    for _ in range(args.rounds):
        times: dict[str, list[float]] = {"without_memory": [], "with_memory": []}
        for _ in range(args.repeat):
            times["without_memory"].append(_timed(without))
            times["with_memory"].append(_timed(with_memory))
        rounds.append({name: rounded(median(values)) for name, values in times.items()})
    without_ms = median([r["without_memory"] for r in rounds])
    with_ms = median([r["with_memory"] for r in rounds])
    result = {
        "model": str(args.model),
        "unit": "ms per batch (median)",
        "pairs_per_batch": len(candidates),
        "memory_listings": len(matcher.memory),  # type: ignore[arg-type]
        "memory_products": matcher.memory.products,  # type: ignore[union-attr]
        "features_without_memory_ms": rounded(without_ms),
        "features_with_memory_ms": rounded(with_ms),
        "ratio_with_over_without": rounded(ratio(with_ms, without_ms)),
        "rounds": rounds,
        "machine": machine_info(),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
