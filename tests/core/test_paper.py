"""The paper's evaluation protocol (:mod:`oftsr.paper`): image lists, the official centre crop, the quadrant split of
large inputs, and the one-step scale."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from oftsr.evaluation import EvalSettings, evaluate
from oftsr.method import Method
from oftsr.paper import IMAGENET_VAL_100, centre_crop, image_names, quadrant_split
from tests.helpers import PointwiseNet


@pytest.mark.parametrize("task", ["ffhq", "ffhq_noisy", "div2k", "imagenet"])
def test_each_task_names_one_hundred_distinct_images(task):
    names = image_names(task)
    assert len(names) == len(set(names)) == 100
    first, last = {
        "ffhq": ("69007.png", "69997.png"),
        "ffhq_noisy": ("69007.png", "69997.png"),
        "div2k": ("0801.png", "0900.png"),
        "imagenet": ("ILSVRC2012_val_00000001.jpg", "ILSVRC2012_val_00004159.jpg"),
    }[task]
    assert (names[0], names[-1]) == (first, last)
    assert list(IMAGENET_VAL_100) == sorted(set(IMAGENET_VAL_100))
    with pytest.raises(ValueError, match="unknown paper task"):
        image_names("celeba")


def test_the_centre_crop_is_the_official_one_and_refuses_small_images():
    img = torch.arange(301 * 400).view(1, 301, 400)
    crop = centre_crop(img, 256)
    assert crop.shape == (1, 256, 256)
    assert crop[0, 0, 0] == 22 * 400 + 72  # rows (301 - 256) // 2 = 22 on, columns (400 - 256) // 2 = 72 on
    with pytest.raises(ValueError, match="smaller than the 256x256 crop"):
        centre_crop(img[:, :200], 256)


@pytest.mark.parametrize("size", [(256, 256), (512, 512), (300, 520), (1100, 1030)])
def test_the_quadrant_split_pastes_each_quarter_from_its_corner_tile(size):
    h, w = size
    coords = (torch.arange(h).view(h, 1) * 10_000 + torch.arange(w).view(1, w)).float().view(1, 1, h, w)
    sizes = []

    def restore(x0, cond):  # position-exact: each output pixel is its input pixel plus the tile's width
        sizes.append(tuple(x0.shape[-2:]))
        return x0 + cond * x0.shape[-1]

    out = quadrant_split(restore, coords, torch.ones_like(coords))
    if h * w <= 256**2:
        assert sizes == [(h, w)]
        assert torch.equal(out, coords + w)
        return
    tile_w = (w // 2 // 32 + 1) * 32
    if h * w <= 4 * 256**2:
        assert sizes == [((h // 2 // 32 + 1) * 32, tile_w)] * 4
        assert torch.equal(out - coords, torch.full_like(coords, tile_w))  # every pixel from a tile, in place
    else:  # split again while a tile's parent is over four times 256^2 (here twice: 64 tiles), every pixel in place
        assert len(sizes) == 64 and all(a * b <= 256**2 for a, b in sizes)
        assert torch.equal(out - coords, torch.full_like(coords, sizes[0][1]))


def test_the_paper_settings_scale_the_step_keep_pointwise_results_when_split_and_measure_unclamped():
    torch.manual_seed(0)
    hr = torch.rand(1, 3, 320, 320) * 2 - 1  # above 256^2: four tiles of 192^2
    student = PointwiseNet(seed=3)
    base = EvalSettings(method=Method(crop=320, sigma_p=0.2), knobs=(0.0, 1.0), batch=1, seed=42)
    whole = evaluate(hr, base, student=student)
    split = evaluate(hr, dataclasses.replace(base, split_above=256), student=student)
    rows = lambda r: {(x["method"], x["t"]): x for x in r["rows"]}  # noqa: E731
    for key, row in rows(whole).items():  # a per-pixel network gives the same output split or whole
        assert rows(split)[key]["psnr"] == pytest.approx(row["psnr"], abs=1e-4)
    scaled = rows(evaluate(hr, dataclasses.replace(base, one_step_scale=0.999), student=student))
    assert scaled[("student", 1.0)]["psnr"] != pytest.approx(rows(whole)[("student", 1.0)]["psnr"], abs=1e-6)
    unclamped = rows(evaluate(hr, dataclasses.replace(base, clamp=False), student=student))
    assert unclamped[("student", 1.0)]["psnr"] < rows(whole)[("student", 1.0)]["psnr"]  # overshoot counts
