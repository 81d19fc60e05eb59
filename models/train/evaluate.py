"""``samestyle eval``: retrieval and pairwise metrics of a model, beside two baselines.

    samestyle eval --model DIR --listings L.csv --clusters C.csv [--json] [--report DIR]
    samestyle eval --model DIR --listings L.csv --pairs TEST.csv --valid-pairs VALID.csv [--json]

Clusters mode: recall@1/5/10/20 and MRR per view pair (only held-out products are queried when the
model held some out). Pairs mode: precision/recall/F1 at the F1-best threshold on ``--valid-pairs``.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from samestyle.models.data import ListingRecord, read_clusters, read_listings, read_pairs
from samestyle.models.encoder import Embeddings, Encoder, PairCandidate
from samestyle.models.factory import encoder_from_spec
from samestyle.models.features import listing_input
from samestyle.models.train.finetune import TRAINING_SPLITS, arrival_order, candidates_for
from samestyle.models.train.metrics import (
    KS,
    best_threshold,
    pair_metrics,
    retrieval_metrics,
    tfidf_similarity,
    tfidf_vectors,
)
from samestyle.topics.errors import ConfigError, ImageError, InvalidListingError

logger = logging.getLogger(__name__)

#: Dense candidates per query that the matcher re-ranks.
RERANK_K = 20

__all__ = ["main", "build_parser"]

VIEW_PAIRS_TEXT = (("T", "T"), ("IT", "IT"))
VIEW_PAIRS_IMAGE = (
    ("T", "T"), ("IT", "IT"), ("I", "I"), ("I", "IT"), ("T", "IT"), ("IT", "I"), ("IT", "T"),
    ("T", "I"), ("I", "T"),
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="samestyle eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory, or an encoder spec (default, tiny)")
    p.add_argument("--listings", required=True, type=Path)
    p.add_argument("--clusters", type=Path)
    p.add_argument("--pairs", type=Path, help="pairs to report on (e.g. the test split)")
    p.add_argument("--valid-pairs", type=Path, help="pairs the threshold is chosen on")
    p.add_argument("--split-column", default=None, help="clusters column naming each row's split")
    p.add_argument("--query-split", default=None)
    p.add_argument("--gallery-split", default=None)
    p.add_argument("--baselines", default="tfidf,default", help="comma list of tfidf, default; '' for none")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", type=Path, help="write report.md and PNG plots here")
    p.add_argument("--no-images", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--allow-random-weights", action="store_true", help="tests only")
    p.add_argument("--no-progress", action="store_true")
    return p


# --------------------------------------------------------------------------------- helpers


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_model(spec: str, device: str | None, allow_random_weights: bool) -> Encoder:
    """A trained unified model directory, or any encoder spec ``encoder_from_spec`` takes."""
    from samestyle.models.unified import is_unified_model_dir, load_unified_model

    if is_unified_model_dir(spec):
        import torch

        dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return load_unified_model(spec, dev, allow_random_weights=allow_random_weights)
    return encoder_from_spec(spec, device, allow_random_weights=allow_random_weights)


def _manifest(spec: str) -> dict[str, Any]:
    path = Path(spec) / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def embed_records(
    encoder: Encoder, records: Sequence[ListingRecord], *, with_images: bool, batch_size: int,
    progress: bool, label: str, want_tokens: bool = False,
) -> tuple[Embeddings, list[str], Any]:
    """Embed listings as the stream would (an unreadable image leaves the listing text-only).
    Returns the embeddings, the encoder's texts, and fused tokens when ``want_tokens``."""
    from tqdm import tqdm

    prepared = []
    for record in records:
        try:
            prepared.append(encoder.prepare(listing_input(record, with_image=with_images)))
        except ImageError as exc:
            logger.warning("listing %s: image ignored (%s)", record.listing_id, exc)
            try:
                prepared.append(encoder.prepare(listing_input(record, with_image=False)))
            except InvalidListingError as inner:
                raise ConfigError(f"listing {record.listing_id!r} cannot be evaluated: its image is "
                                  f"unreadable ({exc}) and {inner}") from inner
        except InvalidListingError as exc:
            hint = " (it has no title: drop --no-images)" if not with_images and record.image_path else ""
            raise ConfigError(f"listing {record.listing_id!r} cannot be evaluated: {exc}{hint}") from exc
    parts, tokens = [], []
    for start in tqdm(range(0, len(prepared), batch_size), desc=f"embed {label}", disable=not progress):
        chunk = prepared[start : start + batch_size]
        parts.append(encoder.embed(chunk))
        if want_tokens:
            tokens.extend(encoder.fuse(chunk)[1])  # type: ignore[attr-defined]
    emb = Embeddings(
        image=np.concatenate([e.image for e in parts]),
        text=np.concatenate([e.text for e in parts]),
        image_text=np.concatenate([e.image_text for e in parts]),
        has_image=np.concatenate([e.has_image for e in parts]),
        has_text=np.array([bool(p.text) for p in prepared]),
    )
    return emb, [p.text for p in prepared], tokens


def _split_rows(path: Path, column: str) -> dict[str, str]:
    with path.open(encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if rows and column not in rows[0]:
        raise ConfigError(f"{path}: no column {column!r}")
    return {r["listing_id"]: r[column] for r in rows}


# ------------------------------------------------------------------------------ clusters mode


def _retrieval(
    emb: Embeddings, q: np.ndarray, g: np.ndarray, clusters: np.ndarray,
    pairs: Sequence[tuple[str, str]], same: np.ndarray,
) -> dict[str, Any]:
    """Retrieval metrics per view pair. A query without the query view (an I query of a
    text-only listing, a T query of a photo) is left out; a gallery item without the gallery
    view is excluded from the ranking. View pairs with no query or no gallery item are skipped."""
    has = {"I": emb.has_image, "T": emb.has_text, "IT": emb.has_image | emb.has_text}
    views = _views(emb)
    out: dict[str, Any] = {}
    for qv, gv in pairs:
        keep = has[qv][q]  # [len(q)]
        qrows = q[keep]
        gallery_ok = has[gv][g]  # [G]
        if len(qrows) == 0 or not gallery_ok.any():
            continue
        sim = views[qv][qrows] @ views[gv][g].T  # [Q, G]
        exclude = same[keep] | ~gallery_ok[None, :]
        out[f"{qv}->{gv}"] = retrieval_metrics(sim, clusters[qrows], clusters[g], exclude)
    return out


def _reranked(model: Encoder, records: Sequence[ListingRecord], emb: Embeddings, q: np.ndarray, g: np.ndarray,
              clusters: np.ndarray, same: np.ndarray, k: int = RERANK_K) -> dict[str, Any]:
    """IT→IT retrieval with the dense top-``k`` of each query re-ordered by the matcher's
    probability, ties by cosine (the stream's one index search plus a re-rank); the rest keep
    their order."""
    matcher = model.duplicate_scorer
    assert matcher is not None
    it = emb.image_text
    texts = [model.match_text(listing_input(r, with_image=False)) for r in records]
    sim = it[q] @ it[g].T  # [Q, G]
    sim = np.where(same, -np.inf, sim)
    reranked = sim.copy()
    for row in range(len(q)):
        order = np.argsort(-sim[row])[:k]
        order = order[np.isfinite(sim[row, order])]
        if len(order) == 0:
            continue
        best_other = [float(sim[row, order[1]]) if len(order) > 1 else -1.0] + [float(sim[row, order[0]])] * (len(order) - 1)
        candidates = [PairCandidate(texts[q[row]], texts[g[c]], float(sim[row, c]), r, best_other[r],
                                    id_a=records[q[row]].listing_id, id_b=records[g[c]].listing_id,
                                    vector_a=it[q[row]], vector_b=it[g[c]])
                      for r, c in enumerate(order)]
        # The stream's order (streams/worker/pipeline.py): by probability, ties by cosine. The
        # re-ranked scores sit above every score outside the top-k, distinct, so the rank metric's
        # tie rule (half of the tied count) does not turn a tie the stream resolves into a miss.
        probabilities = np.asarray(matcher.probabilities(candidates), dtype=np.float64)
        served = order[np.lexsort((-sim[row, order], -probabilities))]
        reranked[row, served] = 10.0 + np.arange(len(served), 0, -1, dtype=np.float64)
    return retrieval_metrics(reranked, clusters[q], clusters[g], same)


@dataclass(frozen=True)
class ClusterSetup:
    """Which listings query which in a clusters evaluation, and how that was chosen."""

    q: np.ndarray  # query rows
    g: np.ndarray  # gallery rows
    same: np.ndarray  # [Q, G]: a query never finds itself
    clusters: np.ndarray  # cluster id per row
    info: dict[str, Any]  # mode, queries, leakage, n_queries, n_gallery


def run_clusters(records: Sequence[ListingRecord], clusters_path: Path, *, model: str | None = None,
                 split_column: str | None = None, query_split: str | None = None,
                 gallery_split: str | None = None) -> ClusterSetup:
    """Queries and gallery of a clusters file, restricted to the clusters a model never trained on
    when its manifest names them."""
    clusters_map = read_clusters(clusters_path)
    ids = [r.listing_id for r in records]
    keep = np.array([i in clusters_map for i in ids])
    # Listings without a cluster row are their own product.
    clusters = np.array([clusters_map.get(i, f"__single__{i}") for i in ids])
    n = len(records)
    description = ""
    if split_column:
        split = _split_rows(clusters_path, split_column)
        q = np.array([k for k in range(n) if split.get(ids[k]) == query_split])
        g = np.array([k for k in range(n) if split.get(ids[k]) == gallery_split])
        description = f"{split_column}={query_split} -> {split_column}={gallery_split}"
    else:
        sources = [r.attributes.get("source", "") for r in records]
        distinct = list(dict.fromkeys(s for s in sources if s))
        if len(distinct) == 2:
            q = np.array([k for k in range(n) if sources[k] == distinct[0]])
            g = np.array([k for k in range(n) if sources[k] == distinct[1]])
            description = f"source {distinct[0]} -> {distinct[1]}"
        else:
            q = np.arange(n)
            g = np.arange(n)
            description = "every listing -> all others"
    q = q[keep[q]] if len(q) else q
    manifest = _manifest(model) if model else {}
    held = manifest.get("held_out_clusters") or []
    trained_clusters = manifest.get("clusters") or {}
    leak_note = "model was not trained on this clusters file"
    trained_split = (manifest.get("args") or manifest.get("config") or {}).get("split_column")
    if trained_clusters and trained_clusters.get("sha256") == _sha256(clusters_path):
        if trained_split and split_column == trained_split and query_split not in TRAINING_SPLITS:
            leak_note = (f"queries are {trained_split}={query_split}, a split the model never trained on "
                         f"(it trained on {'/'.join(TRAINING_SPLITS)})")
        elif not held:
            leak_note = "WARNING: model trained on every cluster of this file (retrieval leaks)"
        else:
            held_set = set(held)
            q = np.array([k for k in q if clusters[k] in held_set])
            leak_note = f"queries restricted to the {len(held)} clusters held out from training"
    q = np.sort(q)
    g = np.sort(g)
    same = q[:, None] == g[None, :]
    info = {"mode": "clusters", "queries": description, "leakage": leak_note, "n_queries": int(len(q)),
            "n_gallery": int(len(g))}
    return ClusterSetup(q, g, same, clusters, info)


# -------------------------------------------------------------------------------- main


def _views(emb: Embeddings) -> dict[str, np.ndarray]:
    return {"I": emb.image, "T": emb.text, "IT": emb.image_text}


def _pair_index(pairs: Sequence[tuple[str, str, int]], index: dict[str, int], path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    try:
        a = np.array([index[p[0]] for p in pairs])
        b = np.array([index[p[1]] for p in pairs])
    except KeyError as exc:
        raise ConfigError(f"{path}: listing {exc.args[0]!r} is not in the listings file") from None
    return a, b, np.array([p[2] for p in pairs])


def _pair_result(valid_scores: np.ndarray, valid_y: np.ndarray, test_scores: np.ndarray, test_y: np.ndarray) -> dict[str, Any]:
    threshold = best_threshold(valid_scores, valid_y)
    out = pair_metrics(test_scores, test_y, threshold)
    out["valid_f1"] = pair_metrics(valid_scores, valid_y, threshold)["f1"]
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (args.clusters is None) == (args.pairs is None):
        raise ConfigError("give either --clusters or --pairs (with --valid-pairs)")
    if args.pairs is not None and args.valid_pairs is None:
        raise ConfigError("--pairs needs --valid-pairs: the threshold is chosen on valid, never on test")
    if args.pairs is not None and args.pairs.resolve() == args.valid_pairs.resolve():
        raise ConfigError("--pairs and --valid-pairs are the same file")
    baselines = [b for b in args.baselines.split(",") if b]
    unknown = set(baselines) - {"tfidf", "default"}
    if unknown:
        raise ConfigError(f"unknown baselines {sorted(unknown)}")
    records = read_listings(args.listings)
    if args.clusters is not None and args.split_column:
        if not (args.query_split and args.gallery_split):
            raise ConfigError("--split-column needs --query-split and --gallery-split")
        # Only the two splits take part: embedding the others (e.g. training photos) is waste.
        split = _split_rows(args.clusters, args.split_column)
        records = [r for r in records if split.get(r.listing_id) in (args.query_split, args.gallery_split)]
    index = {r.listing_id: k for k, r in enumerate(records)}
    progress = not args.no_progress and not args.json
    with_images = not args.no_images
    model = load_model(args.model, args.device, args.allow_random_weights)
    scorer = getattr(model, "scorer", None)
    emb, texts, tokens = embed_records(
        model, records, with_images=with_images, batch_size=args.batch_size, progress=progress,
        label="model", want_tokens=args.pairs is not None and scorer is not None,
    )
    manifest = _manifest(args.model)
    result: dict[str, Any] = {"model": args.model, "version": model.version}
    if manifest:
        result["trained_on"] = {k: (manifest.get(k) or {}).get("path") for k in ("listings", "pairs", "clusters", "valid_pairs")}
    others: dict[str, Embeddings] = {}
    titles = [r.title for r in records]
    if "default" in baselines:
        base = encoder_from_spec("default", args.device)
        others["default"] = embed_records(base, records, with_images=with_images,
                                          batch_size=args.batch_size, progress=progress, label="default")[0]
        del base

    if args.clusters is not None:
        setup = run_clusters(records, args.clusters, model=args.model, split_column=args.split_column,
                             query_split=args.query_split, gallery_split=args.gallery_split)
        q, g, same, clusters = setup.q, setup.g, setup.same, setup.clusters
        result.update(setup.info)
        any_image = bool(emb.has_image[q].any() or emb.has_image[g].any())
        pairs = VIEW_PAIRS_IMAGE if any_image else VIEW_PAIRS_TEXT
        result["views"] = _retrieval(emb, q, g, clusters, pairs, same)
        if model.duplicate_scorer is not None:
            result["views"]["IT->IT reranked"] = _reranked(model, records, emb, q, g, clusters, same)
        result["baselines"] = {}
        titled = np.array([bool(t.strip()) for t in titles])
        if "tfidf" in baselines and titled[q].any():
            # Like any T view: queries without a title (photos) are left out, untitled gallery
            # items never rank.
            vec = tfidf_vectors(titles)
            sim = tfidf_similarity(vec[q[titled[q]]], vec[g])
            exclude = same[titled[q]] | ~titled[g][None, :]
            result["baselines"]["tfidf"] = {"views": {"T->T": retrieval_metrics(
                sim, clusters[q[titled[q]]], clusters[g], exclude)}}
        if "default" in baselines:
            base_emb = others["default"]
            assert isinstance(base_emb, Embeddings)
            result["baselines"]["default"] = {"views": _retrieval(base_emb, q, g, clusters, pairs, same)}
    else:
        valid = read_pairs(args.valid_pairs)
        test = read_pairs(args.pairs)
        va, vb, vy = _pair_index(valid, index, args.valid_pairs)
        ta, tb, ty = _pair_index(test, index, args.pairs)
        if manifest and (manifest.get("pairs") or {}).get("sha256") == _sha256(args.pairs):
            result["leakage"] = "WARNING: --pairs is the file the model trained on"
        it = emb.image_text
        cos = _pair_result(np.sum(it[va] * it[vb], 1), vy, np.sum(it[ta] * it[tb], 1), ty)
        result["mode"] = "pairs"
        result["bi_encoder"] = cos
        main_result = cos
        result["decision"] = "cosine"
        if scorer is not None:
            def scores(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                out = []
                for s in range(0, len(a), 256):
                    ia, ib = a[s : s + 256], b[s : s + 256]
                    out.append(model.score_fused(  # type: ignore[attr-defined]
                        (it[ia], [tokens[i] for i in ia], [texts[i] for i in ia]),
                        (it[ib], [tokens[i] for i in ib], [texts[i] for i in ib]),
                    ))
                return np.concatenate(out)

            main_result = _pair_result(scores(va, vb), vy, scores(ta, tb), ty)
            result["cross_scorer"] = main_result
            result["decision"] = "cross-scorer"
        matcher = model.duplicate_scorer
        if matcher is not None:
            texts_by_id = {r.listing_id: model.match_text(listing_input(r, with_image=False)) for r in records}
            vectors = {r.listing_id: it[k] for k, r in enumerate(records)}
            ids = [r.listing_id for r in records]

            meta = getattr(matcher, "meta", {})
            order = meta.get("candidate_order", "full")
            # Candidates meet the index as they did when the matcher was fitted: in arrival order
            # the later listing of a pair queries an index of the listings that came before it (the
            # interleaved order; a pairs file's listings name no source order to replay).
            arrival = arrival_order(ids, int(meta.get("order_seed", 0))) if order != "full" else None

            def probabilities(pairs_: Sequence[tuple[str, str, int]], arrival_: dict[str, int] | None) -> np.ndarray:
                return matcher.probabilities(candidates_for([(a, b) for a, b, _ in pairs_], vectors, ids, texts_by_id,
                                                            arrival_))

            valid_p, test_p = probabilities(valid, arrival), probabilities(test, arrival)
            # The decision the stream makes: the model's own threshold (chosen on valid at training).
            served = pair_metrics(test_p, ty, matcher.threshold)
            result["matcher"] = {
                "candidate_order": order,
                "served_threshold": {**served, "valid": pair_metrics(valid_p, vy, matcher.threshold)},
                "threshold_from_these_valid_pairs": _pair_result(valid_p, vy, test_p, ty),
            }
            if arrival is not None:  # for reference: the same matcher with every listing indexed
                full_p = probabilities(test, None)
                result["matcher"]["full_index_served_threshold"] = pair_metrics(full_p, ty, matcher.threshold)
            main_result = served
            result["decision"] = "matcher (model threshold)"
        result.update({k: main_result[k] for k in ("f1", "precision", "recall", "threshold")})
        result["baselines"] = {}
        if "tfidf" in baselines:
            vec = tfidf_vectors(titles)
            result["baselines"]["tfidf"] = _pair_result(
                np.sum(vec[va] * vec[vb], 1), vy, np.sum(vec[ta] * vec[tb], 1), ty)
        if "default" in baselines:
            d = others["default"].image_text
            result["baselines"]["default"] = _pair_result(np.sum(d[va] * d[vb], 1), vy, np.sum(d[ta] * d[tb], 1), ty)
    if args.report is not None:
        write_report(args.report, result)
    if args.json:
        print(json.dumps(result, default=float))
    else:
        print(format_result(result))
    return 0


def format_result(result: dict[str, Any]) -> str:
    lines = [f"model {result['model']} ({result['version']})"]
    if result.get("mode") == "clusters":
        lines.append(f"queries: {result['queries']} ({result['n_queries']} queries, {result['n_gallery']} gallery); {result['leakage']}")
        header = f"{'system':<10} {'views':<8} " + " ".join(f"R@{k:<5}" for k in KS) + " MRR"
        lines.append(header)
        rows = [("model", result["views"])] + [(n, b["views"]) for n, b in result["baselines"].items()]
        for name, views in rows:
            for view, m in views.items():
                lines.append(f"{name:<10} {view:<8} " + " ".join(f"{m[f'recall_at_{k}']:.4f}" for k in KS) + f" {m['mrr']:.4f}")
    else:
        lines.append(f"decision: {result['decision']}")
        rows = [("model", result)] + ([("bi-encoder", result["bi_encoder"])] if "cross_scorer" in result else [])
        rows += list(result["baselines"].items())
        for name, m in rows:
            lines.append(f"{name:<10} F1 {m['f1']:.4f}  P {m['precision']:.4f}  R {m['recall']:.4f}  threshold {m['threshold']:.4f}")
        if "leakage" in result:
            lines.append(result["leakage"])
    return "\n".join(lines)


def write_report(directory: Path, result: dict[str, Any]) -> None:
    """``report.md`` plus ``recall_at_k.png`` (clusters mode)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "report.md").write_text("# Evaluation\n\n```\n" + format_result(result) + "\n```\n\n```json\n"
                                          + json.dumps(result, indent=2, default=float) + "\n```\n")
    if result.get("mode") != "clusters":
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [("model", result["views"])] + [(n, b["views"]) for n, b in result["baselines"].items()]
    for name, views in rows:
        for view, m in views.items():
            ax.plot(KS, [m[f"recall_at_{k}"] for k in KS], marker="o", label=f"{name} {view}")
    ax.set_xlabel("k")
    ax.set_ylabel("recall@k")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(directory / "recall_at_k.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
