"""Test images: the sample photos plus every kind of bad or unusual object the data plane must handle."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from oftsr.samples import available_photos


def png_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", **kw)
    return buf.getvalue()


def gradient(size=(96, 80)) -> Image.Image:
    w, h = size
    x = np.linspace(0, 255, w)[None, :].repeat(h, 0)
    y = np.linspace(0, 255, h)[:, None].repeat(w, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], -1).astype(np.uint8))


def unusual_good() -> dict[str, bytes]:
    """Objects that must decode to RGB (named by what they are)."""
    arr16 = (np.linspace(0, 65535, 96 * 96).reshape(96, 96)).astype(np.uint16)
    palette = gradient().convert("P")
    return {
        "sixteen_bit.png": png_bytes(Image.fromarray(arr16)),
        "cmyk.jpg": jpeg_bytes(gradient().convert("CMYK")),
        "palette_transparent.png": png_bytes(palette, transparency=0),
        "grey.png": png_bytes(gradient().convert("L")),
        "grey_alpha.png": png_bytes(gradient().convert("LA")),
        "rgba.png": png_bytes(gradient().convert("RGBA")),
    }


def bad() -> dict[str, tuple[bytes, str]]:
    """Objects that must be skipped, with the reason expected."""
    full = png_bytes(gradient())
    return {
        "truncated.png": (full[: len(full) // 2], "corrupt"),
        "zero.png": (b"", "empty"),
        "text.jpg": (b"this is not a jpeg, just text\n" * 10, "not-an-image"),
        "tiny.png": (png_bytes(Image.new("RGB", (1, 1), (10, 20, 30))), "too-small"),
    }


def photos() -> dict[str, bytes]:
    out = {}
    for photo, path in available_photos():
        with Image.open(path) as im:
            out[f"photos/{photo.name}.png"] = png_bytes(im.convert("RGB"))
    return out
