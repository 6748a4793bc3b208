import numpy as np
import pytest
import torch

from oftsr.augment import CropBox, apply_box
from oftsr.conventions import uint8_to_image
from oftsr.degrade import degrade
from pipelines.data.config import DataConfig
from pipelines.data.decode import decode_image
from pipelines.data.transforms import EvalTransform, LocalLedger, TooManyBadImages, TrainTransform
from tests.pipelines.data.images import bad, photos, unusual_good


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    for name, data in {**photos(), **unusual_good(), **{k: v for k, (v, _) in bad().items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def cfg(folder, **kw):
    return DataConfig(source=str(folder), crop=64, **kw)


def keys(folder, names):
    return {"key": np.array([str(folder / n) for n in names], dtype=object)}


def test_degraded_batch_equals_core_degrade_of_the_same_crop(folder):
    t = TrainTransform(cfg(folder, keep_lr=True, seed=1, crops_per_image=2, p_vflip=0.5))
    out = t(keys(folder, ["photos/astronaut.png", "photos/coffee.png"]))
    assert (
        out["hr"].shape == (4, 3, 64, 64) and out["x_lr"].shape == (4, 3, 64, 64) and out["lr"].shape == (4, 3, 16, 16)
    )
    for i in range(4):
        top, left, h, w, hf, vf = out["box"][i].tolist()
        img = torch.from_numpy(np.array(decode_image((folder / out["key"][i]).read_bytes()))).permute(2, 0, 1)
        hr = uint8_to_image(apply_box(img, CropBox(top, left, h, bool(hf), bool(vf), size_w=w)))[None]
        lr, x_lr = degrade(hr, 4)
        assert np.array_equal(out["hr"][i], hr[0].numpy())
        assert np.allclose(out["x_lr"][i], x_lr[0].numpy(), atol=1e-6)
        assert np.allclose(out["lr"][i], lr[0].numpy(), atol=1e-6)
    assert out["hr"].min() >= -1 and out["hr"].max() <= 1


def test_seeded_crops_repeat_and_unseeded_crops_vary(folder):
    batch = keys(folder, ["photos/rocket.png"] * 4)
    a = TrainTransform(cfg(folder, seed=5))(batch)["box"]
    b = TrainTransform(cfg(folder, seed=5))(batch)["box"]
    assert np.array_equal(a, b)
    c = TrainTransform(cfg(folder))(keys(folder, ["photos/rocket.png"] * 8))["box"]
    assert len({tuple(r) for r in c.tolist()}) > 1


def test_bad_and_small_objects_are_skipped_and_counted_with_reasons(folder):
    ledger = LocalLedger()
    names = ["photos/chelsea.png", *bad(), *unusual_good()]
    out = TrainTransform(cfg(folder), ledger)(keys(folder, names))
    assert len(out["key"]) == 1 + len(unusual_good())
    assert ledger.seen == len(names)
    assert sorted(ledger.skipped) == sorted((str(folder / n), r) for n, (_, r) in bad().items())
    assert ledger.summary()["reasons"] == {"corrupt": 1, "empty": 1, "not-an-image": 1, "too-small": 1}


def test_missing_objects_are_skipped_as_missing(folder):
    ledger = LocalLedger()
    TrainTransform(cfg(folder), ledger)(keys(folder, ["nope.png"]))
    assert ledger.skipped == [(str(folder / "nope.png"), "missing")]


def test_too_many_bad_objects_stop_with_a_clear_error(folder):
    t = TrainTransform(cfg(folder, max_bad_fraction=0.2, min_seen_for_fraction=4))
    with pytest.raises(TooManyBadImages, match=r"4 of 5 objects unusable.*max_bad_fraction 20\.0%"):
        t(keys(folder, ["photos/chelsea.png", *bad()]))


def test_an_empty_batch_keeps_its_columns_and_dtype(folder):
    out = TrainTransform(cfg(folder, dtype="float16"))(keys(folder, ["zero.png"]))
    assert out["hr"].shape == (0, 3, 64, 64) and out["hr"].dtype == np.float16 and out["box"].shape == (0, 6)


def test_eval_transform_is_deterministic_centre_crop_or_full_image(folder):
    c = cfg(folder, sigma_y=0.05, keep_lr=True)
    names = ["photos/chelsea.png", "photos/coffee.png"]
    a, b = EvalTransform(c)(keys(folder, names)), EvalTransform(c)(keys(folder, names))
    assert np.array_equal(a["lr"], b["lr"]) and np.array_equal(a["box"][:, 4:], np.zeros((2, 2)))
    assert a["box"][0].tolist()[:4] == [(300 - 64) // 2, (451 - 64) // 2, 64, 64]
    full = EvalTransform(c, full=True)(keys(folder, names))
    assert full["hr"][0].shape == (3, 300, 448) and full["hr"][1].shape == (3, 400, 600)
    assert full["x_lr"][1].shape == (3, 400, 600) and full["lr"][0].shape == (3, 75, 112)


def test_config_validation_names_the_field(folder):
    with pytest.raises(ValueError, match=r"DataConfig\.crop"):
        DataConfig(source=str(folder), crop=30)
    with pytest.raises(ValueError, match="exactly one of"):
        DataConfig()
    with pytest.raises(ValueError, match=r"DataConfig\.degradation"):
        DataConfig(source="x", degradation="blur")
    with pytest.raises(ValueError, match=r"DataConfig\.concurrency"):
        DataConfig(source="x", concurrency=0)
