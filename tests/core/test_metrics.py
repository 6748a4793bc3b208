import math

import pytest
import torch

from oftsr.metrics import LPIPS, STLPIPS, PerceptualWeightsMissing, psnr, ssim


def test_psnr_on_unit_range_rgb():
    x = torch.rand(2, 3, 16, 16) * 1.6 - 0.8
    # an offset of 0.1 in [-1, 1] is 0.05 in [0, 1]: MSE 0.0025, 26.02 dB
    assert torch.allclose(psnr(x + 0.1, x), torch.full((2,), 10 * math.log10(1 / 0.0025)), atol=1e-3)
    assert (psnr(x, x) > 100).all()


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 48, generator=g) * 2 - 1
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = ssim(x, y).item()
    ref = structural_similarity(
        ((x[0] + 1) / 2).permute(1, 2, 0).numpy(),
        ((y[0] + 1) / 2).permute(1, 2, 0).numpy(),
        channel_axis=2,
        data_range=1.0,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
    )
    assert abs(ours - ref) < 0.02
    assert ssim(x, x).item() == pytest.approx(1.0, abs=1e-5)


def test_lpips_names_the_missing_backbone_and_torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(PerceptualWeightsMissing, match=r"alexnet-owt-7be5be79\.pth.*TORCH_HOME=" + str(tmp_path)):
        LPIPS(download=False)


def test_lpips_with_a_random_backbone_only_on_request():
    m = LPIPS(random_backbone=True)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert torch.allclose(m(x, x), torch.zeros(2))
    assert (m(x, x + 0.3 * torch.randn_like(x)) > 0).all()


def test_st_lpips_ships_trained_weights_and_grows_with_distortion():
    m = STLPIPS()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    small = m(x, x + 0.05 * torch.randn(x.shape, generator=g))
    large = m(x, x + 0.4 * torch.randn(x.shape, generator=g))
    assert torch.allclose(m(x, x), torch.zeros(2), atol=1e-6)
    assert (large > small).all() and (small > 0).all()
