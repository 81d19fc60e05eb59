"""Readers for the common CSV form of the product-matching data, and pair metrics.

The common form (see ``../shared/data/README.md``):

- ``listings.csv``: ``listing_id, title, description, price, brand, category, image_path,
  source`` and sometimes extra columns (``supplier_id``, ...). ``image_path`` is relative to the
  CSV's folder and empty where a listing has no image.
- ``clusters.csv``: ``listing_id, cluster_id`` (+ optional columns such as ``split``); listings
  that share a ``cluster_id`` are the same product.
- pairs files (``matches.csv``, ``pairs_<split>.csv``): ``listing_id_a, listing_id_b, label``.

Every reader raises :class:`~topics.errors.ConfigError` naming the file when the file is
missing, unreadable, or lacks a required column: a wrong path is a configuration mistake, not
bad data to skip.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from samestyle.topics.errors import ConfigError

__all__ = [
    "LISTING_COLUMNS",
    "ListingRecord",
    "UnionFind",
    "cluster_pairs",
    "pair_precision_recall",
    "read_clusters",
    "read_listings",
    "read_pairs",
    "refuse_test",
]

#: The columns of the common listings form, in order (the writer in ``samestyle.streams.dev.sample`` uses it).
LISTING_COLUMNS: tuple[str, ...] = (
    "listing_id",
    "title",
    "description",
    "price",
    "brand",
    "category",
    "image_path",
    "source",
)
#: A listings file must have these; the other common columns may be absent (read as empty).
REQUIRED_LISTING_COLUMNS: tuple[str, ...] = ("listing_id", "title")
REQUIRED_CLUSTER_COLUMNS: tuple[str, ...] = ("listing_id", "cluster_id")
REQUIRED_PAIR_COLUMNS: tuple[str, ...] = ("listing_id_a", "listing_id_b", "label")
#: Supplier column names, first match wins. Without one, ``supplier_id`` is None.
SUPPLIER_COLUMNS: tuple[str, ...] = ("supplier_id", "supplier")

# Columns that become named fields of ListingRecord; every other non-empty value goes to
# ``attributes`` so nothing a data set adds is lost.
_RECORD_FIELDS = frozenset({"listing_id", "title", "description", "category", "image_path"})

# Some descriptions (WDC) exceed the csv module's 128 KiB default field limit. 2**31 - 1 is the
# largest value every platform's C long accepts.
_FIELD_SIZE_LIMIT = 2**31 - 1

_TRUE_LABELS = frozenset({"1", "true", "yes"})
_FALSE_LABELS = frozenset({"0", "false", "no"})


@dataclass(frozen=True)
class ListingRecord:
    """One row of a listings file.

    ``attributes`` holds price, brand, source and any column the reader does not know, with
    non-empty values only. ``image_path`` is absolute (resolved against the CSV's folder) or
    None. ``supplier_id`` is None when the file has no supplier column: the stream then treats
    every listing as coming from one supplier.
    """

    listing_id: str
    title: str
    description: str
    category: str | None
    supplier_id: str | None
    attributes: dict[str, str] = field(default_factory=dict)
    image_path: str | None = None


def _rows(path: str | Path, required: tuple[str, ...]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line_number, row)`` with values stripped; check the file and its header first.

    Raises ConfigError for a missing file, an undecodable file, missing columns, or a row with
    more fields than the header (a sign of broken quoting).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    if csv.field_size_limit() < _FIELD_SIZE_LIMIT:
        csv.field_size_limit(_FIELD_SIZE_LIMIT)
    try:
        # utf-8-sig drops a byte-order mark, which would otherwise glue itself to the first
        # column's name and make "listing_id" look missing.
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            header = [name.strip() for name in (reader.fieldnames or [])]
            missing = [name for name in required if name not in header]
            if missing:
                raise ConfigError(
                    f"{path}: missing required column(s) {', '.join(missing)} "
                    f"(found: {', '.join(header) or 'no header'})"
                )
            reader.fieldnames = header
            for row in reader:
                if None in row:
                    raise ConfigError(
                        f"{path}:{reader.line_num}: row has more fields than the header"
                    )
                # A short row gives None for its missing trailing fields: read them as empty.
                yield reader.line_num, {k: (v or "").strip() for k, v in row.items()}
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from error
    except csv.Error as error:
        raise ConfigError(f"{path}: malformed CSV ({error})") from error


def _resolve_image(base: Path, value: str) -> str | None:
    if not value:
        return None
    # normpath, not resolve(): no file-system access, and symlinked data folders keep their path.
    return os.path.normpath(base / value) if not os.path.isabs(value) else os.path.normpath(value)


def read_listings(path: str | Path, limit: int | None = None) -> list[ListingRecord]:
    """Read a listings file of the common form, in file order.

    ``limit`` keeps the first ``limit`` rows (``None`` reads all). Only ``listing_id`` and
    ``title`` are required columns; other common columns may be absent. Raises ConfigError for a
    missing file or column, an empty or repeated ``listing_id``.
    """
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0 or None, got {limit}")
    path = Path(path)
    base = path.absolute().parent
    records: list[ListingRecord] = []
    seen: set[str] = set()
    supplier_column: str | None = None
    # closing(): an early break for ``limit`` closes the file now, not at garbage collection.
    with contextlib.closing(_rows(path, REQUIRED_LISTING_COLUMNS)) as rows:
        for line, row in rows:
            if limit is not None and len(records) >= limit:
                break
            if supplier_column is None:
                supplier_column = next((c for c in SUPPLIER_COLUMNS if c in row), "")
            listing_id = row["listing_id"]
            if not listing_id:
                raise ConfigError(f"{path}:{line}: empty listing_id")
            if listing_id in seen:
                raise ConfigError(f"{path}:{line}: listing_id {listing_id!r} appears twice")
            seen.add(listing_id)
            attributes = {
                name: value
                for name, value in row.items()
                if value and name not in _RECORD_FIELDS and name != supplier_column
            }
            records.append(
                ListingRecord(
                    listing_id=listing_id,
                    title=row["title"],
                    description=row.get("description", ""),
                    category=row.get("category") or None,
                    supplier_id=(row.get(supplier_column) or None) if supplier_column else None,
                    attributes=attributes,
                    image_path=_resolve_image(base, row.get("image_path", "")),
                )
            )
    return records


def read_clusters(path: str | Path) -> dict[str, str]:
    """Read ``listing_id -> cluster_id`` from a clusters file; extra columns are ignored.

    Raises ConfigError for a missing file or column, an empty id, or a listing given two
    different clusters.
    """
    clusters: dict[str, str] = {}
    for line, row in _rows(path, REQUIRED_CLUSTER_COLUMNS):
        listing_id, cluster_id = row["listing_id"], row["cluster_id"]
        if not listing_id or not cluster_id:
            raise ConfigError(f"{path}:{line}: empty listing_id or cluster_id")
        previous = clusters.setdefault(listing_id, cluster_id)
        if previous != cluster_id:
            raise ConfigError(
                f"{path}:{line}: listing {listing_id!r} in two clusters "
                f"({previous!r}, {cluster_id!r})"
            )
    return clusters


def read_pairs(path: str | Path) -> list[tuple[str, str, int]]:
    """Read ``(listing_id_a, listing_id_b, label)`` rows, label 1 = same product, 0 = not.

    Labels ``1/0`` (and ``true/false``, ``yes/no``, any case) are accepted; anything else is a
    ConfigError naming the line. Extra columns (e.g. ``is_hard_negative``) are ignored.
    """
    pairs: list[tuple[str, str, int]] = []
    for line, row in _rows(path, REQUIRED_PAIR_COLUMNS):
        raw = row["label"].lower()
        if raw in _TRUE_LABELS:
            label = 1
        elif raw in _FALSE_LABELS:
            label = 0
        else:
            raise ConfigError(f"{path}:{line}: label {row['label']!r} is not 0/1")
        if not row["listing_id_a"] or not row["listing_id_b"]:
            raise ConfigError(f"{path}:{line}: empty listing id")
        pairs.append((row["listing_id_a"], row["listing_id_b"], label))
    return pairs


def cluster_pairs(
    clusters: Mapping[str, str], restrict_to: Iterable[str] | None = None
) -> set[frozenset[str]]:
    """All unordered pairs of distinct listings that share a cluster.

    ``restrict_to`` keeps only listings in that collection (e.g. those actually loaded with a
    ``limit``). The count is quadratic in cluster size: a cluster of n listings gives
    n * (n - 1) / 2 pairs.
    """
    keep = None if restrict_to is None else set(restrict_to)
    members: dict[str, list[str]] = defaultdict(list)
    for listing_id, cluster_id in clusters.items():
        if keep is None or listing_id in keep:
            members[cluster_id].append(listing_id)
    return {frozenset(pair) for ids in members.values() for pair in itertools.combinations(ids, 2)}


def pair_precision_recall(
    predicted: Iterable[tuple[str, str]], truth: set[frozenset[str]]
) -> dict[str, float | int | None]:
    """Pairwise precision, recall and F1 of predicted pairs against true pairs.

    Predicted pairs are unordered and de-duplicated ((a, b) and (b, a) count once); a pair of a
    listing with itself is dropped. Returns ``precision`` (None when nothing is predicted: there
    is no precision to speak of, and 0 or 1 would both mislead), ``recall`` (None when ``truth``
    is empty), ``f1`` (None when either is None, 0.0 when both are 0), and the counts
    ``true_positives``, ``predicted`` and ``actual``.
    """
    predicted_set = {frozenset(pair) for pair in predicted}
    predicted_set = {pair for pair in predicted_set if len(pair) == 2}
    true_set = {pair for pair in truth if len(pair) == 2}
    true_positives = len(predicted_set & true_set)
    precision = true_positives / len(predicted_set) if predicted_set else None
    recall = true_positives / len(true_set) if true_set else None
    if precision is None or recall is None:
        f1 = None
    elif precision + recall == 0:
        f1 = 0.0
    else:
        f1 = 2 * precision * recall / (precision + recall)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "true_positives": true_positives,
        "predicted": len(predicted_set),
        "actual": len(true_set),
    }


class UnionFind:
    """Connected components of listings joined by positive pairs."""

    def __init__(self) -> None:
        self.parent: dict[str, str] = {}

    def find(self, x: str) -> str:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: str, b: str) -> None:
        self.parent[self.find(a)] = self.find(b)


def refuse_test(path: Path | None) -> None:
    """Training never reads a test split: refuse a file whose name says it is one."""
    if path is not None and "test" in path.stem.lower():
        raise ConfigError(f"{path}: training never reads a test split")
