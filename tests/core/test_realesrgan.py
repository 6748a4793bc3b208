"""The Real-ESRGAN second-order degradation: each operator alone, the settings' refusals, and the whole chain's
reproducibility from the seed (in other batches and in another process)."""

import dataclasses
import io
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from oftsr.degrade import degrade
from oftsr.realesrgan import (
    KERNEL_TYPES,
    MAX_KERNEL,
    OFTSR_REALSR,
    RealESRGANSettings,
    StageSettings,
    draw,
    filter2d,
    gaussian_noise,
    jpeg,
    kernel_from,
    mixed_kernel,
    poisson_noise,
    realesrgan,
    sinc_kernel,
    usm_sharpen,
)
from oftsr.samples import available_photos


def _photo(size: int = 256) -> torch.Tensor:
    """A real photo's centre crop, ``(1, 3, size, size)`` in [0, 1]."""
    _, path = available_photos()[0]
    img = np.asarray(Image.open(path).convert("RGB"))
    h, w = img.shape[:2]
    top, left = (h - size) // 2, (w - size) // 2
    crop = img[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None].float() / 255


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(10 * torch.log10(1 / F.mse_loss(a, b)))


def _moments(k: torch.Tensor) -> torch.Tensor:
    n = k.shape[-1]
    r = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    k = k.double()
    return torch.tensor(
        [[(k * xx * xx).sum(), (k * xx * yy).sum()], [(k * xx * yy).sum(), (k * yy * yy).sum()]], dtype=torch.float64
    )


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES)
@pytest.mark.parametrize("size", [7, 13, 21])
def test_every_kernel_sums_to_one_and_has_the_requested_size(kind, size):
    k = mixed_kernel(kind, size, 2.0, 1.0, 0.4, beta=1.5)
    assert k.shape == (size, size)
    assert abs(float(k.sum()) - 1) < 1e-5 and float(k.min()) >= 0
    s = sinc_kernel(size, math.pi / 2)
    assert s.shape == (size, size) and abs(float(s.sum()) - 1) < 1e-5


def test_anisotropic_kernels_point_along_theta():
    """A wide Gaussian along theta: its second moments are R diag(sx^2, sy^2) R^T (within the truncation)."""
    for theta in (0.0, math.pi / 4, math.pi / 2, -math.pi / 3):
        k = mixed_kernel("aniso", 21, 2.5, 0.8, theta)
        m = _moments(k)
        c, s = math.cos(theta), math.sin(theta)
        expected = (
            torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
            @ torch.diag(torch.tensor([2.5**2, 0.8**2], dtype=torch.float64))
            @ torch.tensor([[c, s], [-s, c]], dtype=torch.float64)
        )
        assert torch.allclose(m, expected, atol=0.05), (theta, m, expected)
        direction = torch.linalg.eigh(m).eigenvectors[:, -1]  # the major axis
        assert abs(abs(float(direction[0] * c + direction[1] * s)) - 1) < 1e-3
    # the isotropic kernel has no direction; beta = 1 makes the generalized Gaussian a Gaussian
    iso = _moments(mixed_kernel("iso", 21, 2.0, 2.0, 0.0))
    assert abs(float(iso[0, 1])) < 1e-9 and abs(float(iso[0, 0] - iso[1, 1])) < 1e-9
    assert torch.allclose(mixed_kernel("generalized_iso", 15, 1.5, 1.5, 0, 1.0), mixed_kernel("iso", 15, 1.5, 1.5, 0))


def test_generalized_and_plateau_shapes_follow_beta():
    """A larger beta flattens the top (the centre's neighbour nearly as heavy as the centre) and thins the tails;
    the plateau kernel has heavier tails than the Gaussian of the same sigma."""
    low, high = (mixed_kernel("generalized_iso", 21, 2.0, 2.0, 0, b) for b in (0.5, 4.0))
    assert float(high[10, 11] / high[10, 10]) > float(low[10, 11] / low[10, 10]) and float(low[10, 0]) > float(
        high[10, 0]
    )
    gauss, plateau = mixed_kernel("iso", 21, 2.0, 2.0, 0), mixed_kernel("plateau_iso", 21, 2.0, 2.0, 0, 1.0)
    assert float(plateau[10, 0] / plateau[10, 10]) > float(gauss[10, 0] / gauss[10, 10])


def test_the_sinc_kernel_passes_frequencies_below_its_cut_off_and_stops_those_above():
    omega = math.pi / 2
    k = sinc_kernel(21, omega)
    spec = torch.fft.fft2(k.double(), s=(256, 256)).abs()
    freq = torch.fft.fftfreq(256, dtype=torch.float64) * 2 * math.pi
    radius = torch.sqrt(freq[:, None] ** 2 + freq[None, :] ** 2)
    inside, outside = spec[radius < 0.7 * omega], spec[(radius > 1.35 * omega) & (radius < math.pi)]
    assert float(inside.min()) > 0.8 and float(outside.max()) < 0.15  # 21 taps: a little ripple
    # a lower cut-off blurs more: less energy at the mid frequencies
    lower = torch.fft.fft2(sinc_kernel(21, math.pi / 4).double(), s=(256, 256)).abs()
    band = (radius > 0.3 * math.pi) & (radius < 0.45 * math.pi)
    assert float(lower[band].mean()) < float(spec[band].mean()) - 0.5


def test_filter2d_is_a_reflect_padded_correlation_per_image():
    x = torch.rand(3, 3, 40, 52)
    ks = [
        mixed_kernel("aniso", 15, 3.0, 1.0, 0.7),
        sinc_kernel(7, 2.0),
        mixed_kernel("plateau_aniso", 21, 2, 1, -1, 1.5),
    ]
    got = filter2d(x, ks, size=MAX_KERNEL)
    for i, k in enumerate(ks):
        p = k.shape[-1] // 2
        ref = F.conv2d(F.pad(x[i : i + 1], (p, p, p, p), mode="reflect"), k.expand(3, 1, *k.shape), groups=3)
        assert torch.allclose(got[i : i + 1], ref, atol=1e-5)
    with pytest.raises(ValueError, match="2 kernels for 3 images"):
        filter2d(x, ks[:2])


# ------------------------------------------------------------------------------------------ noise and JPEG


def test_gaussian_noise_has_the_requested_spread_and_grey_noise_is_the_same_in_every_channel():
    x = torch.full((4, 3, 128, 128), 0.5)
    out = gaussian_noise(x, 10 / 255, False, torch.Generator().manual_seed(0))
    noise = out - x
    assert abs(float(noise.std()) - 10 / 255) < 0.002 and abs(float(noise.mean())) < 0.001
    assert abs(float(torch.corrcoef(noise[:, :2].reshape(2 * 4, -1))[0, 1])) < 0.05
    grey = gaussian_noise(x, 10 / 255, True, torch.Generator().manual_seed(0)) - x
    assert torch.equal(grey[:, 0], grey[:, 1]) and torch.equal(grey[:, 1], grey[:, 2])
    assert float(gaussian_noise(torch.ones(1, 3, 8, 8), 0.5, False, torch.Generator().manual_seed(1)).max()) <= 1


def test_poisson_noise_is_zero_mean_grows_with_the_scale_and_with_the_intensity():
    x = torch.cat([torch.full((1, 3, 64, 128), 0.2), torch.full((1, 3, 64, 128), 0.8)], dim=2)
    x = x + torch.linspace(0, 1e-3, 128)  # many distinct values, as after a blur
    spread = {}
    for scale in (0.5, 2.0):
        noise = poisson_noise(x, scale, False, torch.Generator().manual_seed(0)) - x
        assert abs(float(noise.mean())) < 3e-3  # 4 standard errors
        spread[scale] = (float(noise[..., :64, :].std()), float(noise[..., 64:, :].std()))
    assert spread[2.0][0] > 3 * spread[0.5][0]
    assert spread[2.0][1] > 1.5 * spread[2.0][0]  # shot noise: variance grows with the signal
    grey = poisson_noise(x, 1.0, True, torch.Generator().manual_seed(0)) - x
    assert torch.allclose(grey[:, 0], grey[:, 2])


def test_jpeg_quality_lowers_psnr_monotonically_and_matches_a_real_encoder():
    photo = _photo()
    ours = [_psnr(jpeg(photo, q), photo) for q in (10, 30, 50, 70, 95)]
    assert all(a < b for a, b in itertools.pairwise(ours)), ours
    arr = (photo[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    for q, mine in zip((30, 70), (ours[1], ours[3]), strict=True):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=q)  # libjpeg: 4:2:0, the same IJG tables
        pil = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1)[None].float() / 255
        assert abs(_psnr(pil, photo) - mine) < 1.0, (q, _psnr(pil, photo), mine)
    # one quality per image in a batch; odd sizes are padded and cropped back
    both = jpeg(torch.cat([photo, photo])[..., :250, :243], [20, 90])
    assert both.shape == (2, 3, 250, 243) and _psnr(both[:1], photo[..., :250, :243]) < _psnr(
        both[1:], photo[..., :250, :243]
    )


def test_usm_sharpening_adds_detail_and_leaves_flat_regions_alone():
    photo = _photo(128)
    sharp = usm_sharpen(photo)
    kernel = torch.tensor([[[[0, 1, 0], [1, -4, 1], [0, 1, 0]]]]).float().expand(3, 1, 3, 3)

    def lap(x):
        return F.conv2d(x, kernel, groups=3)

    assert float(lap(sharp).abs().mean()) > 1.1 * float(lap(photo).abs().mean())
    flat = torch.full((1, 3, 64, 64), 0.3)
    assert torch.allclose(usm_sharpen(flat), flat, atol=1e-6)


# ------------------------------------------------------------------------------------------ the chain


def test_the_chain_is_reproducible_from_the_seed_in_any_batch_and_any_process(tmp_path):
    photo = _photo() * 2 - 1  # 8-bit levels, as the data plane's crops (many equal values: a hard case)
    x = torch.cat([photo, photo.flip(-1), photo.flip(-2), photo.transpose(-1, -2)] * 2)
    seeds = list(range(11, 11 + 8))
    full = realesrgan(x, seeds, 4, RealESRGANSettings(second_order_prob=0.5))
    for i in range(8):
        alone = realesrgan(x[i : i + 1], [seeds[i]], 4, RealESRGANSettings(second_order_prob=0.5))
        assert torch.equal(full.lr[i], alone.lr[0]) and torch.equal(full.x_lr[i], alone.x_lr[0]), i
    assert not torch.equal(realesrgan(x[1:2], [23]).lr, realesrgan(x[1:2], [22]).lr)
    x, seeds = x[:3], seeds[:3]
    torch.save(x, tmp_path / "x.pt")
    code = (
        "import sys, torch; from oftsr.realesrgan import realesrgan; "
        f"x = torch.load({str(tmp_path / 'x.pt')!r}); out = realesrgan(x, {seeds}); "
        f"torch.save(out.lr, {str(tmp_path / 'lr.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "lr.pt"), realesrgan(x, seeds).lr)


def test_on_a_cpu_the_chain_calls_no_mkl_routine_and_its_pixels_do_not_depend_on_memory_alignment(tmp_path):
    """Intel MKL (torch's CPU FFT and matrix products) may pick its code path by the alignment of its buffers, and
    the Poisson sampler turns that last bit into different pixels: the chain must not call it. MKL_VERBOSE lists
    every MKL call of the process (nothing to list where torch is built without MKL). In-process, the same crops
    stored at shifted offsets (of what the process allocated before) give the same LR."""
    code = (
        "import torch; from oftsr.realesrgan import realesrgan, RealESRGANSettings\n"
        "x = torch.rand(2, 3, 64, 64) * 2 - 1\n"
        "torch.mm(torch.rand(64, 64, dtype=torch.float64), torch.rand(64, 64, dtype=torch.float64))\n"
        "print('CHAIN', flush=True)\n"
        "for seed in range(8):\n"
        "    s = RealESRGANSettings(second_order_prob=0.5, use_sharp=seed < 2)\n"
        "    realesrgan(x[seed % 2 : seed % 2 + 1], [seed], 4, s)\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "MKL_VERBOSE": "1"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    before, _, during = run.stdout.partition("CHAIN")
    if "MKL_VERBOSE" in before:  # this torch calls MKL (the float64 product above): the chain must not
        calls = [line for line in during.splitlines() if line.startswith("MKL_VERBOSE")]
        assert not calls, calls[:5]
    photo = (_photo(64) * 255).round() / 255 * 2 - 1  # 8-bit levels: many equal values
    seeds = [4, 6, 10, 12]  # Poisson (shot) noise in both stages: rates in the thousands, a last bit matters
    ref = realesrgan(photo.expand(4, -1, -1, -1).contiguous(), seeds, 4, RealESRGANSettings(second_order_prob=1.0))
    for offset in (1, 3, 7, 16):
        buf = torch.empty(offset + photo.numel())
        shifted = buf[offset:].view_as(photo).copy_(photo)
        keep = [torch.empty(offset * 17 + 5) for _ in range(offset)]  # other allocations in between
        for i, seed in enumerate(seeds):
            out = realesrgan(shifted, [seed], 4, RealESRGANSettings(second_order_prob=1.0))
            assert torch.equal(out.lr[0], ref.lr[i]), (offset, seed)
        del keep


def test_the_chain_gives_8_bit_lr_of_the_right_size_and_degrades_the_photo():
    x = _photo() * 2 - 1
    out = realesrgan(x.expand(4, -1, -1, -1), [1, 2, 3, 4])
    assert out.lr.shape == (4, 3, 64, 64) and out.x_lr.shape == (4, 3, 256, 256) and torch.equal(out.hr[0], x[0])
    levels = (out.lr + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3) and float(levels.min()) >= 0 and float(levels.max()) <= 255
    _, up_clean = degrade(x, 4, "bicubic")
    clean = _psnr((up_clean + 1) / 2, (x + 1) / 2)
    worse = [_psnr((out.x_lr[i : i + 1] + 1) / 2, (x + 1) / 2) for i in range(4)]
    assert all(w < clean for w in worse), (clean, worse)
    assert len({round(w, 3) for w in worse}) == 4  # four seeds, four different histories


def test_degrade_takes_the_kind_with_seeds_and_refuses_what_it_cannot_do():
    x = _photo(64) * 2 - 1
    lr, x_lr = degrade(x, 4, "realesrgan", seeds=[5])
    ref = realesrgan(x, [5])
    assert torch.equal(lr, ref.lr) and torch.equal(x_lr, ref.x_lr)
    with pytest.raises(ValueError, match="one integer seed per image"):
        degrade(x, 4, "realesrgan")
    with pytest.raises(ValueError, match="change the HR target"):
        degrade(x, 4, "realesrgan", seeds=[5], settings=RealESRGANSettings(use_sharp=True))


def test_gt_size_crops_hr_and_lr_at_the_same_place_and_resize_back_keeps_the_rounding_at_hr_size():
    x = _photo() * 2 - 1
    s = RealESRGANSettings(gt_size=128, resize_back=True, second_order_prob=0.0)
    out = realesrgan(x, [7], 4, s)
    assert out.hr.shape == (1, 3, 128, 128) and out.lr.shape == (1, 3, 32, 32) and out.x_lr.shape == (1, 3, 128, 128)
    # the HR crop is a window of the input at a multiple of sf, and the LR is the same window of the whole LR
    whole = realesrgan(x, [7], 4, dataclasses.replace(s, gt_size=None))
    hits = [
        (t, left)
        for t in range(0, 129, 4)
        for left in range(0, 129, 4)
        if torch.equal(x[..., t : t + 128, left : left + 128], out.hr)
    ]
    assert len(hits) == 1
    t, left = hits[0]
    assert torch.equal(whole.lr[..., t // 4 : t // 4 + 32, left // 4 : left // 4 + 32], out.lr)
    assert torch.equal(whole.x_lr[..., t : t + 128, left : left + 128], out.x_lr)
    levels = (out.x_lr + 1) / 2 * 255
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # rounded at HR size, not re-interpolated after


def test_the_draws_follow_the_settings_probabilities():
    s = RealESRGANSettings(second_order_prob=0.5)
    plans = [draw(i, s) for i in range(3000)]
    second = sum(p["second"] for p in plans) / len(plans)
    sinc = sum(p["kernel1"]["type"] == "sinc" for p in plans) / len(plans)
    iso = sum(p["kernel1"]["type"] == "iso" for p in plans) / len(plans)
    down = sum(p["stage1"]["resize"] == "down" for p in plans) / len(plans)
    sizes = {p["kernel1"]["size"] for p in plans}
    assert abs(second - 0.5) < 0.04 and abs(sinc - 0.1) < 0.02 and abs(iso - 0.9 * 0.45) < 0.03
    assert abs(down - 0.7) < 0.03 and sizes == set(range(7, 22, 2))
    assert all(0.2 <= p["kernel2"]["sigma_x"] <= 1.5 for p in plans if p["kernel2"]["type"] != "sinc")
    assert all(30 <= p["stage1"]["jpeg"] <= 95 for p in plans)
    assert json.dumps(plans[0])  # a plan is plain data (it can be recorded)
    assert kernel_from(plans[0]["kernel1"]).shape[-1] == plans[0]["kernel1"]["size"]
    # the official OFTSR setting draws kernels of 3..19 and 3..13
    official = [draw(i, OFTSR_REALSR) for i in range(500)]
    assert {p["kernel1"]["size"] for p in official} == set(range(3, 20, 2))
    assert {p["kernel2"]["size"] for p in official} == set(range(3, 14, 2))


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"first": StageSettings(kernel_prob=(0.5, 0.25, 0.12, 0.03, 0.12, 0.03))}, "realesrgan.first.kernel_prob"),
        ({"second": StageSettings(resize_prob=(0.3, 0.3, 0.3))}, "realesrgan.second.resize_prob"),
        ({"first": StageSettings(kernel_size=(8, 21))}, "realesrgan.first.kernel_size"),
        ({"first": StageSettings(kernel_size=(7, 23))}, "realesrgan.first.kernel_size"),
        ({"second": StageSettings(kernel_size=(15, 7))}, "realesrgan.second.kernel_size"),
        ({"first": StageSettings(blur_sigma=(3.0, 0.2))}, "realesrgan.first.blur_sigma"),
        ({"first": StageSettings(jpeg_range=(30, 120))}, "realesrgan.first.jpeg_range"),
        ({"second": StageSettings(noise_range=(5,))}, "realesrgan.second.noise_range"),
        ({"second_order_prob": 1.5}, "realesrgan.second_order_prob"),
        ({"final_kernel_size": (7, 22)}, "realesrgan.final.kernel_size"),
        ({"crop_pad_size": 300}, "realesrgan.crop_pad_size"),
    ],
)
def test_bad_settings_are_refused_naming_the_field(change, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RealESRGANSettings(**change)
