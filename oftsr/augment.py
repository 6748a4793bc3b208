"""Training-crop augmentation on tensors: random crops and flips (DESIGN section 3).

Works on one image ``(3, H, W)`` at a time so that it runs inside any data loader (Ray Data's ``map_batches``
included) with an explicit ``torch.Generator``.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class CropBox:
    """Where a crop came from: top-left corner, size (``size_w`` for a non-square width), and the flips applied
    after cropping."""

    top: int
    left: int
    size: int
    hflip: bool = False
    vflip: bool = False
    size_w: int | None = None

    @property
    def width(self) -> int:
        return self.size if self.size_w is None else self.size_w


def random_box(
    height: int,
    width: int,
    size: int,
    *,
    p_hflip: float = 0.5,
    p_vflip: float = 0.0625,
    generator: torch.Generator | None = None,
) -> CropBox:
    """A uniformly placed ``size x size`` crop with random flips. Raises ``ValueError`` if the image is smaller."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the crop {size}x{size}")
    u = torch.rand(4, generator=generator)
    top = int(u[0] * (height - size + 1))
    left = int(u[1] * (width - size + 1))
    return CropBox(min(top, height - size), min(left, width - size), size, bool(u[2] < p_hflip), bool(u[3] < p_vflip))


def center_box(height: int, width: int, size: int) -> CropBox:
    """The centred ``size x size`` crop, no flips."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the crop {size}x{size}")
    return CropBox((height - size) // 2, (width - size) // 2, size)


def apply_box(image: torch.Tensor, box: CropBox) -> torch.Tensor:
    """Crop ``(C, H, W)`` (or ``(B, C, H, W)``) to ``box`` and apply its flips."""
    out = image[..., box.top : box.top + box.size, box.left : box.left + box.width]
    if box.hflip:
        out = out.flip(-1)
    if box.vflip:
        out = out.flip(-2)
    return out
