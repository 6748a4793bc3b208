"""Held-out evaluation crops: fixed by the seed and the image's path below the source, not by where it is stored."""

import pytest
import torch

from oftsr.method import Method
from pipelines.pipeline import held_out_crops
from pipelines.tree import EvalConfig
from tests.pipelines.data.images import bad, gradient, photos, png_bytes

pytestmark = pytest.mark.timeout(120)


def write(folder, files: dict[str, bytes]) -> str:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return str(folder)


def test_the_same_photos_give_the_same_crops_in_another_folder_and_in_a_bucket(tmp_path, s3_client, monkeypatch):
    files = dict(list(photos().items())[:3])
    here = EvalConfig(source=write(tmp_path / "a" / "heldout", files), method=Method(crop=48), crops_per_image=4)
    monkeypatch.chdir(tmp_path)
    relative = EvalConfig(source="elsewhere/deeper/heldout", method=Method(crop=48), crops_per_image=4)
    write(tmp_path / "elsewhere" / "deeper" / "heldout", files)
    s3_client.create_bucket(Bucket="heldout-crops")
    for name, data in files.items():
        s3_client.put_object(Bucket="heldout-crops", Key=f"eval/{name}", Body=data)
    bucket = EvalConfig(source="s3://heldout-crops/eval", method=Method(crop=48), crops_per_image=4)

    first, skipped = held_out_crops(here)
    assert first.shape == (12, 3, 48, 48) and skipped == []
    assert torch.equal(first, held_out_crops(relative)[0])
    assert torch.equal(first, held_out_crops(bucket)[0])
    assert len({tuple(c.flatten()[:64].tolist()) for c in first}) == 12  # four different crops of each photo
    other_seed = held_out_crops(EvalConfig(source=here.source, method=Method(crop=48), crops_per_image=4, seed=1))[0]
    assert not torch.equal(first, other_seed)


def test_unusable_held_out_images_are_skipped_and_named(tmp_path):
    broken, _ = bad()["truncated.png"]
    source = write(tmp_path, {"good.png": png_bytes(gradient((96, 80))), "broken.png": broken})
    crops, skipped = held_out_crops(EvalConfig(source=source, method=Method(crop=64), crops_per_image=2))
    assert crops.shape == (2, 3, 64, 64)
    assert len(skipped) == 1 and "broken.png" in skipped[0]
    with pytest.raises(ValueError, match="no usable held-out images"):
        held_out_crops(EvalConfig(source=source, method=Method(crop=200)))
