"""The Real-ESRGAN second-order degradation (DESIGN section 2, kind ``realesrgan``), in plain PyTorch.

A real photo is blurred, resized, noisy and JPEG-compressed, often more than once. This module draws such a
history per image and applies it: stage one (blur, random resize, Gaussian or Poisson noise, JPEG), with probability
``second_order_prob`` stage two (blur with ``second_blur_prob``, resize, noise; its JPEG is the final one), then the
final resize to the LR size with a sinc filter and JPEG in random order, and 8-bit rounding.

Every random choice of a sample comes from its integer seed (:func:`draw`, Python's ``random.Random``; the noise
from a ``torch.Generator`` seeded from it), never from the batch or the process: the same (image, seed) gives the
same LR in any process, alone or in any batch. The operators are torch code on the images' device, applied one
image at a time (a batched FFT may round differently from a single one, and the Poisson sampler and JPEG's rounding
would turn that last-bit difference into different pixels).

Settings (:class:`RealESRGANSettings`) default to the published Real-ESRGAN x4 ones; the official OFTSR
real-world configuration differs in three places (second-order probability 0.5, kernel sizes 3-19 and 3-13,
a 300-pixel region cropped to 256 after degradation): :data:`OFTSR_REALSR` holds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

KERNEL_TYPES: tuple[str, ...] = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
)
RESIZE_MODES: tuple[str, ...] = ("area", "bilinear", "bicubic")
MAX_KERNEL = 21  # the largest kernel (the official pipeline pads every kernel to it)
MIN_KERNEL = 3


def _pair(name: str, value: Sequence[float], lo: float = -math.inf, hi: float = math.inf) -> None:
    if len(value) != 2:
        raise ValueError(f"{name} must be a range [low, high], got {list(value)}")
    a, b = value
    if not a <= b:
        raise ValueError(f"{name} is an empty range: low {a} > high {b}")
    if a < lo or b > hi:
        raise ValueError(f"{name} must lie within [{lo}, {hi}], got {list(value)}")


def _probs(name: str, value: Sequence[float], n: int) -> None:
    if len(value) != n:
        raise ValueError(f"{name} needs {n} probabilities, got {len(value)}")
    if any(p < 0 for p in value) or abs(sum(value) - 1.0) > 1e-6:
        raise ValueError(f"{name} must be non-negative and sum to 1, got {list(value)} (sum {sum(value):g})")


def _kernel_sizes(name: str, value: Sequence[int]) -> None:
    if len(value) != 2 or any(int(v) != v or v % 2 == 0 or not MIN_KERNEL <= v <= MAX_KERNEL for v in value):
        raise ValueError(f"{name} must be two odd sizes within {MIN_KERNEL}..{MAX_KERNEL}, got {list(value)}")
    _pair(name, value)


def _prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """One degradation stage. Ranges are ``(low, high)``, drawn uniformly; noise sigma in 8-bit units.

    Attributes:
        kernel_size: odd kernel sizes from ``low`` to ``high`` (within 3..21), drawn uniformly.
        kernel_prob: probabilities of :data:`KERNEL_TYPES` (sum 1).
        sinc_prob: probability of a sinc (circular low-pass) kernel instead of those.
        sinc_omega_small / sinc_omega_large: the sinc cut-off range for kernels below 13 / from 13 up.
        blur_sigma / betag_range / betap_range: Gaussian sigma, generalized-Gaussian and plateau shape ranges.
        resize_prob: probabilities of up / down / keep; resize_range: the scale's range.
        gaussian_noise_prob: Gaussian noise (sigma from ``noise_range``/255), else Poisson (``poisson_scale_range``).
        gray_noise_prob: probability that the noise is the same in every channel.
        jpeg_range: JPEG quality range (1..100).
    """

    kernel_size: tuple[int, ...] = (7, 21)
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    sinc_omega_small: tuple[float, ...] = (math.pi / 3, math.pi)
    sinc_omega_large: tuple[float, ...] = (math.pi / 5, math.pi)
    blur_sigma: tuple[float, ...] = (0.2, 3.0)
    betag_range: tuple[float, ...] = (0.5, 4.0)
    betap_range: tuple[float, ...] = (1.0, 2.0)
    resize_prob: tuple[float, ...] = (0.2, 0.7, 0.1)
    resize_range: tuple[float, ...] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, ...] = (1.0, 30.0)
    poisson_scale_range: tuple[float, ...] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, ...] = (30.0, 95.0)

    def check(self, where: str) -> None:
        _kernel_sizes(f"{where}.kernel_size", self.kernel_size)
        _probs(f"{where}.kernel_prob", self.kernel_prob, len(KERNEL_TYPES))
        _probs(f"{where}.resize_prob", self.resize_prob, 3)
        for name in ("sinc_prob", "gaussian_noise_prob", "gray_noise_prob"):
            _prob(f"{where}.{name}", getattr(self, name))
        _pair(f"{where}.sinc_omega_small", self.sinc_omega_small, 1e-6, math.pi)
        _pair(f"{where}.sinc_omega_large", self.sinc_omega_large, 1e-6, math.pi)
        _pair(f"{where}.blur_sigma", self.blur_sigma, 1e-3)
        _pair(f"{where}.betag_range", self.betag_range, 1e-3)
        _pair(f"{where}.betap_range", self.betap_range, 1e-3)
        _pair(f"{where}.resize_range", self.resize_range, 1e-3)
        if not self.resize_range[0] <= 1.0 <= self.resize_range[1]:
            raise ValueError(f"{where}.resize_range must contain 1 (down below it, up above), got {self.resize_range}")
        _pair(f"{where}.noise_range", self.noise_range, 0.0, 255.0)
        _pair(f"{where}.poisson_scale_range", self.poisson_scale_range, 0.0)
        _pair(f"{where}.jpeg_range", self.jpeg_range, 1.0, 100.0)


SECOND_STAGE = StageSettings(
    blur_sigma=(0.2, 1.5),
    resize_prob=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)


@dataclasses.dataclass(frozen=True)
class RealESRGANSettings:
    """The whole chain. Defaults: the published Real-ESRGAN x4 settings (DESIGN section 2).

    Attributes:
        first / second: the two stages.
        second_order_prob: probability of the second stage (Real-ESRGAN: always; the official OFTSR config: 0.5).
        second_blur_prob: probability of the second stage's blur.
        final_sinc_prob: probability of the final sinc filter; final_kernel_size / final_sinc_omega: its ranges.
        use_sharp: the HR target is USM-sharpened, and the degradation starts from it (as the official pipeline).
        resize_back: the condition is the chain's output resized back to HR size (bicubic) before 8-bit rounding,
            as the official pipeline's ``resize_back``; otherwise it is the rounded LR up-sampled (section 2's H^T).
        gt_size: HR size of a random paired crop taken after the degradation (the official ``gt_size``); None: none.
        crop_pad_size: in the data plane, the region cropped from a photo before the degradation (the official
            ``crop_pad_size``; needs ``gt_size``); None: the training crop itself.
    """

    first: StageSettings = dataclasses.field(default_factory=StageSettings)
    second: StageSettings = SECOND_STAGE
    second_order_prob: float = 1.0
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    final_kernel_size: tuple[int, ...] = (7, 21)
    final_sinc_omega: tuple[float, ...] = (math.pi / 3, math.pi)
    use_sharp: bool = False
    resize_back: bool = False
    gt_size: int | None = None
    crop_pad_size: int | None = None

    def __post_init__(self) -> None:
        self.check()

    def check(self, where: str = "realesrgan") -> None:
        self.first.check(f"{where}.first")
        self.second.check(f"{where}.second")
        for name in ("second_order_prob", "second_blur_prob", "final_sinc_prob"):
            _prob(f"{where}.{name}", getattr(self, name))
        _kernel_sizes(f"{where}.final.kernel_size", self.final_kernel_size)
        _pair(f"{where}.final_sinc_omega", self.final_sinc_omega, 1e-6, math.pi)
        if self.gt_size is not None and self.gt_size < 1:
            raise ValueError(f"{where}.gt_size must be a positive size or None, got {self.gt_size}")
        if self.crop_pad_size is not None:
            if self.gt_size is None:
                raise ValueError(f"{where}.crop_pad_size needs gt_size (the crop taken after the degradation)")
            if self.crop_pad_size < self.gt_size:
                raise ValueError(f"{where}.crop_pad_size {self.crop_pad_size} is smaller than gt_size {self.gt_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def on_crops(self) -> RealESRGANSettings:
        """The same chain without the settings that change the HR target (sharpening, the paired crop): for
        evaluation crops, whose HR is the reference."""
        return dataclasses.replace(self, use_sharp=False, gt_size=None, crop_pad_size=None)


#: The official OFTSR real-world setting (configs/ir_fm_DIV2K.yml ``degradation`` and ``data.train.params``, the
#: kernel sizes as its pipeline draws them: ``range(3, 21, 2)`` and ``range(3, 15, 2)``).
OFTSR_REALSR = RealESRGANSettings(
    first=StageSettings(kernel_size=(3, 19)),
    second=dataclasses.replace(SECOND_STAGE, kernel_size=(3, 13)),
    second_order_prob=0.5,
    final_kernel_size=(3, 13),
    gt_size=256,
    crop_pad_size=300,
)


# --------------------------------------------------------------------------------------------- the draws


def seed_of(seed: int, salt: str) -> int:
    """A 63-bit seed derived from ``seed`` for one use (``salt``), the same in every process."""
    digest = hashlib.blake2b(f"{seed}\0{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _kernel_draw(rng: random.Random, s: StageSettings) -> dict[str, Any]:
    size = rng.choice(range(int(s.kernel_size[0]), int(s.kernel_size[1]) + 1, 2))
    if rng.random() < s.sinc_prob:
        omega = s.sinc_omega_small if size < 13 else s.sinc_omega_large
        return {"type": "sinc", "size": size, "omega": rng.uniform(*omega)}
    kind = rng.choices(KERNEL_TYPES, weights=s.kernel_prob)[0]
    sx = rng.uniform(*s.blur_sigma)
    sy, theta = (rng.uniform(*s.blur_sigma), rng.uniform(-math.pi, math.pi)) if "aniso" in kind else (sx, 0.0)
    beta = 1.0
    if kind.startswith(("generalized", "plateau")):
        lo, hi = s.betag_range if kind.startswith("generalized") else s.betap_range
        # as Real-ESRGAN: half of the draws between the low end and 1, half between 1 and the high end
        beta = rng.uniform(lo, 1.0) if rng.random() < 0.5 else rng.uniform(1.0, hi)
    return {"type": kind, "size": size, "sigma_x": sx, "sigma_y": sy, "theta": theta, "beta": beta}


def _stage_draw(rng: random.Random, s: StageSettings) -> dict[str, Any]:
    updown = rng.choices(("up", "down", "keep"), weights=s.resize_prob)[0]
    scale = {"up": lambda: rng.uniform(1.0, s.resize_range[1]), "down": lambda: rng.uniform(s.resize_range[0], 1.0)}
    gaussian = rng.random() < s.gaussian_noise_prob
    return {
        "resize": updown,
        "scale": scale[updown]() if updown in scale else 1.0,
        "mode": rng.choice(RESIZE_MODES),
        "noise": "gaussian" if gaussian else "poisson",
        "noise_level": rng.uniform(*(s.noise_range if gaussian else s.poisson_scale_range)),
        "gray": rng.random() < s.gray_noise_prob,
        "jpeg": rng.uniform(*s.jpeg_range),
    }


def draw(seed: int, settings: RealESRGANSettings) -> dict[str, Any]:
    """Every random choice of one sample's degradation, from its seed alone (a plain dict, for records and tests)."""
    rng = random.Random(seed_of(seed, "realesrgan-plan"))
    s = settings
    plan: dict[str, Any] = {"kernel1": _kernel_draw(rng, s.first), "stage1": _stage_draw(rng, s.first)}
    plan["second"] = rng.random() < s.second_order_prob
    plan["blur2"] = rng.random() < s.second_blur_prob
    plan["kernel2"] = _kernel_draw(rng, s.second)
    plan["stage2"] = _stage_draw(rng, s.second)
    size = rng.choice(range(int(s.final_kernel_size[0]), int(s.final_kernel_size[1]) + 1, 2))
    sinc = rng.random() < s.final_sinc_prob
    plan["final_sinc"] = {"size": size, "omega": rng.uniform(*s.final_sinc_omega)} if sinc else None
    plan["final_mode"] = rng.choice(RESIZE_MODES)
    plan["sinc_first"] = rng.random() < 0.5
    plan["crop"] = (rng.random(), rng.random())  # where the paired gt_size crop lies, as fractions
    return plan


# --------------------------------------------------------------------------------------------- kernels


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    return xx, yy


def covariance(sigma_x: float, sigma_y: float, theta: float) -> torch.Tensor:
    """``R diag(sigma_x^2, sigma_y^2) R^T``: the kernel's spread ``sigma_x`` along the direction at angle ``theta``
    from the x axis (columns), ``sigma_y`` across it."""
    c, s = math.cos(theta), math.sin(theta)
    a, b = sigma_x**2, sigma_y**2  # in Python floats: no BLAS call (see filter2d on reproducibility)
    cov = [[a * c * c + b * s * s, (a - b) * c * s], [(a - b) * c * s, a * s * s + b * c * c]]
    return torch.tensor(cov, dtype=torch.float64)


def mixed_kernel(kind: str, size: int, sigma_x: float, sigma_y: float, theta: float, beta: float = 1.0) -> torch.Tensor:
    """A ``(size, size)`` blur kernel summing to one: Gaussian (``iso``/``aniso``), generalized Gaussian
    ``exp(-0.5 d^beta)`` or plateau ``1 / (1 + d^beta)``, with ``d`` the squared Mahalanobis distance."""
    if kind not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kind!r}; expected one of {KERNEL_TYPES}")
    if size % 2 == 0 or size < 1:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    (p, q), (_, r) = covariance(sigma_x, sigma_y, theta).tolist()
    det = p * r - q * q  # the inverse of the symmetric 2x2 covariance, in Python floats
    xx, yy = _grid(size)
    d = (r / det) * xx * xx - (2 * q / det) * xx * yy + (p / det) * yy * yy
    if kind in ("iso", "aniso"):
        k = torch.exp(-0.5 * d)
    elif kind.startswith("generalized"):
        k = torch.exp(-0.5 * d.pow(beta))
    else:
        k = 1.0 / (d.pow(beta) + 1.0)
    return (k / k.sum()).float()


def sinc_kernel(size: int, omega: float) -> torch.Tensor:
    """The circular low-pass (2-D sinc) kernel with cut-off ``omega`` (radians per pixel), ``(size, size)``, sum 1:
    ``omega J1(omega r) / (2 pi r)``, ``omega^2 / (4 pi)`` at the centre."""
    if size % 2 == 0 or size < 1:
        raise ValueError(f"kernel size must be odd and positive, got {size}")
    if not 0.0 < omega <= math.pi:
        raise ValueError(f"sinc cut-off must lie in (0, pi], got {omega}")
    xx, yy = _grid(size)
    r = torch.sqrt(xx * xx + yy * yy)
    safe = torch.where(r > 0, r, torch.ones_like(r))
    k = torch.where(
        r > 0, omega * torch.special.bessel_j1(omega * safe) / (2 * math.pi * safe), omega**2 / (4 * math.pi)
    )
    return (k / k.sum()).float()


def kernel_from(spec: dict[str, Any]) -> torch.Tensor:
    if spec["type"] == "sinc":
        return sinc_kernel(spec["size"], spec["omega"])
    return mixed_kernel(spec["type"], spec["size"], spec["sigma_x"], spec["sigma_y"], spec["theta"], spec["beta"])


# --------------------------------------------------------------------------------------------- operators


def filter2d(
    x: torch.Tensor, kernels: torch.Tensor | Sequence[torch.Tensor], *, size: int | None = None
) -> torch.Tensor:
    """Blur each image of ``x`` ``(B, C, H, W)`` with its own odd kernel (one for all, or a list of B), with reflect
    padding, as a correlation (``conv2d``). The kernels are zero-padded to ``size`` (default: the largest given).
    On a CPU every size goes through the FFT (a 21x21 kernel costs ~ 5x less than a direct depthwise convolution
    there); on a GPU kernels under 9 taps are a direct convolution.

    Reproducibility: on a CPU the FFT is scipy's (pocketfft, float32), never torch's: torch's CPU FFT and
    convolutions call Intel MKL / oneDNN, whose code path (and so the last bits) can depend on the memory alignment
    of the process's earlier allocations, and the chain's Poisson sampler (rates in the tens of thousands) turns one
    last bit into different pixels. On a GPU it is cuFFT (or the convolution), in float64."""
    b, c, h, w = x.shape
    ks = [kernels] * b if isinstance(kernels, torch.Tensor) else list(kernels)
    if len(ks) != b:
        raise ValueError(f"filter2d: {len(ks)} kernels for {b} images")
    size = size or max(k.shape[-1] for k in ks)
    cpu = x.device.type == "cpu"
    dtype = torch.float32 if cpu else torch.float64
    weight = torch.stack([F.pad(k, [(size - k.shape[-1]) // 2] * 4) for k in ks]).to(x.device, dtype)  # (B, K, K)
    pad = size // 2
    mode = "reflect" if pad < min(h, w) else "replicate"
    xp = F.pad(x.to(dtype), (pad, pad, pad, pad), mode=mode)
    hp, wp = xp.shape[-2:]
    if cpu:
        # Circular convolution on a fast FFT size >= the padded image: rows and columns from size - 1 on are exact.
        from scipy import fft  # pocketfft, vectorised over rows: ~2.4x numpy's on one core

        fh, fw = fft.next_fast_len(hp, real=True), fft.next_fast_len(wp, real=True)  # 2^a 3^b 5^c sizes
        spec = fft.rfft2(xp.numpy(), s=(fh, fw)) * fft.rfft2(weight.flip(-1, -2).numpy(), s=(fh, fw))[:, None]
        full = torch.from_numpy(fft.irfft2(spec, s=(fh, fw)))
        return full[..., size - 1 : size - 1 + h, size - 1 : size - 1 + w].to(x.dtype)
    if size < 9:
        out = F.conv2d(
            xp.reshape(1, b * c, h + 2 * pad, w + 2 * pad), weight.repeat_interleave(c, 0).unsqueeze(1), groups=b * c
        )
        return out.reshape(b, c, h, w).to(x.dtype)
    spec = torch.fft.rfft2(xp) * torch.fft.rfft2(weight.flip(-1, -2), s=(hp, wp)).unsqueeze(1)
    full = torch.fft.irfft2(spec, s=(hp, wp))
    return full[..., size - 1 : size - 1 + h, size - 1 : size - 1 + w].to(x.dtype)


def resize(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """``area`` / ``bilinear`` / ``bicubic`` resize to ``size`` (torch's ``interpolate``, as the official pipeline)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; expected one of {RESIZE_MODES}")
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(x.shape[-2:]) == size:
        return x
    return F.interpolate(x, size=size, mode=mode)


def _gray_like(x: torch.Tensor, noise: torch.Tensor, gray: bool) -> torch.Tensor:
    return noise[:, :1].expand_as(x) if gray else noise


def gaussian_noise(x: torch.Tensor, sigma: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """``x`` in [0, 1] plus N(0, sigma^2) noise (``sigma`` in [0, 1] units), the same in every channel when
    ``gray``; clipped to [0, 1]."""
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)
    return (x + sigma * _gray_like(x, noise, gray)).clamp(0, 1)


def _distinct(x: torch.Tensor) -> int:
    """The number of distinct values of ``x`` (numpy's sort on a CPU: about 20x faster than torch's there)."""
    if x.device.type == "cpu":
        return int(np.unique(x.detach().float().numpy()).size)
    return int(torch.unique(x).numel())


def poisson_noise(x: torch.Tensor, scale: float, gray: bool, generator: torch.Generator) -> torch.Tensor:
    """Real-ESRGAN's Poisson (shot) noise: ``poisson(v * x) / v - x`` with ``v`` the number of distinct values
    rounded up to a power of two, times ``scale``; from the grey image when ``gray``; clipped to [0, 1]."""
    src = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]) if gray else x
    src = src.clamp(0, 1)
    vals = 2.0 ** math.ceil(math.log2(max(2, _distinct(src))))
    noisy = torch.poisson(src * vals, generator=generator) / vals
    return (x + scale * (noisy - src).expand_as(x)).clamp(0, 1)


_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)
_CHROMA = torch.full((8, 8), 99.0)
_CHROMA[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]])


def _dct_matrix() -> torch.Tensor:
    n = torch.arange(8, dtype=torch.float64)
    m = torch.cos((2 * n[None, :] + 1) * n[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    m[0] /= math.sqrt(2)
    return m.float()


_DCT = _dct_matrix()


def quant_table(quality: float, chroma: bool = False) -> torch.Tensor:
    """The IJG (libjpeg) quantisation table for an integer ``quality`` in 1..100."""
    q = round(min(100.0, max(1.0, float(quality))))
    scale = 5000 / q if q < 50 else 200 - 2 * q
    base = _CHROMA if chroma else _LUMA
    return torch.clamp(torch.floor((base * scale + 50) / 100), 1, 255)


def _blocks_roundtrip(ch: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """DCT, quantise with ``table`` ``(B, 8, 8)``, dequantise and invert, over the 8x8 blocks of ``(B, H, W)``.
    The 8x8 products are eight multiply-adds over all blocks at once (:func:`_along`), not BLAS calls, whose rounding
    can depend on memory alignment (see :func:`filter2d`): a coefficient exactly half a quantiser step (flat blocks
    of 8-bit values) must round the same way every time."""
    b, h, w = ch.shape
    n = (h // 8) * (w // 8)
    blocks = ch.reshape(b, h // 8, 8, w // 8, 8).permute(2, 4, 0, 1, 3).reshape(8, 8, b * n)  # blocks last
    d = _DCT.to(ch)
    coef = _along(d, _along(d, blocks, 0), 1)
    t = table.to(ch).permute(1, 2, 0).repeat_interleave(n, dim=2)
    coef = torch.round(coef / t) * t
    out = _along(d.T, _along(d.T, coef, 0), 1)
    return out.reshape(8, 8, b, h // 8, w // 8).permute(2, 3, 0, 4, 1).reshape(b, h, w)


def _along(m: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """``m`` ``(8, 8)`` applied to dimension ``dim`` (0 or 1) of ``x`` ``(8, 8, N)``: ``out[i] = sum_k m[i, k] x[k]``
    along it, as eight multiply-adds in a fixed order."""
    shape = (8, 1, 1) if dim == 0 else (1, 8, 1)
    out = m[:, 0].reshape(shape) * x.narrow(dim, 0, 1)
    for k in range(1, 8):
        out = out.addcmul_(m[:, k].reshape(shape), x.narrow(dim, k, 1))
    return out


def jpeg(x: torch.Tensor, quality: Sequence[float] | float) -> torch.Tensor:
    """Baseline JPEG compression and decompression of ``x`` ``(B, 3, H, W)`` in [0, 1], one quality per image:
    JFIF YCbCr, 4:2:0 chroma, 8x8 DCT quantised with the IJG tables, 8-bit output. (The official pipeline uses
    basicsr's DiffJPEG, the same steps in torch.)"""
    b, _, h, w = x.shape
    qs = [quality] * b if isinstance(quality, int | float) else list(quality)
    ph, pw = (-h) % 16, (-w) % 16
    img = F.pad(x.clamp(0, 1) * 255, (0, pw, 0, ph), mode="replicate")
    r, g, bl = img[:, 0], img[:, 1], img[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * bl
    cb = -0.168736 * r - 0.331264 * g + 0.5 * bl
    cr = 0.5 * r - 0.418688 * g - 0.081312 * bl
    luma = torch.stack([quant_table(q) for q in qs])
    chroma = torch.stack([quant_table(q, chroma=True) for q in qs])
    y = _blocks_roundtrip(y - 128, luma) + 128
    sub = F.avg_pool2d(torch.stack([cb, cr], 1), 2)
    sub = torch.stack([_blocks_roundtrip(sub[:, i], chroma) for i in range(2)], 1)
    cb, cr = F.interpolate(sub, scale_factor=2, mode="nearest").unbind(1)
    out = torch.stack([y + 1.402 * cr, y - 0.344136 * cb - 0.714136 * cr, y + 1.772 * cb], 1)
    return (torch.round(out.clamp(0, 255)) / 255)[:, :, :h, :w]


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    return k / k.sum()


def _separable_blur(x: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    k = _gaussian_1d(size, sigma).to(x.device)
    if x.device.type == "cpu":  # the FFT of filter2d: no MKL (a float64 convolution here is an MKL product)
        return filter2d(x, torch.outer(k, k).float())
    c, dtype = x.shape[1], x.dtype
    pad = size // 2
    mode = "reflect" if pad < min(x.shape[-2:]) else "replicate"
    x = x.double()
    x = F.conv2d(F.pad(x, (pad, pad, 0, 0), mode=mode), k.view(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    x = F.conv2d(F.pad(x, (0, 0, pad, pad), mode=mode), k.view(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)
    return x.to(dtype)


def usm_sharpen(x: torch.Tensor, weight: float = 0.5, threshold: float = 10.0, radius: int = 50) -> torch.Tensor:
    """Unsharp masking as Real-ESRGAN's ``USMSharp`` (``x`` in [0, 1]): Gaussian of size ``2 radius + 1`` (OpenCV's
    sigma for it), residual added with ``weight`` where it exceeds ``threshold``/255, blended with a soft mask."""
    size = 2 * radius + 1
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    residual = x - _separable_blur(x, size, sigma)
    mask = (residual.abs() * 255 > threshold).to(x.dtype)
    soft = _separable_blur(mask, size, sigma)
    sharp = (x + weight * residual).clamp(0, 1)
    return soft * sharp + (1 - soft) * x


# --------------------------------------------------------------------------------------------- the chain


class Degraded(NamedTuple):
    """``hr`` (the target: sharpened and/or cropped as the settings say), ``lr`` ``(B, 3, h/sf, w/sf)`` and the
    condition ``x_lr`` ``(B, 3, h, w)``; all in [-1, 1]."""

    hr: torch.Tensor
    lr: torch.Tensor
    x_lr: torch.Tensor


def _noise(x: torch.Tensor, st: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
    if st["noise"] == "gaussian":
        return gaussian_noise(x, st["noise_level"] / 255.0, st["gray"], gen)
    return poisson_noise(x, st["noise_level"], st["gray"], gen)


def _one(x: torch.Tensor, plan: dict[str, Any], seed: int, sf: int, hr_size: tuple[int, int]) -> torch.Tensor:
    """Stage one's resize, noise and JPEG, stage two, and the final stage of one image ``(1, 3, h, w)`` in [0, 1]
    (already blurred by stage one's kernel); returns the unrounded LR-sized result."""
    gen = torch.Generator(device=x.device).manual_seed(seed_of(seed, "realesrgan-noise"))
    h, w = hr_size
    st = plan["stage1"]
    x = resize(x, (int(h * st["scale"]), int(w * st["scale"])), st["mode"])
    x = jpeg(_noise(x, st, gen), st["jpeg"])
    if plan["second"]:
        if plan["blur2"]:
            x = filter2d(x, kernel_from(plan["kernel2"]))
        st2 = plan["stage2"]
        x = resize(x, (int(h / sf * st2["scale"]), int(w / sf * st2["scale"])), st2["mode"])
        x = _noise(x, st2, gen)
    quality = plan["stage2"]["jpeg"]
    sinc = plan["final_sinc"]

    def resize_and_sinc(y: torch.Tensor) -> torch.Tensor:
        y = resize(y, (h // sf, w // sf), plan["final_mode"])
        return filter2d(y, sinc_kernel(sinc["size"], sinc["omega"])) if sinc else y

    if plan["sinc_first"]:
        return jpeg(resize_and_sinc(x).clamp(0, 1), quality)
    return resize_and_sinc(jpeg(x.clamp(0, 1), quality))


def _quantise(x: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(x * 255.0), 0, 255) / 255.0


def realesrgan(
    x1: torch.Tensor, seeds: Sequence[int], sf: int = 4, settings: RealESRGANSettings | None = None
) -> Degraded:
    """Degrade HR images ``x1`` ``(B, 3, H, W)`` in [-1, 1] (H, W multiples of ``sf``), one integer seed each, on
    ``x1``'s device. The same (image, seed) gives the same result in any batch and any process (on one device type).
    """
    from oftsr.degrade import upsample

    s = settings or RealESRGANSettings()
    b, _, h, w = x1.shape
    if len(seeds) != b:
        raise ValueError(f"realesrgan: {len(seeds)} seeds for {b} images")
    if h % sf or w % sf:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale factor {sf}; crop or pad it first")
    if s.gt_size is not None and (s.gt_size % sf or s.gt_size > min(h, w)):
        raise ValueError(f"realesrgan.gt_size {s.gt_size} must be a multiple of sf={sf} and fit the {h}x{w} input")
    plans = [draw(int(seed), s) for seed in seeds]
    x = ((x1.float() + 1) / 2).clamp(0, 1)
    if s.use_sharp:
        x = usm_sharpen(x)
    hr = x
    # One image at a time, every operator: a batched FFT (or convolution) may round differently from a single one,
    # and the Poisson sampler and JPEG's rounding turn a last-bit difference into different pixels.
    outs = [
        _one(filter2d(x[i : i + 1], kernel_from(p["kernel1"])), p, int(seed), sf, (h, w))
        for i, (p, seed) in enumerate(zip(plans, seeds, strict=True))
    ]
    out = torch.cat(outs)
    lr = _quantise(out)
    x_lr = _quantise(F.interpolate(out, size=(h, w), mode="bicubic")) if s.resize_back else None
    if s.gt_size is not None:  # the paired crop: the same window of the HR and the LR (and of x_lr)
        g, gl = s.gt_size, s.gt_size // sf
        at = [(int(p["crop"][0] * (h // sf - gl + 1)), int(p["crop"][1] * (w // sf - gl + 1))) for p in plans]

        def window(img: torch.Tensor, size: int, scale: int) -> torch.Tensor:
            return torch.cat(
                [
                    img[i : i + 1, :, t * scale : t * scale + size, c * scale : c * scale + size]
                    for i, (t, c) in enumerate(at)
                ]
            )

        hr, lr = window(hr, g, sf), window(lr, gl, 1)
        x_lr = window(x_lr, g, sf) if x_lr is not None else None
    lr = lr * 2 - 1
    x_lr = upsample(lr, sf, "bicubic") if x_lr is None else x_lr * 2 - 1
    return Degraded((hr * 2 - 1).to(x1.dtype), lr.to(x1.dtype), x_lr.to(x1.dtype))
