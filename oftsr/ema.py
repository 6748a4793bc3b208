"""Exponential moving average of a model's weights, with the decay set as a half-life in images.

Per update on a batch of ``n`` images (across all workers), ``decay = 0.5 ** (n / half_life_images)``, so the
schedule does not change with the batch size or the worker count. With warm-up (DESIGN section 3) the decay is
capped at ``(1 + k) / (10 + k)`` after ``k`` updates, so a short run's EMA is not mostly its initial weights.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn


def half_life_from_decay(decay: float, batch_images: int) -> float:
    """The half-life in images equivalent to a per-step ``decay`` at ``batch_images`` per step
    (0.9999 at batch 32 is about 221,800 images)."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"decay must lie in (0, 1), got {decay}")
    return batch_images * math.log(0.5) / math.log(decay)


class EMA:
    """Shadow copy of ``model`` updated by :meth:`update`; use :attr:`module` for evaluation."""

    def __init__(self, model: nn.Module, half_life_images: float, *, warmup: bool = True):
        if half_life_images <= 0:
            raise ValueError(f"EMA half-life must be > 0 images, got {half_life_images}")
        self.half_life_images = float(half_life_images)
        self.warmup = warmup
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    def decay(self, batch_images: int) -> float:
        d = 0.5 ** (batch_images / self.half_life_images)
        if self.warmup:
            d = min(d, (1 + self.num_updates) / (10 + self.num_updates))
        return d

    @torch.no_grad()
    def update(self, model: nn.Module, batch_images: int) -> float:
        """Move the shadow weights toward ``model``'s; buffers are copied. Returns the decay used."""
        d = self.decay(batch_images)
        ema_params = list(self.module.parameters())
        params = [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params, strict=True)]
        torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers(), strict=True):
            e.copy_(b)
        self.num_updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        return {
            "module": self.module.state_dict(),
            "num_updates": self.num_updates,
            "half_life_images": self.half_life_images,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
