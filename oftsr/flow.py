"""The conditional rectified flow: noisy start, straight path and the conditioned velocity (DESIGN section 1).

``x0 = sqrt(1 - sigma_p^2) x_lr + sigma_p eps``; ``x_t = t x1 + (1 - t) x0``; ``v = x1 - x0``;
``v_theta(x, t | x_lr) = net(cat([x, x_lr], 1), 999 t)[:, :3]``. t = 0 is the noisy LR start, t = 1 the HR image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from oftsr.conventions import IMAGE_CHANNELS, TIME_SCALE

#: A velocity field ``(x: (B, 3, H, W), t: (B,)) -> (B, 3, H, W)`` with its condition already bound.
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def as_time(t: float | torch.Tensor, batch: int, device: torch.device | str, dtype=torch.float32) -> torch.Tensor:
    """Broadcast a scalar, 0-d or ``(B,)`` time to a ``(batch,)`` tensor on ``device``."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.ndim == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"t must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def noise_from_seed(
    shape: Sequence[int],
    seed: int | Sequence[int],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard normal noise drawn on the CPU from ``seed`` (identical on every machine), then moved to ``device``.

    With one ``seed`` the result has ``shape``; with a sequence of seeds it has ``(len(seeds), *shape)``, sample
    ``i`` drawn from ``seeds[i]`` alone, so a sample's noise never depends on its batch.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(seed, int | torch.SymInt) or (isinstance(seed, torch.Tensor) and seed.ndim == 0):
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        out = torch.randn(shape, generator=gen, dtype=torch.float32)
    else:
        seeds = [int(s) for s in seed]
        out = torch.stack([noise_from_seed(shape, s) for s in seeds]) if seeds else torch.empty((0, *shape))
    return out.to(device=device, dtype=dtype)


def noisy_start(
    x_lr: torch.Tensor,
    sigma_p: float,
    generator: torch.Generator | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x0 = sqrt(1 - sigma_p^2) x_lr + sigma_p eps``, ``(B, 3, H, W)``.

    ``eps`` is drawn fresh from ``generator`` unless ``noise`` (e.g. from :func:`noise_from_seed`) is given.
    """
    if not 0.0 <= sigma_p <= 1.0:
        raise ValueError(f"sigma_p must lie in [0, 1], got {sigma_p}")
    if noise is None:
        noise = torch.randn(x_lr.shape, generator=generator, device=x_lr.device, dtype=x_lr.dtype)
    elif noise.shape != x_lr.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_lr shape {tuple(x_lr.shape)}")
    return math.sqrt(1.0 - sigma_p**2) * x_lr + sigma_p * noise


def interpolate(x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """Point on the straight path ``x_t = t x1 + (1 - t) x0``; ``t`` scalar or ``(B,)``."""
    t = as_time(t, x0.shape[0], x0.device, x0.dtype).view(-1, 1, 1, 1)
    return t * x1 + (1.0 - t) * x0


def conditioned(net: nn.Module | Callable[..., torch.Tensor], x_lr: torch.Tensor) -> Velocity:
    """Bind the condition: returns ``velocity(x, t) = net(cat([x, x_lr], 1), 999 t)[:, :3]``.

    ``x`` may hold ``k`` stacked copies of the batch (``k * B`` rows, as when several evaluations share one call);
    the condition is then tiled ``k`` times. ``t`` is a scalar or a ``(rows,)`` tensor in [0, 1].
    """
    b = x_lr.shape[0]

    def velocity(x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows % b:
            raise ValueError(f"state batch {rows} is not a multiple of the condition batch {b}")
        cond = x_lr if rows == b else x_lr.repeat(rows // b, 1, 1, 1)
        tt = as_time(t, rows, x.device)
        out = net(torch.cat([x, cond.to(x.dtype)], dim=1), TIME_SCALE * tt)
        return out[:, :IMAGE_CHANNELS]

    return velocity
