"""Metrics shared by training (validation) and evaluation, and the word TF-IDF baseline.

- Pairwise: :func:`best_threshold` picks the decision threshold that maximises F1 on one set
  of scored pairs (the valid split); :func:`pair_metrics` applies a threshold to another.
- Retrieval: :func:`retrieval_metrics` gives recall@k and MRR of queries against a gallery,
  where a hit is any gallery item of the query's cluster.
- :func:`tfidf_vectors`: word TF-IDF (lower-cased ``\\w+`` tokens, smoothed idf, L2 rows) as a
  dense array (no extra packages).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

__all__ = ["best_threshold", "pair_metrics", "retrieval_metrics", "tfidf_similarity", "tfidf_vectors"]

KS = (1, 5, 10, 20)


def pair_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """Precision, recall and F1 of the positive class when ``score >= threshold`` is a match."""
    predicted = scores >= threshold
    positive = labels.astype(bool)
    tp = int((predicted & positive).sum())
    precision = tp / int(predicted.sum()) if predicted.any() else 0.0
    recall = tp / int(positive.sum()) if positive.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "threshold": float(threshold)}


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold that maximises F1 on these pairs: midway between the best cut's score and
    the next lower score, so a tie at the cut never flips on another split."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    positives = int(y.sum())
    if positives == 0 or len(s) == 0:
        return float("inf")
    tp = np.cumsum(y)
    k = np.arange(1, len(s) + 1)
    f1 = 2 * tp / (k + positives)
    # Only cut between distinct scores.
    distinct = np.r_[s[1:] != s[:-1], True]
    f1 = np.where(distinct, f1, -1.0)
    i = int(np.argmax(f1))
    below = s[i + 1] if i + 1 < len(s) else s[i] - 1e-6
    return float((s[i] + below) / 2)


def retrieval_metrics(
    sim: np.ndarray, query_clusters: Sequence[str], gallery_clusters: Sequence[str],
    exclude: np.ndarray | None = None,
) -> dict[str, float]:
    """Recall@k (any same-cluster gallery item in the top k) and MRR of the first hit.

    ``sim`` is ``[queries, gallery]``; ``exclude`` a same-shape bool mask of entries to skip
    (the query itself when the gallery contains it). Queries without any relevant gallery item
    are not counted.
    """
    sim = np.array(sim, dtype=np.float32, copy=True)
    if exclude is not None:
        sim[exclude] = -np.inf
    g = np.asarray(gallery_clusters)
    relevant = np.asarray(query_clusters)[:, None] == g[None, :]  # [Q, G]
    if exclude is not None:
        relevant &= ~exclude
    keep = relevant.any(axis=1)
    sim, relevant = sim[keep], relevant[keep]
    if len(sim) == 0:
        return {"queries": 0}
    best_relevant = np.where(relevant, sim, -np.inf).max(axis=1)  # [Q]
    # Rank of the first hit: 1 + irrelevant items scoring strictly higher + half of those tied
    # with it (its expected rank under random tie-breaking). Resolving ties in the hit's favour
    # would give a view pair with no signal at all (every score equal, e.g. the untrained
    # block-concat encoder's I->T, or a TF-IDF query sharing no word) a perfect recall.
    irrelevant = np.where(relevant, np.nan, sim)  # [Q, G]
    higher = (irrelevant > best_relevant[:, None]).sum(axis=1)
    tied = (irrelevant == best_relevant[:, None]).sum(axis=1)
    rank = 1 + higher + tied / 2.0
    out: dict[str, float] = {"queries": int(len(rank))}
    for k in KS:
        out[f"recall_at_{k}"] = float((rank <= k).mean())
    out["mrr"] = float((1.0 / rank).mean())
    return out


_TOKEN = re.compile(r"\w+")


def tfidf_vectors(texts: Sequence[str], vocabulary_texts: Sequence[str] | None = None) -> np.ndarray:
    """Word TF-IDF rows (L2-normalised) as a dense ``[n, vocab]`` float32 array; idf from
    ``vocabulary_texts`` (default: ``texts``), ``log((1 + N) / (1 + df)) + 1``. Dense on
    purpose: titles give a vocabulary of some 10k words, and torch's sparse kernels warn."""
    docs = [Counter(_TOKEN.findall(t.lower())) for t in texts]
    base = docs if vocabulary_texts is None else [Counter(_TOKEN.findall(t.lower())) for t in vocabulary_texts]
    df: Counter[str] = Counter()
    for doc in base:
        df.update(doc.keys())
    vocab = {w: i for i, w in enumerate(sorted(df))}
    n = len(base)
    out = np.zeros((len(docs), len(vocab)), dtype=np.float32)
    for r, doc in enumerate(docs):
        for w, c in doc.items():
            if w in vocab:
                out[r, vocab[w]] = c * (math.log((1 + n) / (1 + df[w])) + 1.0)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.maximum(norms, 1e-12)


def tfidf_similarity(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Cosine similarities ``[n_left, n_right]`` of two TF-IDF row sets."""
    return left @ right.T
