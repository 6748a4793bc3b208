"""Measurement models ``y = H(x1) + n`` and the HR-sized condition ``x_lr = H^T(y)`` (DESIGN section 2).

* ``bicubic`` (the paper's ``sr_interp``): ``H`` is antialiased bicubic down-sampling by ``sf``;
  ``H^T`` is bicubic up-sampling by ``sf`` (plain interpolation, not a true adjoint).
* ``avgpool`` (the paper's ``sr_avp``): ``H`` averages each ``sf x sf`` box; ``H^T`` replicates each pixel
  (nearest).

* ``realesrgan``: the Real-ESRGAN second-order chain (:mod:`oftsr.realesrgan`; blur, resize, noise, JPEG, twice,
  then sinc + JPEG), drawn per image from an integer seed; ``H^T`` is bicubic up-sampling.

Measurement noise ``n = sigma_y * N(0, I)`` is added in LR space, before up-sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F

from oftsr.conventions import check_image

if TYPE_CHECKING:
    from oftsr.realesrgan import RealESRGANSettings

Kind = Literal["bicubic", "avgpool", "realesrgan"]
KINDS: tuple[str, ...] = ("bicubic", "avgpool", "realesrgan")
#: Kinds whose degradation is drawn per image from a seed (the data plane passes one seed per crop).
SEEDED_KINDS: tuple[str, ...] = ("realesrgan",)


def _check(kind: str, sf: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown degradation kind {kind!r}; expected one of {KINDS}")
    if not isinstance(sf, int) or sf < 1:
        raise ValueError(f"scale factor sf must be a positive integer, got {sf!r}")


def downsample(x1: torch.Tensor, sf: int = 4, kind: Kind = "bicubic") -> torch.Tensor:
    """Apply ``H``: ``(B, 3, H, W)`` to ``(B, 3, H / sf, W / sf)``. H and W must be multiples of ``sf``."""
    _check(kind, sf)
    check_image(x1, "x1")
    h, w = x1.shape[-2:]
    if h % sf or w % sf:
        raise ValueError(f"image size {h}x{w} is not divisible by the scale factor {sf}; crop or pad it first")
    if kind == "realesrgan":
        raise ValueError("the realesrgan degradation is drawn per image: call degrade(..., seeds=[...])")
    if kind == "bicubic":
        return F.interpolate(x1, scale_factor=1 / sf, mode="bicubic", antialias=True, align_corners=False)
    return F.avg_pool2d(x1, kernel_size=sf, stride=sf)


def upsample(y: torch.Tensor, sf: int = 4, kind: Kind = "bicubic") -> torch.Tensor:
    """Apply ``H^T``: ``(B, 3, h, w)`` to ``(B, 3, h * sf, w * sf)``."""
    _check(kind, sf)
    check_image(y, "lr")
    if kind in ("bicubic", "realesrgan"):
        return F.interpolate(y, scale_factor=sf, mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(y, scale_factor=sf, mode="nearest")


def degrade(
    x1: torch.Tensor,
    sf: int = 4,
    kind: Kind = "bicubic",
    sigma_y: float = 0.0,
    generator: torch.Generator | None = None,
    *,
    seeds: Sequence[int] | None = None,
    settings: RealESRGANSettings | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Degrade HR images and build the condition.

    Args:
        x1: HR images ``(B, 3, H, W)`` in [-1, 1]; H and W multiples of ``sf``.
        sf: scale factor.
        kind: ``"bicubic"``, ``"avgpool"`` or ``"realesrgan"``.
        sigma_y: standard deviation of the Gaussian measurement noise, in [-1, 1] units, added in LR space
            (``bicubic`` and ``avgpool``; the realesrgan chain draws its own noise).
        generator: optional generator for the noise (on ``x1``'s device).
        seeds: ``realesrgan`` only: one integer seed per image (every random choice of its chain).
        settings: ``realesrgan`` only: :class:`oftsr.realesrgan.RealESRGANSettings` (default: the published ones).
            Settings that change the HR target (``use_sharp``, ``gt_size``) need
            :func:`oftsr.realesrgan.realesrgan`, which returns it.

    Returns:
        ``(lr, x_lr)``: the measurement ``(B, 3, H / sf, W / sf)`` and the condition ``(B, 3, H, W)``.
    """
    if sigma_y < 0:
        raise ValueError(f"sigma_y must be >= 0, got {sigma_y}")
    if kind == "realesrgan":
        from oftsr.realesrgan import RealESRGANSettings, realesrgan

        s = settings or RealESRGANSettings()
        if s.use_sharp or s.gt_size is not None:
            raise ValueError("use_sharp and gt_size change the HR target: call oftsr.realesrgan.realesrgan")
        if seeds is None:
            raise ValueError("the realesrgan degradation needs one integer seed per image (seeds=[...])")
        check_image(x1, "x1")
        out = realesrgan(x1, seeds, sf, s)
        return out.lr, out.x_lr
    lr = downsample(x1, sf, kind)
    if sigma_y > 0:
        noise = torch.randn(lr.shape, generator=generator, device=lr.device, dtype=lr.dtype)
        lr = lr + sigma_y * noise
    return lr, upsample(lr, sf, kind)
