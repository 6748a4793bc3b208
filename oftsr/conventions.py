"""The conventions every part of oftsr follows. Written once here, tested once in ``tests/core/test_conventions.py``.

Images
    Float tensors in **[-1, 1]**, shape ``(B, 3, H, W)``, RGB. ``x1`` is the high-resolution (HR) image of size
    H x W; ``sf`` is the scale factor (4).

Condition
    ``x_lr`` is the degraded measurement ``y = H(x1) + n`` brought back to HR size, ``x_lr = H^T(y)``
    (see :mod:`oftsr.degrade`). It is concatenated to the network input on the channel axis.

Noise-augmented start (the flow's source distribution)
    ``x0 = sqrt(1 - sigma_p^2) * x_lr + sigma_p * eps``, ``eps ~ N(0, I)``.

Time direction
    Straight path ``x_t = t * x1 + (1 - t) * x0``: **t = 0 is the noisy LR start, t = 1 is the HR image**.
    The velocity target is ``v = x1 - x0``. Several public flow codebases use the opposite direction
    (t = 1 is noise); nothing in oftsr does.

Network call
    ``v_theta(x, t | x_lr) = net(cat([x, x_lr], dim=1), TIME_SCALE * t)[:, :3]``: 6 input channels, the time
    multiplied by :data:`TIME_SCALE` (999) before the sinusoidal embedding, the first 3 output channels used.
"""

from __future__ import annotations

import torch

#: Multiplier applied to t in [0, 1] before the network's sinusoidal time embedding.
TIME_SCALE: float = 999.0
#: Channels of an image; the network sees twice as many (state and condition).
IMAGE_CHANNELS: int = 3
#: Range of image tensors.
IMAGE_MIN, IMAGE_MAX = -1.0, 1.0


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """Map an image from [-1, 1] to [0, 1] (no clamping)."""
    return (x + 1.0) * 0.5


def from_unit(x: torch.Tensor) -> torch.Tensor:
    """Map an image from [0, 1] to [-1, 1] (no clamping)."""
    return x * 2.0 - 1.0


def uint8_to_image(x: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` or ``(3, H, W)`` uint8 in [0, 255] to float32 in [-1, 1]."""
    return x.to(torch.float32) / 127.5 - 1.0


def image_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float image in [-1, 1] to uint8, clamped and rounded to the nearest level."""
    return ((x.clamp(IMAGE_MIN, IMAGE_MAX) + 1.0) * 127.5).round().to(torch.uint8)


def check_image(x: torch.Tensor, name: str = "image") -> None:
    """Raise ``ValueError`` unless ``x`` is a float ``(B, 3, H, W)`` tensor."""
    if x.ndim != 4 or x.shape[1] != IMAGE_CHANNELS:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor in [-1, 1], got dtype {x.dtype}")
