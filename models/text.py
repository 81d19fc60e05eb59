"""How a listing becomes text for the fine-tuned model: one function, at training and at serving time.

``title | brand <b> | price <p>``: the title first (it carries the model codes), the brand when
the title does not already name it, the price when one parses; no description, category or
source in it (chosen on valid splits: docs/MODEL.md, "The model" and "Description words").

The duplicate matcher compares :func:`match_text`: the same text, then the first words of the
description (``| description <words>``, as many as the matcher was fitted with: its
``description_words``), then, where the listing names one, its ``source`` (the shop or feed it
came from) after a tab. ``serialize`` collapses every whitespace run to one space, so the tab
cannot occur in the serialised part and :func:`split_source` undoes the join exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from itertools import islice

__all__ = ["match_text", "parse_price", "serialize", "split_source"]

_PRICE = re.compile(r"\d+(?:[.,]\d+)?")
#: Joins a match text's serialised part and its source (never inside the serialised part).
SOURCE_SEPARATOR = "\tsource "
#: Opens a match text's description words (after the serialised fields).
DESCRIPTION_FIELD = " | description "
#: A description word: a run of characters that are neither whitespace nor the field separator.
_DESCRIPTION_WORD = re.compile(r"[^\s|]+")


def _clean(value: object) -> str:
    return " ".join(str(value or "").split())


def parse_price(value: object) -> float | None:
    """The first positive number in ``value`` (``"$1,299.00"`` → 1.0 is avoided: commas as thousands
    separators are dropped first), or None."""
    text = str(value or "").replace(",", "") if re.search(r"\d,\d{3}", str(value or "")) else str(value or "")
    match = _PRICE.search(text)
    if not match:
        return None
    try:
        number = float(match.group(0).replace(",", "."))
    except ValueError:
        return None
    return number if number > 0 else None


def serialize(title: str | None, attributes: Mapping[str, str] | None = None) -> str:
    """The model's text of a listing from its title and attributes (``brand``, ``price``)."""
    attributes = attributes or {}
    title = _clean(title)
    parts = [title]
    brand = _clean(attributes.get("brand"))
    if brand and brand.lower() not in title.lower():
        parts.append(f"brand {brand}")
    price = parse_price(attributes.get("price"))
    if price is not None:
        parts.append(f"price {price:g}")
    return " | ".join(p for p in parts if p)


def match_text(title: str | None, attributes: Mapping[str, str] | None = None, description: str | None = None,
               description_words: int = 0) -> str:
    """What the duplicate matcher compares: :func:`serialize`, the first ``description_words``
    words of ``description`` (``|`` dropped from them, so the text's fields stay apart), then
    the listing's ``source``."""
    source = _clean((attributes or {}).get("source"))
    text = serialize(title, attributes)
    # Scanned lazily: a description can be hundreds of KiB (WDC), the text keeps a few words of it.
    words = [m.group(0) for m in islice(_DESCRIPTION_WORD.finditer(description or ""), max(0, description_words))]
    if words:
        text = f"{text}{DESCRIPTION_FIELD}{' '.join(words)}"  # no title: the title part stays empty
    return f"{text}{SOURCE_SEPARATOR}{source}" if source else text


def split_source(text: str) -> tuple[str, str]:
    """``(serialised text, source)`` of a :func:`match_text`; the source is ``""`` when it names none."""
    head, _, source = text.partition(SOURCE_SEPARATOR)
    return head, source
