"""Listing images: fetch bytes offline, decode them safely, turn them into model input.

Everything here runs per listing on CPU worker threads, so it keeps no shared mutable state
and never touches PIL's process-wide settings (``Image.MAX_IMAGE_PIXELS``,
``ImageFile.LOAD_TRUNCATED_IMAGES``): the limits are checked explicitly instead.

Every failure a bad listing can cause is raised as :class:`topics.errors.ImageError`, whose
message is the dead-letter reason, so it names what was wrong (and the offending size).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from samestyle.topics.errors import ImageError

DEFAULT_MAX_IMAGE_BYTES = 20_000_000
# 40 megapixels is a 7300x5500 photo: larger than any product shot, and a 40 MP RGB bitmap is
# already 120 MB decoded. A tiny PNG that claims more is a decompression bomb.
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Formats a product photo comes in. Everything else is refused before decoding: PIL can open
# dozens of formats, and some (EPS via Ghostscript) are not safe to feed untrusted bytes.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "AVIF", "GIF", "BMP", "TIFF")  # JPEG includes MPO

__all__ = [
    "DEFAULT_MAX_IMAGE_BYTES",
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_FORMATS",
    "ImagePreprocessing",
    "decode_image",
    "load_image_bytes",
]


def load_image_bytes(
    uri: str, base_dir: str | Path | None = None, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
) -> bytes:
    """Read a listing image from a local path or a ``file://`` URI.

    Relative paths are taken relative to ``base_dir`` (the current directory when ``None``).
    Remote schemes (``http``, ``https``, ``s3``, ...) are refused: the service runs offline, and
    fetching arbitrary URLs from a stream worker would stall a partition on slow hosts.

    Raises:
        ImageError: remote URI, missing or unreadable file, or a file over ``max_bytes``.
    """
    if not uri or not uri.strip():
        raise ImageError("empty image URI")
    parsed = urlparse(uri)
    scheme = parsed.scheme.lower()
    # A one-letter "scheme" is a Windows drive (C:\...), not a URI.
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageError(f"cannot fetch remote images offline: {uri!r} (file URI with host)")
        path = Path(unquote(parsed.path))
    elif scheme and len(scheme) > 1:
        raise ImageError(f"cannot fetch remote images offline: {uri!r}")
    else:
        path = Path(uri)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path

    try:
        size = path.stat().st_size
        if not path.is_file():
            raise ImageError(f"image path is not a file: {str(path)!r}")
        if size > max_bytes:
            raise ImageError(
                f"image file {str(path)!r} is {size} bytes, over the {max_bytes} limit"
            )
        with path.open("rb") as fh:
            # Read one byte past the limit: the file may have grown since stat().
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise ImageError(f"image file not found: {str(path)!r}") from None
    except OSError as exc:
        raise ImageError(f"cannot read image file {str(path)!r}: {exc}") from exc
    if len(data) > max_bytes:
        raise ImageError(f"image file {str(path)!r} is over the {max_bytes}-byte limit")
    return data


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES,
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    draft_size: int | None = None,
) -> Image.Image:
    """Decode image bytes into an upright RGB PIL image.

    The pixel limit is checked from the header, before any pixel is decoded. Transparent
    images are composited onto white (product cut-outs are shown on white; a bare RGB convert
    would put them on black). EXIF orientation is applied. Animated images use their first
    frame. ``draft_size`` lets JPEG decoding shrink by DCT scaling while both sides stay at least
    that size: several times faster on large photos, and nothing is lost after the later resize.

    Raises:
        ImageError: empty, oversized, undecodable or truncated data, or too many pixels.
    """
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the {max_bytes}-byte limit")
    try:
        # Lazy: reads the header only. PIL's own bomb guard (a warning above ~89 MP, an error
        # above ~179 MP) also fires in here; our lower limit below is the one that matters.
        # Silencing that warning would need warnings.catch_warnings(), which is not
        # thread-safe, so a >89 MP image may log one PIL warning before being rejected.
        img = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        width, height = img.size
        if width <= 0 or height <= 0:
            raise ImageError(f"image has an empty size {width}x{height}")
        if width * height > max_pixels:
            raise ImageError(
                f"image is {width}x{height} = {width * height} pixels, over the {max_pixels} limit"
            )
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB", (draft_size, draft_size))
        img.load()  # decode now, so truncated data fails here rather than later
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(
            f"not an image in a supported format ({', '.join(IMAGE_FORMATS)}); "
            f"{len(data)} bytes starting {data[:8]!r}"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"image rejected as a decompression bomb: {exc}") from exc
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        raise ImageError(f"cannot decode image ({len(data)} bytes): {exc}") from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white."""
    if img.mode == "P":
        # Palette transparency must go through RGBA (PIL warns on a direct RGB convert).
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "RGB" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class ImagePreprocessing:
    """Bytes → normalised ``[3, size, size]`` float32 tensor, as a backbone expects.

    Centre crop then resize, the TF EfficientNet evaluation recipe: take the centred square of
    side ``crop_pct * shorter side`` and resize it (bicubic) to ``size``. ``crop_pct = 0.875``
    is TF's ``size / (size + 32)`` for 224. Normalisation is ``(x - mean) / std`` on 0..255
    values, per channel (EfficientNet-Lite: mean 127, std 128).
    """

    size: int = 224
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __call__(self, data: bytes) -> torch.Tensor:
        """Decode and preprocess one image; raises ImageError for bad data."""
        # The crop keeps crop_pct of the shorter side, so the drafted shorter side must be at
        # least size / crop_pct for the crop to be downsampled, never upsampled.
        img = decode_image(
            data,
            max_bytes=self.max_bytes,
            max_pixels=self.max_pixels,
            draft_size=math.ceil(self.size / self.crop_pct),
        )
        return self.to_tensor(img)

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """Crop, resize and normalise an RGB PIL image into a ``[3, size, size]`` tensor."""
        width, height = img.size
        side = max(1.0, self.crop_pct * min(width, height))
        left = (width - side) / 2.0
        top = (height - side) / 2.0
        # resize(box=...) crops and resizes in one pass, with sub-pixel box edges.
        img = img.resize(
            (self.size, self.size),
            Image.Resampling.BICUBIC,
            box=(left, top, left + side, top + side),
        )
        pixels = np.asarray(img, dtype=np.float32)  # [size, size, 3], 0..255
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, size, size]
