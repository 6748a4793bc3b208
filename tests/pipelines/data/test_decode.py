import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.decode import DecodeError, decode_image
from tests.pipelines.data.images import bad, gradient, jpeg_bytes, png_bytes, unusual_good


def expected_rgb(name: str) -> tuple[np.ndarray, float]:
    """What each unusual object shows, in RGB, and how far (mean grey levels) its decoding may be from it."""
    g = np.asarray(gradient(), np.float64)
    grey = np.asarray(gradient().convert("L"), np.float64)[..., None].repeat(3, -1)
    if name == "palette_transparent.png":  # palette entry 0 is transparent: those pixels on white
        pal = gradient().convert("P")
        shown = np.asarray(pal.convert("RGB"), np.float64)
        shown[np.asarray(pal) == 0] = 255
        return shown, 0.0
    if name == "sixteen_bit.png":
        v = np.linspace(0, 65535, 96 * 96).reshape(96, 96).astype(np.uint16) / 257.0
        return v[..., None].repeat(3, -1), 0.5
    return {"cmyk.jpg": (g, 2.0), "grey.png": (grey, 0.0), "grey_alpha.png": (grey, 0.0), "rgba.png": (g, 0.0)}[name]


@pytest.mark.parametrize("name", sorted(unusual_good()))
def test_unusual_modes_become_the_rgb_uint8_they_show(name):
    arr = decode_image(unusual_good()[name], name)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    want, tolerance = expected_rgb(name)
    diff = np.abs(arr.astype(np.float64) - want)
    assert diff.mean() <= tolerance + 1e-9 and diff.max() <= max(1.0, 8 * tolerance), (name, diff.mean(), diff.max())


def test_sixteen_bit_is_scaled_not_clipped():
    arr = decode_image(unusual_good()["sixteen_bit.png"])
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (decode_image(png_bytes(im)) == 255).all()


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(orientation):
    """The pixels as displayed: the stored image rotated by 180, 90 clockwise or 90 counter-clockwise."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg_bytes(gradient((80, 40)), exif=exif.tobytes())
    stored = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))  # Pillow does not rotate by itself
    shown = np.rot90(stored, {3: 2, 6: -1, 8: 1}[orientation])
    np.testing.assert_array_equal(decode_image(data), shown)


@pytest.mark.parametrize("name", sorted(bad()))
def test_bad_objects_raise_with_key_and_reason(name):
    data, reason = bad()[name]
    if reason == "too-small":  # decodes fine; the crop refuses it
        assert decode_image(data, name).shape == (1, 1, 3)
        return
    with pytest.raises(DecodeError) as info:
        decode_image(data, f"s3://bucket/{name}")
    assert info.value.reason == reason and f"s3://bucket/{name}" in str(info.value)


def test_decompression_bombs_are_refused_from_the_header():
    data = png_bytes(Image.new("RGB", (300, 300)))
    with pytest.raises(DecodeError, match=r"too-large.*300x300"):
        decode_image(data, "bomb.png", max_pixels=200 * 200)
    assert decode_image(data, max_pixels=300 * 300).shape == (300, 300, 3)


def test_real_photo_bytes_round_trip():
    buf = io.BytesIO()
    gradient().save(buf, format="PNG")
    assert np.array_equal(decode_image(buf.getvalue()), np.asarray(gradient()))


def test_fast_png_path_equals_pillow_and_still_classifies_errors(monkeypatch):
    import pipelines.data.decode as decode

    data = png_bytes(gradient((97, 61)))
    fast = decode_image(data)
    monkeypatch.setattr(decode, "pyspng", None)
    assert np.array_equal(fast, decode_image(data))
    monkeypatch.undo()
    assert decode._fast_png(data, "k", 1 << 20) is not None
    with pytest.raises(DecodeError, match="too-large"):
        decode_image(data, max_pixels=100)
    with pytest.raises(DecodeError, match="corrupt"):
        decode_image(data[: len(data) // 2])
