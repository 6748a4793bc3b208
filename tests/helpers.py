"""Small analytic networks and fields shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class PointwiseNet(nn.Module):
    """A per-pixel network (1x1 convolutions): each output pixel depends on that pixel alone."""

    downsample_factor = 1

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(8, 6, 1, 1, generator=g) * 0.5)
        self.b = nn.Parameter(torch.randn(6, 8, 1, 1, generator=g) * 0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(nn.functional.conv2d(x, self.a) + t.view(-1, 1, 1, 1) / 999.0)
        return nn.functional.conv2d(h, self.b)


class RecordingNet(nn.Module):
    """Records its inputs and returns a 6-channel output whose channels identify themselves."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.clone(), t.clone()))
        b, _, h, w = x.shape
        return torch.arange(6, dtype=x.dtype).view(1, 6, 1, 1).expand(b, 6, h, w).clone()
