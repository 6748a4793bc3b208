"""Decode image bytes to RGB uint8 arrays with Pillow, one object at a time, with a reason for every refusal.

L, LA, P (with or without transparency), RGBA, CMYK, I;16 and other 16-bit images all become 8-bit RGB;
transparency is composited on white; EXIF orientation is applied; images above ``max_pixels`` are refused from
their header, before any pixel is decoded (decompression bombs).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Default refusal threshold: 2**28 pixels (a 16k x 16k image).
DEFAULT_MAX_PIXELS = 1 << 28


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
    return im.convert("RGB")


def decode_image(data: bytes, key: str = "<bytes>", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode ``data`` to an ``(H, W, 3)`` uint8 RGB array.

    Raises:
        DecodeError: ``empty``, ``not-an-image``, ``too-large`` (over ``max_pixels``), or ``corrupt``
            (truncated or otherwise undecodable), naming ``key``.
    """
    if not data:
        raise DecodeError(key, "empty", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise DecodeError(key, "too-large", f"{w}x{h} exceeds {max_pixels} pixels")
                im.load()
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
    return np.asarray(rgb, dtype=np.uint8)
