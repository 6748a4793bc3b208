"""Evaluation: FID joins the table when the Inception weights are on the machine, and only then."""

import itertools

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


def _rows(report):
    return {(r["method"], r["t"]): r for r in report["rows"]}


def test_shards_at_batch_boundaries_give_exactly_the_one_pass_report(crops, net, tmp_path, monkeypatch):
    import dataclasses
    import random

    from oftsr.evaluation import combine, evaluate_shard, shard_bounds

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    settings = dataclasses.replace(SETTINGS, method=Method(sigma_p=0.2, sigma_y=0.05), batch=2)  # noise in the LR too
    whole = evaluate(crops, settings, student=net, teacher=net, progress=False)
    bounds = shard_bounds(crops.shape[0], settings.batch, 3)
    assert bounds == [(0, 2), (2, 4), (4, 6)]
    parts = [evaluate_shard(crops[a:b], settings, student=net, teacher=net, offset=a) for a, b in bounds]
    random.Random(0).shuffle(parts)  # in any order, as Ray returns them
    merged = combine(parts, settings)
    assert merged["n"] == whole["n"] and _rows(merged).keys() == _rows(whole).keys()
    for key, row in _rows(whole).items():
        assert _rows(merged)[key] == row  # every mean and every per-crop value, exactly

    with pytest.raises(ValueError, match="do not tile the crops: one starts at 4, expected 2"):
        combine([p for p in parts if p["offset"] != 2], settings)
    with pytest.raises(ValueError, match="offset 1 is not a multiple of the evaluation batch"):
        evaluate_shard(crops[1:3], settings, student=net, offset=1)
    with pytest.raises(ValueError, match="different perceptual networks"):
        combine([{**parts[0], "perceptual": "lpips"}, *parts[1:]], settings)


def test_shard_bounds_cover_every_crop_once_at_batch_multiples():
    from oftsr.evaluation import shard_bounds

    for n in (1, 5, 16, 17, 100):
        for batch in (1, 4, 16):
            for shards in (1, 2, 3, 8, 64):
                bounds = shard_bounds(n, batch, shards)
                assert bounds[0][0] == 0 and bounds[-1][1] == n and len(bounds) <= shards
                assert all(a % batch == 0 and a < b for a, b in bounds)
                assert all(b == c for (_, b), (c, _) in itertools.pairwise(bounds))


def test_the_pipeline_evaluation_runs_in_ray_tasks_and_matches_one_pass(crops, net, ray_cluster, tmp_path, monkeypatch):
    """The driver only orchestrates: shards run as Ray tasks (here on the local cluster's CPUs) and the merged report
    is the in-process one (to float rounding: the tasks' thread count differs)."""
    import dataclasses

    from pipelines.evaluation import evaluate_distributed, strip_outputs

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    settings = dataclasses.replace(SETTINGS, batch=2)
    lines = []
    report = evaluate_distributed(
        crops, settings, student=net, teacher=net, shards=2, use_gpu=False, cpus_per_shard=0.5, strip=2,
        log=lines.append,
    )  # fmt: skip
    whole = evaluate(crops, settings, student=net, teacher=net, progress=False)
    for key, row in _rows(whole).items():
        got = _rows(report)[key]
        for metric in ("psnr", "ssim", "st_lpips"):
            assert got[metric] == pytest.approx(row[metric], rel=1e-4, abs=1e-5), (key, metric)
    assert [(s["start"], s["stop"]) for s in report["shards"]] == [(0, 4), (4, 6)]
    assert all(s["node_id"] and s["ip"] for s in report["shards"])
    assert len(lines) == 2 and all(line.startswith("evaluate: shard ") for line in lines)
    expected = strip_outputs(net, crops[:2], settings.method)
    assert set(report["strip"]) == {"lr", "t0", "t1"}
    for k, v in expected.items():
        assert torch.allclose(report["strip"][k], v, atol=1e-4)
