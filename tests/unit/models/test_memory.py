"""The matcher's product memory: what it leaves out of a pair's profiles, and what it says."""

from __future__ import annotations

import numpy as np
import pytest

from samestyle.models.encoder import PairCandidate
from samestyle.models.matcher import MEMORY_FEATURES, ProductMemory
from samestyle.topics.errors import ConfigError


def unit(*xs: float) -> np.ndarray:
    v = np.array(xs, dtype=np.float32)
    return v / np.linalg.norm(v)


def memory() -> ProductMemory:
    # Product P: three listings near e0; Q: two near e1; R: two near e2.
    ids = ["p1", "p2", "p3", "q1", "q2", "r1", "r2"]
    vectors = np.stack([unit(1, 0.1, 0), unit(1, 0, 0.1), unit(1, 0.05, 0.05),
                        unit(0.1, 1, 0), unit(0, 1, 0.1), unit(0, 0.1, 1), unit(0.1, 0, 1)])
    return ProductMemory(ids, vectors, ["P", "P", "P", "Q", "Q", "R", "R"])


def product_rows(mem: ProductMemory, rows: list[int]) -> dict[str, int]:
    left: dict[str, int] = {}
    for r in rows:
        left[mem.ids[r][0]] = left.get(mem.ids[r][0], 0) + 1
    return left


def test_a_pair_leaves_out_two_listings_of_each_of_its_products_whatever_its_label() -> None:
    mem = memory()
    # A match of two known listings of P takes both away.
    assert sorted(mem.ids[r] for r in mem.left_out("p1", "p2")) == ["p1", "p2"]
    # A non-match takes one more of each product: P and Q lose two listings each, as a match would.
    assert product_rows(mem, mem.left_out("p1", "q1")) == {"p": 2, "q": 2}
    assert {"p1", "q1"} <= {mem.ids[r] for r in mem.left_out("p1", "q1")}
    # The choice is the pair's, whichever side is searched.
    assert sorted(mem.left_out("p1", "q1")) == sorted(mem.left_out("q1", "p1"))
    # New listings (not in the memory) leave nothing out; a known one beside a new one, two of its product.
    assert mem.left_out("new1", "new2") == [] and mem.left_out(None, None) == []
    assert product_rows(mem, mem.left_out("new1", "p3")) == {"p": 2}


def candidate(a: str | None, va: np.ndarray, b: str | None, vb: np.ndarray) -> PairCandidate:
    return PairCandidate("a", "b", float(va @ vb), 0, -1.0, id_a=a, id_b=b, vector_a=va, vector_b=vb)


def test_new_listings_of_one_known_product_are_placed_together_and_of_two_apart() -> None:
    mem = memory()
    near_p, near_p2, near_q = unit(1, 0.08, 0.02), unit(1, 0.02, 0.08), unit(0.05, 1, 0.05)
    f = mem.pair_features([candidate("x", near_p, "y", near_p2), candidate("x", near_p, "z", near_q)])
    col = {n: k for k, n in enumerate(MEMORY_FEATURES)}
    assert f.shape == (2, 3) and f.dtype == np.float32
    assert f[0, col["memory_same"]] > 0.9 and f[0, col["memory_agree"]] == 1.0
    assert f[1, col["memory_same"]] < 0.05 and f[1, col["memory_agree"]] == 0.0
    # The less known side's best cosine to a known listing.
    best = max(float(near_q @ mem.matrix[r]) for r in range(len(mem)))
    assert f[1, col["memory_known"]] == pytest.approx(min(best, float((mem.matrix @ near_p).max())), abs=1e-6)


def test_a_known_listing_is_placed_by_the_others_never_by_itself() -> None:
    mem = memory()
    q1 = mem.matrix[mem.row_of["q1"]]
    # q1 is in the memory, so the pair leaves it out; q2 (its product's other listing) goes too,
    # so nothing of Q is left: the memory knows neither side (its best cosine is to P or R).
    known, same = MEMORY_FEATURES.index("memory_known"), MEMORY_FEATURES.index("memory_same")
    [f] = mem.pair_features([candidate("new", unit(0.1, 1, 0.02), "q1", q1)])
    assert f[known] < 0.3
    # Unknown to the memory, the same vector is placed by q1 and q2: Q, surely.
    [g] = mem.pair_features([candidate("new", unit(0.1, 1, 0.02), "other", q1)])
    assert g[known] > 0.9 and g[same] > 0.9


def test_the_memory_needs_the_pairs_vectors_and_aligned_inputs() -> None:
    with pytest.raises(ConfigError, match="carry none"):
        memory().pair_features([PairCandidate("a", "b", 0.5, 0, -1.0)])
    with pytest.raises(ConfigError, match="ProductMemory"):
        ProductMemory(["a"], np.zeros((2, 3)), ["P"])


def test_many_pairs_are_scored_in_blocks_as_one_at_a_time() -> None:
    mem = memory()
    rng = np.random.default_rng(0)
    ids = ["p1", "q2", "r1", "new", None]
    pairs = []
    for k in range(ProductMemory.BLOCK + 7):
        va, vb = (unit(*rng.normal(size=3)) for _ in range(2))
        pairs.append(candidate(ids[k % 5], va, ids[(k * 3 + 1) % 5], vb))
    together = mem.pair_features(pairs)
    alone = np.vstack([mem.pair_features([p]) for p in pairs])
    assert np.allclose(together, alone, atol=1e-6)
    # A memory too large for full blocks scores in smaller ones, to the same values.
    mem.MAX_BLOCK_CELLS = 2 * len(mem) * 5  # blocks of 5 pairs
    assert np.allclose(mem.pair_features(pairs), together, atol=1e-6)


def test_the_lexical_memory_places_listings_by_their_titles_trigrams() -> None:
    from samestyle.models.matcher import LEXICAL_MEMORY_FEATURES, PairFeaturizer

    texts = ["acme kettle kx100 steel", "ACME KX100 kettle", "acme kettle kx-100 | brand acme",
             "zeta lamp z9 white", "Zeta Z9 lamp", "omni router r7", "Omni R7 wifi router"]
    mem = ProductMemory(["p1", "p2", "p3", "q1", "q2", "r1", "r2"], np.eye(7, 3, dtype=np.float32) + 0.1,
                        list("PPPQQRR"), texts)
    featurizer = PairFeaturizer().fit(texts)
    same_vec = unit(1, 1, 1)  # the dense side says nothing: every pair has the same vectors
    pairs = [PairCandidate("acme kettle kx100", "kettle kx100 acme", 0.9, 0, -1.0, id_a="x", id_b="y",
                           vector_a=same_vec, vector_b=same_vec),
             PairCandidate("acme kettle kx100", "zeta lamp z9", 0.9, 0, -1.0, id_a="x", id_b="z",
                           vector_a=same_vec, vector_b=same_vec)]
    names = list(LEXICAL_MEMORY_FEATURES)
    f = featurizer.features(pairs, names, mem)
    col = {n: k for k, n in enumerate(names)}
    assert f[0, col["memory_word_agree"]] == 1.0 and f[1, col["memory_word_agree"]] == 0.0
    assert f[0, col["memory_word_same"]] > 0.5 > f[1, col["memory_word_same"]]
    # A memory without texts cannot give them.
    with pytest.raises(ConfigError, match="no texts"):
        featurizer.features(pairs, names, memory())


def test_a_known_product_already_listed_by_the_other_sides_source_is_told() -> None:
    import zlib

    from samestyle.models.text import SOURCE_SEPARATOR

    def text(title: str, source: str) -> str:
        return f"{title}{SOURCE_SEPARATOR}{source}"

    # P is listed once by each shop; Q only by shop-b.
    ids = ["p_a", "p_b", "q_b"]
    texts = [text("acme kettle", "shop-a"), text("acme kettle k1", "shop-b"), text("zeta lamp", "shop-b")]
    mem = ProductMemory(ids, np.eye(3, dtype=np.float32), ["P", "P", "Q"], texts)
    v = unit(1, 1, 1)

    def pair(id_a: str | None, source_a: str, id_b: str | None, source_b: str) -> PairCandidate:
        return PairCandidate(text("x", source_a), text("y", source_b), 0.5, 0, -1.0,
                             id_a=id_a, id_b=id_b, vector_a=v, vector_b=v)

    taken = mem.source_taken([
        pair("new", "shop-a", "p_b", "shop-b"),  # shop-a already lists P (p_a): taken
        pair("new", "shop-a", "q_b", "shop-b"),  # nothing of Q from shop-a: not taken
        pair("new", "shop-b", "p_a", "shop-a"),  # shop-b lists P as p_b: taken
        pair("new", "shop-a", "other", "shop-b"),  # neither side known: unknown
        pair("new", "", "p_b", "shop-b"),  # the new listing names no source: unknown
        pair("p_a", "shop-a", "p_b", "shop-b"),  # the pair's own listings do not count
    ])
    hidden = zlib.crc32("\x00".join(sorted(("p_a", "p_b"))).encode()) % 2
    assert taken.tolist() == [1.0, 0.0, 1.0, -1.0, -1.0, -1.0 if hidden else 0.0]
    # Two known listings: a seeded half of such pairs reads as unknown, whichever side is searched.
    shop = {"p_a": "shop-a", "p_b": "shop-b", "q_b": "shop-b"}
    both = [pair(a, shop[a], b, shop[b]) for a, b in [("p_a", "q_b"), ("q_b", "p_a"), ("p_b", "q_b"), ("q_b", "p_b")]]
    values = mem.source_taken(both)
    assert values[0] == values[1] and values[2] == values[3]
    assert set(values.tolist()) <= {-1.0, 0.0, 1.0}
    # A memory whose listings all name one source cannot tell shops apart: -1 throughout.
    one_shop = ProductMemory(ids, np.eye(3, dtype=np.float32), ["P", "P", "Q"],
                             [text("acme kettle", "shop-b"), text("acme kettle k1", "shop-b"), text("zeta lamp", "shop-b")])
    assert one_shop.source_taken([pair("new", "shop-b", "p_b", "shop-b")]).tolist() == [-1.0]
