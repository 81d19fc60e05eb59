"""A small demo catalogue the project generates itself, with planted duplicates.

``generate_sample(out_dir)`` writes, in the common CSV form of ``models.data``:

- ``listings.csv`` with an extra ``supplier_id`` column (a handful of made-up suppliers);
- ``clusters.csv`` with ``listing_id, cluster_id, role, duplicate_of``: one cluster per product,
  ``role`` is ``original``, ``near_copy`` (same supplier re-listed it: a duplicate to alert on)
  or ``other_supplier`` (the same product sold elsewhere: same style, not a duplicate), and
  ``duplicate_of`` names the original of a ``near_copy``;
- ``images/``: one 96x96 picture per listing, drawn with PIL (PNG; near-copies are the
  original re-encoded as JPEG after a slight crop and brightness change, as re-uploads are).

Nothing is downloaded and no data file is committed; the same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from samestyle.models.data import LISTING_COLUMNS
from samestyle.topics.errors import ConfigError

__all__ = ["SUPPLIERS", "generate_sample", "main", "planted_duplicate_pairs"]

IMAGE_SIZE = 96
# Drawn at 2x then downsampled: cheap anti-aliasing, so edges look photographed, not pixel art.
_CANVAS = IMAGE_SIZE * 2
NEAR_COPY_SHARE = 0.25
OTHER_SUPPLIER_SHARE = 0.15
SUPPLIERS: tuple[str, ...] = (
    "northwind-trading",
    "blue-harbor-goods",
    "casa-mercado",
    "peakline-outlet",
    "urban-nest-supply",
)
RGB = tuple[int, int, int]
CLUSTER_COLUMNS: tuple[str, ...] = ("listing_id", "cluster_id", "role", "duplicate_of")

_COLOURS: dict[str, RGB] = {
    "Crimson Red": (190, 30, 45),
    "Navy Blue": (28, 45, 95),
    "Sage Green": (140, 165, 125),
    "Mustard Yellow": (215, 170, 40),
    "Charcoal": (55, 58, 62),
    "Terracotta": (200, 105, 70),
    "Sky Blue": (120, 180, 225),
    "Blush Pink": (230, 160, 170),
    "Forest Green": (35, 95, 60),
    "Burnt Orange": (220, 110, 30),
    "Lavender": (165, 140, 200),
    "Teal": (25, 130, 135),
    "Ivory": (240, 232, 210),
    "Chocolate Brown": (100, 60, 40),
}
_PATTERNS: dict[str, str] = {
    "solid": "",
    "stripes": "Striped",
    "dots": "Polka Dot",
    "checks": "Checked",
}
_BRANDS = (
    "Hearthly",
    "Nordvik",
    "Lumeo",
    "Strideform",
    "Sonique",
    "Packwell",
    "Terrano",
    "Chronis",
    "Aquila",
    "Threadly",
    "Oakmere",
    "Vellora",
)
_ADJECTIVES = ("Classic", "Modern", "Minimalist", "Vintage", "Everyday", "Premium", "Compact")
_SHOUT_SUFFIXES = ("NEW", "- Free Shipping", "HOT SALE", "(2024 Model)", "- Best Seller", "!!")


@dataclass(frozen=True)
class _Kind:
    """A product type: words for its listings and how to draw it."""

    noun: str
    category: str
    materials: tuple[str, ...]
    sizes: tuple[str, ...]
    features: tuple[str, ...]
    price_range: tuple[int, int]
    body: Callable[[ImageDraw.ImageDraw, float], None]  # fills the patterned part into a mask
    details: Callable[[ImageDraw.ImageDraw, float, RGB, RGB], None]  # outlines, handles, soles


# Shape functions draw on a _CANVAS x _CANVAS image; ``s`` scales around the centre so each
# product (and each photo variant) sits a little differently in the frame.
def _p(s: float, x: float, y: float) -> tuple[float, float]:
    c = _CANVAS / 2
    return (c + (x - c) * s, c + (y - c) * s)


def _box(s: float, x0: float, y0: float, x1: float, y1: float) -> list[float]:
    return [*_p(s, x0, y0), *_p(s, x1, y1)]


def _dark(rgb: RGB, f: float = 0.6) -> RGB:
    return (int(rgb[0] * f), int(rgb[1] * f), int(rgb[2] * f))


def _mug_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rounded_rectangle(_box(s, 50, 55, 130, 155), radius=int(12 * s), fill=255)


def _mug_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.ellipse(_box(s, 112, 78, 158, 132), outline=main, width=max(2, int(11 * s)))
    d.ellipse(_box(s, 50, 47, 130, 63), fill=_dark(main, 0.5))


def _lamp_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.polygon([_p(s, 70, 35), _p(s, 122, 35), _p(s, 148, 95), _p(s, 44, 95)], fill=255)


def _lamp_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.rectangle(_box(s, 92, 95, 100, 150), fill=_dark(accent, 0.5))
    d.ellipse(_box(s, 60, 144, 132, 162), fill=_dark(accent, 0.4))


def _sneaker_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.polygon(
        [
            _p(s, 30, 130),
            _p(s, 34, 80),
            _p(s, 62, 74),
            _p(s, 92, 100),
            _p(s, 150, 110),
            _p(s, 166, 124),
            _p(s, 166, 132),
        ],
        fill=255,
    )


def _sneaker_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.rounded_rectangle(_box(s, 26, 128, 170, 142), radius=int(6 * s), fill=(245, 245, 240))
    for i in range(4):
        x = 66 + i * 9
        d.line(
            [_p(s, x, 84 + i * 4), _p(s, x + 10, 92 + i * 4)], fill=accent, width=max(1, int(3 * s))
        )


def _headphones_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rounded_rectangle(_box(s, 36, 100, 66, 156), radius=int(12 * s), fill=255)
    d.rounded_rectangle(_box(s, 126, 100, 156, 156), radius=int(12 * s), fill=255)


def _headphones_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.arc(
        _box(s, 44, 36, 148, 150),
        start=180,
        end=360,
        fill=_dark(main, 0.5),
        width=max(2, int(10 * s)),
    )
    d.rectangle(_box(s, 60, 108, 70, 148), fill=accent)
    d.rectangle(_box(s, 122, 108, 132, 148), fill=accent)


def _backpack_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rounded_rectangle(_box(s, 52, 48, 140, 164), radius=int(26 * s), fill=255)


def _backpack_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.arc(
        _box(s, 80, 28, 112, 64),
        start=180,
        end=360,
        fill=_dark(main, 0.5),
        width=max(2, int(6 * s)),
    )
    d.rounded_rectangle(
        _box(s, 66, 110, 126, 152), radius=int(10 * s), outline=accent, width=max(2, int(5 * s))
    )
    d.line([_p(s, 70, 118), _p(s, 122, 118)], fill=_dark(accent, 0.7), width=max(1, int(3 * s)))


def _vase_body(d: ImageDraw.ImageDraw, s: float) -> None:
    # A curved profile: narrow neck, wide belly, small foot.
    left, right = [], []
    for i in range(21):
        y = 36 + i * 6.2
        half = 14 + 30 * math.sin(math.pi * min(1.0, (i / 20) * 1.15)) ** 1.5
        left.append(_p(s, 96 - half, y))
        right.append(_p(s, 96 + half, y))
    d.polygon(left + right[::-1], fill=255)


def _vase_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.ellipse(_box(s, 80, 31, 112, 41), fill=_dark(main, 0.4))


def _watch_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rectangle(_box(s, 80, 20, 112, 172), fill=255)


def _watch_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.ellipse(_box(s, 58, 58, 134, 134), fill=_dark(accent, 0.5))
    d.ellipse(_box(s, 64, 64, 128, 128), fill=(248, 248, 244))
    d.line([_p(s, 96, 96), _p(s, 96, 72)], fill=(20, 20, 20), width=max(1, int(4 * s)))
    d.line([_p(s, 96, 96), _p(s, 114, 104)], fill=(20, 20, 20), width=max(1, int(3 * s)))


def _bottle_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.rounded_rectangle(_box(s, 66, 70, 126, 168), radius=int(14 * s), fill=255)
    d.polygon([_p(s, 66, 84), _p(s, 82, 52), _p(s, 110, 52), _p(s, 126, 84)], fill=255)


def _bottle_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.rounded_rectangle(_box(s, 80, 30, 112, 54), radius=int(5 * s), fill=_dark(accent, 0.6))
    d.rectangle(_box(s, 66, 104, 126, 126), fill=(235, 235, 230))


def _tshirt_body(d: ImageDraw.ImageDraw, s: float) -> None:
    d.polygon(
        [
            _p(s, 70, 36),
            _p(s, 84, 44),
            _p(s, 108, 44),
            _p(s, 122, 36),
            _p(s, 160, 62),
            _p(s, 146, 86),
            _p(s, 132, 78),
            _p(s, 132, 164),
            _p(s, 60, 164),
            _p(s, 60, 78),
            _p(s, 46, 86),
            _p(s, 32, 62),
        ],
        fill=255,
    )


def _tshirt_details(d: ImageDraw.ImageDraw, s: float, main: RGB, accent: RGB) -> None:
    d.arc(
        _box(s, 82, 30, 110, 54), start=0, end=180, fill=_dark(main, 0.6), width=max(1, int(4 * s))
    )


_KINDS: tuple[_Kind, ...] = (
    _Kind(
        "Coffee Mug",
        "Home & Kitchen > Drinkware > Mugs",
        ("Ceramic", "Stoneware", "Enamel", "Porcelain"),
        ("300 ml", "350 ml", "450 ml"),
        ("Dishwasher safe", "Microwave safe", "Glazed interior", "Comfortable C-shaped handle"),
        (8, 28),
        _mug_body,
        _mug_details,
    ),
    _Kind(
        "Table Lamp",
        "Lighting > Lamps > Table Lamps",
        ("Brass", "Walnut", "Concrete", "Linen"),
        ("30 cm", "42 cm", "55 cm"),
        ("E27 socket", "Inline dimmer switch", "1.8 m fabric cable", "Warm ambient glow"),
        (29, 129),
        _lamp_body,
        _lamp_details,
    ),
    _Kind(
        "Running Sneakers",
        "Shoes > Sneakers",
        ("Canvas", "Knit Mesh", "Suede", "Leather"),
        ("EU 40", "EU 42", "EU 44"),
        ("Cushioned EVA midsole", "Breathable upper", "Non-slip rubber outsole", "Padded collar"),
        (39, 149),
        _sneaker_body,
        _sneaker_details,
    ),
    _Kind(
        "Wireless Headphones",
        "Electronics > Audio > Headphones",
        ("Aluminium", "Matte Plastic", "Recycled Plastic", "Walnut Wood"),
        ("Over-Ear", "On-Ear", "Foldable"),
        (
            "40 h battery life",
            "Bluetooth 5.3",
            "Active noise cancelling",
            "Memory-foam ear cushions",
        ),
        (35, 249),
        _headphones_body,
        _headphones_details,
    ),
    _Kind(
        "Backpack",
        "Bags > Backpacks",
        ("Canvas", "Recycled Polyester", "Waxed Cotton", "Nylon"),
        ("18 L", "22 L", "28 L"),
        (
            "Padded 15-inch laptop sleeve",
            "Water-resistant",
            "Hidden back pocket",
            "Ergonomic straps",
        ),
        (25, 119),
        _backpack_body,
        _backpack_details,
    ),
    _Kind(
        "Flower Vase",
        "Home Decor > Vases",
        ("Ceramic", "Hand-blown Glass", "Terracotta", "Matte Porcelain"),
        ("Small", "Medium", "Tall"),
        ("Watertight", "Hand finished", "Each piece unique", "Wide stable base"),
        (15, 69),
        _vase_body,
        _vase_details,
    ),
    _Kind(
        "Analog Watch",
        "Watches > Wristwatches",
        ("Leather", "Silicone", "Nylon", "Stainless Steel"),
        ("36 mm", "40 mm", "42 mm"),
        (
            "Japanese quartz movement",
            "5 ATM water resistant",
            "Scratch-resistant glass",
            "Quick-release strap",
        ),
        (45, 299),
        _watch_body,
        _watch_details,
    ),
    _Kind(
        "Water Bottle",
        "Sports & Outdoors > Hydration > Bottles",
        ("Stainless Steel", "Tritan", "Glass", "Aluminium"),
        ("500 ml", "750 ml", "1 L"),
        ("Keeps drinks cold 24 h", "BPA free", "Leak-proof lid", "Fits most cup holders"),
        (12, 45),
        _bottle_body,
        _bottle_details,
    ),
    _Kind(
        "T-Shirt",
        "Clothing > Tops > T-Shirts",
        ("Organic Cotton", "Linen Blend", "Jersey", "Bamboo"),
        ("S", "M", "L", "XL"),
        ("Relaxed fit", "Pre-shrunk", "Tagless neck label", "Double-stitched hems"),
        (12, 39),
        _tshirt_body,
        _tshirt_details,
    ),
)


@dataclass(frozen=True)
class _Product:
    index: int
    kind: _Kind
    colour: str
    accent: str
    pattern: str
    material: str
    size: str
    brand: str
    adjective: str
    features: tuple[str, ...]
    price: float
    scale: float


def _pattern_fill(pattern: str, main: RGB, accent: RGB, phase: int) -> Image.Image:
    img = Image.new("RGB", (_CANVAS, _CANVAS), main)
    d = ImageDraw.Draw(img)
    step = 22
    if pattern == "stripes":
        for y in range(-step + phase % step, _CANVAS, step):
            d.rectangle([0, y, _CANVAS, y + step // 2 - 2], fill=accent)
    elif pattern == "dots":
        for y in range(phase % step, _CANVAS, step):
            for x in range((y // step % 2) * step // 2, _CANVAS, step):
                d.ellipse([x - 4, y - 4, x + 4, y + 4], fill=accent)
    elif pattern == "checks":
        for y in range(0, _CANVAS, step):
            for x in range(0, _CANVAS, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=accent)
    return img


def _render(
    product: _Product, rng: random.Random, np_rng: np.random.Generator, *, variant: bool
) -> Image.Image:
    """Draw the product; ``variant`` makes a different photo of the same item (another shop)."""
    main, accent = _COLOURS[product.colour], _COLOURS[product.accent]
    shade = rng.randint(226, 250)
    tint = rng.choice(((0, 0, 0), (6, 2, -6), (-4, 0, 6), (4, 4, -2)))
    background = tuple(max(0, min(255, shade + t)) for t in tint)
    scale = product.scale * (rng.uniform(0.82, 0.92) if variant else 1.0)
    canvas = Image.new("RGB", (_CANVAS, _CANVAS), background)
    d = ImageDraw.Draw(canvas)
    d.ellipse(_box(scale, 40, 160, 152, 178), fill=_dark(background, 0.82))  # floor shadow
    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    product.kind.body(ImageDraw.Draw(mask), scale)
    canvas.paste(_pattern_fill(product.pattern, main, accent, product.index * 7), (0, 0), mask)
    product.kind.details(d, scale, main, accent)
    if variant:
        # Another photographer: mirrored, tilted, shifted, differently lit.
        canvas = ImageOps.mirror(canvas) if rng.random() < 0.5 else canvas
        canvas = canvas.rotate(
            rng.uniform(-9, 9),
            resample=Image.Resampling.BILINEAR,
            translate=(rng.randint(-10, 10), rng.randint(-8, 8)),
            fillcolor=background,
        )
        canvas = ImageEnhance.Brightness(canvas).enhance(rng.uniform(0.85, 1.1))
    image = canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.LANCZOS)
    # Sensor noise, so no two renders are pixel-identical by accident.
    pixels = np.asarray(image, dtype=np.int16) + np_rng.integers(
        -4, 5, size=(IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def _near_copy_image(original: Image.Image, rng: random.Random) -> bytes:
    """The same photo uploaded again: slightly cropped, re-lit, JPEG-compressed."""
    w, h = original.size
    left, top = rng.randint(0, 3), rng.randint(0, 3)
    right, bottom = w - rng.randint(0, 3), h - rng.randint(0, 3)
    image = original.crop((left, top, right, bottom)).resize((w, h), Image.Resampling.BICUBIC)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.94, 1.06))
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(0.4))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(70, 88))
    return buffer.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _title(p: _Product) -> str:
    pattern = _PATTERNS[p.pattern]
    words = [p.brand, p.adjective, *([pattern] if pattern else []), p.material, p.kind.noun]
    return f"{' '.join(words)} - {p.colour}, {p.size}"


def _other_supplier_title(p: _Product, rng: random.Random) -> str:
    pattern = _PATTERNS[p.pattern]
    with_pattern = f" with {pattern.lower()} design" if pattern else ""
    templates = (
        f"{p.kind.noun} in {p.colour} {p.material}{with_pattern} by {p.brand} ({p.size})",
        f"{p.brand} {p.kind.noun} {p.size} | {p.material} | {p.colour}{with_pattern}",
        f"{p.colour} {p.material} {p.kind.noun}{with_pattern}, {p.size} - {p.brand}",
    )
    return rng.choice(templates)


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 4 or not word.isalpha():
        return word
    i = rng.randint(1, len(word) - 3)
    if rng.random() < 0.5:
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]  # swap two letters
    return word[:i] + word[i + 1 :]  # drop one


def _near_copy_title(title: str, rng: random.Random) -> str:
    """One to three small edits: typo, casing, word order, a shouty suffix."""
    original = title
    edits = rng.sample(("typo", "case", "order", "suffix"), k=rng.randint(1, 3))
    if "suffix" not in edits and rng.random() < 0.5:
        edits.append("suffix")
    # Word-order edits stay inside the name, before " - colour, size", as a seller would make.
    name, sep, rest = title.partition(" - ")
    words = name.split(" ")
    if "typo" in edits:
        candidates = [i for i, w in enumerate(words) if len(w) >= 5 and w.isalpha()]
        if candidates:
            i = rng.choice(candidates)
            words[i] = _typo(words[i], rng)
    if "order" in edits and len(words) >= 3:
        i = rng.randint(1, len(words) - 2)
        words[i], words[i + 1] = words[i + 1], words[i]
    title = " ".join(words) + sep + rest
    if "case" in edits:
        title = rng.choice((title.upper(), title.lower(), title.title()))
    if "suffix" in edits or title == original:
        # A suffix whenever the other edits happened to change nothing (e.g. .title() of a
        # title already in title case): a near-copy is never a verbatim copy.
        title = f"{title} {rng.choice(_SHOUT_SUFFIXES)}"
    return title


def _description(p: _Product) -> str:
    pattern = _PATTERNS[p.pattern]
    look = f"{pattern.lower()} {p.colour.lower()}" if pattern else p.colour.lower()
    return (
        f"{p.adjective} {p.kind.noun.lower()} by {p.brand}, "
        f"made of {p.material.lower()} in {look}. "
        f"{'. '.join(p.features)}. Size: {p.size}."
    )


def _other_supplier_description(p: _Product) -> str:
    return (
        f"{p.brand} {p.kind.noun} - {p.size}. Colour: {p.colour}. Material: {p.material}. "
        f"Features: {', '.join(f.lower() for f in reversed(p.features))}."
    )


def _products(n: int, rng: random.Random) -> list[_Product]:
    # Distinct (kind, colour, pattern) so no two products are look-alikes by accident; past the
    # number of combinations they repeat with a different brand, material and framing.
    combos = [(k, c, pat) for k in range(len(_KINDS)) for c in _COLOURS for pat in _PATTERNS]
    rng.shuffle(combos)
    colours = list(_COLOURS)
    products = []
    for i in range(n):
        k, colour, pattern = combos[i % len(combos)]
        kind = _KINDS[k]
        accent = rng.choice([c for c in colours if c != colour])
        low, high = kind.price_range
        products.append(
            _Product(
                index=i,
                kind=kind,
                colour=colour,
                accent=accent,
                pattern=pattern,
                material=rng.choice(kind.materials),
                size=rng.choice(kind.sizes),
                brand=rng.choice(_BRANDS),
                adjective=rng.choice(_ADJECTIVES),
                features=tuple(rng.sample(kind.features, k=2)),
                price=rng.randint(low, high) + 0.99,
                scale=rng.uniform(0.88, 1.05),
            )
        )
    return products


def generate_sample(out_dir: str | Path, n_products: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Write a demo catalogue to ``out_dir`` and return ``(listings_csv, clusters_csv)``.

    ``round(0.25 * n_products)`` products get a near-copy listing by the same supplier (the
    duplicates to alert on) and ``round(0.15 * n_products)`` other products are also sold by a
    different supplier (same style, not a duplicate). Originals come first in the file, then
    the later listings, as they would arrive on a stream. Same seed, same bytes.
    """
    if n_products < 1:
        raise ConfigError(f"n_products must be >= 1, got {n_products}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    np_rng = np.random.default_rng(seed)
    products = _products(n_products, rng)
    suppliers = [rng.choice(SUPPLIERS) for _ in products]
    order = list(range(n_products))
    rng.shuffle(order)
    n_copy = round(NEAR_COPY_SHARE * n_products)
    n_other = round(OTHER_SUPPLIER_SHARE * n_products)
    near_copied = sorted(order[:n_copy])
    resold = sorted(order[n_copy : n_copy + n_other])

    listings: list[dict[str, str]] = []
    clusters: list[dict[str, str]] = []
    originals: dict[int, Image.Image] = {}

    def add(
        p: _Product,
        supplier: str,
        title: str,
        description: str,
        price: float,
        image: bytes,
        suffix: str,
        role: str,
        duplicate_of: str = "",
    ) -> str:
        listing_id = f"sample-{len(listings):04d}"
        image_path = f"images/{listing_id}.{suffix}"
        (out / image_path).write_bytes(image)
        listings.append(
            {
                "listing_id": listing_id,
                "title": title,
                "description": description,
                "price": f"{price:.2f}",
                "brand": p.brand,
                "category": p.kind.category,
                "image_path": image_path,
                "source": "samestyle-sample",
                "supplier_id": supplier,
            }
        )
        clusters.append(
            {
                "listing_id": listing_id,
                "cluster_id": f"sample-c{p.index:04d}",
                "role": role,
                "duplicate_of": duplicate_of,
            }
        )
        return listing_id

    original_ids: dict[int, str] = {}
    for p, supplier in zip(products, suppliers, strict=True):
        originals[p.index] = _render(p, rng, np_rng, variant=False)
        original_ids[p.index] = add(
            p,
            supplier,
            _title(p),
            _description(p),
            p.price,
            _png_bytes(originals[p.index]),
            "png",
            "original",
        )

    # Later arrivals, interleaved so copies and resales do not come in two blocks.
    later = [(i, "near_copy") for i in near_copied] + [(i, "other_supplier") for i in resold]
    rng.shuffle(later)
    for i, role in later:
        p = products[i]
        if role == "near_copy":
            description = _description(p)
            if rng.random() < 0.5:
                description += rng.choice(
                    (" Ships within 24 hours.", " Limited stock!", " Gift box included.")
                )
            add(
                p,
                suppliers[i],
                _near_copy_title(_title(p), rng),
                description,
                p.price + rng.choice((0.0, 0.0, -1.0, 1.0, -2.0)),
                _near_copy_image(originals[i], rng),
                "jpg",
                role,
                original_ids[i],
            )
        else:
            other = rng.choice([s for s in SUPPLIERS if s != suppliers[i]])
            add(
                p,
                other,
                _other_supplier_title(p, rng),
                _other_supplier_description(p),
                round(p.price * rng.uniform(0.85, 1.2)) + 0.49,
                _png_bytes(_render(p, rng, np_rng, variant=True)),
                "png",
                role,
            )

    listings_csv, clusters_csv = out / "listings.csv", out / "clusters.csv"
    _write_csv(listings_csv, (*LISTING_COLUMNS, "supplier_id"), listings)
    _write_csv(clusters_csv, CLUSTER_COLUMNS, clusters)
    return listings_csv, clusters_csv


def _write_csv(path: Path, columns: Sequence[str], rows: list[dict[str, str]]) -> None:
    # "\n" line ends: the same bytes on every platform.
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def planted_duplicate_pairs(path: str | Path) -> set[frozenset[str]]:
    """The same-supplier near-copy pairs of a generated sample (what duplicate alerts should find).

    ``path`` is the sample folder or its ``clusters.csv``. Other-supplier resales are not in it:
    they are same-style matches, not duplicates.
    """
    path = Path(path)
    clusters_csv = path / "clusters.csv" if path.is_dir() else path
    if not clusters_csv.is_file():
        raise ConfigError(f"{clusters_csv}: file not found")
    with clusters_csv.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        if "duplicate_of" not in (reader.fieldnames or []):
            raise ConfigError(
                f"{clusters_csv}: missing column duplicate_of (not a generated sample?)"
            )
        return {
            frozenset((row["listing_id"], row["duplicate_of"]))
            for row in reader
            if row["duplicate_of"]
        }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m models.sample OUT_DIR [--products N] [--seed S]``."""
    parser = argparse.ArgumentParser(
        prog="python -m models.sample", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--products", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    listings_csv, clusters_csv = generate_sample(args.out_dir, args.products, args.seed)
    pairs = planted_duplicate_pairs(clusters_csv)
    print(f"wrote {listings_csv} and {clusters_csv} ({len(pairs)} planted duplicate pairs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
