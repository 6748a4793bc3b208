"""Evaluation: FID joins the table when the Inception weights are on the machine, and only then."""

import pytest
import torch

from oftsr.degrade import degrade
from oftsr.evaluation import EvalSettings, evaluate, markdown_table
from oftsr.fid import InceptionFeatures, fid_from_features, inception_network, weights_path
from oftsr.method import Method
from oftsr.samples import export_sample_split
from pipelines.pipeline import held_out_crops
from pipelines.tree import EvalConfig
from tests.helpers import perturbed_unet

pytestmark = pytest.mark.timeout(300)
SETTINGS = EvalSettings(method=Method(sigma_p=0.2), knobs=(0.0, 1.0), teacher_method="euler", teacher_steps=2, batch=3)


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    _, heldout = export_sample_split(tmp_path_factory.mktemp("photos"))
    return held_out_crops(EvalConfig(source=str(heldout), method=Method(crop=64), crops_per_image=3))[0]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return perturbed_unet(0.01)


def test_fid_of_every_method_against_the_hr_crops_when_the_weights_are_cached(crops, net, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights_path().parent.mkdir(parents=True)
    torch.manual_seed(1)
    torch.save(inception_network().state_dict(), weights_path())  # random values in the published layout

    report = evaluate(crops, SETTINGS, student=net, teacher=net, progress=False)

    assert report["n"] == 6
    fids = {(r["method"], r["t"]): r["fid"] for r in report["rows"]}
    assert set(fids) == {("bicubic", None), ("teacher", None), ("student", 0.0), ("student", 1.0)}
    assert all(v > 0 for v in fids.values()) and len(set(fids.values())) == 4
    with torch.no_grad():  # bicubic has no noise: recompute its FID from the features directly
        features = InceptionFeatures()
        bicubic = features(degrade(crops, SETTINGS.method.sf, "bicubic")[1].clamp(-1, 1))
        expected = fid_from_features(bicubic, features(crops))
    assert fids[("bicubic", None)] == pytest.approx(expected, rel=1e-4)
    assert "| FID |" in markdown_table(report)


def test_no_fid_without_the_weights(crops, net, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    report = evaluate(crops[:2], SETTINGS, student=net, progress=False)
    assert all("fid" not in r for r in report["rows"])
    assert "FID" not in markdown_table(report)


def test_curve_labels_one_group_of_touching_points():
    from oftsr.evaluation import _touching

    rows = [
        {"method": "student", "t": 0.0, "st_lpips": 0.20, "psnr": 30.0},
        {"method": "student", "t": 0.1, "st_lpips": 0.1201, "psnr": 28.01},
        {"method": "student", "t": 0.2, "st_lpips": 0.1200, "psnr": 28.0},
        {"method": "student", "t": 0.3, "st_lpips": 0.1202, "psnr": 27.99},
        {"method": "student", "t": 0.4, "st_lpips": 0.10, "psnr": 25.0},
        {"method": "bicubic", "t": None, "st_lpips": 0.30, "psnr": 31.0},
    ]
    groups = _touching(rows[:5], "st_lpips", rows)
    assert [[r["t"] for r in g] for g in groups] == [[0.0], [0.1, 0.2, 0.3], [0.4]]
