"""Decode image bytes to RGB uint8 arrays with Pillow, one object at a time, with a reason for every refusal.

L, LA, P (with or without transparency), RGBA, CMYK, I;16 and other 16-bit images all become 8-bit RGB;
transparency is composited on white; EXIF orientation is applied; images above ``max_pixels`` are refused from
their header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default refusal threshold: 2**28 pixels (a 16k x 16k image).
DEFAULT_MAX_PIXELS = 1 << 28
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

try:  # libspng decodes 8-bit RGB PNGs about 1.5x faster than Pillow; optional
    import pyspng
except ImportError:  # pragma: no cover - the dependency is declared
    pyspng = None


class DecodeError(ValueError):
    """An object that is not a usable image; ``reason`` is a short machine-friendly word."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        self.key, self.reason, self.detail = key, reason, detail
        super().__init__(f"{key}: {reason}" + (f" ({detail})" if detail else ""))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, im).convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _fast_png(data: bytes, key: str, max_pixels: int) -> np.ndarray | None:
    """Plain 8-bit RGB PNGs (no transparency, no EXIF) through libspng; ``None`` sends the object to Pillow."""
    if pyspng is None or len(data) < 33 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR":
        return None
    width, height, bit_depth, color_type = struct.unpack(">IIBB", data[16:26])
    if width * height > max_pixels:
        raise DecodeError(key, "too-large", f"{width}x{height} exceeds {max_pixels} pixels")
    if bit_depth != 8 or color_type != 2 or b"tRNS" in data or b"eXIf" in data:
        return None
    try:
        arr = pyspng.load(data)
    except Exception:  # truncated or corrupt: Pillow classifies it
        return None
    return arr if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 else None


def decode_image(data: bytes, key: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to an ``(H, W, 3)`` uint8 RGB array (read-only; copy what you keep).

    Raises:
        DecodeError: ``empty``, ``not-an-image``, ``too-large`` (over ``max_pixels``), or ``corrupt``
            (truncated or otherwise undecodable), naming ``key``.
    """
    if not data:
        raise DecodeError(key, "empty", "zero bytes")
    fast = _fast_png(data, key, max_pixels)
    if fast is not None:
        return fast
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DecodeError(key, "too-large", f"{w}x{h} exceeds {max_pixels} pixels")
                im.load()
                if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation other than "normal"
                    im = ImageOps.exif_transpose(im)
                rgb = _to_rgb(im)
    except DecodeError:
        raise
    except UnidentifiedImageError as err:
        raise DecodeError(key, "not-an-image", str(err)) from err
    except Image.DecompressionBombError as err:
        raise DecodeError(key, "too-large", str(err)) from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise DecodeError(key, "corrupt", f"{type(err).__name__}: {err}") from err
    return np.asarray(rgb, dtype=np.uint8)  # read-only view: callers copy only the crops they keep
