"""Readers of the common CSV form, pair metrics, and the generated demo catalogue."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest
from PIL import Image

from samestyle.models.data import (
    ListingRecord,
    cluster_pairs,
    pair_precision_recall,
    read_clusters,
    read_listings,
    read_pairs,
)
from samestyle.streams.dev.sample import generate_sample, planted_duplicate_pairs
from samestyle.topics.errors import ConfigError

SHARED_DATA = Path(__file__).resolve().parents[3].parent / "shared" / "data"
ABT_BUY = SHARED_DATA / "abt_buy" / "full_gt"

HEADER = "listing_id,title,description,price,brand,category,image_path,source"


def _write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_text(text, encoding=encoding)
    return path


# --- real data -------------------------------------------------------------------------------

needs_shared_data = pytest.mark.skipif(
    not ABT_BUY.is_dir(), reason=f"shared data not found at {ABT_BUY}"
)


@needs_shared_data
def test_abt_buy_full_gt_listings_and_clusters() -> None:
    listings = read_listings(ABT_BUY / "listings.csv")
    assert len(listings) == 2152
    assert len({r.listing_id for r in listings}) == 2152
    assert all(r.title for r in listings)
    assert all(r.supplier_id is None for r in listings)  # no supplier column in this set
    assert {r.attributes["source"] for r in listings} == {"abt.com", "buy.com"}

    clusters = read_clusters(ABT_BUY / "clusters.csv")
    assert set(clusters) == {r.listing_id for r in listings}
    truth = cluster_pairs(clusters)
    assert len(truth) == 1076

    matches = read_pairs(ABT_BUY / "matches.csv")
    assert len(matches) == 1076
    assert {frozenset((a, b)) for a, b, label in matches if label == 1} == truth
    scores = pair_precision_recall(((a, b) for a, b, _ in matches), truth)
    assert scores["precision"] == scores["recall"] == scores["f1"] == 1.0


@needs_shared_data
def test_real_limit_and_restricted_cluster_pairs() -> None:
    listings = read_listings(ABT_BUY / "listings.csv", limit=100)
    assert [r.listing_id for r in listings] == [f"abt_{i}" for i in range(100)]
    clusters = read_clusters(ABT_BUY / "clusters.csv")
    # Only abt listings in the first 100 rows: none of their buy.com matches is loaded.
    assert cluster_pairs(clusters, restrict_to=[r.listing_id for r in listings]) == set()


# --- handmade edge cases ---------------------------------------------------------------------


def test_listing_fields_attributes_and_image_resolution(tmp_path: Path) -> None:
    folder = tmp_path / "set"
    folder.mkdir()
    csv_path = _write(
        folder / "listings.csv",
        f"{HEADER},colour\n"
        "a1,Red Mug,A mug,9.99,Acme,Mugs,images/a1.png,shop,red\n"
        "a2,  Lamp  ,,,,,,shop,\n",
    )
    first, second = read_listings(csv_path)
    assert first == ListingRecord(
        listing_id="a1",
        title="Red Mug",
        description="A mug",
        category="Mugs",
        supplier_id=None,
        attributes={"price": "9.99", "brand": "Acme", "source": "shop", "colour": "red"},
        image_path=str(folder / "images" / "a1.png"),
    )
    assert Path(first.image_path).is_absolute()
    # Empty values are dropped from attributes; empty category and image become None.
    assert second.title == "Lamp"
    assert second.category is None and second.image_path is None
    assert second.attributes == {"source": "shop"}


def test_relative_csv_path_still_gives_absolute_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "d").mkdir()
    _write(tmp_path / "d" / "listings.csv", f"{HEADER}\nx,T,,,,,img/x.jpg,\n")
    monkeypatch.chdir(tmp_path)
    (record,) = read_listings("d/listings.csv")
    assert record.image_path == str(tmp_path / "d" / "img" / "x.jpg")


def test_supplier_column_is_read(tmp_path: Path) -> None:
    path = _write(tmp_path / "l.csv", f"{HEADER},supplier_id\na,T,,,,,,,s1\nb,U,,,,,,,\n")
    a, b = read_listings(path)
    assert a.supplier_id == "s1" and "supplier_id" not in a.attributes
    assert b.supplier_id is None


def test_bom_and_large_fields(tmp_path: Path) -> None:
    huge = "x" * 300_000  # over the csv module's default 128 KiB field limit
    path = _write(tmp_path / "l.csv", f"{HEADER}\nbom1,Tïtle,{huge},,,,,\n", encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    (record,) = read_listings(path)
    assert record.listing_id == "bom1" and record.title == "Tïtle"
    assert len(record.description) == 300_000
    clusters = _write(tmp_path / "c.csv", "listing_id,cluster_id\nbom1,c1\n", encoding="utf-8-sig")
    assert read_clusters(clusters) == {"bom1": "c1"}


def test_limit(tmp_path: Path) -> None:
    rows = "".join(f"id{i},T{i},,,,,,\n" for i in range(10))
    path = _write(tmp_path / "l.csv", f"{HEADER}\n{rows}")
    assert [r.listing_id for r in read_listings(path, limit=3)] == ["id0", "id1", "id2"]
    assert read_listings(path, limit=0) == []
    assert len(read_listings(path, limit=100)) == 10
    with pytest.raises(ConfigError, match="limit"):
        read_listings(path, limit=-1)


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    for reader in (read_listings, read_clusters, read_pairs):
        with pytest.raises(ConfigError, match="nope.csv"):
            reader(missing)


def test_missing_columns_are_named(tmp_path: Path) -> None:
    listings = _write(tmp_path / "listings.csv", "id,name\n1,x\n")
    with pytest.raises(ConfigError, match=r"listings\.csv.*listing_id, title"):
        read_listings(listings)
    clusters = _write(tmp_path / "clusters.csv", "listing_id,cluster\n1,x\n")
    with pytest.raises(ConfigError, match=r"clusters\.csv.*cluster_id"):
        read_clusters(clusters)
    pairs = _write(tmp_path / "pairs.csv", "listing_id_a,listing_id_b\n1,2\n")
    with pytest.raises(ConfigError, match=r"pairs\.csv.*label"):
        read_pairs(pairs)


def test_bad_rows_are_config_errors(tmp_path: Path) -> None:
    dup = _write(tmp_path / "dup.csv", f"{HEADER}\na,T,,,,,,\na,U,,,,,,\n")
    with pytest.raises(ConfigError, match="twice"):
        read_listings(dup)
    wide = _write(tmp_path / "wide.csv", f"{HEADER}\na,T,,,,,,,extra\n")
    with pytest.raises(ConfigError, match="more fields"):
        read_listings(wide)
    two = _write(tmp_path / "two.csv", "listing_id,cluster_id\na,c1\na,c2\n")
    with pytest.raises(ConfigError, match="two clusters"):
        read_clusters(two)
    label = _write(tmp_path / "label.csv", "listing_id_a,listing_id_b,label\na,b,maybe\n")
    with pytest.raises(ConfigError, match="maybe"):
        read_pairs(label)
    latin = tmp_path / "latin.csv"
    latin.write_bytes(f"{HEADER}\na,caf\xe9,,,,,,\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        read_listings(latin)


def test_read_pairs_labels_and_extra_columns(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "pairs.csv",
        "listing_id_a,listing_id_b,label,is_hard_negative\na,b,1,False\nc,d,0,True\ne,f,True,\n",
    )
    assert read_pairs(path) == [("a", "b", 1), ("c", "d", 0), ("e", "f", 1)]


def test_cluster_pairs() -> None:
    clusters = {"a": "1", "b": "1", "c": "1", "d": "2", "e": "3", "f": "3"}
    assert cluster_pairs(clusters) == {
        frozenset("ab"),
        frozenset("ac"),
        frozenset("bc"),
        frozenset("ef"),
    }
    assert cluster_pairs(clusters, restrict_to=["a", "c", "e", "zz"]) == {frozenset("ac")}
    assert cluster_pairs({}) == set()


# --- pair metrics ----------------------------------------------------------------------------


def test_pair_precision_recall_exact_numbers() -> None:
    truth = {frozenset("ab"), frozenset("cd"), frozenset("ef"), frozenset("gh")}
    # (b, a) repeats (a, b); (x, x) is a self-pair: both are dropped before counting.
    predicted = [("a", "b"), ("b", "a"), ("d", "c"), ("a", "c"), ("x", "x")]
    scores = pair_precision_recall(predicted, truth)
    assert scores["true_positives"] == 2
    assert scores["predicted"] == 3
    assert scores["actual"] == 4
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(0.5)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))  # 4/7


def test_pair_precision_recall_edge_cases() -> None:
    truth = {frozenset("ab")}
    nothing = pair_precision_recall([], truth)
    assert nothing == {
        "precision": None,
        "recall": 0.0,
        "f1": None,
        "true_positives": 0,
        "predicted": 0,
        "actual": 1,
    }
    no_truth = pair_precision_recall([("a", "b")], set())
    assert no_truth["precision"] == 0.0 and no_truth["recall"] is None and no_truth["f1"] is None
    all_wrong = pair_precision_recall([("a", "c")], truth)
    assert all_wrong["precision"] == 0.0 and all_wrong["recall"] == 0.0 and all_wrong["f1"] == 0.0
    perfect = pair_precision_recall(iter([("b", "a")]), truth)  # any iterable, any order
    assert perfect["precision"] == perfect["recall"] == perfect["f1"] == 1.0


# --- generated sample ------------------------------------------------------------------------


def test_generate_sample_is_deterministic(tmp_path: Path) -> None:
    first = generate_sample(tmp_path / "a", n_products=20, seed=3)
    second = generate_sample(tmp_path / "b", n_products=20, seed=3)
    other = generate_sample(tmp_path / "c", n_products=20, seed=4)
    for x, y, z in zip(first, second, other, strict=True):
        assert x.read_bytes() == y.read_bytes()
        assert x.read_bytes() != z.read_bytes()
    images_a = sorted((tmp_path / "a" / "images").iterdir())
    images_b = sorted((tmp_path / "b" / "images").iterdir())
    assert [p.name for p in images_a] == [p.name for p in images_b]
    assert all(p.read_bytes() == q.read_bytes() for p, q in zip(images_a, images_b, strict=True))


def test_generate_sample_shape_and_planted_pairs(tmp_path: Path) -> None:
    started = time.perf_counter()
    listings_csv, clusters_csv = generate_sample(tmp_path, n_products=40, seed=0)
    elapsed = time.perf_counter() - started
    assert elapsed < 5.0  # about 0.2 s here; generous for slow CI machines

    listings = read_listings(listings_csv)
    clusters = read_clusters(clusters_csv)
    assert len(listings) == 40 + 10 + 6  # originals, same-supplier copies, other-supplier resales
    assert set(clusters) == {r.listing_id for r in listings}
    assert len(set(clusters.values())) == 40
    assert all(r.supplier_id and r.category and r.title and r.description for r in listings)
    assert 1 < len({r.supplier_id for r in listings}) <= 5

    by_id = {r.listing_id: r for r in listings}
    planted = planted_duplicate_pairs(tmp_path)
    assert planted == planted_duplicate_pairs(clusters_csv)
    assert len(planted) == 10
    for pair in planted:
        a, b = (by_id[i] for i in pair)
        assert a.supplier_id == b.supplier_id
        assert clusters[a.listing_id] == clusters[b.listing_id]
        assert a.title != b.title  # edited, not copied verbatim

    # Every same-cluster pair is either a planted duplicate (same supplier) or a resale by
    # another supplier: the two kinds together are the same-style truth.
    same_style = cluster_pairs(clusters)
    assert len(same_style) == 16
    for pair in same_style - planted:
        a, b = (by_id[i] for i in pair)
        assert a.supplier_id != b.supplier_id

    with clusters_csv.open(encoding="utf-8") as handle:
        roles = [row["role"] for row in csv.DictReader(handle)]
    assert roles.count("original") == 40
    assert roles.count("near_copy") == 10 and roles.count("other_supplier") == 6


def test_sample_images_decode(tmp_path: Path) -> None:
    listings_csv, _ = generate_sample(tmp_path, n_products=12, seed=1)
    listings = read_listings(listings_csv)
    assert all(r.image_path for r in listings)
    for record in listings:
        with Image.open(record.image_path) as image:
            image.load()
            assert image.size == (96, 96)
            assert image.mode == "RGB"
            # Not a blank canvas: a product was drawn on it.
            low, high = image.convert("L").getextrema()
            assert high - low > 60


def test_near_copy_image_is_nearest_to_its_original(tmp_path: Path) -> None:
    import numpy as np

    listings_csv, clusters_csv = generate_sample(tmp_path, n_products=40, seed=0)
    listings = read_listings(listings_csv)
    with clusters_csv.open(encoding="utf-8") as handle:
        roles = {row["listing_id"]: row["role"] for row in csv.DictReader(handle)}

    def thumbnail(record: ListingRecord) -> np.ndarray:
        # 12x12 and mean-removed: tolerant of the copy's slight crop and brightness change.
        with Image.open(record.image_path) as image:
            small = image.convert("RGB").resize((12, 12), Image.Resampling.BOX)
        pixels = np.asarray(small, dtype=np.float32)
        return pixels - pixels.mean()

    originals = {r.listing_id: thumbnail(r) for r in listings if roles[r.listing_id] == "original"}
    by_id = {r.listing_id: r for r in listings}
    for pair in planted_duplicate_pairs(clusters_csv):
        original_id, copy_id = sorted(pair, key=lambda i: roles[i] != "original")
        copy = thumbnail(by_id[copy_id])
        nearest = min(originals, key=lambda i: float(np.abs(originals[i] - copy).mean()))
        assert nearest == original_id


def test_generate_sample_rejects_empty_catalogue(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        generate_sample(tmp_path, n_products=0)


def test_planted_pairs_needs_a_sample(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        planted_duplicate_pairs(tmp_path)
    _write(tmp_path / "clusters.csv", "listing_id,cluster_id\na,c\n")
    with pytest.raises(ConfigError, match="duplicate_of"):
        planted_duplicate_pairs(tmp_path)
