"""The duplicate decision: a calibrated classifier over a candidate pair's dense and lexical evidence.

:class:`PairFeaturizer` turns :class:`~samestyle.models.encoder.PairCandidate` s into a feature
matrix (dense cosine, rank and margin among the query's neighbours; word and character-trigram
TF-IDF cosines with the idf of the training listings; model-code, number, price and brand
agreement; the rarest title words one listing has and the other lacks (a colour, a kit, a size
told apart by one word); whether both listings come from the same source, where both name one: a clean
shop lists each product once, and the classifier learns from the training labels what a shared
source means); with a :class:`ProductMemory` of the training listings, whether the listings the
model learnt from put both sides in one known product, and whether a known side's product is
already listed by the other side's source. :class:`Matcher` is that featurizer, a
scikit-learn classifier with calibrated probabilities, the memory where it kept one, and the
threshold chosen on a valid split; it is stored in the model directory (``matcher.joblib`` +
``matcher.json``) and is the served model's ``duplicate_scorer``.
"""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from samestyle.models.encoder import DuplicateScorer, PairCandidate
from samestyle.models.text import DESCRIPTION_FIELD, parse_price, split_source
from samestyle.topics.errors import ConfigError

__all__ = ["FEATURES", "MEMORY_FEATURES", "Matcher", "PairFeaturizer", "ProductMemory", "fit_classifier", "load_matcher"]

MATCHER_FILE = "matcher.joblib"
MATCHER_META = "matcher.json"
#: Ranks beyond this count as this (the stream only sees a listing's top-k neighbours).
MAX_RANK = 50

FEATURES = (
    "dense_cos", "dense_rank", "dense_margin",
    "word_full", "word_title", "char_title", "char_full",
    "code_jaccard", "code_containment", "code_in_other", "code_conflict",
    "num_jaccard", "num_containment", "price_ratio", "brand_agree", "len_ratio", "same_source",
    "source_rank", "source_margin", "title_diff_max", "title_diff_min", "title_diff_mass",
    "memory_same", "memory_agree", "memory_known",
    "memory_word_same", "memory_word_agree", "memory_word_known", "memory_source_taken",
)
#: The features read off the matcher's :class:`ProductMemory` by image+text cosine ...
DENSE_MEMORY_FEATURES = ("memory_same", "memory_agree", "memory_known")
#: ... and by the match texts' TF-IDF cosine (:meth:`PairFeaturizer.memory_rows`).
LEXICAL_MEMORY_FEATURES = ("memory_word_same", "memory_word_agree", "memory_word_known")
#: ... and from the known listings' products and sources (:meth:`ProductMemory.source_taken`).
SOURCE_MEMORY_FEATURES = ("memory_source_taken",)
#: All of them: they need a memory (and the first six the pair's vectors).
MEMORY_FEATURES = DENSE_MEMORY_FEATURES + LEXICAL_MEMORY_FEATURES + SOURCE_MEMORY_FEATURES
#: Softmax temperature over a listing's per-product cosines: the bi-encoder's training temperature.
MEMORY_TEMPERATURE = 0.05

_SPLIT = re.compile(r"[\s,;:()\[\]{}|/\"'!?+]+")
_WORD = re.compile(r"[a-z0-9]+")
_NUM = re.compile(r"\d+(?:\.\d+)?")
_BRAND = re.compile(r"\|\s*brand\s+([^|]+)")
_PRICE = re.compile(r"\|\s*price\s+([^|]+)")
_CODE_PUNCT = re.compile(r"[-._#]")
_LETTER = re.compile(r"[a-z]")
_DIGIT = re.compile(r"\d")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def _tfidf_view(text: str) -> str:
    """A lowered match text as the TF-IDF features read it: without the ``description`` field name,
    which every text with a description shares (its character trigrams alone lowered valid F1:
    docs/MODEL.md, "Description words"). The field name stays for the brand and price fields'
    parsing, so a description that starts with "brand" or "price" is not read as either."""
    return text.replace(DESCRIPTION_FIELD, " | ")


def _title(text: str) -> str:
    """The title part of a serialised text (before the first `` | ``)."""
    return text.split(" | ", 1)[0]


def _codes(text: str) -> set[str]:
    """Model codes: tokens mixing letters and digits (``-._#`` removed), at least 3 long."""
    out = set()
    for token in _SPLIT.split(text.lower()):
        token = _CODE_PUNCT.sub("", token)
        if len(token) >= 3 and _LETTER.search(token) and _DIGIT.search(token):
            out.add(token)
    return out


def _numbers(text: str) -> set[str]:
    return {n.rstrip("0").rstrip(".") if "." in n else n for n in _NUM.findall(text.lower())}


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / len(a | b) if a and b else -1.0


def _containment(a: set[str], b: set[str]) -> float:
    return len(a & b) / min(len(a), len(b)) if a and b else -1.0


class _Side:
    """What the features need of one text, computed once."""

    def __init__(self, text: str) -> None:
        lowered = text.lower()
        self.title = _title(lowered)
        self.title_codes = _codes(self.title)
        self.codes = self.title_codes or _codes(lowered)
        self.squashed = _NOT_ALNUM.sub("", lowered)
        self.numbers = _numbers(self.title)
        brand = _BRAND.search(lowered)
        self.brand = brand.group(1).strip() if brand else ""
        price = _PRICE.search(lowered)
        self.price = parse_price(price.group(1)) if price else None
        self.tokens = max(1, len(_WORD.findall(self.title)))


def _pair_key(id_a: str | None, id_b: str | None) -> int:
    """A seeded number for a pair, the same whichever side is searched."""
    return zlib.crc32("\x00".join(sorted(str(i) for i in (id_a, id_b))).encode())


class ProductMemory:
    """The training listings' image+text vectors and match texts with their products: what the
    model knows.

    For a candidate pair, each listing's *profile* is its best cosine to each known product's
    listings, with the rows of :meth:`left_out` (the pair's own, and as many of its products'
    whatever its label) left out: the memory answers whether the *other* listings the model learnt
    from put both in one product, the same question at fit time (training pairs) as in the stream
    (where either may be a known listing). From the profiles come three features, once by
    image+text vector and once by title trigrams (:data:`MEMORY_FEATURES`): how likely both are
    one known product (the dot product of the profiles' softmaxes at :data:`MEMORY_TEMPERATURE`),
    whether their nearest known product is the same, and how well the memory knows the less known
    of the two (the lower of their best cosines; -1 when nothing is left). New listings of products
    the model trained on (WDC's seen offers, a shop re-listing a known product) are placed by that
    product's listings; for unknown products the profile spreads over look-alikes, and the
    classifier learns from the fit pairs how far to trust it.
    """

    #: Candidate pairs scored per block, at most (bounds the [2 * block, listings] similarity matrix) ...
    BLOCK = 256
    #: ... and fewer for a large memory: at most this many similarities (float32) at once.
    MAX_BLOCK_CELLS = 4_000_000

    def __init__(self, ids: Sequence[str], vectors: np.ndarray, products: Sequence[str],
                 texts: Sequence[str] | None = None) -> None:
        if not (len(ids) == len(vectors) == len(products)) or not len(ids):
            raise ConfigError(f"ProductMemory: {len(ids)} ids, {len(vectors)} vectors, {len(products)} products")
        order = np.argsort(np.asarray(products), kind="stable")
        ranked = np.asarray(products)[order]
        self.matrix = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order])  # [n, dim]
        self.ids = [str(ids[k]) for k in order]
        self.row_of = {i: r for r, i in enumerate(self.ids)}
        #: Rows are grouped by product: each product's first row, and each row's product.
        self.starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        self._product = np.cumsum(np.r_[True, ranked[1:] != ranked[:-1]]) - 1
        self._ends = np.r_[self.starts[1:], len(ranked)]
        #: The known listings' match texts (row order), and their TF-IDF rows once asked for.
        self.texts = None if texts is None else [texts[k] for k in order]
        self._lexical: Any = None

    def __len__(self) -> int:
        return len(self.row_of)

    @property
    def products(self) -> int:
        return len(self.starts)

    def left_out(self, id_a: str | None, id_b: str | None) -> list[int]:
        """The memory rows a pair's profiles leave out: each known listing of the pair and, unless
        both are known listings of one product, one more listing of its product (a seeded choice by
        the pair). A matching pair of known listings takes two of its product's listings away, so
        each product of a non-matching pair loses two as well: how much of a pair's products the
        memory still knows then depends on their sizes, never on the pair's label (left alone, a
        product of two listings would be unknown exactly when the pair is a match)."""
        rows = [self.row_of.get(i, -1) if i is not None else -1 for i in (id_a, id_b)]
        drop = [r for r in rows if r >= 0]
        if len(drop) == 2 and self._product[drop[0]] == self._product[drop[1]]:
            return drop
        key = _pair_key(id_a, id_b)
        for r in list(drop):
            p = self._product[r]
            others = [x for x in range(self.starts[p], self._ends[p]) if x not in drop]
            if others:
                drop.append(others[key % len(others)])
        return drop

    def _product_sources(self) -> dict[tuple[int, str], list[int]]:
        """The known listings' rows by (product, source); empty without texts, and empty too when
        they name fewer than two sources (one source names every listing: it tells no shop from
        another)."""
        if getattr(self, "_sources", None) is None:
            grouped: dict[tuple[int, str], list[int]] = {}
            for r, text in enumerate(self.texts or []):
                source = split_source(text.lower())[1]
                if source:
                    grouped.setdefault((int(self._product[r]), source), []).append(r)
            self._sources = grouped if len({source for _, source in grouped}) >= 2 else {}
        return self._sources

    def source_taken(self, candidates: Sequence[PairCandidate],
                     sources: Sequence[tuple[str, str]] | None = None) -> np.ndarray:
        """``[n]``: whether the known product of one side already has another known listing from
        the other side's source: 1, else 0; -1 when neither side is a known listing with the other
        naming a source, throughout for a memory of fewer than two sources, and for a seeded half
        of the pairs of two known listings (the fit pairs are all of known listings: so they teach
        the classifier what an unknown side means too). The pair's own listings do not count.
        Where a source lists each product once (a clean shop), a new listing from it is not a
        product that source already lists; the classifier learns from the fit pairs what the
        data's sources mean. ``sources``: each candidate's (a, b) sources when the caller has them
        (default: read off their texts)."""
        grouped = self._product_sources()
        out = np.full(len(candidates), -1.0, dtype=np.float32)
        if not grouped:
            return out
        if sources is None:
            sources = [(split_source(c.text_a.lower())[1], split_source(c.text_b.lower())[1]) for c in candidates]
        for k, (c, (source_a, source_b)) in enumerate(zip(candidates, sources)):
            rows = [self.row_of.get(i, -1) if i is not None else -1 for i in (c.id_a, c.id_b)]
            if min(rows) >= 0 and _pair_key(c.id_a, c.id_b) % 2:
                continue  # both known: the seeded half that reads as unknown
            for known, other in ((rows[1], source_a), (rows[0], source_b)):
                if known < 0 or not other:
                    continue
                taken = [r for r in grouped.get((int(self._product[known]), other), []) if r not in rows]
                out[k] = max(out[k], float(bool(taken)))
        return out

    def pair_features(self, candidates: Sequence[PairCandidate],
                      lexical: Callable[[Sequence[str]], Any] | None = None,
                      rows: tuple[Any, Any] | None = None) -> np.ndarray:
        """``[n, 3]``: the :data:`DENSE_MEMORY_FEATURES` of each candidate (which must carry vectors);
        with ``lexical`` (match texts -> L2-normalised sparse rows), ``[n, 6]``: the same three again
        from those rows' cosines to the known listings' (:data:`LEXICAL_MEMORY_FEATURES`).
        ``rows``: the candidates' a and b rows when the caller has them (default: ``lexical`` of
        their texts)."""
        width = len(DENSE_MEMORY_FEATURES) + (len(LEXICAL_MEMORY_FEATURES) if lexical is not None else 0)
        out = np.zeros((len(candidates), width), dtype=np.float32)
        if lexical is not None and self._lexical is None:
            if self.texts is None:
                raise ConfigError("this product memory keeps no texts: it has no lexical features")
            self._lexical = lexical(self.texts)
        if lexical is not None and rows is None:
            rows = (lexical([c.text_a for c in candidates]), lexical([c.text_b for c in candidates]))
        size = max(1, min(self.BLOCK, self.MAX_BLOCK_CELLS // (2 * len(self))))
        for s in range(0, len(candidates), size):
            block = candidates[s : s + size]
            drops = [self.left_out(c.id_a, c.id_b) for c in block]
            vecs = []
            for c in block:
                if c.vector_a is None or c.vector_b is None:
                    raise ConfigError("this matcher reads the pair's vectors (its product memory): "
                                      "the candidates carry none")
                vecs += [c.vector_a, c.vector_b]
            out[s : s + len(block), :3] = self._profile_features(np.stack(vecs).astype(np.float32) @ self.matrix.T, drops)
            if rows is not None:
                sims = np.empty((2 * len(block), len(self)), dtype=np.float32)
                sims[0::2] = (rows[0][s : s + len(block)] @ self._lexical.T).toarray()
                sims[1::2] = (rows[1][s : s + len(block)] @ self._lexical.T).toarray()
                out[s : s + len(block), 3:] = self._profile_features(sims, drops)
        return out

    def _profile_features(self, sims: np.ndarray, drops: Sequence[list[int]]) -> np.ndarray:
        """The three features of each pair from ``sims`` ``[2n, rows]`` (a, b, a, b, ...)."""
        for k, drop in enumerate(drops):
            if drop:
                sims[2 * k, drop] = sims[2 * k + 1, drop] = -np.inf
        best = np.maximum.reduceat(sims, self.starts, axis=1)  # [2n, products]
        top = best.max(axis=1)
        known = np.isfinite(top)
        shifted = np.where(known[:, None], (best - np.where(known, top, 0.0)[:, None]) / MEMORY_TEMPERATURE, -np.inf)
        soft = np.exp(shifted)
        soft /= np.maximum(soft.sum(axis=1, keepdims=True), 1e-30)
        nearest = np.where(known, best.argmax(axis=1), -1)
        a, b = slice(0, None, 2), slice(1, None, 2)
        same = np.einsum("ij,ij->i", soft[a], soft[b])
        agree = (nearest[a] == nearest[b]) & (nearest[a] >= 0)
        lowest = np.where(known[a] & known[b], np.minimum(top[a], top[b]), -1.0)
        return np.column_stack([same, agree, lowest])


class PairFeaturizer:
    """Fitted on the texts of the training listings (unsupervised idf); then scores any pair."""

    def __init__(self) -> None:
        self._vectorizers: dict[str, Any] = {}

    def fit(self, texts: Sequence[str]) -> PairFeaturizer:
        from sklearn.feature_extraction.text import TfidfVectorizer

        full = [_tfidf_view(t.lower()) for t in texts]
        titles = [_title(t) for t in full]
        word = dict(token_pattern=r"[a-z0-9]+", sublinear_tf=True)
        char = dict(analyzer="char_wb", ngram_range=(3, 3), sublinear_tf=True)
        self._vectorizers = {
            "word_full": TfidfVectorizer(**word).fit(full),
            "word_title": TfidfVectorizer(**word).fit(titles),
            "char_title": TfidfVectorizer(**char).fit(titles),
            "char_full": TfidfVectorizer(**char).fit(full),
        }
        return self

    def memory_rows(self, texts: Sequence[str]) -> Any:
        """Match texts' rows for the memory's lexical features: the title's character-trigram TF-IDF
        (the ``char_title`` view), L2-normalised, sparse."""
        return self._vectorizers["char_title"].transform([_title(split_source(t.lower())[0]) for t in texts])

    def _rows(self, name: str, texts: Sequence[str], a: np.ndarray, b: np.ndarray) -> tuple[Any, Any]:
        """The ``name`` view's rows (L2-normalised) of each pair's a and b side, ``texts[a]`` and
        ``texts[b]``: each distinct text is transformed once."""
        rows = self._vectorizers[name].transform(texts)
        return rows[a], rows[b]

    @staticmethod
    def _cosines(rows: tuple[Any, Any]) -> np.ndarray:
        ma, mb = rows
        return np.asarray(ma.multiply(mb).sum(axis=1)).ravel()

    def _title_weights(self, titles: Sequence[str]) -> list[dict[str, float]]:
        """Each title's words with their idf over the training titles; words the training titles
        never had weigh as the rarest there are."""
        vec = self._vectorizers["word_title"]
        idf, vocabulary = vec.idf_, vec.vocabulary_
        unseen = float(idf.max()) if len(idf) else 1.0
        return [{w: unseen if (k := vocabulary.get(w)) is None else float(idf[k]) for w in _WORD.findall(t)}
                for t in titles]

    @staticmethod
    def _title_differences(words_a: Sequence[dict[str, float]], words_b: Sequence[dict[str, float]]) -> np.ndarray:
        """``[n, 3]``: per pair (each side's title words with their weights, :meth:`_title_weights`),
        the larger and the smaller of the two sides' rarest unshared title word (0 when a side has
        none unshared), and the weight of the unshared words over that of all the pair's words."""
        out = np.zeros((len(words_a), 3))
        for r, (wa, wb) in enumerate(zip(words_a, words_b)):
            only_a = [wa[w] for w in wa.keys() - wb.keys()]
            only_b = [wb[w] for w in wb.keys() - wa.keys()]
            top_a, top_b = max(only_a, default=0.0), max(only_b, default=0.0)
            # fsum: exact whatever the sets' order (string hashing changes it from run to run, and a
            # last-bit difference can move a value across one of the classifier's bin edges).
            total = math.fsum({**wa, **wb}.values())
            out[r] = (max(top_a, top_b), min(top_a, top_b), math.fsum(only_a + only_b) / total if total else -1.0)
        return out

    def features(self, candidates: Sequence[PairCandidate], names: Sequence[str] | None = None,
                 memory: ProductMemory | None = None) -> np.ndarray:
        """``[n, len(names)]`` float32: the ``names`` columns in that order (default: :data:`FEATURES`,
        less the :data:`MEMORY_FEATURES` without a ``memory`` ). Those need ``memory`` and
        candidates that carry their vectors."""
        if names is None:
            names = FEATURES if memory is not None else tuple(n for n in FEATURES if n not in MEMORY_FEATURES)
        if not self._vectorizers:
            raise ConfigError("PairFeaturizer is not fitted")
        unknown = [n for n in names if n not in FEATURES]
        if unknown:
            raise ConfigError(f"unknown matcher feature(s) {unknown}: this code computes {list(FEATURES)}")
        wants_memory = any(n in MEMORY_FEATURES for n in names)
        if wants_memory and memory is None:
            raise ConfigError(f"matcher features {[n for n in names if n in MEMORY_FEATURES]} need a product memory")
        # Text work is done once per distinct text: a batch's query text meets each of its k
        # neighbours, and a neighbour often serves several queries.
        distinct: dict[str, int] = {}
        a = np.array([distinct.setdefault(c.text_a.lower(), len(distinct)) for c in candidates], dtype=np.intp)
        b = np.array([distinct.setdefault(c.text_b.lower(), len(distinct)) for c in candidates], dtype=np.intp)
        split = [split_source(t) for t in distinct]
        full = [text for text, _ in split]
        titles = [_title(t) for t in full]
        tfidf = [_tfidf_view(t) for t in full]
        sides = [_Side(t) for t in full]
        # The titles' trigram rows serve the char_title cosine and the lexical memory alike.
        title_rows = self._rows("char_title", titles, a, b)
        cols: dict[str, np.ndarray] = {
            "dense_cos": np.array([c.cosine for c in candidates]),
            "dense_rank": np.log1p(np.minimum([c.rank for c in candidates], MAX_RANK)),
            "dense_margin": np.array([c.cosine - c.best_other for c in candidates]),
            "source_rank": np.log1p(np.minimum([c.rank if c.source_rank is None else c.source_rank
                                                for c in candidates], MAX_RANK)),
            "source_margin": np.array([c.cosine - (c.best_other if c.source_best_other is None else c.source_best_other)
                                       for c in candidates]),
            "word_full": self._cosines(self._rows("word_full", tfidf, a, b)),
            "word_title": self._cosines(self._rows("word_title", titles, a, b)),
            "char_title": self._cosines(title_rows),
            "char_full": self._cosines(self._rows("char_full", tfidf, a, b)),
        }
        rows = []
        for sa, sb in zip(a, b):
            x, y = sides[sa], sides[sb]
            found = [c in y.squashed for c in x.title_codes] + [c in x.squashed for c in y.title_codes]
            conflict = bool(x.title_codes and y.title_codes and not (x.title_codes & y.title_codes) and not any(found))
            if x.brand and y.brand:
                brand = float(x.brand == y.brand or x.brand in y.brand or y.brand in x.brand)
            elif x.brand or y.brand:
                known, other = (x.brand, y.title) if x.brand else (y.brand, x.title)
                brand = 0.5 + 0.5 * float(known.split()[0] in other)
            else:
                brand = -1.0
            price = min(x.price, y.price) / max(x.price, y.price) if x.price and y.price else -1.0
            rows.append((_jaccard(x.codes, y.codes), _containment(x.codes, y.codes),
                         float(sum(found) / len(found)) if found else -1.0, float(conflict),
                         _jaccard(x.numbers, y.numbers), _containment(x.numbers, y.numbers), price, brand,
                         min(x.tokens, y.tokens) / max(x.tokens, y.tokens)))
        lexical = np.array(rows, dtype=np.float64).reshape(len(candidates), 9)
        lexical_names = ("code_jaccard", "code_containment", "code_in_other", "code_conflict", "num_jaccard",
                         "num_containment", "price_ratio", "brand_agree", "len_ratio")
        for k, name in enumerate(lexical_names):
            cols[name] = lexical[:, k]
        sources = [(split[sa][1], split[sb][1]) for sa, sb in zip(a, b)]
        cols["same_source"] = np.array([float(x == y) if x and y else -1.0 for x, y in sources])
        if "memory_source_taken" in names:
            assert memory is not None
            cols["memory_source_taken"] = memory.source_taken(candidates, sources)
        if any(n in DENSE_MEMORY_FEATURES + LEXICAL_MEMORY_FEATURES for n in names):
            assert memory is not None
            lexical = any(n in LEXICAL_MEMORY_FEATURES for n in names)
            columns = memory.pair_features(candidates, self.memory_rows if lexical else None,
                                           title_rows if lexical else None).T
            for name, column in zip(DENSE_MEMORY_FEATURES + (LEXICAL_MEMORY_FEATURES if lexical else ()), columns):
                cols[name] = column
        if any(n.startswith("title_diff") for n in names):
            words = self._title_weights(titles)
            diffs = self._title_differences([words[k] for k in a], [words[k] for k in b])
            for k, name in enumerate(("title_diff_max", "title_diff_min", "title_diff_mass")):
                cols[name] = diffs[:, k]
        return np.column_stack([cols[n] for n in names]).astype(np.float32)


def fit_classifier(features: np.ndarray, labels: np.ndarray, kind: str = "hgb", seed: int = 0,
                   sample_weight: np.ndarray | None = None) -> Any:
    """A classifier with calibrated ``predict_proba``: gradient-boosted trees with isotonic
    calibration (``hgb``, the default) or a standardised logistic regression (``lr``).
    ``sample_weight`` (``[n]``, None: every row 1) weighs rows in the fit and the calibration."""
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if kind == "lr":
        model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
    elif kind == "hgb":
        base = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15,
                                              min_samples_leaf=10, l2_regularization=1.0, random_state=seed)
        model = CalibratedClassifierCV(base, method="isotonic", cv=3)
    else:
        raise ConfigError(f"unknown classifier {kind!r}: hgb or lr")
    if sample_weight is None:
        return model.fit(features, labels)
    if kind == "lr":
        return model.fit(features, labels, logisticregression__sample_weight=sample_weight)
    return model.fit(features, labels, sample_weight=sample_weight)


class Matcher(DuplicateScorer):
    """Featurizer + calibrated classifier + the probability threshold chosen on valid.

    ``features`` are the columns the classifier was fitted on (default :data:`FEATURES`; a matcher
    saved before a feature was added keeps its own list and scores as it did).
    """

    def __init__(self, featurizer: PairFeaturizer, classifier: Any, threshold: float,
                 meta: dict[str, Any] | None = None, features: Sequence[str] = FEATURES,
                 memory: ProductMemory | None = None) -> None:
        self.featurizer = featurizer
        self.classifier = classifier
        self.threshold = float(threshold)
        self.meta = dict(meta or {})
        self.features = tuple(features)
        #: The served model's vectors of its training listings (the memory features), or None.
        self.memory = memory
        if self.uses_vectors and memory is None:
            raise ConfigError("the matcher's features include the product memory's, and it has none")

    @property
    def uses_vectors(self) -> bool:
        return any(n in MEMORY_FEATURES for n in self.features)

    @property
    def description_words(self) -> int:
        """How many description words the matcher's texts carry (:func:`~samestyle.models.text.match_text`;
        0 for matchers fitted before descriptions were read)."""
        return int(self.meta.get("description_words", 0))

    def probabilities(self, candidates: Sequence[PairCandidate]) -> np.ndarray:
        if not candidates:
            return np.zeros(0, dtype=np.float32)
        x = self.featurizer.features(candidates, self.features, self.memory)
        return self.classifier.predict_proba(x)[:, 1].astype(np.float32)

    def save(self, directory: Path) -> None:
        import joblib

        joblib.dump({"featurizer": self.featurizer, "classifier": self.classifier, "memory": self.memory},
                    directory / MATCHER_FILE)
        (directory / MATCHER_META).write_text(json.dumps(
            {"threshold": self.threshold, "features": list(self.features), **self.meta}, indent=2, default=float) + "\n")


def load_matcher(directory: Path) -> Matcher | None:
    """The matcher stored in a model directory, or None when it has none.

    The joblib file is a pickle: load model directories you trust only (as with torch weights).
    """
    if not (directory / MATCHER_FILE).is_file():
        return None
    import joblib

    meta = json.loads((directory / MATCHER_META).read_text())
    features = list(meta.pop("features", []))
    unknown = [n for n in features if n not in FEATURES]
    if not features or unknown:
        raise ConfigError(f"{directory}: the matcher was trained on features {features or 'none recorded'}, "
                          f"this code computes {list(FEATURES)}: refit it with "
                          f"`samestyle train --refit-matcher {directory}`")
    parts = joblib.load(directory / MATCHER_FILE)
    threshold = meta.pop("threshold")
    return Matcher(parts["featurizer"], parts["classifier"], threshold, meta, features, parts.get("memory"))
