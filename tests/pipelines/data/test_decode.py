import io

import numpy as np
import pytest
from PIL import Image

from pipelines.data.decode import DecodeError, decode_image
from tests.pipelines.data.images import bad, gradient, jpeg_bytes, png_bytes, unusual_good


@pytest.mark.parametrize("name", sorted(unusual_good()))
def test_unusual_modes_become_rgb_uint8(name):
    arr = decode_image(unusual_good()[name], name)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3


def test_sixteen_bit_is_scaled_not_clipped():
    arr = decode_image(unusual_good()["sixteen_bit.png"])
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155


def test_transparency_is_composited_on_white():
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    assert (decode_image(png_bytes(im)) == 255).all()


def test_exif_orientation_is_applied():
    im = gradient((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    arr = decode_image(jpeg_bytes(im, exif=exif.tobytes()))
    assert arr.shape == (80, 40, 3)


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
