from PIL import Image

from oftsr.samples import SAMPLE_PHOTOS, export_sample_photos


def test_sample_photos_export_as_rgb_pngs_with_licences(tmp_path):
    paths = export_sample_photos(tmp_path)
    assert len(paths) == len(SAMPLE_PHOTOS)
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and min(im.size) >= 256
    licences = (tmp_path / "LICENSES.md").read_text()
    assert all(f"{p.name}.png" in licences for p in SAMPLE_PHOTOS)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    export_sample_photos(tmp_path)  # idempotent: existing files are kept
    assert mtimes == [p.stat().st_mtime_ns for p in paths]
