"""The paper's evaluation protocol (DESIGN section 8), as the official code runs it (``sample_fm.py``,
``fm/flow_matching.py``, ``fm/image_datasets.py``, ``configs/*.yml``, ``val_data/*_val_100.txt``).

* **Images**: 100 per task. FFHQ: ``69007.png`` to ``69997.png`` in steps of 10 (the official list); ImageNet: the
  100 validation images of the official list (:data:`IMAGENET_VAL_100`); DIV2K: its 100 validation images
  ``0801.png`` to ``0900.png`` (the official README evaluates the ``DIV2K_valid_HR`` folder).
* **Crop**: the centre ``val_img_size`` square of each image, without resizing (256 for FFHQ and ImageNet, 512 for
  DIV2K); an image smaller than that is skipped and named.
* **Large inputs** (DIV2K's 512 crops): the official restoration splits any input larger than 256 x 256 into four
  overlapping quadrants of ``(h // 2 // 32 + 1) * 32`` pixels, restores each whole and pastes their inner halves
  back (:func:`quadrant_split`), for the teacher and the student alike.
* **One step**: ``x0 + (1 - 1e-3) v(x0, t)`` (the official sampler scales the velocity by ``T - eps``) at the
  knob's trained end points ``t = 0.01`` and ``0.99``.
* **Metrics**: PSNR as ``20 log10(2 / rmse)`` on [-1, 1] (the same number as on [0, 1]) of the unclamped output,
  LPIPS (AlexNet) on the unclamped output, FID between the (clamped, saved) outputs and the HR crops.
* **Noise**: the official script draws its start noise from one global generator seeded 42, in batch order on the
  GPU; that exact stream cannot be reproduced elsewhere. Here each image's noise comes from its own seed (42 and its
  index), the same on every machine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

#: The ImageNet validation images of the official ``val_data/imagenet_val_100/imagenet_val_100.txt``, by number
#: (``ILSVRC2012_val_%08d.JPEG``-style names, ``.jpg`` in the list).
IMAGENET_VAL_100 = (
    1, 11, 22, 33, 44, 55, 65, 76, 87, 98, 110, 121, 131, 153, 164, 175, 187, 200, 212, 226,
    239, 254, 266, 280, 293, 304, 319, 335, 347, 359, 372, 384, 402, 416, 438, 457, 468, 486, 502, 508,
    521, 537, 547, 559, 575, 592, 607, 626, 647, 668, 680, 696, 712, 729, 752, 770, 782, 805, 832, 856,
    879, 901, 926, 962, 997, 1016, 1041, 1066, 1090, 1112, 1160, 1192, 1253, 1288, 1343, 1380, 1408, 1461, 1498, 1564,
    1598, 1652, 1706, 1763, 1826, 1892, 1937, 2011, 2100, 2193, 2280, 2338, 2436, 2563, 2688, 2922, 3036, 3202, 3569,
    4159,
)  # fmt: skip

#: Per task: the recipe (method parameters), the centre crop, and the published numbers (DESIGN section 8:
#: PSNR / LPIPS / FID; the teacher's NFE) that this protocol is meant to reproduce with the released checkpoints.
TASKS: dict[str, dict] = {
    "ffhq": {
        "recipe": "ffhq_x4",
        "crop": 256,
        "published": {
            "teacher": (28.83, 0.053, 30.54, 20),
            "student t=1": (28.98, 0.055, 36.02),
            "student t=0": (31.25, 0.150, 66.76),
        },
    },
    "ffhq_noisy": {"recipe": "ffhq_x4_noisy", "crop": 256, "published": {"student t=1": (27.7, 0.081, 49.8)}},
    "div2k": {
        "recipe": "div2k_x4",
        "crop": 512,
        "published": {
            "teacher": (26.76, 0.128, 14.10, 31),
            "student t=1": (26.87, 0.127, 14.58),
            "student t=0": (28.99, 0.271, 18.07),
        },
    },
    "imagenet": {
        "recipe": "imagenet_x4",
        "crop": 256,
        "published": {
            "teacher": (23.35, 0.132, 46.88, 26),
            "student t=1": (24.20, 0.135, 52.69),
            "student t=0": (26.18, 0.284, 92.04),
        },
    },
}

ONE_STEP_SCALE = 1.0 - 1e-3  # the official one-step sampler: x0 + (T - eps) v
SEED = 42


def image_names(task: str) -> list[str]:
    """The 100 file names of ``task``'s evaluation images."""
    if task not in TASKS:
        raise ValueError(f"unknown paper task {task!r}; expected one of {sorted(TASKS)}")
    if task in ("ffhq", "ffhq_noisy"):
        return [f"{69007 + 10 * i}.png" for i in range(100)]
    if task == "div2k":
        return [f"{801 + i:04d}.png" for i in range(100)]
    return [f"ILSVRC2012_val_{n:08d}.jpg" for n in IMAGENET_VAL_100]


def centre_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """The official validation crop of an ``(..., H, W)`` image: rows ``(H - size) // 2 .. (H + size) // 2``."""
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"{h}x{w} is smaller than the {size}x{size} crop")
    return img[..., (h - size) // 2 : (h + size) // 2, (w - size) // 2 : (w + size) // 2]


def quadrant_split(
    restore: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    cond: torch.Tensor,
    *,
    min_size: int = 256,
    refield: int = 32,
) -> torch.Tensor:
    """``restore(x0, cond)`` as the official restoration applies it to inputs larger than ``min_size`` squared: four
    corner tiles of ``(h // 2 // refield + 1) * refield`` by ``(w // 2 // refield + 1) * refield`` pixels, each restored
    whole (split again while it is larger than ``min_size`` squared by more than four times), and each output quarter
    taken from the tile of its corner."""
    h, w = x0.shape[-2:]
    if h * w <= min_size**2:
        return restore(x0, cond)
    th, tw = (h // 2 // refield + 1) * refield, (w // 2 // refield + 1) * refield
    rows, cols = (slice(0, th), slice(h - th, h)), (slice(0, tw), slice(w - tw, w))
    out = torch.empty_like(x0)
    for i, rs in enumerate(rows):
        for j, cs in enumerate(cols):
            if h * w <= 4 * min_size**2:
                tile = restore(x0[..., rs, cs], cond[..., rs, cs])
            else:
                tile = quadrant_split(restore, x0[..., rs, cs], cond[..., rs, cs], min_size=min_size, refield=refield)
            ys = slice(0, h // 2) if i == 0 else slice(h // 2, h)
            xs = slice(0, w // 2) if j == 0 else slice(w // 2, w)
            ty = slice(0, h // 2) if i == 0 else slice(th - (h - h // 2), th)
            tx = slice(0, w // 2) if j == 0 else slice(tw - (w - w // 2), tw)
            out[..., ys, xs] = tile[..., ty, tx]
    return out


__all__ = ["IMAGENET_VAL_100", "ONE_STEP_SCALE", "SEED", "TASKS", "centre_crop", "image_names", "quadrant_split"]
