import pytest
import torch
import torch.nn.functional as F

from oftsr.degrade import degrade, downsample, upsample


def test_bicubic_shapes_and_equality_with_antialiased_interpolate():
    x1 = torch.rand(2, 3, 32, 48) * 2 - 1
    lr, x_lr = degrade(x1, 4, "bicubic")
    assert lr.shape == (2, 3, 8, 12) and x_lr.shape == x1.shape
    ref_lr = F.interpolate(x1, scale_factor=0.25, mode="bicubic", antialias=True)
    assert torch.equal(lr, ref_lr)
    assert torch.equal(x_lr, F.interpolate(ref_lr, scale_factor=4, mode="bicubic", antialias=True))


def test_avgpool_averages_boxes_and_replicates_pixels():
    x1 = torch.rand(1, 3, 8, 8) * 2 - 1
    lr, x_lr = degrade(x1, 4, "avgpool")
    manual = x1.view(1, 3, 2, 4, 2, 4).mean(dim=(3, 5))
    assert torch.allclose(lr, manual, atol=1e-6)
    assert torch.equal(x_lr, lr.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3))


def test_noise_is_added_in_lr_space_with_the_requested_std():
    x1 = torch.zeros(8, 3, 128, 128)
    g = torch.Generator().manual_seed(0)
    lr, x_lr = degrade(x1, 4, "avgpool", sigma_y=0.05, generator=g)
    assert abs(lr.std().item() - 0.05) < 0.002 and abs(lr.mean().item()) < 0.002
    assert torch.equal(x_lr, upsample(lr, 4, "avgpool"))


def test_noise_is_reproducible_with_a_generator():
    x1 = torch.rand(1, 3, 16, 16)
    a = degrade(x1, sigma_y=0.1, generator=torch.Generator().manual_seed(3))[0]
    b = degrade(x1, sigma_y=0.1, generator=torch.Generator().manual_seed(3))[0]
    assert torch.equal(a, b)


def test_sizes_not_divisible_by_the_scale_are_refused_naming_them():
    with pytest.raises(ValueError, match=r"30x32.*divisible by the scale factor 4"):
        downsample(torch.zeros(1, 3, 30, 32), 4)


def test_unknown_kind_and_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="unknown degradation kind"):
        degrade(torch.zeros(1, 3, 8, 8), kind="gaussian")
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        degrade(torch.zeros(3, 8, 8))
