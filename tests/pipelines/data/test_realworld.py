"""The realesrgan degradation in the data plane: in the CPU transforms (the default) and in the training worker
(``data.degrade_on=worker``), the same pixels either way; its settings' refusals; a Ray Data stream of it."""

import dataclasses

import numpy as np
import pytest
import torch

from oftsr.augment import CropBox, apply_box
from oftsr.conventions import uint8_to_image
from oftsr.realesrgan import RealESRGANSettings, StageSettings, realesrgan
from pipelines.data.config import DataConfig
from pipelines.data.decode import decode_image
from pipelines.data.loader import CropCollate
from pipelines.data.transforms import EvalTransform, TrainTransform, degrade_on_worker
from tests.pipelines.data.images import photos

pytestmark = pytest.mark.timeout(300)
PAD = RealESRGANSettings(gt_size=64, crop_pad_size=76)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("realworld")
    for name, data in photos().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def cfg(folder, **kw):
    return DataConfig(source=str(folder), crop=64, degradation="realesrgan", **kw)


def keys(folder, names):
    return {"key": np.array([str(folder / n) for n in names], dtype=object)}


def _region(folder, key, box) -> torch.Tensor:
    top, left, h, w, hf, vf = box
    img = torch.from_numpy(np.array(decode_image((folder / key).read_bytes()))).permute(2, 0, 1)
    return uint8_to_image(apply_box(img, CropBox(top, left, h, bool(hf), bool(vf), size_w=w)))[None]


def test_the_cpu_tasks_degrade_each_crop_with_its_own_seed_as_the_core_does(folder):
    t = TrainTransform(cfg(folder, keep_lr=True, seed=3, crops_per_image=2, realesrgan=PAD))
    names = ["photos/astronaut.png", "photos/coffee.png"]
    out = t(keys(folder, names))
    assert (
        out["hr"].shape == (4, 3, 64, 64) and out["x_lr"].shape == (4, 3, 64, 64) and out["lr"].shape == (4, 3, 16, 16)
    )
    assert (out["box"][:, 2] == 76).all()  # the region cut from the photo is crop_pad_size; the chain crops 64
    seeds = t._seeds([str(folder / n) for n in names for _ in range(2)])
    assert len(set(seeds)) == 4  # two crops of one photo get two histories
    for i in range(4):
        ref = realesrgan(_region(folder, out["key"][i], out["box"][i].tolist()), [seeds[i]], 4, PAD)
        assert np.array_equal(out["hr"][i], ref.hr[0].numpy())
        assert np.array_equal(out["lr"][i], ref.lr[0].numpy()) and np.array_equal(out["x_lr"][i], ref.x_lr[0].numpy())
    again = TrainTransform(cfg(folder, keep_lr=True, seed=3, crops_per_image=2, realesrgan=PAD))(keys(folder, names))
    assert np.array_equal(again["lr"], out["lr"])  # seeded: the same crops and the same histories


def test_the_worker_path_gives_the_same_pixels_from_the_region_and_its_seed(folder):
    names = ["photos/astronaut.png", "photos/rocket.png", "photos/chelsea.png"]
    on_data = TrainTransform(cfg(folder, keep_lr=True, seed=9, realesrgan=PAD))(keys(folder, names))
    worker_cfg = cfg(folder, keep_lr=True, seed=9, realesrgan=PAD, degrade_on="worker")
    sent = TrainTransform(worker_cfg)(keys(folder, names))
    assert set(sent) == {"key", "box", "hr", "seed"} and sent["hr"].shape == (3, 3, 76, 76)
    assert sent["seed"].dtype == np.int64
    batch = CropCollate()(sent)  # what iter_crops hands the training loop
    batch["hr"] = batch["hr"].float()
    got = degrade_on_worker(worker_cfg, batch)
    for name in ("hr", "x_lr", "lr"):
        assert torch.equal(got[name], torch.from_numpy(on_data[name])), name


def test_evaluation_crops_are_the_reference_and_degrade_the_same_every_time(folder):
    c = cfg(folder, seed=0, realesrgan=dataclasses.replace(PAD, use_sharp=True))
    a = EvalTransform(c)(keys(folder, ["photos/astronaut.png", "photos/coffee.png"]))
    b = EvalTransform(c)(keys(folder, ["photos/coffee.png"]))
    assert np.array_equal(a["x_lr"][1], b["x_lr"][0])  # each key's own seed, whatever the batch
    # neither sharpened nor cropped again: the HR crop is the photo's centre crop
    h, w = decode_image((folder / "photos/coffee.png").read_bytes()).shape[:2]
    box = [(h - 64) // 2, (w - 64) // 2, 64, 64, 0, 0]
    assert np.array_equal(b["hr"][0], _region(folder, "photos/coffee.png", box)[0].numpy())


def test_bad_settings_are_refused_naming_the_field(folder):
    with pytest.raises(ValueError, match="degrade_on=worker is for the realesrgan"):
        DataConfig(source=str(folder), crop=64, degrade_on="worker")
    with pytest.raises(ValueError, match=r"data\.realesrgan\.gt_size \(128\) must be the training crop"):
        cfg(folder, realesrgan=RealESRGANSettings(gt_size=128))
    with pytest.raises(ValueError, match=r"realesrgan\.first\.kernel_prob"):
        cfg(folder, realesrgan=RealESRGANSettings(first=StageSettings(kernel_prob=(1, 1, 0, 0, 0, 0))))
    from oftsr.method import Method

    with pytest.raises(ValueError, match="sigma_y must be 0 with the realesrgan"):
        Method(degradation="realesrgan", sigma_y=0.05)


def test_recipe_overrides_reach_the_chain_and_bad_ones_name_the_key():
    from pipelines.overrides import apply_overrides
    from pipelines.recipes import pipeline

    tree = pipeline("realworld_quickstart")
    changed = apply_overrides(tree, {"data.realesrgan.second_order_prob": "1", "data.degrade_on": "worker"})
    for stage in ("teacher", "trajectories", "distill"):
        assert changed.stage(stage).data.realesrgan.second_order_prob == 1.0
    assert changed.teacher.data.degrade_on == "worker" and changed.evaluate.realesrgan.second_order_prob == 1.0
    for key, value, field in [
        ("data.realesrgan.first.kernel_size", "[8, 21]", "first.kernel_size"),
        ("data.realesrgan.second.resize_prob", "[0.5, 0.4, 0.3]", "second.resize_prob"),
        ("data.realesrgan.first.noise_range", "[30, 1]", "first.noise_range"),
    ]:
        with pytest.raises(ValueError, match=field.replace(".", r"\.")):
            apply_overrides(tree, {key: value})


def test_a_ray_data_stream_of_realworld_crops(folder, ray_cluster):
    from pipelines.data.dataset import training_dataset

    c = cfg(folder, seed=1, crops_per_image=2, realesrgan=PAD, batch_size=2, num_cpus=0.25)
    ds, ledger = training_dataset(c)
    rows = ds.take_all()
    assert len(rows) == 2 * len(photos())
    assert all(r["x_lr"].shape == (3, 64, 64) and r["hr"].shape == (3, 64, 64) for r in rows)
    t = TrainTransform(c)
    for r in rows[:3]:  # each row is its region degraded with the seed of its key and crop index (0 or 1)
        region = _region(folder, r["key"], r["box"].tolist())
        refs = [realesrgan(region, [t._degradation_seed(r["key"], i)], 4, PAD).x_lr[0].numpy() for i in (0, 1)]
        assert any(np.array_equal(r["x_lr"], ref) for ref in refs)
    assert ledger.summary()["skipped"] == 0
