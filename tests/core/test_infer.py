import pytest
import torch

from oftsr.degrade import upsample
from oftsr.flow import conditioned, noisy_start
from oftsr.infer import check_knob, network_time, one_step, sample, tile_count, upscale
from oftsr.nets import build_unet
from tests.helpers import PointwiseNet, perturbed_unet


def noise_for(lr, sf=4, seed=0):
    b, c, h, w = lr.shape
    return torch.randn(b, c, h * sf, w * sf, generator=torch.Generator().manual_seed(seed))


def test_one_step_is_start_plus_velocity():
    net, x_lr = PointwiseNet(), torch.randn(2, 3, 8, 8)
    v = conditioned(net, x_lr)
    x0 = torch.randn(2, 3, 8, 8)
    assert torch.allclose(one_step(v, x0, 0.3, (0.0, 1.0)), x0 + v(x0, torch.full((2,), 0.3)))
    assert torch.allclose(one_step(v, x0, 0.3), x0 + v(x0, torch.full((2,), 0.01 + 0.3 * 0.98)))


@pytest.mark.parametrize(("height", "width"), [(20, 36), (13, 7), (16, 16)])
def test_tiled_and_whole_image_inference_agree_for_a_local_network(height, width):
    net = PointwiseNet()
    lr = torch.rand(2, 3, height, width) * 2 - 1
    noise = noise_for(lr)
    whole = upscale(net, lr, 0.5, sigma_p=0.2, noise=noise)
    tiled = upscale(net, lr, 0.5, sigma_p=0.2, noise=noise, tile=24, overlap=8, tile_batch=3)
    assert whole.shape == (2, 3, 4 * height, 4 * width)
    assert torch.allclose(tiled, whole, atol=1e-5)
    x0 = noisy_start(upsample(lr, 4), 0.2, noise=noise)
    assert torch.allclose(whole, one_step(conditioned(net, upsample(lr, 4)), x0, 0.5), atol=1e-6)


def test_tiles_blend_without_seams_for_the_unet_on_odd_sizes():
    torch.manual_seed(0)
    net = perturbed_unet(0.02)
    lr = torch.rand(1, 3, 19, 23) * 2 - 1
    noise = noise_for(lr)
    a = upscale(net, lr, 0.7, sigma_p=0.2, noise=noise, tile=32, overlap=8, tile_batch=64)
    b = upscale(net, lr, 0.7, sigma_p=0.2, noise=noise, tile=32, overlap=8, tile_batch=1)
    assert a.shape == (1, 3, 76, 92) and torch.isfinite(a).all()
    assert torch.allclose(a, b, atol=1e-5)  # batching tiles does not change the result
    # GroupNorm and attention see the whole tile, so a UNet's tiles are not exact: larger tiles and overlaps
    # come closer to the whole-image result, and a tile covering the image reproduces it.
    whole = upscale(net, lr, 0.7, sigma_p=0.2, noise=noise)
    err_small = (a - whole).square().mean()
    err_large = (upscale(net, lr, 0.7, sigma_p=0.2, noise=noise, tile=64, overlap=32) - whole).square().mean()
    assert err_large < 0.5 * err_small
    assert torch.equal(upscale(net, lr, 0.7, sigma_p=0.2, noise=noise, tile=96), whole)
    assert net.training  # the module's mode is restored


def test_tile_count_covers_the_image():
    assert tile_count(100, 64, 32, 8) == 4 * 3  # starts 0, 24, 48, 68 and 0, 24, 32
    assert tile_count(20, 20, 32, 8) == 1


def test_knob_outside_unit_interval_or_not_finite_is_refused():
    net, lr = PointwiseNet(), torch.zeros(1, 3, 4, 4)
    for bad in (-0.1, 1.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="knob t"):
            upscale(net, lr, bad, sigma_p=0.2)
    for ok in (0.0, 1.0):
        assert check_knob(ok) == ok


def test_bad_tiles_are_refused():
    net = build_unet("tiny")
    with pytest.raises(ValueError, match="multiple of the network"):
        upscale(net, torch.zeros(1, 3, 16, 16), 0.5, sigma_p=0.2, tile=30)
    with pytest.raises(ValueError, match="overlap"):
        upscale(net, torch.zeros(1, 3, 16, 16), 0.5, sigma_p=0.2, tile=32, overlap=32)


def test_teacher_sample_goes_through_the_solver():
    net = PointwiseNet()
    x_lr = torch.rand(2, 3, 8, 8) * 2 - 1
    eps = torch.randn(2, 3, 8, 8)
    sol = sample(net, x_lr, sigma_p=0.2, method="midpoint", steps=16, noise=eps)
    assert sol.nfe == 32 and sol.x.shape == x_lr.shape
    adaptive = sample(net, x_lr, sigma_p=0.2, method="rk45", noise=eps, rtol=1e-5, atol=1e-5)
    assert (sol.x - adaptive.x).abs().max() < 0.01


def test_the_knob_spans_the_trained_range_of_the_network():
    """Knob 0 and 1 are the trained end points (t_min, t_max), linear in between: every knob value is a trained time."""
    seen = []

    def velocity(x, t):
        seen.append(t.clone())
        return torch.zeros_like(x)

    x0 = torch.zeros(2, 3, 8, 8)
    for t in (0.0, 0.5, 1.0):
        one_step(velocity, x0, t)
    one_step(velocity, x0, 1.0, (0.1, 0.8))
    one_step(velocity, x0, torch.tensor([0.0, 1.0]))
    assert [round(float(t[0]), 6) for t in seen[:4]] == [0.01, 0.5, 0.99, 0.8]
    assert torch.allclose(seen[4], torch.tensor([0.01, 0.99]))
    assert network_time(0.5, (0.1, 0.8)) == pytest.approx(0.45) and network_time(0.0, (0.05, 0.95)) == 0.05
    net = perturbed_unet(0.05)
    lr = torch.rand(1, 3, 8, 8) * 2 - 1
    ends = [
        upscale(net, lr, t, sigma_p=0.2, generator=torch.Generator().manual_seed(0), trained=(0.1, 0.8))
        for t in (0.9, 1.0)
    ]
    assert not torch.equal(*ends)  # no flat stretch at the end of the knob
